"""Classify new images with a finished run or an exported classifier: CSV of path, predicted class, confidence,
top-k. A run folder, its `dspt export` file (.safetensors) and its ONNX export (.onnx) write the same predictions."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError
from .export import OnnxClassifier, collect_images, load_classifier
from .features import encode_paths
from .io import atomic_write_text
from .learner_models import TunedModel
from .train import load_prompt

__all__ = ["collect_images", "predict_files", "predict_probabilities", "write_predictions"]


@torch.no_grad()
def predict_probabilities(source: str | os.PathLike, images: list[str], device: str | None = "auto",
                          checkpoint: str | os.PathLike | None = None) -> tuple[list[str], np.ndarray, list[str]]:
    """(image paths, probabilities [N, C], class names) from a run folder, a .safetensors export or an .onnx
    export (run with onnxruntime on the CPU)."""
    src = Path(source).expanduser()
    paths = collect_images(images)
    if src.is_dir():
        clf = load_prompt(src, device=device, checkpoint=checkpoint)
        if isinstance(clf, TunedModel):  # a learner with its own module: its image features, its classifier
            encoder = clf.image_features if clf.image_input == "pixels" else None
            feats = encode_paths(clf.backbone, paths, clf.backbone.test_transform(), desc="predict", encoder=encoder)
            probs = clf.classify(feats.to(clf.backbone.device)).softmax(-1).cpu().numpy()
            return paths, probs, list(clf.classnames)
        feats = encode_paths(clf.backbone, paths, clf.backbone.test_transform(), desc="predict")
        probs = clf.logits(feats.to(clf.backbone.device)).softmax(-1).cpu().numpy()
        return paths, probs, list(clf.learner.classnames)
    if not src.is_file():
        raise ConfigError(f"'{source}' is neither a run folder nor an exported classifier file; pass a finished "
                          "run folder, or a file from `dspt export` (.safetensors or .onnx)")
    if src.suffix.lower() == ".onnx":
        if checkpoint:
            raise ConfigError("an ONNX export carries its image model; drop --checkpoint")
        onnx = OnnxClassifier(src)
        return paths, onnx.probabilities(paths), onnx.classnames
    clf = load_classifier(src, device=device, checkpoint=checkpoint)
    return paths, clf.probabilities(paths), clf.classnames


def write_predictions(out: str | os.PathLike, paths: list[str], probs: np.ndarray, classnames: list[str],
                      top_k: int = 3) -> None:
    """CSV: path, prediction, confidence, top1..topk as 'class:probability'."""
    k = max(1, min(top_k, probs.shape[1]))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "prediction", "confidence"] + [f"top{j + 1}" for j in range(k)])
    for path, ps, ids in zip(paths, probs, order):
        w.writerow([path, classnames[ids[0]], f"{ps[ids[0]]:.4f}"] + [f"{classnames[i]}:{ps[i]:.4f}" for i in ids])
    atomic_write_text(out, buf.getvalue())


def predict_files(run_dir: str | os.PathLike, images: list[str], out: str | os.PathLike, top_k: int = 3,
                  device: str | None = "auto", checkpoint: str | os.PathLike | None = None) -> int:
    """Classify `images` (files, folders searched recursively) with a run folder or an exported classifier
    (`run_dir`: a folder, a .safetensors export or an .onnx export); write the CSV `out`; return how many."""
    paths, probs, names = predict_probabilities(run_dir, images, device=device, checkpoint=checkpoint)
    write_predictions(out, paths, probs, names, top_k)
    return len(paths)
