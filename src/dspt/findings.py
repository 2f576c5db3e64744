"""The findings that open a report: what the numbers say, generated from them, never written by hand.

Per setting (protocol, dataset, noise type and rate):
- the best method (highest mean test accuracy at its chosen rate) and the methods *not clearly different*
  from it: each other method minus the best, paired by seed, p-values adjusted within the setting; a method
  is clearly below the best only when its verdict is 'behind';
- DSPT against the reference method (CE by default), from the report's paired comparison;
- each method's floor: its worst run over every rate and seed tried, beside its chosen-rate mean.
Across settings, a few sentences count the same facts, so the first screen of a report answers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from .compare import PROTOCOL, SETTING

#: The method the findings single out against the reference.
FOCUS = "dspt"
#: Verdicts of `other - best` under which `other` is not clearly below the best.
LEVEL = ("no clear difference", "too few seeds", "identical")
#: At most this many settings are named in a sentence; more are counted.
NAMED = 6


@dataclass
class Findings:
    """`table`: one row per setting (`setting`, `best`, `best_mean`, `level`: methods not clearly different
    from the best, `clearly_below`, `focus`: DSPT minus the reference as text, `floors`); `sentences`: the
    summary over settings."""

    table: pd.DataFrame
    sentences: list[str]


def setting_text(noise: str, rate: float) -> str:
    return "given labels" if noise == "given" else f"{noise} {rate * 100:g} %"


def _where(keys: tuple, varying: list[str], several_datasets: bool) -> str:
    """A setting in words; `varying`: the protocol fields that differ across the report (named, the rest not)."""
    proto, (dataset, noise, rate) = dict(zip(PROTOCOL, keys[:len(PROTOCOL)])), keys[len(PROTOCOL):]
    text = setting_text(noise, rate)
    if several_datasets:
        text = f"{dataset} {text}"
    named = {"model": lambda v: str(v), "weights": lambda v: str(v),
             "shots": lambda v: f"{v if int(v) > 0 else 'all'} shots", "epochs": lambda v: f"{v} epochs"}
    if varying:
        text += " (" + ", ".join(named[k](proto[k]) for k in varying) + ")"
    return text


def _names(items: list[str]) -> str:
    if len(items) <= NAMED:
        return ", ".join(items)
    return ", ".join(items[:NAMED]) + f" and {len(items) - NAMED} more"


def _interval(lo: float, hi: float) -> str:
    return f"[{lo:+.1f}, {hi:+.1f}]" if math.isfinite(lo) and math.isfinite(hi) else "[no interval]"


def findings(stats: pd.DataFrame, versus_best: pd.DataFrame, comparison: pd.DataFrame, robustness: pd.DataFrame,
             reference: str, multiplicity: str, runs: pd.DataFrame | None = None) -> Findings:
    """The findings of a report's numbers (see the module docstring); `runs` (every run tried) for the
    collapsed runs."""
    keys = PROTOCOL + SETTING
    if stats.empty:
        return Findings(pd.DataFrame(), ["No cell has a chosen learning rate, so there is nothing to compare: see "
                                         "'Missing cells'."])
    varying = [k for k in PROTOCOL if stats[k].nunique() > 1]
    several_datasets = stats["dataset"].nunique() > 1
    vb = versus_best.set_index(keys) if len(versus_best) else versus_best
    comp = comparison[comparison["method"] == FOCUS].set_index(keys) if len(comparison) else comparison
    worst = robustness.set_index(keys + ["method"])["worst"] if len(robustness) else pd.Series(dtype=float)
    rows = []
    for key, st in stats.groupby(keys, sort=True):
        st = st.sort_values(["mean", "method"], ascending=[False, True])
        best = st.iloc[0]
        level, below = [], []
        if len(vb) and key in vb.index:
            for r in vb.loc[[key]].itertuples():
                (level if r.verdict in LEVEL else below).append(r.method)
        focus = ""
        if len(comp) and key in comp.index:
            c = comp.loc[[key]].iloc[0]
            focus = f"{c['mean']:+.1f} {_interval(c['lo'], c['hi'])} {c['verdict']}"
        floors = []
        for r in st.itertuples():
            w = worst.get(key + (r.method,), math.nan)
            floors.append((r.method, float(w), float(r.mean)))
        rows.append(dict(zip(keys, key), setting=_where(key, varying, several_datasets),
                         best=best["method"], best_mean=float(best["mean"]), best_std=float(best["std"]),
                         level=level, clearly_below=below, focus=focus, floors=floors))
    table = pd.DataFrame(rows)
    sentences = _sentences(table, comparison, reference, multiplicity, len(stats["method"].unique()))
    if runs is not None:
        sentences += _collapse_sentences(runs, varying, several_datasets)
    return Findings(table, sentences)


def _collapse_sentences(runs: pd.DataFrame, varying: list[str], several_datasets: bool) -> list[str]:
    """Which runs ended collapsed, per method over every rate and seed tried, and the first few by name."""
    from .compare import collapsed_runs, collapse_text

    flagged = collapsed_runs(runs)
    if not flagged.any():
        return []
    counts = runs.assign(c=flagged.astype(int)).groupby("method")["c"].agg(["sum", "size"])
    parts = [f"{m} {int(r['sum'])} of {int(r['size'])}" for m, r in counts.iterrows()]
    named = [f"{r['method']} {collapse_text(r)} at "
             f"{_where(tuple(r[k] for k in PROTOCOL + SETTING), varying, several_datasets)}, "
             f"test {r['test_acc']:.1f}" for _, r in runs[flagged].sort_values(["method", "lr", "seed"]).iterrows()]
    return ["Collapsed runs (ended predicting one class; over every rate and seed tried): " + ", ".join(parts)
            + ". " + "; ".join(named[:NAMED]) + (f"; {len(named) - NAMED} more in 'Collapses'" if len(named) > NAMED
                                                 else "") + "."]


def _sentences(table: pd.DataFrame, comparison: pd.DataFrame, reference: str, multiplicity: str,
               n_methods: int) -> list[str]:
    n = len(table)
    rule = {"holm": "Holm-adjusted within each table", "bh": "Benjamini-Hochberg-adjusted within each table",
            "none": "not adjusted for multiplicity"}[multiplicity]
    out = [f"{n} setting(s), {n_methods} method(s). 'Clearly' means a paired t-test over seeds at 95 %, {rule}; "
           "anything else is 'not clearly different'."]
    counts = table["best"].value_counts()
    parts = []
    for method, k in counts.items():
        sub = table[table["best"] == method]
        alone = int(((sub["level"].map(len) == 0) & (sub["clearly_below"].map(len) > 0)).sum())
        parts.append(f"{method} in {k} of {n}" + (f" (clearly above every other method in {alone})" if alone else ""))
    out.append("Best mean: " + "; ".join(parts) + ".")
    if FOCUS in set(comparison.get("method", [])) and FOCUS != reference:
        sel = table[table["focus"] != ""]
        groups = {v: [r.setting for r in sel.itertuples() if r.focus.endswith(v)]
                  for v in ("ahead", "behind")}
        other = len(sel) - len(groups["ahead"]) - len(groups["behind"])
        text = f"{FOCUS} against {reference}: clearly ahead in {len(groups['ahead'])} of {len(sel)} setting(s)"
        text += f" ({_names(groups['ahead'])})" if groups["ahead"] else ""
        text += f", clearly behind in {len(groups['behind'])}"
        text += f" ({_names(groups['behind'])})" if groups["behind"] else ""
        out.append(text + f", not clearly different in {other}.")
    gaps = [(mean - w, method, w, mean, r.setting) for r in table.itertuples() for method, w, mean in r.floors
            if math.isfinite(w)]
    if gaps:
        per_method: dict[str, tuple] = {}
        for gap in sorted(gaps, reverse=True):
            per_method.setdefault(gap[1], gap)
        worst3 = sorted(per_method.values(), reverse=True)[:3]
        gaps_text = "; ".join(f"{m} {w:.1f} vs {mean:.1f} at {where}" for _, m, w, mean, where in worst3)
        out.append(f"Floor (worst run over every rate and seed, against the chosen-rate mean): largest gaps {gaps_text}.")
    return out
