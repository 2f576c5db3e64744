"""Model selection on validation data: from a results table, the learning rate each group would pick.

The input is a plain results table (a DataFrame, one row per run) with at least the group columns, the
learning rate and a validation accuracy; any other column (test accuracy, memorisation, ...) rides along
untouched. Test accuracy plays no part in the choice, only the validation column does.
"""
from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

#: The demo's groups: one choice per noise rate and loss (method).
DEFAULT_GROUPS = ("noise_rate", "loss")
#: Accuracy on the *noisy* validation labels: what a user with noisy labels has.
DEFAULT_METRIC = "val_acc_given"


def select_on_validation(runs: pd.DataFrame, by: Sequence[str] = DEFAULT_GROUPS, metric: str = DEFAULT_METRIC,
                         lr: str = "lr") -> pd.DataFrame:
    """Per group of `by`: the row whose learning rate has the best `metric` (higher is better); ties go to the
    smaller rate. Rows come back sorted by `by`, one per group, with every column of `runs`.

    A group must have at most one row per rate (several seeds of one rate: add "seed" to `by`, or average
    first), so the choice never depends on row order or on any other column."""
    by = list(by)
    missing = [c for c in by + [metric, lr] if c not in runs.columns]
    if missing:
        raise ValueError(f"results table lacks the column(s) {missing}; it has {list(runs.columns)}")
    dup = runs.duplicated(by + [lr], keep=False)
    if dup.any():
        first = runs.loc[dup, by + [lr]].iloc[0].to_dict()
        raise ValueError(f"several rows for one group and learning rate (e.g. {first}): add the column that tells "
                         f"them apart (a seed?) to the groups {by}, or aggregate them first")
    ordered = runs.sort_values(by + [metric, lr], ascending=[True] * len(by) + [False, True])
    return ordered.groupby(by, sort=True).head(1).reset_index(drop=True)
