"""Independent random streams from one run seed.

A run draws its shots, its label noise, its validation subset and noise, its context init and its epochs'
minibatches. Feeding one integer seed to each of them makes the streams correlated (the same seed and the
same pool size pick the same positions for training noise and validation noise), so each stream gets its
own child of `numpy.random.SeedSequence(seed)`. The children depend only on the run seed and the stream's
position in `STREAMS`: append new streams at the end, never reorder, or every recorded run changes.
"""
from __future__ import annotations

import numpy as np

#: The named streams of a run, in spawn order (append only).
STREAMS = ("shots", "noise", "val_shots", "val_noise", "init", "views", "epochs")


def stream_seeds(seed: int) -> dict[str, int]:
    """{stream: 32-bit seed}, each from its own `SeedSequence(seed).spawn` child (seed 0 is a seed)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer (0 is valid), got {seed!r}")
    children = np.random.SeedSequence(int(seed)).spawn(len(STREAMS))
    return {name: int(child.generate_state(1)[0]) for name, child in zip(STREAMS, children)}
