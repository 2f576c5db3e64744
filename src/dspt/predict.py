"""Classify new images with a finished run: CSV of path, predicted class, confidence, top-k."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import torch

from .data.base import DataError, is_image, natural_key
from .features import encode_paths
from .io import atomic_write_text
from .train import load_prompt


def collect_images(items: list[str]) -> list[str]:
    paths: list[str] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            paths += sorted((str(f) for f in p.rglob("*") if f.is_file() and is_image(f)), key=natural_key)
        elif p.is_file():
            paths.append(str(p))
        else:
            raise DataError(f"'{item}' is neither an image file nor a folder")
    if not paths:
        raise DataError(f"no images found in {items}")
    return paths


@torch.no_grad()
def predict_files(run_dir: str | os.PathLike, images: list[str], out: str | os.PathLike, top_k: int = 3,
                  device: str | None = "auto") -> int:
    clf = load_prompt(run_dir, device=device)
    paths = collect_images(images)
    feats = encode_paths(clf.backbone, paths, clf.backbone.test_transform(), desc="predict")
    probs = clf.logits(feats.to(clf.backbone.device)).softmax(-1).cpu()
    k = min(top_k, probs.shape[1])
    top_p, top_i = probs.topk(k, dim=-1)
    names = clf.learner.classnames
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "prediction", "confidence"] + [f"top{j + 1}" for j in range(k)])
    for path, ps, ids in zip(paths, top_p.tolist(), top_i.tolist()):
        w.writerow([path, names[ids[0]], f"{ps[0]:.4f}"] + [f"{names[i]}:{p:.4f}" for i, p in zip(ids, ps)])
    atomic_write_text(out, buf.getvalue())
    return len(paths)
