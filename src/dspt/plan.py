"""A plan before the run: what a run or a sweep will cost, timed at its real shapes, before any run starts.

For every distinct batch shape of the grid (model, precision, device, classes, prompt rows) the plan builds a
random init of the same architecture and times a few training steps of exactly the arithmetic a run does (the
text tower over every prompt row under the memory budget, logits, the loss, backward, a step), one no-grad pass
(each epoch's evaluation) and the image tower on a few images (the feature cache). From these and the grid's
sizes (class counts and split sizes from dspt's dataset registry, so a benchmark is planned before it is
downloaded) it projects per batch: the rows per chunk, the peak memory, the time, and the cache on disk; and it
refuses a grid that cannot fit before anything runs.

What it does not know: a sweep's finished runs are planned too (they would be skipped); parallel workers share
the machine, so the total is given for one worker; the cache estimate counts every image-view as new.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .backbone import load_backbone
from .config import RunConfig
from .errors import ConfigError
from .learners import get_learner
from .losses import get_loss
from .memory import GIB, OVERHEAD, PEAK_PER_SAVED, MemoryBudgetError, RowBudget, budget_bytes, free_memory
from .methods import METHODS
from .prompt import PromptBatch, PromptLearner

#: for classes whose names are not on disk yet: 12 tokens, as long as ImageNet's longest name. Prompts are cut
#: after the longest name's EOS, so this is an upper bound where the names are shorter (ImageNet's mean is 2.2)
PLACEHOLDER_NAME = "long tailed great crested grebe, a water bird of lakes"
#: share of the free memory a batch's cached features may take (as `dspt.batching` trains them)
FEATURE_SHARE = 0.5


@dataclass
class RunShape:
    """What decides one run's cost."""

    classes: int
    n_train: int  # training images (K shots x classes, or the split)
    n_test: int
    n_val: int
    names: tuple[str, ...]  # class names (placeholders when the data is not on disk)
    learners: int  # prompts the run's method trains


@dataclass
class ShapeTiming:
    """Measured at one batch shape."""

    step_s: float
    eval_s: float
    bookkeeping_s: float  # per run and epoch: the epoch's diagnostics, its checkpoint and log line
    encode_s_per_image: float
    per_row_bytes: int | None
    chunk_rows: int | None
    step_peak_bytes: int  # above the model: measured on a GPU, projected from the per-row cost on the CPU
    model_bytes: int
    embed_dim: int


@dataclass
class BatchPlan:
    names: list[str]  # the runs
    configs: list[RunConfig]  # theirs (the batch shares the first one's shape)
    shape: RunShape
    at_once: int  # runs trained together (the feature share of the free memory may split a batch)
    timing: ShapeTiming | None = None
    problem: str | None = None

    @property
    def cfg(self) -> RunConfig:
        return self.configs[0]

    @property
    def rows(self) -> int:
        return self.at_once * self.shape.learners * self.shape.classes

    @property
    def steps(self) -> int:
        per_epoch = self.shape.n_train // self.cfg.batch_size if self.shape.n_train >= self.cfg.batch_size else 1
        return per_epoch * self.cfg.epochs

    def feature_bytes(self, runs: int) -> int:
        e = self.timing.embed_dim if self.timing else 512
        views = self.cfg.views if get_learner(self.cfg.learner).cached_features else 0
        per_run = (self.shape.n_train * (views + 1) + self.shape.n_test + self.shape.n_val) * e * 4
        return runs * per_run

    @property
    def peak_bytes(self) -> int:
        t = self.timing
        return t.model_bytes + self.feature_bytes(self.at_once) + t.step_peak_bytes if t else 0

    @property
    def train_s(self) -> float:
        t, parts = self.timing, math.ceil(len(self.names) / self.at_once)
        per_epoch = self.steps / self.cfg.epochs * t.step_s + t.eval_s + self.at_once * t.bookkeeping_s if t else 0.0
        return parts * self.cfg.epochs * per_epoch


@dataclass
class Plan:
    batches: list[BatchPlan]
    device: str
    budget_bytes: int | None
    free_bytes: int | None
    encodings: int  # image-views the runs would encode (every one counted as new)
    cache_bytes: int
    encode_s: float
    workers: int = 1
    problems: list[str] = field(default_factory=list)

    @property
    def runs(self) -> int:
        return sum(len(b.names) for b in self.batches)

    @property
    def train_s(self) -> float:
        return sum(b.train_s for b in self.batches)

    @property
    def total_s(self) -> float:
        return self.train_s + self.encode_s

    def to_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, "batches": len(self.batches), "device": self.device,
                "budget_gb": self.budget_bytes / GIB if self.budget_bytes else None,
                "free_gb": self.free_bytes / GIB if self.free_bytes else None,
                "train_s": self.train_s, "encode_s": self.encode_s, "total_s": self.total_s,
                "encodings": self.encodings, "cache_gb": self.cache_bytes / GIB, "problems": self.problems,
                "per_batch": [{"runs": len(b.names), "at_once": b.at_once, "model": b.cfg.model,
                               "precision": b.cfg.precision, "classes": b.shape.classes, "rows": b.rows,
                               "steps": b.steps, "chunk_rows": b.timing.chunk_rows if b.timing else None,
                               "step_s": b.timing.step_s if b.timing else None, "train_s": b.train_s,
                               "peak_gb": b.peak_bytes / GIB, "problem": b.problem} for b in self.batches]}


def run_shape(cfg: RunConfig) -> RunShape:
    """Class count and split sizes of a resolved config: from the registry for a standard dataset whose files
    are not here, else from the files' listing (no image is decoded)."""
    from .data.registry import dataset_sizes
    from .prepare import load_splits

    learners = METHODS[cfg.method].learners
    sizes = dataset_sizes(cfg.dataset)
    try:
        splits = load_splits(cfg) if sizes is None or cfg.data or cfg.root else None
    except Exception as exc:  # noqa: BLE001 - the data is not here: the registry's sizes, if it knows them
        if sizes is None:
            raise ConfigError(f"--plan needs the class count of '{cfg.data or cfg.dataset}', and its files are not "
                              f"readable ({str(exc).splitlines()[0]}); point --data at them") from None
        splits = None
    if splits is not None:
        c, names = splits.train.num_classes, tuple(splits.classnames)
        pool, n_val, n_test = len(splits.train), len(splits.val) if splits.val else 0, len(splits.test)
    else:
        c, pool, n_val, n_test = sizes
        names = (PLACEHOLDER_NAME,) * c
    n_train = min(cfg.shots * c, pool) if cfg.shots > 0 else pool
    if cfg.val_shots:
        n_val = min(n_val, cfg.val_shots * c) if n_val else 0
    return RunShape(c, n_train, n_test, n_val, names, learners)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _encode_s(backbone: Any, gen: torch.Generator) -> tuple[int, float]:
    """The image tower's embedding width, and its seconds per image on a few random images (after a warm-up)."""
    dev = backbone.device
    images = torch.randn(4, 3, backbone.image_size, backbone.image_size, generator=gen)
    embed = backbone.encode_images(images[:1]).shape[-1]  # also the image tower's warm-up
    _sync(dev)
    t0 = time.perf_counter()
    backbone.encode_images(images)
    _sync(dev)
    return embed, (time.perf_counter() - t0) / len(images)


def _timed_steps(step: Callable[[], torch.Tensor], opt: torch.optim.Optimizer, steps: int, dev: torch.device
                 ) -> tuple[list[float], int]:
    """Seconds of `steps` training steps (the loss of `step`, backward, an optimizer step) after one warm-up, and
    the bytes allocated before them (the GPU's peak counter is reset here)."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    times = []
    for i in range(steps + 1):
        _sync(dev)
        t0 = time.perf_counter()
        loss = step()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(dev)
        if i:
            times.append(time.perf_counter() - t0)
    return times, base


def time_shape(cfg: RunConfig, shape: RunShape, runs: int, max_memory: float | None, steps: int = 1
               ) -> ShapeTiming:
    """Time `steps` training steps (after one warm-up) of `runs` runs of `shape` on a random init of the config's
    architecture, one evaluation pass and the image tower on a few images. MemoryBudgetError when the budget
    cannot hold one prompt row."""
    backbone = load_backbone(cfg.model, None, device=cfg.device, precision=cfg.precision)
    dev = backbone.device
    model_bytes = sum(t.nelement() * t.element_size() for t in backbone.model.state_dict().values())
    nbytes = budget_bytes(max_memory, dev)
    budget = RowBudget(nbytes, "--max-memory" if max_memory else "the default budget") if nbytes else None
    if get_learner(cfg.learner).module:
        return _time_model(cfg, shape, backbone, budget, model_bytes, steps)
    r = runs * shape.learners
    learners = [PromptLearner(backbone, list(shape.names), cfg.n_ctx, cfg.ctx_init, cfg.csc,
                              cfg.class_token_position, seed=j) for j in range(r)]
    model = PromptBatch(backbone, learners, row_chunk=budget)
    opt = torch.optim.SGD([model.ctx], lr=1e-3, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    b = min(cfg.batch_size, shape.n_train)
    embed, encode = _encode_s(backbone, gen)
    feats = F.normalize(torch.randn(r, b, embed, generator=gen), dim=-1).to(dev)
    labels = torch.randint(0, shape.classes, (b,), generator=gen).to(dev)
    loss_fn = get_loss(cfg.loss, **cfg.loss_options)

    def step() -> torch.Tensor:
        logits = model.logits(feats)
        return sum(loss_fn(logits[j], labels) for j in range(r))

    times, base = _timed_steps(step, opt, steps, dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.text_features()
    _sync(dev)
    eval_s = time.perf_counter() - t0
    last = budget.last if budget else {}
    if dev.type == "cuda":
        step_peak = int(torch.cuda.max_memory_allocated(dev) - base)
    else:
        rows = last.get("chunk_rows") or last.get("rows") or r * shape.classes
        step_peak = int(OVERHEAD + rows * (last.get("per_row_bytes") or 0) * PEAK_PER_SAVED)
    bookkeeping = min(_bookkeeping_s(shape, embed, model.ctx[0], loss_fn, dev) for _ in range(2))
    return ShapeTiming(statistics.median(times), eval_s, bookkeeping, encode, last.get("per_row_bytes"),
                       last.get("chunk_rows"),
                       step_peak, model_bytes, embed)


def _time_model(cfg: RunConfig, shape: RunShape, backbone: Any, budget: RowBudget | None, model_bytes: int,
                steps: int) -> ShapeTiming:
    """`time_shape` for a learner with its own module (`dspt.learner_loop`): its training step on a minibatch
    (pixels through the prompted image tower, or cached features for CoCoOp), and per epoch its pass over the
    training images (view 0) for the diagnostics. The peak memory is measured on a GPU and, on the CPU, projected
    from the bytes autograd saves in one step."""
    from .learner_models import build_model
    from .memory import saved_bytes

    dev = backbone.device
    model = build_model(cfg.learner, backbone, list(shape.names), cfg.learner_options, cfg.template or "{}",
                        cfg.n_ctx, cfg.ctx_init, chunk=budget)
    opt = torch.optim.SGD(list(model.trainable().values()), lr=1e-3, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    b = min(cfg.batch_size, max(shape.n_train, 1))
    embed, encode = _encode_s(backbone, gen)
    if model.image_input == "pixels":
        x = torch.randn(b, 3, backbone.image_size, backbone.image_size, generator=gen).to(dev)
    else:
        x = F.normalize(torch.randn(b, embed, generator=gen), dim=-1).to(dev)
    labels = torch.randint(0, shape.classes, (b,), generator=gen).to(dev)
    loss_fn = get_loss(cfg.loss, **cfg.loss_options)

    def step() -> torch.Tensor:
        loss = loss_fn(model.logits(x), labels)
        extra_term = model.penalty()  # PromptSRC's regularisation (a frozen image-tower pass)
        return loss if extra_term is None else loss + extra_term

    times, base = _timed_steps(step, opt, steps, dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.logits(x)
    _sync(dev)
    per_image = (time.perf_counter() - t0) / b
    eval_s = per_image * shape.n_train  # every epoch: the training images through the learner
    if dev.type == "cuda":
        step_peak = int(torch.cuda.max_memory_allocated(dev) - base)
    else:
        step_peak = int(OVERHEAD + saved_bytes(lambda inputs: model.logits(inputs), x) * PEAK_PER_SAVED)
    bookkeeping = min(_bookkeeping_s(shape, embed, torch.nn.utils.parameters_to_vector(
        list(model.trainable().values())), loss_fn, dev) for _ in range(2)) + per_image * (shape.n_test + shape.n_val) \
        / max(cfg.epochs, 1)  # the final evaluation, spread over the epochs
    return ShapeTiming(statistics.median(times), eval_s, bookkeeping, encode, None, None, step_peak, model_bytes, embed)


def _bookkeeping_s(shape: RunShape, embed: int, ctx: torch.Tensor, loss_fn: torch.nn.Module,
                   dev: torch.device) -> float:
    """One run's end of an epoch at this shape, through the loop's own code: its diagnostics (test predictions,
    per-sample logit gradients, collapse measures) on random features, and its checkpoint and log line."""
    import tempfile
    from pathlib import Path
    from types import SimpleNamespace

    import numpy as np

    from .io import append_jsonl
    from .loop import _epoch_diagnostics
    from .rundir import save_checkpoint

    gen = torch.Generator().manual_seed(1)
    c, n = shape.classes, max(shape.n_train, 1)
    given = torch.randint(0, c, (n,), generator=gen).numpy()
    p = SimpleNamespace(
        test_feats=F.normalize(torch.randn(max(shape.n_test, 1), embed, generator=gen), dim=-1).to(dev),
        test=SimpleNamespace(labels=torch.randint(0, c, (max(shape.n_test, 1),), generator=gen).numpy()),
        train_feats=F.normalize(torch.randn(1, n, embed, generator=gen), dim=-1).to(dev),
        backbone=SimpleNamespace(logit_scale=torch.tensor(100.0, device=dev)),
        labels=SimpleNamespace(given=given, is_noisy=np.zeros(n, dtype=bool)), val_feats=None)
    text = F.normalize(torch.randn(c, embed, generator=gen), dim=-1).to(dev)
    t0 = time.perf_counter()
    record, given_prob = _epoch_diagnostics(p, text, loss_fn)
    with tempfile.TemporaryDirectory(prefix="dspt-plan-") as tmp:
        save_checkpoint(Path(tmp), 0, ctx.detach(), torch.zeros_like(ctx), None, {"insample_sum": given_prob})
        append_jsonl(Path(tmp) / "log.jsonl", {k: v for k, v in record.items() if isinstance(v, (int, float))})
    return time.perf_counter() - t0


def plan_runs(cfgs: list[RunConfig], names: list[str] | None = None, batch_runs: int | None = None,
              workers: int = 1, steps: int = 1, echo: Callable[[str], None] = lambda s: None) -> Plan:
    """The plan of `cfgs` (resolved run configs), batched as `dspt sweep` would batch them."""
    from .backbone import resolve_device
    from .batching import batch_key
    from .sweep import AUTO_BATCH_CPU, AUTO_BATCH_GPU, Cell, plan_batches

    names = names or [str(c.output) for c in cfgs]
    dev = resolve_device(cfgs[0].device)
    free = free_memory(dev)
    cap = batch_runs if batch_runs is not None else (AUTO_BATCH_GPU if dev.type == "cuda" else AUTO_BATCH_CPU)
    cells = [Cell(name, {}, cfg) for name, cfg in zip(names, cfgs)]
    shapes: dict[tuple, RunShape] = {}
    batches: list[BatchPlan] = []
    for unit in plan_batches(cells, cap, workers, key=batch_key):  # the units `dspt sweep` would run
        cfg = unit[0].config
        key = (cfg.dataset, cfg.data, cfg.root, cfg.shots, cfg.val_shots, cfg.method)
        if key not in shapes:
            shapes[key] = run_shape(cfg)
        batches.append(BatchPlan([c.name for c in unit], [c.config for c in unit], shapes[key], len(unit)))
    timings: dict[tuple, ShapeTiming | str] = {}
    problems: list[str] = []
    for b in batches:
        cfg = b.cfg
        if free:  # as many runs at once as the feature share of the free memory holds (`dspt.batching`)
            per_run = b.feature_bytes(1)
            b.at_once = max(1, min(b.at_once, int(FEATURE_SHARE * free) // max(per_run, 1)))
        key = (cfg.model, cfg.precision, cfg.device, cfg.n_ctx, cfg.csc, cfg.class_token_position, cfg.loss,
               b.shape.classes, b.shape.names[:1], len(b.shape.names), b.at_once * b.shape.learners, cfg.max_memory,
               cfg.learner, str(sorted(cfg.learner_options.items())), cfg.batch_size)
        if key not in timings:
            echo(f"plan: timing {cfg.model} {cfg.learner} {cfg.precision} at {b.shape.classes} classes x "
                 f"{b.at_once * b.shape.learners} prompt(s) ...")
            try:
                timings[key] = time_shape(cfg, b.shape, b.at_once, cfg.max_memory, steps)
            except MemoryBudgetError as exc:
                timings[key] = str(exc)
        got = timings[key]
        if isinstance(got, str):
            b.problem = got
        else:
            b.timing = got
            if free and b.peak_bytes > free:
                b.problem = (f"a batch of {b.at_once} run(s) of {cfg.model} at {b.shape.classes} classes needs "
                             f"{b.peak_bytes / GIB:.1f} GB, but {free / GIB:.1f} GB is free; lower --max-memory, "
                             "--batch-runs, or use --precision bf16 where the device has it")
        if b.problem and b.problem not in problems:
            problems.append(b.problem)
    encodings, cache_bytes, encode_s = _cache_cost(batches)
    nbytes = budget_bytes(cfgs[0].max_memory, dev)
    return Plan(batches, str(dev), nbytes, free, encodings, cache_bytes, encode_s, workers, problems)


def _cache_cost(batches: list[BatchPlan]) -> tuple[int, int, float]:
    """Image-views to encode, their bytes on disk, and the time: per distinct (weights, data, shots, seed, views)
    the training views, per (weights, data) the test and validation images."""
    seen: set[tuple] = set()
    encodings, nbytes, seconds = 0, 0, 0.0
    for b in batches:
        if b.timing is None:
            continue
        t, s = b.timing, b.shape
        for cfg in b.configs:
            weights = (cfg.model, cfg.pretrained, cfg.checkpoint, cfg.precision)
            views = cfg.views if get_learner(cfg.learner).cached_features else 0  # VPT, MaPLe: view 0 only
            items = [((*weights, cfg.data, cfg.dataset, cfg.shots, cfg.seed, views, cfg.crop_scale, cfg.hflip),
                      s.n_train * (views + 1)), ((*weights, cfg.data, cfg.dataset, "test"), s.n_test + s.n_val)]
            for key, n in items:
                if key not in seen:
                    seen.add(key)
                    encodings += n
                    nbytes += n * (t.embed_dim * 4 + 16)
                    seconds += n * t.encode_s_per_image
    return encodings, nbytes, seconds


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(plan: Plan) -> str:
    """The plan as a table and a summary, for the terminal."""
    head = f"{'runs':>5} {'at once':>7} {'model':<12} {'learner':<9} {'prec':<4} {'classes':>7} {'rows':>6} " \
           f"{'rows/chunk':>10} {'peak GB':>7} {'step s':>7} {'steps':>7} {'time':>9}"
    lines = [head, "-" * len(head)]
    for b in plan.batches:
        if b.timing is None:
            lines.append(f"{len(b.names):>5} {b.at_once:>7} {b.cfg.model:<12} {b.cfg.learner:<9} {b.cfg.precision:<4} "
                         f"{b.shape.classes:>7} {b.rows:>6} {'-':>10} {'-':>7} {'-':>7} {b.steps:>7} {'-':>9}")
            continue
        chunk = b.timing.chunk_rows or "all"
        lines.append(f"{len(b.names):>5} {b.at_once:>7} {b.cfg.model:<12} {b.cfg.learner:<9} {b.cfg.precision:<4} "
                     f"{b.shape.classes:>7} {b.rows:>6} {chunk!s:>10} {b.peak_bytes / GIB:>7.2f} {b.timing.step_s:>7.3f} "
                     f"{b.steps:>7} {_duration(b.train_s):>9}")
    image_side = sorted({b.cfg.learner for b in plan.batches if not get_learner(b.cfg.learner).cached_features})
    if image_side:
        lines += ["", f"plan: learner(s) {', '.join(image_side)} prompt the image tower: it runs with gradients on "
                  "every step's images (no feature cache), and each epoch passes the training images once more; "
                  "timed so"]
    if any(b.shape.names and b.shape.names[0] == PLACEHOLDER_NAME for b in plan.batches):
        lines += ["", "plan: class names not on disk are placeholders as long as ImageNet's longest (12 tokens): "
                  "an upper bound where the real names are shorter"]
    budget = f"{plan.budget_bytes / GIB:.2f} GB per step" if plan.budget_bytes else "none"
    free = f"{plan.free_bytes / GIB:.1f} GB free" if plan.free_bytes else "free memory unknown"
    lines += ["", f"plan: {plan.runs} runs in {len(plan.batches)} batches on {plan.device} ({free}; memory budget "
              f"{budget})",
              f"plan: training {_duration(plan.train_s)}, feature cache {_duration(plan.encode_s)} for "
              f"{plan.encodings:,} image-views ({plan.cache_bytes / GIB:.2f} GB on disk, at most: images already "
              f"cached cost nothing); {_duration(plan.total_s)} in all with one worker"]
    return "\n".join(lines)


def check_plan(plan: Plan) -> None:
    """Refuse a plan that cannot run, in one line naming the fix."""
    if plan.problems:
        more = f" (and {len(plan.problems) - 1} more)" if len(plan.problems) > 1 else ""
        raise ConfigError(plan.problems[0] + more)
