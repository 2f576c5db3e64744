"""The training loop: prompt tuning on cached image features, with checkpoint/resume and evaluation.

Data flows one way: dataset -> noise -> feature cache -> training -> metrics -> run directory + results row.
Every source of randomness is derived from the run seed and the epoch, so a run killed at any point and
resumed from its last checkpoint ends with exactly the numbers of an uninterrupted run (on the CPU).
"""
from __future__ import annotations

import json
import logging
import math
import platform
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import __version__
from .backbone import Backbone, load_backbone
from .config import ConfigError, RunConfig
from .data import DataSplits, ImageDataset, find_bad_images, load_data
from .features import cached_features
from .io import (LockBusy, append_jsonl, atomic_write, atomic_write_json, atomic_write_text, process_lock, read_json,
                 read_jsonl)
from .losses import get_loss
from .metrics import accuracy, logit_gradient_norms, memorisation, per_class_accuracy, predict
from .noise import NoisyLabels, make_noisy_labels
from .prompt import PromptClassifier, PromptLearner, context_drift, mean_pairwise_cosine
from .results import append_result, read_results
from .errors import TrainingError

log = logging.getLogger(__name__)




def lr_at(cfg: RunConfig, epoch: int) -> float:
    """CoOp/Dassl: `warmup_epochs` at a constant `warmup_lr`, then cosine from `lr` over `epochs`."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / cfg.epochs))


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, 7]).generate_state(1)[0]))


def versions(device: torch.device) -> dict[str, str]:
    import open_clip

    info = {"dspt": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "numpy": np.__version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


@dataclass
class Prepared:
    """Everything training needs, built once from the config."""

    cfg: RunConfig
    backbone: Backbone
    train: ImageDataset
    test: ImageDataset
    labels: NoisyLabels
    train_feats: torch.Tensor  # [V+1, N, E] on the device
    test_feats: torch.Tensor  # [N_test, E] on the device
    cache: dict[str, Any]
    val: ImageDataset | None = None
    val_feats: torch.Tensor | None = None  # [N_val, E] on the device
    val_given: np.ndarray | None = None  # validation labels as a user would have them (noisy for sym/pair)


def _drop_bad(ds: ImageDataset, skip: bool, what: str) -> tuple[ImageDataset, int]:
    if not skip:
        return ds, 0
    bad = set(find_bad_images(ds.paths))
    if bad:
        log.warning("skipping %d unreadable %s image(s), e.g. %s", len(bad), what, next(iter(bad)))
    return ds.subset([i for i, p in enumerate(ds.paths) if p not in bad]), len(bad)


def load_splits(cfg: RunConfig) -> DataSplits:
    return load_data(cfg.dataset, root=cfg.data if cfg.data is not None else cfg.root, test_root=cfg.test_data,
                     test_fraction=cfg.test_fraction, seed=cfg.seed, classnames=cfg.classnames,
                     cache_dir=cfg.cache_dir, download=cfg.download)


def prepare(cfg: RunConfig, run_dir: Path | None = None) -> Prepared:
    """Data, few-shot subset, noisy labels, backbone and cached features for one run."""
    from .data import select_training

    splits = load_splits(cfg)
    train, skipped_train = _drop_bad(splits.train, cfg.skip_bad_images, "training")
    test, skipped_test = _drop_bad(splits.test, cfg.skip_bad_images, "test")
    # K-shot subset (symflip/pairflip pick false positives into it; `given` samples by the shipped labels)
    sel = select_training(train, cfg.shots, cfg.seed, cfg.noise, fp=cfg.fp or 0, noise_file=cfg.noise_file,
                          label_set=cfg.label_set, cache_dir=cfg.cache_dir)
    train, idx = sel.train, sel.indices
    labels = make_noisy_labels(train.labels, train.num_classes, cfg.noise, cfg.noise_rate, cfg.seed,
                               **({} if sel.given is None else {"given": sel.given}))
    if sel.info.get("clean_labels_known") is False:
        log.warning("%s ships no clean labels: the realised noise rate cannot be measured (reported as 0)%s",
                    train.name, f"; its verified subset has {sel.info['verified_noise_rate']:.1%} wrong labels"
                    if sel.info.get("verified_noise_rate") is not None else "")
    if run_dir is not None:
        atomic_write_text(run_dir / "train_files.csv", "index,path,true,given\n" + "".join(
            f"{i},{p},{t},{g}\n" for i, p, t, g in zip(idx.tolist(), train.paths, labels.true, labels.given)))
        labels.save(run_dir / "noisy_labels.csv")
        atomic_write_json(run_dir / "dataset.json", sel.info | {"skipped_images": skipped_train + skipped_test})

    backbone = load_backbone(cfg.model, cfg.pretrained, cfg.checkpoint, cfg.device, cfg.precision)
    backbone.crop_scale, backbone.hflip = cfg.crop_scale, cfg.hflip
    views = cfg.views if cfg.path == "fast" else 0
    t0 = time.perf_counter()
    tr = cached_features(backbone, train, "train", views, cfg.seed, cfg.cache_dir, workers=cfg.workers)
    te = cached_features(backbone, test, "test", 0, cfg.seed, cfg.cache_dir, workers=cfg.workers)
    cache = {"train_hit": tr.hit, "test_hit": te.hit, "seconds": time.perf_counter() - t0,
             "train_file": str(tr.path), "test_file": str(te.path),
             "skipped_images": skipped_train + skipped_test}
    p = Prepared(cfg, backbone, train, test, labels, tr.features.to(backbone.device),
                 te.features[0].to(backbone.device), cache)
    if splits.val is not None and len(splits.val):
        # Hyperparameters are chosen on validation data, never on test. A user's validation labels are as
        # noisy as the training labels, so label-flip protocols corrupt them too (same rate, same seed).
        p.val, _ = _drop_bad(splits.val, cfg.skip_bad_images, "validation")
        va = cached_features(backbone, p.val, "val", 0, cfg.seed, cfg.cache_dir, workers=cfg.workers)
        p.val_feats = va.features[0].to(backbone.device)
        val_labels = make_noisy_labels(p.val.labels, p.val.num_classes, cfg.noise if cfg.noise in VAL_NOISE
                                       else "none", cfg.noise_rate if cfg.noise in VAL_NOISE else 0.0, cfg.seed)
        p.val_given = val_labels.given
        if run_dir is not None:
            val_labels.save(run_dir / "val_noisy_labels.csv")
    return p


#: Protocols that flip labels independently of the sampling, so they apply to validation labels as well.
VAL_NOISE = ("sym", "pair")


def zeroshot_text_features(backbone: Backbone, classnames: list[str], template: str) -> torch.Tensor:
    return backbone.encode_texts([template.format(c.replace("_", " ")) for c in classnames])


class _ReferenceBatches:
    """CoOp's computation, kept for side-by-side measurement: every step loads its images, augments them
    (the backbone's train transform: CoOp's random-resized-crop + flip) and encodes them through the frozen
    image tower in fp32, whatever the run's precision; nothing is cached.

    Decoding and resizing run on a thread pool, as CoOp's DataLoader workers would, so the reference is not
    slowed by serial image loading. The random draws stay on the calling thread, per image from the step's
    seed, in the order the transform itself draws them: the numbers equal
    `encode_paths(..., train_transform, seed=step_seed)` and do not depend on the thread count.
    """

    def __init__(self, p: Prepared):
        import os
        from concurrent.futures import ThreadPoolExecutor

        from torchvision import transforms as T

        self.p = p
        steps = p.backbone.train_transform().transforms
        if not (isinstance(steps[0], T.RandomResizedCrop) and isinstance(steps[1], T.RandomHorizontalFlip)):
            raise TypeError("the reference path expects the train transform to start with RandomResizedCrop "
                            "and RandomHorizontalFlip")
        self.crop, self.flip, self.rest = steps[0], steps[1], T.Compose(steps[2:])
        self.pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))

    def _augment(self, image, crop: tuple[int, int, int, int], flip: bool) -> torch.Tensor:
        from torchvision.transforms import functional as TF

        image = TF.resized_crop(image, *crop, self.crop.size, self.crop.interpolation, antialias=self.crop.antialias)
        return self.rest(TF.hflip(image) if flip else image)

    def __call__(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        from .data.base import load_image
        from .features import view_seed

        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        images = list(self.pool.map(load_image, [self.p.train.paths[i] for i in idx.tolist()]))
        draws = []
        with torch.random.fork_rng(devices=[]):  # per-image seeding must not disturb the caller's RNG
            for k, image in enumerate(images):
                torch.manual_seed(view_seed(seed, 0, k))
                crop = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
                draws.append((crop, bool(torch.rand(1) < self.flip.p)))
        batch = torch.stack(list(self.pool.map(self._augment, images, *zip(*draws))))
        model, device = self.p.backbone.model, self.p.backbone.device
        with torch.no_grad():
            feats = model.encode_image(batch.to(device, non_blocking=True))
        return torch.nn.functional.normalize(feats.float(), dim=-1)


def _check_run_dir(cfg: RunConfig, run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"output '{run_dir}' is a file, not a run folder; choose another --output")
    existing = run_dir / "config.yaml"
    if not existing.is_file():
        return
    try:
        old = RunConfig.load(existing)
    except Exception:
        raise TrainingError(f"'{existing}' is not a dspt run config; choose another --output") from None
    if old.identity() != cfg.identity():
        diff = sorted(k for k, v in cfg.identity().items() if old.identity().get(k) != v)
        raise TrainingError(f"output folder '{run_dir}' holds a different run (differs in {', '.join(diff[:6])}); "
                            "choose another --output or delete that folder")


def _save_checkpoint(run_dir: Path, learner: PromptLearner, opt: torch.optim.Optimizer, epoch: int) -> None:
    state = {"epoch": epoch, "ctx": learner.ctx.detach().cpu(), "optimizer": opt.state_dict(),
             "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(), "python_rng": random.getstate()}
    if torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    atomic_write(run_dir / "checkpoint.pt", lambda tmp: torch.save(state, tmp))


def _load_checkpoint(run_dir: Path) -> dict | None:
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        log.warning("checkpoint %s unreadable (%s); starting from epoch 0", path, type(exc).__name__)
        return None
    if not isinstance(state, dict) or not {"epoch", "ctx", "optimizer", "torch_rng"} <= state.keys():
        log.warning("checkpoint %s is not a dspt training checkpoint; starting from epoch 0", path)
        return None
    return state


def run_lock_path(run_dir: Path) -> Path:
    """The lock beside a run folder (not inside it: a failed fresh run leaves no folder behind)."""
    run_dir = Path(run_dir).resolve()
    return run_dir.parent / f".{run_dir.name}.lock"


def _finished(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """A finished run's metrics; its results row is re-added if a kill came between metrics.json and the row."""
    log.debug("run %s is already complete; returning its metrics", run_dir)
    metrics = read_json(run_dir / "metrics.json")
    table = read_results(cfg.results)
    if table.empty or "run_id" not in table or str(run_dir.resolve()) not in set(table["run_id"].astype(str)):
        append_result(cfg.results, result_row(cfg, metrics, run_dir))
    return metrics


def _diverged(what: str, cfg: RunConfig, run_dir: Path, last_saved: int) -> TrainingError:
    kept = (f"the last good checkpoint (epoch {last_saved + 1}) is kept in {run_dir} and no metrics were written"
            if last_saved >= 0 else "no epoch had finished, so nothing was kept")
    return TrainingError(f"{what}; lower --lr (now {cfg.lr:g}) and use a new --output; {kept}")


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume, or return the finished result of) one configuration; returns its metrics.

    One process at a time per run folder (a lock file beside it). A folder that this call created is removed
    again when the run fails before its first checkpoint, so a bad input leaves nothing behind that a later
    run would trip over or mistake for a result; metrics.json is written last and marks a finished run.
    """
    cfg = cfg.resolved()
    run_dir = Path(cfg.output)
    _check_run_dir(cfg, run_dir)
    if (run_dir / "metrics.json").is_file():
        log.info("run %s is already complete; returning its metrics", run_dir)
        return _finished(cfg, run_dir)
    try:
        with process_lock(run_lock_path(run_dir)):
            _check_run_dir(cfg, run_dir)  # another process may have started or finished it meanwhile
            if (run_dir / "metrics.json").is_file():
                return _finished(cfg, run_dir)
            created = not run_dir.exists()
            run_dir.mkdir(parents=True, exist_ok=True)
            try:
                return _train_in(cfg, run_dir)
            except BaseException:
                if created and not (run_dir / "checkpoint.pt").is_file():
                    shutil.rmtree(run_dir, ignore_errors=True)
                raise
    except LockBusy as exc:
        raise TrainingError(f"run folder '{run_dir}' is in use by another dspt process (pid {exc.holder}); "
                            "wait for it to finish or stop it") from None


def _train_in(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    p = prepare(cfg, run_dir)
    atomic_write_text(run_dir / "config.yaml", cfg.dump())  # after the inputs checked out
    dev = p.backbone.device
    atomic_write_json(run_dir / "environment.json", versions(dev))
    given = torch.as_tensor(p.labels.given, device=dev)
    n, c = len(p.train), p.train.num_classes
    loss_fn = get_loss(cfg.loss, **cfg.loss_options)

    zs_text = zeroshot_text_features(p.backbone, p.train.classnames, cfg.template)
    zs_pred = predict(p.test_feats, zs_text)
    learner = PromptLearner(p.backbone, p.train.classnames, cfg.n_ctx, cfg.ctx_init, cfg.csc,
                            cfg.class_token_position, seed=cfg.seed)
    fast = cfg.path == "fast"  # reference: CoOp's text side too (all context tokens per prompt, fp32)
    clf = PromptClassifier(p.backbone, learner, truncate=fast, share_prefix=fast, mixed_precision=fast)
    ctx0 = learner.ctx.detach().clone()
    with torch.no_grad():
        init_cos = mean_pairwise_cosine(clf.text_features())
    opt = torch.optim.SGD([learner.ctx], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    start = 0
    ckpt = _load_checkpoint(run_dir)
    log_path = run_dir / "log.jsonl"
    if ckpt is not None and tuple(ckpt.get("ctx", torch.empty(0)).shape) != tuple(learner.ctx.shape):
        log.warning("checkpoint in %s does not fit this prompt (shape %s); starting from epoch 0", run_dir,
                    tuple(ckpt.get("ctx", torch.empty(0)).shape))
        ckpt = None
    if ckpt is not None:
        with torch.no_grad():
            learner.ctx.copy_(ckpt["ctx"].to(dev))
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        if "numpy_rng" in ckpt:
            np.random.set_state(ckpt["numpy_rng"])
            random.setstate(ckpt["python_rng"])
        if "cuda_rng" in ckpt and dev.type == "cuda":
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        start = ckpt["epoch"] + 1
        log.info("resuming %s at epoch %d/%d", run_dir, start + 1, cfg.epochs)
    last_saved = start - 1  # epoch of the newest checkpoint on disk (-1: none)
    # Epochs after the checkpoint are recomputed; drop their log lines so each epoch is logged once.
    if log_path.is_file():
        kept = [r for r in read_jsonl(log_path) if r.get("event") != "epoch" or r["epoch"] < start]
        atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in kept))
    append_jsonl(log_path, {"event": "start", "epoch": start, "cache": p.cache, "n_train": n, "classes": c,
                            "noise": p.labels.summary()})

    reference = _ReferenceBatches(p) if cfg.path == "reference" else None
    views = p.train_feats.shape[0] - 1
    drop_last = n >= cfg.batch_size
    t_train = time.perf_counter()
    bar = tqdm(range(start, cfg.epochs), desc=f"{cfg.loss} {cfg.noise}{cfg.noise_rate:g}", disable=not cfg.progress,
               initial=start, total=cfg.epochs, leave=False)
    for epoch in bar:
        t_epoch = time.perf_counter()
        lr = lr_at(cfg, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        gen = epoch_generator(cfg.seed, epoch)
        perm = torch.randperm(n, generator=gen)
        view = torch.randint(1, views + 1, (n,), generator=gen) if views > 0 else torch.zeros(n, dtype=torch.long)
        steps = n // cfg.batch_size if drop_last else 1
        losses = []
        for s in range(steps):
            idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size] if drop_last else perm
            if reference is not None:
                feats = reference(idx, gen)
            else:
                feats = p.train_feats[view[idx].to(dev), idx.to(dev)]
            logits = clf.logits(feats)
            loss = loss_fn(logits, given[idx.to(dev)])
            if not torch.isfinite(loss):
                raise _diverged(f"non-finite loss ({loss.item()}) at epoch {epoch + 1} step {s + 1}", cfg, run_dir,
                                last_saved)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if not torch.isfinite(learner.ctx).all():
            raise _diverged(f"non-finite prompt parameters after epoch {epoch + 1}", cfg, run_dir, last_saved)
        record = {"event": "epoch", "epoch": epoch, "lr": lr, "loss": float(np.mean(losses)),
                  "seconds": time.perf_counter() - t_epoch}
        record.update(_epoch_diagnostics(p, clf, loss_fn))
        append_jsonl(log_path, record)
        _save_checkpoint(run_dir, learner, opt, epoch)
        last_saved = epoch
        bar.set_postfix(loss=f"{record['loss']:.4f}", test=f"{record['test_acc']:.1f}")
    bar.close()
    train_seconds = time.perf_counter() - t_train

    metrics = evaluate(p, clf, zs_pred, ctx0, init_cos)
    metrics["seconds"] = {"cache": p.cache["seconds"], "train": train_seconds}
    metrics["cache_hit"] = {"train": p.cache["train_hit"], "test": p.cache["test_hit"]}
    epochs_log = [r for r in read_jsonl(log_path) if r.get("event") == "epoch"]
    metrics["final_loss"] = epochs_log[-1]["loss"] if epochs_log else float("nan")
    metrics["first_loss"] = epochs_log[0]["loss"] if epochs_log else float("nan")
    save_prompt(run_dir, learner, cfg)
    atomic_write_json(run_dir / "metrics.json", metrics)  # written last: its presence marks a finished run
    append_result(cfg.results, result_row(cfg, metrics, run_dir))
    append_jsonl(log_path, {"event": "done", "test_acc": metrics["test_acc"]})
    return metrics


@torch.no_grad()
def _epoch_diagnostics(p: Prepared, clf: PromptClassifier, loss_fn: torch.nn.Module) -> dict[str, float]:
    """Cheap per-epoch curves: test accuracy, training fit to the given labels, and the mean per-sample
    logit-gradient norm of clean vs mislabeled samples (logging only; nothing is selected on them)."""
    text = clf.text_features()
    test_acc = accuracy(predict(p.test_feats, text), p.test.labels)
    train0 = p.train_feats[0]
    logits = p.backbone.logit_scale * train0 @ text.t()
    given = torch.as_tensor(p.labels.given, device=logits.device)
    with torch.enable_grad():
        norms = logit_gradient_norms(logits, given, loss_fn).cpu().numpy()
    noisy = p.labels.is_noisy
    out = {"test_acc": test_acc, "train_acc_given": accuracy(logits.argmax(-1).cpu().numpy(), p.labels.given),
           "grad_norm_clean": float(norms[~noisy].mean()) if (~noisy).any() else float("nan"),
           "grad_norm_noisy": float(norms[noisy].mean()) if noisy.any() else float("nan")}
    return out


@torch.no_grad()
def evaluate(p: Prepared, clf: PromptClassifier, zs_pred: np.ndarray, ctx0: torch.Tensor,
             init_cos: float) -> dict[str, Any]:
    text = clf.text_features()
    pred = predict(p.test_feats, text)
    train_pred = predict(p.train_feats[0], text)
    zs = accuracy(zs_pred, p.test.labels)
    test_acc = accuracy(pred, p.test.labels)
    val_pred = predict(p.val_feats, text) if p.val_feats is not None else None
    return {
        "test_acc": test_acc,
        "val_acc_given": accuracy(val_pred, p.val_given) if val_pred is not None else float("nan"),
        "val_acc": accuracy(val_pred, p.val.labels) if val_pred is not None else float("nan"),
        "zeroshot_acc": zs,
        "gain_over_zeroshot": test_acc - zs,
        "per_class_acc": per_class_accuracy(pred, p.test.labels, p.test.classnames),
        "train": memorisation(train_pred, p.labels.given, p.labels.true),
        "noise": p.labels.summary(),
        "text_cosine": {"init": init_cos, "final": mean_pairwise_cosine(text)},
        "ctx_drift": context_drift(clf.learner.ctx.detach(), ctx0),
        "logit_scale": float(p.backbone.logit_scale),
        "n_train": len(p.train),
        "n_test": len(p.test),
        "classes": p.train.num_classes,
    }


def result_row(cfg: RunConfig, metrics: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    return {
        "run_id": str(run_dir.resolve()), "dataset": Path(cfg.data).name if cfg.data else cfg.dataset,
        "model": cfg.model, "weights": cfg.checkpoint or cfg.pretrained or "random", "loss": cfg.loss,
        "noise": cfg.noise, "noise_rate": cfg.noise_rate, "realised_rate": metrics["noise"]["realised_rate"],
        "shots": cfg.shots, "seed": cfg.seed, "epochs": cfg.epochs, "lr": cfg.lr, "path": cfg.path,
        "test_acc": metrics["test_acc"], "val_acc_given": metrics.get("val_acc_given", float("nan")),
        "val_acc": metrics.get("val_acc", float("nan")), "zeroshot_acc": metrics["zeroshot_acc"],
        "gain_over_zeroshot": metrics["gain_over_zeroshot"], "memorised": metrics["train"]["memorised"],
        "corrected": metrics["train"]["corrected"], "clean_fit": metrics["train"]["clean_fit"],
        "text_cosine": metrics["text_cosine"]["final"], "ctx_drift": metrics["ctx_drift"],
        "train_seconds": metrics["seconds"]["train"],
    }


def save_prompt(run_dir: Path, learner: PromptLearner, cfg: RunConfig) -> None:
    meta = learner.meta() | {"model": cfg.model, "pretrained": cfg.pretrained, "checkpoint": cfg.checkpoint,
                             "template": cfg.template}
    atomic_write(run_dir / "prompt.safetensors",
                 lambda tmp: save_file({"ctx": learner.ctx.detach().cpu().contiguous()}, tmp,
                                       metadata={"meta": json.dumps(meta)}))


def load_prompt(run_dir: str | Path, backbone: Backbone | None = None,
                device: str | None = "cpu") -> PromptClassifier:
    """Rebuild the classifier of a finished run (the backbone is loaded from the run's config if not given)."""
    from safetensors import safe_open

    path = Path(run_dir) / "prompt.safetensors"
    if not path.is_file():
        raise ConfigError(f"'{run_dir}' holds no learned prompt (prompt.safetensors); pass a finished run folder")
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads((fh.metadata() or {})["meta"])
    if backbone is None:
        backbone = load_backbone(meta["model"], meta["pretrained"], meta["checkpoint"], device)
    learner = PromptLearner(backbone, meta["classnames"], meta["n_ctx"], meta["ctx_init"], meta["csc"],
                            meta["class_token_position"])
    with torch.no_grad():
        learner.ctx.copy_(load_file(str(path))["ctx"].to(learner.ctx.device))
    return PromptClassifier(backbone, learner)


def zeroshot(cfg: RunConfig) -> dict[str, Any]:
    """Zero-shot accuracy of `cfg.template` on the test split (the reference line of every table)."""
    cfg = cfg.resolved()
    splits = load_splits(cfg)
    backbone = load_backbone(cfg.model, cfg.pretrained, cfg.checkpoint, cfg.device, cfg.precision)
    te = cached_features(backbone, splits.test, "test", 0, cfg.seed, cfg.cache_dir, workers=cfg.workers)
    text = zeroshot_text_features(backbone, splits.classnames, cfg.template)
    pred = predict(te.features[0].to(backbone.device), text)
    return {"zeroshot_acc": accuracy(pred, splits.test.labels),
            "per_class_acc": per_class_accuracy(pred, splits.test.labels, splits.classnames),
            "n_test": len(splits.test), "template": cfg.template, "cache_hit": te.hit}
