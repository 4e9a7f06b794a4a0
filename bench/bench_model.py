"""model.py vs transformers' LlamaForCausalLM on the SmolLM2-135M shape: training step and forward.

Timing: both models live in one process with identical weights and batch, and steps alternate (ours, theirs,
ours, ...) so machine noise hits both alike; we report median tokens/s and the ratio.
Memory: on a GPU, torch.cuda.max_memory_allocated per model in this process. On CPU there is no allocator
counter, so each model's step runs again in a fresh child process and we read its peak resident memory (VmHWM)
above the resident memory after imports, with glibc's mmap threshold pinned so that freed tensors really return
to the OS. Both numbers therefore cover weights, gradients, optimizer state and activations, as on a GPU.

    python bench/bench_model.py                     # CPU: fp32, B=4, T=256
    python bench/bench_model.py --device cuda --dtype bf16 --batch 16 --seq 1024
"""
import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from losses import default_chunk_rows, head_loss  # noqa: E402
from runtime import autocast, resolve_dtype  # noqa: E402
from hf_interop import config_to_hf, state_to_hf  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

SMOLLM2_135M = dict(vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, n_embd=576, head_dim=64, mlp_hidden=1536,
                    rope_theta=100000.0, tie_embeddings=True, max_seq_len=8192)


def build_models(device, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    ours = GPT(GPTConfig(**SMOLLM2_135M)).init_weights().to(device)
    hf_config = LlamaConfig(**{k: v for k, v in config_to_hf(ours.config).items() if k != "architectures"})
    hf_config._attn_implementation = "sdpa"
    theirs = LlamaForCausalLM(hf_config).to(device)
    theirs.load_state_dict(state_to_hf(ours.state_dict(), ours.config), strict=False)
    theirs.tie_weights()
    return ours, theirs


def ours_loss(model, x, y):
    """train.py's loss: the hidden states, then the LM head and CE a chunk of tokens at a time."""
    return head_loss(model(x).flatten(0, 1), model.lm_head.weight, y.flatten(),
                     chunk_rows=default_chunk_rows(model.config.vocab_size))[0]


def make_step(name, model, batch, mode, device_type, dtype):
    """A closure running one training step (forward, backward, AdamW) or one forward pass."""
    x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    ctx = autocast(device_type, dtype)
    if mode == "forward":
        def step():
            with torch.no_grad(), ctx:
                model.logits(x) if name == "ours" else model(input_ids=x).logits
        return step
    # the same optimizer for both: AdamW with its fused kernel (CPU and GPU), which has no foreach temporaries
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with ctx:
            loss = ours_loss(model, x, y) if name == "ours" else model(input_ids=x, labels=y, shift_labels=y).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_cpu_child(name, args):
    """Run one model's step in a fresh process; returns its peak resident memory in bytes."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    cmd = [sys.executable, __file__, "--child", name, "--mode", args.mode, "--batch", str(args.batch),
           "--seq", str(args.seq), "--device", args.device, "--dtype", args.dtype]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


def vm_hwm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def vm_rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(args):
    baseline = vm_rss_bytes()  # the interpreter and imported libraries: not the model's memory
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    dtype = resolve_dtype(args.dtype, device_type)
    ours, theirs = build_models(args.device)
    model = ours if args.child == "ours" else theirs
    del ours, theirs
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: building both models is not the step's peak
        f.write("5")
    batch = torch.randint(0, SMOLLM2_135M["vocab_size"], (args.batch, args.seq + 1), device=args.device)
    step = make_step(args.child, model, batch, args.mode, device_type, dtype)
    for _ in range(2):  # optimizer state exists after the first step; the second is the steady state
        step()
    print(json.dumps({"peak_bytes": vm_hwm_bytes() - baseline}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="auto = bf16 on GPU, fp32 on CPU")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="timed steps per model and mode")
    p.add_argument("--mode", default="both", choices=["train", "forward", "both"])
    p.add_argument("--child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    dtype = resolve_dtype(args.dtype, device_type)
    torch.set_float32_matmul_precision("high")
    tokens = args.batch * args.seq
    print(f"torch {torch.__version__}, device {args.device}, dtype {dtype}, threads {torch.get_num_threads()}, "
          f"B={args.batch} T={args.seq}, SmolLM2-135M shape, {args.steps} timed steps each")
    ours, theirs = build_models(args.device)
    batch = torch.randint(0, SMOLLM2_135M["vocab_size"], (args.batch, args.seq + 1), device=args.device)
    results = {}
    for mode in (["train", "forward"] if args.mode == "both" else [args.mode]):
        steps = {name: make_step(name, m, batch, mode, device_type, dtype) for name, m in
                 (("ours", ours), ("hf", theirs))}
        times = {"ours": [], "hf": []}
        peak = {}
        for name in steps:  # warm-up: first calls allocate optimizer state and pick kernels
            steps[name]()
        for _ in range(args.steps):
            for name, step in steps.items():
                if device_type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                sync(args.device)
                t0 = time.perf_counter()
                step()
                sync(args.device)
                times[name].append(time.perf_counter() - t0)
                if device_type == "cuda":
                    peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated())
        if device_type == "cpu":
            args.mode = mode
            peak = {name: peak_memory_cpu_child(name, args) for name in steps}
        tps = {name: tokens / statistics.median(t) for name, t in times.items()}
        results[mode] = {"tokens_per_s": tps, "peak_bytes": peak,
                         "speed_ratio": tps["ours"] / tps["hf"], "memory_ratio": peak["ours"] / peak["hf"]}
        print(f"{mode:>8}: ours {tps['ours']:8.0f} tok/s, transformers {tps['hf']:8.0f} tok/s, "
              f"ratio {tps['ours'] / tps['hf']:.2f}x | peak memory ours {peak['ours'] / 2**20:7.0f} MiB, "
              f"transformers {peak['hf'] / 2**20:7.0f} MiB, ratio {peak['ours'] / peak['hf']:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
