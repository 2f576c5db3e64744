"""Label-noise protocols of this research line (CoOp, PTNL, JoAPR, NLPrompt) for class-index labels.

``make_noisy_labels(true, C, "sym", 0.4, seed=1)`` returns a :class:`NoisyLabels` holding the true
labels, the labels given to training, and what is needed to report the noise (realised rate,
per-class transition matrix) and to save it with the run.

Protocols are functions ``fn(true, num_classes, rate, rng, **options) -> given`` in the
:data:`NOISE_TYPES` registry; add one with ``@register_noise(name)``. All randomness comes from
``np.random.default_rng(seed)``, so the same seed gives the same labels; seed 0 is a valid seed.

Flip count: ``sym`` and ``pair`` flip exactly ``flip_count(N, rate) = floor(rate*N + 0.5)`` samples
(round half up, unlike Python's ``round``, which rounds halves to even), chosen uniformly without
replacement, so the realised rate is the requested one up to 1/(2N). ``instance`` (image-dependent noise of
Xia et al. 2020, drawn from the images' features) flips the same exact count, chosen by per-sample flip rates.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import ConfigError, DataError
from .io import atomic_write_text
from .numbers import round_half_up

__all__ = [
    "NoisyLabels",
    "NOISE_TYPES",
    "register_noise",
    "make_noisy_labels",
    "flip_count",
    "instance_noise_model",
]

NoiseFn = Callable[..., np.ndarray]
NOISE_TYPES: dict[str, NoiseFn] = {}

_CSV_HEADER = ["index", "true", "given", "is_noisy"]


def register_noise(name: str) -> Callable[[NoiseFn], NoiseFn]:
    """Decorator adding a protocol ``fn(true, num_classes, rate, rng, **options) -> given``."""

    def deco(fn: NoiseFn) -> NoiseFn:
        if name in NOISE_TYPES:
            raise ValueError(f"noise type '{name}' is already registered")
        NOISE_TYPES[name] = fn
        return fn

    return deco


def flip_count(n: int, rate: float) -> int:
    """Number of samples to corrupt: ``floor(rate*n + 0.5)`` (round half up, deterministic)."""
    return round_half_up(rate * n)


# --------------------------------------------------------------------------------------------
# validation helpers


def _check_rate(rate: Any) -> float:
    msg = f"noise rate {rate} is outside [0, 1); pass a fraction such as 0.4"
    if isinstance(rate, bool):
        raise ConfigError(msg)
    try:
        r = float(rate)
    except (TypeError, ValueError):
        raise ConfigError(f"noise rate {rate!r} is not a number; pass a fraction such as 0.4") from None
    if not math.isfinite(r):
        raise ConfigError(f"noise rate {rate} is not a finite number in [0, 1); "
                         "pass a fraction such as 0.4")
    if not 0.0 <= r < 1.0:
        raise ConfigError(msg)
    return r


def _check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2 for label noise, got {num_classes}")
    return int(num_classes)


def _check_seed(seed: Any) -> int:
    # Seed 0 is valid: test for type and sign, never for truthiness.
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer (0 is valid), got {seed!r}")
    return int(seed)


def _as_labels(labels: Any, num_classes: int, what: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ConfigError(f"{what} labels must be a 1-D array of class indices, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(np.isfinite(arr)) \
                or not np.all(arr == np.round(arr)):
            raise ConfigError(f"{what} labels must be integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=True)
    bad = (arr < 0) | (arr >= num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ConfigError(f"{what} label {int(arr[i])} at index {i} is outside [0, {num_classes}) "
                         f"(num_classes={num_classes}); {int(bad.sum())} label(s) out of range")
    return arr


# --------------------------------------------------------------------------------------------
# the result


@dataclass(eq=False)
class NoisyLabels:
    """True and given (training) labels of one noise draw, with the settings that made it."""

    true: np.ndarray
    given: np.ndarray
    num_classes: int
    noise_type: str
    rate: float
    seed: int

    def __post_init__(self) -> None:
        self.num_classes = _check_num_classes(self.num_classes)
        self.true = _as_labels(self.true, self.num_classes, "true")
        self.given = _as_labels(self.given, self.num_classes, "given")
        if self.true.shape != self.given.shape:
            raise ConfigError(f"true and given labels differ in length: "
                             f"{self.true.shape[0]} vs {self.given.shape[0]}")
        self.rate = float(self.rate)
        self.seed = int(self.seed)
        self.noise_type = str(self.noise_type)

    def __len__(self) -> int:
        return int(self.true.shape[0])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NoisyLabels):
            return NotImplemented
        return (np.array_equal(self.true, other.true) and np.array_equal(self.given, other.given)
                and self.num_classes == other.num_classes and self.noise_type == other.noise_type
                and self.rate == other.rate and self.seed == other.seed)

    def __repr__(self) -> str:
        return (f"NoisyLabels(n={len(self)}, num_classes={self.num_classes}, "
                f"noise_type={self.noise_type!r}, rate={self.rate}, seed={self.seed}, "
                f"realised_rate={self.realised_rate:.4f})")

    @property
    def is_noisy(self) -> np.ndarray:
        """bool [N]: the given label differs from the true one."""
        return self.given != self.true

    @property
    def realised_rate(self) -> float:
        """Fraction of samples whose given label is wrong (0.0 for an empty set)."""
        n = len(self)
        return float(self.is_noisy.sum()) / n if n else 0.0

    def transition_matrix(self) -> np.ndarray:
        """C x C float64; row i is the distribution of the given label for true class i.

        Rows of classes absent from ``true`` are all zeros (not NaN), so the matrix is always
        finite and can be written to JSON.
        """
        c = self.num_classes
        counts = np.bincount(self.true * c + self.given, minlength=c * c).reshape(c, c)
        counts = counts.astype(np.float64)
        totals = counts.sum(axis=1, keepdims=True)
        return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable report of the noise, as stored with every run."""
        return self._meta() | {"realised_rate": self.realised_rate,
                               "transition_matrix": self.transition_matrix().tolist()}

    def _meta(self) -> dict[str, Any]:
        return {
            "noise_type": self.noise_type,
            "rate": self.rate,
            "seed": self.seed,
            "num_classes": self.num_classes,
            "n": len(self),
            "n_noisy": int(self.is_noisy.sum()),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` (CSV: index,true,given,is_noisy) and ``path.with_suffix('.json')``.

        The JSON holds noise_type, rate, seed, num_classes, the realised rate and counts used to
        detect a stale pair. Each file is written to a temporary file in the same folder and moved
        into place with ``os.replace``, so a crash never leaves a half-written file.
        """
        path = Path(path)
        meta_path = path.with_suffix(".json")
        if meta_path == path:
            raise DataError(f"noisy-label file {path} must not end in .json "
                             "(the metadata goes to a .json file beside it); use .csv")
        path.parent.mkdir(parents=True, exist_ok=True)
        noisy = self.is_noisy.astype(np.int64)
        lines = [",".join(_CSV_HEADER)]
        lines += [f"{i},{t},{g},{f}" for i, (t, g, f) in
                  enumerate(zip(self.true.tolist(), self.given.tolist(), noisy.tolist()))]
        atomic_write_text(path, "\n".join(lines) + "\n")
        meta = self._meta() | {"realised_rate": self.realised_rate}  # for the reader; load recomputes it
        atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NoisyLabels":
        """Read a file written by :meth:`save`, checking the CSV against its JSON metadata."""
        path = Path(path)
        meta_path = path.with_suffix(".json")
        if not path.is_file():
            raise FileNotFoundError(f"noisy-label file not found: {path}")
        if not meta_path.is_file():
            raise FileNotFoundError(f"noisy-label metadata not found: {meta_path} "
                                    f"(written beside {path.name} by NoisyLabels.save)")
        meta = json.loads(meta_path.read_text())
        with open(path, newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header != _CSV_HEADER:
                raise DataError(f"{path}: expected header {','.join(_CSV_HEADER)}, got {header}")
            rows = [r for r in reader if r]
        try:
            data = np.array(rows, dtype=np.int64).reshape(-1, 4)
        except ValueError as exc:
            raise DataError(f"{path}: malformed row ({exc})") from None
        if not np.array_equal(data[:, 0], np.arange(len(data))):
            raise DataError(f"{path}: index column must be 0..N-1 in order")
        out = cls(true=data[:, 1], given=data[:, 2], num_classes=int(meta["num_classes"]),
                  noise_type=meta["noise_type"], rate=float(meta["rate"]), seed=int(meta["seed"]))
        if not np.array_equal(out.is_noisy, data[:, 3].astype(bool)):
            raise DataError(f"{path}: is_noisy column disagrees with true != given")
        if int(meta.get("n", len(out))) != len(out) or \
                int(meta.get("n_noisy", out.is_noisy.sum())) != int(out.is_noisy.sum()):
            raise DataError(f"{path} and {meta_path.name} disagree (n / n_noisy); "
                             "the pair is stale or was edited by hand")
        return out


# --------------------------------------------------------------------------------------------
# protocols


@register_noise("none")
def _none(true: np.ndarray, num_classes: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Clean labels."""
    if rate != 0.0:
        raise ConfigError(f"noise type 'none' takes rate 0, got {rate}; "
                         "pick a noise type such as 'sym' for a non-zero rate")
    return true.copy()


@register_noise("sym")
def _sym(true: np.ndarray, num_classes: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Symmetric noise (NLPrompt): round(rate*N) samples get a uniform label among the OTHER classes."""
    n = true.shape[0]
    idx = rng.choice(n, size=flip_count(n, rate), replace=False)
    offsets = rng.integers(1, num_classes, size=idx.shape[0])  # 1..C-1: never the true class
    given = true.copy()
    given[idx] = (true[idx] + offsets) % num_classes
    return given


@register_noise("pair")
def _pair(true: np.ndarray, num_classes: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Pair (asymmetric) noise (NLPrompt, Co-teaching): round(rate*N) samples get y -> (y+1) mod C."""
    n = true.shape[0]
    idx = rng.choice(n, size=flip_count(n, rate), replace=False)
    given = true.copy()
    given[idx] = (true[idx] + 1) % num_classes
    return given


#: Standard deviation of the per-sample flip rates around the target rate (Xia et al.'s ``norm_std``).
INSTANCE_STD = 0.1


def _instance_features(features: Any, n: int) -> np.ndarray:
    if features is None:
        raise ConfigError("noise type 'instance' draws the labels from the images' features: pass features=[N, E] "
                          "(dspt train encodes the training images first)")
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != n or x.shape[1] < 1:
        raise ConfigError(f"noise type 'instance': features must be [N={n}, E], got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ConfigError("noise type 'instance': the features hold NaN or inf")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _truncated_normal(rng: np.random.Generator, loc: float, std: float, n: int) -> np.ndarray:
    """``n`` draws of N(loc, std^2) truncated to [0, 1], by redrawing those outside (accepts >= 1/2 for loc in
    [0, 1]); the same law as Xia et al.'s ``scipy.stats.truncnorm((0-r)/std, (1-r)/std, loc=r, scale=std)``."""
    out = np.empty(n)
    todo = np.arange(n)
    while todo.size:
        draw = rng.normal(loc, std, size=todo.size)
        ok = (draw >= 0.0) & (draw <= 1.0)
        out[todo[ok]] = draw[ok]
        todo = todo[~ok]
    return out


def _instance_streams(rng: np.random.Generator, projection_seed: int | None) -> list[np.random.Generator]:
    """Independent streams: projection W, flip rates, which samples flip, where they flip to. The projection
    is the first child of ``default_rng(seed)``, so ``projection_seed=s`` gives the W of a draw seeded ``s``."""
    streams = rng.spawn(4)
    if projection_seed is not None:
        streams[0] = np.random.default_rng(_check_seed(projection_seed)).spawn(1)[0]
    return streams


def _instance_model(x: np.ndarray, true: np.ndarray, num_classes: int, rate: float,
                    w_rng: np.random.Generator, rate_rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n, e = x.shape
    flip_rate = _truncated_normal(rate_rng, rate, INSTANCE_STD, n)
    logits = np.zeros((n, num_classes))
    # W[k] ([E, C], standard normal) is the projection of class k; its own child stream, so W depends on the
    # seed only (not on N or on which classes are present) and the C x E x C tensor is never held at once.
    # (float32: ImageNet's 1000 x 512 x 1000 projection is drawn in seconds)
    x32 = x.astype(np.float32)
    for k, k_rng in enumerate(w_rng.spawn(num_classes)):
        rows = np.flatnonzero(true == k)
        if rows.size:
            logits[rows] = x32[rows] @ k_rng.standard_normal((e, num_classes), dtype=np.float32)
    logits[np.arange(n), true] = -np.inf
    logits -= logits.max(axis=1, keepdims=True)
    flip_to = np.exp(logits)
    flip_to /= flip_to.sum(axis=1, keepdims=True)
    return flip_rate, flip_to


def instance_noise_model(features: Any, true_labels: Any, num_classes: int, rate: float, seed: int,
                         projection_seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The per-sample noise model behind ``make_noisy_labels(true, C, "instance", rate, seed, features=...)``.

    Returns ``(flip_rate [N], flip_to [N, C])``: sample i's flip rate (truncated normal around ``rate``) and
    the distribution of its new label if it flips (softmax of ``x_i @ W[y_i]`` over the classes other than
    ``y_i``; ``flip_to[i, y_i] == 0``). Xia et al.'s transition row of sample i is
    ``flip_rate[i] * flip_to[i]`` plus ``1 - flip_rate[i]`` on ``y_i``.
    """
    c = _check_num_classes(num_classes)
    true = _as_labels(true_labels, c, "true")
    x = _instance_features(features, true.shape[0])
    streams = _instance_streams(np.random.default_rng(_check_seed(seed)), projection_seed)
    return _instance_model(x, true, c, _check_rate(rate), streams[0], streams[1])


@register_noise("instance")
def _instance(true: np.ndarray, num_classes: int, rate: float, rng: np.random.Generator, features: Any = None,
              projection_seed: int | None = None) -> np.ndarray:
    """Instance-dependent noise: the ``get_instance_noisy_label`` generator of Xia et al. ("Part-dependent
    label noise", NeurIPS 2020, code ``tools.py``; reused by much later work as "IDN"), applied to the images'
    features ``features`` [N, E] (dspt: the backbone's un-augmented, L2-normalised view-0 features; rows are
    normalised here too).

    Xia et al.'s model: sample i gets a flip rate q_i ~ N(rate, 0.1^2) truncated to [0, 1]; a projection
    W [C, E, C] with standard-normal entries is drawn once per seed; the new label of sample i is drawn from
    ``P_i = q_i * softmax(x_i @ W[y_i])`` with the true class's logit set to -inf before the softmax, and
    ``P_i[y_i] = 1 - q_i``. So where a sample flips to depends on its image, and two images with equal
    features and class have the same distribution.

    Difference from the paper: there every sample flips independently with probability q_i, so the realised
    rate is random (mean about ``rate``, spread about sqrt(rate(1-rate)/N): at N = 160 (16 shots x 10
    classes) and rate 0.4, +-3.9 points). Here, as in ``sym`` / ``pair``, exactly ``flip_count(N, rate)``
    samples flip, chosen without replacement with probability proportional to q_i (successive weighted
    sampling, drawn with Efraimidis-Spirakis keys u^(1/q_i)), and each gets a label drawn from its
    ``softmax(x_i @ W[y_i])`` over the other classes (Gumbel-max), so it never keeps its true class. Exact
    rates keep tables comparable: every seed and protocol at a nominal rate carries the same amount of noise.
    Also unlike the paper, x is an image feature of unit norm rather than the raw pixels, so the logits
    ``x_i @ W[y_i]`` are N(0, 1) and the flip distribution over the other classes is spread, not nearly
    one-hot as with normalised pixel vectors (norm ~28 on MNIST, ~55 on CIFAR).

    ``projection_seed``: draw W as a draw seeded ``projection_seed`` would (dspt's validation labels use the
    training draw's W, i.e. the same annotator, with their own flip rates and choices).
    """
    n = true.shape[0]
    x = _instance_features(features, n)
    w_rng, rate_rng, pick_rng, label_rng = _instance_streams(rng, projection_seed)
    flip_rate, flip_to = _instance_model(x, true, num_classes, rate, w_rng, rate_rng)
    m = flip_count(n, rate)
    # Efraimidis-Spirakis: the m largest keys log(u)/q (u in (0, 1]) are a successive weighted sample
    keys = np.log1p(-pick_rng.random(n)) / np.maximum(flip_rate, 1e-300)
    idx = np.sort(np.argsort(-keys, kind="stable")[:m])
    with np.errstate(divide="ignore"):
        logp = np.log(flip_to[idx])  # -inf on the true class: never drawn
    given = true.copy()
    given[idx] = np.argmax(logp + label_rng.gumbel(size=logp.shape), axis=1)
    return given


def _supplied(name: str, true: np.ndarray, num_classes: int, given: Any, how: str) -> np.ndarray:
    if given is None:
        raise ConfigError(f"noise type '{name}' does not draw labels itself: {how}")
    arr = _as_labels(given, num_classes, "given")
    if arr.shape != true.shape:
        raise ConfigError(f"noise type '{name}': {arr.shape[0]} given labels for {true.shape[0]} samples")
    return arr


@register_noise("given")
def _given(true: np.ndarray, num_classes: int, rate: float, rng: np.random.Generator,
           given: Any = None) -> np.ndarray:
    """Real noise: the labels a dataset ships with (CIFAR-10N/100N, Food-101N, a noisy-label list); the rate
    is what it is (``rate`` is unused). Pass them as ``given=``; ``dspt train --noise given`` reads them from
    the dataset or ``--noise-file`` (dspt.data.given_labels)."""
    return _supplied("given", true, num_classes, given,
                     "pass the shipped labels as given=... (dspt.data.given_labels reads them)")


def _flip_protocol(name: str, source: str) -> NoiseFn:
    def fn(true: np.ndarray, num_classes: int, rate: float, rng: np.random.Generator,
           given: Any = None) -> np.ndarray:
        return _supplied(name, true, num_classes, given,
                         "it chooses the K-shot subset (dspt.data.false_positive_shots); pass its labels as given=...")

    fn.__doc__ = (f"False-positive noise of PTNL/JoAPR: of the K shots of class c, FP are images of {source} "
                  "labelled c (rate = FP/K). It picks the training subset, so the images and labels come from "
                  "dspt.data.false_positive_shots and are passed as given=...")
    return fn


register_noise("symflip")(_flip_protocol("symflip", "other classes drawn uniformly"))
register_noise("pairflip")(_flip_protocol("pairflip", "class c+1"))


def make_noisy_labels(true_labels: Any, num_classes: int, noise_type: str, rate: float,
                      seed: int, **options: Any) -> NoisyLabels:
    """Corrupt ``true_labels`` with protocol ``noise_type`` at ``rate``, seeded by ``seed``.

    ``options`` are passed on to the protocol (for protocols that need more than the labels).
    Raises ``ValueError`` for a rate outside [0, 1), fewer than 2 classes, labels outside
    [0, num_classes), or an unknown protocol.
    """
    if noise_type not in NOISE_TYPES:
        raise ConfigError(f"unknown noise type {noise_type!r}; choose one of: "
                         f"{', '.join(NOISE_TYPES)}")
    r = _check_rate(rate)
    c = _check_num_classes(num_classes)
    s = _check_seed(seed)
    true = _as_labels(true_labels, c, "true")
    rng = np.random.default_rng(s)
    given = NOISE_TYPES[noise_type](true.copy(), c, r, rng, **options)
    return NoisyLabels(true=true, given=given, num_classes=c, noise_type=noise_type, rate=r, seed=s)
