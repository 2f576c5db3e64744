"""Markdown tables of the demo's results: the chosen run per noise rate and method, and the rate
sensitivity (test accuracy at every learning rate tried)."""
from __future__ import annotations

import pandas as pd

#: Column titles of the methods (losses) in the tables.
NAMES = {"ce": "CoOp (ce)", "dspt": "DSPT"}


def format_table(rows: pd.DataFrame, zeroshot_acc: float, losses: list[str]) -> str:
    """One line per noise rate: test accuracy, memorised share and chosen lr of each loss, then zero-shot."""
    cols = [f"{NAMES.get(l, l)} acc" for l in losses] + [f"{NAMES.get(l, l)} memorised" for l in losses] + \
        [f"{NAMES.get(l, l)} lr" for l in losses]
    lines = ["| noise | " + " | ".join(cols) + " | zero-shot |", "|" + "---|" * (len(cols) + 2)]
    for rate in sorted(rows["noise_rate"].unique()):
        sub = rows[rows["noise_rate"] == rate].set_index("loss")

        def cell(loss: str, col: str, fmt: str, sub: pd.DataFrame = sub) -> str:
            if loss not in sub.index or pd.isna(sub.loc[loss, col]):
                return "-"
            return format(sub.loc[loss, col], fmt)

        cells = [cell(l, "test_acc", ".1f") for l in losses] + [cell(l, "memorised", ".1f") for l in losses] + \
            [cell(l, "lr", "g") for l in losses]
        lines.append(f"| {rate:.1f} | " + " | ".join(cells) + f" | {zeroshot_acc:.1f} |")
    return "\n".join(lines)


def format_sensitivity(runs: pd.DataFrame, losses: list[str]) -> str:
    """Test accuracy of every learning rate tried (shown, not used to choose)."""
    lrs = sorted(runs["lr"].unique())
    cols = [f"{NAMES.get(l, l)} lr={lr:g}" for l in losses for lr in lrs]
    lines = ["| noise | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for rate in sorted(runs["noise_rate"].unique()):
        sub = runs[runs["noise_rate"] == rate].set_index(["loss", "lr"])["test_acc"]
        lines.append(f"| {rate:.1f} | " + " | ".join(
            f"{sub[(l, lr)]:.1f}" if (l, lr) in sub.index else "-" for l in losses for lr in lrs) + " |")
    return "\n".join(lines)
