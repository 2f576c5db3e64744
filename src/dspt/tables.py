"""Markdown tables of the demo: per noise rate, each method's mean ± std over seeds at its chosen rate, the
paired difference from the reference with its interval and verdict; and the rate sensitivity."""
from __future__ import annotations

import math

import pandas as pd

#: Column titles of the methods (losses) in the tables.
NAMES = {"ce": "CoOp (ce)", "dspt": "DSPT"}


def name(method: str) -> str:
    return NAMES.get(method, method)


def _pm(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.1f}" if not math.isfinite(std) else f"{mean:.1f} ± {std:.1f}"


def _signed(x: float) -> str:
    return f"{x:+.1f}" if math.isfinite(x) else "-"


def format_table(stats: pd.DataFrame, comparison: pd.DataFrame, methods: list[str], reference: str) -> str:
    """One line per noise rate: test accuracy (mean ± std over seeds) and chosen lr of each method, each other
    method minus the reference (mean, 95 % t-interval, wins/ties/losses over seeds, verdict), memorised share."""
    others = [m for m in methods if m != reference]
    cols = [f"{name(m)} acc" for m in methods]
    for m in others:
        who = "" if len(others) == 1 else f"{name(m)} "
        cols += [f"{name(m)} - {name(reference)} [95 % CI]", f"{who}wins/ties/losses", f"{who}verdict"]
    cols += [f"{name(m)} memorised" for m in methods] + [f"{name(m)} lr" for m in methods]
    lines = ["| noise | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    st = stats.set_index(["noise_rate", "method"])
    comp = comparison.set_index(["noise_rate", "method"]) if len(comparison) else comparison
    for rate in sorted(stats["noise_rate"].unique()):
        def get(m: str, col: str) -> float:
            return float(st.loc[(rate, m), col]) if (rate, m) in st.index else math.nan

        cells = [_pm(get(m, "mean"), get(m, "std")) for m in methods]
        for m in others:
            if len(comp) and (rate, m) in comp.index:
                c = comp.loc[(rate, m)]
                cells += [f"{_signed(c['mean'])} [{_signed(c['lo'])}, {_signed(c['hi'])}]",
                          f"{c['wins']}/{c['ties']}/{c['losses']}", str(c["verdict"])]
            else:
                cells += ["-", "-", "-"]
        cells += [f"{get(m, 'memorised'):.1f}" if math.isfinite(get(m, "memorised")) else "-" for m in methods]
        cells += [f"{get(m, 'lr'):g}" if math.isfinite(get(m, "lr")) else "-" for m in methods]
        lines.append(f"| {rate:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict_lines(comparison: pd.DataFrame, reference: str, seeds: int) -> list[str]:
    """One sentence per noise rate and method: what the interval supports."""
    lines = []
    for c in comparison.sort_values(["method", "noise_rate"]).itertuples(index=False):
        what = {"ahead": f"ahead of {name(reference)}", "behind": f"behind {name(reference)}",
                "no clear difference": f"no clear difference from {name(reference)}",
                "too few seeds": f"one seed only: no interval against {name(reference)}",
                "identical": f"identical to {name(reference)} on every seed",
                "same on every seed": f"the same difference from {name(reference)} on every seed"}[c.verdict]
        p_adj = getattr(c, "p_adj", math.nan)
        lines.append(f"noise {c.noise_rate:.0%}: {name(c.method)} {what} ({_signed(c.mean)} points, 95 % CI "
                     f"[{_signed(c.lo)}, {_signed(c.hi)}]" + (f", adjusted p {p_adj:.3f}" if math.isfinite(p_adj) else "")
                     + f", better in {c.wins} of {c.n} seeds)")
    return lines


def format_sensitivity(runs: pd.DataFrame, methods: list[str]) -> str:
    """Test accuracy (mean ± std over seeds) at every learning rate tried: shown, never used to choose."""
    lrs = sorted(runs["lr"].unique())
    cols = [f"{name(m)} lr={lr:g}" for m in methods for lr in lrs]
    lines = ["| noise | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    agg = runs.groupby(["noise_rate", "method", "lr"])["test_acc"].agg(["mean", "std"])
    for rate in sorted(runs["noise_rate"].unique()):
        lines.append(f"| {rate:.1f} | " + " | ".join(
            _pm(*agg.loc[(rate, m, lr)]) if (rate, m, lr) in agg.index else "-" for m in methods for lr in lrs) + " |")
    return "\n".join(lines)
