"""Small numeric helpers shared by the data splits, the few-shot sampler and the noise protocols."""
from __future__ import annotations

import math


def round_half_up(x: float) -> int:
    """`x` rounded to the nearest integer, halves upwards: floor(x + 0.5); 0.5 -> 1, 2.5 -> 3.

    Not Python's `round`, which rounds halves to the even neighbour (round(0.5) == 0, round(2.5) == 2): a
    20 % split of 5 images must hold out 1, and 25 % noise on 10 labels must flip 3, the same way every time
    and in every tool that re-implements a protocol. Meant for the non-negative counts it is used for.
    """
    return int(math.floor(x + 0.5))
