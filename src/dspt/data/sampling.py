"""Seeded splits and K-shot sampling; the chosen indices are saved so a run can be reproduced exactly."""
from __future__ import annotations

import numpy as np

from .base import DataError, ImageDataset


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(keep, held_out) indices: `fraction` of each class held out (at least one image where a class has 2+)."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"split fraction {fraction} must be inside (0, 1), e.g. 0.2")
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_held = int(np.floor(fraction * len(idx) + 0.5))
        n_held = min(max(n_held, 1 if len(idx) > 1 else 0), len(idx) - 1)
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def few_shot_indices(dataset: ImageDataset, shots: int, seed: int) -> np.ndarray:
    """K images per class, drawn without replacement with `seed`; sorted indices into `dataset`."""
    if shots < 1:
        raise DataError(f"shots must be >= 1 (got {shots}); use shots 0 / --shots all for the full split")
    counts = dataset.class_counts()
    short = [(dataset.classnames[c], int(n)) for c, n in enumerate(counts) if n < shots]
    if short:
        name, n = short[0]
        raise DataError(f"class '{name}' has {n} training images, fewer than {shots} shots "
                        f"({len(short)} class(es) short); lower --shots or add images")
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(dataset.labels == c), size=shots, replace=False)
              for c in range(dataset.num_classes)]
    return np.sort(np.concatenate(chosen))
