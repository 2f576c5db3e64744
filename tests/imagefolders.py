"""Small generated image folders for tests: each class a distinct colour pattern, so classes are learnable."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (220, 200, 40), (200, 40, 200), (40, 200, 200)]


def make_image_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 24, seed: int = 0,
                      ext: str = "png") -> Path:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = Path(root) / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.array(COLOURS[c % len(COLOURS)], dtype=np.float64)
            img = np.clip(base[None, None] + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i:03d}.{ext}")
    return Path(root)


def make_split_folders(root: Path, classes: int = 3, train: int = 8, test: int = 4, size: int = 24) -> Path:
    make_image_folder(Path(root) / "train", classes, train, size, seed=1)
    make_image_folder(Path(root) / "test", classes, test, size, seed=2)
    return Path(root)
