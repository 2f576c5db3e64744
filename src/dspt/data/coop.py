"""The 11 benchmark datasets of CoOp (and of the label-noise papers built on it), in CoOp's directory layout.

Put every dataset under one data root (``--root DIR`` or $DSPT_DATA), as CoOp's DATASETS.md describes::

    DIR/
      imagenet/         images/train/<wnid>/, images/val/<wnid>/, classnames.txt
      caltech-101/      101_ObjectCategories/, split_zhou_Caltech101.json
      oxford_pets/      images/, annotations/, split_zhou_OxfordPets.json
      stanford_cars/    cars_train/, cars_test/, devkit/, cars_test_annos_withlabels.mat, split_zhou_StanfordCars.json
      oxford_flowers/   jpg/, imagelabels.mat, cat_to_name.json, split_zhou_OxfordFlowers.json
      food-101/         images/, meta/, split_zhou_Food101.json
      fgvc_aircraft/    images/, variants.txt, images_variant_{train,val,test}.txt   (the archive's data/ folder)
      sun397/           SUN397/, split_zhou_SUN397.json, ClassName.txt, Training_01.txt, Testing_01.txt
      dtd/              images/, split_zhou_DescribableTextures.json
      eurosat/          2750/, split_zhou_EuroSAT.json
      ucf101/           UCF-101-midframes/, split_zhou_UCF101.json

The split files are CoOp's fixed splits (Google Drive links in CoOp's DATASETS.md). Where one is missing,
dspt says so and, where the dataset's own annotation files allow it (as CoOp's code does), generates a
seeded split instead, stored in dspt's cache folder (never in the data folder). FGVC-Aircraft uses the
official split files; ImageNet uses train/ for training and val/ as the test set (CoOp's protocol).
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from .base import DataError, is_image
from .download import download_dataset
from .imagefolder import read_classname_map
from .registry import DataSplits, DatasetStatus, default_data_root, register_dataset
from .splits import (SPLITS, Entries, entries_to_datasets, generated_split_path, input_stamp, read_split_file,
                     split_per_class, write_split_file)

log = logging.getLogger(__name__)

COOP_DATASETS_MD = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"


@dataclass(frozen=True)
class Benchmark:
    name: str  # dspt's name (CoOp's config file name)
    title: str  # CoOp's dataset class name
    folder: str  # folder under the data root
    image_dir: str  # folder (under `folder`) that split paths are relative to
    split_file: str | None  # CoOp's split file, None where the official split files are used
    template: str  # CoOp's zero-shot template (trainers/zsclip.py CUSTOM_TEMPLATES)
    sizes: tuple[int, int, int, int]  # classes, train, val, test of CoOp's split
    images_from: str  # where the images come from
    #: builds the split from the dataset's own annotation files, used when the split file is missing
    generator: Callable[[Path], Entries] | None = None
    generator_inputs: tuple[str, ...] = ()  # paths (under `folder`) the generator reads
    split_note: str = ""  # how the generator splits, for messages
    #: reads entries without a split file (ImageNet, FGVC-Aircraft)
    reader: Callable[..., Entries] | None = None
    aliases: tuple[str, ...] = ()
    downloadable: bool = False  # torchvision can fetch it (`--download`)
    markers: tuple[str, ...] = ()  # files that identify the dataset's own folder passed as --root/--data

    @property
    def split_source(self) -> str:
        return (f"{self.split_file} from the {self.title} section of CoOp's DATASETS.md "
                f"({COOP_DATASETS_MD}, Google Drive link)")


# ----------------------------------------------------------------------------------------------------------
# small readers


def _lines(path: Path) -> list[str]:
    try:
        return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except FileNotFoundError:
        raise DataError(f"'{path}' not found") from None


def _listdir(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if not p.name.startswith("."))


def _loadmat(path: Path) -> dict:
    try:
        from scipy.io import loadmat
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        raise DataError(f"reading '{path}' needs scipy; pip install scipy") from None
    try:
        return loadmat(str(path))
    except FileNotFoundError:
        raise DataError(f"'{path}' not found") from None
    except Exception as exc:
        raise DataError(f"cannot read MATLAB file '{path}' ({type(exc).__name__}); download it again") from None


def _folder_classes(image_dir: Path, ignored: tuple[str, ...] = (), rename: dict[str, str] | None = None,
                    ) -> dict[tuple[int, str], list[str]]:
    """Class folders in sorted order (CoOp's labels) -> relative image paths."""
    if not image_dir.is_dir():
        raise DataError(f"image folder '{image_dir}' not found")
    classes = [c for c in _listdir(image_dir) if (image_dir / c).is_dir() and c not in ignored]
    if not classes:
        raise DataError(f"image folder '{image_dir}' has no class sub-folders")
    out = {}
    for label, folder in enumerate(classes):
        files = [f for f in _listdir(image_dir / folder) if is_image(Path(f))]
        if not files:
            raise DataError(f"class folder '{image_dir / folder}' holds no images; add images or remove the folder")
        out[(label, (rename or {}).get(folder, folder))] = [f"{folder}/{f}" for f in files]
    return out


def _group(items: list[tuple[str, int, str]]) -> dict[tuple[int, str], list[str]]:
    out: dict[tuple[int, str], list[str]] = {}
    for rel, label, name in items:
        out.setdefault((label, name), []).append(rel)
    return out


def _trainval_split(trainval: list[tuple[str, int, str]], test: list[tuple[str, int, str]]) -> Entries:
    """CoOp's split_trainval: 20 % of each class of the official train(val) list becomes val."""
    entries = split_per_class(_group(trainval), (0.2, 0.8), ("val", "train"))
    entries["test"] = list(test)
    return entries


# ----------------------------------------------------------------------------------------------------------
# generators: the dataset's own annotation files -> a split like CoOp's (used only without the split file)


def _gen_folder_split(sub: str, ignored: tuple[str, ...] = (), rename: dict[str, str] | None = None,
                      ) -> Callable[[Path], Entries]:
    """CoOp's read_and_split_data: every class folder cut 50 / 20 / 30 into train / val / test."""

    def gen(d: Path) -> Entries:
        return split_per_class(_folder_classes(d / sub, ignored, rename), (0.5, 0.2, 0.3), SPLITS)

    return gen


def _gen_pets(d: Path) -> Entries:
    def read(name: str) -> list[tuple[str, int, str]]:
        out = []
        for n, line in enumerate(_lines(d / "annotations" / name), 1):
            if line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) < 2 or not parts[1].isdigit():
                raise DataError(f"{d / 'annotations' / name}:{n}: expected 'Image_name CLASS-ID ...', got '{line}'")
            breed = "_".join(parts[0].split("_")[:-1]).lower()
            out.append((parts[0] + ".jpg", int(parts[1]) - 1, breed))
        return out

    return _trainval_split(read("trainval.txt"), read("test.txt"))


def _gen_flowers(d: Path) -> Entries:
    labels = _loadmat(d / "imagelabels.mat").get("labels")
    if labels is None:
        raise DataError(f"'{d / 'imagelabels.mat'}' has no 'labels' array; download it again")
    try:
        names = json.loads((d / "cat_to_name.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read '{d / 'cat_to_name.json'}' ({type(exc).__name__})") from None
    by_class: dict[tuple[int, str], list[str]] = {}
    for i, lab in enumerate(labels.ravel().tolist()):
        lab = int(lab)
        if str(lab) not in names:
            raise DataError(f"'{d / 'cat_to_name.json'}' has no name for label {lab}")
        by_class.setdefault((lab - 1, names[str(lab)]), []).append(f"image_{i + 1:05d}.jpg")
    return split_per_class(by_class, (0.5, 0.2, 0.3), SPLITS)


def _gen_cars(d: Path) -> Entries:
    meta = _loadmat(d / "devkit" / "cars_meta.mat")["class_names"].ravel()

    def name(label: int) -> str:  # CoOp: the model year goes first ("2012 Tesla Model S Sedan")
        words = str(meta[label].item() if hasattr(meta[label], "item") else meta[label]).split(" ")
        return " ".join([words[-1]] + words[:-1])

    def read(folder: str, mat: Path) -> list[tuple[str, int, str]]:
        annos = _loadmat(mat)["annotations"].ravel()
        out = []
        for a in annos:
            label = int(a["class"].item()) - 1
            out.append((f"{folder}/{a['fname'].item()}", label, name(label)))
        return out

    return _trainval_split(read("cars_train", d / "devkit" / "cars_train_annos.mat"),
                           read("cars_test", d / "cars_test_annos_withlabels.mat"))


def _sun_file(d: Path, name: str) -> Path:
    return d / name if (d / name).is_file() else d / "SUN397" / name


def _gen_sun(d: Path) -> Entries:
    classes = [c.lstrip("/") for c in _lines(_sun_file(d, "ClassName.txt"))]
    index = {c: i for i, c in enumerate(classes)}

    def read(name: str) -> list[tuple[str, int, str]]:
        out = []
        for line in _lines(d / name):
            rel = line.lstrip("/")
            folder = os.path.dirname(rel)
            if folder not in index:
                raise DataError(f"{d / name}: '{line}' is in no class of ClassName.txt")
            # CoOp: drop the letter folder, put qualifiers such as indoor/outdoor first
            out.append((rel, index[folder], " ".join(folder.split("/")[1:][::-1])))
        return out

    return _trainval_split(read("Training_01.txt"), read("Testing_01.txt"))


def _ucf_name(action: str) -> str:
    return "_".join(re.findall(r"[A-Z][^A-Z]*", action)) or action


def _gen_ucf(d: Path) -> Entries:
    lists = d / "ucfTrainTestlist"
    index = {}
    for line in _lines(lists / "classInd.txt"):
        num, action = line.split()
        index[action] = int(num) - 1

    def read(name: str) -> list[tuple[str, int, str]]:
        out = []
        for line in _lines(lists / name):
            action, video = line.split()[0].split("/")
            out.append((f"{_ucf_name(action)}/{Path(video).stem}.jpg", index[action], _ucf_name(action)))
        return out

    return _trainval_split(read("trainlist01.txt"), read("testlist01.txt"))


# ----------------------------------------------------------------------------------------------------------
# readers of datasets that have no CoOp split file


def _read_fgvc(spec: Benchmark, d: Path, **_: object) -> Entries:
    need = ["variants.txt"] + [f"images_variant_{s}.txt" for s in SPLITS]
    missing = [n for n in need if not (d / n).is_file()]
    if missing:
        raise DataError(f"{spec.title}: '{d / missing[0]}' not found; it comes with the official archive "
                        f"fgvc-aircraft-2013b.tar.gz, whose data/ folder is '{d}' ({COOP_DATASETS_MD})")
    classes = _lines(d / "variants.txt")
    index = {c: i for i, c in enumerate(classes)}
    entries: Entries = {}
    for split in SPLITS:
        rows = []
        for n, line in enumerate(_lines(d / f"images_variant_{split}.txt"), 1):
            image, _, variant = line.partition(" ")
            if variant not in index:
                raise DataError(f"{d / f'images_variant_{split}.txt'}:{n}: variant '{variant}' is not in variants.txt")
            rows.append((f"{image}.jpg", index[variant], variant))
        entries[split] = rows
    return entries


def _read_imagenet(spec: Benchmark, d: Path, classnames: str | os.PathLike | None = None, **_: object) -> Entries:
    images = d / "images"
    for sub in ("train", "val"):
        if not (images / sub).is_dir():
            raise DataError(f"{spec.title}: '{images / sub}' not found; extract ILSVRC2012 {sub} images there, "
                            f"one folder per wnid ({COOP_DATASETS_MD})")
    names_file = Path(classnames) if classnames else d / "classnames.txt"
    if not names_file.is_file():
        raise DataError(f"{spec.title}: '{names_file}' not found; download classnames.txt from the ImageNet section "
                        f"of CoOp's DATASETS.md ({COOP_DATASETS_MD}): it maps wnid folders to CLIP's class names")
    mapping = read_classname_map(names_file)
    wnids = sorted(p.name for p in (images / "train").iterdir() if p.is_dir())
    if not wnids:
        raise DataError(f"{spec.title}: '{images / 'train'}' has no wnid class folders")
    unnamed = [w for w in wnids if w not in mapping]
    if unnamed:
        raise DataError(f"{spec.title}: '{names_file}' has no name for folder(s) {unnamed[:3]} "
                        f"({len(unnamed)} in all); use CoOp's classnames.txt")
    entries: Entries = {"train": [], "val": [], "test": []}
    for split, sub in (("train", "train"), ("test", "val")):
        loose = [p.name for p in (images / sub).iterdir() if p.is_file() and is_image(p)]
        if loose:
            raise DataError(f"{spec.title}: '{images / sub}' holds loose images (e.g. {loose[0]}); sort them into "
                            "one folder per wnid (e.g. with the widely used valprep.sh script)")
        for label, w in enumerate(wnids):
            folder = images / sub / w
            files = sorted(f.name for f in os.scandir(folder) if f.is_file() and is_image(Path(f.name))) \
                if folder.is_dir() else []
            if split == "train" and not files:
                raise DataError(f"{spec.title}: class folder '{folder}' holds no images")
            entries[split] += [(f"{sub}/{w}/{f}", label, mapping[w]) for f in files]
    return entries


# ----------------------------------------------------------------------------------------------------------
# the table of benchmarks

CALTECH_IGNORED = ("BACKGROUND_Google", "Faces_easy")
CALTECH_NAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
EUROSAT_NAMES = {
    "AnnualCrop": "Annual Crop Land", "Forest": "Forest", "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road", "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings", "River": "River",
    "SeaLake": "Sea or Lake",
}
_FOLDER_SPLIT = "a seeded 50/20/30 split of every class folder"
_TRAINVAL_SPLIT = "the official train/test lists, 20% of each class of train moved to val (seeded)"

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("imagenet", "ImageNet", "imagenet", "images", None, "a photo of a {}.", (1000, 1281167, 0, 50000),
              "ILSVRC2012 train and val images (image-net.org), val sorted into wnid folders",
              reader=_read_imagenet, aliases=("ilsvrc2012", "in1k")),
    Benchmark("caltech101", "Caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
              "a photo of a {}.", (100, 4128, 1649, 2465), "101_ObjectCategories.tar.gz (Caltech data portal)",
              _gen_folder_split("101_ObjectCategories", CALTECH_IGNORED, CALTECH_NAMES), ("101_ObjectCategories",),
              _FOLDER_SPLIT, aliases=("caltech-101", "caltech"), downloadable=True),
    Benchmark("oxford_pets", "OxfordPets", "oxford_pets", "images", "split_zhou_OxfordPets.json",
              "a photo of a {}, a type of pet.", (37, 2944, 736, 3669),
              "images.tar.gz and annotations.tar.gz (robots.ox.ac.uk/~vgg/data/pets)",
              _gen_pets, ("annotations/trainval.txt", "annotations/test.txt"), _TRAINVAL_SPLIT,
              aliases=("oxfordpets", "pets", "oxford_iiit_pet"), downloadable=True),
    Benchmark("stanford_cars", "StanfordCars", "stanford_cars", ".", "split_zhou_StanfordCars.json",
              "a photo of a {}.", (196, 6509, 1635, 8041),
              "cars_train, cars_test, devkit and cars_test_annos_withlabels.mat (Stanford Cars; mirrors only)",
              _gen_cars, ("devkit/cars_meta.mat", "devkit/cars_train_annos.mat", "cars_test_annos_withlabels.mat"),
              _TRAINVAL_SPLIT, aliases=("stanfordcars", "cars")),
    Benchmark("oxford_flowers", "OxfordFlowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
              "a photo of a {}, a type of flower.", (102, 4093, 1633, 2463),
              "102flowers.tgz and imagelabels.mat (robots.ox.ac.uk/~vgg/data/flowers/102), cat_to_name.json (CoOp)",
              _gen_flowers, ("imagelabels.mat", "cat_to_name.json"), "a seeded 50/20/30 split of every class",
              aliases=("flowers102", "flowers", "oxfordflowers", "flowers-102"), downloadable=True),
    Benchmark("food101", "Food101", "food-101", "images", "split_zhou_Food101.json",
              "a photo of {}, a type of food.", (101, 50500, 20200, 30300), "food-101.tar.gz (ETH Zurich)",
              _gen_folder_split("images"), ("images",), _FOLDER_SPLIT, aliases=("food-101", "food"),
              downloadable=True),
    Benchmark("fgvc_aircraft", "FGVCAircraft", "fgvc_aircraft", "images", None,
              "a photo of a {}, a type of aircraft.", (100, 3334, 3333, 3333),
              "fgvc-aircraft-2013b.tar.gz (robots.ox.ac.uk/~vgg/data/fgvc-aircraft); its data/ folder",
              reader=_read_fgvc, aliases=("fgvcaircraft", "aircraft", "fgvc"), downloadable=True,
              markers=("variants.txt",)),
    Benchmark("sun397", "SUN397", "sun397", "SUN397", "split_zhou_SUN397.json", "a photo of a {}.",
              (397, 15880, 3970, 19850), "SUN397.tar.gz and Partitions.zip (vision.princeton.edu)",
              _gen_sun, ("Training_01.txt", "Testing_01.txt"), _TRAINVAL_SPLIT, aliases=("sun",),
              downloadable=True),
    Benchmark("dtd", "DescribableTextures", "dtd", "images", "split_zhou_DescribableTextures.json", "{} texture.",
              (47, 2820, 1128, 1692), "dtd-r1.0.1.tar.gz (robots.ox.ac.uk/~vgg/data/dtd)",
              _gen_folder_split("images"), ("images",), _FOLDER_SPLIT,
              aliases=("describabletextures", "textures"), downloadable=True),
    Benchmark("eurosat", "EuroSAT", "eurosat", "2750", "split_zhou_EuroSAT.json",
              "a centered satellite photo of {}.", (10, 13500, 5400, 8100), "EuroSAT.zip (RGB version)",
              _gen_folder_split("2750", (), EUROSAT_NAMES), ("2750",), _FOLDER_SPLIT, downloadable=True),
    Benchmark("ucf101", "UCF101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
              "a photo of a person doing {}.", (101, 7639, 1898, 3783),
              "UCF-101-midframes.zip (CoOp's Google Drive link in DATASETS.md)",
              _gen_ucf, ("ucfTrainTestlist/classInd.txt", "ucfTrainTestlist/trainlist01.txt",
                         "ucfTrainTestlist/testlist01.txt"), _TRAINVAL_SPLIT, aliases=("ucf-101", "ucf")),
]}


def find_dataset_dir(spec: Benchmark, root: str | os.PathLike | None) -> Path:
    """`root/<folder>` (root = the data root) or `root` itself (root = the dataset's own folder)."""
    root = root if root is not None else default_data_root()
    if root is None:
        raise DataError(f"no data root for {spec.name}; pass --root DIR (the folder holding {spec.folder}/ and the "
                        "other datasets) or set DSPT_DATA")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root '{root}' not found; pass the folder holding {spec.folder}/ as --root")
    if (root / spec.folder).is_dir():
        return root / spec.folder
    markers = [n for n in (spec.image_dir, spec.split_file, *spec.generator_inputs, *spec.markers) if n and n != "."]
    if root.name == spec.folder or any((root / n).exists() for n in markers):
        return root
    fetch = f", or run `dspt datasets --download {spec.name} --root {root}`" if spec.downloadable else ""
    raise DataError(f"{spec.title} not found: no folder '{root / spec.folder}'; get {spec.images_from} and lay it "
                    f"out there as CoOp's DATASETS.md describes ({COOP_DATASETS_MD}){fetch}")


def resolve_entries(spec: Benchmark, d: Path, cache_dir: str | os.PathLike | None = None,
                    classnames: str | os.PathLike | None = None) -> tuple[Entries, str, bool]:
    """(entries, where they came from, generated?) for the dataset in folder `d`."""
    if spec.reader is not None:
        return spec.reader(spec, d, classnames=classnames), "official split files", False
    split_path = d / spec.split_file
    if split_path.is_file():
        return read_split_file(split_path), str(split_path), False
    missing = [n for n in spec.generator_inputs if not (d / n).exists()]
    if spec.name == "sun397" and not missing and not _sun_file(d, "ClassName.txt").is_file():
        missing = ["ClassName.txt"]
    if spec.generator is None or missing:
        also = (f" (or add {', '.join(missing)} so dspt can generate a seeded split)" if spec.generator else "")
        raise DataError(f"{spec.title}: split file '{split_path}' not found; download {spec.split_source} "
                        f"and put it in '{d}'{also}")
    inputs = [d / n for n in spec.generator_inputs]
    stamp = input_stamp(inputs + [d])
    cached = generated_split_path(spec.name, stamp, cache_dir)
    note = (f"{spec.split_file} missing; using {spec.split_note}, generated by dspt and stored in '{cached}' "
            f"(numbers are comparable with published ones only with CoOp's file: {spec.split_source})")
    if cached.is_file():
        try:
            return read_split_file(cached), note, True
        except DataError:
            log.warning("generated split %s is unreadable; generating it again", cached)
    entries = spec.generator(d)
    write_split_file(cached, entries, source=str(d), generated_by="dspt", note=spec.split_note)
    log.warning("%s: %s", spec.title, note)
    return entries, note, True


def load_benchmark(
    spec: Benchmark,
    root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    test_root: str | os.PathLike | None = None,
    classnames: str | os.PathLike | None = None,
    check_files: bool = True,
    **_: object,
) -> DataSplits:
    """Train / val / test of one benchmark, from CoOp's split file (or the official lists, or a generated split)."""
    if test_root is not None:
        raise DataError(f"--test-data is for folder datasets; {spec.name} uses its own test split")
    if classnames is not None and spec.name != "imagenet":
        raise DataError(f"--classnames is for folder/CSV data; {spec.name} uses CoOp's class names")
    try:
        d = find_dataset_dir(spec, root)
    except DataError:
        if not download:
            raise
        download_dataset(spec.name, root if root is not None else default_data_root())
        d = find_dataset_dir(spec, root)
    entries, source, generated = resolve_entries(spec, d, cache_dir, classnames)
    check_files = check_files and spec.name != "imagenet"  # ImageNet's entries were just listed from disk
    parts = entries_to_datasets(entries, d / spec.image_dir, spec.name, spec.template, source, check_files,
                                meta={"dataset_dir": str(d), "split_generated": generated})
    return DataSplits(train=parts["train"], test=parts["test"], val=parts["val"])


def probe_benchmark(spec: Benchmark, root: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                    ) -> DatasetStatus:
    try:
        d = find_dataset_dir(spec, root)
    except DataError as exc:
        return DatasetStatus(spec.name, "benchmark", False, problem=str(exc))
    try:
        splits = load_benchmark(spec, d, cache_dir)
    except DataError as exc:
        return DatasetStatus(spec.name, "benchmark", False, location=str(d), problem=str(exc))
    counts = (splits.train.num_classes, len(splits.train), len(splits.val) if splits.val else 0, len(splits.test))
    notes = []
    if splits.train.meta.get("split_generated"):
        notes.append(f"{spec.split_file} missing, so dspt generated {spec.split_note}; for "
                     f"CoOp's split get the file from the {spec.title} section of CoOp's DATASETS.md (Google Drive)")
    if counts != spec.sizes:
        notes.append("counts differ from CoOp's ({} classes, {:,}/{:,}/{:,} train/val/test)".format(*spec.sizes))
    return DatasetStatus(spec.name, "benchmark", True, *counts, location=str(d), note="; ".join(notes) or None)


for _spec in BENCHMARKS.values():
    register_dataset(_spec.name, kind="benchmark", template=_spec.template,
                     description=f"{_spec.title} (CoOp layout: {_spec.folder}/)", aliases=_spec.aliases,
                     probe=partial(probe_benchmark, _spec), guide=COOP_DATASETS_MD,
                     sizes=_spec.sizes)(partial(load_benchmark, _spec))
