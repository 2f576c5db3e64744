"""The training loop: prompt tuning on cached image features, with checkpoint/resume and evaluation.

Data flows one way: dataset -> noise -> feature cache -> training -> metrics -> run directory + results row.
Every source of randomness is derived from the run seed (`dspt.seeds`: one independent stream each for the
shots, the noise, the validation subset and its noise, the context init, the augmented views and the
epochs), so a run killed at any point and resumed from its last checkpoint ends with exactly the numbers of
an uninterrupted run (on the CPU).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .version import __version__
from .backbone import Backbone, file_sha256, load_backbone
from .collapse import CollapseTracker, epoch_record, warning_line
from .config import RunConfig
from .data import (FP_PROTOCOLS, DataSplits, ImageDataset, false_positive_shots, few_shot_indices,
                   find_bad_images, load_data, select_training)
from .errors import BackboneError, ConfigError, TrainingError
from .features import cached_features
from .io import (LockBusy, append_jsonl, atomic_write, atomic_write_json, atomic_write_text, process_lock, read_json,
                 read_jsonl)
from .losses import get_loss, matched_lr
from .methods import EpochView, Method, get_method
from .metrics import accuracy, logit_gradient_norms, mean_confidence, memorisation, per_class_accuracy, predict
from .noise import NoisyLabels, make_noisy_labels
from .numbers import round_half_up
from .optim import RunwiseSGD
from .prompt import (PromptBatch, PromptClassifier, PromptLearner, check_prompt_tunable, context_drift,
                     mean_pairwise_cosine)
from .results import append_result
from .rundir import (INPUTS, check_run_dir, finished_metrics, has_checkpoint, is_finished, load_checkpoint,
                     result_row, run_lock_path, save_checkpoint, save_inputs)
from .seeds import stream_seeds

log = logging.getLogger(__name__)


def lr_at(cfg: RunConfig, epoch: int, lr: float | None = None) -> float:
    """CoOp/Dassl: `warmup_epochs` at a constant `warmup_lr`, then cosine from the base rate `lr` (default: the
    config's) over `epochs`."""
    base = cfg.lr if lr is None else lr
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    return 0.5 * base * (1.0 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / cfg.epochs))


def resolve_lr(cfg: RunConfig, num_classes: int) -> float:
    """The config's learning rate, or (lr none) the loss's default for this many classes: CoOp's 0.002 scaled
    so the first step is as large as CE's (`dspt.losses.matched_lr`)."""
    return float(cfg.lr) if cfg.lr is not None else matched_lr(cfg.loss, num_classes, **cfg.loss_options)


def csv_text(header: list[str], rows: Any) -> str:
    """A CSV file's text: paths with commas or quotes are quoted, so the file reads back as written."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The epoch's own generator (minibatch order and view choice), so a resumed run redraws nothing."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, 7]).generate_state(1)[0]))


def method_generator(seed: int, epoch: int) -> torch.Generator:
    """The epoch's generator for a method's own draws (mixup, a mixture fit), apart from the loop's."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, 11]).generate_state(1)[0]))


def learner_seed(init_seed: int, j: int) -> int:
    """Init seed of a method's learner j >= 1 (learner 0 has the run's own init seed)."""
    return int(np.random.SeedSequence([init_seed, j]).generate_state(1)[0])


def versions(device: torch.device) -> dict[str, str]:
    """Versions of Python, dspt and every package that decides a run's numbers, and the device."""
    from importlib.metadata import PackageNotFoundError, version

    info = {"dspt": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "device": str(device), "torch": torch.__version__}  # with its build tag (+cu130, +cpu)
    for package in ("torchvision", "open_clip_torch", "numpy", "pillow", "safetensors", "scikit-learn"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = "not installed"
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
    seeds: dict[str, int] = field(default_factory=dict)
    val: ImageDataset | None = None
    val_feats: torch.Tensor | None = None  # [N_val, E] on the device
    val_labels: NoisyLabels | None = None  # validation labels as given (noisy like training, or clean: cfg)
    val_info: dict[str, Any] = field(default_factory=dict)

    @property
    def val_given(self) -> np.ndarray | None:
        return None if self.val_labels is None else self.val_labels.given


def _drop_bad(ds: ImageDataset, skip: bool, what: str) -> tuple[ImageDataset, list[str]]:
    """Evaluation splits are used whole, so every image is checked (training draws check only their shots)."""
    if not skip:
        return ds, []
    bad = set(find_bad_images(ds.paths))
    if bad:
        log.warning("skipping %d unreadable %s image(s), e.g. %s", len(bad), what, next(iter(bad)))
    return ds.subset([i for i, p in enumerate(ds.paths) if p not in bad]), sorted(bad)


def exclude_images(ds: ImageDataset, file: str) -> tuple[ImageDataset, int]:
    """The training pool without the images listed in `file` (one path per line; relative paths are resolved
    against the file's folder; blank lines and lines starting with '#' are ignored), and how many were left out.

    Cross-fitting trains each fold on one shared table minus its held-out images, so the folds can train as one
    batch; a listed path that is not in the pool is named, never silently ignored."""
    listed = Path(file).expanduser()
    try:
        text = listed.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--exclude '{file}' cannot be read ({exc.strerror or exc}); pass a text file with one "
                          "image path per line") from None
    base = listed.resolve().parent
    lines = [ln.strip() for ln in text.splitlines()]
    drop = {os.path.normpath(os.path.join(base, os.path.expanduser(ln)))
            for ln in lines if ln and not ln.startswith("#")}
    pool = [os.path.normpath(os.path.abspath(p)) for p in ds.paths]
    unknown = drop - set(pool)
    if unknown:
        raise ConfigError(f"--exclude '{file}' lists {len(unknown)} image(s) not in the training split, e.g. "
                          f"'{sorted(unknown)[0]}'; list paths exactly as the data names them")
    keep = [i for i, p in enumerate(pool) if p not in drop]
    if not keep:
        raise ConfigError(f"--exclude '{file}' leaves no training image; exclude fewer images")
    return ds.subset(keep), len(ds) - len(keep)


def load_splits(cfg: RunConfig) -> DataSplits:
    """The dataset's splits. A test split carved out of the data uses `split_seed`, never the run seed, so
    every seed of a comparison is tested on the same images."""
    return load_data(cfg.dataset, root=cfg.data if cfg.data is not None else cfg.root, test_root=cfg.test_data,
                     test_fraction=cfg.test_fraction, seed=cfg.split_seed, classnames=cfg.classnames,
                     cache_dir=cfg.cache_dir, download=cfg.download)


def validation_labels(cfg: RunConfig, val: ImageDataset, seeds: dict[str, int], encode: Any = None
                      ) -> tuple[ImageDataset, NoisyLabels, dict[str, Any]]:
    """The validation images and the labels a choice made on them sees.

    By default (`val_labels="noisy"`) they follow the training protocol, so a choice means the same under
    every protocol: sym / pair flip the same share of labels; symflip / pairflip draw false positives into
    K images per class the same way (K = `val_shots`, else the training K, at most half the smallest
    validation class so that enough images are left to be false positives; clean, and said so, where the
    split is too small); `given` uses the labels the data ships for its validation images (clean, and said
    so, where it ships none); `instance` draws them from the validation images' features, `encode(val)` (their
    un-augmented view 0), with the training draw's projection W, i.e. the same annotator (clean, and said so,
    without `encode`). `val_labels="clean"` keeps the true labels. `val_shots` keeps K images per class
    (CoOp's validation subset is min(K, 4)).
    """
    info: dict[str, Any] = {"labels": cfg.val_labels, "shots": cfg.val_shots, "protocol": "none"}
    noisy = cfg.val_labels == "noisy"
    c = val.num_classes
    if noisy and cfg.noise in FP_PROTOCOLS and cfg.noise_rate > 0:
        smallest = int(val.class_counts().min())
        k = cfg.val_shots or min(cfg.shots, smallest // 2)  # room for false positives
        fp = round_half_up(cfg.noise_rate * k)
        if k >= 2 and 0 < fp < k:
            idx, given = false_positive_shots(val.labels, c, k, fp, cfg.noise, seeds["val_shots"], val.classnames)
            val = val.subset(idx)
            labels = make_noisy_labels(val.labels, c, cfg.noise, fp / k, seeds["val_noise"], given=given)
            info.update(protocol=cfg.noise, shots=k, fp=fp)
            if abs(fp / k - cfg.noise_rate) > 1e-9:
                info["why"] = (f"{fp} false positive(s) in {k} validation images per class: {fp / k:.1%}, the "
                               f"nearest to {cfg.noise_rate:.1%} that {k} images allow")
                log.warning("validation labels: %s (more validation images per class, or --val-shots, bring it "
                            "closer)", info["why"])
            return val, labels, info
        why = (f"the smallest validation class has {smallest} image(s), too few to draw {cfg.noise} false "
               "positives into")
        log.warning("validation labels are clean: %s (add validation images, or pass --val-labels clean to "
                    "silence this)", why)
        info.update(labels="clean", why=why)
        noisy = False
    if cfg.val_shots:
        val = val.subset(few_shot_indices(val, cfg.val_shots, seeds["val_shots"]))
    if noisy and cfg.noise in ("sym", "pair"):
        labels = make_noisy_labels(val.labels, c, cfg.noise, cfg.noise_rate, seeds["val_noise"])
        info["protocol"] = cfg.noise
    elif noisy and cfg.noise == "instance" and encode is not None:
        labels = make_noisy_labels(val.labels, c, "instance", cfg.noise_rate, seeds["val_noise"],
                                   features=encode(val), projection_seed=seeds["noise"])
        info["protocol"] = "instance"
    elif noisy and cfg.noise == "given" and val.noisy_labels is not None:
        labels = make_noisy_labels(val.labels, c, "given", 0.0, seeds["val_noise"], given=val.noisy_labels)
        info["protocol"] = "given"
    else:
        if noisy and cfg.noise == "given":
            info.update(labels="clean", why="the data ships no noisy labels for its validation images")
        elif noisy and cfg.noise_rate > 0:
            info.update(labels="clean", why=f"{cfg.noise} noise has no validation counterpart")
        labels = make_noisy_labels(val.labels, c, "none", 0.0, seeds["val_noise"])
    return val, labels, info


def prepare(cfg: RunConfig, run_dir: Path | None = None, backbone: Backbone | None = None,
            splits: DataSplits | None = None) -> Prepared:
    """Data, few-shot subset, noisy labels, backbone and cached features for one run (the backbone and the
    dataset's splits may come from the batch the run trains in, which shares them)."""
    seeds = stream_seeds(cfg.seed)
    splits = load_splits(cfg) if splits is None else splits
    test, bad_test = _drop_bad(splits.test, cfg.skip_bad_images, "test")
    pool, excluded = (splits.train, 0) if cfg.exclude is None else exclude_images(splits.train, cfg.exclude)
    # K-shot subset (symflip/pairflip pick false positives into it; `given` samples by the shipped labels);
    # with --skip-bad-images only the drawn images are decoded, and a bad one is replaced
    sel = select_training(pool, cfg.shots, seeds["shots"], cfg.noise, fp=cfg.fp or 0,
                          noise_file=cfg.noise_file, label_set=cfg.label_set, cache_dir=cfg.cache_dir,
                          skip_bad=cfg.skip_bad_images)
    train, idx = sel.train, sel.indices
    options: dict[str, Any] = {} if sel.given is None else {"given": sel.given}
    views, tr, encode_val = (cfg.views if cfg.path == "fast" else 0), None, None
    if cfg.noise == "instance":  # the noise depends on the images: encode them before drawing the labels
        if backbone is None:
            backbone = load_backbone(cfg.model, cfg.pretrained, cfg.checkpoint, cfg.device, cfg.precision)
        check_prompt_tunable(backbone)  # before any image is encoded
        backbone.crop_scale, backbone.hflip = cfg.crop_scale, cfg.hflip
        t0 = time.perf_counter()
        tr = cached_features(backbone, train, "train", views, seeds["views"], cfg.cache_dir, workers=cfg.workers)
        options["features"] = tr.features[0]  # view 0: un-augmented, normalised

        def encode_val(ds: ImageDataset) -> torch.Tensor:  # the chosen validation images' view 0
            return cached_features(backbone, ds, "val", 0, seeds["views"], cfg.cache_dir,
                                   workers=cfg.workers).features[0]
    labels = make_noisy_labels(train.labels, train.num_classes, cfg.noise, cfg.noise_rate, seeds["noise"],
                               **options)
    if sel.info.get("clean_labels_known") is False:
        log.warning("%s ships no clean labels: the realised noise rate cannot be measured (reported as 0)%s",
                    train.name, f"; its verified subset has {sel.info['verified_noise_rate']:.1%} wrong labels"
                    if sel.info.get("verified_noise_rate") is not None else "")
    val, val_labels, val_info, bad_val = None, None, {}, []
    if splits.val is not None and len(splits.val):
        # Hyperparameters are chosen on validation data, never on test.
        val, bad_val = _drop_bad(splits.val, cfg.skip_bad_images, "validation")
        val, val_labels, val_info = validation_labels(cfg, val, seeds, encode_val)
        val_info.update(n=len(val), realised_rate=val_labels.realised_rate)
    skipped = {"test": bad_test, "val": bad_val}  # the training draw's are in sel.info
    if run_dir is not None:
        atomic_write_text(run_dir / "train_files.csv", csv_text(["index", "path", "true", "given"], zip(
            idx.tolist(), train.paths, labels.true.tolist(), labels.given.tolist())))
        labels.save(run_dir / "noisy_labels.csv")
        if val_labels is not None:
            val_labels.save(run_dir / "val_noisy_labels.csv")
            atomic_write_text(run_dir / "val_files.csv", csv_text(["path", "true", "given"], zip(
                val.paths, val_labels.true.tolist(), val_labels.given.tolist())))
        atomic_write_json(run_dir / "dataset.json", sel.info | {"excluded_training_images": excluded,
                                                                  "skipped_evaluation_images": skipped,
                                                                  "seeds": seeds, "split_seed": cfg.split_seed,
                                                                  "validation": val_info})

    if backbone is None:
        backbone = load_backbone(cfg.model, cfg.pretrained, cfg.checkpoint, cfg.device, cfg.precision)
    check_prompt_tunable(backbone)  # before any image is encoded
    backbone.crop_scale, backbone.hflip = cfg.crop_scale, cfg.hflip
    if tr is None:  # (instance noise encoded the training images above)
        t0 = time.perf_counter()
        tr = cached_features(backbone, train, "train", views, seeds["views"], cfg.cache_dir, workers=cfg.workers)
    te = cached_features(backbone, test, "test", 0, seeds["views"], cfg.cache_dir, workers=cfg.workers)
    cache = {"train_hit": tr.hit, "test_hit": te.hit, "seconds": time.perf_counter() - t0,
             "store": str(tr.path), "encoded": {"train": tr.encoded, "test": te.encoded},
             "skipped_images": int(sel.info.get("skipped_images", 0)) + len(bad_test) + len(bad_val)}
    p = Prepared(cfg, backbone, train, test, labels, tr.features.to(backbone.device),
                 te.features[0].to(backbone.device), cache, seeds)
    if val is not None:
        va = cached_features(backbone, val, "val", 0, seeds["views"], cfg.cache_dir, workers=cfg.workers)
        p.val, p.val_feats, p.val_labels, p.val_info = val, va.features[0].to(backbone.device), val_labels, val_info
        cache["encoded"]["val"] = va.encoded
    return p


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


def _diverged(what: str, cfg: RunConfig, run_dir: Path, last_saved: int) -> TrainingError:
    kept = (f"the last good checkpoint (epoch {last_saved + 1}) is kept in {run_dir} and no metrics were written"
            if last_saved >= 0 else "no epoch had finished, so nothing was kept")
    return TrainingError(f"{what}; lower --lr (now {cfg.lr:g}) and use a new --output; {kept}")


def needs_loss_scaling(precision: str, device: torch.device) -> bool:
    """fp16 autocast needs loss scaling: DSPT's gradients are small by design (about p_y times CE's), so in
    fp16 they underflow to zero first. bf16 has fp32's range and needs none; on the CPU nothing is cast."""
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


def batch_key(cfg: RunConfig) -> tuple:
    """Resolved runs with equal keys can train as one batch: same backbone (model, weights, precision,
    device), same classes and prompt layout, same minibatch schedule (shots, batch size, epochs) and the
    fast path. Losses, learning rates, momentum, weight decay, noise, seeds and views may differ. fp16 (its
    loss scaler skips a step for every run at once) and the reference path (it encodes images per step)
    train alone: their key is unique to the run."""
    if cfg.precision == "fp16" or cfg.path != "fast":
        return ("alone", str(Path(cfg.output).resolve()))
    return (cfg.model, cfg.pretrained, cfg.checkpoint, cfg.precision, cfg.device, cfg.dataset, cfg.data, cfg.root,
            cfg.test_data, cfg.classnames, cfg.test_fraction, cfg.split_seed, cfg.shots, cfg.batch_size, cfg.epochs,
            cfg.n_ctx, cfg.csc, cfg.class_token_position, cfg.skip_bad_images, cfg.cache_dir, cfg.workers)


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume, or return the finished result of) one configuration; returns its metrics.

    A batch of one: `train_batch([cfg])`, whose error, if any, is raised here.
    """
    status, payload = train_batch([cfg])[0]
    if status != "ok":
        raise payload
    return payload


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


def _fail(run: _Run, exc: BaseException) -> None:
    if not isinstance(exc, Exception):
        raise exc
    run.error = exc


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device` (None where it cannot be told)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


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
            _fit(batch)
        for run in chunk:
            run.p = None  # frees its features before the next batch is prepared


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
    run.learner = PromptLearner(p.backbone, p.train.classnames, cfg.n_ctx, cfg.ctx_init, cfg.csc,
                                cfg.class_token_position, seed=p.seeds["init"])
    if run.learner.n_ctx != cfg.n_ctx:  # the config is resolved with the model's tokenizer: they must agree
        raise TrainingError(f"the prompt has {run.learner.n_ctx} context vectors but the config says {cfg.n_ctx}; "
                            "please report this as a dspt bug")
    run.method = get_method(cfg.method, run.loss_fn, p.train.num_classes, len(p.train), **cfg.method_options)
    run.learners = [run.learner] + [
        PromptLearner(p.backbone, p.train.classnames, cfg.n_ctx, cfg.ctx_init, cfg.csc, cfg.class_token_position,
                      seed=learner_seed(p.seeds["init"], j)) for j in range(1, run.method.learners)]
    run.lr = resolve_lr(cfg, p.train.num_classes)
    atomic_write_text(run_dir / "config.yaml", cfg.dump())  # after the inputs checked out: what runs
    if not (run_dir / INPUTS).is_file():  # the contents of its input files, fixed when the run starts
        save_inputs(cfg, run_dir)
    run.ctx0 = run.learner.ctx.detach().clone()
    with torch.no_grad():
        run.init_cos = mean_pairwise_cosine(_classifier(run).text_features())
    ckpt = load_checkpoint(run_dir)
    if ckpt is not None and tuple(ckpt["ctx"].shape) != tuple(run.learner.ctx.shape):
        log.warning("checkpoint in %s does not fit this prompt (shape %s); starting from epoch 0", run_dir,
                    tuple(ckpt["ctx"].shape))
        ckpt = None
    if ckpt is not None and any(f"ctx_{j}" not in ckpt["extra"] for j in range(1, len(run.learners))):
        log.warning("checkpoint in %s lacks the method's other learners; starting from epoch 0", run_dir)
        ckpt = None
    if ckpt is not None:
        with torch.no_grad():
            run.learner.ctx.copy_(ckpt["ctx"].to(dev))
            for j in range(1, len(run.learners)):
                run.learners[j].ctx.copy_(ckpt["extra"][f"ctx_{j}"].to(dev))
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
                            "method": cfg.method, "lr": run.lr})


def _classifier(run: _Run) -> PromptClassifier:
    """The run's own classifier: what evaluation, `load_prompt` and `dspt predict` use."""
    fast = run.cfg.path == "fast"  # reference: CoOp's text side too (all context tokens per prompt, fp32)
    return PromptClassifier(run.p.backbone, run.learner, truncate=fast, share_prefix=fast, mixed_precision=fast)


#: (run, class) prompt rows per text-tower slice; beyond it the slices are activation-checkpointed
ROW_CHUNK = 4096


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
    model = PromptBatch(p0.backbone, learners, truncate=fast, share_prefix=fast,
                        mixed_precision=fast, row_chunk=ROW_CHUNK if r * p0.train.num_classes > ROW_CHUNK else None)
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
            logits = model.logits(feats)
            total = None
            for k, run in enumerate(batch):
                if run.error is not None:
                    continue
                y = given[k][idx[k].to(dev)]
                if plain[k]:
                    loss = run.loss_fn(logits[slots[k][0]], y)
                else:
                    loss = run.method.loss(logits[slots[k][0]:slots[k][-1] + 1], idx[k].to(dev), y)
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
                _end_epoch(run, epoch, model.ctx[slots[k][0]], opt.buffer[slots[k][0]], text[slots[k][0]],
                           losses[k], scaler, t_epoch, extra, lambda: _prompt_state(model, opt, slots[k]),
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
            _finish(run, train_seconds, len(batch))
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


def _end_epoch(run: _Run, epoch: int, ctx: torch.Tensor, momentum: torch.Tensor, text: torch.Tensor,
               losses: list[float], scaler: torch.amp.GradScaler, t_epoch: float,
               extra: dict[str, torch.Tensor] | None = None, snapshot: Any = None, restore: Any = None) -> None:
    """Log the epoch, watch for a collapse (`dspt.collapse`) and save the run's checkpoint (or fail the run if its
    context is no longer finite). With --collapse-guard, a collapsed epoch puts back the prompt of the last
    healthy one (`restore`; `snapshot` takes a healthy one) and halves the run's rate before the save."""
    if not torch.isfinite(ctx).all():
        raise _diverged(f"non-finite prompt parameters after epoch {epoch + 1}", run.cfg, run.run_dir, run.last_saved)
    record = {"event": "epoch", "epoch": epoch, "lr": lr_at(run.cfg, epoch, run.lr * run.lr_scale),
              "loss": float(np.mean(losses)), "seconds": time.perf_counter() - t_epoch}
    diagnostics, given_prob = _epoch_diagnostics(run.p, text, run.loss_fn)
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


def _finish(run: _Run, train_seconds: float, batch_runs: int = 1) -> None:
    """Evaluate the run's final prompt and write its prompt, metrics (last: they mark it finished) and row.
    `train_seconds` is the wall time of the batch the run trained in, `batch_runs` how many runs it held: the run's
    own training time is its equal share, and the batch's wall time is kept beside it."""
    p, cfg, run_dir = run.p, run.cfg, run.run_dir
    log_path = run_dir / "log.jsonl"
    metrics = evaluate(p, _classifier(run), run.zs_pred, run.ctx0, run.init_cos)
    metrics["seconds"] = {"cache": p.cache["seconds"], "train": train_seconds / batch_runs, "batch": train_seconds}
    metrics["batch_runs"] = batch_runs
    metrics["collapse"] = run.tracker.summary(run.lr_scale)
    metrics["lr"], metrics["method"] = run.lr, cfg.method  # the base rate used (the loss's default when lr none)
    metrics["cache_hit"] = {"train": p.cache["train_hit"], "test": p.cache["test_hit"]}
    metrics["features_encoded"] = p.cache["encoded"]  # image-views this run encoded; the rest came from the cache
    epochs_log = [r for r in read_jsonl(log_path) if r.get("event") == "epoch"]
    metrics["final_loss"] = epochs_log[-1]["loss"] if epochs_log else float("nan")
    metrics["first_loss"] = epochs_log[0]["loss"] if epochs_log else float("nan")
    save_prompt(run_dir, run.learner, cfg, p.backbone)
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
    """Cheap per-epoch curves: test accuracy, training fit to the given labels, and the mean per-sample
    logit-gradient norm and loss of clean vs mislabeled samples (the method's mechanism; logging only,
    nothing is selected on them), and the collapse measurements (`dspt.collapse`: decided on the training
    samples alone, the test and validation spreads only recorded). Also each training image's probability of
    its given label [N] (float64, CPU), whose mean over epochs is the in-sample score of an audit."""
    test_pred = predict(p.test_feats, text)
    test_acc = accuracy(test_pred, p.test.labels)
    train0 = p.train_feats[0]
    logits = p.backbone.logit_scale * train0 @ text.t()
    given = torch.as_tensor(p.labels.given, device=logits.device)
    with torch.enable_grad():
        norms = logit_gradient_norms(logits, given, loss_fn).cpu().numpy()
    losses = loss_fn.per_sample(logits.float(), given).cpu().numpy()
    noisy = p.labels.is_noisy

    def mean(values: np.ndarray, mask: np.ndarray) -> float:
        return float(values[mask].mean()) if mask.any() else float("nan")

    held = {"test": test_pred} | ({"val": predict(p.val_feats, text)} if p.val_feats is not None else {})
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
        "test_confidence": mean_confidence(p.test_feats, text, float(p.backbone.logit_scale)),
        "ctx_drift": context_drift(clf.learner.ctx.detach(), ctx0),
        "logit_scale": float(p.backbone.logit_scale),
        "n_train": len(p.train),
        "n_test": len(p.test),
        "classes": p.train.num_classes,
        "validation": p.val_info,
        "seeds": p.seeds,
    }


def save_prompt(run_dir: Path, learner: PromptLearner, cfg: RunConfig, backbone: Backbone) -> None:
    """The learned context and what rebuilds the classifier around it: model, weights (a checkpoint by
    absolute path and sha256, so `load_prompt` can prove it has the same weights), template, classes."""
    meta = learner.meta() | {"model": cfg.model, "pretrained": cfg.pretrained,
                             "checkpoint": str(Path(cfg.checkpoint).expanduser().resolve()) if cfg.checkpoint else None,
                             "weights_id": backbone.weights_id, "template": cfg.template}
    atomic_write(run_dir / "prompt.safetensors",
                 lambda tmp: save_file({"ctx": learner.ctx.detach().cpu().contiguous()}, tmp,
                                       metadata={"meta": json.dumps(meta)}))


def _find_checkpoint(meta: dict[str, Any], run_dir: Path, override: str | Path | None) -> Path:
    """The run's CLIP checkpoint file: `override`, else the recorded path (absolute, or relative to the run
    folder or the current folder); its sha256 must be the one the run was trained with."""
    recorded = Path(meta["checkpoint"]).expanduser()
    candidates = [Path(override).expanduser()] if override else \
        ([recorded] if recorded.is_absolute() else [run_dir / recorded, Path.cwd() / recorded])
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise BackboneError(f"the CLIP checkpoint of run '{run_dir}' is not at {candidates[0]}; pass its current "
                            "path (load_prompt(..., checkpoint=FILE) or --checkpoint FILE)")
    expected = meta.get("weights_id")
    if expected and expected.startswith("sha256:") and "sha256:" + file_sha256(path) != expected:
        raise BackboneError(f"'{path}' is not the checkpoint run '{run_dir}' was trained with (sha256 differs); "
                            "pass the original file")
    return path


def load_prompt(run_dir: str | Path, backbone: Backbone | None = None, device: str | None = "cpu",
                checkpoint: str | Path | None = None, learner: int = 0) -> PromptClassifier:
    """Rebuild the classifier of a finished run. The backbone is loaded from the run's record (or given, or
    from `checkpoint` when the file moved) and must carry the weights the run was trained with. `learner` j > 0:
    a method's other learner j (co-teaching's second prompt, dualprompt's negative one), from the run's last
    checkpoint."""
    from safetensors import safe_open

    run_dir = Path(run_dir)
    path = run_dir / "prompt.safetensors"
    if not path.is_file():
        raise ConfigError(f"'{run_dir}' holds no learned prompt (prompt.safetensors); pass a finished run folder")
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads((fh.metadata() or {})["meta"])
    if backbone is None:
        ckpt = _find_checkpoint(meta, run_dir, checkpoint) if meta.get("checkpoint") else None
        backbone = load_backbone(meta["model"], None if ckpt else meta["pretrained"], ckpt, device)
    expected = meta.get("weights_id")
    if expected and backbone.weights_id != expected:
        raise BackboneError(f"run '{run_dir}' was trained on weights {expected}, but the given backbone has "
                            f"{backbone.weights_id}; load the run's own model")
    if learner == 0:
        ctx = load_file(str(path))["ctx"]
    else:
        ckpt = load_checkpoint(run_dir)
        if ckpt is None or f"ctx_{learner}" not in ckpt["extra"]:
            raise ConfigError(f"'{run_dir}' holds no learner {learner} (its method trains fewer prompts, or its "
                              "checkpoint is gone); pass a finished run of a method with that many learners")
        ctx = ckpt["extra"][f"ctx_{learner}"]
    prompt = PromptLearner(backbone, meta["classnames"], meta["n_ctx"], meta["ctx_init"], meta["csc"],
                           meta["class_token_position"])
    with torch.no_grad():
        prompt.ctx.copy_(ctx.to(prompt.ctx.device))
    return PromptClassifier(backbone, prompt)


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
