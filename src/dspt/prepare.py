"""Preparing a run's data: the first stage of training, before any prompt is tuned.

Data flows one way: dataset -> noise -> feature cache -> training -> metrics -> run directory + results row.
This module holds the first three: the dataset's splits, the K-shot subset, the noisy training labels and the
validation labels, the backbone and the cached image features of one run (`prepare`), and the zero-shot
reference every table starts from (`zeroshot`). Every source of randomness is derived from the run seed
(`dspt.seeds`: one independent stream each for the shots, the noise, the validation subset and its noise, the
context init, the augmented views and the epochs), so a run prepared again draws exactly the same data.
"""
from __future__ import annotations

import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .version import __version__
from .backbone import Backbone, load_backbone
from .config import RunConfig
from .data import (FP_PROTOCOLS, DataSplits, ImageDataset, false_positive_shots, few_shot_indices,
                   find_bad_images, load_data, select_training)
from .errors import ConfigError
from .features import cached_features
from .io import atomic_write_json, atomic_write_text
from .learners import get_learner
from .metrics import accuracy, per_class_accuracy, predict
from .noise import NoisyLabels, make_noisy_labels
from .numbers import round_half_up
from .prompt import check_prompt_tunable
from .seeds import stream_seeds

log = logging.getLogger(__name__)


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
    # the reference path and an image-side learner (VPT, MaPLe) augment every step's images themselves
    fast = cfg.path == "fast" and get_learner(cfg.learner).cached_features
    views, tr, encode_val = (cfg.views if fast else 0), None, None
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


def csv_text(header: list[str], rows: Any) -> str:
    """A CSV file's text: paths with commas or quotes are quoted, so the file reads back as written."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()
