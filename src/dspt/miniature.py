"""The offline demo's world and prior: scikit-learn's digits, split four ways, and a miniature CLIP pretrained
on one part.

No pretrained CLIP can be downloaded here, so the demo builds its own small prior, and says so: the
package's tiny open_clip config contrastively pretrained (`dspt.pretrain`) on half of scikit-learn's bundled
digits (real 8x8 scans of handwriting, upscaled). Prompt tuning then runs on a disjoint part, its learning
rate is chosen on a validation part, and it is tested on a fourth part. To leave headroom, as real CLIP has
on a new dataset, the tuning and test digits come from a domain the prior never saw: scanned on textured
paper (one fixed grain pattern added to every image). The image features still separate the digits (a
linear probe does much better than zero-shot), but the zero-shot head is off, which is what prompt tuning
is for. Most pretraining captions say what the image is ("a handwritten three"); a tenth are generic ("a
photo of a three"), so the generic zero-shot prompt works without being the best wording, as for real CLIP.
Digits are neither flip- nor small-crop-invariant, so the cached training views (`VIEWS`) use crops of
80-100 % of the image and no flips (CoOp's 8 % crops and flips suit photos, not 8x8 digits).

Everything here is cached under `<cache>/demo/` and keyed by `WORLD_VERSION` and the settings: bump the
version whenever the split, the rendering or the pretraining changes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .version import __version__
from .features import default_cache_dir
from .io import atomic_write, atomic_write_text
from .pretrain import CAPTION_TEMPLATES, pretrain_clip, template_weights

log = logging.getLogger(__name__)

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEMO_MODEL = "dspt-tiny"
PRETRAIN = {"epochs": 16, "batch_size": 64, "lr": 2e-3, "logit_scale": 100.0, "generic_share": 0.1}
PAPER = {"sigma": 100.0, "seed": 12345}  # the textured paper of the tuning/test domain (grey levels, 0-255)
VIEWS = {"crop_scale": 0.8, "hflip": False}  # augmentations that keep a digit a digit
WORLD_VERSION = 5  # bump when the split, the rendering or the pretraining changes


def split_digits(seed: int) -> tuple[np.ndarray, ...]:
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


def render_digit(image: np.ndarray, size: int = 32, paper: bool = False):
    """A digit as a `size`-pixel RGB image; `paper`: scanned on the textured paper of the tuning domain."""
    from PIL import Image

    big = Image.fromarray((image * 255).round().astype(np.uint8)).resize((size, size), Image.BICUBIC)
    if paper:
        grain = np.random.default_rng(PAPER["seed"]).normal(0.0, PAPER["sigma"], (size, size))
        big = Image.fromarray(np.clip(np.asarray(big, dtype=np.float64) + grain, 0, 255).astype(np.uint8))
    return big.convert("RGB")


def build_world(seed: int, root: Path) -> dict[str, Any]:
    """Write the tuning and test parts as image folders (the pipeline reads files, as for a user's data)."""
    images, labels, pre, train, val, test = split_digits(seed)
    world = root / f"digits-v{WORLD_VERSION}-seed{seed}"
    done = world / "done.json"
    if not done.is_file():
        for split, idx in (("tune/train", train), ("tune/val", val), ("test", test)):
            for i in idx:
                path = world / split / DIGIT_NAMES[labels[i]] / f"{i:04d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, lambda tmp, i=i: render_digit(images[i], paper=True).save(tmp, format="PNG"))
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
    x = torch.stack([tf(render_digit(world["images"][i])) for i in idx])
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
