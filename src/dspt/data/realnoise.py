"""Real label noise: labels shipped with a dataset (``--noise given``).

- CIFAR-10N / CIFAR-100N: the `.pt` label files of the CIFAR-N release (``CIFAR-10_human.pt``: clean_label,
  aggre_label, worse_label, random_label1..3; ``CIFAR-100_human.pt``: clean_label, noisy_label), indexed in the
  original CIFAR training order. Use them with ``--dataset cifar10`` / ``cifar100``, whose images come from the
  python-pickle release (``cifar-10-batches-py/``, ``cifar-100-python/``, the layout torchvision downloads),
  the only layout that keeps that order: ``--noise given --noise-file CIFAR-10_human.pt --label-set worse``.
- Food-101N (``--dataset food101n``): ``Food-101N_release/`` (images, meta/classes.txt, meta/imagelist.tsv,
  meta/verified_{train,val}.tsv) for training, Food-101's test images (``food-101/``) for testing. Its labels are
  the noisy ones; clean labels are unknown. The validation split is the rows of verified_val.tsv verified correct
  (label 1); imagelist.tsv lists those images too, so they are removed from the training pool (matched by their
  path relative to ``images/``, spelled the same way whatever the list wrote: ``./``, ``images/``, backslashes),
  and ``train.meta['removed_validation_images']`` counts them. The noise estimate
  (``verified_noise_rate``, from verified_train.tsv) is taken over the verified rows still in the training pool
  (``verified_train`` of them).
- A generic noisy-label list (``--noise-file FILE``, e.g. Clothing1M's noisy_label_kv.txt): one ``path label``
  per line (space, tab or comma), labels as class names or indices; paths relative to the list's folder or to
  the dataset's image folder. Every training image needs a row.
"""
from __future__ import annotations

import codecs
import logging
import os
import pickle
import posixpath
import re
import shutil
from pathlib import Path

import numpy as np

from ..io import atomic_write_json
from .base import DataError, ImageDataset, cache_root
from .download import download_dataset
from .registry import DataSplits, DatasetStatus, default_data_root, register_dataset
from .splits import clean_classname, input_stamp
from .table import label_indexer, read_table

log = logging.getLogger(__name__)

CIFAR = {
    10: {"folder": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
         "meta": "batches.meta", "names": "label_names", "labels": "labels", "n": (50000, 10000)},
    100: {"folder": "cifar-100-python", "train": ["train"], "test": ["test"], "meta": "meta",
          "names": "fine_label_names", "labels": "fine_labels", "n": (50000, 10000)},
}
CIFARN_SETS = {"aggre": "aggre_label", "worse": "worse_label", "random1": "random_label1",
               "random2": "random_label2", "random3": "random_label3", "noisy": "noisy_label"}

# What unpickling an integer numpy array needs, under the names numpy 1.x (numpy.core) and 2.x (numpy._core) use.
_RECONSTRUCT = np.ndarray(0).__reduce__()[0]  # multiarray._reconstruct, wherever this numpy keeps it
_ARRAY_GLOBALS = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype,
                  "numpy.core.multiarray._reconstruct": _RECONSTRUCT,
                  "numpy._core.multiarray._reconstruct": _RECONSTRUCT}
#: torch's weights-only unpickler also checks the class of each dtype it builds: CIFAR-N labels are integers
_INT_DTYPES = [type(np.dtype(t)) for t in (np.int8, np.int16, np.int32, np.int64,
                                           np.uint8, np.uint16, np.uint32, np.uint64)]
_FROMBUFFER = np.ndarray(0).__reduce_ex__(5)[0]  # numeric._frombuffer: arrays pickled at protocol 5
#: plain pickles (CIFAR's python batches) may also hold arrays pickled at protocol 5 and Python 3 bytes
_PICKLE_GLOBALS = {**_ARRAY_GLOBALS, "numpy.core.numeric._frombuffer": _FROMBUFFER,
                   "numpy._core.numeric._frombuffer": _FROMBUFFER, "_codecs.encode": codecs.encode}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: a file naming any other class or function is refused before
    anything from it runs (CIFAR's batches are pickles, and a pickle can otherwise run any code)."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _PICKLE_GLOBALS[f"{module}.{name}"]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None


class _Refused(pickle.UnpicklingError):
    """A pickle names a class or function outside the allow-list."""


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 from the python pickles (original order), written once as PNGs into the cache


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            data = _ArrayUnpickler(fh, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"CIFAR file '{path}' not found; download the python version of CIFAR "
                        "(or pass --download)") from None
    except _Refused as exc:
        raise DataError(f"CIFAR file '{path}' holds objects other than arrays ({exc}); not loaded: download the "
                        "python version of CIFAR again") from None
    except Exception as exc:
        raise DataError(f"cannot read CIFAR file '{path}' ({type(exc).__name__}); download it again") from None
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def _cifar_dir(which: int, root: str | os.PathLike | None, download: bool = False) -> Path:
    spec = CIFAR[which]
    root = root if root is not None else default_data_root()
    if root is None:
        raise DataError(f"no data root for cifar{which}; pass --root DIR (holding {spec['folder']}/) or set DSPT_DATA")
    root = Path(root).expanduser()
    for d in (root / spec["folder"], root):
        if (d / spec["meta"]).is_file():
            return d
    if download:
        download_dataset(f"cifar{which}", root)
        return _cifar_dir(which, root)
    raise DataError(f"CIFAR-{which} not found: '{root / spec['folder']}' does not exist; put the python version "
                    f"there (cifar-{which}-python.tar.gz from cs.toronto.edu/~kriz/cifar.html) or pass --download")


def _cifar_labels(which: int, d: Path, split: str) -> np.ndarray:
    spec = CIFAR[which]
    return np.concatenate([np.asarray(_unpickle(d / f)[spec["labels"]], dtype=np.int64) for f in spec[split]])


def _materialise(which: int, d: Path, cache_dir: str | os.PathLike | None) -> Path:
    """PNG files <cache>/images/cifar<which>-<stamp>/{train,test}/NNNNN.png in the original order (written once)."""
    spec = CIFAR[which]
    files = [d / f for f in spec["train"] + spec["test"]]
    out = cache_root(cache_dir) / "images" / f"cifar{which}-{input_stamp(files)}"
    if (out / "complete.json").is_file():
        return out
    from PIL import Image

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("writing CIFAR-%d images as PNG files into %s (once)", which, out)
    counts = {}
    for split in ("train", "test"):
        (tmp / split).mkdir(parents=True)
        i = 0
        for f in spec[split]:
            data = np.asarray(_unpickle(d / f)["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            for img in data:
                Image.fromarray(img).save(tmp / split / f"{i:05d}.png", compress_level=1)
                i += 1
        counts[split] = i
    atomic_write_json(tmp / "complete.json", {"source": str(d), **counts})
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_cifar(which: int, root: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
               download: bool = False) -> DataSplits:
    d = _cifar_dir(which, root, download)
    spec = CIFAR[which]
    raw = _unpickle(d / spec["meta"])[spec["names"]]
    names = [clean_classname(n.decode() if isinstance(n, bytes) else n) for n in raw]
    images = _materialise(which, d, cache_dir)
    out = {}
    for split in ("train", "test"):
        labels = _cifar_labels(which, d, split)
        paths = [str(images / split / f"{i:05d}.png") for i in range(len(labels))]
        out[split] = ImageDataset(paths, labels, names, name=f"cifar{which}",
                                  meta={"root": str(images / split), "source": str(d), "original_order": True})
    return DataSplits(train=out["train"], test=out["test"])


def _probe_cifar(which: int, root: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> DatasetStatus:
    d = _cifar_dir(which, root)
    spec = CIFAR[which]
    names = _unpickle(d / spec["meta"])[spec["names"]]
    n_train, n_test = (len(_cifar_labels(which, d, s)) for s in ("train", "test"))
    return DatasetStatus(f"cifar{which}", "real-noise", True, len(names), n_train, 0, n_test, str(d),
                         note=f"CIFAR-{which}N: --noise given --noise-file CIFAR-{which}_human.pt"
                              + (" --label-set worse|aggre|random1" if which == 10 else ""))


def _register_cifar(which: int) -> None:
    def build(root=None, cache_dir=None, download=False, test_root=None, **_: object) -> DataSplits:
        if test_root is not None:
            raise DataError(f"--test-data is for folder datasets; cifar{which} uses its test batch")
        return load_cifar(which, root, cache_dir, download)

    register_dataset(f"cifar{which}", kind="real-noise", aliases=(f"cifar-{which}", f"cifar{which}n"),
                     description=f"CIFAR-{which} python pickles ({CIFAR[which]['folder']}/), CIFAR-{which}N labels",
                     probe=lambda root, cache_dir=None: _probe_cifar(which, root, cache_dir),
                     sizes=(which, 50000, 0, 10000))(build)


_register_cifar(10)
_register_cifar(100)


# ----------------------------------------------------------------------------------------------------------
# label files: CIFAR-N .pt and generic lists


def _load_pt(path: Path) -> dict:
    """A CIFAR-N label file: a dict of integer numpy arrays, loaded by torch's restricted (weights-only)
    unpickler with exactly the numpy globals such arrays need; anything else is refused, never run."""
    import torch

    allowed = [*_INT_DTYPES, *((obj, name) for name, obj in _ARRAY_GLOBALS.items())]
    try:
        with torch.serialization.safe_globals(allowed):
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # an UnpicklingError naming the refused global, or a damaged file
        found = re.search(r"GLOBAL (\S+) was not an allowed global|but got <class '([^']+)'>", str(exc))
        if found:
            raise DataError(f"label file '{path}' holds objects other than arrays of integers "
                            f"({found.group(1) or found.group(2)}); "
                            "expected the CIFAR-N .pt dict of integer label arrays") from None
        raise DataError(f"cannot read label file '{path}' ({type(exc).__name__}); download it again") from None
    if not isinstance(data, dict):
        raise DataError(f"label file '{path}' holds a {type(data).__name__}; expected the CIFAR-N dict of labels")
    return data


def read_cifarn(path: str | os.PathLike, label_set: str | None, dataset: ImageDataset) -> np.ndarray:
    """The chosen noisy labels of a CIFAR-N file, checked against the dataset's clean labels and order."""
    path = Path(path)
    data = _load_pt(path)
    sets = [k for k, v in CIFARN_SETS.items() if v in data]
    if label_set is None:
        if len(sets) != 1:
            raise DataError(f"label file '{path}' has label sets {', '.join(sets) or 'none'}; choose one with "
                            "--label-set (e.g. worse, aggre, random1 for CIFAR-10N; noisy for CIFAR-100N)")
        label_set = sets[0]
    key = CIFARN_SETS.get(label_set, label_set)
    if key not in data:
        raise DataError(f"label file '{path}' has no '{key}'; its label sets: {', '.join(sets)}")
    given = np.asarray(data[key], dtype=np.int64).ravel()
    if len(given) != len(dataset):
        raise DataError(f"label file '{path}' has {len(given)} labels but the training set has {len(dataset)} "
                        "images; CIFAR-N files label the full 50,000-image CIFAR training set")
    if "clean_label" in data:
        clean = np.asarray(data["clean_label"], dtype=np.int64).ravel()
        wrong = int((clean != dataset.labels).sum())
        if wrong:
            raise DataError(f"label file '{path}': its clean_label disagrees with the dataset at {wrong} of "
                            f"{len(clean)} images; CIFAR-N labels follow the original CIFAR training order, "
                            "so use --dataset cifar10/cifar100 (python pickles), not an image folder")
    if given.min() < 0 or given.max() >= dataset.num_classes:
        raise DataError(f"label file '{path}': '{key}' has labels outside the {dataset.num_classes} classes")
    return given


def read_noise_list(path: str | os.PathLike, dataset: ImageDataset) -> np.ndarray:
    """Given labels for every image of `dataset` from a 'path label' list."""
    rows, path = read_table(path)
    names = list(dataset.classnames)
    lookup = {n: i for i, n in enumerate(names)}
    lookup.update({n.replace(" ", "_"): i for i, n in enumerate(names)})
    _, to_index = label_indexer([r["label"] for r in rows], names, str(path))
    base = dataset.meta.get("root")
    by_path: dict[str, int] = {}
    for r in rows:
        value = r["label"]
        label = lookup[value] if value in lookup else to_index(value, r["line"])
        p = Path(r["path"]).expanduser()
        keys = [str(p)] if p.is_absolute() else [os.path.normpath(path.parent / p)] + \
            ([os.path.normpath(Path(base) / p)] if base else [])
        for k in keys:
            by_path[k] = label
    given = np.empty(len(dataset), dtype=np.int64)
    missing = []
    for i, p in enumerate(dataset.paths):
        k = os.path.normpath(p)
        if k in by_path:
            given[i] = by_path[k]
        else:
            missing.append(p)
    if missing:
        raise DataError(f"noise file '{path}' has no label for {len(missing)} of {len(dataset)} training images, "
                        f"e.g. '{missing[0]}'; list every image (paths relative to '{path.parent}'"
                        + (f" or '{base}')" if base else ")"))
    return given


def given_labels(dataset: ImageDataset, noise_file: str | os.PathLike | None = None,
                 label_set: str | None = None) -> tuple[np.ndarray, bool]:
    """(given labels aligned with `dataset`, whether the dataset's labels are clean ground truth).

    From `noise_file` (CIFAR-N .pt or a generic list), else the noisy labels the dataset ships with
    (a CSV's label column beside clean_label, Food-101N's web labels).
    """
    if noise_file is not None:
        p = Path(noise_file).expanduser()
        if not p.is_file():
            raise DataError(f"noise file '{p}' not found; pass a CIFAR-N .pt file or a 'path label' list")
        if p.suffix.lower() in (".pt", ".pth"):
            return read_cifarn(p, label_set, dataset), True
        return read_noise_list(p, dataset), not dataset.meta.get("labels_are_noisy", False)
    if label_set is not None:
        raise DataError("--label-set chooses a label set of a CIFAR-N file; pass that file with --noise-file")
    if dataset.noisy_labels is not None:
        return dataset.noisy_labels.copy(), True
    if dataset.meta.get("labels_are_noisy"):
        return dataset.labels.copy(), False
    raise DataError(f"--noise given needs labels shipped with the data, and {dataset.name} has none: pass "
                    "--noise-file (a CIFAR-N .pt file or a 'path label' list), a CSV with label and clean_label "
                    "columns, or --dataset food101n")


# ----------------------------------------------------------------------------------------------------------
# Food-101N


def _food101n_dirs(root: str | os.PathLike | None) -> tuple[Path, Path]:
    root = root if root is not None else default_data_root()
    if root is None:
        raise DataError("no data root for food101n; pass --root DIR (holding Food-101N_release/ and food-101/)")
    root = Path(root).expanduser()
    n = root / "Food-101N_release" if (root / "Food-101N_release").is_dir() else root
    if not (n / "meta" / "imagelist.tsv").is_file():
        raise DataError(f"Food-101N not found: '{root / 'Food-101N_release' / 'meta' / 'imagelist.tsv'}' does not "
                        "exist; extract Food-101N_release.zip (kuanghuei.github.io/Food-101N) under the root")
    f = root / "food-101" if (root / "food-101").is_dir() else n.parent / "food-101"
    if not (f / "meta" / "test.txt").is_file():
        raise DataError(f"Food-101N is tested on Food-101's test images, and '{f / 'meta' / 'test.txt'}' is missing; "
                        "put food-101/ (food-101.tar.gz) beside Food-101N_release/")
    return n, f


def _tsv_rows(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise DataError(f"'{path}' not found; extract the complete Food-101N_release.zip")
    lines = [ln.rstrip("\n") for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return [ln.split("\t") for ln in lines[1:]]  # first line is a header


def _food_rel(rel: str, classes: dict[str, int]) -> str:
    """An image path of Food-101N's lists, spelled one way: relative to ``images/`` ('class/key.jpg'), '/'
    separators, './' and doubled '/' collapsed, no leading 'images/' (as some copies of the lists write it)."""
    p = posixpath.normpath(rel.strip().replace("\\", "/"))
    if p.startswith("images/") and p.split("/")[0] not in classes:
        p = p[len("images/"):]
    return p


def load_food101n(root: str | os.PathLike | None = None, check_files: bool = True) -> DataSplits:
    """Food-101N's training images with their web labels, minus the verified validation images (the `val` split),
    and Food-101's test images. `train.meta` records `removed_validation_images` (validation images that
    imagelist.tsv also lists, taken out of training), `verified_train` and `verified_noise_rate` (the share of
    verified_train.tsv rows marked wrong, over the rows whose images are still in training)."""
    n, f = _food101n_dirs(root)
    classes = [r[0] for r in _tsv_rows(n / "meta" / "classes.txt")]
    index = {c: i for i, c in enumerate(classes)}
    names = [clean_classname(c) for c in classes]
    images = n / "images"

    def rows_to(paths_labels: list[tuple[str, int]], split: str, base: Path) -> ImageDataset:
        paths = [str(base / rel) for rel, _ in paths_labels]
        if check_files:
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                raise DataError(f"food101n: {len(missing)} {split} image(s) listed but missing, e.g. '{missing[0]}'; "
                                "extract the complete archive")
        return ImageDataset(paths, np.asarray([lab for _, lab in paths_labels], dtype=np.int64), names,
                            name="food101n", template="a photo of {}, a type of food.", meta={"root": str(base)})

    def label_of(rel: str, where: Path) -> int:
        cls = rel.split("/")[0]
        if cls not in index:
            raise DataError(f"{where}: '{rel}' is in no class of classes.txt")
        return index[cls]

    imagelist, val_list = n / "meta" / "imagelist.tsv", n / "meta" / "verified_val.tsv"
    vrels = [_food_rel(r[0], index) for r in _tsv_rows(val_list) if len(r) > 1 and r[1].strip() == "1"]
    in_val = set(vrels)
    listed = [_food_rel(r[0], index) for r in _tsv_rows(imagelist)]
    kept = [rel for rel in listed if rel not in in_val]
    train = rows_to([(rel, label_of(rel, imagelist)) for rel in kept], "train", images)
    in_train = set(kept)
    verified = {rel: int(r[1]) for r in _tsv_rows(n / "meta" / "verified_train.tsv") if len(r) > 1
                for rel in [_food_rel(r[0], index)] if rel in in_train}
    train.meta.update(labels_are_noisy=True, verified_train=len(verified),
                      verified_noise_rate=(1 - float(np.mean(list(verified.values())))) if verified else None,
                      removed_validation_images=len(listed) - len(kept))
    if len(listed) > len(kept):
        log.info("food101n: %d of the %d training images are validation images (verified_val.tsv); "
                 "they are left out of training", len(listed) - len(kept), len(listed))
    val = rows_to([(rel, label_of(rel, val_list)) for rel in vrels], "val", images) if vrels else None
    test_rows = []
    for rel in (ln.strip() for ln in (f / "meta" / "test.txt").read_text().splitlines() if ln.strip()):
        test_rows.append((rel + ".jpg", label_of(rel, f / "meta" / "test.txt")))
    test = rows_to(test_rows, "test", f / "images")
    return DataSplits(train=train, test=test, val=val)


def _probe_food101n(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> DatasetStatus:
    s = load_food101n(root, check_files=False)
    rate, removed = s.train.meta.get("verified_noise_rate"), s.train.meta.get("removed_validation_images")
    return DatasetStatus("food101n", "real-noise", True, s.train.num_classes, len(s.train),
                         len(s.val) if s.val else 0, len(s.test), str(Path(s.train.meta["root"]).parent),
                         note="web labels (clean unknown)" + (f"; verified subset: {rate:.1%} wrong" if rate else "")
                         + (f"; {removed} validation images left out of training" if removed else ""))


@register_dataset("food101n", kind="real-noise", template="a photo of {}, a type of food.", aliases=("food-101n",),
                  description="Food-101N web-labelled training images, Food-101 test images", probe=_probe_food101n)
def food101n_dataset(root=None, test_root=None, **_: object) -> DataSplits:
    """Food-101N (noisy web labels) for training, Food-101's test split for testing."""
    if test_root is not None:
        raise DataError("--test-data is for folder datasets; food101n uses Food-101's test split")
    return load_food101n(root)
