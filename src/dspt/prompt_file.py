"""A run's learned prompt on disk: `prompt.safetensors`, written when the run finishes, and the classifier
rebuilt from it.

The training loop (`dspt.loop`) saves the prompt of every finished run; `load_prompt` rebuilds its classifier
(for evaluation, `dspt predict` and `dspt export`) and checks it carries the weights the run was trained with.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .backbone import Backbone, file_sha256, load_backbone
from .config import RunConfig
from .errors import BackboneError, ConfigError
from .io import atomic_write
from .learner_models import TunedModel, build_model
from .learners import get_learner
from .prompt import PromptClassifier, PromptLearner
from .rundir import load_checkpoint


def save_prompt(run_dir: Path, learner: PromptLearner | TunedModel, cfg: RunConfig, backbone: Backbone) -> None:
    """The learned prompt and what rebuilds the classifier around it: model, weights (a checkpoint by
    absolute path and sha256, so `load_prompt` can prove it has the same weights), template, classes, and the
    learner with its options. CoOp's context is stored as `ctx`; a learner's module as its named parameters."""
    meta = learner.meta() | {"model": cfg.model, "pretrained": cfg.pretrained,
                             "checkpoint": str(Path(cfg.checkpoint).expanduser().resolve()) if cfg.checkpoint else None,
                             "weights_id": backbone.weights_id, "template": cfg.template}
    if isinstance(learner, TunedModel):
        tensors = {name: t.detach().cpu().contiguous() for name, t in learner.trainable().items()}
    else:
        meta["learner"] = cfg.learner  # coop or kgcoop: the same prompt, trained with another loss term
        tensors = {"ctx": learner.ctx.detach().cpu().contiguous()}
    atomic_write(run_dir / "prompt.safetensors",
                 lambda tmp: save_file(tensors, tmp, metadata={"meta": json.dumps(meta)}))


def _find_checkpoint(meta: dict[str, Any], run_dir: Path, override: str | Path | None) -> Path:
    """The run's CLIP checkpoint file: `override`, else the recorded path (absolute, or relative to the run
    folder or the current folder); its sha256 must be the one the run was trained with."""
    recorded = Path(meta["checkpoint"]).expanduser()
    candidates = [Path(override).expanduser()] if override else \
        ([recorded] if recorded.is_absolute() else [run_dir / recorded, Path.cwd() / recorded])
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise BackboneError(f"the CLIP checkpoint of run '{run_dir}' is not at {candidates[0]}; pass its current "
                            "path (load_prompt(..., checkpoint=FILE) or --checkpoint FILE)")
    expected = meta.get("weights_id")
    if expected and expected.startswith("sha256:") and "sha256:" + file_sha256(path) != expected:
        raise BackboneError(f"'{path}' is not the checkpoint run '{run_dir}' was trained with (sha256 differs); "
                            "pass the original file")
    return path


def load_prompt(run_dir: str | Path, backbone: Backbone | None = None, device: str | None = "cpu",
                checkpoint: str | Path | None = None, learner: int = 0) -> PromptClassifier | TunedModel:
    """Rebuild the classifier of a finished run. The backbone is loaded from the run's record (or given, or
    from `checkpoint` when the file moved) and must carry the weights the run was trained with. `learner` j > 0:
    a method's other learner j (co-teaching's second prompt, dualprompt's negative one), from the run's last
    checkpoint."""
    from safetensors import safe_open

    run_dir = Path(run_dir)
    path = run_dir / "prompt.safetensors"
    if not path.is_file():
        raise ConfigError(f"'{run_dir}' holds no learned prompt (prompt.safetensors); pass a finished run folder")
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads((fh.metadata() or {})["meta"])
    if backbone is None:
        ckpt = _find_checkpoint(meta, run_dir, checkpoint) if meta.get("checkpoint") else None
        backbone = load_backbone(meta["model"], None if ckpt else meta["pretrained"], ckpt, device)
    expected = meta.get("weights_id")
    if expected and backbone.weights_id != expected:
        raise BackboneError(f"run '{run_dir}' was trained on weights {expected}, but the given backbone has "
                            f"{backbone.weights_id}; load the run's own model")
    if meta.get("learner") and get_learner(meta["learner"]).module:  # CoCoOp, VPT, MaPLe: the learner's module
        if learner:
            raise ConfigError(f"'{run_dir}' trained one {meta['learner']} learner; pass learner=0")
        model = build_model(meta["learner"], backbone, meta["classnames"], meta["learner_options"], meta["template"],
                            meta.get("n_ctx") or 1, meta.get("ctx_init"))
        saved = load_file(str(path))
        own = model.trainable()
        if set(saved) != set(own):
            raise ConfigError(f"'{path}' does not hold the parameters of a {meta['learner']} learner; pass a run "
                              "folder written by this dspt")
        with torch.no_grad():
            for name, tensor in own.items():
                tensor.copy_(saved[name].to(tensor.device))
        return model.eval()
    if learner == 0:
        ctx = load_file(str(path))["ctx"]
    else:
        ckpt = load_checkpoint(run_dir)
        if ckpt is None or f"ctx_{learner}" not in ckpt["extra"]:
            raise ConfigError(f"'{run_dir}' holds no learner {learner} (its method trains fewer prompts, or its "
                              "checkpoint is gone); pass a finished run of a method with that many learners")
        ctx = ckpt["extra"][f"ctx_{learner}"]
    prompt = PromptLearner(backbone, meta["classnames"], meta["n_ctx"], meta["ctx_init"], meta["csc"],
                           meta["class_token_position"])
    with torch.no_grad():
        prompt.ctx.copy_(ctx.to(prompt.ctx.device))
    return PromptClassifier(backbone, prompt)
