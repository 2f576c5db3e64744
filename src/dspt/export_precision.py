"""What a run computed in, and what an export changes about it: the precision side of `dspt export`.

A run computes in its `--precision` where the backbone applies it (`Backbone.autocast`: bf16 / fp16 autocast on a
GPU, bf16 on a CPU with native bf16; fp32 otherwise). An export records that (`run_precision`) and, where it
cannot compute the same way (an ONNX graph is fp32; a GPU run exported on a CPU), counts how many of the run's test predictions change
(`compare_with_run`). Torch-side only: the torch-free half of `dspt.export` never imports this module.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def autocast_for(precision: str, device: Any) -> Any:
    """The context the run's backbone encodes in for `precision` on `device`: `Backbone.autocast`'s own rule
    (bf16 / fp16 autocast on a GPU, bf16 on a CPU with native bf16, else nothing)."""
    import types
    import warnings

    import torch

    from .backbone import Backbone

    with warnings.catch_warnings():  # an autocast for a GPU this machine lacks: only asked what it would do
        warnings.simplefilter("ignore")
        return Backbone.autocast(types.SimpleNamespace(precision=precision, device=torch.device(device)))


def computes_in(precision: str | None, device: Any) -> str:
    """What a backbone of `precision` computes in on `device`: `precision` where it autocasts, else fp32."""
    import torch

    if not precision or precision == "fp32":
        return "fp32"
    return precision if isinstance(autocast_for(precision, device), torch.autocast) else "fp32"


def run_config(run_dir: Path) -> Any:
    from .config import RunConfig

    try:
        return RunConfig.load(run_dir / "config.yaml")
    except (OSError, ValueError) as exc:  # ConfigError is a ValueError; a missing or unreadable record
        log.debug("export: no usable config.yaml in %s (%s)", run_dir, exc)
        return None


def run_precision(run_dir: Path, cfg: Any) -> dict[str, Any]:
    """The run's precision setting, the device it trained on (environment.json) and what it computed in."""
    if cfg is None:
        return {"run": None, "run_device": None, "run_computed": "fp32"}
    device = None
    try:
        device = json.loads((run_dir / "environment.json").read_text(encoding="utf-8")).get("device")
    except (OSError, ValueError):
        pass
    if not device or device == "auto":  # not recorded: a mixed precision is only asked for on a GPU
        device = cfg.device if cfg.device not in (None, "", "auto") else \
            ("cuda" if cfg.precision != "fp32" else "cpu")
    return {"run": cfg.precision, "run_device": str(device), "run_computed": computes_in(cfg.precision, device)}


def run_test_split(cfg: Any, run_dir: Path) -> Any:
    """The test images the run evaluated: its test split, less the unreadable ones it skipped."""
    from .train import load_splits

    test = load_splits(cfg).test
    try:
        skipped = json.loads((run_dir / "dataset.json").read_text(encoding="utf-8")) \
            .get("skipped_evaluation_images", {}).get("test") or []
    except (OSError, ValueError):
        skipped = []
    if skipped:
        bad = set(skipped)
        test = test.subset([i for i, p in enumerate(test.paths) if p not in bad])
    return test


def compare_with_run(cfg: Any, run_dir: Path, backbone: Any, text: "torch.Tensor") -> dict[str, Any]:
    """How many of the run's test predictions an fp32 image tower changes, against the same text features.

    The run's side: its test features from its feature cache (the numbers it evaluated), else encoded here in
    the run's precision (`backbone` carries it and computes in it on this device). The export's side: the same
    images through the image tower in fp32 (the computation the ONNX graph holds)."""
    import dataclasses

    from .errors import DsptError
    from .features import cached_features, encode_paths
    from .metrics import predict

    if cfg is None:
        return {"compared": 0, "differ": None, "why": "the run has no config.yaml to find its test images"}
    try:
        test = run_test_split(cfg, run_dir)
    except (DsptError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return {"compared": 0, "differ": None, "why": f"its test images could not be loaded: {first}"}
    if not len(test):
        return {"compared": 0, "differ": None, "why": "the run has no test images"}
    try:
        n_run = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["n_test"]
    except (OSError, ValueError, KeyError):
        n_run = None
    if n_run is not None and int(n_run) != len(test):
        return {"compared": 0, "differ": None, "why": f"the run was tested on {n_run} images, its data now gives "
                                                      f"{len(test)}"}
    fs = cached_features(backbone, test, "test", 0, 0, cfg.cache_dir, workers=cfg.workers)
    fp32 = dataclasses.replace(backbone, precision="fp32")
    ours = encode_paths(fp32, test.paths, fp32.test_transform(), desc="export: fp32 test features")
    text = text.to(ours.device)
    run_pred, our_pred = predict(fs.features[0].to(ours.device), text), predict(ours, text)
    differ = np.flatnonzero(run_pred != our_pred)
    return {"compared": len(test), "differ": len(differ),
            "run_features": "feature cache" if fs.hit else "encoded by the export in the run's precision",
            "differing_images": [test.paths[i] for i in differ[:20].tolist()]}  # the first 20
