"""Custom data: image folders and CSV/TSV files, and the bad-input messages."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import write_jpeg
from dspt.data import DataError, load_data, load_table


def make_images(root: Path, classes=("cat", "dog", "fox"), per=4) -> list[tuple[str, str]]:
    rows = []
    for c in classes:
        for i in range(per):
            write_jpeg(root / "img" / c / f"{i}.jpg", seed=i)
            rows.append((f"img/{c}/{i}.jpg", c))
    return rows


def test_csv_with_names_and_split_column(tmp_path):
    rows = make_images(tmp_path)
    lines = ["path,label,split"] + [f"{p},{c},{'test' if p.endswith('3.jpg') else 'train'}" for p, c in rows]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    s = load_data("csv", root=tmp_path / "labels.csv")
    assert s.classnames == ["cat", "dog", "fox"] and (len(s.train), len(s.test)) == (9, 3) and s.val is None
    assert all(Path(p).is_file() and Path(p).is_absolute() for p in s.train.paths)  # resolved against the file
    # `--data labels.csv` with the default dataset works too
    assert load_data("folder", root=tmp_path / "labels.csv").train.paths == s.train.paths


def test_csv_with_a_test_folder(tmp_path):
    """`--data labels.csv --test-data DIR`: the test images may be a folder of class sub-folders named like the
    labels, whatever order the folders sort in."""
    rows = make_images(tmp_path, classes=("fox", "cat", "dog"))  # label order of the table: first seen
    (tmp_path / "labels.csv").write_text("\n".join(["path,label"] + [f"{p},{c}" for p, c in rows]) + "\n")
    for c in ("cat", "dog", "fox"):
        write_jpeg(tmp_path / "test" / c / "t.jpg", seed=9)
    s = load_data("folder", root=tmp_path / "labels.csv", test_root=tmp_path / "test")
    assert len(s.test) == 3 and s.test.classnames == s.train.classnames
    for path, label in zip(s.test.paths, s.test.labels):  # each image gets the index of its folder's class
        assert s.train.classnames[label] == Path(path).parent.name
    (tmp_path / "test" / "wolf").mkdir()
    write_jpeg(tmp_path / "test" / "wolf" / "w.jpg", seed=1)
    with pytest.raises(DataError, match="wolf"):
        load_data("folder", root=tmp_path / "labels.csv", test_root=tmp_path / "test")


def test_tsv_without_header_integer_labels_and_class_list(tmp_path):
    rows = make_images(tmp_path, per=5)
    sub = tmp_path / "lists"
    sub.mkdir()
    (sub / "train.tsv").write_text("".join(f"../{p}\t{['cat', 'dog', 'fox'].index(c)}\n" for p, c in rows))
    (tmp_path / "names.txt").write_text("tabby cat\ngolden_retriever\nred fox\n")
    s = load_data("tsv", root=sub / "train.tsv", classnames=tmp_path / "names.txt", test_fraction=0.2, seed=0)
    assert s.classnames == ["tabby cat", "golden retriever", "red fox"]
    assert (len(s.train), len(s.test)) == (12, 3) and np.bincount(s.test.labels).tolist() == [1, 1, 1]
    assert s.train.meta["split"] == {"test_fraction": 0.2, "seed": 0}


def test_a_test_table_gives_every_row_as_a_test_image(tmp_path):
    rows = make_images(tmp_path, per=5)
    (tmp_path / "train.csv").write_text("\n".join(["path,label"] + [f"{p},{c}" for p, c in rows[::2]]) + "\n")
    (tmp_path / "test.csv").write_text("\n".join(["path,label"] + [f"{p},{c}" for p, c in rows[1::2]]) + "\n")
    s = load_data("csv", root=tmp_path / "train.csv", test_root=tmp_path / "test.csv")
    assert len(s.test) == len(rows[1::2]) and len(s.train) == len(rows[::2])  # no row of either is held back


def test_integer_class_names_map_by_name_or_are_refused():
    from dspt.data.table import label_indexer

    # Flowers' folders are 1..102: labels '1', '2', '10' are three classes in natural order, not 0..10
    names, idx = label_indexer(["10", "1", "2", "1"], None, "t.csv")
    assert names == ["1", "2", "10"] and [idx(v, 1) for v in ("1", "2", "10")] == [0, 1, 2]
    # a class list in a non-numeric order: integer labels are its names, never positions
    names, idx = label_indexer(["10", "2", "1"], ["10", "2", "1"], "t.csv")
    assert [idx(v, 1) for v in ("10", "2", "1")] == [0, 1, 2]
    # an integer that is not one of the list's integer names: ambiguous, refused in one line
    with pytest.raises(DataError, match="ambiguous") as info:
        label_indexer(["0", "2"], ["10", "2", "1"], "t.csv")
    assert "\n" not in str(info.value)
    # positions still work with a list of (non-integer) names
    names, idx = label_indexer(["0", "2"], ["cat", "dog", "fox"], "t.csv")
    assert [idx("0", 1), idx("2", 1)] == [0, 2]


def test_csv_with_clean_labels_is_a_noisy_list(tmp_path):
    rows = make_images(tmp_path)
    lines = ["image,noisy_label,clean_label,split"]
    for k, (p, c) in enumerate(rows):
        noisy = "dog" if (c == "cat" and k % 4 == 0) else c
        lines.append(f"{p},{noisy},{c},{'test' if p.endswith('3.jpg') else 'train'}")
    (tmp_path / "noisy.csv").write_text("\n".join(lines) + "\n")
    s = load_data("csv", root=tmp_path / "noisy.csv")
    assert s.train.noisy_labels is not None
    assert int((s.train.noisy_labels != s.train.labels).sum()) == 1  # cat/0.jpg labelled dog
    assert (s.test.labels == s.test.noisy_labels).all()


@pytest.mark.parametrize("content,pattern", [
    ("path,label\nimg/cat/0.jpg,cat\nimg/cat/missing.jpg,cat\n",
     r"labels.csv:3: image 'img/cat/missing.jpg' not found \(relative paths are resolved against"),
    ("path,label\nimg/cat/0.jpg,7\n", r"labels.csv:2: label 7 is outside the 3 classes"),
    ("path,label\nimg/cat/0.jpg,wolf\n", r"labels.csv:2: class 'wolf' is not in the class list"),
    ("path,label,split\nimg/cat/0.jpg,cat,holdout\n", r"labels.csv:2: split 'holdout' unknown"),
    ("path,label\nimg/cat/0.jpg,cat\nimg/dog/0.jpg,dog\n", r"class 'fox' has no training rows in"),
    ("path,label\n", r"has a header but no rows"),
])
def test_csv_bad_input_names_file_and_line(tmp_path, content, pattern):
    make_images(tmp_path)
    (tmp_path / "names.txt").write_text("cat\ndog\nfox\n")
    (tmp_path / "labels.csv").write_text(content)
    with pytest.raises(DataError, match=pattern):
        load_table(tmp_path / "labels.csv", classnames=tmp_path / "names.txt")


def test_csv_missing_file_and_json_class_list(tmp_path):
    with pytest.raises(DataError, match="label file '.*nope.csv' not found"):
        load_data("csv", root=tmp_path / "nope.csv")
    rows = make_images(tmp_path)
    (tmp_path / "l.csv").write_text("".join(f"{p},{['cat', 'dog', 'fox'].index(c)},train\n" for p, c in rows))
    (tmp_path / "names.json").write_text(json.dumps({"0": "cat", "1": "dog", "2": "fox"}))
    s = load_table(tmp_path / "l.csv", classnames=tmp_path / "names.json")
    assert s.classnames == ["cat", "dog", "fox"]


def test_folder_bad_input(tmp_path):
    with pytest.raises(DataError, match="data folder '.*missing' not found"):
        load_data("folder", root=tmp_path / "missing")
    make_images(tmp_path)
    (tmp_path / "img" / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folder '.*empty' holds no images"):
        load_data("folder", root=tmp_path / "img")
    (tmp_path / "img" / "empty").rmdir()
    (tmp_path / "names.json").write_text(json.dumps({"cat": "cat", "dog": "dog"}))
    with pytest.raises(DataError, match=r"no name for folder\(s\) \['fox'\]"):
        load_data("folder", root=tmp_path / "img", classnames=tmp_path / "names.json")


def test_unreadable_image_error_and_skip(tmp_path):
    from dspt.config import RunConfig
    from dspt.data import load_image
    from dspt.train import _drop_bad

    make_images(tmp_path)
    bad = tmp_path / "img" / "dog" / "9.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"cannot read image '.*9.jpg'.*--skip-bad-images"):
        load_image(str(bad))
    s = load_data("folder", root=tmp_path / "img", test_fraction=0.25, seed=0)
    train = s.train if str(bad) in s.train.paths else s.test
    kept, skipped = _drop_bad(train, True, "training")
    assert skipped == [str(bad)] and str(bad) not in kept.paths
    assert RunConfig(data=str(tmp_path / "img"), skip_bad_images=True).resolved().skip_bad_images


# ----------------------------------------------------------------------------------------------------------
# --skip-bad-images: only the drawn shots are decoded; unreadable ones are replaced within their class / source


@pytest.fixture
def pool_with_bad_images(tmp_path):
    """4 classes x 25 images (8x8 JPEGs), every 7th file corrupt: (dataset, set of bad paths)."""
    from dspt.data import ImageDataset

    paths, labels, bad = [], [], set()
    for c in range(4):
        for i in range(25):
            p = write_jpeg(tmp_path / "pool" / f"c{c}" / f"{i:02d}.jpg", seed=c * 100 + i)
            if (c * 25 + i) % 7 == 3:
                p.write_bytes(b"not a jpeg")
                bad.add(str(p))
            paths.append(str(p))
            labels.append(c)
    ds = ImageDataset(paths, labels, ["cat", "dog", "fox", "owl"], name="pool", meta={"root": str(tmp_path / "pool")})
    return ds, bad


@pytest.fixture
def decoded(monkeypatch):
    """Every image the data code decodes, in order."""
    import dspt.data.base as base

    seen: list[str] = []
    real = base.image_is_readable

    def counting(path: str) -> bool:
        seen.append(path)
        return real(path)

    monkeypatch.setattr(base, "image_is_readable", counting)
    return seen


def _seed_drawing_a_bad_image(ds, bad, shots, tmp_path, **kw) -> int:
    from dspt.data import select_training

    for seed in range(100):
        if bad & set(select_training(ds, shots, seed, cache_dir=tmp_path / "plain", **kw).train.paths):
            return seed
    raise AssertionError("no seed draws a corrupt image")


@pytest.mark.parametrize("noise,fp", [("sym", 0), ("symflip", 2), ("pairflip", 1)])
def test_skip_bad_decodes_only_the_drawn_shots(pool_with_bad_images, decoded, tmp_path, noise, fp):
    from dspt.data import select_training

    ds, bad = pool_with_bad_images
    shots = 5
    seed = _seed_drawing_a_bad_image(ds, bad, shots, tmp_path, noise=noise, fp=fp)
    plain = select_training(ds, shots, seed, noise, fp=fp, cache_dir=tmp_path / "plain")
    decoded.clear()
    sel = select_training(ds, shots, seed, noise, fp=fp, cache_dir=tmp_path / "cache", skip_bad=True)
    n_skipped = sel.info["skipped_images"]
    assert n_skipped >= 1 and set(sel.info["skipped_examples"]) <= bad
    # the K*C drawn images, then one decode per replacement candidate: never the pool of 100
    assert len(decoded) == shots * ds.num_classes + n_skipped < len(ds)
    assert not bad & set(sel.train.paths) and len(set(sel.indices.tolist())) == len(sel.indices) == shots * 4
    assert np.all(np.diff(sel.indices) > 0)
    # the readable shots of the plain draw are kept; replacements come from the same class / source
    kept = set(plain.indices.tolist()) - {i for i in plain.indices.tolist() if ds.paths[i] in bad}
    assert kept <= set(sel.indices.tolist())
    given = sel.given if sel.given is not None else sel.train.labels
    true = sel.train.labels
    for c in range(4):
        mine = given == c
        assert mine.sum() == shots and (true[mine] != c).sum() == fp  # exactly FP false positives per class
        if noise == "pairflip":
            assert set(true[mine & (true != c)].tolist()) <= {(c + 1) % 4}
    # deterministic: same seed, same subset (fresh cache or not); the subset file holds no unreadable image
    again = select_training(ds, shots, seed, noise, fp=fp, cache_dir=tmp_path / "other", skip_bad=True)
    assert np.array_equal(again.indices, sel.indices) and again.info == {
        **sel.info, "fewshot_file": again.info["fewshot_file"]}
    assert np.array_equal(select_training(ds, shots, seed, noise, fp=fp, cache_dir=tmp_path / "cache",
                                          skip_bad=True).indices, sel.indices)
    record = json.loads(Path(sel.info["fewshot_file"]).read_text())
    assert "-skipbad-" in Path(sel.info["fewshot_file"]).name and record["indices"] == sel.indices.tolist()
    assert not bad & {str(Path(record["root"]) / p) for p in record["paths"]}
    # the plain draw (a run without --skip-bad-images) is not changed by the skip variant's file
    assert np.array_equal(select_training(ds, shots, seed, noise, fp=fp, cache_dir=tmp_path / "cache").indices,
                          plain.indices)


def test_skip_bad_without_bad_images_is_the_plain_draw(pool_with_bad_images, decoded, tmp_path):
    from dspt.data import select_training

    ds, bad = pool_with_bad_images
    good = ds.subset([i for i, p in enumerate(ds.paths) if p not in bad])
    plain = select_training(good, 3, 1, cache_dir=tmp_path)
    sel = select_training(good, 3, 1, cache_dir=tmp_path, skip_bad=True)
    assert np.array_equal(sel.indices, plain.indices) and sel.info["skipped_images"] == 0
    assert sel.info["fewshot_file"] == plain.info["fewshot_file"] and len(decoded) == 12


def test_skip_bad_full_split_checks_every_image(pool_with_bad_images, decoded, tmp_path):
    from dspt.data import select_training

    ds, bad = pool_with_bad_images
    sel = select_training(ds, 0, 0, cache_dir=tmp_path, skip_bad=True)
    assert len(decoded) == len(ds) and sel.info["skipped_images"] == len(bad)
    assert sorted(sel.train.paths) == sorted(set(ds.paths) - bad)


def test_skip_bad_class_out_of_readable_images(tmp_path):
    from dspt.data import ImageDataset, select_training

    paths = [str(write_jpeg(tmp_path / f"{c}{i}.jpg", seed=i)) for c in "ab" for i in range(5)]
    for p in paths[:2]:
        Path(p).write_bytes(b"broken")
    ds = ImageDataset(paths, [0] * 5 + [1] * 5, ["fox", "owl"], name="tiny")
    with pytest.raises(DataError, match=r"class 'fox' runs out of readable images: 2 of its 5 training image\(s\) "
                                        r"are unreadable, too many for --shots 4"):
        select_training(ds, 4, 0, cache_dir=tmp_path, skip_bad=True)
    assert len(select_training(ds, 3, 0, cache_dir=tmp_path, skip_bad=True).indices) == 6
