"""Seeded splits and K-shot sampling; the chosen indices are saved so a run can be reproduced exactly.

Only index arithmetic on labels: nothing here opens an image (`training.select_training` checks images).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from ..io import atomic_write_text
from ..numbers import round_half_up
from .base import DataError, ImageDataset, cache_root

log = logging.getLogger(__name__)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(keep, held_out) indices: `fraction` of each class held out (at least one image where a class has 2+)."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"split fraction {fraction} must be inside (0, 1), e.g. 0.2")
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_held = round_half_up(fraction * len(idx))
        n_held = min(max(n_held, 1 if len(idx) > 1 else 0), len(idx) - 1)
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def few_shot_indices(dataset: ImageDataset, shots: int, seed: int) -> np.ndarray:
    """K images per class, drawn without replacement with `seed`; sorted indices into `dataset`."""
    if shots < 1:
        raise DataError(f"shots must be >= 1 (got {shots}); use shots 0 / --shots all for the full split")
    counts = dataset.class_counts()
    short = [(dataset.classnames[c], int(n)) for c, n in enumerate(counts) if n < shots]
    if short:
        name, n = short[0]
        raise DataError(f"class '{name}' has {n} training images, fewer than {shots} shots "
                        f"({len(short)} class(es) short); lower --shots or add images")
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(dataset.labels == c), size=shots, replace=False)
              for c in range(dataset.num_classes)]
    return np.sort(np.concatenate(chosen))


# ----------------------------------------------------------------------------------------------------------
# the false-positive protocol of PTNL / JoAPR, and few-shot index files in the cache

#: noise protocols that choose the K-shot training subset themselves
FP_PROTOCOLS = ("symflip", "pairflip")


def false_positive_shots(labels: np.ndarray, num_classes: int, shots: int, fp: int, mode: str, seed: int,
                         classnames: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The K shots of each class c: K - FP images of c and FP images of other classes, all labelled c.

    ``symflip`` draws the FP images uniformly from the images of all other classes, ``pairflip`` from class
    c+1 (mod C). True positives are drawn first, so no image is both a true shot of its own class and a false
    positive elsewhere, and no image is used twice. Returns (indices into `labels`, given labels), sorted by
    index; exactly K * C images, exactly FP per class with a wrong label.
    """
    if mode not in FP_PROTOCOLS:
        raise DataError(f"false-positive protocol '{mode}' unknown; choose one of: {', '.join(FP_PROTOCOLS)}")
    if shots < 1:
        raise DataError(f"{mode} needs a K-shot subset; pass --shots K (>= 1) and --fp FP")
    if not 0 <= fp < shots:
        raise DataError(f"--fp {fp} must be in [0, {shots - 1}] for {shots} shots (FP false positives per class)")
    labels = np.asarray(labels, dtype=np.int64)
    names = classnames or [str(c) for c in range(num_classes)]
    rng = np.random.default_rng(seed)
    own = shots - fp
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    short = [c for c in range(num_classes) if len(by_class[c]) < own]
    if short:
        c = short[0]
        raise DataError(f"class '{names[c]}' has {len(by_class[c])} training images, fewer than the {own} true "
                        f"shots of {mode} with --shots {shots} --fp {fp} ({len(short)} class(es) short); "
                        "lower --shots or raise --fp")
    chosen = [rng.choice(idx, size=own, replace=False) for idx in by_class]
    used = np.zeros(len(labels), dtype=bool)
    used[np.concatenate(chosen)] = True
    indices, given = [], []
    for c in range(num_classes):
        if mode == "symflip":
            pool = np.flatnonzero(~used & (labels != c))
        else:
            pool = np.flatnonzero(~used & (labels == (c + 1) % num_classes))
        if len(pool) < fp:
            if mode == "symflip":
                raise DataError(f"symflip: only {len(pool)} unused image(s) of other classes are left as false "
                                f"positives for class '{names[c]}', fewer than --fp {fp}; lower --shots or --fp")
            raise DataError(f"pairflip: class '{names[(c + 1) % num_classes]}' has {len(pool)} image(s) left after "
                            f"its own {own} true shots, fewer than the {fp} false positives of class '{names[c]}' "
                            f"(pairflip needs {shots} images in every class); lower --shots or --fp")
        picks = rng.choice(pool, size=fp, replace=False) if fp else np.empty(0, dtype=np.int64)
        used[picks] = True
        indices += [chosen[c], picks]
        given.append(np.full(shots, c, dtype=np.int64))
    idx = np.concatenate(indices).astype(np.int64)
    giv = np.concatenate(given)
    order = np.argsort(idx, kind="stable")
    return idx[order], giv[order]


def _subset_key(dataset: ImageDataset, labels: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(f"{dataset.name}\n{len(dataset)}\n".encode())
    digest.update("\n".join(dataset.classnames).encode())
    for path, label in zip(dataset.paths, labels.tolist()):
        digest.update(f"{path}|{label}\n".encode())
    return digest.hexdigest()[:16]


def fewshot_file(dataset: ImageDataset, split: str, shots: int, seed: int, noise: str | None, fp: int,
                 cache_dir: str | os.PathLike | None, labels: np.ndarray | None = None,
                 skip_bad: bool = False) -> Path:
    """<cache>/fewshot/<dataset>/<split>-k<K>-s<seed>[-<noise>-fp<FP>|-given][-skipbad]-<content key>.json

    `skip_bad`: the subset after unreadable images were replaced (`training.select_training`), kept apart from
    the plain draw, which a run without --skip-bad-images uses.
    """
    key = _subset_key(dataset, dataset.labels if labels is None else labels)
    tag = f"-{noise}-fp{fp}" if noise in FP_PROTOCOLS else ("-given" if labels is not None else "")
    tag += "-skipbad" if skip_bad else ""
    return cache_root(cache_dir) / "fewshot" / dataset.name / f"{split}-k{shots}-s{seed}{tag}-{key}.json"


def cached_few_shot(dataset: ImageDataset, shots: int, seed: int, cache_dir: str | os.PathLike | None = None,
                    noise: str | None = None, fp: int = 0, labels: np.ndarray | None = None,
                    split: str = "train") -> tuple[np.ndarray, np.ndarray | None]:
    """The K-shot subset of `dataset` as (indices, given labels or None), kept in a file keyed by dataset, split,
    K, seed (and protocol / FP), stored in dspt's cache folder, never in the data folder.

    `noise` symflip / pairflip picks false positives (:func:`false_positive_shots`); otherwise K images per
    class of `labels` (default: the dataset's labels; pass shipped noisy labels to sample as a user would,
    by the labels they have). The same arguments always give the same subset; the file makes it inspectable
    and reusable by other tools.
    """
    path = fewshot_file(dataset, split, shots, seed, noise, fp, cache_dir, labels)
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            idx = np.asarray(data["indices"], dtype=np.int64)
            given = None if data.get("given") is None else np.asarray(data["given"], dtype=np.int64)
            if data.get("n") == len(dataset) and len(idx) and idx.min() >= 0 and idx.max() < len(dataset) and \
                    (given is None or len(given) == len(idx)):
                return idx, given
        except (OSError, ValueError, KeyError, TypeError):
            pass
        log.warning("few-shot file %s is unreadable or stale; drawing the subset again", path)
    if noise in FP_PROTOCOLS:
        idx, given = false_positive_shots(dataset.labels, dataset.num_classes, shots, fp, noise, seed,
                                          dataset.classnames)
    else:
        view = dataset if labels is None else ImageDataset(dataset.paths, labels, dataset.classnames, dataset.name)
        idx, given = few_shot_indices(view, shots, seed), None
    write_few_shot(path, dataset, split, shots, seed, noise, fp, idx, given)
    return idx, given


def write_few_shot(path: Path, dataset: ImageDataset, split: str, shots: int, seed: int, noise: str | None, fp: int,
                   idx: np.ndarray, given: np.ndarray | None, **extra: object) -> None:
    """Store a K-shot subset as JSON (indices, given labels, paths relative to the data root, `extra`)."""
    base = dataset.meta.get("root")
    rel = [os.path.relpath(dataset.paths[i], base) if base else dataset.paths[i] for i in idx.tolist()]
    record = {"dataset": dataset.name, "split": split, "shots": shots, "seed": seed, "noise": noise, "fp": fp,
              "n": len(dataset), "root": base, "indices": idx.tolist(),
              "given": None if given is None else given.tolist(), "paths": rel, **extra}
    try:
        atomic_write_text(path, json.dumps(record) + "\n")
    except OSError as exc:  # a read-only cache must not stop a run: the subset is reproducible anyway
        log.warning("cannot write few-shot file %s (%s)", path, exc)
