"""The demo's markdown tables from small hand-made report frames."""
import math

import pandas as pd

from dspt.tables import format_sensitivity, format_table, verdict_lines


def _frames():
    stats = pd.DataFrame([
        {"noise_rate": 0.0, "method": "ce", "mean": 81.25, "std": 1.04, "n": 3, "lr": 0.02, "memorised": math.nan},
        {"noise_rate": 0.0, "method": "dspt", "mean": 80.0, "std": 0.5, "n": 3, "lr": 0.002, "memorised": math.nan},
        {"noise_rate": 0.4, "method": "ce", "mean": 60.04, "std": 2.0, "n": 3, "lr": 0.0002, "memorised": 55.55},
        {"noise_rate": 0.4, "method": "dspt", "mean": 75.96, "std": math.nan, "n": 1, "lr": 0.2, "memorised": 3.0},
    ])
    comparison = pd.DataFrame([
        {"noise_rate": 0.0, "method": "dspt", "n": 3, "mean": -1.25, "lo": -3.0, "hi": 0.5, "wins": 1, "ties": 0,
         "losses": 2, "verdict": "no clear difference"},
        {"noise_rate": 0.4, "method": "dspt", "n": 1, "mean": 15.92, "lo": math.nan, "hi": math.nan, "wins": 1,
         "ties": 0, "losses": 0, "verdict": "too few seeds"},
    ])
    return stats, comparison


def test_table_of_the_chosen_runs():
    stats, comparison = _frames()
    want = "\n".join([
        "| noise | CoOp (ce) acc | DSPT acc | DSPT - CoOp (ce) [95 % CI] | wins/ties/losses | verdict | "
        "CoOp (ce) memorised | DSPT memorised | CoOp (ce) lr | DSPT lr |",
        "|---|---|---|---|---|---|---|---|---|---|",
        "| 0.0 | 81.2 ± 1.0 | 80.0 ± 0.5 | -1.2 [-3.0, +0.5] | 1/0/2 | no clear difference | - | - | 0.02 | 0.002 |",
        "| 0.4 | 60.0 ± 2.0 | 76.0 | +15.9 [-, -] | 1/0/0 | too few seeds | 55.5 | 3.0 | 0.0002 | 0.2 |",
    ])
    assert format_table(stats.sample(frac=1.0, random_state=0), comparison, ["ce", "dspt"], "ce") == want


def test_verdict_lines_say_what_the_interval_supports():
    _, comparison = _frames()
    assert verdict_lines(comparison, "ce", 3) == [
        "noise 0%: DSPT no clear difference from CoOp (ce) (-1.2 points, 95 % CI [-3.0, +0.5], better in 1 of 3 "
        "seeds)",
        "noise 40%: DSPT one seed only: no interval against CoOp (ce) (+15.9 points, 95 % CI [-, -], better in 1 of "
        "1 seeds)"]


def test_sensitivity_table_shows_every_rate_tried():
    runs = pd.DataFrame([
        {"noise_rate": 0.6, "method": "dspt", "lr": 0.02, "test_acc": 70.0},
        {"noise_rate": 0.0, "method": "ce", "lr": 0.002, "test_acc": 80.0},
        {"noise_rate": 0.0, "method": "ce", "lr": 0.002, "test_acc": 82.0},
        {"noise_rate": 0.0, "method": "ce", "lr": 0.02, "test_acc": 82.5},
        {"noise_rate": 0.0, "method": "dspt", "lr": 0.002, "test_acc": 79.0},
        {"noise_rate": 0.0, "method": "dspt", "lr": 0.02, "test_acc": 81.0},
        {"noise_rate": 0.6, "method": "ce", "lr": 0.002, "test_acc": 30.0},
    ])
    want = "\n".join([
        "| noise | CoOp (ce) lr=0.002 | CoOp (ce) lr=0.02 | DSPT lr=0.002 | DSPT lr=0.02 |",
        "|---|---|---|---|---|",
        "| 0.0 | 81.0 ± 1.4 | 82.5 | 79.0 | 81.0 |",
        "| 0.6 | 30.0 | - | - | 70.0 |",
    ])
    assert format_sensitivity(runs, ["ce", "dspt"]) == want
