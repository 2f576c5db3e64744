"""Split files in CoOp's format and the seeded splits dspt generates when a dataset ships none.

CoOp's `split_zhou_<Name>.json` holds ``{"train": [[relpath, label, classname], ...], "val": [...],
"test": [...]}`` with paths relative to the dataset's image folder and 0-based labels. dspt reads those files
as they are, and writes splits it generates (same format) into its cache folder, never into the data folder.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from ..io import atomic_write_text, file_stamp
from ..numbers import round_half_up
from .base import DataError, ImageDataset, cache_root

SPLITS = ("train", "val", "test")
#: one split entry: (path relative to the image folder, 0-based label, class name)
Entry = tuple[str, int, str]
Entries = dict[str, list[Entry]]

#: bump when a generator changes what it produces, so old generated splits in the cache are not reused
GENERATOR_VERSION = 1
#: generated splits are one fixed split per dataset (like CoOp's), independent of the run seed
SPLIT_SEED = 1


def clean_classname(name: str) -> str:
    """CoOp keeps '_' in its class names and replaces it by ' ' when building prompts; dspt does it once here."""
    return " ".join(str(name).replace("_", " ").split())


def read_split_file(path: str | os.PathLike) -> Entries:
    """Read and check a split file in CoOp's format; a malformed file is a DataError naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"split file '{path}' not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"split file '{path}' is not valid JSON ({exc}); download it again") from None
    if not isinstance(data, dict) or not {"train", "test"} <= set(data):
        raise DataError(f"split file '{path}' must be a JSON object with 'train', 'val' and 'test' lists "
                        "(CoOp's split_zhou_*.json format)")
    out: Entries = {}
    for split in SPLITS:
        rows = data.get(split) or []
        if not isinstance(rows, list):
            raise DataError(f"split file '{path}': '{split}' must be a list of [path, label, classname]")
        items = []
        for n, row in enumerate(rows):
            if not (isinstance(row, (list, tuple)) and len(row) == 3 and isinstance(row[0], str)):
                raise DataError(f"split file '{path}': {split}[{n}] is {row!r}; expected [relpath, label, classname]")
            try:
                label = int(row[1])
            except (TypeError, ValueError):
                raise DataError(f"split file '{path}': {split}[{n}] has label {row[1]!r}, not an integer") from None
            items.append((row[0], label, str(row[2])))
        out[split] = items
    return out


def write_split_file(path: str | os.PathLike, entries: Entries, **info: object) -> None:
    """Write `entries` in CoOp's format (atomically); extra `info` keys (source, seed) are kept beside."""
    obj = {s: [list(e) for e in entries.get(s, [])] for s in SPLITS}
    obj.update({f"_{k}": v for k, v in info.items()})
    atomic_write_text(path, json.dumps(obj) + "\n")


def class_list(entries: Entries, source: str) -> list[str]:
    """Class names by label, checked: labels 0..C-1 all present, one name per label."""
    names: dict[int, str] = {}
    for split in SPLITS:
        for rel, label, name in entries.get(split, []):
            if label < 0:
                raise DataError(f"{source}: '{rel}' has negative label {label}")
            old = names.setdefault(label, name)
            if old != name:
                raise DataError(f"{source}: label {label} is named both '{old}' and '{name}'")
    if not names:
        raise DataError(f"{source} lists no images")
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing:
        raise DataError(f"{source}: labels must run 0..{max(names)}, but label {missing[0]} has no image "
                        f"({len(missing)} label(s) missing)")
    return [names[i] for i in range(len(names))]


def entries_to_datasets(
    entries: Entries,
    image_dir: Path,
    name: str,
    template: str,
    source: str,
    check_files: bool = True,
    meta: dict | None = None,
) -> dict[str, ImageDataset | None]:
    """One ImageDataset per split (val None when empty); image paths resolved against `image_dir`.

    With `check_files`, every listed image must exist: the error names the first missing one and the count.
    """
    raw = class_list(entries, source)
    classnames = [clean_classname(c) for c in raw]
    out: dict[str, ImageDataset | None] = {}
    for split in SPLITS:
        rows = entries.get(split, [])
        paths = [os.path.join(image_dir, rel) for rel, _, _ in rows]
        if check_files:
            missing = [rel for (rel, _, _), p in zip(rows, paths) if not os.path.isfile(p)]
            if missing:
                raise DataError(f"{source} lists {len(missing)} {split} image(s) that are not in '{image_dir}', "
                                f"e.g. '{missing[0]}'; extract the images there or fix --root")
        labels = np.asarray([label for _, label, _ in rows], dtype=np.int64)
        ds = ImageDataset(paths=paths, labels=labels, classnames=classnames, name=name, template=template,
                          meta={"root": str(image_dir), "split_source": source, "split": split, **(meta or {})})
        out[split] = ds if (rows or split != "val") else None
    train = out["train"]
    empty = [classnames[c] for c, n in enumerate(train.class_counts()) if n == 0]
    if empty:
        raise DataError(f"{source}: class '{empty[0]}' has no training image ({len(empty)} class(es) empty); "
                        "the split file does not fit these images")
    if len(out["test"]) == 0:
        raise DataError(f"{source} has no test images")
    return out


# ----------------------------------------------------------------------------------------------------------
# generating splits (when a dataset ships no split file), stored in the cache


def split_by_fraction(items: list, fractions: tuple[float, ...], rng: np.random.Generator,
                      what: str) -> list[list]:
    """Shuffle `items` (sorted first, so the result depends only on the seed) and cut them by `fractions`
    (rounded half up; the last part takes the rest). Every part must get at least one item."""
    items = sorted(items)
    order = rng.permutation(len(items))
    items = [items[i] for i in order]
    counts = [round_half_up(len(items) * f) for f in fractions[:-1]]
    counts.append(len(items) - sum(counts))
    if min(counts) <= 0:
        raise DataError(f"{what} has {len(items)} image(s), too few for a "
                        f"{'/'.join(f'{f:.0%}' for f in fractions)} split; add images")
    parts, start = [], 0
    for c in counts:
        parts.append(items[start:start + c])
        start += c
    return parts


def split_per_class(by_class: dict[tuple[int, str], list[str]], fractions: tuple[float, ...],
                    splits: tuple[str, ...], seed: int = SPLIT_SEED) -> Entries:
    """{(label, classname): [relpath]} -> entries, each class cut by `fractions` into `splits`."""
    rng = np.random.default_rng(seed)
    out: Entries = {s: [] for s in SPLITS}
    for (label, name), rels in sorted(by_class.items()):
        parts = split_by_fraction(rels, fractions, rng, f"class '{name}'")
        for split, part in zip(splits, parts):
            out[split] += [(rel, label, name) for rel in part]
    return out


def input_stamp(paths: Iterable[Path]) -> str:
    """Changes when any input file (or the listing of an input folder) changes."""
    digest = hashlib.sha256()
    for p in paths:
        digest.update(f"{Path(p).resolve()}|{file_stamp(p)}\n".encode())
    return digest.hexdigest()[:16]


def generated_split_path(name: str, stamp: str, cache_dir: str | os.PathLike | None) -> Path:
    return cache_root(cache_dir) / "splits" / f"{name}-v{GENERATOR_VERSION}-{stamp}.json"
