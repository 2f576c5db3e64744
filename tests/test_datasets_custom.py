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
