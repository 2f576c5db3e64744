"""Image folders (`--dataset folder`): one sub-folder per class, optionally inside train/ val/ test/ folders;
an optional JSON/TXT map from folder name to class name."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .base import DataError, ImageDataset, is_image, natural_key, read_name_file
from .registry import DataSplits, register_dataset
from .sampling import stratified_split


def read_classname_map(path: str | os.PathLike) -> dict[str, str]:
    """JSON {"folder": "name"} or TXT lines "folder name with spaces"."""
    text, data = read_name_file(path, "pass a JSON {folder: name} or TXT 'folder name' file")
    if data is not None:
        if not isinstance(data, dict):
            raise DataError(f"class-name file '{path}' must hold a JSON object {{folder: name}}")
        return {str(k): str(v) for k, v in data.items()}
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2:
            raise DataError(f"{path}:{n}: expected 'folder class name', got '{line.strip()}'")
        out[parts[0]] = parts[1]
    return out


def load_image_folder(
    root: str | os.PathLike,
    classnames: str | os.PathLike | dict[str, str] | None = None,
    class_folders: list[str] | None = None,
    name: str = "folder",
) -> ImageDataset:
    """`root/<class>/<image>`; classes ordered naturally ('2' before '10') unless `class_folders` is given.

    `class_folders` fixes the class list (e.g. the train folder's, when reading the test folder), so a
    test folder that lacks a class still maps every label to the same index.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder '{root}' not found; pass a folder with one sub-folder of images per class")
    found = sorted((d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=natural_key)
    if class_folders is None:
        class_folders = found
        if len(class_folders) < 2:
            raise DataError(f"data folder '{root}' has {len(class_folders)} class sub-folder(s); "
                            "it needs one sub-folder of images per class (at least 2)")
    else:
        extra = sorted(set(found) - set(class_folders))
        if extra:
            raise DataError(f"'{root}' has class folder(s) {extra[:5]} that the training data does not have")
    mapping = read_classname_map(classnames) if isinstance(classnames, (str, os.PathLike)) else (classnames or {})
    paths, labels = [], []
    for label, folder in enumerate(class_folders):
        d = root / folder
        files = sorted((p for p in d.rglob("*") if p.is_file() and is_image(p)), key=lambda p: natural_key(str(p))) \
            if d.is_dir() else []
        if not files and folder in found:
            raise DataError(f"class folder '{d}' holds no images; add images or remove the folder")
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    missing = [f for f in class_folders if f not in mapping] if mapping else []
    if mapping and missing:
        raise DataError(f"class-name file has no name for folder(s) {missing[:5]}; add them or drop the file")
    names = [mapping.get(f, f).replace("_", " ") for f in class_folders]
    return ImageDataset(paths=paths, labels=np.asarray(labels, dtype=np.int64), classnames=names, name=name,
                        meta={"root": str(root), "class_folders": list(class_folders)})


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
