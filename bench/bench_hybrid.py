"""Hybrid students of SmolLM2-135M (sliding window in most layers, full attention in a few): which full layers,
and what distillation buys, on held-out text.

For each set of full-attention layers (the top N of a KL-guided ranking, evenly spaced layers, none), the
student (the teacher's weights, WINDOW elsewhere) is evaluated undistilled: val CE, KL to the teacher, top-1
agreement. With --recipe CONFIG each set is then distilled with distill.py and that config (same budget), and the
final eval is read back from the run's metrics.jsonl.

    python bench/bench_hybrid.py --teacher bench/out/quality/teacher --data-dir bench/out/quality/data \\
        --selection configs/selection_smollm2_w64_t512.json [--recipe configs/distill_smollm2_hybrid_cpu_30min.yaml]
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import losses  # noqa: E402
from data import val_batches  # noqa: E402
from hf_interop import load_model  # noqa: E402
from runtime import setup_device  # noqa: E402
from student import build_student, student_config  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--selection", required=True)
    p.add_argument("--n-full", type=int, default=4)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--sink-tokens", type=int, help="first positions every windowed layer also sees (default: the "
                   "recipe's sink_tokens, else 0)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-tokens", type=int, default=8193)
    p.add_argument("--recipe", help="a distill.py config to run for each set (same budget)")
    p.add_argument("--sets", default="ranked,even", help="which sets to distill with --recipe: ranked,even,none")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "out", "hybrid"))
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if a.sink_tokens is None:
        a.sink_tokens = (yaml.safe_load(open(a.recipe)) or {}).get("sink_tokens", 0) if a.recipe else 0
    ranking = json.load(open(a.selection))["ranking"]
    n_layer = 30
    sets = {"ranked": sorted(ranking[:a.n_full]),
            "even": [round(i * (n_layer - 1) / (a.n_full - 1)) for i in range(a.n_full)], "none": []}
    teacher, _ = load_model(a.teacher)
    teacher.eval().requires_grad_(False)
    env = setup_device("cpu")
    ctx = torch.autocast("cpu", enabled=False)
    batches = list(val_batches(a.data_dir, a.batch_size, a.seq_len, a.eval_tokens))
    teacher_hidden = losses.teacher_val_hidden(teacher, batches, ctx)
    results = {}
    for name, full in sets.items():
        student, _ = build_student(teacher, student_config(teacher.config, "keep", window=a.window,
                                                          full_attn_layers=full, sink_tokens=a.sink_tokens))
        result = losses.evaluate(student, batches, env, ctx, teacher=teacher, teacher_hidden=teacher_hidden)
        results[name] = {"full_attn_layers": full, "undistilled": result}
        print(f"{name:6s} full {full}: undistilled val CE {result['val_ce']:.4f} (teacher {result['teacher_ce']:.4f},"
              f" {result['val_ce'] - result['teacher_ce']:+.3f}) | KL {result['kl']:.4f} | top-1 "
              f"{result['top1_agree']:.1%}", flush=True)
    if a.recipe:
        for name in a.sets.split(","):
            run_dir = os.path.join(a.out, f"recipe_{name}")
            t0 = time.perf_counter()
            cmd = [sys.executable, os.path.join(REPO, "distill.py"), "--config", a.recipe, "--teacher", a.teacher,
                   "--data-dir", a.data_dir, "--run-dir", run_dir, "--full-attn-layers", json.dumps(sets[name]),
                   "--sink-tokens", str(a.sink_tokens)]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            minutes = (time.perf_counter() - t0) / 60
            with open(os.path.join(a.out, f"recipe_{name}.log"), "w") as f:
                f.write(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed; see {a.out}/recipe_{name}.log")
            evals = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
            evals = [r for r in evals if r.get("event") == "eval"]
            after_phase1 = [r for r in evals if r["phase"] == 1][-1]
            final = evals[-1]
            results[name].update(after_phase1=after_phase1, final=final, wall_minutes=minutes)
            print(f"{name:6s} recipe ({minutes:.1f} min): after phase 1 CE {after_phase1['val_ce']:.4f} KL "
                  f"{after_phase1['kl']:.4f} | final CE {final['val_ce']:.4f} ({final['val_ce'] - final['teacher_ce']:+.3f})"
                  f" KL {final['kl']:.4f} top-1 {final['top1_agree']:.1%}", flush=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
