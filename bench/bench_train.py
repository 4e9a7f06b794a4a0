"""train.py's steady-state tokens/s against a bare training loop on the same model shape and batch.

The bare loop is the model benchmark's training step (bench/bench_model.py): forward, backward, AdamW step,
zero_grad, on batches already on the device (the same token windows train.py reads, from the same init). train.py adds everything a real run needs: reading
batches from shards, the LR schedule, gradient clipping, the loss/grad-norm sync and NaN check, metrics.jsonl,
the log line and tqdm. Both run in this one process, alternating (bare block, train.py run, bare block, ...),
so machine noise hits both alike. train.py runs through runpy exactly as `python train.py ...` would; its
per-step times come from its own metrics.jsonl (`dt`: wall time between the ends of consecutive steps). The
first --warmup steps of each side are dropped; we report median tokens/s and the overhead.

    python bench/bench_train.py                                  # CPU: small GPT (4 x 256), B=8, T=256, fp32
    python bench/bench_train.py --shape smollm2 --device cuda --batch 16 --seq 1024   # SmolLM2-135M shape, bf16
"""
import argparse
import json
import os
import runpy
import shutil
import statistics
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
from losses import default_chunk_rows, head_loss  # noqa: E402
from runtime import autocast, resolve_dtype  # noqa: E402
from data import HEADER_BYTES, TokenLoader, tokenizer_fingerprint, write_shard  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

SHAPES = {
    # small enough for a 2-core CPU: ~3.4M non-embedding params
    "small": dict(vocab_size=512, n_layer=4, n_head=4, n_kv_head=4, n_embd=256, head_dim=64, mlp_hidden=768,
                  max_seq_len=1024),
    "smollm2": dict(vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, n_embd=576, head_dim=64, mlp_hidden=1536,
                    rope_theta=100000.0, tie_embeddings=True, max_seq_len=8192),
}


def make_tokenizer_and_shards(out_dir, n_tokens, vocab):
    """A small BPE tokenizer (ids < 512) and one train + one val shard of random ids; speed does not care
    what the tokens say, and the manifest carries the tokenizer's real fingerprint so train.py accepts it."""
    from conftest import SPECIAL_TOKENS, english_like_documents
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(english_like_documents(400, seed=1), trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=SPECIAL_TOKENS[0])
    tok_dir, data_dir = os.path.join(out_dir, "tokenizer"), os.path.join(out_dir, "data")
    fast.save_pretrained(tok_dir)
    os.makedirs(data_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    shards = []
    for split, n in (("train", n_tokens), ("val", n_tokens // 4 + 1)):
        ids = rng.integers(0, min(vocab, len(fast)), size=n).astype(np.uint16)
        name = f"{split}_000000.bin"
        sha = write_shard(os.path.join(data_dir, name), ids)
        shards.append({"split": split, "file": name, "bytes": HEADER_BYTES + 2 * n, "sha256": sha, "ntok": n})
    manifest = {"shards": shards, "totals": {s["split"]: {"tokens": s["ntok"]} for s in shards},
                "tokenizer": {"source": tok_dir, "vocab_size": len(fast), "fingerprint": tokenizer_fingerprint(fast),
                              "separator_id": 0, "separator_token": SPECIAL_TOKENS[0]}}
    with open(os.path.join(data_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return tok_dir, data_dir


def bare_step_times(shape, windows, args, device_type, dtype):
    """bench_model.py's training step, timed one by one (synchronised on a GPU), on a model built exactly as
    train.py builds it (same seed) and the same token windows train.py reads, already on the device. Both sides
    start fresh each round: a model that has overfit a batch computes with tiny (denormal) probabilities, which
    is slow on CPUs and would make the comparison unfair."""
    torch.manual_seed(1337)  # train.py's SEED
    model = GPT(GPTConfig(**shape)).init_weights().to(args.device)
    optimizer = model.configure_optimizer(3e-4, 0.1, (0.9, 0.95), device_type)
    ctx = autocast(device_type, dtype)
    times = []
    for x, y in windows:
        if device_type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with ctx:
            loss = head_loss(model(x).flatten(0, 1), model.lm_head.weight, y.flatten(),
                             chunk_rows=default_chunk_rows(model.config.vocab_size))[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device_type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def train_py_step_times(run_dir, n_steps, args, tok_dir, data_dir, shape):
    """Run train.py in this process, as `python train.py ...` would, and read its per-step times back."""
    shutil.rmtree(run_dir, ignore_errors=True)
    argv = ["train.py", "--device", args.device, "--dtype", args.dtype, "--tokenizer", tok_dir,
            "--data-dir", data_dir, "--run-dir", run_dir, "--model-config", json.dumps(shape),
            "--batch-size", str(args.batch), "--seq-len", str(args.seq), "--grad-accum", "1",
            "--max-steps", str(n_steps), "--warmup-steps", "2", "--eval-every", "0",
            "--eval-tokens", str(args.batch * args.seq + 1), "--checkpoint-every", "0", "--keep-checkpoints", "1"]
    saved_argv, sys.argv = sys.argv, argv
    try:
        runpy.run_path(os.path.join(REPO, "train.py"), run_name="__main__")
    finally:
        sys.argv = saved_argv
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["dt"] for r in map(json.loads, f) if "dt" in r]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="auto = bf16 on a GPU that has it, fp32 otherwise")
    p.add_argument("--shape", default="small", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="timed steps per side per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each side's block")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out-dir", default=os.path.join(REPO, "bench", "out", "train"))
    args = p.parse_args()

    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    dtype = resolve_dtype(args.dtype, device_type)
    shape = SHAPES[args.shape]
    tokens = args.batch * args.seq
    n_steps = args.warmup + args.steps
    os.makedirs(args.out_dir, exist_ok=True)
    tok_dir, data_dir = make_tokenizer_and_shards(args.out_dir, (n_steps + 1) * tokens + 1, shape["vocab_size"])

    loader = TokenLoader(data_dir, "train", args.batch, args.seq, device=args.device)
    windows = [loader.next_batch() for _ in range(n_steps)]  # what train.py's loader yields, step by step
    n_params = GPT(GPTConfig(**shape)).num_params()
    print(f"torch {torch.__version__}, device {args.device}, dtype {dtype}, threads {torch.get_num_threads()}, "
          f"shape {args.shape} ({n_params / 1e6:.2f}M params), B={args.batch} T={args.seq}, "
          f"{args.rounds} rounds x {args.steps} timed steps per side")
    bare, trained = [], []
    for r in range(args.rounds):
        bare += bare_step_times(shape, windows, args, device_type, dtype)[args.warmup:]
        trained += train_py_step_times(os.path.join(args.out_dir, "run"), n_steps, args, tok_dir, data_dir,
                                       shape)[args.warmup:]
        print(f"round {r + 1}: bare {tokens / statistics.median(bare):,.0f} tok/s, "
              f"train.py {tokens / statistics.median(trained):,.0f} tok/s (medians so far)", flush=True)
    bare_tps, train_tps = tokens / statistics.median(bare), tokens / statistics.median(trained)
    overhead = 1 - train_tps / bare_tps
    print(f"bare loop {bare_tps:,.0f} tok/s | train.py {train_tps:,.0f} tok/s | overhead {100 * overhead:.1f}%")
    print(json.dumps({"shape": args.shape, "batch": args.batch, "seq": args.seq, "device": args.device,
                      "bare_tokens_per_s": bare_tps, "train_tokens_per_s": train_tps, "overhead": overhead}))


if __name__ == "__main__":
    main()
