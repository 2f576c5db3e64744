"""Comparisons with uncertainty, from a table of runs (one row per run): the numbers behind `dspt report`.

One run is one draw (of the shots, the noise, the validation subset, the context init), so every figure
here is over seeds:
- `select_lr`: per method and setting, the learning rate with the best *validation* accuracy averaged over
  seeds (noisy validation labels by default). Test accuracy never takes part in a choice.
- `cell_stats`: at the chosen rate, mean and standard deviation over seeds, and the seed count.
- `paired_differences`: each method minus a reference method, paired by seed (a seed fixes the shots and the
  noise draw for every method), with a 95 % t-interval, win / tie / loss counts and a verdict.
- `robustness`: the worst result and the spread over every learning rate and seed tried; a method that is
  safe at every rate is worth more to a user who cannot tune than one that wins only at its best rate.
- `missing_cells`: what a complete grid would hold and the store lacks, so nothing is dropped silently.

A *setting* is (dataset, noise type, noise rate) under a *protocol* (model, weights, shots, epochs); a
*method* is a loss with its options. The input columns are those of a dspt results store
(`dspt.rundir.result_row`).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from .errors import DataError
from .selection import select_on_validation

PROTOCOL = ["model", "weights", "learner", "shots", "epochs"]
SETTING = ["dataset", "noise", "noise_rate"]
CELL = PROTOCOL + SETTING + ["method"]
#: The validation column each `on=` choice reads; the test columns are never among them.
VALIDATION = {"noisy": "val_acc_given", "clean": "val_acc"}
CONFIDENCE = 0.95
#: Multiplicity controls for the verdicts of one table (`adjust_pvalues`).
MULTIPLICITY = ("holm", "bh", "none")
BOOTSTRAP_RESAMPLES = 10_000


def method_label(loss: str, options: object, method: str = "plain") -> str:
    """A method's name in tables: the loss, with its options when they are not the defaults; a training method
    other than plain prompt tuning in front (`coteaching+ce`)."""
    text = "" if options is None or (isinstance(options, float) and math.isnan(options)) else str(options)
    label = str(loss)
    if text and text not in ("{}", "nan"):
        import json

        opts = json.loads(text)
        label += "(" + ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in opts.items()) + ")"
    return label if method in ("plain", "", "nan") else f"{method}+{label}"


def check_unique(runs: pd.DataFrame) -> None:
    """Two runs in one cell with one learning rate and one seed differ in an option the report does not
    separate: pooling them as if they were seeds would be wrong, so stop and say so."""
    dup = runs.duplicated(CELL + ["lr", "seed"], keep=False)
    if dup.any():
        first = runs.loc[dup].iloc[0]
        where = ", ".join(f"{k}={first[k]}" for k in CELL + ["lr", "seed"])
        raise DataError(f"{int(dup.sum())} runs share one cell, learning rate and seed ({where}): they differ in an "
                        "option the report does not separate (e.g. ctx_init or batch size); report their stores "
                        "separately")


def select_lr(runs: pd.DataFrame, on: str = "noisy") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(choices, chosen runs). `choices`: one row per cell and learning rate with the mean validation accuracy
    over seeds, the seed count and `chosen`; `chosen runs`: the rows of `runs` at each cell's chosen rate.

    A cell with one learning rate keeps it. A cell with several and no validation accuracy cannot choose and
    is left out of the chosen runs (`missing_cells` lists it); it never falls back to test accuracy."""
    if on not in VALIDATION:
        raise DataError(f"--select-on '{on}' unknown; choose one of: {', '.join(VALIDATION)}")
    metric = VALIDATION[on]
    check_unique(runs)
    # Sorted first and rounded after: a mean must not depend on the order the rows came in (a sum in another
    # order differs in its last bit), or an exact tie could break towards either rate.
    per_lr = (runs.sort_values(CELL + ["lr", "seed"]).groupby(CELL + ["lr"], sort=True)
              .agg(val_mean=(metric, "mean"), seeds=("seed", "nunique")).reset_index())
    per_lr["val_mean"] = per_lr["val_mean"].round(9)
    n_lrs = per_lr.groupby(CELL)["lr"].transform("nunique")
    has_val = per_lr.groupby(CELL)["val_mean"].transform(lambda v: v.notna().any())
    choosable = per_lr[(n_lrs == 1) | has_val]
    picked = select_on_validation(choosable.fillna({"val_mean": -math.inf}) if len(choosable) else choosable,
                                  by=CELL, metric="val_mean", lr="lr")[CELL + ["lr"]]
    per_lr["chosen"] = per_lr.set_index(CELL + ["lr"]).index.isin(picked.set_index(CELL + ["lr"]).index)
    per_lr["selectable"] = ((n_lrs == 1) | has_val).to_numpy()
    chosen_runs = runs.merge(picked, on=CELL + ["lr"], how="inner")
    return per_lr, chosen_runs


def cell_stats(chosen: pd.DataFrame) -> pd.DataFrame:
    """Per cell: seeds, mean and std (ddof 1; NaN for one seed) of test accuracy at the chosen rate, plus the
    means of the memorised share, validation accuracy, zero-shot accuracy and train seconds; `best` marks the
    highest mean among the methods of each setting (ties all marked)."""
    cols = {"n": ("test_acc", "size"), "mean": ("test_acc", "mean"), "std": ("test_acc", "std"),
            "lr": ("lr", "first"), "memorised": ("memorised", "mean"), "val_acc_given": ("val_acc_given", "mean"),
            "zeroshot_acc": ("zeroshot_acc", "mean"), "train_seconds": ("train_seconds", "mean")}
    out = chosen.groupby(CELL, sort=True).agg(**cols).reset_index()
    top = out.groupby(PROTOCOL + SETTING)["mean"].transform("max")
    out["best"] = np.isclose(out["mean"], top, rtol=0, atol=1e-9)
    return out


def t_interval(diffs: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Two-sided t-interval of the mean of `diffs` (NaN for fewer than two values)."""
    n = len(diffs)
    if n < 2:
        return math.nan, math.nan
    mean, sem = float(np.mean(diffs)), float(np.std(diffs, ddof=1)) / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sem
    return mean - half, mean + half


def t_pvalue(diffs: np.ndarray) -> float:
    """Two-sided p-value of the one-sample t-test of mean 0 (NaN for fewer than two values or no spread: a
    t statistic needs a standard deviation)."""
    n = len(diffs)
    if n < 2 or bool(np.all(diffs == diffs[0])):
        return math.nan
    t = float(np.mean(diffs)) / (float(np.std(diffs, ddof=1)) / math.sqrt(n))
    return float(2 * stats.t.sf(abs(t), n - 1))


def bootstrap_interval(diffs: np.ndarray, confidence: float = CONFIDENCE, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `diffs` (`resamples` draws with replacement, a fixed seed
    so a report is the same each time). With a handful of seeds it is narrower than the t-interval (it only
    knows the values it saw): a second view, not a better one."""
    n = len(diffs)
    if n < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.asarray(diffs, dtype=float)[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def adjust_pvalues(pvalues: np.ndarray, method: str = "holm") -> np.ndarray:
    """p-values adjusted for the multiplicity of one family of tests: `holm` (Holm's step-down: controls the
    family-wise error rate), `bh` (Benjamini-Hochberg: controls the false-discovery rate) or `none`. NaN
    entries (no test) stay NaN and do not count in the family's size."""
    if method not in MULTIPLICITY:
        raise DataError(f"--multiplicity '{method}' unknown; choose one of: {', '.join(MULTIPLICITY)}")
    p = np.asarray(pvalues, dtype=float)
    out = p.copy()
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if method == "none" or m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    ranked = p[order]
    if method == "holm":
        adj = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * ranked))
    else:
        adj = np.minimum.accumulate(np.minimum(1.0, m / np.arange(1, m + 1) * ranked)[::-1])[::-1]
    out[order] = adj
    return out


def verdict(n: int, lo: float, hi: float, p_adjusted: float | None = None, spread: bool = True,
            mean: float = math.nan, confidence: float = CONFIDENCE) -> str:
    """'ahead' or 'behind' only when the difference is clear: the interval excludes 0 and, when a multiplicity
    adjusted p-value is given, it is below 1 - `confidence` too; else 'no clear difference', whatever the mean.
    Differences without spread (every seed the same) have no interval: 'identical' when they are all 0,
    'same on every seed' otherwise (a t-interval of width 0 would read as certainty)."""
    if n < 2:
        return "too few seeds"
    if not spread:
        return "identical" if mean == 0 else "same on every seed"
    if p_adjusted is not None and not p_adjusted < 1 - confidence:
        return "no clear difference"
    if lo > 0:
        return "ahead"
    if hi < 0:
        return "behind"
    return "no clear difference"


def _pair_row(d: np.ndarray, bootstrap: bool) -> dict:
    """The numbers of one paired comparison (differences `d`, one per seed)."""
    lo, hi = t_interval(d)
    spread = len(d) < 2 or not bool(np.all(d == d[0]))
    if not spread:
        lo = hi = math.nan
    row = dict(n=len(d), mean=float(d.mean()), lo=lo, hi=hi, p=t_pvalue(d), wins=int((d > 0).sum()),
               ties=int((d == 0).sum()), losses=int((d < 0).sum()), spread=spread)
    if bootstrap:
        row["boot_lo"], row["boot_hi"] = bootstrap_interval(d) if spread else (math.nan, math.nan)
    return row


def _judge(rows: pd.DataFrame, family: list[str], multiplicity: str) -> pd.DataFrame:
    """Adjust the p-values within each family (groups of `family` columns) and give each row its verdict."""
    rows = rows.copy()
    rows["p_adj"] = math.nan
    for _, grp in rows.groupby(family, sort=False, dropna=False):
        rows.loc[grp.index, "p_adj"] = adjust_pvalues(grp["p"].to_numpy(dtype=float), multiplicity)
    rows["verdict"] = [verdict(int(r.n), r.lo, r.hi, r.p_adj if multiplicity != "none" else None, bool(r.spread),
                               r.mean) for r in rows.itertuples()]
    return rows


#: A family of tests for the multiplicity control: every comparison of one paper table.
FAMILY = PROTOCOL + ["noise"]
PAIR_COLUMNS = ["n", "mean", "lo", "hi", "p", "p_adj", "wins", "ties", "losses"]


def paired_differences(chosen: pd.DataFrame, reference: str, multiplicity: str = "holm",
                       bootstrap: bool = False) -> pd.DataFrame:
    """Each method minus `reference`, per setting, paired by seed (seeds run by only one side are left out and
    counted in `unpaired`). p-values (paired t-test) are adjusted with `multiplicity` within each paper table
    (`FAMILY`: one protocol and noise type, every dataset, rate and method of it); `bootstrap` adds a
    percentile bootstrap interval beside the t-interval."""
    adjust_pvalues(np.array([]), multiplicity)  # an unknown method fails before any work
    keys = PROTOCOL + SETTING
    ref = chosen[chosen["method"] == reference][keys + ["seed", "test_acc"]].rename(columns={"test_acc": "ref"})
    rows = []
    for method in sorted(set(chosen["method"]) - {reference}):
        mine = chosen[chosen["method"] == method][keys + ["seed", "test_acc"]]
        both = mine.merge(ref, on=keys + ["seed"], how="outer", indicator=True)
        for key, grp in both.groupby(keys, sort=True):
            paired = grp[grp["_merge"] == "both"]
            if paired.empty:
                continue
            d = (paired["test_acc"] - paired["ref"]).to_numpy(dtype=float)
            rows.append(dict(zip(keys, key), method=method, reference=reference, **_pair_row(d, bootstrap),
                             unpaired=int((grp["_merge"] != "both").sum())))
    cols = keys + ["method", "reference"] + PAIR_COLUMNS + ["unpaired", "verdict"] + (
        ["boot_lo", "boot_hi"] if bootstrap else [])
    if not rows:
        return pd.DataFrame(columns=cols)
    return _judge(pd.DataFrame(rows), FAMILY, multiplicity)[cols]


def versus_best(chosen: pd.DataFrame, stats_: pd.DataFrame, multiplicity: str = "holm") -> pd.DataFrame:
    """Per setting, every other method minus the setting's best method (highest mean; the first by name on a
    tie), paired by seed: which methods are not clearly different from the best. p-values are adjusted within
    the same family as the paired comparison (`FAMILY`: one paper table), so the two never disagree on a pair."""
    keys = PROTOCOL + SETTING
    rows = []
    for key, st in stats_.groupby(keys, sort=True):
        best = st.sort_values(["mean", "method"], ascending=[False, True]).iloc[0]["method"]
        sel = chosen
        for col, val in zip(keys, key):
            sel = sel[sel[col] == val]
        top = sel[sel["method"] == best].set_index("seed")["test_acc"]
        for method in sorted(set(st["method"]) - {best}):
            other = sel[sel["method"] == method].set_index("seed")["test_acc"]
            common = top.index.intersection(other.index)
            d = (other.loc[common] - top.loc[common]).to_numpy(dtype=float)
            row = _pair_row(d, False) if len(d) else dict(n=0, mean=math.nan, lo=math.nan, hi=math.nan, p=math.nan,
                                                          wins=0, ties=0, losses=0, spread=True)
            rows.append(dict(zip(keys, key), best=best, method=method, **row))
    cols = keys + ["best", "method"] + PAIR_COLUMNS + ["verdict"]
    if not rows:
        return pd.DataFrame(columns=cols)
    return _judge(pd.DataFrame(rows), FAMILY, multiplicity)[cols]


def collapsed_runs(runs: pd.DataFrame) -> pd.Series:
    """Which runs ended collapsed (`dspt.collapse`: predicting one class); False where a store lacks the column."""
    if "collapsed_at_epoch" not in runs.columns:
        return pd.Series(False, index=runs.index)
    return pd.to_numeric(runs["collapsed_at_epoch"], errors="coerce").notna()


def collapse_text(row: pd.Series) -> str:
    """'one-class trap at epoch 5 (lr 0.2, seed 3)': how a collapsed run ended."""
    kind = row.get("collapse_kind")
    kind = kind if isinstance(kind, str) and kind else "collapse"
    return f"{kind} at epoch {int(float(row['collapsed_at_epoch']))} (lr {float(row['lr']):g}, seed {int(row['seed'])})"


def robustness(runs: pd.DataFrame) -> pd.DataFrame:
    """Per cell over every learning rate and seed tried: runs, rates, the worst run, the worst rate's mean over
    seeds, the median and the best run, and the runs that ended collapsed (count and how)."""
    per_lr = runs.groupby(CELL + ["lr"])["test_acc"].mean().rename("lr_mean").reset_index()
    worst_lr = per_lr.loc[per_lr.groupby(CELL)["lr_mean"].idxmin(), CELL + ["lr", "lr_mean"]]
    worst_lr = worst_lr.rename(columns={"lr": "worst_lr", "lr_mean": "worst_lr_mean"})
    spread = runs.groupby(CELL).agg(runs=("test_acc", "size"), lrs=("lr", "nunique"), seeds=("seed", "nunique"),
                                    worst=("test_acc", "min"), median=("test_acc", "median"),
                                    best=("test_acc", "max"), std=("test_acc", "std")).reset_index()
    flagged = runs[collapsed_runs(runs)]
    how = {key: [collapse_text(r) for _, r in grp.sort_values(["lr", "seed"]).iterrows()]
           for key, grp in flagged.groupby(CELL, sort=True)} if len(flagged) else {}
    keys = list(spread[CELL].itertuples(index=False, name=None))
    spread["collapsed"] = [len(how.get(k, [])) for k in keys]
    spread["collapses"] = ["; ".join(how.get(k, [])) for k in keys]
    return spread.merge(worst_lr, on=CELL)


def collapses(runs: pd.DataFrame) -> pd.DataFrame:
    """Per method and learning rate, over every setting and seed: runs, runs that ended collapsed, and how many
    of those were one-class traps (no gradient left). The question a user picking a rate asks: is it safe?"""
    flagged = collapsed_runs(runs)
    kind = runs["collapse_kind"] if "collapse_kind" in runs.columns else pd.Series("", index=runs.index)
    frame = runs.assign(collapsed=flagged.astype(int), trap=(flagged & (kind == "one-class trap")).astype(int))
    out = frame.groupby(["method", "lr"], sort=True).agg(runs=("test_acc", "size"), collapsed=("collapsed", "sum"),
                                                         traps=("trap", "sum")).reset_index()
    out["rate"] = out["collapsed"] / out["runs"]
    return out


def missing_cells(runs: pd.DataFrame, choices: pd.DataFrame, stats_: pd.DataFrame) -> pd.DataFrame:
    """What a complete grid would hold and the store lacks, one row each with the reason:
    - a method without runs in a setting that other methods (or datasets) of its protocol have; a setting
      of noise type 'given' is only expected of datasets that have one, and a dataset with only 'given' runs
      is not expected under injected noise;
    - a cell whose learning rate could not be chosen (several rates, no validation accuracy);
    - a cell with fewer seeds than the most any cell of its protocol has."""
    rows = []
    for proto, grp in runs.groupby(PROTOCOL, sort=True):
        methods = sorted(grp["method"].unique())
        settings = grp[["noise", "noise_rate"]].drop_duplicates().itertuples(index=False)
        settings = sorted(settings, key=lambda s: (str(s.noise), float(s.noise_rate)))
        injected = [s for s in settings if s.noise != "given"]
        for dataset, dgrp in grp.groupby("dataset", sort=True):
            has = set(zip(dgrp["noise"], dgrp["noise_rate"], dgrp["method"]))
            only_given = set(dgrp["noise"]) == {"given"}
            own = [s for s in settings if s.noise == "given" and (s.noise, s.noise_rate) in
                   {(n, r) for n, r, _ in has}]
            expected = own + ([] if only_given else injected)
            for s in expected:
                for m in methods:
                    if (s.noise, s.noise_rate, m) not in has:
                        rows.append(dict(zip(PROTOCOL, proto), dataset=dataset, noise=s.noise,
                                         noise_rate=s.noise_rate, method=m, reason="no runs"))
        pchoices = choices
        for col, val in zip(PROTOCOL, proto):
            pchoices = pchoices[pchoices[col] == val]
        for key, cg in pchoices.groupby(CELL, sort=True):
            if not cg["selectable"].all():
                rows.append(dict(zip(CELL, key), reason=f"{cg['lr'].nunique()} learning rates and no validation "
                                 "accuracy to choose among them (add a val/ split)"))
        pstats = stats_
        for col, val in zip(PROTOCOL, proto):
            pstats = pstats[pstats[col] == val]
        if len(pstats):
            full = int(pstats["n"].max())
            for row in pstats[pstats["n"] < full].itertuples(index=False):
                rows.append({c: getattr(row, c) for c in CELL} | {"reason": f"{row.n} of {full} seeds"})
    return pd.DataFrame(rows, columns=CELL + ["reason"])


def dataset_average(stats_: pd.DataFrame) -> pd.DataFrame:
    """Per protocol, setting and method: the mean over datasets of the cell means, only where the method has the
    setting on every dataset that has the setting (else NaN: an average over fewer datasets is not comparable)."""
    keys = PROTOCOL + ["noise", "noise_rate"]
    datasets = stats_.groupby(keys)["dataset"].nunique().rename("datasets")
    per = stats_.groupby(keys + ["method"]).agg(mean=("mean", "mean"), covered=("dataset", "nunique")).reset_index()
    per = per.merge(datasets.reset_index(), on=keys)
    per.loc[per["covered"] < per["datasets"], "mean"] = math.nan
    return per
