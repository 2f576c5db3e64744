"""`dspt demo`: DSPT vs CoOp (cross-entropy) under symmetric label noise, offline, in a few minutes.

No pretrained CLIP can be downloaded here, so the demo builds its own small prior, and says so: the
package's tiny open_clip config contrastively pretrained on half of scikit-learn's bundled digits (real
8x8 scans of handwriting, upscaled). Prompt tuning then runs on a disjoint part through the very pipeline
`dspt train` uses, with each method's learning rate chosen on a validation part, and is tested on a fourth
part. To leave headroom, as real CLIP has on a new dataset, the tuning and test digits come from a domain
the prior never saw: scanned on textured paper (one fixed grain pattern added to every image). The image
features still separate the digits (a linear probe does much better than zero-shot), but the zero-shot
head is off, which is what prompt tuning is for. Most pretraining captions say what the image is ("a
handwritten three"); a tenth are generic ("a photo of a three"), so the generic zero-shot prompt works
without being the best wording, as for real CLIP.
Digits are neither flip- nor small-crop-invariant, so the cached training views use crops of 80-100 % of the
image and no flips (CoOp's 8 % crops and flips suit photos, not 8x8 digits).
With `--model/--pretrained` (or `--checkpoint`) and `--data`, the same comparison runs on real CLIP.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import __version__
from .config import RunConfig
from .features import default_cache_dir
from .io import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEMO_MODEL = "dspt-tiny"
PRETRAIN = {"epochs": 16, "batch_size": 64, "lr": 2e-3, "logit_scale": 100.0, "generic_share": 0.1}
PAPER = {"sigma": 100.0, "seed": 12345}  # the textured paper of the tuning/test domain (grey levels, 0-255)
VIEWS = {"crop_scale": 0.8, "hflip": False}  # augmentations that keep a digit a digit
WORLD_VERSION = 5  # bump when the split, the rendering or the pretraining changes


def _split_digits(seed: int) -> tuple[np.ndarray, ...]:
    """images [N,8,8] in [0,1], labels, and seeded stratified indices: pretrain 50 %, tuning 14 %,
    validation 11 %, test 25 %."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], [], []]
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = [int(f * len(idx)) for f in (0.5, 0.64, 0.75)]
        for part, chunk in zip(parts, np.split(idx, cuts)):
            part += chunk.tolist()
    pre, train, val, test = (np.sort(np.array(p)) for p in parts)
    return images, labels, pre, train, val, test


def _render(image: np.ndarray, size: int = 32, paper: bool = False):
    """A digit as a `size`-pixel RGB image; `paper`: scanned on the textured paper of the tuning domain."""
    from PIL import Image

    big = Image.fromarray((image * 255).round().astype(np.uint8)).resize((size, size), Image.BICUBIC)
    if paper:
        grain = np.random.default_rng(PAPER["seed"]).normal(0.0, PAPER["sigma"], (size, size))
        big = Image.fromarray(np.clip(np.asarray(big, dtype=np.float64) + grain, 0, 255).astype(np.uint8))
    return big.convert("RGB")


def build_world(seed: int, root: Path) -> dict[str, Any]:
    """Write the tuning and test parts as image folders (the pipeline reads files, as for a user's data)."""
    images, labels, pre, train, val, test = _split_digits(seed)
    world = root / f"digits-v{WORLD_VERSION}-seed{seed}"
    done = world / "done.json"
    if not done.is_file():
        for split, idx in (("tune/train", train), ("tune/val", val), ("test", test)):
            for i in idx:
                path = world / split / DIGIT_NAMES[labels[i]] / f"{i:04d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, lambda tmp, i=i: _render(images[i], paper=True).save(tmp, format="PNG"))
        atomic_write_text(done, json.dumps({"train": len(train), "val": len(val), "test": len(test),
                                            "pretrain": len(pre)}))
    return {"root": world, "tune": world / "tune", "test": world / "test", "images": images, "labels": labels,
            "pretrain_idx": pre}


def pretrained_miniature(seed: int = 0, cache_dir: str | Path | None = None, progress: bool = True,
                         pretrain_epochs: int | None = None) -> dict[str, Any]:
    """The demo's prior: (checkpoint path, tune folder, test folder). Cached: a second call reuses it."""
    settings = dict(PRETRAIN, epochs=pretrain_epochs or PRETRAIN["epochs"])
    from safetensors.torch import save_file

    from .backbone import load_backbone
    from .pretrain import CAPTION_TEMPLATES, pretrain_clip, template_weights

    root = Path(cache_dir or default_cache_dir()) / "demo"
    world = build_world(seed, root)
    key = hashlib.sha256(json.dumps([WORLD_VERSION, settings, CAPTION_TEMPLATES, seed, DEMO_MODEL]).encode())
    ckpt = root / f"miniature-{DEMO_MODEL}-seed{seed}-{key.hexdigest()[:12]}.safetensors"
    info = {"checkpoint": ckpt, "tune": world["tune"], "test": world["test"], "model": DEMO_MODEL, "reused": True,
            "pretrain_seconds": 0.0, "pretrain_epochs": settings["epochs"]}
    if ckpt.is_file():
        log.info("reusing the pretrained miniature CLIP %s", ckpt)
        return info
    bb = load_backbone(DEMO_MODEL, init_seed=seed)
    tf = bb.test_transform()
    idx = world["pretrain_idx"]
    x = torch.stack([tf(_render(world["images"][i])) for i in idx])
    t0 = time.perf_counter()
    log.info("pretraining the miniature CLIP on %d digit images (%d epochs)...", len(idx), settings["epochs"])
    history = pretrain_clip(bb.model, bb.tokenizer, x, world["labels"][idx], list(DIGIT_NAMES),
                            epochs=settings["epochs"], batch_size=settings["batch_size"], lr=settings["lr"],
                            seed=seed, logit_scale=settings["logit_scale"],
                            weights=template_weights(settings["generic_share"]), progress=progress)
    state = {k: v.detach().cpu().contiguous() for k, v in bb.model.state_dict().items()}
    atomic_write(ckpt, lambda tmp: save_file(state, tmp, metadata={"dspt": __version__,
                                                                    "loss_history": json.dumps(history)}))
    info.update(reused=False, pretrain_seconds=time.perf_counter() - t0, pretrain_loss=history,
                pretrain_epochs=settings["epochs"])
    return info


NAMES = {"ce": "CoOp (ce)", "dspt": "DSPT"}


class _HideCacheHits(logging.Filter):
    """Every run of the grid reads the same feature cache: its hits say nothing new after the first."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("feature cache hit")


def select_on_validation(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (noise rate, loss): the learning rate with the best accuracy on the *noisy* validation labels
    (what a user has); ties go to the smaller rate. Test accuracy plays no part in the choice."""
    ordered = runs.sort_values(["noise_rate", "loss", "val_acc_given", "lr"], ascending=[True, True, False, True])
    return ordered.groupby(["noise_rate", "loss"], sort=True).head(1).reset_index(drop=True)


def format_table(rows: pd.DataFrame, zeroshot_acc: float, losses: list[str]) -> str:
    cols = [f"{NAMES.get(l, l)} acc" for l in losses] + [f"{NAMES.get(l, l)} memorised" for l in losses] + \
        [f"{NAMES.get(l, l)} lr" for l in losses]
    lines = ["| noise | " + " | ".join(cols) + " | zero-shot |", "|" + "---|" * (len(cols) + 2)]
    for rate in sorted(rows["noise_rate"].unique()):
        sub = rows[rows["noise_rate"] == rate].set_index("loss")

        def cell(loss: str, col: str, fmt: str, sub: pd.DataFrame = sub) -> str:
            if loss not in sub.index or pd.isna(sub.loc[loss, col]):
                return "-"
            return format(sub.loc[loss, col], fmt)

        cells = [cell(l, "test_acc", ".1f") for l in losses] + [cell(l, "memorised", ".1f") for l in losses] + \
            [cell(l, "lr", "g") for l in losses]
        lines.append(f"| {rate:.1f} | " + " | ".join(cells) + f" | {zeroshot_acc:.1f} |")
    return "\n".join(lines)


def format_sensitivity(runs: pd.DataFrame, losses: list[str]) -> str:
    """Test accuracy of every learning rate tried (shown, not used to choose)."""
    lrs = sorted(runs["lr"].unique())
    cols = [f"{NAMES.get(l, l)} lr={lr:g}" for l in losses for lr in lrs]
    lines = ["| noise | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for rate in sorted(runs["noise_rate"].unique()):
        sub = runs[runs["noise_rate"] == rate].set_index(["loss", "lr"])["test_acc"]
        lines.append(f"| {rate:.1f} | " + " | ".join(
            f"{sub[(l, lr)]:.1f}" if (l, lr) in sub.index else "-" for l in losses for lr in lrs) + " |")
    return "\n".join(lines)


def plot(rows: pd.DataFrame, zeroshot_acc: float, losses: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"ce": "CoOp (cross-entropy)", "dspt": "DSPT (double softmax)"}
    fig, ax = plt.subplots(figsize=(6, 4))
    for loss in losses:
        sub = rows[rows["loss"] == loss].sort_values("noise_rate")
        ax.plot(sub["noise_rate"] * 100, sub["test_acc"], marker="o", label=names.get(loss, loss))
    ax.axhline(zeroshot_acc, color="gray", linestyle="--", label="zero-shot")
    ax.set_xlabel("symmetric label noise (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def _run_grid(common: dict[str, Any], out: Path, noise_rates: tuple[float, ...], losses: tuple[str, ...],
              lrs: tuple[float, ...], jobs: int, threads: int | None) -> list[dict[str, Any]]:
    """Every (noise rate, loss, lr) through `dspt.train` (the pipeline `dspt train` runs), as a `dspt sweep`
    with `jobs` worker processes: finished runs are kept, a killed demo resumes."""
    from .sweep import run_sweep
    from .train import prepare

    first = RunConfig(**common, noise_rate=noise_rates[0], loss=losses[0], lr=lrs[0])
    if prepare(first).val is None and len(lrs) > 1:  # also builds the feature caches once, before workers share them
        raise ValueError("choosing the learning rate needs validation data: add a val/ folder beside train/ in "
                         "--data, or pass a single --lrs value")
    spec = {k: v for k, v in common.items() if k not in ("results", "progress")}
    spec.update(noise_rate=list(noise_rates), loss=list(losses), lr=list(lrs))
    sweep = run_sweep(spec, output=out / "runs", results=common["results"], jobs=jobs, threads=threads,
                      echo=log.info)
    if sweep.failed:
        name, error = next(iter(sweep.failed.items()))
        raise ValueError(f"demo run {name} failed: {error}")
    runs = []
    for cell in sweep.cells:
        m = json.loads((cell.run_dir / "metrics.json").read_text())
        v = cell.values
        runs.append({"noise_rate": v["noise_rate"], "loss": v["loss"], "lr": v["lr"], "test_acc": m["test_acc"],
                     "val_acc_given": m["val_acc_given"], "val_acc": m["val_acc"],
                     "memorised": m["train"]["memorised"], "gain_over_zeroshot": m["gain_over_zeroshot"],
                     "text_cosine": m["text_cosine"]["final"], "ctx_drift": m["ctx_drift"]})
    return runs


def _one_thread_for_the_miniature(fn):
    """The miniature runs on one CPU thread per process: float sums in another order (another thread count)
    give another prior after its few hundred pretraining steps, so one thread makes a seed's table the same on
    every core count. Its tensors are too small to gain from more threads; its runs go one per core instead.
    Real CLIP is left alone."""

    @functools.wraps(fn)
    def pinned(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("model") is not None:
            return fn(*args, **kwargs)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return pinned


@_one_thread_for_the_miniature
def run_demo(
    seed: int = 0,
    output: str | Path | None = None,
    noise_rates: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8),
    losses: tuple[str, ...] = ("ce", "dspt"),
    epochs: int = 30,
    shots: int = 16,
    views: int = 10,
    lrs: tuple[float, ...] = (0.0002, 0.002, 0.02, 0.2),
    ctx_init: str | None = "a photo of a",
    model: str | None = None,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    data: str | None = None,
    test_data: str | None = None,
    cache_dir: str | None = None,
    device: str = "auto",
    workers: int = 0,
    progress: bool = True,
    pretrain_epochs: int | None = None,
    jobs: int | None = None,
) -> dict[str, Any]:
    """Zero-shot reference, then every (noise rate, loss, lr) through `dspt.train`; each method's lr is
    chosen per noise rate on validation data; table, rate-sensitivity table, plot, results."""
    from .train import zeroshot

    t0 = time.perf_counter()
    out = Path(output) if output is not None else Path("dspt_demo") / f"seed{seed}"
    if model is None:
        if data is not None:
            raise ValueError("--data needs a real CLIP: add --model NAME --pretrained TAG (or --checkpoint FILE)")
        world = pretrained_miniature(seed, cache_dir, progress, pretrain_epochs)
        base = dict(model=DEMO_MODEL, pretrained=None, checkpoint=str(world["checkpoint"]), data=str(world["tune"]),
                    test_data=str(world["test"]), template="a photo of a {}.")
        prior = (f"miniature CLIP ({DEMO_MODEL} contrastively pretrained {world['pretrain_epochs']} epochs on clean "
                 "digits; tuned and tested on digits scanned on textured paper, a domain it never saw; not real CLIP)")
        base.update(VIEWS)
    else:
        if data is None:
            raise ValueError("--model needs --data FOLDER (class sub-folders) to tune and test on")
        world = {"reused": None, "pretrain_seconds": 0.0}
        base = dict(model=model, pretrained=None if checkpoint else pretrained, checkpoint=checkpoint, data=data,
                    test_data=test_data)
        prior = f"{model} {checkpoint or pretrained}"
    # The miniature's runs are single-threaded (see _one_thread_for_the_miniature), so one per core; real CLIP
    # runs one at a time (it needs the cores, or the GPU, itself).
    if jobs is None:
        jobs = min(os.cpu_count() or 1, 4) if model is None else 1
    threads = 1 if model is None else None
    common = dict(base, shots=shots, epochs=epochs, views=views, seed=seed, cache_dir=cache_dir, ctx_init=ctx_init,
                  device=device, workers=workers, progress=progress, noise="sym", results=str(out / "results.csv"))
    zs = zeroshot(RunConfig(**common, output=str(out / "zeroshot")))
    quiet = _HideCacheHits()
    logging.getLogger("dspt.features").addFilter(quiet)
    try:
        runs = _run_grid(common, out, noise_rates, losses, lrs, jobs, threads)
    finally:
        logging.getLogger("dspt.features").removeFilter(quiet)
    runs = pd.DataFrame(runs)
    chosen = select_on_validation(runs)
    md = format_table(chosen, zs["zeroshot_acc"], list(losses))
    sens = format_sensitivity(runs, list(losses)) if len(lrs) > 1 else ""
    short = "miniature CLIP on textured-paper digits (not real CLIP)" if model is None else prior
    plot(chosen, zs["zeroshot_acc"], list(losses), out / "accuracy_vs_noise.png",
         f"{short}\n{shots}-shot, {epochs} epochs, lr chosen on noisy validation labels, seed {seed}")
    seconds = time.perf_counter() - t0
    setup = (f"Prior: {prior}\nTuning: {shots} shots/class, {epochs} epochs, {views} cached views"
             + (f" (crops {VIEWS['crop_scale']:.0%}-100 %, no flips)" if model is None else "") + ", context init "
             f"'{ctx_init or 'random'}', sym noise; each method's lr chosen per noise rate from {list(lrs)} on "
             "noisy validation labels (never on test).")
    text = f"{setup}\n\n{md}\n" + (f"\nTest accuracy at every lr tried (rate sensitivity):\n\n{sens}\n" if sens else "")
    atomic_write_text(out / "table.md", text)
    atomic_write_text(out / "demo_runs.csv", runs.assign(zeroshot_acc=zs["zeroshot_acc"]).to_csv(index=False))
    return {"table": md, "sensitivity": sens, "setup": setup, "runs": runs, "chosen": chosen,
            "zeroshot_acc": zs["zeroshot_acc"], "prior": prior, "seconds": seconds, "output": out,
            "pretrain_seconds": world["pretrain_seconds"]}


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="DSPT vs CoOp under label noise, offline, in minutes",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", "-o", help="folder for runs, table, plot (default dspt_demo/seed<SEED>)")
    p.add_argument("--noise-rates", default="0,0.2,0.4,0.6,0.8", help="comma-separated sym noise rates")
    p.add_argument("--losses", default="ce,dspt", help="comma-separated losses to compare")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--lrs", default="0.0002,0.002,0.02,0.2",
                   help="learning rates tried per method; the one best on noisy validation labels is reported")
    p.add_argument("--ctx-init", default="a photo of a", help="context init phrase ('' for random N(0, 0.02))")
    p.add_argument("--model", help="real CLIP instead of the miniature, e.g. ViT-B-32 (needs --data)")
    p.add_argument("--pretrained", default="openai")
    p.add_argument("--checkpoint")
    p.add_argument("--data", help="image folder (class sub-folders) for a real-CLIP demo")
    p.add_argument("--test-data")
    p.add_argument("--cache-dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--jobs", "-j", type=int, help="runs at a time, one process each (default: one per core, "
                   "at most 4, for the miniature; 1 for real CLIP)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    res = run_demo(seed=args.seed, output=args.output,
                   noise_rates=tuple(float(r) for r in args.noise_rates.split(",")),
                   losses=tuple(args.losses.split(",")), epochs=args.epochs, shots=args.shots, views=args.views,
                   lrs=tuple(float(v) for v in args.lrs.split(",")), ctx_init=args.ctx_init or None,
                   model=args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
                   data=args.data, test_data=args.test_data, cache_dir=args.cache_dir, device=args.device,
                   workers=args.workers, progress=not args.no_progress, jobs=args.jobs)
    print(res["setup"])
    print()
    print(res["table"])
    if res["sensitivity"]:
        print("\nTest accuracy at every lr tried (rate sensitivity, not used to choose):")
        print(res["sensitivity"])
    out = res["output"]
    print(f"\nplot: {out / 'accuracy_vs_noise.png'}  table: {out / 'table.md'}  results: {out / 'results.csv'}")
    print(f"wall time {res['seconds']:.0f} s (pretraining {res['pretrain_seconds']:.0f} s)")
    return 0
