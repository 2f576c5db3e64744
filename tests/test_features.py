"""The frozen feature cache: keyed by the files' stamps, shared-cache friendly permissions, hits on reuse."""
from __future__ import annotations

import os

import pytest

import dspt.features as F
import dspt.io
from dspt.backbone import load_backbone
from dspt.data import ImageDataset

from imagefolders import make_image_folder


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("dspt-tiny")


def _dataset(root) -> ImageDataset:
    paths = sorted(str(p) for p in root.rglob("*.png"))
    return ImageDataset(paths, [0, 1] * (len(paths) // 2), ["a", "b"], name="toy")


def test_default_cache_dir_is_reexported():
    assert F.default_cache_dir is dspt.io.default_cache_dir


def test_cache_key_follows_the_file_stamps(tiny, tmp_path):
    make_image_folder(tmp_path / "img", classes=2, per_class=2)
    ds = _dataset(tmp_path / "img")
    key = F.cache_key(tiny, ds, "test", views=0, seed=0)
    assert F.cache_key(tiny, ds, "test", views=0, seed=0) == key
    first = ds.paths[0]
    st = os.stat(first)
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))  # rewritten in place: new mtime
    touched = F.cache_key(tiny, ds, "test", views=0, seed=0)
    assert touched["files"] != key["files"] and {k for k in key if key[k] != touched[k]} == {"files"}
    os.remove(first)
    assert F.cache_key(tiny, ds, "test", views=0, seed=0)["files"] not in (key["files"], touched["files"])


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_cached_features_are_group_readable_and_reused(tiny, tmp_path):
    make_image_folder(tmp_path / "img", classes=2, per_class=2, size=16)
    ds = _dataset(tmp_path / "img")
    old = os.umask(0o002)  # a cache shared by a group
    try:
        first = F.cached_features(tiny, ds, "test", cache_dir=tmp_path / "cache")
    finally:
        os.umask(old)
    assert not first.hit and first.path.stat().st_mode & 0o777 == 0o664
    again = F.cached_features(tiny, ds, "test", cache_dir=tmp_path / "cache")
    assert again.hit and again.path == first.path and (again.features == first.features).all()


def _build_in_child(args) -> tuple[bool, str]:
    """A sweep worker wanting the same features: records every encoding it does, then returns (hit, digest)."""
    ds, cache, log, go = args
    import time

    real = F.encode_paths

    def counted(*a, **k):
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # a slow encoder: the other worker arrives while this one is still at work
        return real(*a, **k)

    F.encode_paths = counted
    while not os.path.exists(go):  # both start at once
        time.sleep(0.01)
    got = F.cached_features(load_backbone("dspt-tiny"), ds, "train", views=1, seed=0, cache_dir=cache)
    return got.hit, got.key


def test_concurrent_workers_encode_a_key_once(tmp_path):
    import multiprocessing as mp

    make_image_folder(tmp_path / "img", classes=2, per_class=3, size=8)
    ds, log, go = _dataset(tmp_path / "img"), tmp_path / "encodes.log", tmp_path / "go"
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        pending = pool.map_async(_build_in_child, [(ds, tmp_path / "cache", log, go)] * 2)
        go.touch()
        results = pending.get(timeout=120)
    encoders = set(log.read_text().split())
    assert len(encoders) == 1, "both workers encoded the same views"
    assert sorted(hit for hit, _ in results) == [False, True] and len({k for _, k in results}) == 1
