"""Shared fixtures. Dataset fixtures (fake trees, the shared real photos) are used by tests/test_datasets*.py."""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def shared_data_dir() -> Path:
    """../shared/data beside the repository, or $DSPT_SHARED_DATA."""
    env = os.environ.get("DSPT_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def write_jpeg(path: Path, seed: int = 0, size: int = 8) -> Path:
    """A tiny real JPEG (random colours), so loaders and PIL both accept it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, "JPEG")
    return path


@pytest.fixture
def jpeg():
    return write_jpeg


@pytest.fixture(scope="session")
def flowers_valid(tmp_path_factory) -> Path:
    """The real Flowers-102 'valid' photos (818 images, folders 1..102), extracted once per session."""
    tar = shared_data_dir() / "flowers102_valid.tar"
    if not tar.is_file():
        pytest.skip(f"real Flowers-102 photos not available ({tar} missing; set DSPT_SHARED_DATA)")
    out = tmp_path_factory.mktemp("flowers")
    with tarfile.open(tar) as tf:
        tf.extractall(out, filter="data")
    found = list(out.rglob("valid"))
    assert found, "flowers102_valid.tar has no valid/ folder"
    return found[0]


@pytest.fixture(scope="session")
def flowers_names() -> Path:
    path = shared_data_dir() / "flowers102_cat_to_name.json"
    if not path.is_file():
        pytest.skip(f"Flowers-102 class names not available ({path} missing; set DSPT_SHARED_DATA)")
    return path
