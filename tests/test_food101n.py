"""Food-101N: a synthetic copy of the release's layout (tiny real JPEGs), the validation images kept out of
training, the verified-subset noise estimate, and `dspt datasets`' probe."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from clirun import run_cli
from conftest import write_jpeg
from dspt.data import DataError, load_data, load_food101n

HEADER = {"imagelist.tsv": "class_name/key", "verified_train.tsv": "class_name/key\tverification_label",
          "verified_val.tsv": "class_name/key\tverification_label"}


def make_food101n_tree(root: Path, classes: tuple[str, ...] = ("apple_pie", "waffles"), per_class: int = 4,
                       verified_train: list[tuple[str, int]] = (), verified_val: list[tuple[str, int]] = (),
                       imagelist: list[str] | None = None, food101: bool = True) -> list[str]:
    """Food-101N_release/ (images/<class>/NNN.jpg, meta/classes.txt, imagelist.tsv, verified_{train,val}.tsv)
    under `root`, and (`food101`) food-101/ with one test image per class. `imagelist` defaults to every image;
    the verified lists hold (path as listed, label). Returns the images' paths relative to images/."""
    n = Path(root) / "Food-101N_release"
    (n / "meta").mkdir(parents=True, exist_ok=True)
    (n / "meta" / "classes.txt").write_text("class_name\n" + "\n".join(classes) + "\n")
    rels = [f"{c}/{i:03d}.jpg" for c in classes for i in range(per_class)]
    for k, rel in enumerate(rels):
        write_jpeg(n / "images" / rel, seed=k)
    rows = {"imagelist.tsv": rels if imagelist is None else imagelist,
            "verified_train.tsv": [f"{p}\t{v}" for p, v in verified_train],
            "verified_val.tsv": [f"{p}\t{v}" for p, v in verified_val]}
    for name, lines in rows.items():
        (n / "meta" / name).write_text("\n".join([HEADER[name], *lines]) + "\n")
    if food101:
        f = Path(root) / "food-101"
        (f / "meta").mkdir(parents=True, exist_ok=True)
        for c in classes:
            write_jpeg(f / "images" / c / "9.jpg")
        (f / "meta" / "test.txt").write_text("".join(f"{c}/9\n" for c in classes))
    return rels


def _rel(path: str, root: Path) -> str:
    return Path(path).relative_to(root / "Food-101N_release" / "images").as_posix()


def test_validation_images_are_left_out_of_training(tmp_path):
    classes = ("apple_pie", "waffles", "ramen")
    rels = [f"{c}/{i:03d}.jpg" for c in classes for i in range(5)]
    # the imagelist spells two images differently from the val list; the val list spells two differently too
    listed = [("./" + r if r == rels[3] else r.replace("/", "\\") if r == rels[11] else r) for r in rels]
    val = [(rels[1], 1), ("./" + rels[3], 1), (f"images/{rels[7]}", 1), (rels[11], 1),
           (rels[12], 0)]  # verified wrong: not a validation image, stays in training
    vtrain = [(rels[0], 1), (rels[1], 0), (rels[5], 0), (rels[6], 1), (rels[10], 1), (rels[13], 1)]
    make_food101n_tree(tmp_path, classes, 5, verified_train=vtrain, verified_val=val, imagelist=listed)

    s = load_food101n(tmp_path)
    train = {_rel(p, tmp_path) for p in s.train.paths}
    val_rels = [_rel(p, tmp_path) for p in s.val.paths]
    assert val_rels == [rels[1], rels[3], rels[7], rels[11]]
    assert not train & set(val_rels), "no validation image is trained on"
    assert len(s.train) == len(rels) - 4 == 11 and s.train.meta["removed_validation_images"] == 4
    assert train == set(rels) - set(val_rels) and rels[12] in train
    assert all(Path(p).is_file() for p in [*s.train.paths, *s.val.paths, *s.test.paths])
    # labels follow the class folder
    assert [s.train.classnames[k] for k in s.val.labels] == ["apple pie", "apple pie", "waffles", "ramen"]
    # the noise estimate counts the verified rows still trained on: rels[1] (a val image) is not one of them
    assert s.train.meta["verified_train"] == 5 and s.train.meta["verified_noise_rate"] == pytest.approx(1 / 5)

    code, out, _ = run_cli(["datasets", "food101n", "--root", str(tmp_path), "--json"])
    st = json.loads(out)[0]
    assert code == 0 and st["found"] and (st["classes"], st["train"], st["val"], st["test"]) == (3, 11, 4, 3)
    assert st["note"] == "web labels (clean unknown); verified subset: 20.0% wrong; 4 validation images left out of " \
                         "training"


def test_no_overlap_removes_nothing(tmp_path):
    rels = make_food101n_tree(tmp_path, verified_train=[("apple_pie/000.jpg", 1)],
                              verified_val=[("waffles/003.jpg", 0)])
    s = load_data("food101n", root=tmp_path)
    assert len(s.train) == len(rels) and s.val is None
    assert s.train.meta["removed_validation_images"] == 0 and s.train.meta["verified_noise_rate"] == 0


def test_a_val_image_absent_from_the_list_is_still_validation(tmp_path):
    rels = make_food101n_tree(tmp_path, imagelist=[f"apple_pie/{i:03d}.jpg" for i in range(4)],
                              verified_val=[("waffles/000.jpg", 1), ("apple_pie/002.jpg", 1)])
    s = load_food101n(tmp_path)
    assert len(s.train) == 3 and len(s.val) == 2 and s.train.meta["removed_validation_images"] == 1
    assert len(rels) == 8


def test_a_listed_path_outside_the_classes_is_refused(tmp_path):
    make_food101n_tree(tmp_path, imagelist=["images/sushi/000.jpg"])
    with pytest.raises(DataError, match="'sushi/000.jpg' is in no class of classes.txt"):
        load_food101n(tmp_path)
