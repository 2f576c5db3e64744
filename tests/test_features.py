"""The frozen feature cache, kept per image: content digests, view seeds that follow the image, reuse by any
list of encoded images, bad shards, merges, the old layout, permissions and concurrent workers."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from imagefolders import make_image_folder

import dspt.features as F
import dspt.io
from dspt.backbone import load_backbone
from dspt.data import ImageDataset


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("dspt-tiny")


def _dataset(root) -> ImageDataset:
    paths = sorted(str(p) for p in root.rglob("*.png"))
    return ImageDataset(paths, [0, 1] * (len(paths) // 2), ["a", "b"], name="toy")


def test_default_cache_dir_is_reexported():
    assert F.default_cache_dir is dspt.io.default_cache_dir


def test_digests_follow_the_content_and_are_memoised(tmp_path):
    """A digest is the file's content: a copy shares it, an in-place rewrite changes it, and a known stamp is
    not read again."""
    import shutil

    from dspt.image_identity import image_digests

    make_image_folder(tmp_path / "img", classes=2, per_class=2)
    paths = sorted(str(p) for p in (tmp_path / "img").rglob("*.png"))
    shutil.copy(paths[0], tmp_path / "copy.png")
    first = image_digests(paths + [str(tmp_path / "copy.png")], tmp_path / "cache")
    assert (first[0] == first[-1]).all() and len({d.tobytes() for d in first[:-1]}) == len(paths)
    reads = []
    real = F.image_digests.__globals__["_content_digest"]
    F.image_digests.__globals__["_content_digest"] = lambda p: reads.append(p) or real(p)
    try:
        assert (image_digests(paths, tmp_path / "cache") == first[:-1]).all() and reads == []  # from the memo
        with open(paths[1], "r+b") as fh:  # rewritten in place: new bytes, new stamp
            fh.seek(40)
            fh.write(b"\x00\x01\x02")
        again = image_digests(paths, tmp_path / "cache")
    finally:
        F.image_digests.__globals__["_content_digest"] = real
    assert reads == [os.path.abspath(paths[1])]
    assert (again[1] != first[1]).any() and (np.delete(again, 1, 0) == np.delete(first[:-1], 1, 0)).all()


def test_a_missing_image_is_one_line(tmp_path):
    from dspt.errors import DataError
    from dspt.image_identity import image_digests

    with pytest.raises(DataError, match="not found"):
        image_digests([str(tmp_path / "gone.png")], tmp_path / "cache")


def test_view_seeds_depend_on_the_image_not_its_position():
    from dspt.image_identity import image_view_seeds

    d = np.random.default_rng(0).integers(0, 256, (50, 16), dtype=np.uint8)
    s = image_view_seeds(d, 0, 1)
    assert (image_view_seeds(d[::-1], 0, 1) == s[::-1]).all()  # any order, same seed per image
    assert len(set(s.tolist())) == 50 and s.min() >= 0 and s.max() < 2**31
    assert (image_view_seeds(d, 0, 2) != s).all() and (image_view_seeds(d, 1, 1) != s).all()


def test_any_list_of_encoded_images_is_served_without_encoding(tiny, tmp_path):
    """A subset in another order, a relabelled listing and a copy of an image all reuse the stored views, and
    the augmented views equal those of the full list (their seeds follow the image)."""
    import shutil

    make_image_folder(tmp_path / "img", classes=2, per_class=4, size=16)
    full = _dataset(tmp_path / "img")
    cache = tmp_path / "cache"
    first = F.cached_features(tiny, full, "train", views=2, seed=3, cache_dir=cache)
    assert not first.hit and first.encoded == len(full) * 3 and first.features.shape[:2] == (3, len(full))
    shutil.copy(full.paths[2], tmp_path / "copy.png")
    order = [5, 2, 7]
    sub = ImageDataset([full.paths[i] for i in order] + [str(tmp_path / "copy.png")], [1, 1, 1, 0], ["a", "b"],
                       name="other")
    got = F.cached_features(tiny, sub, "fold", views=2, seed=3, cache_dir=cache)
    assert got.hit and got.encoded == 0
    assert torch.equal(got.features, first.features[:, order + [2]])
    more = F.cached_features(tiny, full, "train", views=3, seed=3, cache_dir=cache)  # one new view only
    assert more.encoded == len(full) and torch.equal(more.features[:3], first.features)
    other_seed = F.cached_features(tiny, sub, "train", views=1, seed=4, cache_dir=cache)
    assert other_seed.encoded == 3 and torch.equal(other_seed.features[0], got.features[0])  # 3 distinct images
    assert not torch.equal(other_seed.features[1], got.features[1])


def test_augmented_views_equal_a_direct_encoding(tiny, tmp_path):
    from dspt.image_identity import image_digests, image_view_seeds

    make_image_folder(tmp_path / "img", classes=2, per_class=2, size=16)
    ds = _dataset(tmp_path / "img")
    got = F.cached_features(tiny, ds, "train", views=1, seed=0, cache_dir=tmp_path / "cache")
    seeds = image_view_seeds(image_digests(ds.paths, tmp_path / "cache"), 0, 1)
    want = F.encode_paths(tiny, ds.paths, tiny.train_transform(), seeds=seeds)
    assert torch.equal(got.features[1], want)
    assert torch.equal(got.features[0], F.encode_paths(tiny, ds.paths, tiny.test_transform()))


def test_a_bad_shard_is_ignored_and_its_images_encoded_again(tiny, tmp_path, caplog):
    make_image_folder(tmp_path / "img", classes=2, per_class=2, size=16)
    ds = _dataset(tmp_path / "img")
    first = F.cached_features(tiny, ds, "test", cache_dir=tmp_path / "cache")
    (shard,) = first.path.glob("*.safetensors")
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    again = F.cached_features(tiny, ds, "test", cache_dir=tmp_path / "cache")
    assert again.encoded == len(ds) and torch.equal(again.features, first.features)
    assert "unreadable" in caplog.text


def test_many_shards_are_merged(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(F, "_MERGE_AT", 2)
    make_image_folder(tmp_path / "img", classes=2, per_class=3, size=16)
    ds = _dataset(tmp_path / "img")
    for i in range(len(ds)):  # one image at a time: one shard each, until they are merged
        F.cached_features(tiny, ImageDataset([ds.paths[i]], [0], ["a", "b"]), "test", cache_dir=tmp_path / "cache")
    whole = F.cached_features(tiny, ds, "test", cache_dir=tmp_path / "cache")
    assert whole.hit and len(list(whole.path.glob("*.safetensors"))) <= 2
    assert torch.allclose(whole.features[0], F.encode_paths(tiny, ds.paths, tiny.test_transform()), atol=1e-6)


def test_an_old_cache_is_named_with_the_fix(tiny, tmp_path, caplog):
    make_image_folder(tmp_path / "img", classes=2, per_class=1, size=16)
    (tmp_path / "cache" / "features").mkdir(parents=True)
    (tmp_path / "cache" / "features" / "toy-test-0123.safetensors").write_bytes(b"x" * 2048)
    F.cached_features(tiny, _dataset(tmp_path / "img"), "test", cache_dir=tmp_path / "cache")
    assert "old per-list layout" in caplog.text and "rm " in caplog.text


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_cached_features_are_group_readable_and_reused(tiny, tmp_path):
    make_image_folder(tmp_path / "img", classes=2, per_class=2, size=16)
    ds = _dataset(tmp_path / "img")
    old = os.umask(0o002)  # a cache shared by a group
    try:
        first = F.cached_features(tiny, ds, "test", cache_dir=tmp_path / "cache")
    finally:
        os.umask(old)
    shards = list(first.path.glob("*.safetensors"))
    assert not first.hit and shards and all(f.stat().st_mode & 0o777 == 0o664 for f in shards)
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
