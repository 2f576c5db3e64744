"""Frozen image-feature cache: prompt tuning never trains CLIP's image tower, so image features are computed
once, stored, and reused by every epoch and every later run on the same images and model.

Each image is encoded once per view: view 0 is the un-augmented test transform, views 1..V are seeded
random-resized-crop + flip augmentations. Training then draws one cached view per sample per step. A cache
file is keyed by everything that changes its content and is written atomically; a file whose key, shape or
bytes do not check out is rebuilt, never used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .backbone import Backbone
from .data.base import ImageDataset, load_image
from .io import atomic_write, default_cache_dir, file_lock, file_stamp

log = logging.getLogger(__name__)

__all__ = ["FEATURE_FORMAT", "FeatureSet", "cache_key", "cache_usage", "cached_features", "default_cache_dir",
           "encode_paths", "view_seed"]

FEATURE_FORMAT = 1  # bump when the stored layout or the encoding changes


def view_seed(seed: int, view: int, index: int) -> int:
    """Independent of batch size and worker count, so a cache is reproducible on any machine."""
    return int(np.random.SeedSequence([seed, view, index]).generate_state(1)[0])


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], transform: Callable, seed: int | None, view: int):
        self.paths, self.transform, self.seed, self.view = paths, transform, seed, view

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = load_image(self.paths[i])
        if self.seed is not None:
            torch.manual_seed(view_seed(self.seed, self.view, i))
        return self.transform(image)


def encode_paths(
    backbone: Backbone,
    paths: list[str],
    transform: Callable,
    seed: int | None = None,
    view: int = 0,
    batch_size: int = 128,
    workers: int = 0,
    desc: str = "encode",
) -> torch.Tensor:
    """[N, E] normalised image features of `paths` under `transform` (seeded per image when augmenting)."""
    loader = torch.utils.data.DataLoader(
        _ImageFiles(paths, transform, seed, view), batch_size=batch_size, shuffle=False,
        num_workers=workers, pin_memory=backbone.device.type == "cuda",
    )
    out = []
    with torch.random.fork_rng(devices=[]):  # the per-image seeding must not disturb the caller's RNG
        for images in tqdm(loader, desc=desc, leave=False, disable=None):
            out.append(backbone.encode_images(images).cpu())
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out)


@dataclass
class FeatureSet:
    """features [V+1, N, E] for training data (view 0 un-augmented) or [1, N, E] for evaluation data."""

    features: torch.Tensor
    key: str
    path: Path
    hit: bool


def cache_key(backbone: Backbone, dataset: ImageDataset, split: str, views: int, seed: int) -> dict:
    """Everything that changes the cached numbers. Labels do not (noise never invalidates a cache)."""
    digest = hashlib.sha256("\n".join(dataset.paths).encode())
    for p in dataset.paths:
        digest.update(f"{file_stamp(p)}\n".encode())
    return {
        "format": FEATURE_FORMAT,
        "model": backbone.model_name,
        "weights": backbone.weights_id,
        "quick_gelu": backbone.quick_gelu,
        "precision": backbone.precision if backbone.device.type == "cuda" else "fp32",
        "image_size": backbone.image_size,
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "dataset": dataset.name,
        "files": digest.hexdigest(),
        "n": len(dataset),
        "split": split,
        "views": views,
        "aug_seed": seed if views > 0 else None,
        "train_transform": repr(backbone.train_transform()) if views > 0 else None,
        "test_transform": repr(backbone.test_transform()),
    }


def _key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _try_load(path: Path, key: dict, expected_shape: tuple[int, int]) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if json.loads(meta.get("key", "null")) != key:
            log.warning("feature cache %s has a different key; rebuilding", path)
            return None
        feats = load_file(str(path))["features"]
    except (SafetensorError, OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        log.warning("feature cache %s is unreadable (%s); rebuilding", path, type(exc).__name__)
        return None
    if feats.ndim != 3 or tuple(feats.shape[:2]) != expected_shape or not torch.isfinite(feats).all():
        log.warning("feature cache %s has shape %s, expected %s x N; rebuilding", path, tuple(feats.shape),
                    expected_shape)
        return None
    return feats


def cached_features(
    backbone: Backbone,
    dataset: ImageDataset,
    split: str,
    views: int = 0,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 128,
    workers: int = 0,
) -> FeatureSet:
    """Load the features of `dataset` from the cache, or encode and store them (atomically)."""
    if views < 0:
        raise ValueError(f"views must be >= 0 (got {views})")
    key = cache_key(backbone, dataset, split, views, seed)
    digest = _key_hash(key)
    path = Path(cache_dir or default_cache_dir()) / "features" / f"{dataset.name}-{split}-{digest}.safetensors"
    shape = (views + 1, len(dataset))
    feats = _try_load(path, key, shape)
    if feats is None:
        # One process encodes a key; others that want it at the same time (sweep workers, Ray tasks) wait for
        # the lock, then read the file it wrote. The lock dies with its holder, so a killed builder frees it.
        lock = path.with_name(f".{path.name}.lock")
        with file_lock(lock):
            feats = _try_load(path, key, shape)
            if feats is None:
                return _encode_and_store(backbone, dataset, split, views, seed, key, digest, path, batch_size,
                                         workers)
    log.info("feature cache hit: %s (%s, %d images x %d views)", path.name, split, len(dataset), views + 1)
    return FeatureSet(feats, digest, path, hit=True)


def _encode_and_store(backbone: Backbone, dataset: ImageDataset, split: str, views: int, seed: int, key: dict,
                      digest: str, path: Path, batch_size: int, workers: int) -> FeatureSet:
    log.info("feature cache miss: encoding %s (%d images x %d views) -> %s", split, len(dataset), views + 1, path)
    stack = [encode_paths(backbone, dataset.paths, backbone.test_transform(), None, 0, batch_size, workers,
                          desc=f"{split} view 0/{views}")]
    aug = backbone.train_transform()
    for v in range(1, views + 1):
        stack.append(encode_paths(backbone, dataset.paths, aug, seed, v, batch_size, workers,
                                  desc=f"{split} view {v}/{views}"))
    feats = torch.stack(stack).contiguous()
    atomic_write(path, lambda tmp: save_file({"features": feats}, tmp, metadata={"key": json.dumps(key)}))
    return FeatureSet(feats, digest, path, hit=False)


def cache_usage(cache_dir: str | os.PathLike | None = None) -> tuple[int, int]:
    """(files, bytes) under the cache directory."""
    root = Path(cache_dir or default_cache_dir())
    files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
    return len(files), sum(p.stat().st_size for p in files)
