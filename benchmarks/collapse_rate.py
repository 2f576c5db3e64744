"""How often prompt-tuning runs collapse onto one class, by label set, method (loss) and learning rate, on the
CIFAR-10N case (`benchmarks/cifar10n_case.py`: CIFAR-10 images, CIFAR-10N human labels, a miniature CLIP prior).

The grid, one `dspt.sweep.run_sweep` (batched, resumable: a killed call resumes; a finished grid is only read):
on the case's `dev` pool (`--pool final` for the final measurement only), two label sets,

- `random1`: one CIFAR-10N annotator's labels (real noise, ~17 %), `noise=given`;
- `clean + sym 0.8`: the clean labels with injected symmetric noise at rate 0.8 (`noise=sym`),

crossed with losses ce, dspt, gce, mae, learning rates 0.002, 0.02, 0.2 and tuning seeds (`--seeds`); every run
10 epochs on the pool's whole training part (shots 0: 4,500 images), validation labels from the same label set,
10 cached views with the demo's crops for small images (`dspt.miniature.VIEWS`), context init "a photo of a".
`--collapse-guard` runs the same grid with `collapse_guard` on (restore the last healthy prompt and halve the
rate on a collapse) into its own folder, so that the two can be paired by seed.

Printed (and written as Markdown to `--md`): per label set, method and lr: runs, collapsed runs (of which
one-class traps), test accuracy mean ± std over seeds, the worst run; where both the guard-off and the guard-on
grid have finished runs, per cell the paired difference guard-on minus guard-off over seeds, separately for
the runs that collapsed without the guard and for those that did not.

    python benchmarks/collapse_rate.py                    # guard off, dev pool
    python benchmarks/collapse_rate.py --collapse-guard   # guard on; prints the paired comparison too
    python benchmarks/collapse_rate.py --no-run           # only the tables of what has finished
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd

from dspt.errors import DsptError
from dspt.io import atomic_write_text, read_json
from dspt.miniature import DEMO_MODEL, VIEWS
from dspt.report_tables import cell_text, signed


def _case_module():
    """benchmarks/ is not a package: load the case builder beside this file by path."""
    if "cifar10n_case" in sys.modules:
        return sys.modules["cifar10n_case"]
    spec = importlib.util.spec_from_file_location("cifar10n_case", Path(__file__).with_name("cifar10n_case.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


LOSSES = ("ce", "dspt", "gce", "mae")
LRS = (0.002, 0.02, 0.2)
SEEDS = (1, 2, 3, 4, 5)
EPOCHS = 10
SYM_RATE = 0.8
#: label set -> (table of the case, noise options)
LABEL_SETS = {"random1": ("random1", {"noise": "given"}),
              f"clean + sym {SYM_RATE:g}": ("clean", {"noise": "sym", "noise_rate": SYM_RATE})}
GUARD = {False: "guard-off", True: "guard-on"}


def grid_spec(case: dict[str, Any], pool: str, guard: bool, losses=LOSSES, lrs=LRS, seeds=SEEDS,
              epochs: int = EPOCHS, cache_dir: str | None = None) -> dict[str, Any]:
    """The `run_sweep` grid of one guard setting: a `grids:` entry per label set, crossed with loss, lr, seed."""
    spec: dict[str, Any] = dict(
        model=DEMO_MODEL, pretrained=None, checkpoint=str(case["checkpoint"]), test_data=str(case["test"]),
        template=case["template"], ctx_init="a photo of a", shots=0, epochs=epochs, views=10, **VIEWS,
        collapse_guard=guard, loss=list(losses), lr=list(lrs), seed=list(seeds),
        grids=[{"data": str(case["tables"][pool][table]), **noise} for table, noise in LABEL_SETS.values()])
    if cache_dir is not None:
        spec["cache_dir"] = str(cache_dir)
    return spec


def label_set_of(case: dict[str, Any], pool: str, values: dict[str, Any]) -> str:
    for name, (table, noise) in LABEL_SETS.items():
        if values.get("data") == str(case["tables"][pool][table]) and values.get("noise") == noise["noise"]:
            return name
    raise ValueError(f"cell {values} is not of this grid")  # a bug


def _warm(cfg) -> tuple[int, float]:
    """Build one seed's feature caches (train views, val, test) in a worker, with one torch thread."""
    import torch

    from dspt.train import prepare

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    p = prepare(cfg)
    return cfg.seed, time.perf_counter() - t0 if not p.cache["train_hit"] else 0.0


def warm_caches(cells, jobs: int) -> float:
    """The runs of a seed share its cached views whatever their label set (the tables of a pool share one name,
    so one cache). Building each seed's once, `jobs` seeds at a time, before the sweep keeps the sweep's workers
    from encoding the same views at the same time."""
    first = {}
    for cell in cells:
        if not cell.done():
            first.setdefault(cell.config.seed, cell.config)
    if not first:
        return 0.0
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=min(jobs, len(first)), mp_context=mp.get_context("spawn")) as pool:
        for seed, seconds in pool.map(_warm, first.values()):
            print(f"  feature caches of seed {seed}: " + (f"built in {seconds:.0f} s" if seconds else "reused"),
                  flush=True)
    return time.perf_counter() - t0


def collect(case: dict[str, Any], pool: str, spec: dict[str, Any], output: Path, guard: bool) -> pd.DataFrame:
    """One row per finished run of the grid (from its own folder, never from an older results row)."""
    from dspt.rundir import result_row
    from dspt.sweep import expand

    rows = []
    for cell in expand(spec, output):
        if not cell.done():
            continue
        row = result_row(cell.config, read_json(cell.run_dir / "metrics.json"), cell.run_dir)
        row.update(label_set=label_set_of(case, pool, cell.values), guard=guard)
        rows.append(row)
    return pd.DataFrame(rows)


def _trap(kind: Any) -> bool:
    return isinstance(kind, str) and "trap" in kind


def _collapsed(frame: pd.DataFrame) -> pd.Series:
    from dspt.compare import collapsed_runs

    return collapsed_runs(frame)


def rate_table(runs: pd.DataFrame) -> str:
    """Per label set, method and lr: runs, collapsed (traps), test accuracy mean ± std, worst run."""
    lines = ["| label set | method | lr | runs | collapsed (traps) | test acc (%) mean ± std | worst run |",
             "|---|---|---|---|---|---|---|"]
    runs = runs.assign(collapsed=_collapsed(runs).to_numpy(), trap=runs["collapse_kind"].map(_trap))
    for (ls, loss, lr), g in runs.groupby(["label_set", "loss", "lr"], sort=False):
        worst = g.loc[g["test_acc"].idxmin()]
        how = (f" ({worst['collapse_kind']} from epoch {int(worst['collapsed_at_epoch'])})"
               if bool(worst["collapsed"]) else "")
        lines.append(f"| {ls} | {loss} | {lr:g} | {len(g)} | {int(g['collapsed'].sum())} ({int(g['trap'].sum())}) | "
                     f"{cell_text(g['test_acc'].mean(), g['test_acc'].std(), len(g), show_n=False)} | "
                     f"{worst['test_acc']:.1f} (seed {int(worst['seed'])}){how} |")
    return "\n".join(lines)


def _diffs(d: pd.Series) -> str:
    if d.empty:
        return "-"
    return f"{signed(d.mean())} (n={len(d)}; {signed(d.min())} to {signed(d.max())})"


def paired_table(off: pd.DataFrame, on: pd.DataFrame) -> str:
    """Per cell, guard-on minus guard-off test accuracy over the seeds both have, split by whether the run
    collapsed without the guard; and what the guard did (restores, runs still collapsed with it)."""
    keys = ["label_set", "loss", "lr", "seed"]
    a = off.assign(collapsed_off=_collapsed(off).to_numpy())[keys + ["test_acc", "collapsed_off"]]
    b = on.assign(collapsed_on=_collapsed(on).to_numpy())[keys + ["test_acc", "collapsed_on", "guard_restores"]]
    pairs = a.merge(b, on=keys, suffixes=("_off", "_on"))
    lines = [("| label set | method | lr | pairs | collapsed w/o guard: on - off (n; range) | "
              "not collapsed: on - off (n; range) | runs the guard restored | still collapsed with guard |"),
             "|---|---|---|---|---|---|---|---|"]
    if pairs.empty:
        return "(no run finished in both grids)"
    pairs["diff"] = pairs["test_acc_on"] - pairs["test_acc_off"]
    for (ls, loss, lr), g in pairs.groupby(["label_set", "loss", "lr"], sort=False):
        hit = g["collapsed_off"].astype(bool)
        lines.append(f"| {ls} | {loss} | {lr:g} | {len(g)} | {_diffs(g.loc[hit, 'diff'])} | "
                     f"{_diffs(g.loc[~hit, 'diff'])} | {int((g['guard_restores'] > 0).sum())} | "
                     f"{int(g['collapsed_on'].sum())} |")
    return "\n".join(lines)


def summary(runs: pd.DataFrame) -> str:
    flagged = _collapsed(runs)
    traps = runs["collapse_kind"].map(_trap)
    return (f"{int(flagged.sum())} of {len(runs)} runs ended collapsed onto one class "
            f"({int((flagged & traps).sum())} one-class traps)")


def main(argv: list[str] | None = None) -> int:
    case_mod = _case_module()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", "--data-dir", dest="shared", type=Path, default=case_mod.DEFAULT_SHARED,
                    help="folder holding the CIFAR-10 archive and CIFAR-10N labels (default: %(default)s)")
    ap.add_argument("--case", type=Path, default=None,
                    help=f"the case's folder, as cifar10n_case.py --out (default: {case_mod.default_out()})")
    ap.add_argument("--case-seed", type=int, default=0, help="the case's seed (its parts and prior)")
    ap.add_argument("--pool", choices=case_mod.POOLS, default="dev",
                    help="dev: develop on it; final: the final measurement only")
    ap.add_argument("--collapse-guard", action="store_true", help="run the grid with the collapse guard on")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="tuning seeds, e.g. 1,2,3")
    ap.add_argument("--losses", default=",".join(LOSSES))
    ap.add_argument("--lrs", default=",".join(f"{x:g}" for x in LRS))
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--runs", type=Path, default=None,
                    help="folder of the grids (default: <case folder>/collapse_rate); each grid goes to "
                         "<runs>/<pool>/guard-off or guard-on")
    ap.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 4), help="worker processes")
    ap.add_argument("--cache-dir", default=None, help="dspt's feature cache (default: dspt's own)")
    ap.add_argument("--md", type=Path, default=None,
                    help="write the tables as Markdown here (default: <runs>/<pool>/collapse_rate-<guard>.md)")
    ap.add_argument("--no-run", action="store_true", help="only print the tables of the runs that have finished")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    t0 = time.perf_counter()
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        losses = tuple(s.strip() for s in args.losses.split(",") if s.strip())
        lrs = tuple(float(s) for s in args.lrs.split(",") if s.strip())
        case = case_mod.build_case(args.shared, args.case, seed=args.case_seed, progress=False)
        runs_root = (args.runs or Path(case["root"]) / "collapse_rate") / args.pool
        specs = {g: grid_spec(case, args.pool, g, losses, lrs, seeds, args.epochs, args.cache_dir) for g in GUARD}
        guard = args.collapse_guard
        output = runs_root / GUARD[guard]
        print(f"case: {case['root']} (prior zero-shot {case['zeroshot_acc']:.1f} %); pool {args.pool}; "
              f"grid: {GUARD[guard]} -> {output}", flush=True)
        times = {}
        if not args.no_run:
            from dspt.sweep import expand, run_sweep

            cells = expand(specs[guard], output)
            times["feature caches"] = warm_caches(cells, args.jobs)
            t1 = time.perf_counter()
            quiet = logging.getLogger("dspt")
            quiet.setLevel(logging.ERROR)  # a collapse warning per run would drown the table; metrics keep them
            sweep = run_sweep(specs[guard], output=output, jobs=args.jobs, threads=1, echo=print,
                              cache_dir=args.cache_dir)
            times["sweep"] = time.perf_counter() - t1
            if sweep.failed:
                name, error = next(iter(sweep.failed.items()))
                print(f"{len(sweep.failed)} run(s) failed, e.g. {name}: {error}", file=sys.stderr)
        stores = {g: collect(case, args.pool, specs[g], runs_root / GUARD[g], g) for g in GUARD}
    except DsptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mine = stores[guard]
    if mine.empty:
        print(f"no finished runs in {output}")
        return 1
    noise = case["noise"][args.pool]
    head = (f"CIFAR-10N case, pool '{args.pool}' ({case['counts'][args.pool]['train']} training images, "
            f"{case['counts']['test']} clean test images), prior {DEMO_MODEL} zero-shot {case['zeroshot_acc']:.1f} %; "
            f"{args.epochs} epochs, shots 0 (the full training part), {len(seeds)} seed(s) {list(seeds)}; label sets: "
            f"random1 (CIFAR-10N annotator 1, realised {noise['random1']['train']:.1%} wrong), clean + sym "
            f"{SYM_RATE:g} (injected).")
    parts = [head, "", f"Collapse guard {'on' if guard else 'off'}: {summary(mine)}.", "", rate_table(mine)]
    other = stores[not guard]
    if not other.empty:
        parts += ["", (f"Collapse guard {'off' if guard else 'on'} (the other grid, as far as it has finished): "
                       f"{summary(other)}."), "", rate_table(other), "",
                  "Paired by seed: test accuracy with the guard minus without it (points):", "",
                  paired_table(stores[False], stores[True])]
    times["total"] = time.perf_counter() - t0
    parts += ["", "Tables of the finished runs only (--no-run)." if args.no_run else
              "Wall time of this call: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
              + f" ({args.jobs} worker(s), {os.cpu_count()} CPU(s))."]
    text = "\n".join(parts)
    print("\n" + text)
    md = args.md or runs_root / f"collapse_rate-{GUARD[guard]}.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(md, text + "\n")
    print(f"\nMarkdown: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
