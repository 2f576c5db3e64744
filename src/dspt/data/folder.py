"""Image folders (`--dataset folder`): one sub-folder per class, optionally inside train/ val/ test/ folders;
an optional JSON/TXT map from folder name to class name."""
from __future__ import annotations

import os
from pathlib import Path

from .base import DataError
from .imagefolder import load_image_folder
from .registry import DataSplits, register_dataset
from .sampling import stratified_split


@register_dataset("folder", description="your images: one sub-folder per class (--data FOLDER)")
def folder_dataset(
    root: str | os.PathLike | None = None,
    test_root: str | os.PathLike | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    classnames: str | os.PathLike | None = None,
    **_: object,
) -> DataSplits:
    """Class-folder images. Test data: `test_root`, else a `test/` folder beside `train/`, else a seeded
    stratified `test_fraction` of the images (the split seed is recorded with the run)."""
    if root is None:
        raise DataError("no data given; pass --data FOLDER (one sub-folder of images per class)")
    root = Path(root).expanduser()
    if root.is_file() and root.suffix.lower() in (".csv", ".tsv", ".tab"):
        # --data labels.csv works without --dataset csv. Imported here, not above, so that 'folder' is registered
        # (and listed) before 'csv', which the table module registers when imported.
        from .table import load_table

        return load_table(root, classnames, test_fraction, seed, test_root)
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


def _split_dirs(root: Path) -> dict[str, Path]:
    """{'train': ..., 'test': ..., 'val': ...} when `root` is laid out as split folders of class folders."""
    subdirs = {d.name.lower(): d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
    aliases = {"train": ("train", "training"), "test": ("test", "testing"), "val": ("val", "valid", "validation")}
    found = {k: subdirs[a] for k, names in aliases.items() for a in names if a in subdirs}
    return found if "train" in found and set(subdirs) <= {a for names in aliases.values() for a in names} else {}
