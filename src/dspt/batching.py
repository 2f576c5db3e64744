"""Batched runs: which runs train together, and how a list of configurations is trained.

`train_batch` trains several runs in one process: runs with equal `batch_key` share one backbone and train as
one model (`dspt.loop`), as many at a time as half the free memory holds for their cached features. Every run
keeps its own folder, lock, checkpoint, metrics and results row, and an error fails its own run only.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from .backbone import load_backbone
from .config import RunConfig
from .errors import TrainingError
from .io import LockBusy, process_lock, read_json
from .learner_loop import fit_model
from .learners import get_learner
from .loop import _fail, _fit, _Run, _setup, _step_plan
from .memory import free_memory
from .prepare import Prepared, load_splits
from .rundir import check_run_dir, finished_metrics, has_checkpoint, is_finished, run_lock_path

log = logging.getLogger(__name__)


def batch_key(cfg: RunConfig) -> tuple:
    """Resolved runs with equal keys can train as one batch: same backbone (model, weights, precision,
    device), same classes and prompt layout, same minibatch schedule (shots, batch size, epochs) and the
    fast path. Losses, learning rates, momentum, weight decay, noise, seeds and views may differ. fp16 (its
    loss scaler skips a step for every run at once), the reference path (it encodes images per step) and the
    learners with their own module (CoCoOp, VPT, MaPLe, PromptSRC: `dspt.learner_loop`) train alone: their key is
    unique to the run. CoOp and KgCoOp runs batch together (KgCoOp's penalty is per run)."""
    if cfg.precision == "fp16" or cfg.path != "fast" or not get_learner(cfg.learner).batches:
        return ("alone", str(Path(cfg.output).resolve()))
    return (cfg.model, cfg.pretrained, cfg.checkpoint, cfg.precision, cfg.device, cfg.dataset, cfg.data, cfg.root,
            cfg.test_data, cfg.classnames, cfg.test_fraction, cfg.split_seed, cfg.shots, cfg.batch_size, cfg.epochs,
            cfg.n_ctx, cfg.csc, cfg.class_token_position, cfg.skip_bad_images, cfg.cache_dir, cfg.workers,
            cfg.max_memory)


def train_batch(cfgs: list[RunConfig]) -> list[tuple[str, Any]]:
    """Train several runs in one process; per config, in order, ("ok", metrics) or ("error", exception).

    Runs with equal `batch_key` (and the same resume epoch) train as one model: one text-tower pass over all
    their prompts per step, each run with its own minibatch, labels, loss, learning rate, schedule and
    optimizer state, so each ends with the numbers it would have alone (up to float rounding). Every run
    keeps its own folder, lock, checkpoint, metrics and results row, exactly as `dspt train` writes them.
    One process at a time per run folder (a lock beside it). A folder this call created is removed again
    when its run fails before its first checkpoint, so a bad input leaves nothing behind; metrics.json is
    written last and marks a finished run. An error fails its own run only; a BaseException (a kill, Ctrl-C)
    stops them all, keeping every checkpoint.
    """
    out: list[tuple[str, Any] | None] = [None] * len(cfgs)
    runs: list[_Run] = []
    with contextlib.ExitStack() as locks:
        for i, raw in enumerate(cfgs):
            try:
                cfg = raw.resolved()
                run_dir = Path(cfg.output)
                check_run_dir(cfg, run_dir)
                if not is_finished(run_dir):
                    try:
                        locks.enter_context(process_lock(run_lock_path(run_dir)))
                    except LockBusy as exc:
                        raise TrainingError(f"run folder '{run_dir}' is in use by another dspt process (pid "
                                            f"{exc.holder}); wait for it to finish or stop it") from None
                    check_run_dir(cfg, run_dir)  # another process may have started or finished it meanwhile
                if is_finished(run_dir):
                    log.info("run %s is already complete; returning its metrics", run_dir)
                    out[i] = ("ok", finished_metrics(cfg, run_dir))
                    continue
                created = not run_dir.exists()
                run_dir.mkdir(parents=True, exist_ok=True)
                runs.append(_Run(i, cfg, run_dir, created))
            except Exception as exc:  # noqa: BLE001 - this run's own failure, reported with it
                out[i] = ("error", exc)
        groups: dict[tuple, list[_Run]] = {}
        for run in runs:
            groups.setdefault(batch_key(run.cfg), []).append(run)
        try:
            for group in groups.values():
                _train_group(group)
        except BaseException:
            for run in runs:
                _discard_if_empty(run)
            raise
        for run in runs:
            if run.error is not None:
                _discard_if_empty(run)
                out[run.index] = ("error", run.error)
            else:
                out[run.index] = ("ok", read_json(run.run_dir / "metrics.json"))
    return out  # type: ignore[return-value]


def _discard_if_empty(run: _Run) -> None:
    if run.created and not has_checkpoint(run.run_dir) and not is_finished(run.run_dir):
        shutil.rmtree(run.run_dir, ignore_errors=True)


def _run_bytes(p: Prepared) -> int:
    """What one prepared run holds on its device: its cached training, test and validation features."""
    feats = [p.train_feats, p.test_feats] + ([p.val_feats] if p.val_feats is not None else [])
    return sum(t.element_size() * t.nelement() for t in feats)


#: share of the free device memory that one batch's cached features may take
MEMORY_SHARE = 0.5


def _train_group(group: list[_Run]) -> None:
    """Prepare the runs of a compatible group on one backbone and train them as batches (by resume epoch).

    Each prepared run holds its cached features on the device, so a batch takes as many runs as half the
    free memory holds (measured after the first run is prepared); the rest follow in further batches.
    """
    first = group[0].cfg
    torch.manual_seed(first.seed)
    shared: dict[str, Any] = {}  # what the runs of a group have in common: backbone, splits, zero-shot heads
    pending, cap = list(group), None
    while pending:
        chunk: list[_Run] = []
        while pending and (cap is None or len(chunk) < cap):
            run = pending.pop(0)
            try:
                if "backbone" not in shared:
                    shared["backbone"] = load_backbone(first.model, first.pretrained, first.checkpoint,
                                                       first.device, first.precision)
                if "splits" not in shared:
                    shared["splits"] = load_splits(first)
                _setup(run, shared)
            except BaseException as exc:  # noqa: BLE001 - a bad run fails alone
                _fail(run, exc)
                continue
            chunk.append(run)
            if cap is None:
                free = free_memory(run.p.backbone.device)
                cap = max(1, int(MEMORY_SHARE * free) // max(_run_bytes(run.p), 1)) if free else len(group)
                if cap < len(group):
                    log.info("%d runs share a backbone; %d at a time fit in half the free memory", len(group), cap)
        by_start: dict[tuple, list[_Run]] = {}
        for run in chunk:
            by_start.setdefault((run.start, _step_plan(len(run.p.train), run.cfg.batch_size),
                                 run.p.train_feats.shape[0]), []).append(run)
        for batch in by_start.values():
            if batch[0].model is not None:  # a learner with its own module: alone (its key is unique)
                for run in batch:
                    log.info("%s: learner '%s' trains alone (%s)", run.run_dir.name, run.cfg.learner,
                             get_learner(run.cfg.learner).cost())
                    fit_model(run)
            else:
                _fit(batch)
        for run in chunk:
            run.p = None  # frees its features before the next batch is prepared
