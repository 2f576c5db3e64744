"""benchmarks/audit_quality.py's AUROC and its paired interval against zero-shot: the rank formula against
scikit-learn (ties included), and the interval on cases whose answer is known."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np


def _load():
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))  # audit_quality imports cifar10n_case beside it
    try:
        spec = importlib.util.spec_from_file_location("audit_quality", bench / "audit_quality.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(bench))
    return module


aq = _load()


def test_auroc_is_scikit_learns_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    noisy = rng.random(500) < 0.3
    score = np.round(rng.random(500) - 0.3 * noisy, 1)  # rounded: many ties
    assert abs(aq._auroc(noisy, -score) - roc_auc_score(noisy, -score)) < 1e-12


def test_the_gain_over_zero_shot_and_its_interval():
    rng = np.random.default_rng(1)
    noisy = rng.random(2000) < 0.3
    weak = rng.normal(0, 1, 2000) - 0.5 * noisy  # low score: suspicious
    strong = rng.normal(0, 1, 2000) - 2.0 * noisy
    g, low, high = aq.auroc_gain(noisy, weak, weak, draws=200)
    assert g == low == high == 0.0
    g, low, high = aq.auroc_gain(noisy, strong, weak, draws=200)
    assert 0 < low < g < high  # a better score's gain is positive, its interval excludes 0
    assert low <= aq._auroc(noisy, -strong) - aq._auroc(noisy, -weak) <= high
