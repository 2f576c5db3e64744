"""Grids of runs: one run folder per cell, finished runs skipped, partial ones resumed, one results file.

A grid is a YAML mapping of `RunConfig` fields. Fields whose value is a list are crossed (in the order they
appear); everything else is the base of every run. `output` is the sweep folder: each cell runs in
`<output>/<cell name>` and adds its row to `<output>/results.csv` (or `results:` when given)::

    data: images/            # base fields: any `dspt train` option, with underscores
    model: dspt-tiny
    pretrained: none
    epochs: 20
    output: sweeps/demo
    loss: [ce, dspt]         # crossed: 2 x 2 x 3 = 12 runs
    noise_rate: [0, 0.4]
    seed: [1, 2, 3]

Cell names are built from the crossed values only (``loss=ce,noise_rate=0.4,seed=1``), so they are the same
every time the grid is run. A `grid:` mapping of lists may be used instead of top-level lists, and
`loss_options` may be a list of mappings (each one a cell). Relative paths are relative to the current
folder, as on the command line.

One cross product cannot say "symflip at FP 2..12, sym at rate 0.125..0.75, and Food-101N with its own
labels". `grids:`, a list of mappings, is a union of grids: each entry is crossed on its own on top of the
top-level options (its options first, then the top-level lists), and the cells are concatenated in order.
Every option of an entry is crossed, even a single value, so cell names say which entry a cell comes from;
an entry's value wins over a top-level single value, and an option crossed at the top level cannot be given
again in an entry. Two cells that would get the same folder stop the grid with an error naming both::

    model: RN50
    output: sweeps/union
    loss: [ce, dspt]                                   # crossed in every entry
    seed: [1, 2, 3]
    grids:
      - {dataset: [dtd, eurosat], noise: [symflip, pairflip], fp: [2, 4]}    # 2 x 2 x 2 x 2 x 3 = 48 runs
      - {dataset: [dtd, eurosat], noise: [sym, pair], noise_rate: [0.125]}   # 24 runs
      - {dataset: food101n, noise: given}                                     # 6 runs; 78 in all

`lr_by_loss:` (a mapping loss -> rate) gives the cells of those losses that set no `lr` their rate; other
cells keep the loss's default (`dspt losses`). Presets use it to keep a paper's rate for the losses the paper
ran and give every other loss its matched default.

Restarting a sweep is always safe: a cell whose metrics.json exists is not run again (its results row is
re-added if a kill came between the two writes), a cell with a checkpoint resumes from it, and results rows
are keyed by run folder, so nothing is lost and nothing is counted twice.

Compatible runs (equal `dspt.train.batch_key`: same model, data, shots, batch size, epochs, ...; losses,
learning rates, noise and seeds may differ) train together as one model in one process: a batch
(`plan_batches`, at most `batch_runs` runs). Each run or batch is one unit of work: its own worker process
(`jobs` at a time; on Linux the workers die with the sweep process, so a killed sweep leaves no orphan
writing into its folders), or one Ray task with `backend="ray"` (optional dependency; the run folders and
the feature cache must be on storage that every node sees: docs/ray.md). Outcomes are reported per run; a
unit whose process dies fails all its runs, and the next sweep resumes them.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import yaml

from .config import RunConfig, coerce_field
from .errors import ConfigError, DsptError
from .rundir import check_run_dir, finished_metrics, has_checkpoint, is_finished, run_lock_path

log = logging.getLogger(__name__)

#: Keys of a grid file that are not RunConfig fields.
SWEEP_KEYS = ("grid", "grids", "output", "results", "lr_by_loss")
_FIELDS = {f.name for f in fields(RunConfig)}
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=,-]+")


@dataclass
class Cell:
    """One run of a grid."""

    name: str
    values: dict[str, Any]  # the crossed values that make this cell
    config: RunConfig  # resolved: output, results filled in

    @property
    def run_dir(self) -> Path:
        return Path(self.config.output)

    def done(self) -> bool:
        return is_finished(self.run_dir)

    def status(self) -> str:
        if self.done():
            return "done"
        return "partial" if has_checkpoint(self.run_dir) else "new"


@dataclass
class SweepResult:
    cells: list[Cell]
    skipped: list[str] = field(default_factory=list)  # already finished before this call
    finished: list[str] = field(default_factory=list)  # ran (or resumed) to the end in this call
    failed: dict[str, str] = field(default_factory=dict)  # cell name -> one-line error
    results: Path | None = None
    batches: list[list[str]] = field(default_factory=list)  # the units of work of this call, by cell name

    @property
    def ok(self) -> bool:
        return not self.failed


def load_grid(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file '{path}' not found; pass a YAML file of run options (lists are crossed)")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"grid file '{path}' is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"grid file '{path}' must hold a mapping of run options, e.g. 'loss: [ce, dspt]'")
    return spec


def _value_text(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return "+".join(f"{k}{_value_text(v)}" for k, v in sorted(value.items())) or "none"
    return str(value)


def cell_name(values: dict[str, Any]) -> str:
    """Deterministic, file-system safe folder name of a cell: `key=value` of each crossed field."""
    if not values:
        return "run"
    name = ",".join(f"{k}={_value_text(v)}" for k, v in values.items())
    return _UNSAFE.sub("_", name).strip("._") or "run"


def _grid_value(key: str, value: Any) -> Any:
    """A grid value as its field's type (YAML reads `2e-3` as text), so cell names and checks see numbers."""
    try:
        return coerce_field(key, value)
    except ConfigError as exc:
        raise ConfigError(f"grid option '{key}': {exc}") from None


def _axis_values(key: str, value: Any, where: str) -> list[Any]:
    """The values a crossed option takes, as its field's type; ConfigError on an empty list or a repeat."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ConfigError(f"{where}option '{key}' has an empty list of values")
    values = [_grid_value(key, v) for v in values]
    texts = [_value_text(v) for v in values]
    if len(set(texts)) != len(texts):
        raise ConfigError(f"{where}option '{key}' lists a value twice: {values}")
    return values


def _lr_by_loss(value: Any) -> dict[str, float]:
    """`lr_by_loss:` a mapping loss -> learning rate for the cells that set no `lr` themselves (a preset keeps a
    paper's rate for the losses that paper ran; every other loss keeps its own default, `dspt losses`)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError("'lr_by_loss:' must be a mapping of loss -> learning rate, e.g. {ce: 0.002}")
    from .losses import loss_names

    out = {}
    for loss, lr in value.items():
        if loss not in loss_names():
            raise ConfigError(f"lr_by_loss: unknown loss '{loss}'; choose from: {', '.join(loss_names())}")
        try:
            out[loss] = coerce_field("lr", lr)
        except ConfigError as exc:
            raise ConfigError(f"lr_by_loss: {loss}: {exc}") from None
    return out


def _check_key(key: str, where: str = "") -> None:
    if key not in _FIELDS:
        raise ConfigError(f"unknown option '{key}' in the grid{where}; valid: {', '.join(sorted(_FIELDS))}, "
                          f"and {', '.join(SWEEP_KEYS)}")
    if key in ("output", "results"):
        raise ConfigError("'output' and 'results' name the sweep folder and file; they cannot be crossed")


def _sub_grids(entries: Any, shared: dict[str, list[Any]]) -> list[dict[str, list[Any]]]:
    """The crossed options of each entry of 'grids:' (all of its options are crossed, so its cell names say
    which entry they come from), checked: a mapping each, no option that the top level already crosses."""
    if not isinstance(entries, list) or not entries:
        raise ConfigError("'grids:' must be a non-empty list of mappings (option -> value or list of values), "
                          "each crossed separately on top of the top-level options")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"grids[{i}] must be a mapping of option -> value or list of values, "
                              f"not {type(entry).__name__}")
        axes: dict[str, list[Any]] = {}
        for key, value in entry.items():
            _check_key(key, f" (grids[{i}])")
            if key in shared:
                raise ConfigError(f"option '{key}' is crossed at the top level and again in grids[{i}]; give it "
                                  "in one place")
            axes[key] = _axis_values(key, value, f"grids[{i}] ")
        out.append(axes)
    return out


def expand(spec: dict[str, Any], output: str | os.PathLike | None = None,
           results: str | os.PathLike | None = None) -> list[Cell]:
    """All cells of a grid, each with a resolved (validated) config. Raises ConfigError naming the cell.

    Resolving a config checks names and values only (dataset, model, loss, noise): no data is read, so a
    grid can be expanded and listed on a machine without the datasets."""
    spec = dict(spec)
    grid = spec.pop("grid", None) or {}
    if not isinstance(grid, dict):
        raise ConfigError("'grid:' must be a mapping of option -> list of values")
    entries = spec.pop("grids", None)
    root = output or spec.pop("output", None)
    spec.pop("output", None)
    results = results or spec.pop("results", None)
    spec.pop("results", None)
    lr_by_loss = _lr_by_loss(spec.pop("lr_by_loss", None))
    if root is None:
        raise ConfigError("the grid has no 'output:' folder; add 'output: sweeps/NAME' or pass --output DIR")
    axes: dict[str, list[Any]] = {}
    base: dict[str, Any] = {}
    for key, value in list(spec.items()) + [(k, v) for k, v in grid.items()]:
        _check_key(key)
        if key in grid and key in spec:
            raise ConfigError(f"option '{key}' is given both at the top level and under 'grid:'")
        if isinstance(value, list) or key in grid:
            axes[key] = _axis_values(key, value, "grid ")
        else:
            base[key] = _grid_value(key, value)
    subs = [{}] if entries is None else _sub_grids(entries, axes)
    root = Path(root)
    results_path = Path(results) if results else root / "results.csv"
    cells: list[Cell] = []
    seen: dict[str, tuple[int, dict[str, Any]]] = {}
    for i, sub in enumerate(subs):
        crossed = sub | axes  # the entry's options first: 'dataset=dtd,noise=symflip,fp=2,loss=ce,seed=1'
        for combo in itertools.product(*crossed.values()):
            values = dict(zip(crossed, combo))
            name = cell_name(values)
            if name in seen:
                j, other = seen[name]
                where = f" (grids[{j}] and grids[{i}])" if entries is not None and i != j else ""
                raise ConfigError(f"cells {other} and {values}{where} would share the folder '{name}'; "
                                  + ("use values that differ after replacing unusual characters" if i == j else
                                     "cross an option whose values tell the entries apart (e.g. noise, dataset)"))
            seen[name] = (i, values)
            data = ({k: v for k, v in base.items() if k not in sub} | values
                    | {"output": str(root / name), "results": str(results_path), "progress": False})
            loss = data.get("loss", RunConfig.loss)
            if "lr" not in data and loss in lr_by_loss:
                data["lr"] = lr_by_loss[loss]
            try:
                cfg = RunConfig.from_dict(data).resolved()
            except (ConfigError, TypeError) as exc:
                raise ConfigError(f"grid cell '{name}': {exc}") from None
            cells.append(Cell(name, values, cfg))
    return cells


# ---------------------------------------------------------------------------------------------- workers

def _die_with_parent(sweep_pid: int) -> None:
    """Linux: have the kernel SIGKILL this worker when its parent dies, however it dies.

    The parent is the sweep process itself (fork) or multiprocessing's fork server, which exits as soon as
    the sweep process is gone.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except Exception:  # pragma: no cover - best effort
            pass
    try:
        os.kill(sweep_pid, 0)
    except ProcessLookupError:  # the sweep died before the prctl above
        os._exit(1)
    except PermissionError:  # pragma: no cover
        pass


def _error_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, DsptError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _run_cell(cfg: RunConfig) -> float:
    """Run one cell to the end (resuming it if partial); returns its test accuracy."""
    from .io import process_lock
    from .train import train

    # An earlier sweep's worker may still be finishing this run (where workers do not die with the sweep).
    with process_lock(run_lock_path(Path(cfg.output)), wait=True):
        pass
    return float(train(cfg)["test_acc"])


def _run_unit(cfgs: list[RunConfig]) -> list[tuple[str, Any]]:
    """One unit of work: a single run, or a batch of runs trained as one model in this process (`train_batch`).

    Returns, per config in order, ("ok", test accuracy) or ("error", one-line message). An Exception fails
    the runs it reached; a BaseException (a kill, Ctrl-C) propagates: every run keeps its last checkpoint."""
    if len(cfgs) == 1:
        try:
            return [("ok", _run_cell(cfgs[0]))]
        except Exception as exc:  # noqa: BLE001 - reported; the sweep goes on with the other cells
            return [("error", _error_line(exc))]
    try:
        from .io import process_lock
        from .train import train_batch

        for cfg in cfgs:  # as in _run_cell, for every run of the batch
            with process_lock(run_lock_path(Path(cfg.output)), wait=True):
                pass
        outcomes = train_batch(cfgs)
    except Exception as exc:  # noqa: BLE001 - the batch as a whole failed: so did each of its runs
        return [("error", _error_line(exc))] * len(cfgs)
    return [("ok", float(payload["test_acc"])) if status == "ok" else ("error", _error_line(payload))
            for status, payload in outcomes]


def _worker(cfgs: list[RunConfig], conn: Any, sweep_pid: int, threads: int | None) -> None:
    _die_with_parent(sweep_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the sweep process decides; it stops us on Ctrl-C
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        outcomes = _run_unit(cfgs)
    except BaseException as exc:  # noqa: BLE001 - reported to the sweep, which goes on with other cells
        outcomes = [("error", _error_line(exc))] * len(cfgs)
    try:
        conn.send(outcomes)
        conn.close()
    except OSError:  # the sweep is gone; the run folders hold the outcomes for the next sweep
        pass
    if any(status != "ok" for status, _ in outcomes):
        sys.exit(1)


def _context(start_method: str | None = None) -> Any:
    """How workers start. Default: a fork server that has imported dspt once, so each run starts in a
    fraction of a second in a clean process (a plain fork of a process that has already computed with torch
    can hang in OpenMP, and CUDA cannot be forked at all; `spawn` would re-import torch for every run).
    `dspt sweep` passes "fork": its own process never computes, so forking it is safe and saves the
    fork server's start-up."""
    methods = mp.get_all_start_methods()
    if start_method is None:
        start_method = "forkserver" if "forkserver" in methods else "spawn"
    if start_method not in methods:
        raise ConfigError(f"start method '{start_method}' unavailable here; choose one of: {', '.join(methods)}")
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(["dspt.train", "dspt.sweep"])
    return ctx


Report = Callable[[Cell, str, Any], None]


def _report_unit(unit: list[Cell], outcomes: list[tuple[str, Any]], report: Report) -> None:
    for cell, (status, payload) in zip(unit, outcomes):
        report(cell, status, payload)


def _run_inline(units: list[list[Cell]], report: Report) -> None:
    """One unit after the other in this process (--jobs 1): a kill of the sweep is a kill of its run(s)."""
    for unit in units:
        _report_unit(unit, _run_unit([cell.config for cell in unit]), report)


def _run_local(units: list[list[Cell]], jobs: int, report: Report, start_method: str | None = None,
               threads: int | None = None) -> None:
    """`jobs` worker processes at a time, one per unit (a run or a batch), each with `threads` torch threads
    (default: the cores shared out). A worker that dies fails every run of its unit; they resume next time."""
    if jobs == 1:
        return _run_inline(units, report)
    ctx = _context(start_method)
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    queue = list(units)
    running: dict[Any, tuple[Any, Any, list[Cell]]] = {}  # sentinel -> (process, connection, unit)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                unit = queue.pop(0)
                recv, send = ctx.Pipe(duplex=False)
                name = unit[0].name if len(unit) == 1 else f"{unit[0].name} +{len(unit) - 1}"
                proc = ctx.Process(target=_worker, args=([c.config for c in unit], send, os.getpid(), threads),
                                   name=f"dspt-sweep {name}", daemon=False)
                proc.start()
                send.close()
                running[proc.sentinel] = (proc, recv, unit)
            for sentinel in mp.connection.wait(list(running)):
                proc, recv, unit = running.pop(sentinel)
                proc.join()
                try:
                    outcomes = recv.recv() if recv.poll() else None
                except (EOFError, OSError):
                    outcomes = None
                recv.close()
                if outcomes is None:
                    outcomes = [("error", f"worker died (exit code {proc.exitcode})")] * len(unit)
                _report_unit(unit, outcomes, report)
    except BaseException:
        for proc, recv, _ in running.values():
            if proc.is_alive():
                proc.kill()  # its runs resume from their last checkpoints next time
        for proc, recv, _ in running.values():
            proc.join()
        raise


# ---------------------------------------------------------------------------------------------------- Ray

#: RunConfig fields that name files or folders (relative ones are relative to the sweep's current folder).
_PATH_FIELDS = ("data", "test_data", "root", "classnames", "exclude", "noise_file", "checkpoint", "output", "results",
                "cache_dir")


def _ray_task(cfgs: list[RunConfig], cwd: str, threads: int, cpu_only: bool) -> list[tuple[str, Any]]:
    """A unit of work on a Ray worker: in the sweep's current folder (for relative paths), `threads` threads.

    `cpu_only`: the task holds no GPU, so `device: auto` runs on the CPU (Ray >= 2.49 no longer hides a node's
    GPUs from a task that asked for none: it would otherwise use one that the scheduler gave to another task).
    """
    import dataclasses
    import socket

    import torch

    if cpu_only:
        cfgs = [dataclasses.replace(cfg, device="cpu") if cfg.device in ("auto", "") else cfg for cfg in cfgs]

    relative = any(getattr(cfg, f) and not Path(getattr(cfg, f)).is_absolute() for cfg in cfgs for f in _PATH_FIELDS)
    here = os.getcwd()
    try:
        os.chdir(cwd)
    except OSError:
        if relative:
            message = (f"the sweep's folder '{cwd}' does not exist on Ray node {socket.gethostname()}; run the "
                       "sweep from shared storage mounted at the same path on every node, or use absolute paths "
                       "in the grid")
            return [("error", message)] * len(cfgs)
    torch.set_num_threads(max(1, threads))
    try:
        return _run_unit(cfgs)
    finally:
        os.chdir(here)


def _require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs the optional package 'ray' (pip install 'dspt[ray]'); "
                          "or run on this machine with --backend local --jobs N") from None
    return ray


def _ray_connect() -> Any:
    """Ray, connected: to the cluster this process already joined, else to $RAY_ADDRESS, else to a cluster
    started on this machine by `ray start`, else a new single-machine instance."""
    ray = _require_ray()
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None)
    return ray


def _ray_slots(resources: dict[str, float], cpus: float, gpus: float) -> int:
    """How many tasks of `cpus` CPUs and `gpus` GPUs the cluster runs at once (at least 1)."""
    slots = int(resources.get("CPU", 1) // cpus) if cpus > 0 else 1
    if gpus > 0:
        slots = min(slots, int(resources.get("GPU", 0) // gpus))
    return max(1, slots)


def _run_ray(units: list[list[Cell]], report: Report, cpus_per_run: float = 1, gpus_per_run: float = 0) -> None:
    """One Ray task per unit (a run or a batch), each asking for `cpus_per_run` CPUs and `gpus_per_run` GPUs.
    Tasks are not retried: a task whose worker or node dies fails every run of its unit, and the next sweep
    resumes them from their checkpoints."""
    ray = _ray_connect()
    # max_calls=1 for GPU tasks (Ray's own default for them): a fresh worker per task, so no idle worker keeps
    # its CUDA context on a GPU that the scheduler has since given to another task
    options = {"max_calls": 1} if gpus_per_run else {}
    task = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0, **options)(_ray_task)
    cwd, threads = os.getcwd(), max(1, int(cpus_per_run))
    pending = {task.remote([c.config for c in unit], cwd, threads, not gpus_per_run): unit for unit in units}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                unit = pending.pop(ref)
                try:
                    outcomes = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - the worker process died, the node went away, ...
                    message = f"Ray task failed ({_error_line(exc)}); run the sweep again to resume"
                    outcomes = [("error", message)] * len(unit)
                _report_unit(unit, outcomes, report)
    except BaseException:
        for ref in pending:  # Ctrl-C: stop the cluster's work on this sweep; checkpoints are kept
            with contextlib.suppress(Exception):  # already finished or gone
                ray.cancel(ref, force=True)
        raise


BACKENDS = {"local": _run_local, "ray": _run_ray}


# ------------------------------------------------------------------------------------------------ batches

#: Largest batch when `batch_runs` is automatic: one process trains this many runs as one model.
AUTO_BATCH_CPU = 64
AUTO_BATCH_GPU = 256


def _on_gpu(cfg: RunConfig, gpu_visible: bool) -> bool:
    """Whether a run trains on a GPU: --device cuda*, or auto where a GPU is visible to its worker."""
    if cfg.device.startswith("cuda"):
        return True
    return cfg.device in ("auto", "") and gpu_visible


def _local_gpu_visible() -> bool:
    """A GPU on this machine, found without initialising CUDA (NVML), so workers can still be forked."""
    import torch

    try:
        return torch.cuda.device_count() > 0
    except Exception:  # noqa: BLE001 - no driver, no NVML: no GPU
        return False


def plan_batches(cells: list[Cell], batch_runs: int | Callable[[Cell], int], workers: int = 1,
                 key: Callable[[RunConfig], Any] | None = None) -> list[list[Cell]]:
    """The units of work for `cells`: batches of runs that can train as one model.

    Cells with equal `key(cell.config)` (default `dspt.train.batch_key`) form a group; each group is split into
    the fewest batches of at most `batch_runs` runs (an int, or a function of a group's first cell), as equal
    in size as possible. While there are fewer batches than `workers`, the group with the largest batches is
    split once more, so that every worker gets work (40 compatible runs, 2 workers: two batches of 20).
    `batch_runs` 0 or 1: every cell alone. Order is kept: groups in order of their first cell, cells in grid
    order within a batch."""
    cap_of = batch_runs if callable(batch_runs) else (lambda cell: batch_runs)
    if not cells or (not callable(batch_runs) and batch_runs <= 1):
        return [[cell] for cell in cells]
    if key is None:
        from .train import batch_key as key
    groups: dict[Any, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(key(cell.config), []).append(cell)
    members = list(groups.values())
    counts = [-(-len(g) // max(1, cap_of(g[0]))) for g in members]  # ceil(n / cap)
    while sum(counts) < workers:
        sizes = [-(-len(g) // k) for g, k in zip(members, counts)]
        largest = max(range(len(members)), key=lambda i: sizes[i])
        if sizes[largest] <= 1:
            break
        counts[largest] += 1
    units: list[list[Cell]] = []
    for group, k in zip(members, counts):
        base, extra = divmod(len(group), k)
        start = 0
        for i in range(k):
            size = base + (1 if i < extra else 0)
            units.append(group[start:start + size])
            start += size
    return units


def _check_resources(cpus_per_run: float | None, gpus_per_run: float | None, batch_runs: int | None) -> None:
    if batch_runs is not None and batch_runs < 0:
        raise ConfigError(f"--batch-runs {batch_runs} is invalid; use 0 or 1 for one run per process, or N > 1")
    if cpus_per_run is not None and not cpus_per_run > 0:
        raise ConfigError(f"--cpus-per-run {cpus_per_run:g} is invalid; it must be > 0 (e.g. 1, or 0.5)")
    if gpus_per_run is not None:
        if not gpus_per_run >= 0:
            raise ConfigError(f"--gpus-per-run {gpus_per_run:g} is invalid; it must be >= 0 (e.g. 1, or 0.25 "
                              "for four runs per GPU)")
        if gpus_per_run > 1 and gpus_per_run != int(gpus_per_run):
            raise ConfigError(f"--gpus-per-run {gpus_per_run:g} is invalid; above 1 it must be a whole number "
                              "(Ray shares a GPU only in fractions of one)")


def run_sweep(
    grid: str | os.PathLike | dict[str, Any],
    output: str | os.PathLike | None = None,
    jobs: int = 1,
    backend: str = "local",
    results: str | os.PathLike | None = None,
    echo: Callable[[str], None] = print,
    start_method: str | None = None,
    threads: int | None = None,
    batch_runs: int | None = None,
    cpus_per_run: float | None = None,
    gpus_per_run: float | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> SweepResult:
    """Run every cell of `grid` (a YAML path or a mapping) that has not finished yet.

    Local backend: `jobs` units of work at a time; 1 runs them one after the other in this process, more
    start one worker process per unit (`start_method`, see `_context`) with `threads` torch threads each.
    Ray backend: one task per unit, each asking for `cpus_per_run` CPUs (default 1) and `gpus_per_run` GPUs
    (default: 1 where the cluster has GPUs, else 0; a task that asks for none trains on the CPU). A unit is
    one run, or a batch of compatible runs trained as one model in one process (`plan_batches`): at most
    `batch_runs` runs (0 or 1: no batching; None: up to 64 on the CPU, 256 on a GPU). `cache_dir` sets every
    run's feature cache. Returns which cells were skipped, finished and failed, per cell; a failed cell does
    not stop the others."""
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs} is invalid; it must be >= 1")
    if backend not in BACKENDS:
        raise ConfigError(f"backend '{backend}' unknown; choose one of: {', '.join(BACKENDS)}")
    _check_resources(cpus_per_run, gpus_per_run, batch_runs)
    if backend == "local" and (cpus_per_run is not None or gpus_per_run is not None):
        raise ConfigError("--cpus-per-run and --gpus-per-run are for --backend ray; on this machine use --jobs N "
                          "(and --device for the GPU)")
    spec = load_grid(grid) if not isinstance(grid, dict) else grid
    if cache_dir is not None:
        spec = {k: v for k, v in spec.items() if k != "cache_dir"} | {"cache_dir": str(cache_dir)}
        if isinstance(spec.get("grid"), dict):
            spec["grid"] = {k: v for k, v in spec["grid"].items() if k != "cache_dir"}
        if isinstance(spec.get("grids"), list):
            spec["grids"] = [{k: v for k, v in e.items() if k != "cache_dir"} if isinstance(e, dict) else e
                             for e in spec["grids"]]
    cells = expand(spec, output, results)  # every cell is checked before anything runs
    if backend == "ray":
        _require_ray()
    out = SweepResult(cells, results=Path(cells[0].config.results))
    todo: list[Cell] = []
    for cell in cells:
        check_run_dir(cell.config, cell.run_dir)  # a folder of a different run stops the sweep before it starts
        if cell.done():
            finished_metrics(cell.config, cell.run_dir)  # re-adds a results row lost to a kill after metrics.json
            out.skipped.append(cell.name)
        else:
            todo.append(cell)

    units: list[list[Cell]] = []
    where = f"{jobs} worker(s) on local"
    cpus, gpus = 1.0, 0.0
    if todo:
        if backend == "ray":
            ray = _ray_connect()
            resources = ray.cluster_resources()
            cluster_gpus = float(resources.get("GPU", 0))
            cpus = 1.0 if cpus_per_run is None else float(cpus_per_run)
            gpus = (1.0 if cluster_gpus else 0.0) if gpus_per_run is None else float(gpus_per_run)
            if gpus > cluster_gpus:
                raise ConfigError(f"--gpus-per-run {gpus:g}, but the Ray cluster has {cluster_gpus:g} GPU(s); "
                                  "no task could ever start")
            if not gpus and any(c.config.device.startswith("cuda") for c in todo):
                raise ConfigError("the grid asks for --device cuda but the Ray tasks ask for no GPU; pass "
                                  "--gpus-per-run X (e.g. 1, or 0.25 to share a GPU) or use device: auto")
            if cpus > float(resources.get("CPU", 0)):
                raise ConfigError(f"--cpus-per-run {cpus:g}, but the Ray cluster has {resources.get('CPU', 0):g} "
                                  "CPU(s); no task could ever start")
            workers, gpu_visible = _ray_slots(resources, cpus, gpus), gpus > 0
            where = (f"Ray ({resources.get('CPU', 0):g} CPUs, {cluster_gpus:g} GPUs; {cpus:g} CPU, {gpus:g} GPU "
                     "per task)")
            if cluster_gpus and not gpus:
                echo(f"sweep: the Ray cluster has {cluster_gpus:g} GPU(s) but --gpus-per-run is 0: every run "
                     "trains on the CPU")
        else:
            workers = jobs
            gpu_visible = batch_runs is None and any(c.config.device in ("auto", "") for c in todo) \
                and _local_gpu_visible()
        def auto_cap(cell: Cell) -> int:
            return AUTO_BATCH_GPU if _on_gpu(cell.config, gpu_visible) else AUTO_BATCH_CPU

        cap: int | Callable[[Cell], int] = auto_cap if batch_runs is None else batch_runs
        units = plan_batches(todo, cap, workers)
    out.batches = [[c.name for c in unit] for unit in units]
    batched = sum(len(u) > 1 for u in units)
    echo(f"sweep: {len(cells)} runs, {len(out.skipped)} already done, {len(todo)} to run "
         f"({sum(c.status() == 'partial' for c in todo)} to resume)"
         + (f" in {len(units)} units ({batched} batches of runs trained together)" if batched else "")
         + f" with {where}")
    t0 = time.perf_counter()

    def report(cell: Cell, status: str, payload: Any) -> None:
        n = len(out.finished) + len(out.failed) + 1
        if status == "ok":
            out.finished.append(cell.name)
            echo(f"[{n}/{len(todo)}] {cell.name}: test accuracy {payload:.2f}")
        else:
            out.failed[cell.name] = str(payload)
            echo(f"[{n}/{len(todo)}] {cell.name}: FAILED: {payload}")

    if units:
        if backend == "local":
            _run_local(units, jobs, report, start_method, threads)
        else:
            _run_ray(units, report, cpus, gpus)
    echo(f"sweep: {len(out.finished)} finished, {len(out.skipped)} skipped, {len(out.failed)} failed "
         f"in {time.perf_counter() - t0:.1f} s; results in {out.results}")
    return out


def list_cells(grid: str | os.PathLike | dict[str, Any], output: str | os.PathLike | None = None,
               results: str | os.PathLike | None = None) -> list[Cell]:
    spec = load_grid(grid) if not isinstance(grid, dict) else grid
    return expand(spec, output, results)
