"""Custom data as a CSV / TSV file: one image per row.

Columns (a header row names them; without one the order is path, label, split):

- ``path`` (or image / file / filename / filepath): the image, relative paths resolved against the file's folder;
- ``label`` (or class / classname / target): a class name or an integer class index;
- ``split`` (optional): train / val / test (also valid, validation, training, testing);
- ``clean_label`` (optional, or true_label): the true class when ``label`` holds noisy labels (a generic noisy
  label list); ``--noise given`` then trains on ``label`` and reports the realised noise rate.

Class order: the ``--classnames`` file (TXT one name per line, or JSON list, or JSON {index: name}) when given,
else the class names in natural order, else 0..max for integer labels.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from .base import DataError, ImageDataset, natural_key, read_name_file
from .registry import DataSplits, register_dataset
from .sampling import stratified_split

PATH_COLS = ("path", "image", "file", "filename", "filepath", "img", "image_path")
LABEL_COLS = ("label", "class", "classname", "class_name", "target", "noisy_label", "given_label")
SPLIT_COLS = ("split", "subset", "set")
CLEAN_COLS = ("clean_label", "true_label", "clean", "true", "clean_class")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}


def read_class_list(path: str | os.PathLike) -> list[str]:
    """Class names by index: TXT (one per line), JSON list, or JSON {index: name}."""
    text, data = read_name_file(path, "pass a TXT file with one class name per line")
    if data is not None:
        if isinstance(data, list):
            return [str(x) for x in data]
        if isinstance(data, dict) and all(str(k).lstrip("-").isdigit() for k in data):
            keys = sorted(int(k) for k in data)
            if keys != list(range(keys[0], keys[0] + len(keys))) or keys[0] not in (0, 1):
                raise DataError(f"class-name file '{path}': keys must be consecutive indices from 0 (or 1)")
            return [str(data[str(k)] if str(k) in data else data[k]) for k in keys]
        raise DataError(f"class-name file '{path}' must hold a JSON list of names or {{index: name}}")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _pick(header: list[str], names: tuple[str, ...]) -> int | None:
    low = [h.strip().lower() for h in header]
    for n in names:
        if n in low:
            return low.index(n)
    return None


def read_table(path: str | os.PathLike) -> tuple[list[dict[str, str]], Path]:
    """Rows as dicts with keys path, label, split?, clean? (and 'line' for messages)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"label file '{path}' not found; pass a CSV/TSV with columns path,label[,split]")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() in (".tsv", ".tab"):
        delim = "\t"
    elif path.suffix.lower() == ".csv":
        delim = ","
    else:
        first = next((ln for ln in text.splitlines() if ln.strip()), "")
        delim = "\t" if "\t" in first else ("," if "," in first else None)
    rows = list(csv.reader(io.StringIO(text), delimiter=delim)) if delim else \
        [ln.split() for ln in text.splitlines()]
    numbered = [(n, r) for n, r in enumerate(rows, 1) if r and any(c.strip() for c in r)
                and not r[0].lstrip().startswith("#")]
    if not numbered:
        raise DataError(f"label file '{path}' has no rows")
    header = [c.strip().lower() for c in numbered[0][1]]
    if _pick(header, PATH_COLS) is not None and _pick(header, LABEL_COLS) is not None:
        cols = {"path": _pick(header, PATH_COLS), "label": _pick(header, LABEL_COLS),
                "split": _pick(header, SPLIT_COLS), "clean": _pick(header, CLEAN_COLS)}
        numbered = numbered[1:]
    else:
        width = len(numbered[0][1])
        if width < 2:
            raise DataError(f"{path}:{numbered[0][0]}: expected 'path{delim or ' '}label', got '{numbered[0][1][0]}'")
        cols = {"path": 0, "label": 1, "split": 2 if width > 2 else None, "clean": None}
    out = []
    for n, r in numbered:
        need = max(v for v in cols.values() if v is not None)
        if len(r) <= need:
            raise DataError(f"{path}:{n}: expected {need + 1} columns, got {len(r)}: {r}")
        rec = {"line": str(n), "path": r[cols["path"]].strip(), "label": r[cols["label"]].strip()}
        if cols["split"] is not None:
            rec["split"] = r[cols["split"]].strip().lower()
        if cols["clean"] is not None:
            rec["clean"] = r[cols["clean"]].strip()
        if not rec["path"] or rec["label"] == "":
            raise DataError(f"{path}:{n}: empty path or label")
        out.append(rec)
    if not out:
        raise DataError(f"label file '{path}' has a header but no rows")
    return out, path


def _is_int(s: str) -> bool:
    return s.lstrip("-").isdigit()


def label_indexer(values: list[str], classnames: list[str] | None, where: str):
    """(class list, fn(value, line) -> index) for labels given as names or integer indices.

    Integer-looking labels are read as class *names* when they can be: without a class list, the classes are
    the distinct values in natural order ('2' before '10', as class folders are read), so labels 1..102 of
    Flowers' folders map to 102 classes, the folder '1' first; with a class list, values that are all in the list
    are names. Only integers that are not names of a list of non-integer names are positions in that list. A
    class list of integer names that the labels do not all match is ambiguous ('2': the class named 2, or the
    third?) and refused, never guessed."""
    ints = all(_is_int(v) for v in values)
    if classnames is None:
        classnames = sorted(set(values), key=natural_key)
        by_name = True
    else:
        by_name = all(v in classnames for v in values)
        if not by_name and ints and any(_is_int(c) for c in classnames):
            odd = next(v for v in values if v not in classnames)
            raise DataError(f"{where}: the class list names classes by integers, and label '{odd}' is not one of "
                            "those names, so it is ambiguous (a name or a position?); give labels as names from the "
                            "class list, or rename integer classes (e.g. 'c2')")
    index = {c: i for i, c in enumerate(classnames)}

    def to_index(value: str, line: str) -> int:
        if by_name or not _is_int(value):
            if value in index:
                return index[value]
            raise DataError(f"{where}:{line}: class '{value}' is not in the class list ({len(classnames)} classes); "
                            "fix the row or add the class to --classnames")
        i = int(value)
        if 0 <= i < len(classnames):
            return i
        raise DataError(f"{where}:{line}: label {i} is outside the {len(classnames)} classes "
                        f"(0..{len(classnames) - 1}); fix the row or the class list")

    return classnames, to_index


def _read_labelled(path: str | os.PathLike, classnames: str | os.PathLike | None, name: str | None):
    """Every row of a label table as one dataset: (class names, their display names, the dataset, each row's
    split, the table's path)."""
    rows, path = read_table(path)
    base = path.parent
    given_names = read_class_list(classnames) if classnames else None
    values = [r["label"] for r in rows] + [r["clean"] for r in rows if "clean" in r]
    names, to_index = label_indexer(values, given_names, str(path))
    has_clean = any("clean" in r for r in rows)
    paths, labels, noisy, splits, missing = [], [], [], [], []
    for r in rows:
        p = Path(r["path"]).expanduser()
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            missing.append((r["line"], r["path"]))
        paths.append(str(p))
        lab = to_index(r["label"], r["line"])
        noisy.append(lab)
        labels.append(to_index(r["clean"], r["line"]) if has_clean else lab)
        split = r.get("split", "train") or "train"
        if split not in SPLIT_NAMES:
            raise DataError(f"{path}:{r['line']}: split '{split}' unknown; use train, val or test")
        splits.append(SPLIT_NAMES[split])
    if missing:
        line, rel = missing[0]
        raise DataError(f"{path}:{line}: image '{rel}' not found (relative paths are resolved against '{base}'); "
                        f"{len(missing)} listed image(s) missing")
    name = name or path.stem
    display = [n.replace("_", " ") for n in names]
    meta = {"root": str(base), "table": str(path), "clean_labels": has_clean}
    full = ImageDataset(paths, np.asarray(labels), display, name=name, meta=meta,
                        noisy_labels=np.asarray(noisy) if has_clean else None)
    sp = np.asarray(splits)
    return names, display, full, sp, path


def load_table(
    path: str | os.PathLike,
    classnames: str | os.PathLike | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    test_root: str | os.PathLike | None = None,
    name: str | None = None,
) -> DataSplits:
    """The splits of a label table: its split column, else a seeded stratified test split; `test_root` (a table
    or a folder of class sub-folders) gives the test images instead, every one of them."""
    names, display, full, sp, path = _read_labelled(path, classnames, name)
    given_names = read_class_list(classnames) if classnames else None
    name = full.name
    train = full.subset(np.flatnonzero(sp == "train"))
    val = full.subset(np.flatnonzero(sp == "val")) if (sp == "val").any() else None
    if len(train) == 0:
        raise DataError(f"label file '{path}' has no training rows (split column says train for none)")
    if given_names is not None:
        counts = np.bincount(train.labels, minlength=len(names))
        if (counts == 0).any():
            empty = int(np.flatnonzero(counts == 0)[0])
            raise DataError(f"class '{names[empty]}' has no training rows in '{path}' "
                            f"({int((counts == 0).sum())} empty class(es)); add rows or drop it from the class list")
    if test_root is not None and Path(test_root).expanduser().is_dir():  # a folder of class sub-folders
        from .imagefolder import load_image_folder

        root = Path(test_root).expanduser()
        # a folder matches a class by its name as shown (underscores read as spaces, as folders are everywhere)
        shown = {d.name.replace("_", " "): d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
        folders = [shown.get(d, n) for d, n in zip(display, names)]
        test = load_image_folder(root, class_folders=folders, name=name)
        test = ImageDataset(test.paths, test.labels, display, name=name, meta=test.meta)
        if len(test) == 0:
            raise DataError(f"test folder '{test_root}' has no images in class sub-folders named like the labels of "
                            f"'{path}' ({', '.join(names[:5])}); name its sub-folders after the labels")
    elif test_root is not None:
        test = _read_labelled(test_root, classnames if classnames else None, name)[2]  # every row is a test image
        if test.classnames != train.classnames:
            raise DataError(f"test file '{test_root}' has other classes than '{path}'; pass the same --classnames")
    elif (sp == "test").any():
        test = full.subset(np.flatnonzero(sp == "test"))
    else:
        keep, held = stratified_split(train.labels, test_fraction, seed)
        train, test = train.subset(keep), train.subset(held)
        train.meta["split"] = test.meta["split"] = {"test_fraction": test_fraction, "seed": seed}
    return DataSplits(train=train, test=test, val=val)


@register_dataset("csv", aliases=("table", "tsv"),
                  description="your images listed in a CSV/TSV: path,label[,split][,clean_label] (--data FILE)")
def table_dataset(root: str | os.PathLike | None = None, classnames: str | os.PathLike | None = None,
                  test_fraction: float = 0.2, seed: int = 0, test_root: str | os.PathLike | None = None,
                  **_: object) -> DataSplits:
    """Images listed in a CSV / TSV file (path, label, optional split and clean_label columns)."""
    if root is None:
        raise DataError("no label file given; pass --data FILE.csv (columns path,label[,split])")
    return load_table(root, classnames, test_fraction, seed, test_root)
