"""False-positive noise (symflip / pairflip), few-shot files, real noise (CIFAR-N, Food-101N, noisy lists),
the config fields that drive them, and end-to-end runs on fake trees with the tiny random model."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_jpeg
from dspt.config import ConfigError, RunConfig
from dspt.data import (DataError, ImageDataset, cached_few_shot, false_positive_shots, given_labels, load_cifar,
                       load_data, load_food101n, read_cifarn, select_training)
from dspt.noise import make_noisy_labels


def _labels(c: int, per: int) -> np.ndarray:
    return np.repeat(np.arange(c), per)[np.random.default_rng(5).permutation(c * per)]


@pytest.mark.parametrize("mode", ["symflip", "pairflip"])
@pytest.mark.parametrize("shots,fp", [(16, 0), (16, 2), (16, 8), (16, 12), (8, 4), (1, 0), (2, 1)])
def test_false_positive_shots_exact_counts(mode, shots, fp):
    c = 6
    labels = _labels(c, 40)
    idx, given = false_positive_shots(labels, c, shots, fp, mode, seed=3)
    assert len(idx) == len(set(idx.tolist())) == c * shots  # no image used twice
    assert np.all(np.diff(idx) > 0)
    true = labels[idx]
    for k in range(c):
        mine = given == k
        assert mine.sum() == shots
        assert (true[mine] != k).sum() == fp  # exactly FP false positives per class
        if mode == "pairflip":
            assert set(true[mine & (true != k)].tolist()) <= {(k + 1) % c}
    nl = make_noisy_labels(true, c, mode, fp / shots, seed=3, given=given)
    assert nl.realised_rate == fp / shots and int(nl.is_noisy.sum()) == c * fp


def test_false_positive_shots_deterministic_and_uniform_sources():
    labels = _labels(10, 50)
    a = false_positive_shots(labels, 10, 16, 8, "symflip", seed=0)
    b = false_positive_shots(labels, 10, 16, 8, "symflip", seed=0)
    other = false_positive_shots(labels, 10, 16, 8, "symflip", seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], other[0])
    idx, given = a
    sources = labels[idx][labels[idx] != given]
    assert len(set(sources.tolist())) == 10  # symflip draws from all other classes


def test_false_positive_shots_errors():
    labels = np.repeat(np.arange(3), [10, 10, 5])
    names = ["cat", "dog", "fox"]
    with pytest.raises(DataError, match=r"class 'fox' has 5 training images, fewer than the 6 true shots of symflip "
                                        r"with --shots 8 --fp 2"):
        false_positive_shots(labels, 3, 8, 2, "symflip", 0, names)
    with pytest.raises(DataError, match=r"pairflip: class 'fox' has 1 image\(s\) left after its own 4 true shots, "
                                        r"fewer than the 2 false positives of class 'dog'"):
        false_positive_shots(labels, 3, 6, 2, "pairflip", 0, names)
    with pytest.raises(DataError, match=r"symflip: only 0 unused image\(s\) of other classes are left as false "
                                        r"positives for class 'cat', fewer than --fp 1"):
        false_positive_shots(np.array([0, 0, 0, 1]), 2, 2, 1, "symflip", 0, names[:2])
    with pytest.raises(DataError, match=r"--fp 8 must be in \[0, 7\]"):
        false_positive_shots(labels, 3, 8, 8, "symflip", 0)
    with pytest.raises(ValueError, match="chooses the K-shot subset"):
        make_noisy_labels(labels, 3, "symflip", 0.25, seed=0)


def test_few_shot_files_live_in_the_cache(tmp_path):
    ds = ImageDataset([f"/data/x/{i}.jpg" for i in range(60)], _labels(3, 20), ["a", "b", "c"], name="toy",
                      meta={"root": "/data/x"})
    idx, given = cached_few_shot(ds, 8, 2, tmp_path, noise="symflip", fp=2)
    files = list((tmp_path / "fewshot" / "toy").glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("train-k8-s2-symflip-fp2-")
    rec = json.loads(files[0].read_text())
    assert rec["indices"] == idx.tolist() and rec["given"] == given.tolist() and rec["paths"][0].endswith(".jpg")
    again, _ = cached_few_shot(ds, 8, 2, tmp_path, noise="symflip", fp=2)
    assert np.array_equal(again, idx)
    plain, none = cached_few_shot(ds, 4, 2, tmp_path)
    assert none is None and len(plain) == 12
    assert {f.name.split("-")[1] for f in (tmp_path / "fewshot" / "toy").glob("*.json")} == {"k8", "k4"}
    files[0].write_text("{broken")
    idx2, _ = cached_few_shot(ds, 8, 2, tmp_path, noise="symflip", fp=2)  # rebuilt, identical
    assert np.array_equal(idx2, idx)


def test_config_resolves_fp_rate_template_and_root(tmp_path, monkeypatch):
    cfg = RunConfig(data="x", noise="symflip", shots=16, fp=8).resolved()
    assert cfg.noise_rate == 0.5 and cfg.template == "a photo of a {}."
    assert RunConfig(data="x", noise="pairflip", shots=16, noise_rate=0.25).resolved().fp == 4
    with pytest.raises(ConfigError, match="is rate 0.5, not --noise-rate 0.25"):
        RunConfig(data="x", noise="symflip", shots=16, fp=8, noise_rate=0.25).resolved()
    with pytest.raises(ConfigError, match=r"needs --fp N"):
        RunConfig(data="x", noise="symflip", shots=16).resolved()
    with pytest.raises(ConfigError, match=r"pass --shots K"):
        RunConfig(data="x", noise="symflip", shots=0, fp=1).resolved()
    with pytest.raises(ConfigError, match=r"--fp 16 must be in \[0, 15\]"):
        RunConfig(data="x", noise="symflip", shots=16, fp=16).resolved()
    with pytest.raises(ConfigError, match="--fp is for --noise symflip"):
        RunConfig(data="x", noise="sym", fp=2).resolved()
    with pytest.raises(ConfigError, match="use them with --noise given"):
        RunConfig(data="x", noise_file="n.pt").resolved()
    with pytest.raises(ConfigError, match="drop --noise-rate"):
        RunConfig(data="x", noise="given", noise_rate=0.2).resolved()
    monkeypatch.delenv("DSPT_DATA", raising=False)
    with pytest.raises(ConfigError, match="no data root for dtd; pass --root DIR"):
        RunConfig(dataset="dtd").resolved()
    monkeypatch.setenv("DSPT_DATA", str(tmp_path))
    cfg = RunConfig(dataset="Flowers102").resolved()
    assert cfg.dataset == "oxford_flowers" and cfg.root == str(tmp_path)
    assert cfg.template == "a photo of a {}, a type of flower."
    assert RunConfig(dataset="dtd", template="{} pattern.", root="r").resolved().template == "{} pattern."
    with pytest.raises(ConfigError, match="unknown dataset 'mnist'"):
        RunConfig(dataset="mnist", root="r").resolved()


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 pickles and CIFAR-N label files


def make_cifar(root: Path, which: int = 10, per_batch: int = 6, n_test: int = 10) -> np.ndarray:
    rng = np.random.default_rng(0)
    if which == 10:
        d = root / "cifar-10-batches-py"
        d.mkdir(parents=True)
        labels = rng.permutation(np.arange(5 * per_batch) % 10).tolist()  # every class present
        for b in range(1, 6):
            lab = labels[(b - 1) * per_batch:b * per_batch]
            with open(d / f"data_batch_{b}", "wb") as fh:
                pickle.dump({b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), b"labels": lab}, fh)
        with open(d / "test_batch", "wb") as fh:
            pickle.dump({b"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
                         b"labels": rng.integers(0, 10, n_test).tolist()}, fh)
        names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        with open(d / "batches.meta", "wb") as fh:
            pickle.dump({b"label_names": [n.encode() for n in names]}, fh)
        return np.asarray(labels)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    n = per_batch * 5
    labels = rng.integers(0, 100, n)
    for split, count, lab in (("train", n, labels), ("test", n_test, rng.integers(0, 100, n_test))):
        with open(d / split, "wb") as fh:
            pickle.dump({"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8), "fine_labels": lab.tolist()}, fh)
    with open(d / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": [f"class_{i}" for i in range(100)]}, fh)
    return labels


def test_cifar10_pickles_become_ordered_pngs_in_the_cache(tmp_path):
    labels = make_cifar(tmp_path / "data")
    s = load_cifar(10, tmp_path / "data", tmp_path / "cache")
    assert s.classnames[:2] == ["airplane", "automobile"] and len(s.train) == 30 and len(s.test) == 10
    assert np.array_equal(s.train.labels, labels)  # original order
    assert all(p.startswith(str(tmp_path / "cache")) for p in s.train.paths)
    from PIL import Image

    with Image.open(s.train.paths[7]) as img:
        assert img.size == (32, 32)
    assert not any((tmp_path / "data").rglob("*.png"))
    assert load_data("cifar-10", root=tmp_path / "data", cache_dir=tmp_path / "cache").train.paths == s.train.paths


def test_cifar10n_label_sets(tmp_path):
    labels = make_cifar(tmp_path / "data")
    s = load_cifar(10, tmp_path / "data", tmp_path / "cache")
    worse = labels.copy()
    worse[:12] = (worse[:12] + 1) % 10
    pt = tmp_path / "CIFAR-10_human.pt"
    torch.save({"clean_label": labels, "worse_label": worse, "aggre_label": labels.copy(),
                "random_label1": labels.copy()}, pt)
    given = read_cifarn(pt, "worse", s.train)
    assert np.array_equal(given, worse)
    with pytest.raises(DataError, match="has label sets aggre, worse, random1; choose one with --label-set"):
        read_cifarn(pt, None, s.train)
    with pytest.raises(DataError, match="has no 'random_label3'"):
        read_cifarn(pt, "random3", s.train)
    with pytest.raises(DataError, match="has 30 labels but the training set has 29 images"):
        read_cifarn(pt, "worse", s.train.subset(np.arange(29)))
    shuffled = s.train.subset(np.arange(30)[::-1])
    with pytest.raises(DataError, match="clean_label disagrees.*original CIFAR training order"):
        read_cifarn(pt, "worse", shuffled)
    sel = select_training(s.train, 0, 1, "given", noise_file=pt, label_set="worse", cache_dir=tmp_path / "cache")
    assert sel.info["pool_noise_rate"] == pytest.approx(12 / 30) and sel.info["clean_labels_known"]
    nl = make_noisy_labels(sel.train.labels, 10, "given", 0.0, seed=1, given=sel.given)
    assert nl.realised_rate == pytest.approx(12 / 30)


def test_cifar100n_single_label_set_and_foreign_objects(tmp_path):
    labels = make_cifar(tmp_path / "data", 100)
    s = load_data("cifar100", root=tmp_path / "data", cache_dir=tmp_path / "cache")
    assert s.classnames[3] == "class 3" and np.array_equal(s.train.labels, labels)
    noisy = (labels + 7) % 100
    torch.save({"clean_label": labels, "noisy_label": noisy}, tmp_path / "CIFAR-100_human.pt")
    assert np.array_equal(read_cifarn(tmp_path / "CIFAR-100_human.pt", None, s.train), noisy)
    torch.save({"noisy_label": noisy, "extra": Path("x")}, tmp_path / "odd.pt")
    with pytest.raises(DataError, match="holds objects other than arrays"):
        read_cifarn(tmp_path / "odd.pt", None, s.train)


class _WritesMarker:
    """Unpickling this runs code: it writes the file `path` (what a malicious label file could do)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({str(self.path)!r}, 'w').write('pwned')",))


def test_cifarn_files_load_without_running_code(tmp_path):
    labels = make_cifar(tmp_path / "data")
    s = load_cifar(10, tmp_path / "data", tmp_path / "cache")
    worse = (labels + 1) % 10
    pt = tmp_path / "CIFAR-10_human.pt"
    torch.save({"clean_label": labels.astype(np.int64), "worse_label": worse.astype(np.int32)}, pt)
    assert np.array_equal(read_cifarn(pt, "worse", s.train), worse)
    # a file written by torch's legacy format under numpy 1.x (numpy.core.multiarray) loads too
    legacy = tmp_path / "legacy.pt"
    torch.save({"clean_label": labels, "worse_label": worse}, legacy, _use_new_zipfile_serialization=False)
    raw = legacy.read_bytes()
    assert b"numpy._core.multiarray" in raw
    legacy.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert np.array_equal(read_cifarn(legacy, "worse", s.train), worse)
    # code in the pickle is refused, never run
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save({"clean_label": labels, "worse_label": _WritesMarker(marker)}, evil)
    with pytest.raises(DataError, match=r"label file '.*evil.pt' holds objects other than arrays"):
        read_cifarn(evil, "worse", s.train)
    assert not marker.exists()
    # so are arrays CIFAR-N never holds (object arrays unpickle arbitrary objects; floats are no labels)
    for name, value in (("objects", np.array([1, "x"], dtype=object)), ("floats", np.arange(30.0))):
        torch.save({"worse_label": value}, tmp_path / f"{name}.pt")
        with pytest.raises(DataError, match=rf"'.*{name}.pt' holds objects other than arrays of integers"):
            read_cifarn(tmp_path / f"{name}.pt", "worse", s.train)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(DataError, match=r"cannot read label file '.*junk.pt'"):
        read_cifarn(tmp_path / "junk.pt", "worse", s.train)


def test_cifar_pickles_load_without_running_code(tmp_path):
    make_cifar(tmp_path / "data")
    marker = tmp_path / "marker"
    with open(tmp_path / "data" / "cifar-10-batches-py" / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [b"cat"], b"x": _WritesMarker(marker)}, fh)
    with pytest.raises(DataError, match=r"CIFAR file '.*batches.meta' holds objects other than arrays "
                                        r"\(builtins.exec\)"):
        load_cifar(10, tmp_path / "data", tmp_path / "cache")
    assert not marker.exists()


def test_generic_noisy_list_and_given_errors(tmp_path):
    for c in ("cat", "dog"):
        for i in range(3):
            write_jpeg(tmp_path / "img" / c / f"{i}.jpg", seed=i)
    s = load_data("folder", root=tmp_path / "img", test_fraction=0.34, seed=0)
    lines = [f"{c}/{i}.jpg {'dog' if (c, i) == ('cat', 0) else c}" for c in ("cat", "dog") for i in range(3)]
    (tmp_path / "img" / "noisy.txt").write_text("\n".join(lines) + "\n")
    given, clean = given_labels(s.train, tmp_path / "img" / "noisy.txt")
    assert clean and len(given) == len(s.train)
    flipped = [p for p, g, t in zip(s.train.paths, given, s.train.labels) if g != t]
    assert flipped == ([str(tmp_path / "img" / "cat" / "0.jpg")] if flipped else [])
    (tmp_path / "img" / "short.txt").write_text("cat/1.jpg cat\n")
    with pytest.raises(DataError, match=r"has no label for \d of \d training images"):
        given_labels(s.train, tmp_path / "img" / "short.txt")
    with pytest.raises(DataError, match="--noise given needs labels shipped with the data"):
        given_labels(s.train)
    with pytest.raises(DataError, match="noise file '.*none.pt' not found"):
        given_labels(s.train, tmp_path / "none.pt")


def test_food101n_layout(tmp_path):
    from test_food101n import make_food101n_tree

    lists = {"verified_train": [("apple_pie/000.jpg", 1), ("apple_pie/001.jpg", 0), ("waffles/000.jpg", 1),
                                ("waffles/001.jpg", 1)],
             "verified_val": [("apple_pie/002.jpg", 1), ("waffles/002.jpg", 0)]}
    rels = make_food101n_tree(tmp_path, food101=False, **lists)
    with pytest.raises(DataError, match="tested on Food-101's test images.*food-101"):
        load_food101n(tmp_path)
    make_food101n_tree(tmp_path, **lists)
    s = load_data("food101n", root=tmp_path)
    # the one verified validation image is also in imagelist.tsv: it is left out of training
    assert s.classnames == ["apple pie", "waffles"] and (len(s.train), len(s.val), len(s.test)) == (7, 1, 2)
    assert len(rels) == 8 and s.train.meta["removed_validation_images"] == 1
    assert s.train.meta["labels_are_noisy"] and s.train.meta["verified_noise_rate"] == 0.25
    assert s.train.template == "a photo of {}, a type of food."
    sel = select_training(s.train, 2, 1, "given", cache_dir=tmp_path / "cache")
    assert not sel.info["clean_labels_known"] and np.array_equal(sel.given, sel.train.labels)


# ----------------------------------------------------------------------------------------------------------
# end to end: `dspt train` on fake trees with the tiny random model


def _run(tmp_path: Path, name: str, **kw) -> tuple[dict, Path]:
    from dspt.train import train

    out = tmp_path / "runs" / name
    cfg = RunConfig(model="dspt-tiny", pretrained=None, epochs=1, views=1, batch_size=4, device="cpu",
                    cache_dir=str(tmp_path / "cache"), output=str(out), progress=False, **kw)
    return train(cfg), out


def test_train_symflip_on_a_coop_benchmark(tmp_path):
    from test_datasets_coop import make_coop_tree

    make_coop_tree(tmp_path / "data", "oxford_flowers")
    metrics, out = _run(tmp_path, "flip", dataset="flowers102", root=str(tmp_path / "data"), shots=2,
                        noise="symflip", fp=1)
    assert metrics["noise"]["realised_rate"] == 0.5 and metrics["n_train"] == 6 and metrics["n_test"] == 3
    rows = (out / "train_files.csv").read_text().splitlines()[1:]
    assert sum(r.split(",")[2] != r.split(",")[3] for r in rows) == 3  # one false positive per class
    info = json.loads((out / "dataset.json").read_text())
    assert info["fp"] == 1 and Path(info["fewshot_file"]).is_file()
    assert str(tmp_path / "cache") in info["fewshot_file"]
    cfg = RunConfig.load(out / "config.yaml")
    assert cfg.template == "a photo of a {}, a type of flower." and cfg.noise_rate == 0.5


def test_train_given_noise_from_a_csv(tmp_path):
    lines = ["path,label,clean_label,split"]
    for k, c in enumerate(["cat", "dog", "fox"]):
        for i in range(4):
            write_jpeg(tmp_path / "img" / c / f"{i}.jpg", seed=i)
            noisy = ["cat", "dog", "fox"][(k + 1) % 3] if i == 0 else c
            lines.append(f"img/{c}/{i}.jpg,{noisy},{c},{'test' if i == 3 else 'train'}")
    (tmp_path / "noisy.csv").write_text("\n".join(lines) + "\n")
    metrics, out = _run(tmp_path, "given", data=str(tmp_path / "noisy.csv"), dataset="csv", shots=0,
                        noise="given")
    assert metrics["noise"]["realised_rate"] == pytest.approx(3 / 9) and metrics["noise"]["noise_type"] == "given"
