"""A development case with real label noise: CIFAR-10 images, CIFAR-10N's human labels, a miniature CLIP prior.

What it builds (into `--out`, default `$DSPT_CACHE/cifar10n_case` or `~/.cache/dspt/cifar10n_case`), from
`cifar10_jpeg.tar.gz` (CIFAR-10 as JPEGs) and `cifar10n_labels.csv.gz` (CIFAR-10N: `aggre_label`, the
majority of three annotators, about 9 % wrong; `random_label1`, one annotator, about 17 % wrong) in
`--shared` (default `../shared/data` beside the repository), read there and never copied into the repository:

- disjoint parts of the CIFAR-10 *training* images, drawn per true class (stratified) with a fixed seed:
  `pretrain` (1,000 a class): only to pretrain the prior; `dev` (500 a class) to develop and choose settings
  on; `final` (500 a class) kept for the final measurement only (a figure you tune on is not evidence).
  Each tuning pool holds its own validation part: 50 of its 500 images a class (`split` column `val`),
  labelled from the same label set as its training part (what a user would have);
- the test set: 200 CIFAR-10 *test* images a class, clean labels, as a folder of class sub-folders (`test/`);
- per tuning pool, one dspt CSV table per label set, `<pool>/<label set>/cifar10n-<pool>.csv` for the label
  sets clean, aggre and random1 (columns path,label,clean_label,split): train with `--noise given` to use its
  labels (a realised noise rate is reported against `clean_label`), or with `--noise sym --noise-rate R` on
  the clean table for injected noise. The tables of a pool share one file name and list the images by the
  same absolute paths on purpose: dspt names the dataset after the file and keys its feature cache by the
  image paths, so runs on any label set of a pool read one cache (labels never change features; the results
  store's `dataset` column then names the pool, not the label set). Absolute paths: move the case folder
  and the tables point to the old place; build it again where it is needed;
  `noise.json`: the realised noise rate of each label set on each pool (train part, val part, all);
- `--shift bgr` (the `shifted` case): the tuning pools and the test images, never the pretraining images, have
  their red and blue channels swapped (a camera pipeline's BGR mix-up) and are stored losslessly as PNG. As
  the demo's textured paper does for digits, this puts tuning in a domain the prior never saw: its image
  features still separate the classes (a linear probe on them does far better than zero-shot) while its
  zero-shot head is off, which is the headroom prompt tuning has on real CLIP and that the unshifted case
  lacks (there a linear probe on the prior's features is level with zero-shot);
- the prior: `dspt-tiny` (the demo's open_clip config) contrastively pretrained on the `pretrain` part with clean
  captions ("a photo of a {class}." and the other generic templates of `dspt.pretrain`) at logit scale 100,
  as the demo pretrains its miniature on digits (`dspt.pretrain.pretrain_clip`); saved as
  `prior.safetensors`. Runs use `model="dspt-tiny", pretrained=None, checkpoint=<that file>`.

Everything lies in `<out>/case-v<CASE_VERSION>-seed<seed>-<hash of the settings>/`, whose `case.json` (written
last) marks it complete: a second call with the same settings and inputs reuses it and prints what it holds.

    python benchmarks/cifar10n_case.py                       # build (or reuse) and print the case
    python benchmarks/cifar10n_case.py --out /tmp/case --seed 1 --pretrain-epochs 4

Use from Python: `build_case(shared_dir, out_dir, seed=0, ...) -> dict` (paths, counts, noise rates, times).

Note: `--test-data` takes the test images as a folder of class sub-folders here. A CSV given as test data is
read as a training table, whose rows lose a stratified 20 % to a held-out split (dspt 'load_table'), so the
test set is written as a folder, which dspt reads whole.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import shutil
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from dspt.errors import DataError, DsptError
from dspt.io import atomic_write, atomic_write_json, atomic_write_text, default_cache_dir, file_stamp
from dspt.miniature import DEMO_MODEL, PRETRAIN
from dspt.pretrain import GENERIC_TEMPLATES

CASE_VERSION = 2  # bump when the split, the label tables or the pretraining change
TARBALL = "cifar10_jpeg.tar.gz"
LABELS = "cifar10n_labels.csv.gz"
#: label sets of a tuning pool: name -> column of the CIFAR-10N labels file (None: the true class)
LABEL_SETS = {"clean": None, "aggre": "aggre_label", "random1": "random_label1"}
POOLS = ("dev", "final")
TEMPLATE = "a photo of a {}."
DEFAULT_SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
#: the demo's pretraining recipe, with fewer epochs: a weak prior on 10,000 photos in a few CPU minutes
#: image shifts of the tuning and test images (`--shift`): name -> what is done to an RGB array [H, W, 3]
SHIFTS = {"none": None, "bgr": lambda a: a[:, :, ::-1]}
PRETRAIN_SETTINGS = {"epochs": 3, "batch_size": PRETRAIN["batch_size"], "lr": PRETRAIN["lr"],
                     "logit_scale": PRETRAIN["logit_scale"]}


def default_out() -> Path:
    return default_cache_dir() / "cifar10n_case"


# ------------------------------------------------------------------------------------------------- inputs

def _inputs(shared: Path) -> tuple[Path, Path]:
    """The two input files, or one DataError line naming the missing one and the fix."""
    tarball, labels = shared / TARBALL, shared / LABELS
    for path, what in ((tarball, "CIFAR-10 as JPEGs (train/<class>/NNNN.jpg, test/<class>/NNNN.jpg)"),
                       (labels, "CIFAR-10N labels (columns path, aggre_label, random_label1)")):
        if not path.is_file():
            raise DataError(f"input file '{path}' not found ({what}); put {path.name} in {shared} or pass "
                            "--shared DIR (the folder holding it)")
    return tarball, labels


def read_noisy_labels(path: Path) -> dict[str, dict[str, str]]:
    """{path inside the tar: {column: class name}} of the CIFAR-10N labels file."""
    with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        need = ["path"] + [c for c in LABEL_SETS.values() if c]
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"labels file '{path}' lacks column(s) {missing}; it needs {', '.join(need)}")
        return {row["path"]: {c: row[c] for c in need[1:]} for row in reader}


def _image_members(tar: tarfile.TarFile) -> dict[str, dict[str, list[tarfile.TarInfo]]]:
    """{split: {class: [members]}} of `<root>/<train|test>/<class>/<file>.jpg`, each list sorted by name."""
    out: dict[str, dict[str, list[tarfile.TarInfo]]] = {"train": {}, "test": {}}
    for m in tar.getmembers():
        parts = Path(m.name).parts
        if m.isfile() and m.name.lower().endswith(".jpg") and len(parts) >= 3 and parts[-3] in out:
            out[parts[-3]].setdefault(parts[-2], []).append(m)
    for groups in out.values():
        for members in groups.values():
            members.sort(key=lambda m: m.name)
    return out


def _draw(members: dict[str, dict[str, list[tarfile.TarInfo]]], rng: np.random.Generator, sizes: dict[str, int],
          test_per_class: int) -> dict[str, list[tuple[tarfile.TarInfo, str]]]:
    """{part: [(member, true class)]}: per class (sorted names) a seeded permutation of its training images cut
    into consecutive parts of `sizes` images (disjoint by construction), then `test_per_class` test images."""
    classes = sorted(members["train"])
    if sorted(members["test"]) != classes or len(classes) < 2:
        raise DataError(f"the archive's train/ and test/ class folders differ or are too few: {classes} vs "
                        f"{sorted(members['test'])}")
    parts: dict[str, list[tuple[tarfile.TarInfo, str]]] = {p: [] for p in [*sizes, "test"]}
    for cls in classes:
        pool, test = members["train"][cls], members["test"][cls]
        need = sum(sizes.values())
        if len(pool) < need or len(test) < test_per_class:
            raise DataError(f"class '{cls}' has {len(pool)} training and {len(test)} test images, fewer than the "
                            f"{need} and {test_per_class} asked for; lower the part sizes")
        order = rng.permutation(len(pool))
        start = 0
        for part, n in sizes.items():
            parts[part] += [(pool[i], cls) for i in order[start:start + n]]
            start += n
        parts["test"] += [(test[i], cls) for i in rng.permutation(len(test))[:test_per_class]]
    return parts


def _extract(tar: tarfile.TarFile, chosen: list[tuple[tarfile.TarInfo, Path]], shift: str = "none",
             shifted: set[str] = frozenset()) -> None:
    """Write each chosen member to its path, reading the archive forwards only (a gzip stream cannot seek back);
    members named in `shifted` decoded, shifted (`SHIFTS[shift]`) and written as PNG (their paths end in .png)."""
    from PIL import Image

    for m, dest in sorted(chosen, key=lambda c: c[0].offset_data):
        dest.parent.mkdir(parents=True, exist_ok=True)
        data = tar.extractfile(m).read()
        if m.name in shifted and SHIFTS[shift] is not None:
            rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            Image.fromarray(np.ascontiguousarray(SHIFTS[shift](rgb))).save(dest, format="PNG")
        else:
            dest.write_bytes(data)


# ------------------------------------------------------------------------------------------------- tables

def _write_table(path: Path, rows: list[tuple[str, str, str, str]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label", "clean_label", "split"])
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _rate(given: list[str], true: list[str]) -> float:
    return float(np.mean([g != t for g, t in zip(given, true)])) if given else 0.0


# ------------------------------------------------------------------------------------------------ the prior

def _hflip(x, gen):
    """Random horizontal flips of a batch of image tensors (photos stay photos when mirrored)."""
    import torch

    flip = torch.rand(len(x), generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def pretrain_prior(images: list[Path], labels: np.ndarray, classnames: list[str], dest: Path, seed: int,
                   settings: dict[str, Any], progress: bool = True) -> list[float]:
    """`dspt-tiny` pretrained contrastively (`dspt.pretrain.pretrain_clip`, generic clean captions of the true
    class, random flips) on `images`; saved to `dest` (safetensors). One torch thread, as the demo's miniature:
    another thread count sums floats in another order and gives another prior. Returns the loss per epoch."""
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from dspt.backbone import load_backbone
    from dspt.pretrain import pretrain_clip
    from dspt.version import __version__

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bb = load_backbone(DEMO_MODEL, init_seed=seed)
        tf = bb.test_transform()
        x = torch.stack([tf(Image.open(p).convert("RGB")) for p in images])
        history = pretrain_clip(bb.model, bb.tokenizer, x, labels, classnames, epochs=settings["epochs"],
                                batch_size=settings["batch_size"], lr=settings["lr"], seed=seed,
                                logit_scale=settings["logit_scale"], templates=GENERIC_TEMPLATES, augment=_hflip,
                                progress=progress)
    finally:
        torch.set_num_threads(threads)
    state = {k: v.detach().cpu().contiguous() for k, v in bb.model.state_dict().items()}
    atomic_write(dest, lambda tmp: save_file(state, tmp, metadata={"dspt": __version__, "case": "cifar10n",
                                                                    "loss_history": json.dumps(history)}))
    return history


def prior_zeroshot(case: dict[str, Any], cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Zero-shot test accuracy of the case's prior with TEMPLATE (`dspt.train.zeroshot`)."""
    from dspt.config import RunConfig
    from dspt.train import zeroshot

    cfg = RunConfig(model=DEMO_MODEL, pretrained=None, checkpoint=str(case["checkpoint"]),
                    data=str(case["tables"]["dev"]["clean"]), test_data=str(case["test"]), template=TEMPLATE,
                    cache_dir=None if cache_dir is None else str(cache_dir), device="cpu", progress=False)
    return zeroshot(cfg)


# ------------------------------------------------------------------------------------------------- the case

def _paths(root: Path) -> dict[str, Any]:
    return {"root": root, "checkpoint": root / "prior.safetensors", "test": root / "test",
            "noise_file": root / "noise.json", "manifest": root / "case.json",
            "tables": {pool: {ls: root / pool / ls / f"cifar10n-{pool}.csv" for ls in LABEL_SETS} for pool in POOLS}}


def build_case(shared_dir: str | Path = DEFAULT_SHARED, out_dir: str | Path | None = None, seed: int = 0,
               pretrain_per_class: int = 1000, pool_per_class: int = 500, val_per_class: int = 50,
               test_per_class: int = 200, pretrain_epochs: int | None = None,
               pretrain_settings: dict[str, Any] | None = None, cache_dir: str | Path | None = None,
               zeroshot: bool = True, progress: bool = True, shift: str = "none") -> dict[str, Any]:
    """Build the case (see the module docstring) or reuse the one built with the same settings and inputs.

    Returns {root, checkpoint, test, tables: {pool: {label set: csv}}, noise_file, manifest (paths), counts,
    noise: {pool: {label set: {train, val, all}}}, zeroshot_acc, seconds, settings, reused}."""
    shared = Path(shared_dir).expanduser()
    out = Path(out_dir).expanduser() if out_dir is not None else default_out()
    if shift not in SHIFTS:
        raise DataError(f"shift '{shift}' unknown; choose one of: {', '.join(SHIFTS)}")
    if not 0 < val_per_class < pool_per_class:
        raise DataError(f"val_per_class {val_per_class} must be in [1, pool_per_class - 1 = {pool_per_class - 1}]")
    tarball, labels_file = _inputs(shared)
    prior = dict(PRETRAIN_SETTINGS, **(pretrain_settings or {}))
    if pretrain_epochs is not None:
        prior["epochs"] = int(pretrain_epochs)
    settings = {"version": CASE_VERSION, "seed": seed, "pretrain_per_class": pretrain_per_class,
                "pool_per_class": pool_per_class, "val_per_class": val_per_class, "test_per_class": test_per_class,
                "pretrain": prior, "templates": list(GENERIC_TEMPLATES), "model": DEMO_MODEL,
                "inputs": {TARBALL: file_stamp(tarball), LABELS: file_stamp(labels_file)}}
    if shift != "none":  # (absent when unshifted: the unshifted case keeps the folder it had before shifts)
        settings["shift"] = shift
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    root = out / f"case-v{CASE_VERSION}-seed{seed}-{key}"
    paths = _paths(root)
    if paths["manifest"].is_file():
        manifest = json.loads(paths["manifest"].read_text())
        return {**paths, **manifest, "reused": True}

    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)  # a partial build: start over
    noisy = read_noisy_labels(labels_file)
    rng = np.random.default_rng(seed)
    sizes = {"pretrain": pretrain_per_class, "dev": pool_per_class, "final": pool_per_class}
    with tarfile.open(tarball, "r:gz") as tar:
        members = _image_members(tar)
        parts = _draw(members, rng, sizes, test_per_class)
        unknown = [m.name for part in POOLS for m, _ in parts[part] if m.name not in noisy]
        if unknown:
            raise DataError(f"labels file '{labels_file}' has no row for {len(unknown)} chosen image(s), e.g. "
                            f"'{unknown[0]}'; use the CIFAR-10N labels that match {tarball.name}")
        # training images under images/train/<class>/, the test images as the test folder test/<class>/
        shifted = {m.name for part in (*POOLS, "test") for m, _ in parts[part]} if shift != "none" else set()
        where = {m.name: (root / "test" if part == "test" else root / "images" / "train") / cls
                 / (Path(m.name).with_suffix(".png").name if m.name in shifted else Path(m.name).name)
                 for part, chosen in parts.items() for m, cls in chosen}
        _extract(tar, [(m, where[m.name]) for chosen in parts.values() for m, _ in chosen], shift, shifted)
    t_extract = time.perf_counter() - t0

    classes = sorted({cls for _, cls in parts["test"]})
    bad = sorted({v for m, _ in parts["dev"] + parts["final"] for v in noisy[m.name].values()} - set(classes))
    if bad:
        raise DataError(f"labels file '{labels_file}' names class(es) {bad[:5]} that are not folders of {tarball.name}")
    noise: dict[str, dict[str, dict[str, float]]] = {}
    counts: dict[str, Any] = {"pretrain": len(parts["pretrain"]), "test": len(parts["test"]), "classes": len(classes)}
    for pool in POOLS:
        rows = []
        per_class: dict[str, int] = {}
        for m, cls in parts[pool]:  # per class in permutation order: the first val_per_class go to val
            per_class[cls] = per_class.get(cls, 0) + 1
            rows.append((m, cls, "val" if per_class[cls] <= val_per_class else "train"))
        counts[pool] = {"train": sum(s == "train" for *_, s in rows), "val": sum(s == "val" for *_, s in rows)}
        noise[pool] = {}
        for ls, col in LABEL_SETS.items():
            dest = paths["tables"][pool][ls]
            dest.parent.mkdir(parents=True, exist_ok=True)
            table = [(where[m.name].resolve().as_posix(), cls if col is None else noisy[m.name][col], cls, split)
                     for m, cls, split in rows]
            _write_table(dest, table)
            noise[pool][ls] = {part: _rate([r[1] for r in table if part in ("all", r[3])],
                                           [r[2] for r in table if part in ("all", r[3])])
                               for part in ("train", "val", "all")}
    split_rows = [(where[m.name].relative_to(root).as_posix(), cls, part)
                  for part, chosen in parts.items() for m, cls in chosen]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([("path", "true", "part"), *split_rows])
    atomic_write_text(root / "splits.csv", buf.getvalue())
    atomic_write_json(paths["noise_file"], noise)

    t1 = time.perf_counter()
    pre = parts["pretrain"]
    history = pretrain_prior([where[m.name] for m, _ in pre], np.array([classes.index(c) for _, c in pre]), classes,
                             paths["checkpoint"], seed, prior, progress)
    t_pretrain = time.perf_counter() - t1
    manifest: dict[str, Any] = {"settings": settings, "shift": shift, "classes": classes, "counts": counts, "noise": noise,
                                "pretrain_loss": history, "template": TEMPLATE, "zeroshot_acc": None,
                                "seconds": {"extract": t_extract, "pretrain": t_pretrain}}
    if zeroshot:
        t2 = time.perf_counter()
        manifest["zeroshot_acc"] = prior_zeroshot(paths, cache_dir)["zeroshot_acc"]
        manifest["seconds"]["zeroshot"] = time.perf_counter() - t2
    manifest["seconds"]["total"] = time.perf_counter() - t0
    atomic_write_json(paths["manifest"], manifest)  # last: marks the case complete
    return {**paths, **manifest, "reused": False}


def describe(case: dict[str, Any]) -> str:
    """What the case holds, as printed by the command."""
    c, s = case["counts"], case["seconds"]
    shift = case["settings"].get("shift", "none")
    lines = [f"CIFAR-10N case {'reused' if case['reused'] else 'built'}: {case['root']}",
             (f"  prior: {case['checkpoint']} ({DEMO_MODEL}, {case['settings']['pretrain']['epochs']} epochs on "
              f"{c['pretrain']} clean-captioned training images, logit scale "
              f"{case['settings']['pretrain']['logit_scale']:g})"),
             f"  test: {case['test']} ({c['test']} CIFAR-10 test images, clean labels)",
             f"  shift of the tuning and test images: {shift}"
             + ("" if shift == "none" else " (the pretraining images are not shifted)")]
    for pool in POOLS:
        lines.append(f"  {pool}: {c[pool]['train']} train + {c[pool]['val']} val images; tables "
                     + ", ".join(str(Path(t).relative_to(case["root"])) for t in case["tables"][pool].values()))
    lines.append("  realised noise rates (train / val / all):")
    for pool in POOLS:
        lines.append(f"    {pool}: " + "; ".join(
            f"{ls} {r['train']:.1%} / {r['val']:.1%} / {r['all']:.1%}" for ls, r in case["noise"][pool].items()))
    zs = case.get("zeroshot_acc")
    lines.append(f"  zero-shot test accuracy of the prior ('{case['template']}'): "
                 + ("not measured" if zs is None else f"{zs:.1f} % (chance 10 %)"))
    lines.append("  wall time when built: " + ", ".join(f"{k} {v:.1f} s" for k, v in s.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", "--data-dir", dest="shared", type=Path, default=DEFAULT_SHARED,
                    help=f"folder holding {TARBALL} and {LABELS} (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=None, help=f"case folder (default: {default_out()})")
    ap.add_argument("--seed", type=int, default=0, help="draws the parts and pretrains the prior")
    ap.add_argument("--pretrain-per-class", type=int, default=1000)
    ap.add_argument("--pool-per-class", type=int, default=500, help="images a class in each tuning pool")
    ap.add_argument("--val-per-class", type=int, default=50, help="of which go to the pool's validation part")
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--pretrain-epochs", type=int, default=PRETRAIN_SETTINGS["epochs"])
    ap.add_argument("--shift", choices=list(SHIFTS), default="none",
                    help="shift of the tuning and test images (bgr: red and blue swapped; see above)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        case = build_case(args.shared, args.out, args.seed, args.pretrain_per_class, args.pool_per_class,
                          args.val_per_class, args.test_per_class, args.pretrain_epochs, progress=not args.no_progress,
                          shift=args.shift)
    except DsptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(describe(case))
    print(f"  this call: {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
