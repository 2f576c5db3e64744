"""The training loop of one batch of runs: prompt tuning on cached image features, with checkpoint/resume and
evaluation.

Data flows one way: dataset -> noise -> feature cache -> training -> metrics -> run directory + results row.
This module is the training stage: it sets up each prepared run (`dspt.prepare`) with its learner, method and
checkpoint, trains a batch of runs as one model (`_fit`; a single run is a batch of one), logs and checkpoints
every epoch, and evaluates and writes the finished run. Every source of randomness is derived from the run seed
(`dspt.seeds`; each epoch draws from its own generator), so a run killed at any point and resumed from its last
checkpoint ends with exactly the numbers of an uninterrupted run (on the CPU).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbone import Backbone
from .collapse import CollapseTracker, epoch_record, warning_line
from .config import RunConfig
from .coop_reference import _ReferenceBatches
from .errors import TrainingError
from .io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl
from .learner_models import TunedModel, build_model, kg_penalty
from .learners import get_learner
from .losses import COOP_LR, get_loss, matched_lr
from .memory import GIB, RowBudget, budget_bytes
from .methods import EpochView, Method, get_method
from .metrics import accuracy, logit_gradient_norms, mean_confidence, memorisation, per_class_accuracy, predict
from .optim import RunwiseSGD
from .prepare import Prepared, csv_text, prepare, versions, zeroshot_text_features
from .prompt import PromptBatch, PromptClassifier, PromptLearner, context_drift, mean_pairwise_cosine
from .prompt_file import save_prompt
from .results import append_result
from .rundir import INPUTS, load_checkpoint, result_row, save_checkpoint, save_inputs

log = logging.getLogger(__name__)


def lr_at(cfg: RunConfig, epoch: int, lr: float | None = None) -> float:
    """CoOp/Dassl: `warmup_epochs` at a constant `warmup_lr`, then cosine from the base rate `lr` (default: the
    config's) over `epochs`."""
    base = cfg.lr if lr is None else lr
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    return 0.5 * base * (1.0 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / cfg.epochs))


def resolve_lr(cfg: RunConfig, num_classes: int) -> float:
    """The config's learning rate, or (lr none) the loss's default for this many classes: the learner's CE rate
    (CoOp's 0.002, MaPLe's 0.0035, ...) scaled so the first step is as large as CE's (`dspt.losses.matched_lr`)."""
    if cfg.lr is not None:
        return float(cfg.lr)
    paper = get_learner(cfg.learner).lr / COOP_LR  # a learner whose paper trains CE at another rate than CoOp's
    return paper * matched_lr(cfg.loss, num_classes, **cfg.loss_options)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The epoch's own generator (minibatch order and view choice), so a resumed run redraws nothing."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, 7]).generate_state(1)[0]))


def method_generator(seed: int, epoch: int) -> torch.Generator:
    """The epoch's generator for a method's own draws (mixup, a mixture fit), apart from the loop's."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, 11]).generate_state(1)[0]))


def learner_seed(init_seed: int, j: int) -> int:
    """Init seed of a method's learner j >= 1 (learner 0 has the run's own init seed)."""
    return int(np.random.SeedSequence([init_seed, j]).generate_state(1)[0])


def _diverged(what: str, cfg: RunConfig, run_dir: Path, last_saved: int) -> TrainingError:
    kept = (f"the last good checkpoint (epoch {last_saved + 1}) is kept in {run_dir} and no metrics were written"
            if last_saved >= 0 else "no epoch had finished, so nothing was kept")
    return TrainingError(f"{what}; lower --lr (now {cfg.lr:g}) and use a new --output; {kept}")


def needs_loss_scaling(precision: str, device: torch.device) -> bool:
    """fp16 autocast needs loss scaling: DSPT's gradients are small by design (about p_y times CE's), so in
    fp16 they underflow to zero first. bf16 has fp32's range and needs none; fp16 is refused on the CPU."""
    return precision == "fp16" and device.type == "cuda"


def grad_scaler(backbone: Backbone) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(backbone.device.type,
                                enabled=needs_loss_scaling(backbone.precision, backbone.device))


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """Backward and one step through the scaler (a plain step when it is disabled); a step whose scaled
    gradients overflowed is skipped and the scale lowered, as torch.amp prescribes."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


@dataclass
class _Run:
    """One run of a batch: its config, folder and, once prepared, everything its epochs need."""

    index: int
    cfg: RunConfig
    run_dir: Path
    created: bool
    p: Prepared | None = None
    loss_fn: torch.nn.Module | None = None
    learner: PromptLearner | None = None
    zs_pred: np.ndarray | None = None
    ctx0: torch.Tensor | None = None
    init_cos: float = float("nan")
    start: int = 0
    checkpoint: dict[str, Any] | None = None
    last_saved: int = -1
    last_test_acc: float = float("nan")
    gen: torch.Generator | None = None  # this epoch's generator (the reference path draws its crops from it)
    error: BaseException | None = None
    method: Method | None = None
    learners: list[PromptLearner] = field(default_factory=list)  # learner 0 is `learner`, the run's prompt
    lr: float = 0.0  # the base learning rate (the config's, or the loss's default)
    lr_scale: float = 1.0  # halved by --collapse-guard at each collapse (checkpointed)
    tracker: CollapseTracker = field(default_factory=CollapseTracker)
    healthy: dict[str, torch.Tensor] | None = None  # --collapse-guard: the prompt state after the last healthy epoch
    insample: torch.Tensor | None = None  # [N] float64: p(given label) of each training image, summed over epochs
    insample_epochs: int = 0  # how many epochs `insample` sums (a checkpoint from before it existed: fewer)
    model: TunedModel | None = None  # the module of a learner beyond CoOp's context (CoCoOp, VPT, MaPLe, PromptSRC)
    models: list[TunedModel] = field(default_factory=list)  # its method's learners (co-teaching: 2); 0 is `model`
    kg_reference: torch.Tensor | None = None  # KgCoOp: the hand-crafted prompt's class features [C, E]


def _fail(run: _Run, exc: BaseException) -> None:
    if not isinstance(exc, Exception):
        raise exc
    run.error = exc


def _step_plan(n: int, batch_size: int) -> tuple[str, int]:
    """How an epoch over n training samples steps: ("steps", n // batch_size) minibatches of batch_size (the
    rest of the shuffled order is dropped), or ("all", n), one full batch when n < batch_size. Runs with equal
    plans can share every step even when their training sets differ in size (cross-fitting folds)."""
    return ("steps", n // batch_size) if n >= batch_size else ("all", n)


def _setup(run: _Run, shared: dict[str, Any]) -> None:
    """Data, labels, cached features, zero-shot reference, the learner and its checkpoint, for one run."""
    cfg, run_dir = run.cfg, run.run_dir
    run.p = p = prepare(cfg, run_dir, shared["backbone"], shared["splits"])
    dev = p.backbone.device
    atomic_write_json(run_dir / "environment.json", versions(dev))
    run.loss_fn = get_loss(cfg.loss, **cfg.loss_options)
    zs_key = ("zeroshot", cfg.template, cfg.skip_bad_images)
    if zs_key not in shared:
        shared[zs_key] = predict(p.test_feats, zeroshot_text_features(p.backbone, p.train.classnames, cfg.template))
    run.zs_pred = shared[zs_key]
    spec = get_learner(cfg.learner)
    run.method = get_method(cfg.method, run.loss_fn, p.train.num_classes, len(p.train), **cfg.method_options)
    if spec.module:  # a learner with its own module (CoCoOp, VPT, MaPLe): trains alone (`dspt.learner_loop`)
        run.models = [build_model(cfg.learner, p.backbone, p.train.classnames, cfg.learner_options, cfg.template,
                                  cfg.n_ctx, cfg.ctx_init, chunk=step_budget(cfg, dev),
                                  seed=p.seeds["init"] if j == 0 else learner_seed(p.seeds["init"], j))
                      for j in range(run.method.learners)]
        run.model = run.models[0]
        run.learner = getattr(run.model, "prompt", None)
    else:
        run.learner = PromptLearner(p.backbone, p.train.classnames, cfg.n_ctx, cfg.ctx_init, cfg.csc,
                                    cfg.class_token_position, seed=p.seeds["init"])
        run.learners = [run.learner] + [
            PromptLearner(p.backbone, p.train.classnames, cfg.n_ctx, cfg.ctx_init, cfg.csc, cfg.class_token_position,
                          seed=learner_seed(p.seeds["init"], j)) for j in range(1, run.method.learners)]
    if run.learner is not None and run.learner.n_ctx != cfg.n_ctx:  # the config is resolved with the model's
        raise TrainingError(f"the prompt has {run.learner.n_ctx} context vectors but the config says {cfg.n_ctx}; "
                            "please report this as a dspt bug")  # tokenizer: they must agree
    if cfg.learner == "kgcoop":  # the hand-crafted prompt's class features its penalty keeps the prompt near
        run.kg_reference = zeroshot_text_features(p.backbone, p.train.classnames, cfg.template)
    run.lr = resolve_lr(cfg, p.train.num_classes)
    atomic_write_text(run_dir / "config.yaml", cfg.dump())  # after the inputs checked out: what runs
    if not (run_dir / INPUTS).is_file():  # the contents of its input files, fixed when the run starts
        save_inputs(cfg, run_dir)
    run.ctx0 = _parameters(run).detach().clone()
    with torch.no_grad():
        run.init_cos = mean_pairwise_cosine(_class_features(run))
    ckpt = load_checkpoint(run_dir)
    if ckpt is not None and tuple(ckpt["ctx"].shape) != tuple(run.ctx0.shape):
        log.warning("checkpoint in %s does not fit this prompt (shape %s); starting from epoch 0", run_dir,
                    tuple(ckpt["ctx"].shape))
        ckpt = None
    slots = len(run.models) or len(run.learners)  # the method's learners: CoOp prompts or a learner's modules
    if ckpt is not None and any(f"ctx_{j}" not in ckpt["extra"] for j in range(1, slots)):
        log.warning("checkpoint in %s lacks the method's other learners; starting from epoch 0", run_dir)
        ckpt = None
    if ckpt is not None:
        with torch.no_grad():
            _set_parameters(run, ckpt["ctx"].to(dev))
            for j in range(1, len(run.learners)):
                run.learners[j].ctx.copy_(ckpt["extra"][f"ctx_{j}"].to(dev))
            for j in range(1, len(run.models)):
                set_model_vector(run.models[j], ckpt["extra"][f"ctx_{j}"])
        run.start = ckpt["epoch"] + 1
        log.info("resuming %s at epoch %d/%d", run_dir, run.start + 1, cfg.epochs)
    run.checkpoint, run.last_saved = ckpt, run.start - 1
    log_path = run_dir / "log.jsonl"
    # Epochs after the checkpoint are recomputed; drop their log lines so each epoch is logged once.
    if log_path.is_file():
        kept = [r for r in read_jsonl(log_path) if r.get("event") != "epoch" or r["epoch"] < run.start]
        atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in kept))
        run.tracker = CollapseTracker.from_log(kept)
    if ckpt is not None and "lr_scale" in ckpt["extra"]:
        run.lr_scale = float(ckpt["extra"]["lr_scale"])
    if ckpt is not None and tuple(ckpt["extra"].get("insample_sum", torch.empty(0)).shape) == (len(p.train),):
        run.insample = ckpt["extra"]["insample_sum"].double().cpu()
        run.insample_epochs = int(ckpt["extra"].get("insample_epochs", torch.tensor(run.start)))
    append_jsonl(log_path, {"event": "start", "epoch": run.start, "cache": p.cache, "n_train": len(p.train),
                            "classes": p.train.num_classes, "noise": p.labels.summary(), "seeds": p.seeds,
                            "method": cfg.method, "learner": cfg.learner, "lr": run.lr})


def _parameters(run: _Run) -> torch.Tensor:
    """The run's trained parameters as one vector: CoOp's context, or every parameter of a learner's module
    (what the checkpoint stores as `ctx` and what the context drift is measured on)."""
    return run.learner.ctx if run.model is None else model_vector(run.model)


@torch.no_grad()
def _set_parameters(run: _Run, vector: torch.Tensor) -> None:
    if run.model is None:
        run.learner.ctx.copy_(vector)
    else:
        set_model_vector(run.model, vector)


def model_vector(model: TunedModel) -> torch.Tensor:
    """A learner module's parameters as one vector (a copy: write back with `set_model_vector`)."""
    return torch.nn.utils.parameters_to_vector(list(model.trainable().values()))


@torch.no_grad()
def set_model_vector(model: TunedModel, vector: torch.Tensor) -> None:
    """Copy `vector` into the module's parameters in place. (torch's vector_to_parameters rebinds each parameter
    to a view of the vector: same values, but unaligned storage, on which the CPU's matrix kernels round
    differently, so a resumed run would drift from an uninterrupted one.)"""
    at = 0
    for q in model.trainable().values():
        q.copy_(vector[at:at + q.numel()].view_as(q))
        at += q.numel()


def _class_features(run: _Run) -> torch.Tensor:
    """[C, E] class text features of the run's learner (CoCoOp: for the mean training image)."""
    if run.model is None:
        return _classifier(run).text_features()
    anchor = torch.nn.functional.normalize(run.p.train_feats[0].float().mean(0, keepdim=True), dim=-1)
    return run.model.class_features(anchor)


def _classifier(run: _Run) -> PromptClassifier:
    """The run's own classifier: what evaluation, `load_prompt` and `dspt predict` use."""
    fast = run.cfg.path == "fast"  # reference: CoOp's text side too (all context tokens per prompt, fp32)
    return PromptClassifier(run.p.backbone, run.learner, truncate=fast, share_prefix=fast, mixed_precision=fast,
                            class_chunk=step_budget(run.cfg, run.p.backbone.device))


def step_budget(cfg: RunConfig, device: torch.device) -> RowBudget | None:
    """The memory budget of a step's text side (`dspt.memory`): --max-memory, else a share of the free memory."""
    nbytes = budget_bytes(cfg.max_memory, device)
    return RowBudget(nbytes, "--max-memory" if cfg.max_memory else "the default budget") if nbytes else None


def _fit(batch: list[_Run]) -> None:
    """The training loop, for a batch of runs that start at the same epoch (a single run: a batch of one).

    Each run has one prompt learner, or more for a method that trains several (co-teaching): every learner is
    a slot of the batched model, with the run's learning rate, and the run's method turns the slots' logits
    into the run's loss."""
    p0, cfg0 = batch[0].p, batch[0].cfg
    dev, ns = p0.backbone.device, [len(run.p.train) for run in batch]
    slots: list[list[int]] = []
    for run in batch:
        first = sum(len(x) for x in slots)
        slots.append(list(range(first, first + len(run.learners))))
    learners = [learner for run in batch for learner in run.learners]
    r = len(learners)
    fast = cfg0.path == "fast"
    budget = step_budget(cfg0, dev)
    model = PromptBatch(p0.backbone, learners, truncate=fast, share_prefix=fast, mixed_precision=fast,
                        row_chunk=budget)
    per_slot = [(run, j) for run in batch for j in range(len(run.learners))]
    opt = RunwiseSGD(model.ctx, [run.lr for run, _ in per_slot], [run.cfg.momentum for run, _ in per_slot],
                     [run.cfg.weight_decay for run, _ in per_slot])
    scaler = grad_scaler(p0.backbone)
    for k, run in enumerate(batch):
        ckpt = run.checkpoint
        if ckpt is not None:
            if ckpt["momentum"] is not None:
                opt.load_buffer(slots[k][0], ckpt["momentum"])
            for j, slot in enumerate(slots[k][1:], start=1):
                if f"momentum_{j}" in ckpt["extra"]:
                    opt.load_buffer(slot, ckpt["extra"][f"momentum_{j}"])
            torch.set_rng_state(ckpt["torch_rng"])
            if ckpt["cuda_rng"] is not None and dev.type == "cuda":
                torch.cuda.set_rng_state_all(list(ckpt["cuda_rng"]))
            if ckpt["scaler"] and scaler.is_enabled():
                scaler.load_state_dict(ckpt["scaler"])
    for k, run in enumerate(batch):  # the state the run starts from is its first healthy one (for the guard)
        if run.cfg.collapse_guard:
            run.healthy = _prompt_state(model, opt, slots[k])
    given = [torch.as_tensor(run.p.labels.given, device=dev) for run in batch]  # per run: [N_run]
    reference = _ReferenceBatches(p0) if cfg0.path == "reference" else None
    views = [run.p.train_feats.shape[0] - 1 for run in batch]
    batch_size = cfg0.batch_size
    plan = {_step_plan(n, batch_size) for n in ns}
    if len(plan) != 1:
        raise RuntimeError(f"a batch mixes step plans {sorted(plan)}; please report this as a dspt bug")
    drop_last = plan.pop()[0] == "steps"
    steps = ns[0] // batch_size if drop_last else 1
    start, epochs = batch[0].start, cfg0.epochs
    t_train = time.perf_counter()
    label = f"{cfg0.loss} {cfg0.noise}{cfg0.noise_rate:g}" if len(batch) == 1 else f"{len(batch)} runs"
    bar = tqdm(range(start, epochs), desc=label, disable=not cfg0.progress, initial=start, total=epochs, leave=False)
    plain = [type(run.method) is Method for run in batch]

    def deactivate(k: int) -> None:
        for slot in slots[k]:
            opt.active[slot] = False

    for epoch in bar:
        t_epoch = time.perf_counter()
        opt.set_lr([lr_at(run.cfg, epoch, run.lr * run.lr_scale) for run, _ in per_slot])
        order, view, mgen = [], [], []
        for k, run in enumerate(batch):
            gen = epoch_generator(run.p.seeds["epochs"], epoch)
            order.append(torch.randperm(ns[k], generator=gen))
            view.append(torch.randint(1, views[k] + 1, (ns[k],), generator=gen) if views[k] > 0
                        else torch.zeros(ns[k], dtype=torch.long))
            run.gen = gen
            mgen.append(method_generator(run.p.seeds["epochs"], epoch))
        if not all(plain):
            with torch.no_grad():
                text = model.text_features()
            for k, run in enumerate(batch):
                if not plain[k] and run.error is None:
                    try:
                        run.method.begin_epoch(_epoch_view(run, epoch, text[slots[k]], given[k], mgen[k]))
                    except Exception as exc:  # noqa: BLE001 - a method that fails stops its own run
                        _fail(run, exc)
                        deactivate(k)
        losses: list[list[float]] = [[] for _ in batch]
        for s in range(steps):
            idx = [o[s * batch_size:(s + 1) * batch_size] if drop_last else o for o in order]
            if reference is not None:
                feats = reference(idx[0], batch[0].gen).unsqueeze(0)
            else:
                feats = torch.stack([run.p.train_feats[view[k][idx[k]].to(dev), idx[k].to(dev)]
                                     for k, run in enumerate(batch)])
            if not all(plain):
                feats = torch.stack([feats[k] if plain[k] else run.method.inputs(feats[k], idx[k], mgen[k])
                                     for k, run in enumerate(batch)])
            if r != len(batch):
                feats = feats[torch.tensor([k for k, run in enumerate(batch) for _ in run.learners], device=dev)]
            text_all = model.text_features()
            logits = model.logits(feats, text_all)
            total = None
            for k, run in enumerate(batch):
                if run.error is not None:
                    continue
                y = given[k][idx[k].to(dev)]
                if plain[k]:
                    loss = run.loss_fn(logits[slots[k][0]], y)
                else:
                    loss = run.method.loss(logits[slots[k][0]:slots[k][-1] + 1], idx[k].to(dev), y)
                # KgCoOp: every prompt of the run stays near the hand-crafted one
                if run.kg_reference is not None and run.cfg.learner_options["weight"]:
                    weight = run.cfg.learner_options["weight"]
                    loss = loss + weight * sum(kg_penalty(text_all[slot], run.kg_reference) for slot in slots[k])
                if not torch.isfinite(loss):
                    _fail(run, _diverged(f"non-finite loss ({loss.item()}) at epoch {epoch + 1} step {s + 1}",
                                         run.cfg, run.run_dir, run.last_saved))
                    deactivate(k)
                    continue
                losses[k].append(loss.item())
                total = loss if total is None else total + loss  # a sum of per-run means: no cross-talk
            if total is None:
                break
            optimizer_step(total, opt, scaler)
        with torch.no_grad():
            text = model.text_features()
        for k, run in enumerate(batch):
            if run.error is not None:
                continue
            try:
                extra = {}
                for j, slot in enumerate(slots[k][1:], start=1):
                    extra[f"ctx_{j}"], extra[f"momentum_{j}"] = model.ctx[slot], opt.buffer[slot]
                _end_epoch(run, epoch, model.ctx[slots[k][0]], opt.buffer[slots[k][0]],
                           _epoch_diagnostics(run.p, text[slots[k][0]], run.loss_fn), losses[k], scaler, t_epoch,
                           extra, lambda: _prompt_state(model, opt, slots[k]),
                           lambda state: _restore_prompt(model, opt, slots[k], state))
            except BaseException as exc:  # noqa: BLE001 - a run whose bookkeeping fails stops alone
                _fail(run, exc)
            if run.error is not None:
                deactivate(k)
        alive = [run for run in batch if run.error is None]
        if not alive:
            break
        if len(batch) == 1:
            bar.set_postfix(loss=f"{np.mean(losses[0]):.4f}", test=f"{batch[0].last_test_acc:.1f}")
    bar.close()
    train_seconds = time.perf_counter() - t_train
    for k, run in enumerate(batch):
        if run.error is not None:
            continue
        try:
            with torch.no_grad():
                for j, slot in enumerate(slots[k]):
                    run.learners[j].ctx.copy_(model.ctx[slot])
            _finish(run, train_seconds, len(batch), budget)
        except BaseException as exc:  # noqa: BLE001
            _fail(run, exc)


def _epoch_view(run: _Run, epoch: int, text: torch.Tensor, given: torch.Tensor, gen: torch.Generator) -> EpochView:
    """What the run's method may look at as the epoch begins: every learner's logits of view 0."""
    p = run.p
    feats = p.train_feats[0]
    logits = p.backbone.logit_scale * torch.einsum("ne,lce->lnc", feats.float(), text.float())
    return EpochView(epoch=epoch, epochs=run.cfg.epochs, logits=logits, image_features=feats, text_features=text,
                     given=given, logit_scale=float(p.backbone.logit_scale), gen=gen, is_noisy=p.labels.is_noisy)


def _prompt_state(model: PromptBatch, opt: RunwiseSGD, slots: list[int]) -> dict[str, torch.Tensor]:
    """A copy of a run's prompt state: the context and momentum of each of its slots."""
    state = {}
    for j, slot in enumerate(slots):
        state[f"ctx_{j}"], state[f"momentum_{j}"] = model.ctx[slot].detach().clone(), opt.buffer[slot].clone()
    return state


@torch.no_grad()
def _restore_prompt(model: PromptBatch, opt: RunwiseSGD, slots: list[int], state: dict[str, torch.Tensor]) -> None:
    for j, slot in enumerate(slots):
        model.ctx[slot].copy_(state[f"ctx_{j}"])
        opt.buffer[slot].copy_(state[f"momentum_{j}"])


def _end_epoch(run: _Run, epoch: int, ctx: torch.Tensor, momentum: torch.Tensor,
               scores: tuple[dict[str, float], torch.Tensor], losses: list[float], scaler: torch.amp.GradScaler,
               t_epoch: float,
               extra: dict[str, torch.Tensor] | None = None, snapshot: Any = None, restore: Any = None) -> None:
    """Log the epoch, watch for a collapse (`dspt.collapse`) and save the run's checkpoint (or fail the run if its
    context is no longer finite). With --collapse-guard, a collapsed epoch puts back the prompt of the last
    healthy one (`restore`; `snapshot` takes a healthy one) and halves the run's rate before the save."""
    if not torch.isfinite(ctx).all():
        raise _diverged(f"non-finite prompt parameters after epoch {epoch + 1}", run.cfg, run.run_dir, run.last_saved)
    record = {"event": "epoch", "epoch": epoch, "lr": lr_at(run.cfg, epoch, run.lr * run.lr_scale),
              "loss": float(np.mean(losses)), "seconds": time.perf_counter() - t_epoch}
    diagnostics, given_prob = scores  # `_epoch_diagnostics` / `_diagnostics` of the epoch's classifier
    record.update(diagnostics)
    fresh = run.insample is None or epoch == 0
    run.insample = given_prob if fresh else run.insample + given_prob
    run.insample_epochs = 1 if fresh else run.insample_epochs + 1
    if type(run.method) is not Method:
        record.update({f"method_{k}": v for k, v in run.method.epoch_log().items()})
    guard = run.cfg.collapse_guard and restore is not None and run.healthy is not None
    if run.tracker.update(epoch, record):
        log.warning("%s: %s", run.run_dir.name, warning_line(record["collapse"], epoch, record, guard))
    if record["collapse"] and guard:
        restore(run.healthy)
        run.lr_scale *= 0.5
        run.tracker.restored()
        record["guard"] = f"restored the prompt of the last healthy epoch; learning rate x{run.lr_scale:g} from now"
    elif record["collapse"] is None and run.cfg.collapse_guard and snapshot is not None:
        run.healthy = snapshot()
    append_jsonl(run.run_dir / "log.jsonl", record)
    extra = dict(extra or {})
    if run.lr_scale != 1.0:
        extra["lr_scale"] = torch.tensor(run.lr_scale, dtype=torch.float64)
    extra["insample_sum"] = run.insample
    extra["insample_epochs"] = torch.tensor(run.insample_epochs, dtype=torch.int64)
    save_checkpoint(run.run_dir, epoch, ctx, momentum, scaler.state_dict() if scaler.is_enabled() else None, extra)
    run.last_saved, run.last_test_acc = epoch, record["test_acc"]


def _finish(run: _Run, train_seconds: float, batch_runs: int = 1, budget: RowBudget | None = None,
            metrics: dict[str, Any] | None = None) -> None:
    """Evaluate the run's final prompt and write its prompt, metrics (last: they mark it finished) and row.
    `train_seconds` is the wall time of the batch the run trained in, `batch_runs` how many runs it held: the run's
    own training time is its equal share, and the batch's wall time is kept beside it."""
    p, cfg, run_dir = run.p, run.cfg, run.run_dir
    log_path = run_dir / "log.jsonl"
    if metrics is None:  # (a learner with its own module brings its own evaluation: `dspt.learner_loop`)
        metrics = evaluate(p, _classifier(run), run.zs_pred, run.ctx0, run.init_cos)
    metrics["seconds"] = {"cache": p.cache["seconds"], "train": train_seconds / batch_runs, "batch": train_seconds}
    metrics["batch_runs"] = batch_runs
    metrics["memory"] = {"budget_gb": budget.nbytes / GIB, **budget.last} if budget else None  # the training step's
    metrics["collapse"] = run.tracker.summary(run.lr_scale)
    metrics["lr"], metrics["method"] = run.lr, cfg.method  # the base rate used (the loss's default when lr none)
    metrics["cache_hit"] = {"train": p.cache["train_hit"], "test": p.cache["test_hit"]}
    metrics["features_encoded"] = p.cache["encoded"]  # image-views this run encoded; the rest came from the cache
    epochs_log = [r for r in read_jsonl(log_path) if r.get("event") == "epoch"]
    metrics["final_loss"] = epochs_log[-1]["loss"] if epochs_log else float("nan")
    metrics["first_loss"] = epochs_log[0]["loss"] if epochs_log else float("nan")
    save_prompt(run_dir, run.model if run.model is not None else run.learner, cfg, p.backbone)
    if run.insample is not None:  # what `dspt audit` averages as its in-sample score
        mean = (run.insample / max(run.insample_epochs, 1)).numpy()
        atomic_write_text(run_dir / "in_sample.csv", csv_text(["index", "mean_given_prob"], (
            (i, f"{v:.9g}") for i, v in enumerate(mean.tolist()))))
    atomic_write_json(run_dir / "metrics.json", metrics)  # written last: its presence marks a finished run
    append_result(cfg.results, result_row(cfg, metrics, run_dir))
    append_jsonl(log_path, {"event": "done", "test_acc": metrics["test_acc"]})


@torch.no_grad()
def _epoch_diagnostics(p: Prepared, text: torch.Tensor, loss_fn: torch.nn.Module
                       ) -> tuple[dict[str, float], torch.Tensor]:
    """The epoch's diagnostics (`_diagnostics`) of a classifier given by its class text features: the logits of
    the training images' view 0, and the test (and validation) predictions."""
    held = {"test": predict(p.test_feats, text)} | ({"val": predict(p.val_feats, text)}
                                                    if p.val_feats is not None else {})
    return _diagnostics(p, p.backbone.logit_scale * p.train_feats[0] @ text.t(), held, loss_fn)


@torch.no_grad()
def _diagnostics(p: Prepared, logits: torch.Tensor, held: dict[str, np.ndarray], loss_fn: torch.nn.Module
                 ) -> tuple[dict[str, float], torch.Tensor]:
    """Cheap per-epoch curves from the training logits [N, C] (view 0) and the held-out predictions `held`
    ({"test": pred, "val": pred}; a learner that evaluates only at the end passes none: test_acc is NaN): test
    accuracy, training fit to the given labels, and the mean per-sample logit-gradient norm and loss of clean vs
    mislabeled samples (the method's mechanism; logging only, nothing is selected on them), and the collapse
    measurements (`dspt.collapse`: decided on the training samples alone, the test and validation spreads only
    recorded). Also each training image's probability of its given label [N] (float64, CPU), whose mean over
    epochs is the in-sample score of an audit."""
    test_acc = accuracy(held["test"], p.test.labels) if "test" in held else float("nan")
    given = torch.as_tensor(p.labels.given, device=logits.device)
    with torch.enable_grad():
        norms = logit_gradient_norms(logits, given, loss_fn).cpu().numpy()
    losses = loss_fn.per_sample(logits.float(), given).cpu().numpy()
    noisy = p.labels.is_noisy

    def mean(values: np.ndarray, mask: np.ndarray) -> float:
        return float(values[mask].mean()) if mask.any() else float("nan")

    # p(given) from the log-sum-exp: no second [N, C] tensor (the audit's in-sample score)
    given_prob = (logits.float().gather(1, given[:, None]).squeeze(1) - torch.logsumexp(logits.float(), -1)
                  ).exp().double().cpu()
    return {"test_acc": test_acc, "train_acc_given": accuracy(logits.argmax(-1).cpu().numpy(), p.labels.given),
            "grad_norm_clean": mean(norms, ~noisy), "grad_norm_noisy": mean(norms, noisy),
            "loss_clean": mean(losses, ~noisy), "loss_noisy": mean(losses, noisy)} | epoch_record(
                logits, given, norms, losses, noisy, loss_fn, held), given_prob


@torch.no_grad()
def evaluate(p: Prepared, clf: PromptClassifier, zs_pred: np.ndarray, ctx0: torch.Tensor,
             init_cos: float) -> dict[str, Any]:
    text = clf.text_features()
    out = evaluation(p, predict(p.test_feats, text), predict(p.train_feats[0], text),
                     predict(p.val_feats, text) if p.val_feats is not None else None, zs_pred)
    return out | {"text_cosine": {"init": init_cos, "final": mean_pairwise_cosine(text)},
                  "test_confidence": mean_confidence(p.test_feats, text, float(p.backbone.logit_scale)),
                  "ctx_drift": context_drift(clf.learner.ctx.detach(), ctx0)}


def evaluation(p: Prepared, pred: np.ndarray, train_pred: np.ndarray, val_pred: np.ndarray | None,
               zs_pred: np.ndarray) -> dict[str, Any]:
    """A finished run's metrics from its predictions on the test, training (view 0) and validation images."""
    zs = accuracy(zs_pred, p.test.labels)
    test_acc = accuracy(pred, p.test.labels)
    return {
        "test_acc": test_acc,
        "val_acc_given": accuracy(val_pred, p.val_given) if val_pred is not None else float("nan"),
        "val_acc": accuracy(val_pred, p.val.labels) if val_pred is not None else float("nan"),
        "zeroshot_acc": zs,
        "gain_over_zeroshot": test_acc - zs,
        "per_class_acc": per_class_accuracy(pred, p.test.labels, p.test.classnames),
        "train": memorisation(train_pred, p.labels.given, p.labels.true),
        "noise": p.labels.summary(),
        "logit_scale": float(p.backbone.logit_scale),
        "n_train": len(p.train),
        "n_test": len(p.test),
        "classes": p.train.num_classes,
        "validation": p.val_info,
        "seeds": p.seeds,
    }
