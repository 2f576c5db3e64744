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

PROTOCOL = ["model", "weights", "shots", "epochs"]
SETTING = ["dataset", "noise", "noise_rate"]
CELL = PROTOCOL + SETTING + ["method"]
#: The validation column each `on=` choice reads; the test columns are never among them.
VALIDATION = {"noisy": "val_acc_given", "clean": "val_acc"}
CONFIDENCE = 0.95


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


def verdict(n: int, lo: float, hi: float) -> str:
    """'ahead' or 'behind' only when the interval excludes 0; else 'no clear difference', whatever the mean."""
    if n < 2:
        return "too few seeds"
    if lo > 0:
        return "ahead"
    if hi < 0:
        return "behind"
    return "no clear difference"


def paired_differences(chosen: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Each method minus `reference`, per setting, paired by seed (seeds run by only one side are left out and
    counted in `unpaired`)."""
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
            lo, hi = t_interval(d)
            rows.append(dict(zip(keys, key), method=method, reference=reference, n=len(d), mean=float(d.mean()),
                             lo=lo, hi=hi, wins=int((d > 0).sum()), ties=int((d == 0).sum()),
                             losses=int((d < 0).sum()), unpaired=int((grp["_merge"] != "both").sum()),
                             verdict=verdict(len(d), lo, hi)))
    cols = keys + ["method", "reference", "n", "mean", "lo", "hi", "wins", "ties", "losses", "unpaired", "verdict"]
    return pd.DataFrame(rows, columns=cols)


def robustness(runs: pd.DataFrame) -> pd.DataFrame:
    """Per cell over every learning rate and seed tried: runs, rates, the worst run, the worst rate's mean over
    seeds, the median and the best run."""
    per_lr = runs.groupby(CELL + ["lr"])["test_acc"].mean().rename("lr_mean").reset_index()
    worst_lr = per_lr.loc[per_lr.groupby(CELL)["lr_mean"].idxmin(), CELL + ["lr", "lr_mean"]]
    worst_lr = worst_lr.rename(columns={"lr": "worst_lr", "lr_mean": "worst_lr_mean"})
    spread = runs.groupby(CELL).agg(runs=("test_acc", "size"), lrs=("lr", "nunique"), seeds=("seed", "nunique"),
                                    worst=("test_acc", "min"), median=("test_acc", "median"),
                                    best=("test_acc", "max"), std=("test_acc", "std")).reset_index()
    return spread.merge(worst_lr, on=CELL)


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
