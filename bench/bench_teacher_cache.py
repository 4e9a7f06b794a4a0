"""The teacher cache against the live teacher, side by side in one run, with distill.py itself.

1. Writing: `distill.py --phases cache` over the train windows of a phase 2 and the eval's val windows, against a
   bare teacher forward (teacher.logits, no top-k, no files) over the same windows in this process.
2. Phase 2: `distill.py --phases 2` with the live teacher and with --teacher-cache, alternating (live, cache,
   live, cache): median step time (from each run's metrics.jsonl, first steps dropped) and peak RSS of each
   process (its own process, so one run's memory does not hide the other's).
3. Accuracy: on the val windows, per token, the KL of the distilled student from (a) the cache at float16,
   bfloat16 and float32 against (b) the live top-k KL and (c) the full-vocabulary KL, and the top-k/full ratio
   for several k (which k to store).

Needs a real teacher dir and a prepared data dir made with its tokenizer (bench_quality.py makes both):

    python bench/bench_teacher_cache.py --teacher bench/out/quality/teacher --data-dir bench/out/quality/data
    python bench/bench_teacher_cache.py --teacher ... --data-dir ... --part write     # part 1 only
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import losses  # noqa: E402
import teacher_cache  # noqa: E402
from data import TokenLoader, val_batches  # noqa: E402
from hf_interop import load_model  # noqa: E402


def distill(out, *args):
    """distill.py in its own process; returns (seconds, peak RSS MiB of that process, stdout)."""
    cmd = [sys.executable, "-c", "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
           "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)",
           sys.executable, os.path.join(REPO, "distill.py"), *map(str, args)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"distill.py {' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rss = int(proc.stdout.strip().splitlines()[-1].split()[-1]) / 1024
    with open(os.path.join(out, "log.txt"), "a") as f:
        f.write(proc.stdout)
    return seconds, rss, proc.stdout


def step_seconds(run_dir, skip, tokens_per_step):
    """Median seconds per phase-2 step, from the run's own per-step tokens/s."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [r for r in records if r.get("phase") == 2 and "loss" in r]
    return statistics.median(tokens_per_step / r["tokens_per_s"] for r in steps[skip:])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", default=os.path.join(REPO, "bench", "out", "teacher_cache"))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=2, help="first phase-2 steps of each run left out of the median")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=8193)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--part", choices=["all", "write"], default="all", help="write: only part 1")
    a = p.parse_args()
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    torch.set_num_threads(os.cpu_count())
    common = ["--teacher", a.teacher, "--data-dir", a.data_dir, "--device", "cpu", "--dtype", "float32",
              "--batch-size", a.batch_size, "--seq-len", a.seq_len, "--eval-tokens", a.eval_tokens,
              "--phases", "2", "--max-steps", a.steps, "--checkpoint-every", 0, "--top-k", a.k, "--alpha", 1.0,
              "--warmup-steps", 2, "--log-every", 1000, "--plot", "false", "--num-batches", 16]
    window = a.batch_size * a.seq_len
    report = {"settings": vars(a)}

    # 1. writing the cache vs a bare teacher forward over the same windows
    caches, write_seconds = {}, {}
    for dtype in ("float16", "bfloat16", "float32"):
        caches[dtype] = os.path.join(a.out, f"cache_{dtype}")
        _, _, out = distill(a.out, *common, "--phases", "cache", "--teacher-cache", caches[dtype],
                            "--cache-k", a.k, "--cache-dtype", dtype, "--cache-from", 0)
        write_seconds[dtype] = float(re.search(r"teacher cache written: [\d,]+ tokens in ([\d.]+)s", out).group(1))
    report["write_seconds"] = write_seconds
    teacher, _ = load_model(a.teacher)
    teacher.eval()
    n_train = a.steps * window
    loader = TokenLoader(a.data_dir, "train", a.batch_size, a.seq_len)
    t0 = time.perf_counter()
    with torch.no_grad():
        for offset in range(0, n_train, window):
            teacher.logits(loader.window_at(offset)[0])
        val = list(val_batches(a.data_dir, a.batch_size, a.seq_len, a.eval_tokens))
        for x, _ in val:
            teacher.logits(x)
    bare = time.perf_counter() - t0
    tokens = n_train + len(val) * window
    manifest = teacher_cache.TeacherCache(caches["float16"]).manifest
    report["bare_forward"] = {"seconds": bare, "tokens": tokens}
    print(f"tokens cached: {tokens:,} (train {n_train:,}, val {len(val) * window:,})")
    print(f"bare teacher forward: {bare:.1f} s ({tokens / bare:,.0f} tok/s)")
    for d, s in write_seconds.items():
        print(f"distill.py --phases cache ({d}): {s:.1f} s writing ({tokens / s:,.0f} tok/s) -> {bare / s:.2f}x "
              f"the bare forward's speed")

    if a.part == "write":
        return

    # 2. phase 2: live teacher vs cache, alternating, from the same student checkpoint (so that the cached run
    # has no reason to load the teacher at all: a student from phase 1 is the real case)
    start = os.path.join(a.out, "start")
    distill(a.out, *common, "--run-dir", start, "--max-steps", 1, "--alpha", 0)
    common += ["--init-from", os.path.join(start, "step_000001.pt")]
    times = {"live": [], "cache": []}
    rss = {"live": [], "cache": []}
    for r in range(a.rounds):
        for kind in ("live", "cache"):
            run_dir = os.path.join(a.out, f"run_{kind}_{r}")
            extra = ["--teacher-cache", caches["float16"]] if kind == "cache" else []
            _, peak, _ = distill(a.out, *common, "--run-dir", run_dir, *extra)
            times[kind].append(step_seconds(run_dir, a.skip, window))
            rss[kind].append(peak)
    live, cached = min(times["live"]), min(times["cache"])
    teacher_mib = sum(t.numel() * t.element_size() for t in teacher.state_dict().values()) / 2**20
    report["phase2"] = {"step_seconds": times, "peak_rss_mib": rss, "teacher_weights_mib": teacher_mib}
    print(f"phase-2 step (B={a.batch_size}, T={a.seq_len}, top-{a.k}): live teacher {live:.2f} s, cache "
          f"{cached:.2f} s -> {live / cached:.2f}x faster")
    print(f"peak RSS: live {max(rss['live']):,.0f} MiB, cache {max(rss['cache']):,.0f} MiB "
          f"(-{max(rss['live']) - max(rss['cache']):,.0f} MiB; the teacher's weights are {teacher_mib:,.0f} MiB)")

    # 3. accuracy of stored log-probs, and what k loses against the full KL
    student, _ = load_model(os.path.join(a.out, "run_cache_0", f"step_{a.steps:06d}.pt"))
    student.eval()
    opened = {d: teacher_cache.TeacherCache(c) for d, c in caches.items()}
    sums = {key: 0.0 for key in ("full", *[f"live_top{k}" for k in (8, 16, 32, 64, 128)], *caches)}
    gaps = {d: 0.0 for d in caches}
    worst = {d: 0.0 for d in caches}
    n = 0
    with torch.no_grad():
        for w, (x, _) in enumerate(val):
            ls = student.logits(x).flatten(0, 1).float()
            lt = teacher.logits(x).flatten(0, 1).float()
            sums["full"] += losses.kl_full(ls, lt).sum().item()
            for k in (8, 16, 32, 64, 128):
                sums[f"live_top{k}"] += losses.kl_topk(ls, lt, k).sum().item()
            live_k = losses.kl_topk(ls, lt, a.k)
            for d, cache in opened.items():
                kl = losses.kl_cached(ls, *cache.entries("val", w * window, window))
                sums[d] += kl.sum().item()
                gaps[d] += (kl - live_k).abs().sum().item()
                worst[d] = max(worst[d], (kl - live_k).abs().max().item())
            n += len(ls)
    report["accuracy"] = {"mean_kl": {k: v / n for k, v in sums.items()}, "mean_abs_gap_vs_live": {
        d: g / n for d, g in gaps.items()}, "max_abs_gap_vs_live": worst, "tokens": n}
    print(f"val KL of the student after {a.steps} cached steps, per token over {n:,} tokens: full vocab "
          f"{sums['full'] / n:.4f}; live top-k + tail: " + ", ".join(
              f"k={k} {sums[f'live_top{k}'] / n:.4f} ({sums[f'live_top{k}'] / sums['full']:.1%})"
              for k in (8, 16, 32, 64, 128)))
    for d in caches:
        print(f"cache {d}: KL {sums[d] / n:.5f}, |cache - live top-{a.k}| mean {gaps[d] / n:.2e}, max "
              f"{worst[d]:.2e} nats/token")
    vocab = manifest["teacher"]["config"]["vocab_size"]
    id_bytes = 2 if vocab <= 2**16 else 4
    for k in (16, 32, 64):
        for d, b in (("float16", 2), ("float32", 4)):
            per = k * id_bytes + (k + 2) * b
            print(f"k={k} {d}: {per} bytes/token -> {per * 1e9 / 1e9:,.0f} GB per 1B tokens")
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
