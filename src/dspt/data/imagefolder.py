"""One folder of class sub-folders read as an `ImageDataset` (shared by the folder and table datasets: a table's
test images may be a folder), and the optional map from folder name to class name."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .base import DataError, ImageDataset, is_image, natural_key, read_name_file


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
