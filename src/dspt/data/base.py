"""The one dataset type every loader returns: image paths, integer labels, class names."""
from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from ..io import default_cache_dir

__all__ = ["DataError", "IMAGE_EXTENSIONS", "ImageDataset", "cache_root", "find_bad_images", "image_is_readable",
           "is_image", "load_image", "natural_key", "read_name_file"]

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


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """dspt's cache folder (the run's --cache-dir, else $DSPT_CACHE or ~/.cache/dspt); generated split and
    few-shot files live here, never in the data folder."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return default_cache_dir()


def read_name_file(path: str | os.PathLike, fix: str) -> tuple[str, object | None]:
    """(text, parsed JSON or None) of a class-name file, or a DataError naming the file and `fix`."""
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


def image_is_readable(path: str) -> bool:
    """Whether PIL can decode the whole image (not just its header)."""
    try:
        with Image.open(path) as img:
            img.load()
    except Exception:
        return False
    return True


def find_bad_images(paths: list[str]) -> list[str]:
    """Paths PIL cannot decode, in their order (each image decoded fully, several at a time: PIL decodes
    without holding the GIL)."""
    paths = list(paths)
    if len(paths) < 16:
        return [path for path in paths if not image_is_readable(path)]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        readable = list(pool.map(image_is_readable, paths))
    return [path for path, ok in zip(paths, readable) if not ok]


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
