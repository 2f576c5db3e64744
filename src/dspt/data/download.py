"""`--download`: fetch the datasets torchvision can download and lay them out as the loaders expect.

torchvision downloads into its own folder names (``oxford-iiit-pet/``, ``flowers-102/``, ...); dspt then links
(or, where links are impossible, moves) the parts into CoOp's layout under the data root. CoOp's split files are
on Google Drive and are not downloaded: where one is missing, the loader generates a seeded split (and says so).
Needs internet; everything else in dspt works offline.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

from .base import DataError
from .registry import resolve_dataset_name

log = logging.getLogger(__name__)


def _link(src: Path, dst: Path) -> None:
    """Make `dst` point at `src` (a relative symlink; moved where symlinks are not allowed)."""
    if dst.exists() or dst.is_symlink():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        dst.symlink_to(os.path.relpath(src, dst.parent), target_is_directory=src.is_dir())
    except OSError:
        shutil.move(str(src), str(dst))


def _tv(name: str) -> Callable:
    import torchvision.datasets as tvd

    return getattr(tvd, name)


def _caltech101(root: Path) -> None:
    _tv("Caltech101")(str(root / "caltech-101"), download=True)  # -> caltech-101/caltech101/101_ObjectCategories
    _link(root / "caltech-101" / "caltech101" / "101_ObjectCategories", root / "caltech-101" / "101_ObjectCategories")


def _oxford_pets(root: Path) -> None:
    _tv("OxfordIIITPet")(str(root / "oxford_pets"), download=True)  # -> oxford_pets/oxford-iiit-pet/images, ...
    for part in ("images", "annotations"):
        _link(root / "oxford_pets" / "oxford-iiit-pet" / part, root / "oxford_pets" / part)


def _oxford_flowers(root: Path) -> None:
    ds = _tv("Flowers102")(str(root / "oxford_flowers"), download=True)  # -> oxford_flowers/flowers-102/...
    base = root / "oxford_flowers" / "flowers-102"
    for part in ("jpg", "imagelabels.mat", "setid.mat"):
        _link(base / part, root / "oxford_flowers" / part)
    names = root / "oxford_flowers" / "cat_to_name.json"
    if not names.exists() and getattr(ds, "classes", None):
        names.write_text(json.dumps({str(i + 1): c for i, c in enumerate(ds.classes)}, indent=1))


def _food101(root: Path) -> None:
    _tv("Food101")(str(root), download=True)  # -> food-101/{images,meta}, CoOp's layout already


def _fgvc(root: Path) -> None:
    _tv("FGVCAircraft")(str(root / "fgvc_aircraft"), download=True)  # -> fgvc_aircraft/fgvc-aircraft-2013b/data
    data = root / "fgvc_aircraft" / "fgvc-aircraft-2013b" / "data"
    for part in ("images", "variants.txt", *(f"images_variant_{s}.txt" for s in ("train", "val", "test"))):
        _link(data / part, root / "fgvc_aircraft" / part)


def _sun397(root: Path) -> None:
    _tv("SUN397")(str(root / "sun397"), download=True)  # -> sun397/SUN397/ (with ClassName.txt inside)


def _dtd(root: Path) -> None:
    _tv("DTD")(str(root / "dtd"), download=True)  # -> dtd/dtd/dtd/{images,labels,imdb}
    base = root / "dtd" / "dtd" / "dtd"
    for part in ("images", "labels", "imdb"):
        _link(base / part, root / "dtd" / part)


def _eurosat(root: Path) -> None:
    _tv("EuroSAT")(str(root), download=True)  # -> eurosat/2750, CoOp's layout already


def _cifar10(root: Path) -> None:
    _tv("CIFAR10")(str(root), train=True, download=True)  # -> cifar-10-batches-py/


def _cifar100(root: Path) -> None:
    _tv("CIFAR100")(str(root), train=True, download=True)  # -> cifar-100-python/


DOWNLOADERS: dict[str, Callable[[Path], None]] = {
    "caltech101": _caltech101, "oxford_pets": _oxford_pets, "oxford_flowers": _oxford_flowers, "food101": _food101,
    "fgvc_aircraft": _fgvc, "sun397": _sun397, "dtd": _dtd, "eurosat": _eurosat, "cifar10": _cifar10,
    "cifar100": _cifar100,
}

MANUAL = {
    "imagenet": "ILSVRC2012 needs an account at image-net.org; put train/ and val/ (one folder per wnid) under "
                "imagenet/images/ and CoOp's classnames.txt in imagenet/",
    "stanford_cars": "the original Stanford Cars links are dead (torchvision cannot fetch it); use a mirror and "
                     "CoOp's split_zhou_StanfordCars.json",
    "ucf101": "CoOp's UCF-101-midframes.zip and split_zhou_UCF101.json are on Google Drive (CoOp's DATASETS.md)",
    "food101n": "Food-101N_release.zip: kuanghuei.github.io/Food-101N (plus food-101/ for testing)",
}


def download_dataset(name: str, root: str | os.PathLike | None) -> Path:
    """Download dataset `name` under `root` in the layout its loader reads; returns the root."""
    name = resolve_dataset_name(name)
    if root is None:
        raise DataError(f"--download needs a data root; pass --root DIR (where {name} is to be placed)")
    if name not in DOWNLOADERS:
        how = MANUAL.get(name, "it is your own data")
        raise DataError(f"{name} cannot be downloaded automatically: {how}")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s into %s (torchvision)", name, root)
    try:
        DOWNLOADERS[name](root)
    except DataError:
        raise
    except Exception as exc:  # network errors, dead links, checksum failures
        why = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise DataError(f"download of {name} failed ({type(exc).__name__}: {why}); check the internet connection, "
                        "or download it by hand (see `dspt datasets`)") from None
    return root
