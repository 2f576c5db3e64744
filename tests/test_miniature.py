"""The demo's world: the seeded four-way digit split and the textured paper of the tuning domain."""
import numpy as np

from dspt.miniature import PAPER, render_digit, split_digits


def test_digit_split_is_disjoint_stratified_and_seeded():
    images, labels, *parts = split_digits(0)
    assert sum(len(p) for p in parts) == len(labels) == 1797
    assert len(set().union(*map(set, parts))) == 1797
    again = split_digits(0)[2:]
    assert all((a == b).all() for a, b in zip(parts, again))
    assert any((a != b).any() for a, b in zip(parts, split_digits(1)[2:]) if len(a) == len(b))
    for p in parts:
        assert set(labels[p]) == set(range(10))


def test_textured_paper_is_one_fixed_grain_on_every_image():
    blank = np.zeros((8, 8), dtype=np.float32)
    digit = np.zeros((8, 8), dtype=np.float32)
    digit[2:6, 3] = 1.0
    a, b = np.asarray(render_digit(blank, paper=True)), np.asarray(render_digit(blank, paper=True))
    assert (a == b).all() and a.std() > 20  # deterministic, and visibly textured
    grain = np.random.default_rng(PAPER["seed"]).normal(0.0, PAPER["sigma"], (32, 32))
    assert (a[..., 0] == np.clip(grain, 0, 255).astype(np.uint8)).all()  # blank paper shows the grain alone
    plain, paper = np.asarray(render_digit(digit)), np.asarray(render_digit(digit, paper=True))
    assert (plain != paper).any() and (np.asarray(render_digit(digit)) == plain).all()


def test_world_is_written_once_as_image_folders(tmp_path, monkeypatch):
    """build_world writes tune/train, tune/val and test as class folders, and a second call rewrites nothing."""
    from dspt import miniature

    small = tuple(p[:: 40] for p in split_digits(0)[2:])  # a few images per part: fast
    images, labels = split_digits(0)[:2]
    monkeypatch.setattr(miniature, "split_digits", lambda seed: (images, labels, *small))
    world = miniature.build_world(0, tmp_path)
    assert world["root"].name == f"digits-v{miniature.WORLD_VERSION}-seed0"
    files = {split: sorted((world["root"] / split).rglob("*.png")) for split in ("tune/train", "tune/val", "test")}
    assert [len(f) for f in files.values()] == [len(small[1]), len(small[2]), len(small[3])]
    assert {f.parent.name for f in files["test"]} <= set(miniature.DIGIT_NAMES)
    stamp = files["test"][0].stat().st_mtime_ns
    miniature.build_world(0, tmp_path)
    assert files["test"][0].stat().st_mtime_ns == stamp
