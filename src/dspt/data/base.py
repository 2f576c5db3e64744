"""The one dataset type every loader returns: image paths, integer labels, class names."""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class DataError(ValueError):
    """Bad or missing data: the message names the file or folder and the fix."""


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

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.paths) != len(self.labels):
            raise DataError(f"{self.name}: {len(self.paths)} paths but {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classnames)):
            bad = int(self.labels[(self.labels < 0) | (self.labels >= len(self.classnames))][0])
            raise DataError(f"{self.name}: label {bad} is outside the {len(self.classnames)} classes")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def subset(self, indices: np.ndarray | list[int]) -> "ImageDataset":
        idx = np.asarray(indices, dtype=np.int64)
        return replace(self, paths=[self.paths[i] for i in idx], labels=self.labels[idx], meta=dict(self.meta))

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
