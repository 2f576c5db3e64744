"""Speed of dspt's cached-feature training ("fast" path) against CoOp's own computation ("reference" path).

Both paths train the same model on the same data with the same seed and epochs, each in its own
subprocess (so that peak memory is its own) with a cold feature cache, then the table shows:

- wall time per epoch (median of the epochs after the first; the first pays one-off warm-up costs),
  total time of the run (backbone, feature caching, zero-shot, epochs, per-epoch evaluation, final eval),
  caching time, peak memory (process RSS; on GPU also torch.cuda.max_memory_allocated), test accuracy;
- warm ratio: reference epoch / fast epoch (the cache already exists: every sweep run after the first);
- cold ratio for the protocol's 200 epochs, *projected* from the measured times:
  (200 x reference epoch) / (fast caching + 200 x fast epoch), all caching charged to the fast path;
- the floor: the text tower's own forward+backward for the C prompts x steps per epoch, against the
  fast epoch (plus the same for CoOp's 77-token fp32 text side and for truncation alone).

Random weights only time things: test accuracies of random-weight runs mean nothing. `--fidelity` compares
the two paths' test accuracy where it means something: on the demo's pretrained miniature CLIP
(`dspt.demo.pretrained_miniature`) and its digit folders, over seeds and noise rates.

    python benchmarks/speed.py                      # CPU: ViT-B-32 shape, CIFAR-10 16 shots x 10 classes
    python benchmarks/speed.py --suite gpu          # RN50 and ViT-B-16 on the GPU, fast path in bf16
    python benchmarks/speed.py --model RN50 --device cuda --epochs 5
    python benchmarks/speed.py --fidelity           # accuracy of both paths on the demo's pretrained miniature
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

DEFAULT_TARBALL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10_jpeg.tar.gz"
PROTOCOL_EPOCHS = 200


# ----------------------------------------------------------------------------------------------- data

def cifar_subset(tarball: Path, work: Path, shots: int, test_per_class: int, seed: int = 0) -> Path:
    """Extract `shots` training and `test_per_class` test JPEGs per class (seeded choice) into `work`.

    Returns a folder with train/<class>/ and test/<class>/ (dspt's folder layout). Extracted once; the
    tarball is only read.
    """
    import numpy as np

    root = work / f"cifar10-k{shots}-t{test_per_class}-s{seed}"
    if (root / "COMPLETE").is_file():
        return root
    if not tarball.is_file():
        sys.exit(f"CIFAR-10 archive '{tarball}' not found; pass --data-tarball PATH")
    shutil.rmtree(root, ignore_errors=True)
    with tarfile.open(tarball, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        groups: dict[tuple[str, str], list[tarfile.TarInfo]] = {}
        for m in members:
            parts = Path(m.name).parts  # cifar10_jpeg/<split>/<class>/<file>.jpg
            if len(parts) >= 4 and parts[-3] in ("train", "test"):
                groups.setdefault((parts[-3], parts[-2]), []).append(m)
        rng = np.random.default_rng(seed)
        chosen = []
        for (split, cls), group in sorted(groups.items()):
            k = shots if split == "train" else test_per_class
            group = sorted(group, key=lambda m: m.name)
            if len(group) < k:
                sys.exit(f"class '{cls}' of the {split} split has {len(group)} images, fewer than {k}")
            chosen += [(split, cls, group[i]) for i in sorted(rng.choice(len(group), k, replace=False))]
        for split, cls, m in sorted(chosen, key=lambda c: c[2].offset_data):  # forward reads only
            dest = root / split / cls / Path(m.name).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(tar.extractfile(m).read())
    (root / "COMPLETE").write_text("ok\n")
    return root


# --------------------------------------------------------------------------------------------- worker

def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def text_tower_seconds(run_dir: Path, cfg, reps: int) -> dict:
    """Forward+backward (w.r.t. the context) of the text tower over the C class prompts, per variant."""
    from dspt.backbone import load_backbone
    from dspt.prompt import PromptClassifier
    from dspt.train import load_prompt

    backbone = load_backbone(cfg.model, cfg.pretrained, cfg.checkpoint, cfg.device, cfg.precision)
    learner = load_prompt(run_dir, backbone=backbone).learner
    variants = {
        "fast": dict(),  # truncated + shared prefix + the run's precision
        "truncated": dict(share_prefix=False),
        "coop": dict(truncate=False, share_prefix=False, mixed_precision=False),  # 77 tokens, fp32
    }
    out = {}
    for name, kw in variants.items():
        clf = PromptClassifier(backbone, learner, **kw)
        times = []
        for _ in range(reps + 1):  # the first is warm-up
            learner.ctx.grad = None
            _sync(backbone.device)
            t0 = time.perf_counter()
            clf.text_features().sum().backward()
            _sync(backbone.device)
            times.append(time.perf_counter() - t0)
        out[name] = {"seconds": statistics.median(times[1:]), "tokens": clf.length, "shared_prefix": clf.prefix}
    return out


def worker(spec: dict) -> dict:
    import resource

    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from dspt.config import RunConfig
    from dspt.io import read_jsonl
    from dspt.train import train

    cfg = RunConfig(**spec["cfg"]).resolved()
    shutil.rmtree(cfg.output, ignore_errors=True)  # a finished run would just be returned: start fresh
    shutil.rmtree(cfg.cache_dir, ignore_errors=True)  # cold cache: caching is timed
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    metrics = train(cfg)
    total = time.perf_counter() - t0
    epochs = [r["seconds"] for r in read_jsonl(Path(cfg.output) / "log.jsonl") if r.get("event") == "epoch"]
    n = metrics["n_train"]
    out = {
        "path": cfg.path,
        "epochs": epochs,
        "epoch_s": statistics.median(epochs[1:] if len(epochs) > 1 else epochs),
        "total_s": total,
        "cache_s": metrics["seconds"]["cache"],
        "test_acc": metrics["test_acc"],
        "zeroshot_acc": metrics["zeroshot_acc"],
        "n_train": n,
        "n_test": metrics["n_test"],
        "classes": metrics["classes"],
        "steps": n // cfg.batch_size if n >= cfg.batch_size else 1,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "threads": torch.get_num_threads(),
        "load": load,
    }
    if cuda:
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu"] = torch.cuda.get_device_name()
    if spec.get("text_reps"):
        out["text"] = text_tower_seconds(Path(cfg.output), cfg, spec["text_reps"])
    return out


def run_worker(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"])) if spec.get("threads") else None
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=subprocess.PIPE,
                          text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"the {spec['cfg']['path']} run failed (exit {proc.returncode}); see its output above")
    return json.loads(lines[-1][len("RESULT "):])


# ------------------------------------------------------------------------------------------- the table

def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    text = f"{platform.system()} {platform.machine()} ({cpu}), {os.cpu_count()} CPUs, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def table(args, model: str, ref: dict, fast: dict) -> str:
    gpu = "peak_gpu_mib" in fast
    rows = [("path", "epoch (s)", "total (s)", "caching (s)", "peak RSS (MiB)")
            + (("peak GPU (MiB)",) if gpu else ()) + ("test acc (%)",)]
    for name, r in (("reference (CoOp)", ref), ("fast (dspt)", fast)):
        rows.append((name, f"{r['epoch_s']:.3f}", f"{r['total_s']:.1f}", f"{r['cache_s']:.1f}",
                     f"{r['peak_rss_mib']:.0f}") + ((f"{r.get('peak_gpu_mib', float('nan')):.0f}",) if gpu else ())
                    + (f"{r['test_acc']:.1f}",))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    fmt = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    lines = [fmt(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows[1:]]

    steps, c = fast["steps"], fast["classes"]
    warm = ref["epoch_s"] / fast["epoch_s"]
    cold = PROTOCOL_EPOCHS * ref["epoch_s"] / (fast["cache_s"] + PROTOCOL_EPOCHS * fast["epoch_s"])
    weights = args.checkpoint or args.pretrained or "random weights"
    precision = args.precision if fast.get("gpu") else "fp32"
    head = [
        f"## {model} ({weights}) on {fast.get('gpu') or 'CPU'}",
        f"machine: {machine()}; torch threads {fast['threads']}; load average (1 min) before the fast / "
        f"reference run: {fast['load']:.1f} / {ref['load']:.1f} (cores shared with other processes when above 0)",
        f"data: CIFAR-10 subset, {c} classes x {args.shots} shots = {fast['n_train']} train images, "
        f"{fast['n_test']} test images; {args.epochs} epochs, batch {args.batch_size} ({steps} steps/epoch), "
        f"n_ctx {args.n_ctx}, seed {args.seed}",
        f"fast: {args.views} cached augmented views + 1 plain, prompts cut after the last EOS, shared prefix, "
        f"{precision}; reference: online augmentation through the image tower, 77 tokens, fp32",
        "epoch = median of the epochs after the first; total = the whole run (backbone, caching, zero-shot, "
        "epochs, per-epoch and final evaluation); caching = train and test features, cold cache",
        "",
    ]
    text = fast["text"]
    tail = [
        "",
        "epoch times (s): reference " + ", ".join(f"{t:.3f}" for t in ref["epochs"])
        + "; fast " + ", ".join(f"{t:.3f}" for t in fast["epochs"]),
        f"warm ratio (reference epoch / fast epoch): {ref['epoch_s']:.3f} s / {fast['epoch_s']:.3f} s = {warm:.1f}x",
        f"cold ratio, {args.shots} shots x {PROTOCOL_EPOCHS} epochs, PROJECTED from the measured times: "
        f"({PROTOCOL_EPOCHS} x {ref['epoch_s']:.3f} s) / ({fast['cache_s']:.1f} s caching + {PROTOCOL_EPOCHS} x "
        f"{fast['epoch_s']:.3f} s) = {cold:.1f}x",
        f"text tower forward+backward over the {c} prompts, per step (median of {args.text_reps}):",
        f"  fast (shared prefix {text['fast']['shared_prefix']} + tail, {text['fast']['tokens']} tokens): "
        f"{text['fast']['seconds'] * 1000:.1f} ms",
        f"  truncated only ({text['truncated']['tokens']} tokens): {text['truncated']['seconds'] * 1000:.1f} ms",
        f"  CoOp ({text['coop']['tokens']} tokens, fp32): {text['coop']['seconds'] * 1000:.1f} ms "
        f"-> {steps} steps = {steps * text['coop']['seconds']:.3f} s of the reference epoch's "
        f"{ref['epoch_s']:.3f} s",
        f"floor (fast text fwd+bwd x {steps} steps): {steps * text['fast']['seconds']:.3f} s; fast epoch "
        f"{fast['epoch_s']:.3f} s = {fast['epoch_s'] / (steps * text['fast']['seconds']):.2f}x the floor",
        f"test accuracy: reference {ref['test_acc']:.1f} %, fast {fast['test_acc']:.1f} % "
        f"(zero-shot {fast['zeroshot_acc']:.1f} %)"
        + ("; random weights: accuracies mean nothing here" if not (args.checkpoint or args.pretrained) else ""),
    ]
    return "\n".join(head + lines + tail)


def bench_model(args, model: str, data: Path) -> dict:
    tag = f"{model}-{args.device}-{args.precision}-e{args.epochs}-v{args.views}"
    common = dict(data=str(data), model=model, pretrained=args.pretrained, checkpoint=args.checkpoint,
                  shots=args.shots, epochs=args.epochs, batch_size=args.batch_size, views=args.views,
                  n_ctx=args.n_ctx, seed=args.seed, noise=args.noise, noise_rate=args.noise_rate, loss=args.loss,
                  device=args.device, progress=False, results=str(args.work / "runs" / "results.csv"))
    specs = {}
    for path in ("fast", "reference"):
        precision = args.precision if path == "fast" else "fp32"  # the reference is CoOp's fp32 computation
        specs[path] = {"cfg": dict(common, path=path, precision=precision,
                                   output=str(args.work / "runs" / f"{tag}-{path}"),
                                   cache_dir=str(args.work / "cache" / f"{tag}-{path}")),
                       "text_reps": args.text_reps if path == "fast" else 0, "threads": args.threads}
    print(f"[{model}] fast path (cold cache) ...", file=sys.stderr, flush=True)
    fast = run_worker(specs["fast"])
    print(f"[{model}] reference path ...", file=sys.stderr, flush=True)
    ref = run_worker(specs["reference"])
    report = table(args, model, ref, fast)
    print(report, flush=True)
    return {"model": model, "fast": fast, "reference": ref, "table": report}


# ------------------------------------------------------------------------------------------- fidelity

def fidelity(args) -> dict:
    """Test accuracy of the two paths on the demo's pretrained miniature CLIP (where accuracy means something):
    same data, seeds, noise and epochs; mean over seeds per noise rate."""
    import statistics as st

    from dspt.config import RunConfig
    from dspt.demo import VIEWS, pretrained_miniature
    from dspt.train import train

    print("[fidelity] pretrained miniature CLIP (reused from the dspt cache when `dspt demo` built it) ...",
          file=sys.stderr, flush=True)
    world = pretrained_miniature(seed=0, progress=False)
    base = dict(model=world["model"], pretrained=None, checkpoint=str(world["checkpoint"]), data=str(world["tune"]),
                test_data=str(world["test"]), shots=args.shots, epochs=args.fidelity_epochs, views=args.views,
                batch_size=args.batch_size, noise="sym", loss=args.loss, device=args.device,
                progress=False, cache_dir=str(args.work / "fidelity" / "cache"), lr=args.fidelity_lr,
                ctx_init="a photo of a", template="a photo of a {}.",  # the phrase sets the context length
                results=str(args.work / "fidelity" / "results.csv"), **VIEWS)  # the demo's digit-safe views
    rows = []
    for rate in args.fidelity_noise:
        for seed in args.fidelity_seeds:
            row = {"noise_rate": rate, "seed": seed}
            for path in ("reference", "fast"):
                out = args.work / "fidelity" / "runs" / f"{args.loss}-n{rate:g}-s{seed}-e{args.fidelity_epochs}-{path}"
                shutil.rmtree(out, ignore_errors=True)
                print(f"[fidelity] noise {rate:g} seed {seed} {path} ...", file=sys.stderr, flush=True)
                m = train(RunConfig(**base, seed=seed, noise_rate=rate, path=path,
                                    precision=args.precision if path == "fast" else "fp32", output=str(out)))
                row[path], row["zeroshot"] = m["test_acc"], m["zeroshot_acc"]
                row[f"{path}_train_s"] = m["seconds"]["train"]
            rows.append(row)
    lines = [f"## Fidelity on the demo's miniature pretrained CLIP ({world['model']}, checkpoint "
             f"{Path(world['checkpoint']).name}); not real CLIP",
             f"data: {world['tune']} (tune, {args.shots} shots/class) and {world['test']} (test); loss {args.loss}, "
             f"sym noise, {args.fidelity_epochs} epochs, batch {args.batch_size}, {args.views} views (fast), "
             f"lr {args.fidelity_lr:g}, context init 'a photo of a', crops {VIEWS['crop_scale']:.0%}-100 %"
             f"{'' if VIEWS['hflip'] else ', no flips'} (both paths), device {args.device}",
             "", "| noise | seed | zero-shot (%) | reference (%) | fast (%) | fast - reference |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['noise_rate']:g} | {r['seed']} | {r['zeroshot']:.1f} | {r['reference']:.1f} | "
                     f"{r['fast']:.1f} | {r['fast'] - r['reference']:+.1f} |")
    for rate in args.fidelity_noise:
        sel = [r for r in rows if r["noise_rate"] == rate]
        ref, fast = st.mean(r["reference"] for r in sel), st.mean(r["fast"] for r in sel)
        lines.append(f"| {rate:g} | mean of {len(sel)} | {st.mean(r['zeroshot'] for r in sel):.1f} | {ref:.1f} | "
                     f"{fast:.1f} | {fast - ref:+.1f} |")
    diffs = [r["fast"] - r["reference"] for r in rows]
    lines += ["", f"mean |fast - reference| over the {len(rows)} runs: {st.mean(abs(d) for d in diffs):.2f} points; "
              f"max {max(abs(d) for d in diffs):.2f}",
              f"training seconds (tiny model, not a speed figure): reference "
              f"{sum(r['reference_train_s'] for r in rows):.1f}, fast {sum(r['fast_train_s'] for r in rows):.1f}"]
    report = "\n".join(lines)
    print(report, flush=True)
    return {"fidelity": rows, "table": report}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--suite", choices=["cpu", "gpu"], default=None,
                    help="cpu: ViT-B-32 on the CPU; gpu: RN50 and ViT-B-16 on the GPU (bf16 fast path)")
    ap.add_argument("--model", action="append", help="open_clip model name (repeatable; default per suite)")
    ap.add_argument("--pretrained", default=None, help="open_clip pretrained tag (needs the hub once)")
    ap.add_argument("--checkpoint", default=None, help="local CLIP checkpoint file")
    ap.add_argument("--device", default=None, help="cpu | cuda | auto (default: per suite)")
    ap.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                    help="fast path precision on GPU (default bf16 on GPU; CPU is always fp32)")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--test-per-class", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n-ctx", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--loss", default="dspt")
    ap.add_argument("--noise", default="sym")
    ap.add_argument("--noise-rate", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads for both paths (default: torch's own); 1 is steadier on shared cores")
    ap.add_argument("--text-reps", type=int, default=3, help="repeats of the text-tower timing (median)")
    ap.add_argument("--fidelity", action="store_true",
                    help="instead of timing: test accuracy of both paths on the demo's pretrained miniature CLIP")
    ap.add_argument("--fidelity-epochs", type=int, default=50)
    ap.add_argument("--fidelity-seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--fidelity-noise", type=float, nargs="+", default=[0.0, 0.5])
    ap.add_argument("--fidelity-lr", type=float, default=0.02,
                    help="learning rate of the fidelity runs (DSPT learns on the miniature at 0.02, barely at 0.002)")
    ap.add_argument("--data-tarball", type=Path, default=DEFAULT_TARBALL)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "dspt-bench",
                    help="scratch folder for the extracted images, caches and runs (never the repository)")
    ap.add_argument("--json", type=Path, default=None, help="also write all figures to this JSON file")
    args = ap.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    import torch

    suite = args.suite or ("gpu" if args.device == "cuda" or (args.device in (None, "auto")
                                                               and torch.cuda.is_available()) else "cpu")
    if suite == "gpu" and not torch.cuda.is_available():
        sys.exit("--suite gpu needs a CUDA GPU; none is visible (run the CPU suite: --suite cpu)")
    args.device = args.device or ("cuda" if suite == "gpu" else "cpu")
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    models = args.model or (["RN50", "ViT-B-16"] if suite == "gpu" else ["ViT-B-32"])
    args.work = args.work.expanduser().resolve()
    repo = Path(__file__).resolve().parents[1]
    if args.work == repo or repo in args.work.parents:
        sys.exit(f"--work {args.work} is inside the repository; choose a scratch folder such as /tmp/dspt-bench")
    args.work.mkdir(parents=True, exist_ok=True)

    if args.fidelity:
        if args.threads:
            torch.set_num_threads(args.threads)
        results = [fidelity(args)]
    else:
        data = cifar_subset(args.data_tarball, args.work, args.shots, args.test_per_class)
        results = [bench_model(args, model, data) for model in models]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
