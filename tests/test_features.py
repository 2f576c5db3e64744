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
