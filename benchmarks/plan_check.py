"""Does `--plan` project what the runs then take? The plan of a grid against the same grid run for real.

Two grids, each planned (`dspt.plan.plan_runs`, as `dspt sweep --plan` does) and then run through `dspt sweep`
in this process, from a cold feature cache:

- demo: one tuning seed of the demo's grid: its miniature CLIP (`dspt-tiny`, contrastively pretrained;
  `dspt.miniature`) on its digits, one thread, 16 shots, 30 epochs, 10 views, sym noise at 0-80 %, CE and DSPT,
  four learning rates: 40 runs, one batch;
- vitb32: ViT-B-32's architecture (random weights) on a CIFAR-10 subset from ../shared/data (16 shots x 10
  classes, 10 test images per class), two threads, 3 epochs, 2 views, CE and DSPT x two seeds: 4 runs, one batch.

For each it prints the projected and the measured training time of every batch (the batch's wall time that
each run records in metrics.json), the feature-cache time, the whole sweep's time, and measured / projected.
The plan's own time (timing its shapes) is printed too: it is what a plan costs.

    python benchmarks/plan_check.py                 # both grids, about 5 minutes on 2 CPU cores
    python benchmarks/plan_check.py --grids demo --json plan_check.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_TARBALL = HERE.parents[1] / "shared" / "data" / "cifar10_jpeg.tar.gz"


def demo_grid(work: Path) -> tuple[dict, int]:
    from dspt.miniature import DEMO_MODEL, VIEWS, pretrained_miniature

    world = pretrained_miniature(0, None, progress=False)
    spec = dict(model=DEMO_MODEL, pretrained=None, checkpoint=str(world["checkpoint"]), data=str(world["tune"]),
                test_data=str(world["test"]), template="a photo of a {}.", shots=16, epochs=30, views=10,
                ctx_init="a photo of a", noise="sym", noise_rate=[0.0, 0.2, 0.4, 0.6, 0.8], device="cpu",
                progress=False, cache_dir=str(work / "cache"), loss=["ce", "dspt"], lr=[0.0002, 0.002, 0.02, 0.2],
                seed=[1], **VIEWS)
    return spec, 1


def vitb32_grid(work: Path, tarball: Path) -> tuple[dict, int]:
    sys.path.insert(0, str(HERE))
    from speed import cifar_subset

    data = cifar_subset(tarball, work / "data", 16, 10)
    spec = dict(model="ViT-B-32", pretrained=None, data=str(data / "train"), test_data=str(data / "test"),
                shots=16, epochs=3, views=2, noise="sym", noise_rate=0.4, device="cpu", progress=False,
                cache_dir=str(work / "cache"), loss=["ce", "dspt"], seed=[1, 2])
    return spec, 2


def check(name: str, spec: dict, threads: int, out: Path) -> dict:
    import torch

    from dspt.plan import format_plan, plan_runs
    from dspt.sweep import list_cells, run_sweep

    torch.set_num_threads(threads)
    spec = dict(spec, output=str(out / name))
    cells = list_cells(spec)
    t0 = time.perf_counter()
    plan = plan_runs([c.config for c in cells], [c.name for c in cells])
    plan_s = time.perf_counter() - t0
    print(format_plan(plan))
    t0 = time.perf_counter()
    res = run_sweep(spec, jobs=1, echo=lambda line: None)
    wall = time.perf_counter() - t0
    if res.failed:
        raise SystemExit(f"{name}: runs failed: {res.failed}")
    metrics = {c.name: json.loads((c.run_dir / "metrics.json").read_text()) for c in cells}
    batches = []
    for b in plan.batches:
        m = metrics[b.names[0]]
        batches.append({"runs": len(b.names), "projected_train_s": b.train_s, "measured_train_s": m["seconds"]["batch"],
                        "ratio": m["seconds"]["batch"] / b.train_s})
    cache = sum(m["seconds"]["cache"] for m in metrics.values())
    record = {"grid": name, "threads": threads, "runs": len(cells), "plan_s": plan_s, "batches": batches,
              "projected_cache_s": plan.encode_s, "measured_cache_s": cache,
              "projected_total_s": plan.total_s, "measured_total_s": wall, "total_ratio": wall / plan.total_s}
    print(f"\n{name}: {len(cells)} runs, {threads} thread(s); the plan took {plan_s:.1f} s")
    for i, b in enumerate(batches):
        print(f"  batch {i + 1} ({b['runs']} runs): training projected {b['projected_train_s']:.1f} s, measured "
              f"{b['measured_train_s']:.1f} s, measured/projected {b['ratio']:.2f}")
    print(f"  feature cache: projected {plan.encode_s:.1f} s, measured {cache:.1f} s (every run's preparation)")
    print(f"  whole sweep: projected {plan.total_s:.1f} s, measured {wall:.1f} s, measured/projected "
          f"{record['total_ratio']:.2f}\n")
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grids", nargs="+", default=["demo", "vitb32"], choices=["demo", "vitb32"])
    ap.add_argument("--data-tarball", type=Path, default=DEFAULT_TARBALL)
    ap.add_argument("--threads", type=int, help="torch threads for every grid (default: demo 1, vitb32 2)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    records = []
    with tempfile.TemporaryDirectory(prefix="dspt-plan-check-") as tmp:
        work = Path(tmp)
        for name in args.grids:
            spec, threads = demo_grid(work) if name == "demo" else vitb32_grid(work, args.data_tarball)
            records.append(check(name, spec, args.threads or threads, work / "sweeps"))
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "grids": records},
                                        indent=2))


if __name__ == "__main__":
    main()
