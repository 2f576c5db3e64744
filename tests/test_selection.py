"""Choosing the learning rate on validation data: never on test, ties to the smaller rate, any group keys."""
import numpy as np
import pandas as pd
import pytest

from dspt.selection import select_on_validation


def _grid(seed: int) -> pd.DataFrame:
    """A demo-like results table with many exact validation ties (accuracies on a coarse grid)."""
    rng = np.random.default_rng(seed)
    rows = [{"noise_rate": rate, "loss": loss, "lr": lr, "val_acc_given": float(rng.integers(0, 4) * 10),
             "test_acc": float(rng.uniform(0, 100)), "memorised": float(rng.uniform(0, 100))}
            for rate in (0.0, 0.4, 0.8) for loss in ("ce", "dspt") for lr in (0.0002, 0.002, 0.02, 0.2)]
    return pd.DataFrame(rows)


def _choice(chosen: pd.DataFrame) -> list[tuple]:
    return list(chosen[["noise_rate", "loss", "lr"]].itertuples(index=False, name=None))


def test_lr_is_chosen_on_noisy_validation_never_test():
    runs = pd.DataFrame([
        {"noise_rate": 0.4, "loss": "ce", "lr": 0.02, "val_acc_given": 30.0, "test_acc": 90.0},
        {"noise_rate": 0.4, "loss": "ce", "lr": 0.002, "val_acc_given": 35.0, "test_acc": 50.0},
        {"noise_rate": 0.4, "loss": "dspt", "lr": 0.02, "val_acc_given": 40.0, "test_acc": 60.0},
        {"noise_rate": 0.4, "loss": "dspt", "lr": 0.002, "val_acc_given": 40.0, "test_acc": 70.0},
    ])
    chosen = select_on_validation(runs).set_index("loss")
    assert chosen.loc["ce", "lr"] == 0.002  # best validation, although its test accuracy is worse
    assert chosen.loc["dspt", "lr"] == 0.002  # a tie goes to the smaller rate
    assert chosen.loc["ce", "test_acc"] == 50.0  # the chosen run's own row, every column kept


@pytest.mark.parametrize("seed", range(5))
def test_permuting_or_altering_test_accuracy_never_changes_the_choice(seed):
    runs = _grid(seed)
    want = _choice(select_on_validation(runs))
    rng = np.random.default_rng(100 + seed)
    for test_acc in (rng.permutation(runs["test_acc"].to_numpy()), -runs["test_acc"], 100 - runs["test_acc"],
                     np.full(len(runs), np.nan), rng.uniform(0, 100, len(runs))):
        assert _choice(select_on_validation(runs.assign(test_acc=test_acc))) == want
    assert _choice(select_on_validation(runs.drop(columns="test_acc"))) == want  # not even needed
    shuffled = runs.sample(frac=1.0, random_state=seed)
    assert _choice(select_on_validation(shuffled)) == want  # nor does the row order matter


@pytest.mark.parametrize("seed", range(5))
def test_the_choice_is_the_best_validation_then_the_smallest_rate(seed):
    runs = _grid(seed)
    chosen = select_on_validation(runs)
    assert _choice(chosen) == sorted(_choice(chosen))  # one row per group, sorted by the group keys
    assert len(chosen) == 3 * 2
    for (rate, loss), group in runs.groupby(["noise_rate", "loss"]):
        best = group[group["val_acc_given"] == group["val_acc_given"].max()]
        row = chosen[(chosen["noise_rate"] == rate) & (chosen["loss"] == loss)]
        assert row["lr"].item() == best["lr"].min()


def test_ties_go_to_the_smaller_rate_whatever_the_order():
    runs = pd.DataFrame({"noise_rate": 0.2, "loss": "dspt", "lr": [0.2, 0.02, 0.002, 0.0002],
                         "val_acc_given": [50.0, 60.0, 60.0, 40.0], "test_acc": [90.0, 80.0, 10.0, 0.0]})
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]):
        assert select_on_validation(runs.iloc[order])["lr"].tolist() == [0.002]


def test_group_keys_and_metric_are_parameters():
    runs = pd.concat([_grid(0).assign(seed=1), _grid(1).assign(seed=2)], ignore_index=True)
    with pytest.raises(ValueError, match="several rows for one group and learning rate"):
        select_on_validation(runs)  # two seeds per (noise rate, loss, lr): ambiguous, refused
    per_seed = select_on_validation(runs, by=("seed", "noise_rate", "loss"))
    assert len(per_seed) == 2 * 3 * 2 and per_seed["seed"].tolist() == [1] * 6 + [2] * 6
    for s, grid in ((1, _grid(0)), (2, _grid(1))):
        assert _choice(per_seed[per_seed["seed"] == s]) == _choice(select_on_validation(grid))
    one_rate = _grid(0)[lambda d: d["noise_rate"] == 0.4]
    by_loss = select_on_validation(one_rate.rename(columns={"val_acc_given": "val_acc"}), by=["loss"],
                                   metric="val_acc")
    assert _choice(by_loss) == _choice(select_on_validation(one_rate))
    with pytest.raises(ValueError, match="lacks the column"):
        select_on_validation(_grid(0).drop(columns="val_acc_given"))


def test_a_single_rate_without_validation_data_is_kept():
    runs = pd.DataFrame({"noise_rate": [0.0, 0.4], "loss": "ce", "lr": 0.002, "val_acc_given": np.nan,
                         "test_acc": [70.0, 60.0]})
    assert select_on_validation(runs)["test_acc"].tolist() == [70.0, 60.0]
