"""Shared fixtures. Dataset fixtures (fake trees, the shared real photos) are used by tests/test_datasets*.py."""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

#: the `browser` fixture (headless Chromium) of tests/browser.py, for the review page's and the report's tests
pytest_plugins = ("browser",)


@pytest.fixture(scope="session", autouse=True)
def offline_one_thread():
    """No test reaches the network (local AF_UNIX sockets stay usable); one torch thread, so parallel
    processes on a small machine do not oversubscribe its cores."""
    import socket

    import torch

    connect = socket.socket.connect

    def guarded_connect(self, address, *a, **k):
        if self.family == getattr(socket, "AF_UNIX", None):
            return connect(self, address, *a, **k)
        raise OSError(f"a dspt test tried to reach the network: {address!r}")

    def no_lookup(*a, **k):
        raise OSError(f"a dspt test tried to resolve a host name: {a[:1]!r}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", guarded_connect)
        mp.setattr(socket, "getaddrinfo", no_lookup)
        mp.setattr(socket, "create_connection", no_lookup)
        mp.setenv("HF_HUB_OFFLINE", "1")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


@pytest.fixture
def hermetic_hub(tmp_path, monkeypatch) -> Path:
    """An empty model cache of the test's own: huggingface_hub's (HF_HOME, HF_HUB_CACHE, read by
    huggingface_hub at import, so its constants are patched too) and open_clip's URL downloads (~/.cache/clip,
    so HOME), with offline mode on. Results never depend on what the user's cache holds. Returns the hub cache
    folder (huggingface_hub's layout: models--ORG--NAME/{refs,snapshots})."""
    from huggingface_hub import constants

    home = tmp_path / "home"
    hf_home = home / ".cache" / "huggingface"
    hub = hf_home / "hub"
    hub.mkdir(parents=True)
    for var, value in {"HOME": home, "XDG_CACHE_HOME": home / ".cache", "HF_HOME": hf_home,
                       "HF_HUB_CACHE": hub, "HUGGINGFACE_HUB_CACHE": hub}.items():
        monkeypatch.setenv(var, str(value))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HUGGINGFACE_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """3 classes x 8 images of 16x16: each class its own colour range, so training moves test accuracy."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog", "car"]):
        (root / name).mkdir()
        for i in range(8):
            pixels = (rng.random((16, 16, 3)) * 80 + c * 80).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


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
