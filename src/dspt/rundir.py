"""A run folder: which run it holds, who may write it, its resumable training state, its finished result.

`dspt train` and `dspt sweep` share these rules: a folder holds one configuration (a different one is
refused), one process at a time writes it (a lock file beside it), `checkpoint.safetensors` is the state to
resume from, and `metrics.json`, written last, marks a finished run. Every file read back from a run folder
is data, never code: checkpoints are safetensors with JSON metadata, so a shared folder cannot execute
anything on load.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import RunConfig
from .errors import TrainingError
from .io import atomic_write, atomic_write_json, file_sha256, read_json
from .results import append_result, read_results

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
#: the contents of the files a run's config names (a label table, an exclusion list, a class list, a noise file)
INPUTS = "inputs.json"
#: config fields that name small input files whose contents decide the run (image folders and model weights are
#: keyed elsewhere: the feature cache by file identity, the backbone by its checkpoint's sha256)
INPUT_FIELDS = ("data", "test_data", "exclude", "classnames", "noise_file")
CHECKPOINT_FORMAT = 2  # 1 was a pickled checkpoint.pt (never loaded any more: it could run code)


def check_run_dir(cfg: RunConfig, run_dir: Path) -> None:
    """Refuse a folder that is a file or holds a run of another configuration (the message names the fix)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"output '{run_dir}' is a file, not a run folder; choose another --output")
    existing = run_dir / "config.yaml"
    if not existing.is_file():
        return
    try:
        old = RunConfig.load(existing)
    except Exception:  # noqa: BLE001 - any unreadable config means "not ours"
        raise TrainingError(f"'{existing}' is not a dspt run config; choose another --output") from None
    if old.identity() != cfg.identity():
        diff = sorted(k for k, v in cfg.identity().items() if old.identity().get(k) != v)
        raise TrainingError(f"output folder '{run_dir}' holds a different run (differs in {', '.join(diff[:6])}); "
                            "choose another --output or delete that folder")
    changed = changed_inputs(cfg, run_dir)
    if changed:
        raise TrainingError(f"output folder '{run_dir}' was trained on other contents of {changed[0]} (it changed "
                            "since); choose another --output or delete that folder")


def input_digests(cfg: RunConfig) -> dict[str, str]:
    """sha256 of each file the config names in `INPUT_FIELDS` (folders are left out), keyed by field."""
    out = {}
    for name in INPUT_FIELDS:
        value = getattr(cfg, name, None)
        if value and Path(value).expanduser().is_file():
            out[name] = file_sha256(Path(value).expanduser())
    return out


def save_inputs(cfg: RunConfig, run_dir: Path) -> None:
    """Record what the run's input files held when it started (`check_run_dir` compares on every reuse)."""
    atomic_write_json(run_dir / INPUTS, input_digests(cfg))


def changed_inputs(cfg: RunConfig, run_dir: Path) -> list[str]:
    """The input files (as named in the config) whose contents differ from what the run in `run_dir` was
    trained on; empty for a folder without a record (a run from before records existed)."""
    try:
        recorded = read_json(Path(run_dir) / INPUTS)
    except (OSError, ValueError):
        return []
    now = input_digests(cfg)
    return [f"'{getattr(cfg, k)}' ({k})" for k in sorted(set(recorded) | set(now)) if recorded.get(k) != now.get(k)]


def run_lock_path(run_dir: Path) -> Path:
    """The lock beside a run folder (not inside it: a failed fresh run leaves no folder behind)."""
    run_dir = Path(run_dir).resolve()
    return run_dir.parent / f".{run_dir.name}.lock"


def is_finished(run_dir: Path) -> bool:
    return (Path(run_dir) / "metrics.json").is_file()


def has_checkpoint(run_dir: Path) -> bool:
    return (Path(run_dir) / CHECKPOINT).is_file()


def result_row(cfg: RunConfig, metrics: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The run's row in the results store: its settings and headline numbers."""
    return {
        "run_id": str(run_dir.resolve()), "dataset": Path(cfg.data).name if cfg.data else cfg.dataset,
        "model": cfg.model, "weights": cfg.checkpoint or cfg.pretrained or "random", "loss": cfg.loss,
        "loss_options": json.dumps(cfg.loss_options, sort_keys=True) if cfg.loss_options else "",
        "method": cfg.method, "learner": cfg.learner, "noise": cfg.noise, "noise_rate": cfg.noise_rate,
        "realised_rate": metrics["noise"]["realised_rate"], "shots": cfg.shots, "seed": cfg.seed, "epochs": cfg.epochs,
        "lr": metrics.get("lr", cfg.lr), "path": cfg.path,
        "val_labels": metrics.get("validation", {}).get("labels", cfg.val_labels),
        "val_realised_rate": metrics.get("validation", {}).get("realised_rate", float("nan")),
        "val_why": metrics.get("validation", {}).get("why", ""),
        "test_acc": metrics["test_acc"], "val_acc_given": metrics.get("val_acc_given", float("nan")),
        "val_acc": metrics.get("val_acc", float("nan")), "zeroshot_acc": metrics["zeroshot_acc"],
        "gain_over_zeroshot": metrics["gain_over_zeroshot"], "memorised": metrics["train"]["memorised"],
        "corrected": metrics["train"]["corrected"], "clean_fit": metrics["train"]["clean_fit"],
        "text_cosine": metrics["text_cosine"]["final"], "ctx_drift": metrics["ctx_drift"],
        "test_confidence": metrics.get("test_confidence", float("nan")),
        "train_seconds": metrics["seconds"]["train"], "batch_runs": metrics.get("batch_runs", 1),
        "collapsed_at_epoch": metrics.get("collapse", {}).get("collapsed_at_epoch"),
        "collapse_kind": metrics.get("collapse", {}).get("kind"),
        "first_collapse_epoch": metrics.get("collapse", {}).get("first_collapse_epoch"),
        "saturated_share": metrics.get("collapse", {}).get("saturated_share", float("nan")),
        "guard_restores": metrics.get("collapse", {}).get("guard_restores", 0),
    }


def finished_metrics(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """A finished run's metrics; its results row is re-added if a kill came between metrics.json and the row."""
    metrics = read_json(run_dir / "metrics.json")
    table = read_results(cfg.results)
    if table.empty or "run_id" not in table or str(run_dir.resolve()) not in set(table["run_id"].astype(str)):
        append_result(cfg.results, result_row(cfg, metrics, run_dir))
    return metrics


def save_checkpoint(run_dir: Path, epoch: int, ctx: torch.Tensor, momentum: torch.Tensor | None,
                    scaler_state: dict[str, Any] | None = None, extra: dict[str, torch.Tensor] | None = None) -> None:
    """The state an interrupted run resumes from: context, momentum buffer and the global RNG states.

    The loop draws its minibatches and views from per-epoch generators, so this is all a resume needs to
    end with the numbers of an uninterrupted run. `extra`: further tensors of a method (the contexts and
    momentum of a second learner), saved under their names.
    """
    tensors = {"ctx": ctx.detach().cpu().contiguous(), "torch_rng": torch.get_rng_state()}
    for name, tensor in (extra or {}).items():
        tensors[name] = tensor.detach().cpu().contiguous()
    if momentum is not None:
        tensors["momentum"] = momentum.detach().cpu().contiguous()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda_rng"] = torch.stack(torch.cuda.get_rng_state_all())
    meta = {"format": str(CHECKPOINT_FORMAT), "epoch": str(epoch), "scaler": json.dumps(scaler_state or {})}
    # written every epoch: no fsync (a kill loses nothing; a power cut at worst restarts the run)
    atomic_write(run_dir / CHECKPOINT, lambda tmp: save_file(tensors, tmp, metadata=meta), durable=False)


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The checkpoint as {'epoch', 'ctx', 'momentum', 'torch_rng', 'cuda_rng', 'scaler', 'extra'}, or None when
    there is none or it is unreadable (the run then starts again from epoch 0; a warning says why)."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        if (run_dir / "checkpoint.pt").is_file():
            log.warning("%s holds a pickled checkpoint.pt of an older dspt; it is not loaded (a pickle can run "
                        "code), so the run starts from epoch 0", run_dir)
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
        state = {"epoch": int(meta["epoch"]), "ctx": tensors["ctx"], "torch_rng": tensors["torch_rng"],
                 "momentum": tensors.get("momentum"), "cuda_rng": tensors.get("cuda_rng"),
                 "scaler": json.loads(meta.get("scaler", "{}")),
                 "extra": {k: v for k, v in tensors.items() if k not in ("ctx", "torch_rng", "momentum", "cuda_rng")}}
        if meta.get("format") != str(CHECKPOINT_FORMAT):
            raise ValueError(f"format {meta.get('format')}")
    except (SafetensorError, OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        log.warning("checkpoint %s unreadable (%s); starting from epoch 0", path, type(exc).__name__)
        return None
    return state
