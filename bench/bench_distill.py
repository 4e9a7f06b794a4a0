"""Benchmarks for distill.py, on the SmolLM2-135M shape (random weights: speed and memory do not depend on them).

1. One phase-1 rotation (all 30 layers) with the single-pass cache, against a naive implementation that runs the
   full teacher and the full student forward (and the backward) for every step, on the same batches and steps.
   Both use LATENT=student, where the two compute the same thing (the student's own latent entering layer i),
   so the final weights are compared as well. Alternating runs; the best time of each is reported.
2. Phase-2 peak memory of the KD + CE loss, chunked (losses.head_loss) against unchunked (both models' full
   fp32 logits, F.log_softmax, autograd), forward + backward. On CPU each variant runs in its own process and
   reports its peak RSS above what it held before the loss; on a GPU, torch.cuda.max_memory_allocated.
3. (--part eval) Phase 1's per-layer evals over one rotation: the teacher's val hidden states computed once
   (losses.teacher_val_hidden) against a teacher forward in every eval; the numbers must be identical.
4. (--part kd-speed) Phase 2's head loss, forward + backward, time: losses.head_loss (chunked, the full-vocab
   KD gradient in closed form) against the textbook loss (both models' full logits, F.log_softmax, F.kl_div,
   F.cross_entropy, autograd), alternating in one process on the same inputs; the gradients must agree.

    python bench/bench_distill.py                       # 1 and 2, a few minutes on a laptop CPU
    python bench/bench_distill.py --part rotation --seq-len 256 --steps-per-layer 4
    python bench/bench_distill.py --part eval --num-batches 2 --seq-len 256 --repeats 1
    python bench/bench_distill.py --part kd-speed --batch-size-kd 4 --seq-len-kd 256 --threads 2 --repeats 5
"""
import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoints  # noqa: E402
import distill  # noqa: E402
import losses as losses_module  # noqa: E402
from layer_cache import LayerCache, batch_index, layer_loss  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from runtime import setup_device  # noqa: E402
from student import build_student, layer_target, set_trainable, student_config  # noqa: E402


def smollm2_teacher(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig()).init_weights().eval().requires_grad_(False)  # GPTConfig's defaults are SmolLM2-135M


def cached_rotation(teacher, student, tokens, steps, target, ctx, env):
    """distill.py's phase 1 (LATENT=student): its LayerCache and layer_step, without checkpoints and evals."""
    losses = []
    run = distill.Run(distill.read_settings(["--run-dir", "unused", "--target-trainable", target])[0], {}, env, ctx,
                      checkpoints.MetricsLog("unused", enabled=False), "", teacher, student)
    cache = LayerCache(teacher, student, tokens, "cpu", ctx, latent="student", target=target)
    for i in range(student.config.n_layer):
        cache.begin_layer(i, env)
        set_trainable(student, layer_target(student.blocks[i], target))
        optimizer = student.configure_optimizer(1e-3, 0.0, (0.9, 0.95), "cpu")
        for s in range(steps):
            losses.append(distill.layer_step(run, cache, optimizer, batch_index(0, 0, i, s, len(tokens)), 1e-3, s))
        cache.end_layer()
    return losses


def naive_rotation(teacher, student, tokens, steps, target, ctx, env):
    """Every step: the full teacher forward for its hidden state after layer i, the full student forward for its
    own latent and layer i's output (captured with hooks), the loss, and the backward."""
    losses = []
    for i in range(student.config.n_layer):
        block = student.blocks[i]
        set_trainable(student, layer_target(block, target))
        optimizer = student.configure_optimizer(1e-3, 0.0, (0.9, 0.95), "cpu")
        seen = {}
        hooks = [teacher.blocks[i].register_forward_hook(lambda m, a, out: seen.__setitem__("target", out)),
                 block.register_forward_hook(lambda m, a, out: seen.__setitem__("io", (a[0], out)))]
        for s in range(steps):
            x = tokens[batch_index(0, 0, i, s, len(tokens))]
            with torch.no_grad():
                teacher(x)
            student(x)
            base, out = seen["io"]  # the MSE does not depend on the base (it cancels)
            loss = layer_loss(out, seen["target"], base)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        for h in hooks:
            h.remove()
    return losses


def bench_rotation(args):
    torch.set_num_threads(args.threads)
    env = setup_device("cpu")
    ctx = torch.autocast("cpu", enabled=False)
    teacher = smollm2_teacher()
    config = student_config(teacher.config, "relu2")
    torch.manual_seed(1)
    tokens = [torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len)) for _ in range(args.num_batches)]
    print(f"phase-1 rotation: SmolLM2-135M shape ({config.n_layer} layers, n_embd {config.n_embd}), student MLP "
          f"relu2 {config.mlp_hidden[0]}, target {args.target}, latent student | {args.num_batches} batches of "
          f"{args.batch_size}x{args.seq_len}, {args.steps_per_layer} steps per layer "
          f"({config.n_layer * args.steps_per_layer} steps) | torch threads {torch.get_num_threads()}")
    initial, _ = build_student(teacher, config)
    times = {"cached": [], "naive": []}
    losses = {}
    for rep in range(args.repeats):
        for name, fn in (("cached", cached_rotation), ("naive", naive_rotation)):
            student = copy.deepcopy(initial)
            t0 = time.perf_counter()
            losses[name] = fn(teacher, student, tokens, args.steps_per_layer, args.target, ctx, env)
            times[name].append(time.perf_counter() - t0)
            print(f"  repeat {rep}: {name:6s} {times[name][-1]:8.2f} s")
    # the same computation: the step losses agree; later layers drift apart slowly, because fp32 rounding
    # flips the sign of Adam's first update on near-zero gradients and the latents carry that up the network
    rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses["cached"], losses["naive"])]
    first = 3 * args.steps_per_layer
    best = {k: min(v) for k, v in times.items()}
    print(f"phase-1 rotation: cached {best['cached']:.2f} s | naive {best['naive']:.2f} s | speedup "
          f"{best['naive'] / best['cached']:.1f}x | step losses agree to {max(rel[:first]):.1e} (layers 0-2), {max(rel):.1e} (all)")
    return best


def bench_eval(args):
    """Per-layer eval of phase 1: the teacher's val hidden states computed once per run (distill.py) against a
    teacher forward in every eval (before). Same val windows, same numbers."""
    torch.set_num_threads(args.threads)
    env = setup_device("cpu")
    ctx = torch.autocast("cpu", enabled=False)
    teacher = smollm2_teacher()
    student, _ = build_student(teacher, student_config(teacher.config, "relu2"))
    torch.manual_seed(2)
    batches = [(torch.randint(0, teacher.config.vocab_size, (args.batch_size, args.seq_len)),) * 2
               for _ in range(args.num_batches)]
    n_evals = teacher.config.n_layer  # one eval after every layer of a rotation
    print(f"phase-1 evals: {n_evals} evals (one per layer) of {args.num_batches} val windows of "
          f"{args.batch_size}x{args.seq_len} | torch threads {torch.get_num_threads()}")
    times, results = {"cached": [], "teacher forward": []}, {}
    for rep in range(args.repeats):
        for name in times:
            t0 = time.perf_counter()
            cached = losses_module.teacher_val_hidden(teacher, batches, ctx) if name == "cached" else None
            for _ in range(n_evals):
                results[name] = losses_module.evaluate(student, batches, env, ctx, chunk_rows=args.chunk,
                                                       teacher=teacher, teacher_hidden=cached)
            times[name].append(time.perf_counter() - t0)
            print(f"  repeat {rep}: {name:15s} {times[name][-1]:8.2f} s")
    best = {k: min(v) for k, v in times.items()}
    print(f"phase-1 evals per rotation: cached teacher {best['cached']:.2f} s | teacher forward each eval "
          f"{best['teacher forward']:.2f} s | {best['teacher forward'] / best['cached']:.1f}x | same numbers: "
          f"{results['cached'] == results['teacher forward']}")


def loss_peak_child(mode, rows, chunk):
    """Runs in its own process: peak memory of one KD + CE forward and backward, above what it held before."""
    import psutil

    torch.manual_seed(0)
    V, C = 49152, 576
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden = torch.randn(rows, C, device=device, requires_grad=True)
    weight = (torch.randn(V, C, device=device) * 0.02).requires_grad_()
    teacher_hidden, teacher_weight = torch.randn(rows, C, device=device), torch.randn(V, C, device=device) * 0.02
    targets = torch.randint(0, V, (rows,), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    if mode == "chunked":
        loss, _, _ = losses_module.head_loss(hidden, weight, targets, teacher=(teacher_hidden, teacher_weight),
                                             alpha=0.5, chunk_rows=chunk)
    else:
        logits = (hidden @ weight.t()).float()
        with torch.no_grad():
            teacher_logits = (teacher_hidden @ teacher_weight.t()).float()
        ce = torch.nn.functional.cross_entropy(logits, targets)
        loss = 0.5 * losses_module.kl_full(logits, teacher_logits).mean() + 0.5 * ce
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps({"mode": mode, "peak_bytes": peak, "seconds": time.perf_counter() - t0, "device": device,
                      "loss": loss.item()}))


def bench_memory(args):
    rows = args.batch_size_kd * args.seq_len_kd
    print(f"phase-2 KD + CE loss, forward + backward: {rows} tokens ({args.batch_size_kd}x{args.seq_len_kd}), vocab "
          f"49152, n_embd 576; one fp32 logits tensor is {rows * 49152 * 4 / 2**20:.0f} MiB")
    results = {}
    for mode in ("chunked", "unchunked"):
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--rows", str(rows), "--chunk",
                               str(args.chunk)], capture_output=True, text=True, check=True)
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(f"  {mode:9s} (chunk {args.chunk} rows): peak {r['peak_bytes'] / 2**20:8.0f} MiB above its inputs | "
              f"{r['seconds']:.2f} s | loss {r['loss']:.5f} | {r['device']}")
    ratio = results["unchunked"]["peak_bytes"] / max(results["chunked"]["peak_bytes"], 1)
    print(f"phase-2 loss peak memory: chunked {results['chunked']['peak_bytes'] / 2**20:.0f} MiB vs unchunked "
          f"{results['unchunked']['peak_bytes'] / 2**20:.0f} MiB ({ratio:.1f}x less)")


def bench_kd_speed(args):
    torch.set_num_threads(args.threads)
    rows, V, C = args.batch_size_kd * args.seq_len_kd, 49152, 576
    torch.manual_seed(0)  # logits of a trained model's scale (std ~2-3), a student near its teacher
    weight = (torch.randn(V, C) * 0.12).requires_grad_()
    hidden = torch.randn(rows, C, requires_grad=True)
    teacher_weight = weight.detach() + 0.02 * torch.randn(V, C)
    teacher_hidden = hidden.detach() + 0.3 * torch.randn(rows, C)
    targets = torch.randint(0, V, (rows,))
    alpha = args.alpha

    def chunked():
        loss, _, _ = losses_module.head_loss(hidden, weight, targets, teacher=(teacher_hidden, teacher_weight),
                                             alpha=alpha, chunk_rows=args.chunk)
        loss.backward()
        return loss

    def textbook():
        logits = hidden @ weight.t()
        with torch.no_grad():
            teacher_logits = teacher_hidden @ teacher_weight.t()
        kd = torch.nn.functional.kl_div(torch.nn.functional.log_softmax(logits, -1),
                                        torch.nn.functional.log_softmax(teacher_logits, -1), log_target=True,
                                        reduction="batchmean")
        loss = alpha * kd + (1 - alpha) * torch.nn.functional.cross_entropy(logits, targets)
        loss.backward()
        return loss

    print(f"phase-2 head loss (alpha {alpha}), forward + backward: {rows} tokens, vocab {V}, n_embd {C}, "
          f"{torch.get_num_threads()} threads")
    times, results = {"chunked, closed form": [], "textbook, autograd": []}, {}
    for rep in range(args.repeats):
        for name, fn in (("chunked, closed form", chunked), ("textbook, autograd", textbook)):
            hidden.grad = weight.grad = None
            t0 = time.perf_counter()
            loss = fn()
            times[name].append(time.perf_counter() - t0)
            results[name] = (loss.item(), hidden.grad.clone(), weight.grad.clone())
            print(f"  repeat {rep}: {name:22s} {times[name][-1]:6.2f} s | loss {loss.item():.6f}")
    (a_loss, a_h, a_w), (b_loss, b_h, b_w) = results.values()
    rel = max(((a - b).abs().max() / b.abs().max()).item() for a, b in ((a_h, b_h), (a_w, b_w)))
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"phase-2 head loss: chunked closed form {median['chunked, closed form']:.2f} s | textbook "
          f"{median['textbook, autograd']:.2f} s (medians of {args.repeats}) | "
          f"{median['textbook, autograd'] / median['chunked, closed form']:.2f}x | loss {a_loss:.6f} vs {b_loss:.6f} | "
          f"gradients' max difference / max {rel:.1e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["rotation", "memory", "eval", "kd-speed", "both"], default="both",
                        help="both = rotation and memory; eval = phase-1 evals with and without the cached teacher; "
                             "kd-speed = the phase-2 head loss's time against the textbook loss")
    parser.add_argument("--batch-size", type=int, default=1, help="phase 1: sequences per batch")
    parser.add_argument("--seq-len", type=int, default=128, help="phase 1: tokens per sequence")
    parser.add_argument("--num-batches", type=int, default=2, help="phase 1: batches in the cache")
    parser.add_argument("--steps-per-layer", type=int, default=2, help="phase 1: steps per layer")
    parser.add_argument("--target", default="decoder", choices=["decoder", "attn", "block"])
    parser.add_argument("--repeats", type=int, default=2, help="alternating cached/naive runs; the best counts")
    parser.add_argument("--batch-size-kd", type=int, default=4, help="phase 2: sequences in the loss")
    parser.add_argument("--seq-len-kd", type=int, default=1024, help="phase 2: tokens per sequence")
    parser.add_argument("--chunk", type=int, default=1024, help="phase 2: rows per chunk (distill.py's LOSS_CHUNK)")
    parser.add_argument("--alpha", type=float, default=1.0, help="kd-speed: the KD weight (the CPU recipe's: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a shared machine)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        loss_peak_child(args.child, args.rows, args.chunk)
    else:
        if args.part in ("rotation", "both"):
            bench_rotation(args)
        if args.part in ("memory", "both"):
            bench_memory(args)
        if args.part == "eval":
            bench_eval(args)
        if args.part == "kd-speed":
            bench_kd_speed(args)
