"""The demo's markdown tables from small hand-made results tables."""
import numpy as np
import pandas as pd

from dspt.tables import format_sensitivity, format_table


def test_table_of_the_chosen_runs():
    chosen = pd.DataFrame([
        {"noise_rate": 0.0, "loss": "ce", "lr": 0.02, "test_acc": 81.25, "memorised": np.nan},
        {"noise_rate": 0.0, "loss": "dspt", "lr": 0.002, "test_acc": 80.0, "memorised": np.nan},
        {"noise_rate": 0.4, "loss": "ce", "lr": 0.0002, "test_acc": 60.04, "memorised": 55.55},
        {"noise_rate": 0.4, "loss": "dspt", "lr": 0.2, "test_acc": 75.96, "memorised": 3.0},
        {"noise_rate": 0.8, "loss": "ce", "lr": 0.002, "test_acc": 20.0, "memorised": 90.0},
    ])
    want = "\n".join([
        "| noise | CoOp (ce) acc | DSPT acc | CoOp (ce) memorised | DSPT memorised | CoOp (ce) lr | DSPT lr"
        " | zero-shot |",
        "|---|---|---|---|---|---|---|---|",
        "| 0.0 | 81.2 | 80.0 | - | - | 0.02 | 0.002 | 41.0 |",
        "| 0.4 | 60.0 | 76.0 | 55.5 | 3.0 | 0.0002 | 0.2 | 41.0 |",
        "| 0.8 | 20.0 | - | 90.0 | - | 0.002 | - | 41.0 |",
    ])
    assert format_table(chosen.sample(frac=1.0, random_state=0), 41.0, ["ce", "dspt"]) == want


def test_table_names_unknown_losses_as_given():
    chosen = pd.DataFrame([{"noise_rate": 0.2, "loss": "gce", "lr": 0.02, "test_acc": 50.0, "memorised": 1.0}])
    assert format_table(chosen, 12.34, ["gce"]) == (
        "| noise | gce acc | gce memorised | gce lr | zero-shot |\n|---|---|---|---|---|\n"
        "| 0.2 | 50.0 | 1.0 | 0.02 | 12.3 |")


def test_sensitivity_table_shows_every_rate_tried():
    runs = pd.DataFrame([
        {"noise_rate": 0.6, "loss": "dspt", "lr": 0.02, "test_acc": 70.0},
        {"noise_rate": 0.0, "loss": "ce", "lr": 0.002, "test_acc": 80.0},
        {"noise_rate": 0.0, "loss": "ce", "lr": 0.02, "test_acc": 82.5},
        {"noise_rate": 0.0, "loss": "dspt", "lr": 0.002, "test_acc": 79.0},
        {"noise_rate": 0.0, "loss": "dspt", "lr": 0.02, "test_acc": 81.0},
        {"noise_rate": 0.6, "loss": "ce", "lr": 0.002, "test_acc": 30.0},
    ])
    want = "\n".join([
        "| noise | CoOp (ce) lr=0.002 | CoOp (ce) lr=0.02 | DSPT lr=0.002 | DSPT lr=0.02 |",
        "|---|---|---|---|---|",
        "| 0.0 | 80.0 | 82.5 | 79.0 | 81.0 |",
        "| 0.6 | 30.0 | - | - | 70.0 |",
    ])
    assert format_sensitivity(runs, ["ce", "dspt"]) == want
