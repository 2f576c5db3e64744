"""A training step of every prompt learner against CoOp's fast path at the same shapes: time and memory.

    .venv/bin/python benchmarks/learners.py                 # CPU: ViT-B-16 (random weights), 10 and 100 classes
    .venv/bin/python benchmarks/learners.py --suite gpu     # GPU: fp32 and bf16, batch 4 and 32

Each case is timed by the planner's own step (`dspt.plan.time_shape`: a warm-up, then `--steps` steps of the
learner's arithmetic on a random init of the model: CoOp and KgCoOp on cached features through the batched text
path, CoCoOp's B x C image-conditioned prompts, VPT's and MaPLe's image tower with gradients on a minibatch of
pixels). Memory above the model is measured on a GPU (peak allocated) and, on the CPU, projected from the bytes
autograd saves in a step (as `dspt train --plan` does). Ratios are against CoOp in the same run and shape.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--classes", default="10,100")
    ap.add_argument("--batch", default="4", help="minibatch sizes (comma list)")
    ap.add_argument("--learners", default="coop,kgcoop,cocoop,vpt,vpt-deep,maple")
    ap.add_argument("--precisions", default=None, help="default: fp32 (cpu), fp32,bf16 (gpu)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.suite == "gpu" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("learners.py --suite gpu: no CUDA device here", file=sys.stderr)
        return 2
    precisions = (args.precisions or ("fp32,bf16" if device == "cuda" else "fp32")).split(",")

    from dspt.config import RunConfig
    from dspt.plan import PLACEHOLDER_NAME, RunShape, time_shape

    rows = []
    print(f"{'learner':<9} {'prec':<4} {'C':>5} {'B':>4} {'step s':>8} {'x coop':>7} {'peak GB':>8} {'x coop':>7}")
    for precision in precisions:
        for classes in [int(c) for c in args.classes.split(",")]:
            for batch in [int(b) for b in args.batch.split(",")]:
                base = None
                for learner in args.learners.split(","):
                    cfg = RunConfig(data="/unused", model=args.model, pretrained=None, learner=learner, shots=16,
                                    batch_size=batch, precision=precision, device=device, epochs=1,
                                    loss="dspt").resolved(need_data=False)
                    shape = RunShape(classes, 16 * classes, 0, 0, (PLACEHOLDER_NAME,) * classes, 1)
                    t0 = time.perf_counter()
                    timing = time_shape(cfg, shape, 1, None, args.steps)
                    row = {"learner": learner, "precision": precision, "classes": classes, "batch": batch,
                           "step_s": timing.step_s, "peak_gb": timing.step_peak_bytes / 2**30,
                           "wall_s": time.perf_counter() - t0, "device": device, "model": args.model}
                    if learner == "coop":
                        base = row
                    ratio_t = row["step_s"] / base["step_s"] if base else float("nan")
                    ratio_m = row["peak_gb"] / base["peak_gb"] if base and base["peak_gb"] else float("nan")
                    row.update(step_vs_coop=ratio_t, peak_vs_coop=ratio_m)
                    rows.append(row)
                    print(f"{learner:<9} {precision:<4} {classes:>5} {batch:>4} {row['step_s']:>8.3f} "
                          f"{ratio_t:>6.1f}x {row['peak_gb']:>8.3f} {ratio_m:>6.1f}x", flush=True)
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch threads "
          f"{torch.get_num_threads()}, model {args.model} (random weights), {args.steps} timed step(s) after one "
          "warm-up; the text side of CoOp and KgCoOp is the fast path (truncated, shared prefix)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
