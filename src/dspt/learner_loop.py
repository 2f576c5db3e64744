"""The training loop of a learner with its own module (CoCoOp, VPT, MaPLe): one run at a time.

CoOp's loop (`dspt.loop._fit`) trains many runs' contexts as one batched parameter on cached features. The
learners here own several parameter tensors, and the image-side ones run the image tower on every step's images
(loaded and augmented per step, as CoOp's own trainer does; the draws are the reference path's, seeded per
epoch), so each run trains alone, with torch's SGD over its module's parameters. Everything else is CoOp's loop:
the learning-rate schedule, the per-epoch generators, the loss, the diagnostics and collapse tracking on the
training images (view 0), the checkpoint every epoch (all parameters as one vector, and the momentum) and the
run folder. The test split is evaluated once, at the end (its per-epoch test accuracy is not logged: for an
image-side learner it would be a full pass over the test images every epoch).
"""
from __future__ import annotations

import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .coop_reference import _ReferenceBatches
from .features import encode_paths
from .loop import (_diagnostics, _diverged, _end_epoch, _fail, _finish, _parameters, _Run, _set_parameters,
                   _step_plan, epoch_generator, evaluation, grad_scaler, lr_at, optimizer_step)
from .prompt import mean_pairwise_cosine


def _momentum(opt: torch.optim.SGD, params: list[torch.Tensor]) -> torch.Tensor:
    """The momentum buffers as one vector (zeros before the first step)."""
    return torch.cat([opt.state.get(q, {}).get("momentum_buffer", torch.zeros_like(q)).reshape(-1) for q in params])


def _load_momentum(opt: torch.optim.SGD, params: list[torch.Tensor], vector: torch.Tensor) -> None:
    at = 0
    for q in params:
        opt.state[q]["momentum_buffer"] = vector[at:at + q.numel()].view_as(q).clone().to(q.device)
        at += q.numel()


@torch.no_grad()
def image_features(run: _Run, split: str) -> torch.Tensor:
    """[N, E] features of a split's images (view 0: the test transform) under the run's learner: the cached ones
    for a learner that keeps the frozen image tower, else its own prompted tower over every image."""
    p, model = run.p, run.model
    if model.image_input == "features":
        return {"train": p.train_feats[0], "test": p.test_feats, "val": p.val_feats}[split]
    data = {"train": p.train, "test": p.test, "val": p.val}[split]
    was = model.training
    model.eval()
    try:
        feats = encode_paths(p.backbone, list(data.paths), p.backbone.test_transform(), batch_size=64,
                             workers=run.cfg.workers, desc=f"encode {split}", encoder=model.image_features)
    finally:
        model.train(was)
    return feats.to(p.backbone.device)


@torch.no_grad()
def _logits(run: _Run, feats: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    return torch.cat([run.model.classify(feats[i:i + chunk]) for i in range(0, len(feats), chunk)]) \
        if len(feats) else torch.empty(0, run.p.train.num_classes, device=feats.device)


def fit_model(run: _Run) -> None:
    """Train one run of a learner with its own module from its start epoch to the end, then finish it."""
    try:
        _fit_model(run)
    except BaseException as exc:  # noqa: BLE001 - the run fails alone (a kill is re-raised by _fail)
        _fail(run, exc)


def _fit_model(run: _Run) -> None:
    p, cfg, model = run.p, run.cfg, run.model
    dev = p.backbone.device
    params = list(model.trainable().values())
    opt = torch.optim.SGD(params, lr=run.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler = grad_scaler(p.backbone)
    ckpt = run.checkpoint
    if ckpt is not None:
        if ckpt["momentum"] is not None and cfg.momentum:
            _load_momentum(opt, params, ckpt["momentum"])
        torch.set_rng_state(ckpt["torch_rng"])
        if ckpt["cuda_rng"] is not None and dev.type == "cuda":
            torch.cuda.set_rng_state_all(list(ckpt["cuda_rng"]))
        if ckpt["scaler"] and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])

    def snapshot() -> dict[str, torch.Tensor]:
        return {"ctx": _parameters(run).detach().clone(), "momentum": _momentum(opt, params).clone()}

    def restore(state: dict[str, torch.Tensor]) -> None:
        _set_parameters(run, state["ctx"])
        if cfg.momentum:
            _load_momentum(opt, params, state["momentum"])

    if cfg.collapse_guard:
        run.healthy = snapshot()
    pixels = _ReferenceBatches(p) if model.image_input == "pixels" else None
    given = torch.as_tensor(p.labels.given, device=dev)
    n, views = len(p.train), p.train_feats.shape[0] - 1
    kind, steps = _step_plan(n, cfg.batch_size)
    steps = steps if kind == "steps" else 1
    model.train()
    t_train = time.perf_counter()
    bar = tqdm(range(run.start, cfg.epochs), desc=f"{cfg.learner} {cfg.loss} {cfg.noise}{cfg.noise_rate:g}",
               disable=not cfg.progress, initial=run.start, total=cfg.epochs, leave=False)
    for epoch in bar:
        t_epoch = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, epoch, run.lr * run.lr_scale)
        gen = epoch_generator(p.seeds["epochs"], epoch)
        order = torch.randperm(n, generator=gen)
        view = torch.randint(1, views + 1, (n,), generator=gen) if views > 0 and pixels is None \
            else torch.zeros(n, dtype=torch.long)
        losses: list[float] = []
        for s in range(steps):
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size] if kind == "steps" else order
            x = pixels.pixels(idx, gen) if pixels is not None else p.train_feats[view[idx].to(dev), idx.to(dev)]
            loss = run.loss_fn(model.logits(x.to(dev)), given[idx.to(dev)])
            if not torch.isfinite(loss):
                raise _diverged(f"non-finite loss ({loss.item()}) at epoch {epoch + 1} step {s + 1}", cfg,
                                run.run_dir, run.last_saved)
            losses.append(loss.item())
            optimizer_step(loss, opt, scaler)
        train_logits = _logits(run, image_features(run, "train"))
        _end_epoch(run, epoch, _parameters(run), _momentum(opt, params), _diagnostics(p, train_logits, {}, run.loss_fn),
                   losses, scaler, t_epoch, None, snapshot, restore)
        bar.set_postfix(loss=f"{np.mean(losses):.4f}")
    bar.close()
    model.eval()
    train_seconds = time.perf_counter() - t_train
    _finish(run, train_seconds, 1, None, evaluate_model(run))


@torch.no_grad()
def evaluate_model(run: _Run) -> dict:
    """The finished run's metrics (as `dspt.loop.evaluate` for CoOp) from its learner's own predictions."""
    p = run.p
    test = image_features(run, "test")
    test_logits = _logits(run, test)
    train_pred = _logits(run, image_features(run, "train")).argmax(-1).cpu().numpy()
    val_pred = _logits(run, image_features(run, "val")).argmax(-1).cpu().numpy() if p.val is not None else None
    out = evaluation(p, test_logits.argmax(-1).cpu().numpy(), train_pred, val_pred, run.zs_pred)
    anchor = torch.nn.functional.normalize(p.train_feats[0].float().mean(0, keepdim=True), dim=-1)
    drift = float((_parameters(run) - run.ctx0).norm() / max(run.ctx0.norm().item(), 1e-12))
    confidence = float(test_logits.float().softmax(-1).max(-1).values.mean()) if len(test_logits) else float("nan")
    return out | {"text_cosine": {"init": run.init_cos, "final": mean_pairwise_cosine(run.model.class_features(anchor))},
                  "test_confidence": confidence, "ctx_drift": drift, "learner": run.cfg.learner}
