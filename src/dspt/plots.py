"""Figures of a comparison (PNG, written atomically): accuracy against noise with a band over seeds,
accuracy against learning rate, and the mechanism (per-epoch gradient norm and loss of clean vs mislabeled
training samples)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .io import atomic_write

#: Legend labels of well-known methods (losses); others show their own name.
NAMES = {"ce": "CoOp (cross-entropy)", "dspt": "DSPT (double softmax)"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    plt = _pyplot()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def accuracy_vs_noise(stats: pd.DataFrame, zeroshot_acc: float | None, path: Path, title: str,
                      xlabel: str = "label noise (%)") -> None:
    """One line per method: mean test accuracy at the chosen rate, a band of ± one std over seeds; zero-shot
    as a dashed line. `stats`: one row per (method, noise_rate) with mean, std, n."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, sub in stats.groupby("method", sort=False):
        sub = sub.sort_values("noise_rate")
        x, m, s = sub["noise_rate"] * 100, sub["mean"].to_numpy(), sub["std"].fillna(0).to_numpy()
        n = int(sub["n"].max())
        ax.plot(x, m, marker="o", label=f"{NAMES.get(method, method)} (n={n})")
        ax.fill_between(x, m - s, m + s, alpha=0.2)
    if zeroshot_acc is not None and np.isfinite(zeroshot_acc):
        ax.axhline(zeroshot_acc, color="gray", linestyle="--", label="zero-shot")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def accuracy_vs_lr(runs: pd.DataFrame, path: Path, title: str) -> None:
    """One panel per noise rate: mean test accuracy (± std over seeds) at every learning rate tried, one line
    per method. Shown, never used to choose."""
    plt = _pyplot()
    rates = sorted(runs["noise_rate"].unique())
    fig, axes = plt.subplots(1, len(rates), figsize=(3.2 * len(rates) + 0.5, 3.4), squeeze=False, sharey=True)
    for ax, rate in zip(axes[0], rates):
        sub = runs[runs["noise_rate"] == rate]
        for method, grp in sub.groupby("method", sort=False):
            agg = grp.groupby("lr")["test_acc"].agg(["mean", "std"]).reset_index().sort_values("lr")
            ax.errorbar(agg["lr"], agg["mean"], yerr=agg["std"].fillna(0), marker="o", capsize=3,
                        label=NAMES.get(method, method))
        ax.set_xscale("log")
        ax.set_title(f"noise {rate:.0%}", fontsize=9)
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def mechanism(curves: pd.DataFrame, path: Path, title: str) -> None:
    """Per-epoch mean logit-gradient norm (top) and mean loss (bottom) of clean (solid) and mislabeled (dashed)
    training samples, one column per noise rate, one colour per method. `curves`: columns method, noise_rate,
    epoch, grad_norm_clean, grad_norm_noisy, loss_clean, loss_noisy (already averaged over seeds)."""
    plt = _pyplot()
    rates = sorted(curves["noise_rate"].unique())
    fig, axes = plt.subplots(2, len(rates), figsize=(3.2 * len(rates) + 0.5, 5.6), squeeze=False, sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, rate in enumerate(rates):
        sub = curves[curves["noise_rate"] == rate]
        for i, (method, grp) in enumerate(sub.groupby("method", sort=False)):
            grp = grp.sort_values("epoch")
            c = colours[i % len(colours)]
            for row, what in enumerate(("grad_norm", "loss")):
                ax = axes[row][j]
                for kind, style in (("clean", "-"), ("noisy", "--")):
                    col = f"{what}_{kind}"
                    if col in grp and grp[col].notna().any():
                        ax.plot(grp["epoch"] + 1, grp[col], style, color=c,
                                label=f"{NAMES.get(method, method)}, {'clean' if kind == 'clean' else 'mislabeled'}")
        axes[0][j].set_title(f"noise {rate:.0%}", fontsize=9)
        axes[1][j].set_xlabel("epoch")
        for row in range(2):
            axes[row][j].grid(alpha=0.3)
    axes[0][0].set_ylabel("mean ||dL/dz||")
    axes[1][0].set_ylabel("mean loss")
    axes[0][-1].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)
