"""The images a run trains on: K shots per class (or the full split), the labels it is given, and, with
--skip-bad-images, unreadable images replaced by readable ones of the same class."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .base import DataError, ImageDataset, find_bad_images
from .realnoise import given_labels
from .sampling import FP_PROTOCOLS, cached_few_shot, fewshot_file, write_few_shot

#: tags the random stream that draws replacements for unreadable shots (independent of the shots' own draw)
_SKIP_STREAM = 0x5B1D
#: how many skipped paths `info` lists (the count is always complete)
_EXAMPLES = 5


@dataclass
class TrainingSubset:
    """The images a run trains on and the labels it is given (before any synthetic noise)."""

    train: ImageDataset  # the chosen images; .labels are the true labels
    indices: np.ndarray  # into the full training split
    given: np.ndarray | None  # labels to train on when they are not drawn by a noise protocol (given, *flip)
    info: dict  # what was done, saved with the run (dataset.json)


def select_training(train: ImageDataset, shots: int, seed: int, noise: str = "sym", fp: int = 0,
                    noise_file: str | os.PathLike | None = None, label_set: str | None = None,
                    cache_dir: str | os.PathLike | None = None, skip_bad: bool = False) -> TrainingSubset:
    """K-shot subset (or the full split, shots 0) and, for `given` / symflip / pairflip, the given labels.

    - symflip / pairflip choose K images per class of which FP are false positives (`false_positive_shots`);
    - given: the labels shipped with the data (or `noise_file`); the K shots are drawn per *given* class, as a
      user holding only those labels would; where the data has no clean labels the true labels are unknown and
      set equal to the given ones (the realised noise rate then cannot be measured; `info` says so);
    - otherwise K images per (clean) class; a noise protocol corrupts their labels afterwards.
    The subset is stored in the cache as a few-shot file keyed by dataset, split, K, seed (and protocol).

    `skip_bad` (--skip-bad-images): only the drawn images are decoded, not the whole split (shots 0: every
    image is). Each unreadable one is replaced by a readable, unused image of the same class (for a false
    positive: of the same source pool), drawn from a stream of the same seed, so the subset stays a function of
    (dataset, shots, seed, protocol); without unreadable images it is the subset drawn without `skip_bad`.
    A subset with replacements is stored in its own few-shot file (`-skipbad`); `info` records what was skipped.
    """
    info: dict = {"dataset": train.name, "n_pool": len(train), "shots": shots, "seed": seed, "noise": noise,
                  "split_source": train.meta.get("split_source"), "split_generated": train.meta.get("split_generated")}
    for key in ("verified_noise_rate", "verified_train", "removed_validation_images", "table", "source"):
        if key in train.meta:
            info[key] = train.meta[key]
    if noise in FP_PROTOCOLS:
        idx, given = cached_few_shot(train, shots, seed, cache_dir, noise=noise, fp=fp)
        path = fewshot_file(train, "train", shots, seed, noise, fp, cache_dir)
        if skip_bad:
            idx, given, skipped = _replace_unreadable(train, idx, given, train.labels, seed, shots, fp, noise)
            path = _record_skipped(info, train, shots, seed, noise, fp, cache_dir, None, idx, given, skipped, path)
        info.update(fp=fp, fewshot_file=str(path))
        return TrainingSubset(train.subset(idx), idx, given, info)
    pool_given, clean_known = None, True
    if noise == "given":
        pool_given, clean_known = given_labels(train, noise_file, label_set)
        info.update(noise_file=str(noise_file) if noise_file else None, label_set=label_set,
                    clean_labels_known=clean_known)
        if clean_known:
            info["pool_noise_rate"] = float((pool_given != train.labels).mean()) if len(train) else 0.0
    elif noise_file is not None or label_set is not None:
        raise DataError("--noise-file / --label-set hold real noisy labels; use them with --noise given")
    if shots > 0:
        idx, _ = cached_few_shot(train, shots, seed, cache_dir, labels=pool_given)
        path = fewshot_file(train, "train", shots, seed, None, 0, cache_dir, pool_given)
        if skip_bad:
            by = train.labels if pool_given is None else pool_given
            idx, _, skipped = _replace_unreadable(train, idx, None, by, seed, shots, 0, noise)
            path = _record_skipped(info, train, shots, seed, None, 0, cache_dir, pool_given, idx,
                                   None if pool_given is None else pool_given[idx], skipped, path)
        info["fewshot_file"] = str(path)
    else:
        idx = np.arange(len(train))
        if skip_bad:  # the full split: every image is decoded (slow on a large split, as asked for)
            bad = set(find_bad_images(train.paths))
            idx = np.asarray([i for i, p in enumerate(train.paths) if p not in bad], dtype=np.int64)
            _note_skipped(info, sorted(bad))
        labels = train.labels if pool_given is None else pool_given
        counts = np.bincount(labels[idx], minlength=train.num_classes)
        empty = [train.classnames[c] for c, n in enumerate(counts) if n == 0]
        if empty:
            raise DataError(f"class '{empty[0]}' has no " + ("readable " if skip_bad else "")
                            + "training images; add images or remove the class")
    sub = train.subset(idx)
    given = None if pool_given is None else pool_given[idx]
    if given is not None and not clean_known:
        sub.labels = given.copy()  # true labels unknown: report against the given ones
    return TrainingSubset(sub, idx, given, info)


def _note_skipped(info: dict, skipped: list[str]) -> None:
    info.update(skip_bad_images=True, skipped_images=len(skipped), skipped_examples=skipped[:_EXAMPLES])


def _record_skipped(info: dict, train: ImageDataset, shots: int, seed: int, noise: str | None, fp: int,
                    cache_dir: str | os.PathLike | None, labels: np.ndarray | None, idx: np.ndarray,
                    given: np.ndarray | None, skipped: list[str], path: os.PathLike) -> os.PathLike:
    """Note the skipped images in `info`; a subset with replacements gets its own few-shot file (returned)."""
    _note_skipped(info, skipped)
    if not skipped:
        return path
    path = fewshot_file(train, "train", shots, seed, noise, fp, cache_dir, labels, skip_bad=True)
    write_few_shot(path, train, "train", shots, seed, noise, fp, idx, given, skipped=skipped)
    return path


def _replace_unreadable(train: ImageDataset, idx: np.ndarray, given: np.ndarray | None, by: np.ndarray, seed: int,
                        shots: int, fp: int, noise: str) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Decode the images `idx` and replace each unreadable one by a readable, unused image of its pool.

    A shot's pool: the images whose label `by` (true or given labels) is its class; a false positive's: the
    source of the protocol (symflip: every other class, pairflip: class c+1). Each pool's candidates come in
    the order of a permutation seeded by (seed, pool), and each candidate is decoded before it is used.
    Returns (indices, given labels, skipped paths), sorted by index like the draw itself.
    """
    bad = set(find_bad_images([train.paths[i] for i in idx.tolist()]))
    if not bad:
        return idx, given, []
    idx = idx.copy()
    used = set(idx.tolist())
    skipped: list[str] = []
    queues: dict[tuple[int, int], Iterator[int]] = {}
    sizes: dict[tuple[int, int], int] = {}
    unreadable: dict[tuple[int, int], int] = {}
    for slot, i in enumerate(idx.tolist()):
        if train.paths[i] not in bad:
            continue
        skipped.append(train.paths[i])
        key = _pool_key(int(by[i]), None if given is None else int(given[slot]), noise, train.num_classes)
        if key not in queues:
            pool = _pool_members(key, by)
            sizes[key] = len(pool)
            queues[key] = iter(np.random.default_rng([seed, _SKIP_STREAM, *key]).permutation(pool).tolist())
        unreadable[key] = unreadable.get(key, 0) + 1
        for cand in queues[key]:
            if cand in used:
                continue
            used.add(cand)
            if find_bad_images([train.paths[cand]]):
                skipped.append(train.paths[cand])
                unreadable[key] += 1
                continue
            idx[slot] = cand
            break
        else:
            raise DataError(_exhausted(key, sizes[key], unreadable[key], train.classnames, shots, fp, noise))
    order = np.argsort(idx, kind="stable")
    return idx[order], None if given is None else given[order], skipped


def _pool_key(label: int, given: int | None, noise: str, num_classes: int) -> tuple[int, int]:
    """(0, c): images of class c; (1, c): images of every class but c (symflip's false positives of c)."""
    if given is None or label == given:
        return (0, label)
    return (1, given) if noise == "symflip" else (0, (given + 1) % num_classes)


def _pool_members(key: tuple[int, int], by: np.ndarray) -> np.ndarray:
    kind, c = key
    return np.flatnonzero(by == c) if kind == 0 else np.flatnonzero(by != c)


def _exhausted(key: tuple[int, int], size: int, unreadable: int, names: list[str], shots: int, fp: int,
               noise: str) -> str:
    kind, c = key
    fix = "; lower --shots" + (" or --fp" if noise in FP_PROTOCOLS else "") + " or replace the unreadable files"
    if kind == 1:
        return (f"symflip: the classes other than '{names[c]}' run out of readable images for its {fp} false "
                f"positive(s) ({unreadable} unreadable image(s) found, --skip-bad-images){fix}")
    by = " (by the given labels)" if noise == "given" else ""
    need = f"--shots {shots}" + (f" --fp {fp}" if noise in FP_PROTOCOLS else "")
    return (f"class '{names[c]}'{by} runs out of readable images: {unreadable} of its {size} training image(s) are "
            f"unreadable, too many for {need} (--skip-bad-images){fix}")
