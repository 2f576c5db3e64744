"""How many labels of a training set are wrong, estimated from an audit's out-of-sample scores, with an interval.

An audit's flags are as many as this estimate says (the top of the ranking), so a review list is sized by the
noise, not by a threshold: a detector that flags two thirds of a set where a third is wrong is no help.

Three estimators, all on what the audit already has:
- `reference` (the default where the test split's labels can be trusted): the zero-shot classifier is
  calibrated on the clean test labels (one temperature), and the label-noise transition matrix T[true, given]
  of the training set is then fitted by maximum likelihood, P(given | image) = sum_c q(c | image) T[c, given],
  by EM (the likelihood is concave in T, so EM finds its maximum). The share of wrong labels is the mean
  posterior probability that an image's given label is not its true class. It needs no noise model (sym, pair
  and human noise are all some T) and no threshold, only probabilities that are calibrated on clean labels; the
  zero-shot model's are used because they never saw the labels under audit (a prompt tuned on them learns
  their flips, and would count them as right). One temperature cannot fix every miscalibration, so the
  estimator checks itself where the truth is known: it is run on the clean test labels (cross-fitted halves),
  and what it reads there (0 for a perfect estimator) says whether its figure can be used (`clean_reading`);
- `mixture`: a two-component Gaussian mixture on the logit of the ranking score (the probability of the
  given label); the weight of the low component is the share of wrong labels. The sample-selection step of
  DivideMix and its successors, used here to count instead of to select.
- `confident_joint`: cleanlab's calibrated confident joint of given and predicted labels; the share off its
  diagonal (what `find_label_issues(filter_by="prune_by_noise_rate")` removes).
The interval is a percentile bootstrap over images (training and, for `reference`, test images): it covers the
sampling error of the estimate, not the error of its model (a mixture of two Gaussians, or calibrated
probabilities), which the audit docs measure.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .audit_scores import ESTIMATORS

__all__ = ["ESTIMATORS", "NoiseEstimate", "Reference", "clean_reading", "estimate_noise_rate", "fit_temperature", "flag_top",
           "transition_em"]

_EPS = 1e-6
#: the largest gap between the two EM starts of `reference` at which its share counts as identified
IDENTIFIED = 0.05
#: the largest share `reference` may read among clean reference labels and still count as reliable: 0.15
#: separated the two priors measured in docs/audit.md (0.10 where it followed the truth, 0.47 where it did not)
CLEAN_READING = 0.15
#: the starting diagonal of `reference`'s EM: the estimate's, then the near-clean and near-uniform checks
_START, _CLEAN_START = 0.8, 0.99


@dataclass
class NoiseEstimate:
    rate: float
    low: float
    high: float
    method: str
    images: int
    level: float = 0.95
    #: `reference` only: the rates EM ends at from a near-clean and from a near-uniform start; apart by more than
    #: `IDENTIFIED`, the reference classifier does not pin the share (its probabilities say too little)
    starts: tuple[float, float] | None = None
    #: `reference` only: the share the estimator reads among the reference images' own (clean) labels, two-fold
    #: cross-fitted (temperature from one half, EM on the other): its error where the truth is 0
    clean_reading: float | None = None

    @property
    def identified(self) -> bool:
        return self.starts is None or abs(self.starts[0] - self.starts[1]) <= IDENTIFIED

    @property
    def reliable(self) -> bool:
        """Identified, and reads at most `CLEAN_READING` wrong among labels known to be right."""
        return self.identified and (self.clean_reading is None or self.clean_reading <= CLEAN_READING)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"identified": self.identified, "reliable": self.reliable}

    def text(self) -> str:
        out = (f"estimated share of wrong labels: {self.rate:.1%} ({self.level:.0%} bootstrap interval "
               f"{self.low:.1%} to {self.high:.1%}; {self.method}, {self.images} images)")
        if not self.identified:
            out += (f"; NOT IDENTIFIED: EM from a near-clean and a near-uniform start ends at {self.starts[0]:.1%} "
                    f"and {self.starts[1]:.1%} (the zero-shot model's probabilities say too little about the classes)")
        elif not self.reliable:
            out += (f"; UNRELIABLE: it reads {self.clean_reading:.1%} wrong among the clean test labels (the zero-shot "
                    f"model is too weak or too miscalibrated here)")
        return out


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


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature t that minimises the negative log-likelihood of `labels` under softmax(logits / t)."""
    from scipy.optimize import minimize_scalar

    z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    rows = np.arange(len(y))

    def nll(log_t: float) -> float:
        return float(-_log_softmax(z / np.exp(log_t))[rows, y].mean())

    return float(np.exp(minimize_scalar(nll, bounds=(-6.0, 6.0), method="bounded").x))


def transition_em(probs: np.ndarray, given: np.ndarray, iterations: int = 500, tol: float = 1e-7,
                  smoothing: float = 1.0, start: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """The transition matrix T[true, given] that maximises sum_i log sum_c probs[i, c] T[c, given_i] (rows of T
    sum to 1; `smoothing` pseudo-images per row, spread uniformly, keep a row without images defined), and each
    image's posterior probability that its given label is its true class. EM from T = `start` on the diagonal,
    the rest spread uniformly."""
    from scipy.sparse import csr_matrix

    q = np.asarray(probs, dtype=np.float64)
    n, k = q.shape
    y = np.asarray(given, dtype=np.int64)
    onehot = csr_matrix((np.ones(n), (np.arange(n), y)), shape=(n, k))
    t = np.full((k, k), (1.0 - start) / max(k - 1, 1))
    np.fill_diagonal(t, start)
    previous = -np.inf
    for _ in range(iterations):
        joint = q * t[:, y].T  # [N, C]: q(c | image) T[c, given]
        like = joint.sum(1, keepdims=True)
        post = joint / np.maximum(like, 1e-300)  # P(true = c | image, given)
        counts = np.asarray((onehot.T @ post).T) + smoothing / k  # [true, given]
        t = counts / counts.sum(1, keepdims=True)
        ll = float(np.log(np.maximum(like, 1e-300)).sum())
        if ll - previous < tol * n:
            break
        previous = ll
    return t, post[np.arange(n), y]


def _reference_rate(logits: np.ndarray, given: np.ndarray, ref_logits: np.ndarray, ref_labels: np.ndarray,
                    starts: tuple[float, ...] = (_START,)) -> float | list[float]:
    """The share of wrong labels under the calibrated reference classifier, from EM's `starts` (one: a float)."""
    temperature = fit_temperature(ref_logits, ref_labels)
    q = np.exp(_log_softmax(np.asarray(logits, dtype=np.float64) / temperature))
    rates = [float(1.0 - transition_em(q, given, start=s)[1].mean()) for s in starts]
    return rates[0] if len(starts) == 1 else rates


def _rate(method: str, score: np.ndarray, given: np.ndarray | None, probs: np.ndarray | None, seed: int,
          reference: Reference | None = None) -> float:
    if method == "mixture":
        return _mixture_rate(score, seed)
    if given is None:
        raise ValueError(f"{method} needs the given labels")
    if method == "reference":
        if reference is None:
            raise ValueError("the reference estimator needs the classifier's logits on the training images and on "
                             "clean-labelled reference images")
        return _reference_rate(reference.logits, given, reference.ref_logits, reference.ref_labels)
    if probs is None:
        raise ValueError("confident_joint needs the probabilities")
    return _confident_joint_rate(given, probs)


def clean_reading(ref_logits: np.ndarray, ref_labels: np.ndarray, seed: int = 0) -> float:
    """The share of wrong labels `reference` reads among labels known to be right: the reference images split in
    two (seeded), the temperature fitted on one half and EM run on the other, both ways, averaged. Zero for a
    perfect estimator; its size is the estimator's error on this classifier, measured where the truth is known."""
    ref_logits, ref_labels = np.asarray(ref_logits, dtype=np.float64), np.asarray(ref_labels)
    order = np.random.default_rng(seed).permutation(len(ref_labels))
    halves = order[:len(order) // 2], order[len(order) // 2:]
    if min(len(h) for h in halves) == 0:
        return float("nan")
    return float(np.mean([_reference_rate(ref_logits[b], ref_labels[b], ref_logits[a], ref_labels[a])
                          for a, b in (halves, halves[::-1])]))


@dataclass
class Reference:
    """What the `reference` estimator reads: one classifier's logits on the training images [N, C] and on
    reference images [M, C] whose labels `ref_labels` [M] are right (a clean test split)."""

    logits: np.ndarray
    ref_logits: np.ndarray
    ref_labels: np.ndarray

    def subset(self, train: np.ndarray, ref: np.ndarray) -> Reference:
        return Reference(self.logits[train], self.ref_logits[ref], self.ref_labels[ref])


def estimate_noise_rate(score: np.ndarray, given: np.ndarray | None = None, probs: np.ndarray | None = None,
                        method: str = "mixture", bootstrap: int = 200, level: float = 0.95,
                        seed: int = 0, reference: Reference | None = None) -> NoiseEstimate:
    """The share of wrong labels, from `score` (the probability of each given label; low: suspicious), for
    `confident_joint` from the given labels and the probabilities [N, C], for `reference` from the given labels
    and `reference` (a classifier's logits and clean reference labels); with a bootstrap interval."""
    if method not in ESTIMATORS:
        raise ValueError(f"noise estimator '{method}' unknown; choose one of: {', '.join(ESTIMATORS)}")
    score = np.asarray(score, dtype=np.float64)
    n = len(score)
    rate = _rate(method, score, given, probs, seed, reference)
    rng = np.random.default_rng(seed)
    draws = []
    m = 0 if reference is None else len(reference.ref_labels)
    for _ in range(bootstrap if n > 1 else 0):
        idx = rng.integers(0, n, n)
        ref = rng.integers(0, m, m) if method == "reference" else None
        if given is not None and len(np.unique(given[idx])) < len(np.unique(given)) and method == "confident_joint":
            continue  # a resample without some class: the confident joint is undefined for it
        draws.append(_rate(method, score[idx], None if given is None else given[idx],
                           None if probs is None else probs[idx], seed,
                           None if ref is None else reference.subset(idx, ref)))
    alpha = (1 - level) / 2
    low, high = (np.quantile(draws, [alpha, 1 - alpha]).tolist() if draws else (rate, rate))
    starts = clean = None
    if method == "reference":
        clean = clean_reading(reference.ref_logits, reference.ref_labels, seed)
        k = reference.logits.shape[1]
        clean_start, uniform_start = _reference_rate(reference.logits, given, reference.ref_logits,
                                                     reference.ref_labels, (_CLEAN_START, 1.5 / k))
        starts = (clean_start, uniform_start)
        if abs(clean_start - uniform_start) > IDENTIFIED:  # the likelihood is flat: the interval spans the starts
            low, high = min(low, clean_start, uniform_start), max(high, clean_start, uniform_start)
    return NoiseEstimate(float(np.clip(rate, 0, 1)), float(np.clip(low, 0, 1)), float(np.clip(high, 0, 1)), method, n,
                         level, starts, clean)


def flag_top(score: np.ndarray, rate: float) -> np.ndarray:
    """Flags for the round(rate * N) lowest scores (ties broken by position, so the count is exact)."""
    score = np.asarray(score, dtype=np.float64)
    k = int(round(float(np.clip(rate, 0, 1)) * len(score)))
    flags = np.zeros(len(score), dtype=bool)
    flags[np.argsort(score, kind="stable")[:k]] = True
    return flags
