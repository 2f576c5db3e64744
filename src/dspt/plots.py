"""The demo's figure: test accuracy against label noise, one line per method, zero-shot as a reference."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .io import atomic_write

#: Legend labels of the methods (losses).
NAMES = {"ce": "CoOp (cross-entropy)", "dspt": "DSPT (double softmax)"}


def plot(rows: pd.DataFrame, zeroshot_acc: float, losses: list[str], path: Path, title: str) -> None:
    """Write a PNG of `rows` (one chosen run per noise rate and loss) to `path`, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for loss in losses:
        sub = rows[rows["loss"] == loss].sort_values("noise_rate")
        ax.plot(sub["noise_rate"] * 100, sub["test_acc"], marker="o", label=NAMES.get(loss, loss))
    ax.axhline(zeroshot_acc, color="gray", linestyle="--", label="zero-shot")
    ax.set_xlabel("symmetric label noise (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
