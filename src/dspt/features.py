"""Frozen image-feature cache: prompt tuning never trains CLIP's image tower, so image features are computed
once per image, stored, and reused by every epoch and every later run that meets the same image and model.

Each image is encoded once per view: view 0 is the un-augmented test transform, views 1..V are seeded
random-resized-crop + flip augmentations whose seeds come from the image's content (`image_identity`), not
from its position in a list. So the cache is kept per image: a store per model (weights, precision,
preprocessing) holds shards of (image digest, view) -> feature, and any subset, fold, K-shot draw, CSV
listing or relabelled file of images already encoded is served without encoding them again.

Shards are written atomically and never changed (a merge writes a new one, then removes the old); a shard
whose key, shape or bytes do not check out is ignored, and its images are encoded again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .backbone import Backbone
from .data.base import ImageDataset, load_image
from .image_identity import DIGEST_BYTES, image_digests, image_view_seeds
from .io import atomic_write, atomic_write_json, default_cache_dir, file_lock

log = logging.getLogger(__name__)

__all__ = ["FEATURE_FORMAT", "FeatureSet", "cache_usage", "cached_features", "default_cache_dir", "encode_paths",
           "store_key", "view_seed", "view_tags"]

FEATURE_FORMAT = 2  # bump when the stored layout or the encoding changes (2: per-image store)
_MERGE_AT = 64  # shards of one view; beyond this many, they are merged into one


def view_seed(seed: int, view: int, index: int) -> int:
    """Independent of batch size and worker count, so a cache is reproducible on any machine."""
    return int(np.random.SeedSequence([seed, view, index]).generate_state(1)[0])


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], transform: Callable, seeds: list[int] | None):
        self.paths, self.transform, self.seeds = paths, transform, seeds

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = load_image(self.paths[i])
        if self.seeds is not None:
            torch.manual_seed(self.seeds[i])
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
    seeds: list[int] | np.ndarray | None = None,
    encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """[N, E] normalised image features of `paths` under `transform`, seeded per image when augmenting: by
    `seeds` (one per image), else by `seed`, `view` and the position in `paths`. `encoder`: images -> normalised
    features in place of the frozen tower's (a learner that prompts the image tower)."""
    if seeds is None and seed is not None:
        seeds = [view_seed(seed, view, i) for i in range(len(paths))]
    loader = torch.utils.data.DataLoader(
        _ImageFiles(paths, transform, None if seeds is None else [int(s) for s in seeds]), batch_size=batch_size,
        shuffle=False,
        num_workers=workers, pin_memory=backbone.device.type == "cuda",
    )
    out = []
    with torch.random.fork_rng(devices=[]):  # the per-image seeding must not disturb the caller's RNG
        for images in tqdm(loader, desc=desc, leave=False, disable=None):
            if encoder is None:
                out.append(backbone.encode_images(images).cpu())
            else:
                with torch.no_grad():
                    out.append(encoder(images.to(backbone.device)).float().cpu())
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out)


@dataclass
class FeatureSet:
    """features [V+1, N, E] for training data (view 0 un-augmented) or [1, N, E] for evaluation data.
    `encoded`: image-views this call encoded (0 on a full hit); `path`: the model's store folder."""

    features: torch.Tensor
    key: str
    path: Path
    hit: bool
    encoded: int = 0


def store_key(backbone: Backbone) -> dict:
    """Everything about the model that changes a cached feature. Labels, lists and datasets do not."""
    return {
        "format": FEATURE_FORMAT,
        "model": backbone.model_name,
        "weights": backbone.weights_id,
        "quick_gelu": backbone.quick_gelu,
        "precision": backbone.precision if backbone.device.type == "cuda" else "fp32",
        "image_size": backbone.image_size,
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "test_transform": repr(backbone.test_transform()),
    }


def view_tags(backbone: Backbone, views: int, seed: int) -> list[str]:
    """One tag per view: 'view0' (the test transform, part of the store key), then each augmented view named by
    the train transform (crop scale, flip), the augmentation seed and its number."""
    aug = hashlib.sha256(repr(backbone.train_transform()).encode()).hexdigest()[:12]
    return ["view0"] + [f"aug{aug}-seed{seed}-view{v}" for v in range(1, views + 1)]


def _key_hash(key: dict | list) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _tag_hash(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()[:16]


_VOID = np.dtype((np.void, DIGEST_BYTES))


def _as_void(digests: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(digests, dtype=np.uint8).view(_VOID).ravel()


def _shard_index(store: Path, key: dict, tag: str) -> tuple[list[Path], np.ndarray, np.ndarray, np.ndarray]:
    """(shards of `tag`, their concatenated digests [M] as void, the shard of each [M], its row there [M])."""
    shards, digests, owner, rows = [], [], [], []
    for f in sorted(store.glob(f"{_tag_hash(tag)}-*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as fh:
                meta = fh.metadata() or {}
                if json.loads(meta.get("key", "null")) != key or meta.get("tag") != tag:
                    log.warning("feature shard %s has a different key; ignoring it", f)
                    continue
                d = fh.get_tensor("digests").numpy()
        except FileNotFoundError:
            continue  # merged into another shard meanwhile
        except (SafetensorError, OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            log.warning("feature shard %s is unreadable (%s); ignoring it", f, type(exc).__name__)
            continue
        if d.ndim != 2 or d.shape[1] != DIGEST_BYTES:
            log.warning("feature shard %s has digests of shape %s; ignoring it", f, tuple(d.shape))
            continue
        digests.append(_as_void(d))
        owner.append(np.full(len(d), len(shards)))
        rows.append(np.arange(len(d)))
        shards.append(f)
    if not shards:
        return [], np.empty(0, _VOID), np.empty(0, np.int64), np.empty(0, np.int64)
    return shards, np.concatenate(digests), np.concatenate(owner), np.concatenate(rows)


def _lookup(store: Path, key: dict, tag: str, want: np.ndarray) -> tuple[torch.Tensor | None, np.ndarray]:
    """(features of `want` [N, E] with zeros where missing, or None when none is found; the missing mask)."""
    for _ in range(3):  # a merge may remove a shard between listing and reading it: list again
        shards, have, owner, rows = _shard_index(store, key, tag)
        if not len(have):
            return None, np.ones(len(want), dtype=bool)
        index = pd.Index(have)
        if not index.is_unique:  # an image in two shards (two writers, or a merge under way): the first
            keep = ~index.duplicated()
            have, owner, rows, index = have[keep], owner[keep], rows[keep], pd.Index(have[keep])
        at = index.get_indexer(want)
        missing = at < 0
        if missing.all():
            return None, missing
        try:
            out = None
            for s in np.unique(owner[at[~missing]]).tolist():
                feats = load_file(str(shards[s]))["features"]
                if out is None:
                    out = torch.zeros(len(want), feats.shape[-1], dtype=feats.dtype)
                pick = np.flatnonzero(~missing & (owner[np.maximum(at, 0)] == s))
                out[torch.as_tensor(pick)] = feats[torch.as_tensor(rows[at[pick]])]
        except FileNotFoundError:
            continue
        except (SafetensorError, OSError, KeyError) as exc:
            log.warning("feature shard of %s is unreadable (%s); encoding its images again", tag, type(exc).__name__)
            return None, np.ones(len(want), dtype=bool)
        if out is None or out.ndim != 2 or not torch.isfinite(out).all():
            log.warning("feature shards of %s hold non-finite values; encoding their images again", tag)
            return None, np.ones(len(want), dtype=bool)
        return out, missing
    return None, np.ones(len(want), dtype=bool)


def _write_shard(store: Path, key: dict, tag: str, digests: np.ndarray, feats: torch.Tensor) -> None:
    path = store / f"{_tag_hash(tag)}-{uuid.uuid4().hex[:16]}.safetensors"
    tensors = {"digests": torch.from_numpy(np.ascontiguousarray(digests, dtype=np.uint8)),
               "features": feats.contiguous()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"key": json.dumps(key), "tag": tag}))


def _merge_shards(store: Path, key: dict, tag: str) -> None:
    """Many small shards of one view (K-shot draws, folds) into one, so a lookup opens few files. Runs under
    the store's lock; readers that listed the old shards list again."""
    shards, have, _, _ = _shard_index(store, key, tag)
    if len(shards) <= _MERGE_AT:
        return
    feats = torch.cat([load_file(str(f))["features"] for f in shards])
    keep = ~pd.Index(have).duplicated()
    _write_shard(store, key, tag, np.ascontiguousarray(have[keep]).view(np.uint8).reshape(-1, DIGEST_BYTES),
                 feats[torch.as_tensor(np.flatnonzero(keep))])
    for f in shards:
        f.unlink(missing_ok=True)


_warned_legacy: set[Path] = set()


def _warn_legacy(root: Path) -> None:
    """Cache files of the old per-list layout are never read again: say so once, with the space they hold."""
    if root in _warned_legacy:
        return
    _warned_legacy.add(root)
    old = list(root.glob("*.safetensors"))
    if old:
        size = sum(f.stat().st_size for f in old if f.exists()) / 2**20
        log.warning("feature cache: %d file(s) (%.0f MB) in %s are of the old per-list layout, which this version "
                    "no longer reads (features are now kept per image and are encoded once more); delete them "
                    "to free the space: rm %s/*.safetensors", len(old), size, root, root)


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
    """Features of `dataset` [views + 1, N, E]: each image and view from the store when any earlier call
    encoded it (under any list, split or label), else encoded now and stored (atomically)."""
    if views < 0:
        raise ValueError(f"views must be >= 0 (got {views})")
    root = Path(cache_dir or default_cache_dir())
    _warn_legacy(root / "features")
    key = store_key(backbone)
    store = root / "features" / _key_hash(key)
    tags = view_tags(backbone, views, seed)
    digests = image_digests(dataset.paths, root)
    want = _as_void(digests)
    found = [_lookup(store, key, t, want) for t in tags]
    encoded = 0
    if any(m.any() for _, m in found):
        # One process encodes for a store at a time; others that want the same images meanwhile (sweep workers,
        # Ray tasks) wait for the lock, then find what it stored. The lock dies with its holder.
        with file_lock(store / ".lock"):
            _describe_store(store, key)
            found = [_lookup(store, key, t, want) if m.any() else (f, m) for t, (f, m) in zip(tags, found)]
            for v, tag in enumerate(tags):
                feats, missing = found[v]
                if not missing.any():
                    continue
                new = _encode_missing(backbone, dataset, split, digests, missing, v, seed, batch_size, workers,
                                      f"{split} view {v}/{views}")
                _write_shard(store, key, tag, new["digests"], new["features"])
                encoded += len(new["digests"])
                if feats is None:
                    feats = torch.zeros(len(want), new["features"].shape[-1], dtype=new["features"].dtype)
                feats[torch.as_tensor(np.flatnonzero(missing))] = new["features"][torch.as_tensor(new["row"])]
                found[v] = (feats, np.zeros(len(want), dtype=bool))
                _merge_shards(store, key, tag)
    if len(want) == 0:
        stacked = torch.empty(len(tags), 0, 0)
    else:
        stacked = torch.stack([f for f, _ in found]).contiguous()
    digest = _key_hash([key, tags, hashlib.sha256(digests.tobytes()).hexdigest()])
    if encoded:
        log.info("feature cache: encoded %d image-view(s) of %s (%d images x %d views), the rest from %s", encoded,
                 split, len(want), len(tags), store)
    else:
        log.info("feature cache hit: %s (%s, %d images x %d views)", store.name, split, len(want), len(tags))
    return FeatureSet(stacked, digest, store, hit=encoded == 0, encoded=encoded)


def _encode_missing(backbone: Backbone, dataset: ImageDataset, split: str, digests: np.ndarray,
                    missing: np.ndarray, view: int, seed: int, batch_size: int, workers: int, desc: str) -> dict:
    """Encode each distinct missing image once (a file listed twice, or two copies of one image, once)."""
    idx = np.flatnonzero(missing)
    _, first, inverse = np.unique(_as_void(digests[idx]), return_index=True, return_inverse=True)
    paths = [dataset.paths[idx[i]] for i in first.tolist()]
    d = digests[idx[first]]
    log.info("feature cache miss: encoding %s view %d (%d images)", split, view, len(paths))
    if view == 0:
        feats = encode_paths(backbone, paths, backbone.test_transform(), None, 0, batch_size, workers, desc=desc)
    else:
        feats = encode_paths(backbone, paths, backbone.train_transform(), batch_size=batch_size, workers=workers,
                             desc=desc, seeds=image_view_seeds(d, seed, view))
    return {"digests": d, "features": feats, "row": inverse.ravel()}


def _describe_store(store: Path, key: dict) -> None:
    """The store's key, readable by people (`store.json`); the shards carry it too."""
    if not (store / "store.json").exists():
        atomic_write_json(store / "store.json", key)


def cache_usage(cache_dir: str | os.PathLike | None = None) -> tuple[int, int]:
    """(files, bytes) under the cache directory."""
    root = Path(cache_dir or default_cache_dir())
    files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
    return len(files), sum(p.stat().st_size for p in files)
