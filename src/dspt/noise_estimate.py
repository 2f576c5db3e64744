"""How many labels of a training set are wrong, estimated from an audit's out-of-sample scores, with an interval.

An audit's flags are as many as this estimate says (the top of the ranking), so a review list is sized by the
noise, not by a threshold: a detector that flags two thirds of a set where a third is wrong is no help.

Two estimators, both on what the audit already has:
- `mixture`: a two-component Gaussian mixture on the logit of the ranking score (the probability of the
  given label); the weight of the low component is the share of wrong labels. The sample-selection step of
  DivideMix and its successors, used here to count instead of to select.
- `confident_joint`: cleanlab's calibrated confident joint of given and predicted labels; the share off its
  diagonal (what `find_label_issues(filter_by="prune_by_noise_rate")` removes).
The interval is a percentile bootstrap over images: it covers the sampling error of the estimate, not the
error of its model (a mixture of two Gaussians, or calibrated probabilities), which the audit docs measure.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .audit_scores import ESTIMATORS

__all__ = ["ESTIMATORS", "NoiseEstimate", "estimate_noise_rate", "flag_top"]

_EPS = 1e-6


@dataclass
class NoiseEstimate:
    rate: float
    low: float
    high: float
    method: str
    images: int
    level: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        return (f"estimated share of wrong labels: {self.rate:.1%} ({self.level:.0%} bootstrap interval "
                f"{self.low:.1%} to {self.high:.1%}; {self.method}, {self.images} images)")


def _mixture_rate(score: np.ndarray, seed: int) -> float:
    from sklearn.mixture import GaussianMixture

    x = np.log(np.clip(score, _EPS, 1 - _EPS)) - np.log1p(-np.clip(score, _EPS, 1 - _EPS))
    if np.ptp(x) < 1e-9:
        return 0.0
    gm = GaussianMixture(2, covariance_type="full", random_state=seed, reg_covar=1e-4, n_init=2)
    gm.fit(x[:, None])
    low = int(np.argmin(gm.means_.ravel()))
    return float(gm.weights_[low])


def _confident_joint_rate(given: np.ndarray, probs: np.ndarray) -> float:
    from cleanlab.count import estimate_joint

    joint = estimate_joint(given, probs)
    return float(1.0 - np.trace(joint))


def _rate(method: str, score: np.ndarray, given: np.ndarray | None, probs: np.ndarray | None, seed: int) -> float:
    if method == "mixture":
        return _mixture_rate(score, seed)
    if given is None or probs is None:
        raise ValueError("confident_joint needs the given labels and the probabilities")
    return _confident_joint_rate(given, probs)


def estimate_noise_rate(score: np.ndarray, given: np.ndarray | None = None, probs: np.ndarray | None = None,
                        method: str = "mixture", bootstrap: int = 200, level: float = 0.95,
                        seed: int = 0) -> NoiseEstimate:
    """The share of wrong labels, from `score` (the probability of each given label; low: suspicious) or, for
    `confident_joint`, from the given labels and the probabilities [N, C]; with a bootstrap interval."""
    if method not in ESTIMATORS:
        raise ValueError(f"noise estimator '{method}' unknown; choose one of: {', '.join(ESTIMATORS)}")
    score = np.asarray(score, dtype=np.float64)
    n = len(score)
    rate = _rate(method, score, given, probs, seed)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(bootstrap if n > 1 else 0):
        idx = rng.integers(0, n, n)
        if given is not None and len(np.unique(given[idx])) < len(np.unique(given)) and method != "mixture":
            continue  # a resample without some class: the confident joint is undefined for it
        draws.append(_rate(method, score[idx], None if given is None else given[idx],
                           None if probs is None else probs[idx], seed))
    alpha = (1 - level) / 2
    low, high = (np.quantile(draws, [alpha, 1 - alpha]).tolist() if draws else (rate, rate))
    return NoiseEstimate(float(np.clip(rate, 0, 1)), float(np.clip(low, 0, 1)), float(np.clip(high, 0, 1)), method, n,
                         level)


def flag_top(score: np.ndarray, rate: float) -> np.ndarray:
    """Flags for the round(rate * N) lowest scores (ties broken by position, so the count is exact)."""
    score = np.asarray(score, dtype=np.float64)
    k = int(round(float(np.clip(rate, 0, 1)) * len(score)))
    flags = np.zeros(len(score), dtype=bool)
    flags[np.argsort(score, kind="stable")[:k]] = True
    return flags
