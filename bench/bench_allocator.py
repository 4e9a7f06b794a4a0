"""Benchmark: a CPU phase-2 step with glibc malloc's defaults against runtime.keep_freed_memory().

The step is the shipped CPU recipe's (configs/distill_smollm2_cpu_30min.yaml): the SmolLM2-135M teacher's forward,
the student's (its MLP widths from the recipe) forward and backward, the full-vocabulary KD head loss, AdamW on
the MLPs, batch 2 x 256. Random weights: the time and memory do not depend on them. glibc reads its malloc
settings once per process and never forgets them, so each variant runs in its own child process; the children
alternate (default, kept, default, kept, ...) because this machine's speed drifts within minutes. Each child
reports the median time of its timed steps (after a warm-up step) and its peak RSS.

    python bench/bench_allocator.py                      # 3 rounds x 10 steps, about 4 minutes on 2 cores
    python bench/bench_allocator.py --rounds 2 --steps 20
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import losses  # noqa: E402
import runtime  # noqa: E402
from bench_distill import smollm2_teacher  # noqa: E402
from student import build_student, phase2_target, set_trainable, student_config  # noqa: E402

RECIPE = os.path.join(REPO, "configs", "distill_smollm2_cpu_30min.yaml")


def recipe_step():
    """The shipped CPU recipe's phase-2 step with random weights, as a function that runs one step."""
    with open(RECIPE) as f:
        recipe = yaml.safe_load(f)
    teacher = smollm2_teacher()
    config = student_config(teacher.config, recipe["mlp_kind"], recipe["mlp_hidden"], recipe["mlp_layers"])
    student, _ = build_student(teacher, config)
    params = set_trainable(student, phase2_target(student, recipe["train_params"]))
    optimizer = torch.optim.AdamW(params, lr=recipe["lr"])
    x = torch.randint(0, config.vocab_size, (recipe["batch_size"], recipe["seq_len"]))
    y = torch.randint(0, config.vocab_size, (recipe["batch_size"], recipe["seq_len"]))

    def step():
        hidden = student(x).flatten(0, 1)
        with torch.no_grad():
            teacher_side = (teacher(x).flatten(0, 1), teacher.lm_head.weight)
        loss, _, _ = losses.head_loss(hidden, student.lm_head.weight, y.reshape(-1), teacher=teacher_side, alpha=1.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def time_steps(step, steps):
    """Median seconds of `steps` calls of `step`, after one warm-up call (the first pays for first-touch
    allocations in every variant)."""
    step()
    seconds = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)


def child(variant, steps):
    """One process: `steps` timed phase-2 steps (after one warm-up step) under `variant`'s malloc settings."""
    if variant == "kept":
        runtime.keep_freed_memory()
    seconds = time_steps(recipe_step(), steps)
    print(json.dumps({"variant": variant, "step_seconds": seconds, "steps": steps,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "threads": torch.get_num_threads()}))


def alternate_children(script, variants, rounds, steps, describe=lambda r: ""):
    """Run `script --child VARIANT --steps N` once per variant in each of `rounds` rounds, alternating, since this
    machine's speed drifts within minutes; each child prints one JSON line last. Returns {variant: [results]}."""
    results = {v: [] for v in variants}
    for round_ in range(rounds):
        for variant in variants:
            proc = subprocess.run([sys.executable, script, "--child", variant, "--steps", str(steps)],
                                  capture_output=True, text=True, check=True)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results[variant].append(r)
            print(f"  round {round_}: {variant:7s} {r['step_seconds']:.3f} s/step (median of {r['steps']}) | "
                  f"{describe(r)}{r['threads']} threads", flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternating (default, kept) pairs of child processes")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per child, after one warm-up step")
    parser.add_argument("--child", choices=["default", "kept"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps)
        return
    results = alternate_children(__file__, ["default", "kept"], args.rounds, args.steps,
                                 lambda r: f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB | ")
    step = {v: statistics.median(r["step_seconds"] for r in rs) for v, rs in results.items()}
    rss = {v: max(r["peak_rss_bytes"] for r in rs) for v, rs in results.items()}
    print(f"CPU phase-2 step (the 30-minute recipe's shape): glibc defaults {step['default']:.3f} s, freed memory "
          f"kept {step['kept']:.3f} s ({step['default'] / step['kept']:.2f}x faster); peak RSS "
          f"{rss['default'] / 2**30:.2f} -> {rss['kept'] / 2**30:.2f} GiB ({rss['kept'] / rss['default'] - 1:+.0%}); "
          f"medians over {args.rounds} alternating rounds")


if __name__ == "__main__":
    main()
