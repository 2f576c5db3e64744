"""The one dataset type every loader returns: image paths, integer labels, class names."""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from ..errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")




def natural_key(text: str) -> list:
    """'2' before '10': class folders named 1..102 keep their numeric order."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


@dataclass
class ImageDataset:
    paths: list[str]
    labels: np.ndarray
    classnames: list[str]
    name: str = "folder"
    template: str = "a photo of a {}."
    meta: dict = field(default_factory=dict)
    #: labels shipped with the data that may be wrong (real noise: CIFAR-N, a CSV's noisy column), aligned
    #: with `paths`; `labels` then holds the clean labels. None when the data ships one label per image.
    noisy_labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.paths) != len(self.labels):
            raise DataError(f"{self.name}: {len(self.paths)} paths but {len(self.labels)} labels")
        self._check_range(self.labels, "label")
        if self.noisy_labels is not None:
            self.noisy_labels = np.asarray(self.noisy_labels, dtype=np.int64)
            if self.noisy_labels.shape != self.labels.shape:
                raise DataError(f"{self.name}: {len(self.noisy_labels)} noisy labels for {len(self.labels)} images")
            self._check_range(self.noisy_labels, "noisy label")

    def _check_range(self, labels: np.ndarray, what: str) -> None:
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classnames)):
            i = int(np.flatnonzero((labels < 0) | (labels >= len(self.classnames)))[0])
            raise DataError(f"{self.name}: {what} {int(labels[i])} of '{self.paths[i]}' is outside the "
                            f"{len(self.classnames)} classes")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def subset(self, indices: np.ndarray | list[int]) -> "ImageDataset":
        idx = np.asarray(indices, dtype=np.int64)
        noisy = None if self.noisy_labels is None else self.noisy_labels[idx]
        return replace(self, paths=[self.paths[i] for i in idx], labels=self.labels[idx], meta=dict(self.meta),
                       noisy_labels=noisy)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def fingerprint(self) -> str:
        """Changes when any file, its size or mtime, its label, or the class list changes."""
        digest = hashlib.sha256()
        digest.update("\n".join(self.classnames).encode())
        for path, label in zip(self.paths, self.labels.tolist()):
            try:
                st = os.stat(path)
                stamp = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                stamp = "missing"
            digest.update(f"{path}|{label}|{stamp}\n".encode())
        return digest.hexdigest()


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """dspt's cache folder (the run's --cache-dir, else $DSPT_CACHE or ~/.cache/dspt); generated split and
    few-shot files live here, never in the data folder."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    from ..features import default_cache_dir  # lazy: features imports this module

    return default_cache_dir()


def read_name_file(path: str | os.PathLike, fix: str) -> tuple[str, object | None]:
    """(text, parsed JSON or None) of a class-name file, or a DataError naming the file and `fix`."""
    import json

    path = Path(path)
    if not path.is_file():
        raise DataError(f"class-name file '{path}' not found; {fix}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() != ".json":
        return text, None
    try:
        return text, json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"class-name file '{path}' is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def load_image(path: str) -> Image.Image:
    """RGB image, or a DataError naming the file."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image file '{path}' not found; check the dataset folder") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read image '{path}' ({type(exc).__name__}); remove or replace the file, "
                        "or pass --skip-bad-images") from None


def find_bad_images(paths: list[str]) -> list[str]:
    """Paths PIL cannot decode (checked fully, not just the header)."""
    bad = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.load()
        except Exception:
            bad.append(path)
    return bad


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
