"""The training loop of a learner with its own module (CoCoOp, VPT, MaPLe, PromptSRC): one run at a time.

CoOp's loop (`dspt.loop._fit`) trains many runs' contexts as one batched parameter on cached features. The
learners here own several parameter tensors, and the image-side ones run the image tower on every step's images
(loaded and augmented per step, as CoOp's own trainer does; the draws are the reference path's, seeded per
epoch), so each run trains alone, with torch's SGD over its modules' parameters (a method's learners are
copies of the learner, each with its own initialisation; the method sees their own predictions on the training
images as each epoch begins). Everything else is CoOp's loop:
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
from .learner_models import TunedModel
from .loop import (_diagnostics, _diverged, _end_epoch, _fail, _finish, _parameters, _Run, _step_plan,
                   epoch_generator, evaluation, grad_scaler, lr_at, method_generator, model_vector, optimizer_step,
                   set_model_vector)
from .methods import EpochView, Method
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
def image_features(run: _Run, split: str, model: TunedModel | None = None) -> torch.Tensor:
    """[N, E] features of a split's images (view 0: the test transform) under a learner (default: the run's):
    the cached ones for a learner that keeps the frozen image tower, else its own prompted tower over every image.
    The training images' features are remembered with the parameters they came from: the end of one epoch and
    the start of the next (a method's view) see the same parameters, and encode once."""
    p, model = run.p, model or run.model
    if model.image_input == "features":
        return {"train": p.train_feats[0], "test": p.test_feats, "val": p.val_feats}[split]
    if split == "train":
        vector = model_vector(model).detach()
        memo = getattr(model, "_train_features", None)
        if memo is not None and torch.equal(memo[0], vector):
            return memo[1]
        feats = _encode(run, split, model)
        model._train_features = (vector, feats)
        return feats
    return _encode(run, split, model)


def _encode(run: _Run, split: str, model: TunedModel) -> torch.Tensor:
    p = run.p
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
def _logits(model: TunedModel, feats: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    return torch.cat([model.classify(feats[i:i + chunk]) for i in range(0, len(feats), chunk)]) \
        if len(feats) else torch.empty(0, model.num_classes, device=feats.device)


def _anchor(run: _Run) -> torch.Tensor:
    """The mean training image (view 0), normalised: where CoCoOp's class features are read."""
    return torch.nn.functional.normalize(run.p.train_feats[0].float().mean(0, keepdim=True), dim=-1)


@torch.no_grad()
def _epoch_view(run: _Run, epoch: int, gen: torch.Generator) -> EpochView:
    """What the run's method sees as the epoch begins: every learner's logits of the training images (view 0),
    learner 0's image features and every learner's class features."""
    p = run.p
    feats = [image_features(run, "train", m) for m in run.models]
    logits = torch.stack([_logits(m, f) for m, f in zip(run.models, feats)]).float()
    text = torch.stack([m.class_features(_anchor(run)) for m in run.models]).float()
    return EpochView(epoch=epoch, epochs=run.cfg.epochs, logits=logits, image_features=feats[0].float(),
                     text_features=text, given=torch.as_tensor(p.labels.given, device=logits.device),
                     logit_scale=float(p.backbone.logit_scale), gen=gen, is_noisy=p.labels.is_noisy)


def fit_model(run: _Run) -> None:
    """Train one run of a learner with its own module from its start epoch to the end, then finish it."""
    try:
        _fit_model(run)
    except BaseException as exc:  # noqa: BLE001 - the run fails alone (a kill is re-raised by _fail)
        _fail(run, exc)


def _fit_model(run: _Run) -> None:
    p, cfg, models, method = run.p, run.cfg, run.models, run.method
    dev = p.backbone.device
    params = [list(m.trainable().values()) for m in models]
    opt = torch.optim.SGD([q for ps in params for q in ps], lr=run.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    scaler = grad_scaler(p.backbone)
    ckpt = run.checkpoint
    if ckpt is not None:
        if cfg.momentum:
            for j, ps in enumerate(params):
                saved = ckpt["momentum"] if j == 0 else ckpt["extra"].get(f"momentum_{j}")
                if saved is not None:
                    _load_momentum(opt, ps, saved)
        torch.set_rng_state(ckpt["torch_rng"])
        if ckpt["cuda_rng"] is not None and dev.type == "cuda":
            torch.cuda.set_rng_state_all(list(ckpt["cuda_rng"]))
        if ckpt["scaler"] and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])

    def snapshot() -> dict[str, torch.Tensor]:
        state = {}
        for j, (m, ps) in enumerate(zip(models, params)):
            state[f"ctx_{j}"], state[f"momentum_{j}"] = model_vector(m).detach().clone(), _momentum(opt, ps).clone()
        return state

    def restore(state: dict[str, torch.Tensor]) -> None:
        for j, (m, ps) in enumerate(zip(models, params)):
            set_model_vector(m, state[f"ctx_{j}"])
            if cfg.momentum:
                _load_momentum(opt, ps, state[f"momentum_{j}"])

    if cfg.collapse_guard:
        run.healthy = snapshot()
    # PromptSRC: the final prompt is a weighted average of the epochs' prompts (its running sum is checkpointed)
    weights = run.model.aggregate_weights(cfg.epochs)
    average = None
    if weights is not None:
        average = [ckpt["extra"][f"gpa_{j}"].to(dev) if ckpt is not None and f"gpa_{j}" in ckpt["extra"]
                   else torch.zeros_like(model_vector(m)) for j, m in enumerate(models)]
    plain = type(method) is Method
    pixels = _ReferenceBatches(p) if run.model.image_input == "pixels" else None
    given = torch.as_tensor(p.labels.given, device=dev)
    n, views = len(p.train), p.train_feats.shape[0] - 1
    kind, steps = _step_plan(n, cfg.batch_size)
    steps = steps if kind == "steps" else 1
    for m in models:
        m.train()
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
        mgen = method_generator(p.seeds["epochs"], epoch)
        if not plain:
            method.begin_epoch(_epoch_view(run, epoch, mgen))
        losses: list[float] = []
        for s in range(steps):
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size] if kind == "steps" else order
            x = pixels.pixels(idx, gen) if pixels is not None else p.train_feats[view[idx].to(dev), idx.to(dev)]
            x, y = x.to(dev), given[idx.to(dev)]
            if plain:
                loss = run.loss_fn(run.model.logits(x), y)
                used = [run.model]
            else:
                x = method.inputs(x, idx, mgen)
                loss = method.loss(torch.stack([m.logits(x) for m in models]), idx.to(dev), y)
                used = models
            for m in used:  # a learner's own regularisation of this step (PromptSRC)
                extra_term = m.penalty()
                loss = loss if extra_term is None else loss + extra_term
            if not torch.isfinite(loss):
                raise _diverged(f"non-finite loss ({loss.item()}) at epoch {epoch + 1} step {s + 1}", cfg,
                                run.run_dir, run.last_saved)
            losses.append(loss.item())
            optimizer_step(loss, opt, scaler)
        train_logits = _logits(run.model, image_features(run, "train"))
        extra = {}
        for j in range(1, len(models)):
            extra[f"ctx_{j}"], extra[f"momentum_{j}"] = model_vector(models[j]), _momentum(opt, params[j])
        if average is not None:
            for j, m in enumerate(models):
                average[j] = average[j] + weights[epoch] * model_vector(m).detach()
                extra[f"gpa_{j}"] = average[j]
        _end_epoch(run, epoch, _parameters(run), _momentum(opt, params[0]),
                   _diagnostics(p, train_logits, {}, run.loss_fn), losses, scaler, t_epoch, extra, snapshot, restore)
        bar.set_postfix(loss=f"{np.mean(losses):.4f}")
    bar.close()
    for m in models:
        m.eval()
    if average is not None:  # the aggregate is the run's prompt from here on (evaluated, saved)
        for m, vector in zip(models, average):
            set_model_vector(m, vector)
    train_seconds = time.perf_counter() - t_train
    _finish(run, train_seconds, 1, None, evaluate_model(run))


@torch.no_grad()
def evaluate_model(run: _Run) -> dict:
    """The finished run's metrics (as `dspt.loop.evaluate` for CoOp) from its learner's own predictions."""
    p = run.p
    model = run.model
    test_logits = _logits(model, image_features(run, "test"))
    train_pred = _logits(model, image_features(run, "train")).argmax(-1).cpu().numpy()
    val_pred = _logits(model, image_features(run, "val")).argmax(-1).cpu().numpy() if p.val is not None else None
    out = evaluation(p, test_logits.argmax(-1).cpu().numpy(), train_pred, val_pred, run.zs_pred)
    anchor = _anchor(run)
    drift = float((_parameters(run) - run.ctx0).norm() / max(run.ctx0.norm().item(), 1e-12))
    confidence = float(test_logits.float().softmax(-1).max(-1).values.mean()) if len(test_logits) else float("nan")
    final_cos = mean_pairwise_cosine(run.model.class_features(anchor))
    return out | {"text_cosine": {"init": run.init_cos, "final": final_cos},
                  "test_confidence": confidence, "ctx_drift": drift, "learner": run.cfg.learner}
