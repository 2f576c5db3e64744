"""`dspt demo`: DSPT vs CoOp (cross-entropy) under symmetric label noise, offline, in a few minutes.

No pretrained CLIP can be downloaded here, so the demo builds its own small prior, and says so: the
package's tiny open_clip config contrastively pretrained on one part of scikit-learn's bundled digits
(real 8x8 scans of handwriting, upscaled). Prompt tuning then runs on a disjoint part through the very
pipeline `dspt train` uses, and is tested on a third part. The prior is pretrained briefly on purpose: a
prior that already classifies the digits perfectly leaves prompt tuning nothing to learn, unlike real
CLIP on a new dataset, and then a loss that learns nothing would look robust.
With `--model/--pretrained` (or `--checkpoint`) and `--data`, the same comparison runs on real CLIP.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
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
PRETRAIN = {"epochs": 8, "batch_size": 64, "lr": 2e-3, "logit_scale": 100.0}
WORLD_VERSION = 1  # bump when the split, the rendering or the pretraining changes


def _split_digits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """images [N,8,8] in [0,1], labels, and seeded stratified indices: pretrain 50 %, tune 25 %, test 25 %."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        a, b = int(0.5 * len(idx)), int(0.75 * len(idx))
        for part, chunk in zip(parts, (idx[:a], idx[a:b], idx[b:])):
            part += chunk.tolist()
    pre, tune, test = (np.sort(np.array(p)) for p in parts)
    return images, labels, pre, tune, test


def _render(image: np.ndarray, size: int = 32):
    from PIL import Image

    return Image.fromarray((image * 255).round().astype(np.uint8)).resize((size, size), Image.BICUBIC).convert("RGB")


def build_world(seed: int, root: Path) -> dict[str, Any]:
    """Write the tuning and test parts as image folders (the pipeline reads files, as for a user's data)."""
    images, labels, pre, tune, test = _split_digits(seed)
    world = root / f"digits-v{WORLD_VERSION}-seed{seed}"
    done = world / "done.json"
    if not done.is_file():
        for split, idx in (("tune", tune), ("test", test)):
            for i in idx:
                path = world / split / DIGIT_NAMES[labels[i]] / f"{i:04d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, lambda tmp, i=i: _render(images[i]).save(tmp, format="PNG"))
        atomic_write_text(done, json.dumps({"tune": len(tune), "test": len(test), "pretrain": len(pre)}))
    return {"root": world, "tune": world / "tune", "test": world / "test", "images": images, "labels": labels,
            "pretrain_idx": pre}


def pretrained_miniature(seed: int = 0, cache_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """The demo's prior: (checkpoint path, tune folder, test folder). Cached: a second call reuses it."""
    from safetensors.torch import save_file

    from .backbone import load_backbone
    from .pretrain import CAPTION_TEMPLATES, pretrain_clip

    root = Path(cache_dir or default_cache_dir()) / "demo"
    world = build_world(seed, root)
    key = hashlib.sha256(json.dumps([WORLD_VERSION, PRETRAIN, CAPTION_TEMPLATES, seed, DEMO_MODEL]).encode())
    ckpt = root / f"miniature-{DEMO_MODEL}-seed{seed}-{key.hexdigest()[:12]}.safetensors"
    info = {"checkpoint": ckpt, "tune": world["tune"], "test": world["test"], "model": DEMO_MODEL, "reused": True,
            "pretrain_seconds": 0.0}
    if ckpt.is_file():
        log.info("reusing the pretrained miniature CLIP %s", ckpt)
        return info
    bb = load_backbone(DEMO_MODEL, init_seed=seed)
    tf = bb.test_transform()
    idx = world["pretrain_idx"]
    x = torch.stack([tf(_render(world["images"][i])) for i in idx])
    t0 = time.perf_counter()
    log.info("pretraining the miniature CLIP on %d digit images (%d epochs)...", len(idx), PRETRAIN["epochs"])
    history = pretrain_clip(bb.model, bb.tokenizer, x, world["labels"][idx], list(DIGIT_NAMES),
                            epochs=PRETRAIN["epochs"], batch_size=PRETRAIN["batch_size"], lr=PRETRAIN["lr"],
                            seed=seed, logit_scale=PRETRAIN["logit_scale"], progress=progress)
    state = {k: v.detach().cpu().contiguous() for k, v in bb.model.state_dict().items()}
    atomic_write(ckpt, lambda tmp: save_file(state, tmp, metadata={"dspt": __version__,
                                                                    "loss_history": json.dumps(history)}))
    info.update(reused=False, pretrain_seconds=time.perf_counter() - t0, pretrain_loss=history)
    return info


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """noise rate x method: test accuracy and memorisation of wrong labels (mean over seeds if several)."""
    table = rows.pivot_table(index="noise_rate", columns="loss", values=["test_acc", "memorised"], aggfunc="mean")
    return table


def format_table(rows: pd.DataFrame, zeroshot_acc: float, losses: list[str]) -> str:
    names = {"ce": "CoOp (ce)", "dspt": "DSPT"}
    head = "| noise | " + " | ".join(f"{names.get(l, l)} acc" for l in losses) + " | " + \
        " | ".join(f"{names.get(l, l)} memorised" for l in losses) + " | zero-shot |"
    lines = [head, "|" + "---|" * (2 * len(losses) + 2)]
    for rate in sorted(rows["noise_rate"].unique()):
        sub = rows[rows["noise_rate"] == rate].set_index("loss")
        accs = [f"{sub.loc[l, 'test_acc']:.1f}" if l in sub.index else "-" for l in losses]
        mem = [f"{sub.loc[l, 'memorised']:.1f}" if l in sub.index and not np.isnan(sub.loc[l, 'memorised'])
               else "-" for l in losses]
        lines.append(f"| {rate:.1f} | " + " | ".join(accs) + " | " + " | ".join(mem) + f" | {zeroshot_acc:.1f} |")
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


def run_demo(
    seed: int = 0,
    output: str | Path = "dspt_demo",
    noise_rates: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8),
    losses: tuple[str, ...] = ("ce", "dspt"),
    epochs: int = 50,
    shots: int = 16,
    views: int = 10,
    lr: float = 0.002,
    model: str | None = None,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    data: str | None = None,
    test_data: str | None = None,
    cache_dir: str | None = None,
    device: str = "auto",
    workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Zero-shot reference, then every (noise rate, loss) through `dspt.train`; table, plot, results."""
    from .train import train, zeroshot

    t0 = time.perf_counter()
    out = Path(output)
    if model is None:
        if data is not None:
            raise ValueError("--data needs a real CLIP: add --model NAME --pretrained TAG (or --checkpoint FILE)")
        world = pretrained_miniature(seed, cache_dir, progress)
        base = dict(model=DEMO_MODEL, pretrained=None, checkpoint=str(world["checkpoint"]), data=str(world["tune"]),
                    test_data=str(world["test"]), template="a photo of a {}.")
        prior = (f"miniature CLIP ({DEMO_MODEL}, {PRETRAIN['epochs']} epochs of contrastive pretraining on "
                 f"{'reused checkpoint' if world['reused'] else 'digits'}; not real CLIP)")
    else:
        if data is None:
            raise ValueError("--model needs --data FOLDER (class sub-folders) to tune and test on")
        world = {"reused": None, "pretrain_seconds": 0.0}
        base = dict(model=model, pretrained=None if checkpoint else pretrained, checkpoint=checkpoint, data=data,
                    test_data=test_data)
        prior = f"{model} {checkpoint or pretrained}"
    common = dict(base, shots=shots, epochs=epochs, views=views, lr=lr, seed=seed, cache_dir=cache_dir,
                  device=device, workers=workers, progress=progress, noise="sym",
                  results=str(out / "results.csv"))
    zs = zeroshot(RunConfig(**common, output=str(out / "zeroshot")))
    rows = []
    for rate in noise_rates:
        for loss in losses:
            cfg = RunConfig(**common, loss=loss, noise_rate=rate, output=str(out / "runs" / f"{loss}-noise{rate:g}"))
            m = train(cfg)
            rows.append({"noise_rate": rate, "loss": loss, "test_acc": m["test_acc"],
                         "memorised": m["train"]["memorised"], "gain_over_zeroshot": m["gain_over_zeroshot"],
                         "text_cosine": m["text_cosine"]["final"], "ctx_drift": m["ctx_drift"]})
            log.info("noise %.1f %-5s test %.1f  memorised %.1f", rate, loss, m["test_acc"], m["train"]["memorised"])
    table = pd.DataFrame(rows)
    md = format_table(table, zs["zeroshot_acc"], list(losses))
    plot(table, zs["zeroshot_acc"], list(losses), out / "accuracy_vs_noise.png",
         f"{prior}\n{shots}-shot, {epochs} epochs, seed {seed}")
    seconds = time.perf_counter() - t0
    atomic_write_text(out / "table.md", f"Prior: {prior}\n\n{md}\n")
    buf = table.assign(zeroshot_acc=zs["zeroshot_acc"]).to_csv(index=False)
    atomic_write_text(out / "demo_results.csv", buf)
    return {"table": md, "rows": table, "zeroshot_acc": zs["zeroshot_acc"], "prior": prior, "seconds": seconds,
            "output": out, "pretrain_seconds": world["pretrain_seconds"]}


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="DSPT vs CoOp under label noise, offline, in minutes",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", "-o", default="dspt_demo", help="folder for runs, table, plot (default dspt_demo)")
    p.add_argument("--noise-rates", default="0,0.2,0.4,0.6,0.8", help="comma-separated sym noise rates")
    p.add_argument("--losses", default="ce,dspt", help="comma-separated losses to compare")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--model", help="real CLIP instead of the miniature, e.g. ViT-B-32 (needs --data)")
    p.add_argument("--pretrained", default="openai")
    p.add_argument("--checkpoint")
    p.add_argument("--data", help="image folder (class sub-folders) for a real-CLIP demo")
    p.add_argument("--test-data")
    p.add_argument("--cache-dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    res = run_demo(seed=args.seed, output=args.output,
                   noise_rates=tuple(float(r) for r in args.noise_rates.split(",")),
                   losses=tuple(args.losses.split(",")), epochs=args.epochs, shots=args.shots, views=args.views,
                   lr=args.lr, model=args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
                   data=args.data, test_data=args.test_data, cache_dir=args.cache_dir, device=args.device,
                   workers=args.workers, progress=not args.no_progress)
    print(f"Prior: {res['prior']}")
    print(res["table"])
    out = res["output"]
    print(f"\nplot: {out / 'accuracy_vs_noise.png'}  table: {out / 'table.md'}  results: {out / 'results.csv'}")
    print(f"wall time {res['seconds']:.0f} s (pretraining {res['pretrain_seconds']:.0f} s)")
    return 0
