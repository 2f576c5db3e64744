"""`dspt demo`: DSPT vs CoOp (cross-entropy) under symmetric label noise, offline, in a few minutes.

The orchestration only: the prior and its digits (`dspt.miniature`), every (noise rate, loss, lr, tuning seed)
run as a `dspt sweep` through the pipeline `dspt train` uses, each method's learning rate chosen per noise rate
on validation accuracy averaged over the seeds and the paired comparison with its interval (`dspt.report`),
then the tables (`dspt.tables`), the plot (`dspt.plots`), the report and the results files. Without
`--model`, the offline miniature CLIP on textured-paper digits (see `dspt.miniature` for what it is and is
not); with `--model/--pretrained` (or `--checkpoint`) and `--data`, the same comparison runs on real CLIP.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .config import RunConfig
from .errors import ConfigError, DataError, TrainingError
from .io import atomic_write_text
from .miniature import DEMO_MODEL, VIEWS, build_world, pretrained_miniature
from .plots import accuracy_vs_noise
from .selection import select_on_validation
from .tables import format_sensitivity, format_table, name, verdict_lines

# Re-exported: callers (tests, benchmarks/speed.py) import these from dspt.demo.
__all__ = ["run_demo", "pretrained_miniature", "build_world", "VIEWS", "select_on_validation"]

log = logging.getLogger(__name__)


class _HideCacheHits(logging.Filter):
    """Every run of the grid reads the same feature cache: its hits say nothing new after the first."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("feature cache hit")


def collapse_line(runs: pd.DataFrame, methods: list[str]) -> str:
    """How many runs of each method ended collapsed onto one class (`dspt.collapse`), over every rate and seed."""
    from .compare import collapsed_runs

    flagged = collapsed_runs(runs)
    parts = [f"{name(m)} {int(flagged[runs['method'] == m].sum())} of {int((runs['method'] == m).sum())}"
             for m in methods]
    return "runs that ended collapsed onto one class (every rate, noise rate and seed): " + ", ".join(parts)


def _run_grid(common: dict[str, Any], out: Path, noise_rates: tuple[float, ...], losses: tuple[str, ...],
              lrs: tuple[float, ...], seeds: tuple[int, ...], jobs: int, threads: int | None) -> pd.DataFrame:
    """Every (noise rate, loss, lr, seed) through `dspt.train` (the pipeline `dspt train` runs), as a `dspt sweep`
    with `jobs` worker processes: finished runs are kept, a killed demo resumes. Returns the runs' results rows
    (from their own folders, so an older row in results.csv never leaks in)."""
    from .report import runs_frame
    from .rundir import result_row
    from .sweep import run_sweep
    from .train import prepare

    first = RunConfig(**common, noise_rate=noise_rates[0], loss=losses[0], lr=lrs[0], seed=seeds[0])
    if prepare(first).val is None and len(lrs) > 1:  # also builds the feature caches once, before workers share them
        raise DataError("choosing the learning rate needs validation data: add a val/ folder beside train/ in "
                         "--data, or pass a single --lrs value")
    spec = {k: v for k, v in common.items() if k not in ("results", "progress")}
    spec.update(noise_rate=list(noise_rates), loss=list(losses), lr=list(lrs), seed=list(seeds))
    sweep = run_sweep(spec, output=out / "runs", results=common["results"], jobs=jobs, threads=threads,
                      echo=log.info)
    if sweep.failed:
        name, error = next(iter(sweep.failed.items()))
        raise TrainingError(f"demo run {name} failed: {error}")
    rows = [result_row(c.config, json.loads((c.run_dir / "metrics.json").read_text()), c.run_dir) for c in sweep.cells]
    runs = runs_frame(pd.DataFrame(rows))
    runs["weights"] = "prior"  # one protocol: the tuning seeds share one prior
    return runs


def _one_thread_for_the_miniature(fn):
    """The miniature runs on one CPU thread per process: float sums in another order (another thread count)
    give another prior after its few hundred pretraining steps, so one thread makes a seed's table the same on
    every core count. Its tensors are too small to gain from more threads; its runs go one per core instead.
    Real CLIP is left alone."""

    @functools.wraps(fn)
    def pinned(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("model") is not None:
            return fn(*args, **kwargs)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return pinned


@_one_thread_for_the_miniature
def run_demo(
    prior_seed: int = 0,
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5),
    output: str | Path | None = None,
    noise_rates: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8),
    losses: tuple[str, ...] = ("ce", "dspt"),
    epochs: int = 30,
    shots: int = 16,
    views: int = 10,
    lrs: tuple[float, ...] = (0.0002, 0.002, 0.02, 0.2),
    ctx_init: str | None = "a photo of a",
    model: str | None = None,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    data: str | None = None,
    test_data: str | None = None,
    cache_dir: str | None = None,
    device: str = "auto",
    workers: int = 0,
    progress: bool = True,
    pretrain_epochs: int | None = None,
    jobs: int | None = None,
) -> dict[str, Any]:
    """Zero-shot reference, then every (noise rate, loss, lr, tuning seed) through `dspt.train`; each method's
    lr chosen per noise rate on mean noisy validation accuracy over the seeds; the comparison with intervals
    (`dspt.report`), the tables, the plot and the report files.

    `prior_seed` makes the miniature (its digits split and its pretraining): it stands for "another machine",
    whose float rounding gives another prior. `seeds` are the tuning seeds: shots, noise draw, validation
    subset and noise, context init, views and epoch order."""
    from .report import build_report, write_report
    from .train import zeroshot

    t0 = time.perf_counter()
    seeds = tuple(dict.fromkeys(int(s) for s in seeds))
    if not seeds:
        raise ConfigError("--seeds needs at least one tuning seed, e.g. 1,2,3,4,5")
    if "ce" in losses and losses[0] != "ce":
        losses = ("ce",) + tuple(l for l in losses if l != "ce")
    default = Path("dspt_demo") / (f"prior{prior_seed}" if model is None else "clip")
    out = Path(output) if output is not None else default
    if model is None:
        if data is not None:
            raise ConfigError("--data needs a real CLIP: add --model NAME --pretrained TAG (or --checkpoint FILE)")
        world = pretrained_miniature(prior_seed, cache_dir, progress, pretrain_epochs)
        base = dict(model=DEMO_MODEL, pretrained=None, checkpoint=str(world["checkpoint"]), data=str(world["tune"]),
                    test_data=str(world["test"]), template="a photo of a {}.")
        prior = (f"miniature CLIP, prior seed {prior_seed} ({DEMO_MODEL} contrastively pretrained "
                 f"{world['pretrain_epochs']} epochs on clean digits; tuned and tested on digits scanned on textured "
                 "paper, a domain it never saw; not real CLIP)")
        base.update(VIEWS)
    else:
        if data is None:
            raise ConfigError("--model needs --data FOLDER (class sub-folders) to tune and test on")
        world = {"reused": None, "pretrain_seconds": 0.0}
        base = dict(model=model, pretrained=None if checkpoint else pretrained, checkpoint=checkpoint, data=data,
                    test_data=test_data)
        prior = f"{model} {checkpoint or pretrained}"
    # The miniature's runs are single-threaded (see _one_thread_for_the_miniature), so one per core; real CLIP
    # runs one at a time (it needs the cores, or the GPU, itself).
    if jobs is None:
        jobs = min(os.cpu_count() or 1, 4) if model is None else 1
    threads = 1 if model is None else None
    common = dict(base, shots=shots, epochs=epochs, views=views, cache_dir=cache_dir, ctx_init=ctx_init,
                  device=device, workers=workers, progress=progress, noise="sym", results=str(out / "results.csv"))
    zs = zeroshot(RunConfig(**common, seed=seeds[0], output=str(out / "zeroshot")))
    quiet = _HideCacheHits()
    logging.getLogger("dspt.features").addFilter(quiet)
    try:
        runs = _run_grid(common, out, noise_rates, losses, lrs, seeds, jobs, threads)
    finally:
        logging.getLogger("dspt.features").removeFilter(quiet)
    rep = build_report(runs, reference=losses[0], select="lr", select_on="noisy")
    methods = list(losses)
    md = format_table(rep.stats, rep.comparison, methods, losses[0])
    verdicts = verdict_lines(rep.comparison, losses[0], len(seeds))
    sens = format_sensitivity(runs, methods) if len(lrs) > 1 else ""
    short = "miniature CLIP on textured-paper digits (not real CLIP)" if model is None else prior
    plot_title = (f"{short}" + (f", prior seed {prior_seed}" if model is None else "") +
                  f"\n{shots}-shot, {epochs} epochs, lr chosen on noisy validation labels, {len(seeds)} seeds")
    accuracy_vs_noise(rep.stats, zs["zeroshot_acc"], out / "accuracy_vs_noise.png", plot_title,
                      "symmetric label noise (%)")
    write_report(rep, out / "report", [out / "results.csv"])
    seconds = time.perf_counter() - t0
    setup = (f"Prior: {prior}\nTuning: {shots} shots/class, {epochs} epochs, {views} cached views"
             + (f" (crops {VIEWS['crop_scale']:.0%}-100 %, no flips)" if model is None else "") + ", context init "
             f"'{ctx_init or 'random'}', sym noise, tuning seeds {list(seeds)}; each method's lr chosen per noise "
             f"rate from {list(lrs)} on mean noisy validation accuracy over the seeds (never on test).\n"
             f"Zero-shot test accuracy: {zs['zeroshot_acc']:.1f} %. Cells: mean ± std over {len(seeds)} seeds; "
             f"differences paired by seed (same shots and noise draw), 95 % t-interval; a verdict is 'ahead' or "
             f"'behind' only when the paired t-test's p-value, Holm-adjusted over the {len(noise_rates)} noise rates, "
             f"is below 0.05.")
    verdicts.append(collapse_line(runs, methods))
    text = f"{setup}\n\n{md}\n\n" + "\n".join(verdicts) + "\n" + (
        f"\nTest accuracy at every lr tried, mean ± std over seeds (rate sensitivity, not used to choose):\n\n"
        f"{sens}\n" if sens else "")
    atomic_write_text(out / "table.md", text)
    atomic_write_text(out / "demo_runs.csv", runs.to_csv(index=False))
    return {"table": md, "verdicts": verdicts, "sensitivity": sens, "setup": setup, "runs": runs, "report": rep,
            "zeroshot_acc": zs["zeroshot_acc"], "prior": prior, "seconds": seconds, "output": out,
            "pretrain_seconds": world["pretrain_seconds"]}
