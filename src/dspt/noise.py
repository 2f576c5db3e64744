"""Label-noise protocols of this research line (CoOp, PTNL, JoAPR, NLPrompt) for class-index labels.

``make_noisy_labels(true, C, "sym", 0.4, seed=1)`` returns a :class:`NoisyLabels` holding the true
labels, the labels given to training, and what is needed to report the noise (realised rate,
per-class transition matrix) and to save it with the run.

Protocols are functions ``fn(true, num_classes, rate, rng, **options) -> given`` in the
:data:`NOISE_TYPES` registry; add one with ``@register_noise(name)``. All randomness comes from
``np.random.default_rng(seed)``, so the same seed gives the same labels; seed 0 is a valid seed.

Flip count: ``sym`` and ``pair`` flip exactly ``flip_count(N, rate) = floor(rate*N + 0.5)`` samples
(round half up, unlike Python's ``round``, which rounds halves to even), chosen uniformly without
replacement, so the realised rate is the requested one up to 1/(2N).
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

        The JSON holds noise_type, rate, seed, num_classes and counts used to detect a stale
        pair. Each file is written to a temporary file in the same folder and moved into place
        with ``os.replace``, so a crash never leaves a half-written file.
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
        atomic_write_text(meta_path, json.dumps(self._meta(), indent=2) + "\n")

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
