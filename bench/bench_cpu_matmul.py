"""Benchmark: fp32 CPU matmuls through torch's default BLAS against oneDNN (model.CPU_ONEDNN_MATMUL).

Two measurements, side by side in one run:
1. The matmuls of the shipped CPU recipe's phase-2 step (configs/distill_smollm2_cpu_30min.yaml: 2 x 256 tokens,
   SmolLM2-135M widths, a 512-neuron SwiGLU student layer) and of its init's least-squares statistics, each
   timed as torch's `@` and as `model.matmul`, alternating, in this process; GFLOP/s and the largest error of
   each against an fp64 product, relative to the product's largest entry.
2. The whole phase-2 step (bench_allocator.recipe_step: teacher forward, student forward and backward, the
   full-vocabulary KD head loss, AdamW on the MLPs), in child processes that alternate torch's default and
   oneDNN, because this machine's speed drifts within minutes. Both keep freed memory, as distill.py does.

    python bench/bench_cpu_matmul.py                      # 3 rounds x 10 steps, about 3 minutes on 2 cores
    python bench/bench_cpu_matmul.py --rounds 2 --steps 20
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import model  # noqa: E402
import runtime  # noqa: E402
from bench_allocator import alternate_children, recipe_step, time_steps  # noqa: E402

# (name, rows, inner, cols) of A (rows x inner) @ B (inner x cols); "T" marks a B that is a transposed weight
SHAPES = [("qkv forward", 512, 576, 960, "T"), ("attention out forward", 512, 576, 576, "T"),
          ("SwiGLU gate|up forward", 512, 576, 1024, "T"), ("SwiGLU down forward", 512, 512, 576, "T"),
          ("down: input gradient", 512, 576, 512, ""), ("down: weight gradient", 576, 512, 512, ""),
          ("head forward", 512, 576, 49152, "T"), ("head: input gradient", 512, 49152, 576, ""),
          ("init: A^T A of 1,536 teacher neurons", 1536, 512, 1536, "")]


def shape_table(reps_seconds=0.5):
    torch.manual_seed(0)
    print(f"{'matmul':38s} {'shape':>20s} {'torch @':>10s} {'oneDNN':>10s} {'speed-up':>8s} {'error torch / oneDNN':>22s}")
    for name, m, k, n, kind in SHAPES:
        a = torch.randn(m, k)
        b = torch.randn(n, k).t() if kind == "T" else torch.randn(k, n)
        exact = a.double() @ b.double()
        results = {}
        for label, f in [("torch", lambda: a @ b), ("onednn", lambda: model.matmul(a, b))]:
            results[label] = {"error": ((f().double() - exact).abs().max() / exact.abs().max()).item(), "s": []}
        for _ in range(3):  # alternating rounds, the best of each
            for label, f in [("torch", lambda: a @ b), ("onednn", lambda: model.matmul(a, b))]:
                t0, n_calls = time.perf_counter(), 0
                while time.perf_counter() - t0 < reps_seconds:
                    f()
                    n_calls += 1
                results[label]["s"].append((time.perf_counter() - t0) / n_calls)
        gflops = {label: 2 * m * k * n / min(r["s"]) / 1e9 for label, r in results.items()}
        print(f"{name:38s} {f'{m}x{k} @ {k}x{n}':>20s} {gflops['torch']:8.0f} GF {gflops['onednn']:8.0f} GF "
              f"{gflops['onednn'] / gflops['torch']:7.2f}x {results['torch']['error']:10.1e} / "
              f"{results['onednn']['error']:.1e}", flush=True)


def child(variant, steps):
    model.CPU_ONEDNN_MATMUL = model.CPU_ONEDNN_MATMUL and variant == "onednn"
    runtime.keep_freed_memory()
    seconds = time_steps(recipe_step(), steps)
    print(json.dumps({"variant": variant, "step_seconds": seconds, "steps": steps, "onednn": model.CPU_ONEDNN_MATMUL,
                      "threads": torch.get_num_threads()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternating (torch, oneDNN) pairs of child processes")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per child, after one warm-up step")
    parser.add_argument("--child", choices=["torch", "onednn"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps)
        return
    if not model.CPU_ONEDNN_MATMUL:
        sys.exit("this torch build has no oneDNN linear op (torch.ops.mkldnn._linear_pointwise): nothing to compare")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {torch.backends.cpu.get_cpu_capability()}")
    shape_table()
    results = alternate_children(__file__, ["torch", "onednn"], args.rounds, args.steps)
    step = {v: statistics.median(r["step_seconds"] for r in rs) for v, rs in results.items()}
    print(f"CPU phase-2 step (the 30-minute recipe's shape): torch's default matmuls {step['torch']:.3f} s, oneDNN "
          f"{step['onednn']:.3f} s ({step['torch'] / step['onednn']:.2f}x faster); medians over {args.rounds} "
          f"alternating rounds")


if __name__ == "__main__":
    main()
