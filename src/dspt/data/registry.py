"""One registry of datasets by name; each builder returns train / (val) / test `ImageDataset`s."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .base import DataError, ImageDataset
from .folder import load_image_folder
from .sampling import stratified_split


@dataclass
class DataSplits:
    train: ImageDataset
    test: ImageDataset
    val: ImageDataset | None = None

    @property
    def classnames(self) -> list[str]:
        return self.train.classnames


Builder = Callable[..., DataSplits]
DATASETS: dict[str, Builder] = {}


def register_dataset(name: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        if name in DATASETS:
            raise ValueError(f"dataset '{name}' is already registered")
        DATASETS[name] = fn
        return fn

    return deco


def _split_dirs(root: Path) -> dict[str, Path]:
    """{'train': ..., 'test': ..., 'val': ...} when `root` is laid out as split folders of class folders."""
    subdirs = {d.name.lower(): d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
    aliases = {"train": ("train", "training"), "test": ("test", "testing"), "val": ("val", "valid", "validation")}
    found = {k: subdirs[a] for k, names in aliases.items() for a in names if a in subdirs}
    return found if "train" in found and set(subdirs) <= {a for names in aliases.values() for a in names} else {}


@register_dataset("folder")
def folder_dataset(
    root: str | os.PathLike,
    test_root: str | os.PathLike | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    classnames: str | os.PathLike | None = None,
    **_: object,
) -> DataSplits:
    """Class-folder images. Test data: `test_root`, else a `test/` folder beside `train/`, else a seeded
    stratified `test_fraction` of the images (the split seed is recorded with the run)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder '{root}' not found; pass a folder with one sub-folder of images per class")
    splits = _split_dirs(root)
    train_root = splits.get("train", root)
    train = load_image_folder(train_root, classnames=classnames)
    folders = train.meta["class_folders"]
    val = load_image_folder(splits["val"], classnames, folders) if "val" in splits else None
    if test_root is not None:
        test = load_image_folder(test_root, classnames, folders)
    elif "test" in splits:
        test = load_image_folder(splits["test"], classnames, folders)
    else:
        keep, held = stratified_split(train.labels, test_fraction, seed)
        train, test = train.subset(keep), train.subset(held)
        train.meta["split"] = test.meta["split"] = {"test_fraction": test_fraction, "seed": seed}
    if len(test) == 0:
        raise DataError(f"no test images under '{test_root or root}'")
    return DataSplits(train=train, test=test, val=val)


def load_data(dataset: str = "folder", **options: object) -> DataSplits:
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset '{dataset}'; choose one of: {', '.join(sorted(DATASETS))} "
                        "(`dspt datasets` lists them)")
    return DATASETS[dataset](**options)
