"""benchmarks/cifar10n_case.py on a fake CIFAR-10 archive and CIFAR-10N labels file of the same layout (a few
32x32 JPEGs per class): disjoint, stratified parts, label tables with the labels' realised noise, reuse, and
one clear line for a missing input. The real archive is never needed."""
from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dspt.errors import DataError

CLASSES = ("bird", "cat", "ship")
TRAIN_PER_CLASS, TEST_PER_CLASS = 18, 5
SIZES = {"pretrain_per_class": 4, "pool_per_class": 6, "val_per_class": 2, "test_per_class": 3}


def _load_case_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cifar10n_case.py"
    spec = importlib.util.spec_from_file_location("cifar10n_case", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


case_mod = _load_case_module()


def _noisy(i: int, c: int, every: int) -> str:
    """Every `every`-th image of a class is labelled as the next class."""
    return CLASSES[(c + 1) % len(CLASSES)] if i % every == 0 else CLASSES[c]


def _fake_shared(folder: Path) -> tuple[Path, dict[str, dict[str, str]]]:
    """cifar10_jpeg.tar.gz (cifar10_jpeg/{train,test}/<class>/NNNN.jpg) and cifar10n_labels.csv.gz."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels: dict[str, dict[str, str]] = {}
    with tarfile.open(folder / "cifar10_jpeg.tar.gz", "w:gz") as tar:
        for split, n in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
            for c, cls in enumerate(CLASSES):
                for i in range(n):
                    pixels = np.clip(rng.normal(60 + 60 * c, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(pixels).save(buf, format="JPEG")
                    name = f"cifar10_jpeg/{split}/{cls}/{i:04d}.jpg"
                    info = tarfile.TarInfo(name)
                    info.size = len(buf.getvalue())
                    tar.addfile(info, io.BytesIO(buf.getvalue()))
                    if split == "train":
                        labels[name] = {"true": cls, "aggre_label": _noisy(i, c, 6),
                                        "random_label1": _noisy(i, c, 3)}
    with gzip.open(folder / "cifar10n_labels.csv.gz", "wt", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "aggre_label", "random_label1"])
        for name, row in labels.items():
            writer.writerow([name, row["aggre_label"], row["random_label1"]])
    return folder, labels


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar10n")
    shared, labels = _fake_shared(root / "shared")
    case = case_mod.build_case(shared, root / "out", seed=3, pretrain_epochs=1, cache_dir=root / "cache",
                               progress=False, **SIZES)
    return case, shared, labels, root


def _table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _source(table: Path, rel: str) -> str:
    """The archive member an extracted image came from."""
    p = (table.parent / rel).resolve()
    return f"cifar10_jpeg/train/{p.parent.name}/{p.name}"


def test_parts_are_disjoint_and_stratified(built):
    case, _, _, _ = built
    assert not case["reused"]
    with open(case["root"] / "splits.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    parts: dict[str, set[str]] = {}
    for r in rows:
        parts.setdefault(r["part"], set()).add(r["path"])
        assert Path(r["path"]).parent.name == r["true"]  # the true class is the image's folder
    assert set(parts) == {"pretrain", "dev", "final", "test"}
    names = list(parts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not parts[a] & parts[b], (a, b)
    per = {"pretrain": SIZES["pretrain_per_class"], "dev": SIZES["pool_per_class"],
           "final": SIZES["pool_per_class"], "test": SIZES["test_per_class"]}
    for part, n in per.items():
        counts = {cls: sum(1 for r in rows if r["part"] == part and r["true"] == cls) for cls in CLASSES}
        assert counts == {cls: n for cls in CLASSES}, part
    assert case["counts"]["pretrain"] == 4 * len(CLASSES) and case["counts"]["test"] == 3 * len(CLASSES)
    assert case["counts"]["dev"] == {"train": 4 * len(CLASSES), "val": 2 * len(CLASSES)}
    test_files = sorted(p.relative_to(case["test"]).as_posix() for p in case["test"].rglob("*.jpg"))
    assert test_files == sorted(Path(p).relative_to("test").as_posix() for p in parts["test"])
    assert Path(case["checkpoint"]).is_file() and 0 <= case["zeroshot_acc"] <= 100


def test_tables_hold_the_pools_with_their_labels_noise(built):
    case, _, labels, _ = built
    with open(case["root"] / "splits.csv", newline="") as fh:
        pretrain = {r["path"] for r in csv.DictReader(fh) if r["part"] == "pretrain"}
    pretrain_sources = {f"cifar10_jpeg/train/{Path(p).parent.name}/{Path(p).name}" for p in pretrain}
    noise = json.loads(Path(case["noise_file"]).read_text())
    pools = {}
    for pool in ("dev", "final"):
        for ls, col in (("clean", "true"), ("aggre", "aggre_label"), ("random1", "random_label1")):
            table = Path(case["tables"][pool][ls])
            rows = _table(table)
            sources = [_source(table, r["path"]) for r in rows]
            assert all((table.parent / r["path"]).is_file() for r in rows)
            assert not set(sources) & pretrain_sources  # the pools never hold a pretraining image
            assert [r["label"] for r in rows] == [labels[s][col] for s in sources]
            assert [r["clean_label"] for r in rows] == [labels[s]["true"] for s in sources]
            for part in ("train", "val"):
                sel = [r for r in rows if r["split"] == part]
                assert len(sel) == len(CLASSES) * (2 if part == "val" else 4)
                assert {r["clean_label"] for r in sel} == set(CLASSES)
                rate = np.mean([r["label"] != r["clean_label"] for r in sel])
                assert noise[pool][ls][part] == pytest.approx(rate)
            # every label set of a pool lists the same images, spelled the same (one feature cache for all)
            pools.setdefault(pool, [r["path"] for r in rows])
            assert [r["path"] for r in rows] == pools[pool]
            assert table.stem == f"cifar10n-{pool}" and all(Path(r["path"]).is_absolute() for r in rows)
        assert noise[pool]["clean"]["all"] == 0
    assert not set(pools["dev"]) & set(pools["final"])
    dev = [_source(Path(case["tables"]["dev"]["clean"]), p) for p in pools["dev"]]
    all_rate = {ls: np.mean([labels[s][col] != labels[s]["true"] for s in dev])
                for ls, col in (("aggre", "aggre_label"), ("random1", "random_label1"))}
    assert noise["dev"]["aggre"]["all"] == pytest.approx(all_rate["aggre"])
    assert noise["dev"]["random1"]["all"] == pytest.approx(all_rate["random1"])


def test_dspt_reads_the_tables_and_the_test_folder(built):
    case, _, _, _ = built
    from dspt.config import RunConfig
    from dspt.train import load_splits

    cfg = RunConfig(model="dspt-tiny", pretrained=None, checkpoint=str(case["checkpoint"]),
                    data=str(case["tables"]["dev"]["random1"]), test_data=str(case["test"]), noise="given").resolved()
    splits = load_splits(cfg)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 6, 9)
    assert splits.train.noisy_labels is not None and list(splits.classnames) == list(CLASSES)


def test_a_second_call_reuses_the_case(built, monkeypatch):
    case, shared, _, root = built
    stamp = Path(case["checkpoint"]).stat().st_mtime_ns

    def refuse(*a, **k):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(case_mod, "pretrain_prior", refuse)
    monkeypatch.setattr(case_mod, "_extract", refuse)
    again = case_mod.build_case(shared, root / "out", seed=3, pretrain_epochs=1, cache_dir=root / "cache",
                                progress=False, **SIZES)
    assert again["reused"] and again["root"] == case["root"]
    assert again["counts"] == case["counts"] and again["noise"] == case["noise"]
    assert Path(again["checkpoint"]).stat().st_mtime_ns == stamp
    assert "reused" in case_mod.describe(again)


@pytest.mark.parametrize("missing", ["cifar10_jpeg.tar.gz", "cifar10n_labels.csv.gz"])
def test_a_missing_input_names_the_file_and_the_fix(tmp_path, capsys, missing):
    shared = tmp_path / "shared"
    shared.mkdir()
    for name in ("cifar10_jpeg.tar.gz", "cifar10n_labels.csv.gz"):
        if name != missing:
            (shared / name).write_bytes(b"")
    with pytest.raises(DataError) as info:
        case_mod.build_case(shared, tmp_path / "out", **SIZES)
    message = str(info.value)
    assert "\n" not in message and missing in message and "--shared" in message
    assert case_mod.main(["--shared", str(shared), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and missing in err
    assert not (tmp_path / "out").exists()


def test_the_shifted_case_swaps_red_and_blue_of_the_tuning_and_test_images_only(built):
    """--shift bgr: every pool and test image is the archive's JPEG decoded, its channels reversed, stored as
    PNG (lossless); the pretraining images are the archive's bytes; the case has its own folder."""
    case, shared, _, root = built
    shifted = case_mod.build_case(shared, root / "out", seed=3, pretrain_epochs=1, cache_dir=root / "cache",
                                  progress=False, zeroshot=False, shift="bgr", **SIZES)
    assert shifted["root"] != case["root"] and shifted["settings"]["shift"] == "bgr"
    assert "shift of the tuning and test images: bgr" in case_mod.describe(shifted)
    with tarfile.open(shared / "cifar10_jpeg.tar.gz", "r:gz") as tar:
        archive = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    with open(shifted["root"] / "splits.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        p = shifted["root"] / r["path"]
        split = "test" if r["part"] == "test" else "train"
        source = archive[f"cifar10_jpeg/{split}/{p.parent.name}/{p.stem}.jpg"]
        if r["part"] == "pretrain":
            assert p.suffix == ".jpg" and p.read_bytes() == source
        else:
            original = np.asarray(Image.open(io.BytesIO(source)).convert("RGB"))
            assert p.suffix == ".png" and np.array_equal(np.asarray(Image.open(p)), original[:, :, ::-1])
    table = _table(Path(shifted["tables"]["dev"]["clean"]))
    assert all(r["path"].endswith(".png") and Path(r["path"]).is_file() for r in table)
    with pytest.raises(DataError, match="shift 'sepia' unknown; choose one of: none, bgr"):
        case_mod.build_case(shared, root / "out", shift="sepia", **SIZES)
