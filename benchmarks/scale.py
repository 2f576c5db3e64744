"""Time and memory of one training step's text side at real shapes (random weights): how it scales with the
number of classes C and of runs batched R, chunked under a memory budget and not.

A step is what a training step does on the prompt side (`dspt.prompt.PromptBatch`): the text features of every
(run, class) prompt row [R, C, E], the logits of a random L2-normalised minibatch of `--batch` (32) image
features per run against them, the DSPT loss summed over the runs, backward to the R contexts. Prompts are
CoOp's: 16 shared context tokens, the class token at the end. The class names are ImageNet's 1,000
(open_clip's `IMAGENET_CLASSNAMES`), an evenly spaced subset of them for C < 1000, so that the prompt tail
(name + '.' + EOS, padded to the longest name of the subset) has a real length: 1-12 BPE tokens per name, mean
2.2; the longest in all 1,000 is 12 tokens. Past 1,000 the names repeat with a numbered suffix.

Per case (model, C, R, precision), each in its own subprocess on the CPU (its peak RSS is its own):
- budgeted ("chunked"): `row_chunk=RowBudget(--max-memory GB)`; the budget decides how many rows run at once
  (`chunk_rows`; none when every row fits, then nothing is chunked) from the measured `per_row_bytes`;
- unchunked (`row_chunk=None`), unless a projection from the measured per-row cost
  (rows x per_row_bytes x dspt.memory.PEAK_PER_SAVED + OVERHEAD) exceeds `--ram-share` (70 %) of the memory the
  device has available once the model is built (then: "skipped: would need X GB"), or `--no-unchunked`;
- step time: the median of `--steps` steps after `--warmup` (1) untimed step(s);
- peak memory above the model: on the CPU, the process's resident set is measured after the model, the prompts
  and the image features are built (glibc trimmed, /proc/self/clear_refs "5" resets the high-water mark VmHWM),
  and the peak is VmHWM after the steps minus that baseline (where clear_refs cannot be written: ru_maxrss minus
  the baseline, flagged as a lower bound when model building peaked higher); on CUDA,
  max_memory_allocated after reset_peak_memory_stats minus memory_allocated before the steps;
- FLOPs of a step, counted on the warm-up step by a dispatch mode with torch.utils.flop_counter's formulas (not
  FlopCounterMode, which keeps checkpointed activations alive; see `_flop_counter`), the budget's one-off probe of
  the per-row cost subtracted, CPU flash attention counted too; the achieved GFLOPS over the median step
  and their share of the device's measured matmul peak (large square matmuls, same thread count, in the step's
  precision; measured before and after the cases, the better kept);
- CPU seconds (user + system, all threads) of each timed step beside its wall time: on cores that other processes
  share, wall time and especially the ratio of many-small-op (chunked) to few-large-op (unchunked) steps swing
  widely (torch's threads wait on each other's descheduled threads); `--threads 1` is steadier there;
- the exponents of step time vs C (fixed model, R, precision) and vs R (fixed model, C, precision): log-log
  least squares over the cases that ran.

bf16 on a CPU without native bf16 (AVX2 only) is refused by `dspt.backbone.check_precision`; such a case is
recorded as skipped with its one-line reason. A budget too small for one row records `MemoryBudgetError`'s line.

The full grid (RN50, ViT-B-16, ViT-L-14 x C 10/100/397/1000 x R 1/8 x fp32/bf16: `--suite gpu`) is for a GPU;
on a GPU all of a model's cases, both precisions, run in one process (peak memory is reset per case). The CPU suite
(`--suite cpu`, the default without other options) is a subset sized for about 10 minutes on 2 cores (`CPU_SUITE`:
ViT-B-16 at C = 100 under a 0.25 GB budget, which chunks it, and unchunked; C = 1000 with one run at 1.5 GB and
unchunked; C = 1000 with 4 runs at 3 GB; RN50 at C = 1000; ViT-L-14 at C = 100; a bf16 case, refused on a CPU
without native bf16); its C = 1000 cases time one step without a warm-up step (FLOPs are then counted on the timed
step itself, whose counting overhead is negligible at that size).

    python benchmarks/scale.py                                  # the CPU suite (--suite cpu)
    python benchmarks/scale.py --suite gpu --json scale.json    # the full grid on a GPU
    python benchmarks/scale.py --models ViT-B-16 --classes 1000 --runs 4 --precision fp32 --max-memory 3 --steps 1
    python benchmarks/scale.py --models dspt-tiny --classes 10 100 --runs 1 2 --steps 2 --max-memory 0.001
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024 ** 3
MIB = 1024 ** 2

# the CPU suite: (model, classes, runs, precision, max-memory GB, warm-up steps, timed steps, unchunked too). The
# C = 1000 cases take a minute or more per step on 2 cores: one timed step, no warm-up (on the CPU a warm-up
# saves nothing measurable at this size: the step's large buffers are mapped afresh every step anyway)
CPU_SUITE = [
    ("ViT-B-16", 100, 1, "fp32", 0.25, 1, 3, True),  # a budget that chunks C = 100
    ("ViT-B-16", 1000, 1, "fp32", 1.5, 0, 1, True),
    ("ViT-B-16", 1000, 4, "fp32", 3.0, 0, 1, True),  # unchunked: skipped by the projection where RAM is short
    ("RN50", 1000, 1, "fp32", 1.5, 0, 1, False),
    ("ViT-L-14", 100, 1, "fp32", 1.5, 1, 1, False),
    ("ViT-B-16", 100, 1, "bf16", 1.5, 1, 3, True),  # refused on a CPU without native bf16: recorded as skipped
]
GPU_MODELS, GPU_CLASSES, GPU_RUNS, GPU_PRECISIONS = ["ViT-B-16", "RN50", "ViT-L-14"], [10, 100, 397, 1000], [1, 8], \
    ["fp32", "bf16"]


# ----------------------------------------------------------------------------------------------- names

def class_names(c: int) -> list[str]:
    """C ImageNet class names (evenly spaced over the 1,000 for C < 1000; numbered repeats beyond)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES as names

    n = len(names)
    if c <= n:
        idx = [round(i * (n - 1) / max(c - 1, 1)) for i in range(c)] if c > 1 else [0]
        return [names[i] for i in idx]
    return [names[i % n] + ("" if i < n else f" {i // n}") for i in range(c)]


# ---------------------------------------------------------------------------------------------- memory

def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Current resident set: /proc/self/statm resident pages x page size."""
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so the baseline holds only live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark (VmHWM) to the current RSS; False where it cannot be."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    hwm, rss = _status_kb("VmHWM"), _status_kb("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024  # reset (within 1 MB of noise)


def available_bytes(device) -> int | None:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    from dspt.memory import free_memory

    return free_memory(device)


class PeakMemory:
    """Peak memory of the steps above what is resident (CPU) or allocated (CUDA) when `start` is called."""

    def __init__(self, device):
        self.device = device

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated - memory_allocated before the steps"
            return
        trim_heap()
        self.maxrss_before = self._maxrss()
        self.reset = reset_peak_rss()
        self.base = rss_bytes()
        self.method = ("VmHWM after the steps - RSS before them (clear_refs 5 reset the high-water mark)" if self.reset
                       else "ru_maxrss after the steps - RSS before them (clear_refs unavailable)")

    @staticmethod
    def _maxrss() -> int:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB

    def stop(self) -> dict:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self.base
            return {"peak_mb_above_model": peak / MIB, "before_steps_mb": self.base / MIB, "memory_method": self.method,
                    "peak_reserved_mb": torch.cuda.max_memory_reserved(self.device) / MIB}
        out = {"before_steps_mb": self.base / MIB, "memory_method": self.method}
        if self.reset:
            out["peak_mb_above_model"] = (_status_kb("VmHWM") * 1024 - self.base) / MIB
        else:
            peak = self._maxrss()
            out["peak_mb_above_model"] = (peak - self.base) / MIB
            # ru_maxrss is a high-water mark: if building the model peaked above the steps' peak, the difference
            # only bounds the steps' peak from below
            out["peak_is_lower_bound"] = peak <= self.maxrss_before
        return out


# ------------------------------------------------------------------------------------------------ FLOPs

def _flop_counter():
    """A FLOP-counting dispatch mode: torch.utils.flop_counter's formulas (matmuls, convolutions, attention), plus
    the CPU flash-attention kernels that its registry lacks.

    Not FlopCounterMode itself: its module tracker registers gradient hooks on every module's outputs and keeps
    them until it exits, which holds every checkpointed chunk's recomputed activations alive through backward
    (measured: a chunked ViT-B-16 step at C = 300 peaked at 1.38 GB above the model under it, 0.51 GB without).
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import (
        flop_registry,
        sdpa_backward_flop_count,
        sdpa_flop_count,
        shape_wrapper,
    )

    def fwd(q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(q, k, v)

    def bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, q, k, v)

    registry = dict(flop_registry)
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", fwd),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", bwd)):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            registry[op] = shape_wrapper(fn)

    class FlopCount(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = registry.get(func._overloadpacket)
            if formula is not None:
                self.total += formula(*args, **kwargs, out_val=out)
            return out

        def get_total_flops(self) -> int:
            return self.total

    return FlopCount()


class ProbeFlops:
    """Counts the FLOPs of the budget's per-row probes (dspt.memory.saved_bytes) inside a FLOP count, so they
    can be subtracted from the step: they run once per shape, not every step."""

    def __init__(self, counter):
        import dspt.memory

        self.counter, self.module, self.flops = counter, dspt.memory, 0
        self.original = dspt.memory.saved_bytes

    def __enter__(self):
        def wrapped(*args, **kwargs):
            before = self.counter.get_total_flops()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.flops += self.counter.get_total_flops() - before

        self.module.saved_bytes = wrapped
        return self

    def __exit__(self, *exc):
        self.module.saved_bytes = self.original


# ---------------------------------------------------------------------------------------------- worker

def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads)."""
    import resource

    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:400]


def unchunked_need(rows: int, per_row: int | None) -> int:
    """Projected peak bytes of an unchunked step: what the budget would need to hold every row at once."""
    from dspt.memory import OVERHEAD, PEAK_PER_SAVED

    return int(OVERHEAD + rows * (per_row or 0) * PEAK_PER_SAVED)


def run_case(backbone, case: dict, mode: str) -> dict:
    """One case in one mode ('chunked': budgeted; 'unchunked': row_chunk None) on a loaded backbone."""
    import torch
    import torch.nn.functional as F

    from dspt.losses import get_loss
    from dspt.memory import MemoryBudgetError, RowBudget, budget_bytes
    from dspt.prompt import PromptBatch, PromptLearner

    device = backbone.device
    c, r, steps, warmup = case["classes"], case["runs"], case["steps"], case["warmup"]
    rec = {"mode": mode, "status": "ok"}
    budget = RowBudget(budget_bytes(case["max_memory"], device)) if mode == "chunked" else None
    try:
        learner = PromptLearner(backbone, class_names(c), n_ctx=case["n_ctx"], seed=0)
        batch = PromptBatch(backbone, [learner] * r, row_chunk=budget)  # one learner: the runs share its buffers
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # each run its own context
            batch.ctx.copy_((torch.randn(batch.ctx.shape, generator=gen) * 0.02).to(device))
        e = batch.encoder.text_projection.shape[-1] if not isinstance(batch.encoder.text_projection, torch.nn.Linear) \
            else batch.encoder.text_projection.out_features
        images = F.normalize(torch.randn(r, case["batch"], e, generator=gen), dim=-1).to(device)
        labels = torch.randint(0, c, (r, case["batch"]), generator=gen).to(device)
        loss_fn = get_loss("dspt")
        enc = batch.encoder
        prefix = enc.usable_prefix(learner.shared_prefix, learner.min_eos)
        rec.update(prompt_tokens=learner.max_eos + 1, shared_prefix=prefix,
                   tail_tokens=learner.max_eos + 1 - prefix, rows=r * c)

        def step() -> None:
            batch.ctx.grad = None
            feats = batch.text_features()
            logits = batch.logits(images, feats)
            loss = sum(loss_fn(logits[i], labels[i]) for i in range(r))
            loss.backward()

        rec["available_mb"] = (available_bytes(device) or 0) / MIB
        rec["load_avg_1min"] = os.getloadavg()[0]
        peak = PeakMemory(device)
        peak.start()
        times, cpu_times, flops = [], [], None
        for i in range(warmup + steps):
            counting = i == 0  # FLOPs on the first step (the warm-up, unless --warmup 0)
            _sync(device)
            c0 = _cpu_seconds()
            t0 = time.perf_counter()
            if counting:
                counter = _flop_counter()
                with counter, ProbeFlops(counter) as probe:
                    step()
                flops = counter.get_total_flops() - probe.flops
            else:
                step()
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                cpu_times.append(_cpu_seconds() - c0)
        rec.update(peak.stop())
        rec["step_times"] = times
        rec["step_s"] = statistics.median(times)
        rec["step_ms_per_row"] = 1000 * rec["step_s"] / (r * c)
        rec["step_cpu_times"] = cpu_times  # the process's user + system CPU seconds, all threads
        rec["step_cpu_s"] = statistics.median(cpu_times)
        rec["step_cpu_ms_per_row"] = 1000 * rec["step_cpu_s"] / (r * c)
        rec["gflop_per_step"] = flops / 1e9
        rec["achieved_gflops"] = flops / 1e9 / rec["step_s"]
        rec["flops_counted_on"] = "warm-up step" if warmup else "first timed step (counting overhead included)"
        rec["grad_norm"] = float(batch.ctx.grad.norm())
    except MemoryBudgetError as exc:
        rec.update(status="error", reason=str(exc))
    except torch.OutOfMemoryError as exc:
        rec.update(status="error", reason="out of memory: " + _one_line(exc))
    except Exception as exc:  # noqa: BLE001 - one case failing is a record, not the end of the grid
        rec.update(status="error", reason=_one_line(exc))
    if budget is not None:
        last = budget.last or {}
        per_row = last.get("per_row_bytes") or next(iter(budget.costs.values()), None)
        rec.update(chunk_rows=last.get("chunk_rows"), per_row_bytes=per_row,
                   chunked=bool(last.get("chunk_rows")) and rec["status"] == "ok")
    else:
        rec.update(chunk_rows=None, chunked=False)
    return rec


def worker(spec: dict) -> None:
    """Load the model once (once per precision: the weights are shared, only autocast differs), then run the
    spec's (case, modes) in order; prints one RESULT line per (case, mode) as soon as it is done."""
    import dataclasses

    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from dspt.backbone import check_precision, load_backbone, resolve_device
    from dspt.errors import BackboneError

    device = resolve_device(spec["device"])
    backbones: dict[str, tuple] = {}

    def emit(rec: dict) -> None:
        print("RESULT " + json.dumps(rec), flush=True)

    for case in spec["cases"]:
        precision = case["precision"]
        try:
            check_precision(precision, device)
            if precision not in backbones:
                t0 = time.perf_counter()
                first = next(iter(backbones.values()), None)
                backbone = dataclasses.replace(first[0], precision=precision) if first else \
                    load_backbone(spec["model"], None, device=spec["device"], precision=precision)
                backbones[precision] = (backbone, time.perf_counter() - t0)
        except BackboneError as exc:
            for mode in case["modes"]:
                emit({"case": case, "mode": mode, "status": "skipped", "reason": str(exc)})
            continue
        backbone, build_s = backbones[precision]
        chunked = None
        for mode in case["modes"]:
            if mode == "unchunked" and chunked is not None:
                skip = skip_unchunked(chunked, spec["ram_share"])
                if skip:
                    emit({"case": case, "mode": mode, "status": "skipped", "reason": skip})
                    continue
            rec = run_case(backbone, case, mode)
            rec.update(case=case, build_s=build_s, threads=torch.get_num_threads())
            emit(rec)
            if mode == "chunked":
                chunked = rec
            if device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()


def skip_unchunked(chunked: dict, share: float) -> str | None:
    """The reason to skip the unchunked run of a case, projected from its budgeted run (None: run it)."""
    if chunked.get("status") == "skipped":
        return chunked.get("reason")
    if chunked.get("status") == "ok" and not chunked.get("chunked"):
        return "every row fits the budget: the budgeted step ran unchunked"
    per_row, rows = chunked.get("per_row_bytes"), chunked.get("rows") or chunked["case"]["classes"] * \
        chunked["case"]["runs"]
    if not per_row:
        return None
    need = unchunked_need(rows, per_row)
    avail = chunked.get("available_mb")
    if avail and need > share * avail * MIB:
        return (f"skipped: would need {need / GIB:.1f} GB ({rows} rows x {per_row / MIB:.1f} MB), over "
                f"{share:.0%} of the {avail * MIB / GIB:.1f} GB available")
    return None


def peak_worker(spec: dict) -> dict:
    """The device's matmul throughput: best of a few large square matmuls per dtype, same threads as the steps."""
    import torch

    from dspt.backbone import cpu_bf16_supported

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    n, reps, min_s = (8192, 10, 1.0) if cuda else (2048, 5, 3.0)
    dtypes = ["fp32", "bf16"] if cuda or cpu_bf16_supported() else ["fp32"]
    out = {"matmul_n": n, "threads": torch.get_num_threads()}
    if cuda:
        out["gpu"] = torch.cuda.get_device_name(device)
        out["allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    for name in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        (a @ b).sum().item()
        best, done, start = math.inf, 0, time.perf_counter()
        while done < reps or time.perf_counter() - start < min_s:  # best of several: other processes may share the cores
            _sync(device)
            t0 = time.perf_counter()
            a @ b
            _sync(device)
            best, done = min(best, time.perf_counter() - t0), done + 1
        out[f"{name}_gflops"] = 2 * n ** 3 / best / 1e9
    if "bf16_gflops" not in out:
        out["bf16_gflops"] = None
        out["bf16_note"] = "not measured: this CPU has no native bf16 (torch emulates it)"
    return out


def call_worker(kind: str, spec: dict, timeout: float | None, on_result=None) -> tuple[int, list, str]:
    """Run a worker subprocess; its RESULT lines are passed to `on_result` as they come (so a worker that dies or
    times out still leaves the records it finished). Returns (exit code, results, why it failed)."""
    import tempfile

    env = dict(os.environ)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    results: list = []
    deadline = None if timeout is None else time.monotonic() + timeout
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, __file__, f"--{kind}-worker", json.dumps(spec)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        timer = None
        if deadline is not None:
            import threading

            timer = threading.Timer(timeout, proc.kill)
            timer.start()
        for line in proc.stdout:
            if line.startswith("RESULT "):
                results.append(json.loads(line[len("RESULT "):]))
                if on_result:
                    on_result(results[-1])
        rc = proc.wait()
        if timer:
            timer.cancel()
        err.seek(0)
        lines = [line for line in err.read().strip().splitlines() if line.strip()]
    if deadline is not None and rc != 0 and time.monotonic() >= deadline:
        return 124, results, f"timed out after {timeout:.0f} s"
    if rc != 0:
        why = "killed by signal 9 (out of memory?)" if rc == -9 else (lines[-1][:300] if lines else "no result")
        return rc, results, f"exit {rc}: {why}"
    return 0, results, ""


# -------------------------------------------------------------------------------------------- machine

def machine(threads: int | None) -> dict:
    import torch

    from dspt.backbone import cpu_bf16_supported

    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1]
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags.split()]
    return {"cpu": cpu, "cpus": os.cpu_count(), "isa": isa, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_bf16_native": cpu_bf16_supported(), "threads": threads or torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "gpu": None, "ram_gb": _status_total_ram()}


def _status_total_ram() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------------------------- report

def merge(records: list[dict], peak: dict | None) -> list[dict]:
    """One record per case: the budgeted run's figures, the unchunked ones under `unchunked_*`, and the ratio."""
    cases: dict[str, dict] = {}
    for rec in records:
        case = rec["case"]
        key = json.dumps({k: case[k] for k in ("model", "classes", "runs", "precision", "max_memory")}, sort_keys=True)
        row = cases.setdefault(key, {"model": case["model"], "classes": case["classes"], "runs": case["runs"],
                                     "precision": case["precision"], "device": case["device"],
                                     "max_memory_gb": case["max_memory"], "steps": case["steps"],
                                     "warmup": case["warmup"], "batch": case["batch"], "n_ctx": case["n_ctx"]})
        body = {k: v for k, v in rec.items() if k not in ("case", "mode")}
        if rec["mode"] == "chunked":
            row.update(body)
        else:
            row["unchunked"] = body
            for k in ("step_s", "peak_mb_above_model", "step_ms_per_row", "step_cpu_ms_per_row", "status", "reason"):
                if k in body:
                    row[f"unchunked_{k}"] = body[k]
    out = list(cases.values())
    for row in out:
        row.setdefault("status", "skipped")
        if peak and row.get("achieved_gflops"):
            top = peak.get(f"{row['precision']}_gflops")
            row["peak_gflops"] = top
            row["share_of_peak"] = row["achieved_gflops"] / top if top else None
        if row.get("status") == "ok" and row.get("unchunked_status") == "ok":
            row["chunked_vs_unchunked_per_row"] = row["step_ms_per_row"] / row["unchunked_step_ms_per_row"]
            row["chunked_vs_unchunked_per_row_cpu"] = row["step_cpu_ms_per_row"] / row["unchunked_step_cpu_ms_per_row"]
            row["ratio_reference"] = "unchunked, same case"
    # cases whose unchunked run was skipped: per row against the unchunked run of the same model, C and precision
    for row in out:
        if row.get("status") == "ok" and "chunked_vs_unchunked_per_row" not in row:
            refs = [o for o in out if o.get("unchunked_status") == "ok" and o is not row and
                    (o["model"], o["classes"], o["precision"], o["device"]) ==
                    (row["model"], row["classes"], row["precision"], row["device"])]
            if refs:
                ref = min(refs, key=lambda o: abs(o["runs"] - row["runs"]))
                row["chunked_vs_unchunked_per_row"] = row["step_ms_per_row"] / ref["unchunked_step_ms_per_row"]
                row["chunked_vs_unchunked_per_row_cpu"] = row["step_cpu_ms_per_row"] / \
                    ref["unchunked_step_cpu_ms_per_row"]
                row["ratio_reference"] = f"unchunked R={ref['runs']} of the same model, C and precision, per row"
    return out


def fit_exponents(rows: list[dict]) -> list[dict]:
    """Log-log least-squares slope of step time vs C (fixed model, R, precision) and vs R (fixed model, C,
    precision), over the budgeted runs (and the unchunked ones) that ran."""
    fits = []
    for var, fixed in (("classes", ("model", "runs", "precision", "device")),
                       ("runs", ("model", "classes", "precision", "device"))):
        for field, label in (("step_s", "budgeted"), ("unchunked_step_s", "unchunked")):
            groups: dict[tuple, list] = {}
            for row in rows:
                if row.get(field) and (field == "step_s" and row.get("status") == "ok"
                                       or field != "step_s" and row.get("unchunked_status") == "ok"):
                    groups.setdefault(tuple(row[k] for k in fixed), []).append((row[var], row[field]))
            for key, pts in groups.items():
                xs = sorted({x for x, _ in pts})
                if len(xs) < 2:
                    continue
                lx = [math.log(x) for x, _ in pts]
                ly = [math.log(y) for _, y in pts]
                mx, my = statistics.fmean(lx), statistics.fmean(ly)
                slope = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
                fits.append({"vs": var, "steps": label, **dict(zip(fixed, key)), "exponent": slope,
                             "points": sorted(pts)})
    return fits


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    head = ("model", "C", "R", "prec", "budget GB", "chunk rows", "MB/row", "step s", "ms/row", "peak MB",
            "unchunked s", "unchunked peak MB", "chunked/unchunked per row (wall; CPU time)", "GFLOP/step", "GFLOPS", "% peak", "load")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for row in rows:
        u = row.get("unchunked_status")
        if row.get("status") != "ok":
            notes.append(f"{row['model']} C={row['classes']} R={row['runs']} {row['precision']}: {row.get('status')}: "
                         f"{row.get('reason')}")
            if u == "ok":
                lines.append(" | ".join([
                    f"| {row['model']}", str(row["classes"]), str(row["runs"]), row["precision"],
                    f"{row['max_memory_gb']:g}", row["status"], _fmt(row.get("per_row_bytes") and
                                                                     row["per_row_bytes"] / MIB, ".2f"),
                    "-", "-", "-", f"{row['unchunked_step_s']:.2f}", f"{row['unchunked_peak_mb_above_model']:.0f}",
                    "-", _fmt(row["unchunked"].get("gflop_per_step"), ".1f"),
                    _fmt(row["unchunked"].get("achieved_gflops"), ".0f"), "-",
                    _fmt(row["unchunked"].get("load_avg_1min"), ".1f")]) + " |")
            else:
                lines.append(f"| {row['model']} | {row['classes']} | {row['runs']} | {row['precision']} | "
                             f"{row['max_memory_gb']:g} | {row.get('status')} |" + " - |" * (len(head) - 6))
            continue
        us = _fmt(row.get("unchunked_step_s"), ".2f") if u == "ok" else (u or "-")
        up = _fmt(row.get("unchunked_peak_mb_above_model"), ".0f") if u == "ok" else "-"
        if u and u != "ok" and row.get("unchunked_reason"):
            notes.append(f"{row['model']} C={row['classes']} R={row['runs']} {row['precision']} unchunked: "
                         f"{row['unchunked_reason']}")
        ratio = _fmt(row.get("chunked_vs_unchunked_per_row"), ".2f")
        if row.get("device") == "cpu" and row.get("chunked_vs_unchunked_per_row_cpu"):
            ratio += f"; {row['chunked_vs_unchunked_per_row_cpu']:.2f}"
        if row.get("ratio_reference", "").startswith("unchunked R="):
            ratio += f" (vs {row['ratio_reference'].split(' of ')[0]})"
        share = row.get("share_of_peak")
        lines.append(" | ".join([
            f"| {row['model']}", str(row["classes"]), str(row["runs"]), row["precision"], f"{row['max_memory_gb']:g}",
            _fmt(row.get("chunk_rows"), "d", "all"), _fmt(row.get("per_row_bytes") and row["per_row_bytes"] / MIB, ".2f"),
            f"{row['step_s']:.2f}", f"{row['step_ms_per_row']:.1f}", f"{row['peak_mb_above_model']:.0f}", us, up,
            ratio, f"{row['gflop_per_step']:.1f}", f"{row['achieved_gflops']:.0f}",
            _fmt(share and 100 * share, ".0f"), _fmt(row.get("load_avg_1min"), ".1f")]) + " |")
    return "\n".join(lines + ([""] + notes if notes else []))


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets (ViT-B-16 shape, C = 1000, fp32): step memory above the model <= 1.5 GB for one run and
    <= 3 GB for 4 runs batched, at <= 1.4x the unchunked time per row."""
    out = []
    for runs, limit in ((1, 1.5), (4, 3.0)):
        for row in rows:
            if (row["model"], row["classes"], row["runs"], row["precision"]) != ("ViT-B-16", 1000, runs, "fp32"):
                continue
            if row.get("status") != "ok":
                out.append(f"ViT-B-16 C=1000 R={runs} fp32: {row.get('status')} ({row.get('reason')})")
                continue
            mem = row["peak_mb_above_model"] / 1024
            ratio = row.get("chunked_vs_unchunked_per_row")
            out.append(f"ViT-B-16 C=1000 R={runs} fp32 at a {row['max_memory_gb']:g} GB budget: peak above the model "
                       f"{mem:.2f} GB (target <= {limit:g} GB: {'met' if mem <= limit else 'MISSED'}); time per row "
                       + (f"{ratio:.2f}x {row['ratio_reference']} (target <= 1.4x: "
                          f"{'met' if ratio <= 1.4 else 'MISSED'})" if ratio else "not compared (no unchunked run)")
                       + (f"; in CPU time {row['chunked_vs_unchunked_per_row_cpu']:.2f}x"
                          if row.get("chunked_vs_unchunked_per_row_cpu") and row["device"] == "cpu" else ""))
    return out


# -------------------------------------------------------------------------------------------------- main

def build_cases(args) -> list[dict]:
    common = {"device": args.device, "batch": args.batch, "n_ctx": args.n_ctx}
    if args.suite == "cpu":
        return [dict(common, model=m, classes=c, runs=r, precision=p, max_memory=mem, steps=args.steps or s,
                     warmup=w if args.warmup is None else args.warmup,
                     modes=["chunked"] + (["unchunked"] if u and not args.no_unchunked else []))
                for m, c, r, p, mem, w, s, u in CPU_SUITE]
    models = args.models or (GPU_MODELS if args.suite == "gpu" else ["ViT-B-16"])
    classes = args.classes or (GPU_CLASSES if args.suite == "gpu" else [100])
    runs = args.runs or (GPU_RUNS if args.suite == "gpu" else [1])
    precisions = args.precision or (GPU_PRECISIONS if args.suite == "gpu" else ["fp32"])
    steps = args.steps or (5 if args.suite == "gpu" else 1)
    return [dict(common, model=m, classes=c, runs=r, precision=p, max_memory=args.max_memory, steps=steps,
                 warmup=1 if args.warmup is None else args.warmup, modes=["chunked"] + ([] if args.no_unchunked else ["unchunked"]))
            for m, p, c, r in itertools.product(models, precisions, classes, runs)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case-worker", help=argparse.SUPPRESS)
    ap.add_argument("--peak-worker", help=argparse.SUPPRESS)
    ap.add_argument("--suite", choices=["cpu", "gpu"], default=None,
                    help="presets: cpu = a ~10-minute subset for a 2-core CPU (the default without --models/"
                         "--classes/--runs/--precision); gpu = the full grid on CUDA")
    ap.add_argument("--models", nargs="+", help="open_clip model names (random weights)")
    ap.add_argument("--classes", nargs="+", type=int, help="numbers of classes C")
    ap.add_argument("--runs", nargs="+", type=int, help="numbers of runs R batched in one step")
    ap.add_argument("--precision", nargs="+", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--max-memory", type=float, default=1.5, help="the step's memory budget in GB (GiB; default 1.5)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda for --suite gpu, else cpu")
    ap.add_argument("--no-unchunked", action="store_true", help="only the budgeted step")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case (median; default 1, gpu suite 5; "
                                                             "the cpu suite sets its own)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps before them (default 1; the cpu suite sets its own); FLOPs are counted on the "
                         "first step")
    ap.add_argument("--batch", type=int, default=32, help="image features per run in the minibatch")
    ap.add_argument("--n-ctx", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--ram-share", type=float, default=0.7,
                    help="skip the unchunked step when its projected peak exceeds this share of available memory")
    ap.add_argument("--case-timeout", type=float, default=None, help="seconds per worker process (default none)")
    ap.add_argument("--json", type=Path, default=None, help="write all records to this JSON file (after every case)")
    args = ap.parse_args(argv)

    if args.case_worker:
        worker(json.loads(args.case_worker))
        return
    if args.peak_worker:
        print("RESULT " + json.dumps(peak_worker(json.loads(args.peak_worker))), flush=True)
        return

    import torch

    grid_given = any((args.models, args.classes, args.runs, args.precision))
    if args.suite is None and not grid_given:
        args.suite = "gpu" if args.device == "cuda" else "cpu"
    args.device = args.device or ("cuda" if args.suite == "gpu" else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda / --suite gpu needs a CUDA GPU; none is visible (run --suite cpu)")
    if args.suite == "cpu" and args.device != "cpu":
        sys.exit("--suite cpu runs on the CPU; use --suite gpu for CUDA")
    if args.steps is not None and args.steps < 1 or args.warmup is not None and args.warmup < 0:
        sys.exit("--steps must be >= 1 and --warmup >= 0")
    cases = build_cases(args)

    info = machine(args.threads)
    result = {"machine": info, "peak": None, "cases": [], "exponents": [], "targets": [],
              "command": " ".join([Path(sys.executable).name, *sys.argv])}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(result, indent=2, default=str))

    t_all = time.perf_counter()
    print(f"[scale] matmul peak on {args.device} ...", file=sys.stderr, flush=True)
    rc, peak, why = call_worker("peak", {"device": args.device, "threads": args.threads}, args.case_timeout)
    result["peak"] = peak[0] if rc == 0 and peak else {"error": why}
    peak = result["peak"]
    if peak and peak.get("gpu"):
        info["gpu"] = peak["gpu"]
    save()

    records: list[dict] = []
    cuda = args.device == "cuda"
    # CUDA: one process per model, all its cases (peak memory is reset per case); CPU: one per case and mode
    if cuda:
        groups: dict[str, list] = {}
        for case in cases:
            groups.setdefault(case["model"], []).append(case)
        jobs = list(groups.items())
    else:
        jobs = [(case["model"], [dict(case, modes=[mode])]) for case in cases for mode in case["modes"]]
    done_chunked: dict[str, dict] = {}

    def key_of(case: dict) -> str:
        return json.dumps({k: v for k, v in case.items() if k != "modes"}, sort_keys=True)

    for model, job_cases in jobs:
        spec = {"model": model, "device": args.device, "threads": args.threads, "ram_share": args.ram_share,
                "cases": job_cases}
        if not cuda:  # the unchunked run: decided from the budgeted run's measured per-row cost
            case = job_cases[0]
            if case["modes"] == ["unchunked"] and key_of(case) in done_chunked:
                skip = skip_unchunked(done_chunked[key_of(case)], args.ram_share)
                if skip:
                    records.append({"case": case, "mode": "unchunked", "status": "skipped", "reason": skip})
                    print(f"[scale] {model} C={case['classes']} R={case['runs']} {case['precision']} unchunked: "
                          f"{skip}", file=sys.stderr, flush=True)
                    continue
        what = ", ".join(f"C={c['classes']} R={c['runs']} {c['precision']} {'+'.join(c['modes'])}" for c in job_cases)
        print(f"[scale] {model}: {what} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()

        def on_result(rec: dict, model: str = model, t0: float = t0) -> None:
            if rec["mode"] == "chunked":
                done_chunked[key_of(rec["case"])] = rec
            s = rec.get("step_s")
            print(f"[scale]   {model} C={rec['case']['classes']} R={rec['case']['runs']} {rec['case']['precision']} "
                  f"{rec['mode']}: {rec['status']}"
                  + (f", step {s:.2f} s, peak {rec['peak_mb_above_model']:.0f} MB above the model, chunk rows "
                     f"{rec.get('chunk_rows') or 'all'}, load {rec.get('load_avg_1min', 0):.1f}" if s is not None
                     else f" ({rec.get('reason')})") + f" [{time.perf_counter() - t0:.0f} s]",
                  file=sys.stderr, flush=True)
            records.append(rec)
            result["cases"] = merge(records, result["peak"])
            save()

        rc, recs, why = call_worker("case", spec, args.case_timeout, on_result)
        if rc != 0:  # what the worker did not finish
            seen = {(key_of(r["case"]), r["mode"]) for r in recs}
            for c in job_cases:
                for m in c["modes"]:
                    if (key_of(c), m) not in seen:
                        on_result({"case": c, "mode": m, "status": "error", "reason": f"worker failed ({why})"})

    # the peak again after the cases, the better of the two kept: a busy machine depresses either measurement
    rc, again, why = call_worker("peak", {"device": args.device, "threads": args.threads}, args.case_timeout)
    if rc == 0 and again:
        first = result["peak"] if result["peak"] and "error" not in result["peak"] else {}
        result["peak_measurements"] = [first, again[0]]
        result["peak"] = dict(again[0], **{k: max(v, first.get(k) or 0) for k, v in again[0].items()
                                           if k.endswith("_gflops") and v})
    rows = result["cases"] = merge(records, result["peak"])
    result["exponents"] = fit_exponents(rows)
    result["targets"] = targets(rows)
    result["wall_s"] = time.perf_counter() - t_all
    save()

    p = result["peak"] or {}
    peak_text = (f"fp32 {p['fp32_gflops']:.0f} GFLOPS" + (f", bf16 {p['bf16_gflops']:.0f}" if p.get("bf16_gflops")
                                                           else f" (bf16: {p.get('bf16_note', 'n/a')})")
                 + (f", TF32 {'on' if p.get('allow_tf32') else 'off'}" if "allow_tf32" in p else "")) \
        if p.get("fp32_gflops") else f"not measured ({p.get('error')})"
    dev = info["gpu"] if cuda else f"{info['cpu']}, {info['cpus']} CPUs ({', '.join(info['isa']) or 'no AVX2'}; " \
        f"native bf16: {'yes' if info['cpu_bf16_native'] else 'no'})"
    print(f"machine: {dev}; torch {info['torch']}, {info['threads']} threads; matmul peak: {peak_text}")
    print(f"step = text features of R x C prompt rows (16 ctx + ImageNet names) -> logits of {args.batch} images "
          "per run -> DSPT loss summed over runs -> backward; median of the timed steps; peak = memory above the "
          "model during the steps; budget in GiB, MB = MiB")
    print(table(rows))
    if result["exponents"]:
        print("\nexponents (log-log least squares):")
        for f in result["exponents"]:
            fixed = ", ".join(f"{k}={f[k]}" for k in ("model", "runs", "classes", "precision") if k in f)
            pts = ", ".join(f"{x}: {y:.2f} s" for x, y in f["points"])
            print(f"  step time ({f['steps']}) ~ {'C' if f['vs'] == 'classes' else 'R'}^{f['exponent']:.2f} at "
                  f"{fixed} ({pts})")
    if result["targets"]:
        print("\ntargets:")
        for line in result["targets"]:
            print("  " + line)
    print(f"\nwall time {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
