"""The 11 CoOp benchmarks on miniature fake trees in CoOp's layout, with split files in CoOp's real format."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import write_jpeg
from dspt.data import BENCHMARKS, DataError, dataset_status, dataset_template, load_data, read_split_file

# name -> (folder, image dir, split file, [(class name as CoOp writes it, relpath pattern)], cleaned names)
LAYOUTS = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
                   [("airplane", "airplanes/image_{i:04d}.jpg"), ("face", "Faces/image_{i:04d}.jpg"),
                    ("accordion", "accordion/image_{i:04d}.jpg")]),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json",
                    [("abyssinian", "Abyssinian_{i}.jpg"), ("american_bulldog", "american_bulldog_{i}.jpg"),
                     ("yorkshire_terrier", "yorkshire_terrier_{i}.jpg")]),
    "stanford_cars": ("stanford_cars", ".", "split_zhou_StanfordCars.json",
                      [("2012 Tesla Model S Sedan", "cars_train/0{i}001.jpg"),
                       ("2012 smart fortwo Convertible", "cars_train/0{i}002.jpg"),
                       ("1993 Volvo 240 Sedan", "cars_test/0{i}003.jpg")]),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
                       [("pink primrose", "image_0{i}001.jpg"), ("globe-flower", "image_0{i}002.jpg"),
                        ("fire lily", "image_0{i}003.jpg")]),
    "food101": ("food-101", "images", "split_zhou_Food101.json",
                [("apple_pie", "apple_pie/{i}01.jpg"), ("baby_back_ribs", "baby_back_ribs/{i}02.jpg"),
                 ("waffles", "waffles/{i}03.jpg")]),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json",
               [("abbey", "a/abbey/sun_a{i}.jpg"), ("indoor bow_window", "b/bow_window/indoor/sun_b{i}.jpg"),
                ("youth_hostel", "y/youth_hostel/sun_y{i}.jpg")]),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json",
            [("banded", "banded/banded_{i:04d}.jpg"), ("polka-dotted", "polka-dotted/polka-dotted_{i:04d}.jpg"),
             ("zigzagged", "zigzagged/zigzagged_{i:04d}.jpg")]),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json",
                [("Annual Crop Land", "AnnualCrop/AnnualCrop_{i}.jpg"), ("Sea or Lake", "SeaLake/SeaLake_{i}.jpg"),
                 ("Forest", "Forest/Forest_{i}.jpg")]),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
               [("Apply_Eye_Makeup", "Apply_Eye_Makeup/v_ApplyEyeMakeup_g{i:02d}_c01.jpg"),
                ("Yo_Yo", "Yo_Yo/v_YoYo_g{i:02d}_c01.jpg"), ("Tai_Chi", "Tai_Chi/v_TaiChi_g{i:02d}_c01.jpg")]),
}
CLEAN = {"american_bulldog": "american bulldog", "yorkshire_terrier": "yorkshire terrier",
         "indoor bow_window": "indoor bow window", "youth_hostel": "youth hostel", "apple_pie": "apple pie",
         "baby_back_ribs": "baby back ribs", "Apply_Eye_Makeup": "Apply Eye Makeup", "Yo_Yo": "Yo Yo",
         "Tai_Chi": "Tai Chi"}
PER_SPLIT = {"train": (1, 2), "val": (3,), "test": (4,)}  # image numbers per split and class


def make_coop_tree(root: Path, name: str, with_split: bool = True) -> Path:
    folder, image_dir, split_file, classes = LAYOUTS[name]
    d = root / folder
    split = {}
    for s, numbers in PER_SPLIT.items():
        split[s] = []
        for label, (cname, pattern) in enumerate(classes):
            for i in numbers:
                rel = pattern.format(i=i)
                write_jpeg(d / image_dir / rel, seed=label * 10 + i)
                split[s].append([rel, label, cname])
    if with_split:
        (d / split_file).write_text(json.dumps(split))
    return d


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_with_coop_split_file(tmp_path, name):
    make_coop_tree(tmp_path / "data", name)
    before = listing(tmp_path / "data")
    s = load_data(name, root=tmp_path / "data", cache_dir=tmp_path / "cache")
    assert (len(s.train), len(s.val), len(s.test)) == (6, 3, 3)
    expected = [CLEAN.get(c, c) for c, _ in LAYOUTS[name][3]]
    assert s.classnames == expected and s.test.classnames == expected
    assert s.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert all(os.path.isfile(p) for p in s.train.paths + s.val.paths + s.test.paths)
    assert s.train.template == dataset_template(name) == BENCHMARKS[name].template
    assert s.train.name == name and not s.train.meta["split_generated"]
    assert listing(tmp_path / "data") == before  # nothing written into the data folder
    # the dataset's own folder works as the root too
    again = load_data(name, root=tmp_path / "data" / LAYOUTS[name][0], cache_dir=tmp_path / "cache")
    assert again.train.paths == s.train.paths


def test_coop_templates_and_aliases():
    assert dataset_template("flowers102") == "a photo of a {}, a type of flower."
    assert dataset_template("DTD") == "{} texture."
    assert dataset_template("eurosat") == "a centered satellite photo of {}."
    assert dataset_template("ucf101") == "a photo of a person doing {}."
    assert dataset_template("food-101") == "a photo of {}, a type of food."
    assert dataset_template("oxford_pets") == "a photo of a {}, a type of pet."
    assert dataset_template("fgvc_aircraft") == "a photo of a {}, a type of aircraft."
    assert {BENCHMARKS[n].title for n in BENCHMARKS} >= {"ImageNet", "Caltech101", "OxfordPets", "StanfordCars",
                                                         "OxfordFlowers", "Food101", "FGVCAircraft", "SUN397",
                                                         "DescribableTextures", "EuroSAT", "UCF101"}
    with pytest.raises(DataError, match="unknown dataset 'nope'.*dspt datasets"):
        load_data("nope")


def test_fgvc_uses_official_lists(tmp_path):
    d = tmp_path / "fgvc_aircraft"
    (d / "images").mkdir(parents=True)
    variants = ["707-320", "A300B4", "Cessna 172"]
    (d / "variants.txt").write_text("\n".join(variants) + "\n")
    for s, ids in (("train", (1, 2)), ("val", (3,)), ("test", (4,))):
        lines = []
        for v, name in enumerate(variants):
            for i in ids:
                image = f"{v}{i:06d}"
                write_jpeg(d / "images" / f"{image}.jpg")
                lines.append(f"{image} {name}")
        (d / f"images_variant_{s}.txt").write_text("\n".join(lines) + "\n")
    s = load_data("fgvc_aircraft", root=tmp_path)
    assert s.classnames == variants and (len(s.train), len(s.val), len(s.test)) == (6, 3, 3)
    assert s.train.template == "a photo of a {}, a type of aircraft."
    (d / "images_variant_val.txt").unlink()
    with pytest.raises(DataError, match=r"images_variant_val.txt' not found.*fgvc-aircraft-2013b"):
        load_data("fgvc_aircraft", root=tmp_path)


def make_imagenet(root: Path) -> Path:
    d = root / "imagenet"
    for w in ("n01440764", "n01443537"):
        for i in range(2):
            write_jpeg(d / "images" / "train" / w / f"{w}_{i}.JPEG")
        write_jpeg(d / "images" / "val" / w / f"ILSVRC2012_val_{w[-3:]}.JPEG")
    (d / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\n")
    return d


def test_imagenet_val_is_the_test_set(tmp_path):
    d = make_imagenet(tmp_path)
    s = load_data("imagenet", root=tmp_path)
    assert s.classnames == ["tench", "goldfish"] and (len(s.train), len(s.test)) == (4, 2) and s.val is None
    (d / "classnames.txt").unlink()
    with pytest.raises(DataError, match=r"classnames.txt' not found; download classnames.txt from the ImageNet "
                                        r"section of CoOp's DATASETS.md"):
        load_data("imagenet", root=tmp_path)
    (d / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\n")
    write_jpeg(d / "images" / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DataError, match="loose images.*one folder per wnid"):
        load_data("imagenet", root=tmp_path)


@pytest.mark.parametrize("name", ["stanford_cars", "oxford_flowers", "oxford_pets", "sun397", "ucf101"])
def test_missing_split_file_names_the_file_and_its_source(tmp_path, name):
    make_coop_tree(tmp_path, name, with_split=False)
    split_file = LAYOUTS[name][2]
    with pytest.raises(DataError) as err:
        load_data(name, root=tmp_path, cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert f"split file '{tmp_path / LAYOUTS[name][0] / split_file}' not found" in msg
    assert "CoOp's DATASETS.md" in msg and "Google Drive" in msg and "\n" not in msg


def test_split_entry_pointing_at_a_missing_file(tmp_path):
    d = make_coop_tree(tmp_path, "oxford_flowers")
    (d / "jpg" / "image_02001.jpg").unlink()
    with pytest.raises(DataError, match=r"lists 1 train image\(s\) that are not in .*jpg', e.g. 'image_02001.jpg'"):
        load_data("oxford_flowers", root=tmp_path)


def test_malformed_split_files(tmp_path):
    d = make_coop_tree(tmp_path, "dtd")
    path = d / LAYOUTS["dtd"][2]
    path.write_text("{not json")
    with pytest.raises(DataError, match="is not valid JSON"):
        load_data("dtd", root=tmp_path)
    path.write_text(json.dumps({"train": [["banded/banded_0001.jpg", "x", "banded"]], "val": [], "test": []}))
    with pytest.raises(DataError, match=r"train\[0\] has label 'x', not an integer"):
        read_split_file(path)
    path.write_text(json.dumps({"train": [["banded/banded_0001.jpg", 0, "banded"],
                                          ["zigzagged/zigzagged_0001.jpg", 2, "zigzagged"]],
                                "val": [], "test": [["banded/banded_0004.jpg", 0, "banded"]]}))
    with pytest.raises(DataError, match="label 1 has no image"):
        load_data("dtd", root=tmp_path)


def test_not_found_says_where_and_how(tmp_path):
    with pytest.raises(DataError, match=r"OxfordFlowers not found: no folder '.*oxford_flowers'.*--download"):
        load_data("oxford_flowers", root=tmp_path)
    with pytest.raises(DataError, match="data root '.*nowhere' not found"):
        load_data("dtd", root=tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------------------
# generated splits (CoOp's fallback when its split file is absent)


def _load_twice(tmp_path: Path, name: str):
    before = listing(tmp_path / "data")
    a = load_data(name, root=tmp_path / "data", cache_dir=tmp_path / "cache")
    b = load_data(name, root=tmp_path / "data", cache_dir=tmp_path / "cache2")
    assert a.train.paths == b.train.paths and a.test.paths == b.test.paths  # deterministic (seeded)
    assert a.train.meta["split_generated"]
    assert listing(tmp_path / "data") == before  # the split went to the cache, not the data folder
    stored = list((tmp_path / "cache" / "splits").glob(f"{name}-*.json"))
    assert len(stored) == 1
    data = json.loads(stored[0].read_text())
    assert {"train", "val", "test"} <= set(data) and len(data["train"][0]) == 3  # CoOp's format
    return a


def test_generated_folder_split_50_20_30(tmp_path):
    d = tmp_path / "data" / "dtd" / "images"
    for c in ("banded", "zigzagged"):
        for i in range(10):
            write_jpeg(d / c / f"{c}_{i:04d}.jpg", seed=i)
    s = _load_twice(tmp_path, "dtd")
    assert (len(s.train), len(s.val), len(s.test)) == (10, 4, 6)
    assert s.classnames == ["banded", "zigzagged"]
    assert set(s.train.paths).isdisjoint(s.test.paths) and set(s.train.paths).isdisjoint(s.val.paths)


def test_generated_caltech_ignores_background_and_renames(tmp_path):
    d = tmp_path / "data" / "caltech-101" / "101_ObjectCategories"
    for c in ("BACKGROUND_Google", "Faces", "Faces_easy", "airplanes", "accordion"):
        for i in range(4):
            write_jpeg(d / c / f"image_{i:04d}.jpg", seed=i)
    s = _load_twice(tmp_path, "caltech101")
    assert s.classnames == ["face", "accordion", "airplane"]  # CoOp's sorted order: uppercase first


def test_generated_eurosat_class_names(tmp_path):
    d = tmp_path / "data" / "eurosat" / "2750"
    for c in ("AnnualCrop", "SeaLake"):
        for i in range(4):
            write_jpeg(d / c / f"{c}_{i}.jpg", seed=i)
    assert _load_twice(tmp_path, "eurosat").classnames == ["Annual Crop Land", "Sea or Lake"]


def test_generated_pets_from_official_lists(tmp_path):
    d = tmp_path / "data" / "oxford_pets"
    (d / "annotations").mkdir(parents=True)
    trainval, test = [], []
    for cid, breed in ((1, "Abyssinian"), (2, "american_bulldog")):
        for i in range(1, 7):
            write_jpeg(d / "images" / f"{breed}_{i}.jpg", seed=i)
            (trainval if i <= 5 else test).append(f"{breed}_{i} {cid} 1 1")
    (d / "annotations" / "trainval.txt").write_text("\n".join(trainval) + "\n")
    (d / "annotations" / "test.txt").write_text("\n".join(test) + "\n")
    s = _load_twice(tmp_path, "oxford_pets")
    assert s.classnames == ["abyssinian", "american bulldog"]
    assert (len(s.train), len(s.val), len(s.test)) == (8, 2, 2)  # 20 % of trainval per class -> val


def test_generated_flowers_from_mat_files(tmp_path):
    from scipy.io import savemat

    d = tmp_path / "data" / "oxford_flowers"
    labels = [1] * 10 + [2] * 10
    for i in range(len(labels)):
        write_jpeg(d / "jpg" / f"image_{i + 1:05d}.jpg", seed=i)
    savemat(d / "imagelabels.mat", {"labels": np.asarray([labels])})
    (d / "cat_to_name.json").write_text(json.dumps({"1": "pink primrose", "2": "hard-leaved pocket orchid"}))
    s = _load_twice(tmp_path, "oxford_flowers")
    assert s.classnames == ["pink primrose", "hard-leaved pocket orchid"]
    assert (len(s.train), len(s.val), len(s.test)) == (10, 4, 6)


def test_generated_cars_put_the_year_first(tmp_path):
    from scipy.io import savemat

    d = tmp_path / "data" / "stanford_cars"
    names = np.empty((1, 2), dtype=object)
    names[0, 0], names[0, 1] = "Tesla Model S Sedan 2012", "Volvo 240 Sedan 1993"

    def annos(folder: str, n: int) -> np.ndarray:
        rec = np.zeros((1, 2 * n), dtype=[("fname", object), ("class", object)])
        for k in range(2 * n):
            fname = f"{k:05d}.jpg"
            write_jpeg(d / folder / fname, seed=k)
            rec[0, k] = (fname, np.array([[k % 2 + 1]]))
        return rec

    (d / "devkit").mkdir(parents=True)
    savemat(d / "devkit" / "cars_meta.mat", {"class_names": names})
    savemat(d / "devkit" / "cars_train_annos.mat", {"annotations": annos("cars_train", 5)})
    savemat(d / "cars_test_annos_withlabels.mat", {"annotations": annos("cars_test", 2)})
    s = _load_twice(tmp_path, "stanford_cars")
    assert s.classnames == ["2012 Tesla Model S Sedan", "1993 Volvo 240 Sedan"]
    assert (len(s.train), len(s.val), len(s.test)) == (8, 2, 4)


def test_generated_sun397_and_ucf101(tmp_path):
    sun = tmp_path / "data" / "sun397"
    rels = {"/a/abbey": [], "/b/bow_window/indoor": []}
    for cls in rels:
        for i in range(6):
            rel = f"{cls}/sun_{i}.jpg"
            write_jpeg(sun / "SUN397" / rel.lstrip("/"), seed=i)
            rels[cls].append(rel)
    (sun / "ClassName.txt").write_text("\n".join(rels) + "\n")
    (sun / "Training_01.txt").write_text("\n".join(r for v in rels.values() for r in v[:5]) + "\n")
    (sun / "Testing_01.txt").write_text("\n".join(v[5] for v in rels.values()) + "\n")
    assert _load_twice(tmp_path, "sun397").classnames == ["abbey", "indoor bow window"]

    ucf = tmp_path / "data" / "ucf101"
    lists = ucf / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 YoYo\n")
    train, test = [], []
    for n, action in ((1, "ApplyEyeMakeup"), (2, "YoYo")):
        folder = {"ApplyEyeMakeup": "Apply_Eye_Makeup", "YoYo": "Yo_Yo"}[action]
        for g in range(1, 7):
            write_jpeg(ucf / "UCF-101-midframes" / folder / f"v_{action}_g{g:02d}_c01.jpg", seed=g)
            (train if g <= 5 else test).append(f"{action}/v_{action}_g{g:02d}_c01.avi" + (f" {n}" if g <= 5 else ""))
    (lists / "trainlist01.txt").write_text("\n".join(train) + "\n")
    (lists / "testlist01.txt").write_text("\n".join(test) + "\n")
    s = _load_twice(tmp_path, "ucf101")
    assert s.classnames == ["Apply Eye Makeup", "Yo Yo"] and len(s.test) == 2


# ----------------------------------------------------------------------------------------------------------
# `dspt datasets` and --download


def test_dspt_datasets_lists_found_and_missing(tmp_path, capsys):
    from dspt.cli import main

    make_coop_tree(tmp_path / "data", "oxford_flowers")
    make_coop_tree(tmp_path / "data", "eurosat", with_split=False)
    assert main(["datasets", "--root", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln and not ln.startswith((" ", "data root"))}
    assert rows["oxford_flowers"][2:7] == ["yes", "3", "6", "3", "3"]
    assert rows["eurosat"][2] == "yes" and "split_zhou_EuroSAT.json missing" in out
    assert rows["dtd"][2] == "no" and "no folder" in out and "--download dtd" in out
    assert len([r for r in rows if r in BENCHMARKS]) == 11
    st = {s.name: s for s in dataset_status(tmp_path / "data", tmp_path / "cache")}
    assert st["oxford_flowers"].found and st["oxford_flowers"].train == 6 and not st["ucf101"].found
    assert main(["datasets", "--json", "oxford_flowers", "--root", str(tmp_path / "data")]) == 0
    assert json.loads(capsys.readouterr().out)[0]["classes"] == 3


def test_status_table_names_the_layout_guide_once(tmp_path):
    from dspt.data import DATASETS, format_status_table
    from dspt.data.coop import COOP_DATASETS_MD

    statuses = dataset_status(tmp_path, tmp_path / "cache")
    table = format_status_table(statuses, tmp_path)
    assert table.count(COOP_DATASETS_MD) == 1 and table.splitlines()[-1].endswith(COOP_DATASETS_MD)
    assert "missing: " in table and "0 of 14 datasets found" in table
    custom = [s.name for s in statuses if s.kind == "custom"]
    assert custom == ["folder", "csv"] and list(DATASETS)[0] == "folder"  # registration order is listing order
    own = format_status_table([s for s in statuses if s.kind == "custom"], None)
    assert COOP_DATASETS_MD not in own and own.splitlines()[-1] == "0 of 0 datasets found under the root"


def test_download_lays_out_coop_folders(tmp_path, monkeypatch):
    import torchvision.datasets as tvd
    from scipy.io import savemat

    from dspt.data.download import download_dataset

    class FakeFlowers:  # what torchvision.datasets.Flowers102(download=True) leaves on disk
        classes = ["pink primrose", "globe-flower"]

        def __init__(self, root, download=False):
            base = Path(root) / "flowers-102"
            for i in range(20):
                write_jpeg(base / "jpg" / f"image_{i + 1:05d}.jpg", seed=i)
            savemat(base / "imagelabels.mat", {"labels": np.asarray([[1] * 10 + [2] * 10])})
            savemat(base / "setid.mat", {"trnid": np.arange(1, 3)})

    monkeypatch.setattr(tvd, "Flowers102", FakeFlowers)
    download_dataset("flowers102", tmp_path)
    d = tmp_path / "oxford_flowers"
    assert (d / "jpg").is_dir() and json.loads((d / "cat_to_name.json").read_text())["2"] == "globe-flower"
    s = load_data("oxford_flowers", root=tmp_path, cache_dir=tmp_path / "cache")
    assert s.classnames == ["pink primrose", "globe-flower"] and len(s.train) == 10

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(tvd, "DTD", offline)
    with pytest.raises(DataError, match=r"download of dtd failed \(OSError: network is unreachable\)"):
        download_dataset("dtd", tmp_path)
    with pytest.raises(DataError, match="ucf101 cannot be downloaded automatically.*Google Drive"):
        download_dataset("ucf101", tmp_path)
    # `--download` on a missing dataset goes through the same path
    monkeypatch.setattr(tvd, "EuroSAT", offline)
    with pytest.raises(DataError, match="download of eurosat failed"):
        load_data("eurosat", root=tmp_path, download=True)
