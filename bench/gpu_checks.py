"""The GPU paths checked in one run: what CPU CI can never exercise (CUDA kernels, bf16 autocast, torch.compile,
NCCL, pinned host memory), each against a reference, plus the scripts end to end on one GPU.

Every check prints one JSON line and appends it to OUT/gpu_checks.jsonl, so a run cut short still reports what
it finished. Random weights throughout (no real weights fit the transfer to a lent GPU machine): the references
are transformers' Llama on the same weights, an explicit-mask attention, and the same model in fp32 / eager.

    python bench/gpu_checks.py --out bench/out/gpu            # ~5 min on one H200
    python bench/gpu_checks.py --only parity,window           # a subset
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))
sys.path.insert(0, os.path.join(REPO, "tests"))
from bench_model import SMOLLM2_135M, build_models  # noqa: E402
from conftest import torchrun  # noqa: E402
from model import GPT, GPTConfig, attends, sliding_window_attention  # noqa: E402
from runtime import autocast  # noqa: E402

OUT = None  # gpu_checks.jsonl: one line per check
LOGS = None  # each script's full output, one .log per run


def report(check, **fields):
    line = json.dumps({"check": check, **fields})
    print(line, flush=True)
    with open(os.path.join(OUT, "gpu_checks.jsonl"), "a") as f:
        f.write(line + "\n")


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, repeats, device):
    """Median seconds of `fn` over `repeats` calls, synchronised, after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kl_and_agreement(ref_logits, logits):
    """Mean KL(ref || other) per token and top-1 agreement: how far a lower-precision forward lands."""
    ref, other = ref_logits.float().flatten(0, 1), logits.float().flatten(0, 1)
    kl = F.kl_div(other.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    return kl.item(), (ref.argmax(-1) == other.argmax(-1)).float().mean().item()


def check_env(args):
    props = torch.cuda.get_device_properties(0)
    import transformers
    report("env", torch=torch.__version__, cuda=torch.version.cuda, transformers=transformers.__version__,
           gpu=props.name, capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
           bf16=torch.cuda.is_bf16_supported(), nccl=torch.distributed.is_nccl_available())


def check_parity(args):
    """model.py vs transformers' LlamaForCausalLM, SmolLM2-135M shape, same random weights, on the GPU:
    fp32 (TF32 off) must match to float precision; in bf16 our error against our fp32 logits must be of the
    same size as transformers' bf16 error against its own fp32 logits."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ours, theirs = build_models(args.device)
    ours.eval(), theirs.eval()
    torch.manual_seed(0)
    x = torch.randint(0, SMOLLM2_135M["vocab_size"], (max(1, args.batch // 4), args.seq), device=args.device)
    with torch.no_grad():
        ours32, theirs32 = ours.logits(x), theirs(x).logits
        with autocast(args.device_type, args.dtype):
            ours16 = ours.logits(x)
        theirs16 = theirs.to(args.dtype)(x).logits
    scale = theirs32.abs().max().item()
    report("parity_fp32", max_abs_diff=(ours32 - theirs32).abs().max().item(), logit_max_abs=scale,
           ok=(ours32 - theirs32).abs().max().item() < 1e-4 * max(scale, 1.0))
    ours_kl, ours_top1 = kl_and_agreement(ours32, ours16)
    hf_kl, hf_top1 = kl_and_agreement(theirs32, theirs16)
    cross_kl, _ = kl_and_agreement(theirs16, ours16)
    report("parity_bf16", ours_bf16_vs_fp32_kl=ours_kl, ours_top1=ours_top1, hf_bf16_vs_fp32_kl=hf_kl,
           hf_top1=hf_top1, ours_bf16_vs_hf_bf16_kl=cross_kl, ok=ours_kl <= 3 * hf_kl + 1e-6)
    torch.backends.cuda.matmul.allow_tf32 = True
    del ours, theirs
    torch.cuda.empty_cache()


def check_window(args):
    """The blocked sliding-window (block-sparse, sink-token) attention on CUDA in bf16, forward and backward,
    against softmax attention with an explicit (T, T) mask built from `attends`, computed in fp32."""
    torch.manual_seed(0)
    B, H, Hkv, T, D = 2, 9, 3, 1024, 64
    for window, sparse, sink in ((64, None, 0), (256, None, 0), (64, 16, 0), (1000, None, 0), (64, None, 4)):
        q = torch.randn(B, H, T, D, device=args.device, requires_grad=True)
        k = torch.randn(B, Hkv, T, D, device=args.device, requires_grad=True)
        v = torch.randn(B, Hkv, T, D, device=args.device, requires_grad=True)
        pos = torch.arange(T, device=args.device)
        mask = attends(pos[:, None], pos[None, :], window, sparse, sink)
        ref = F.scaled_dot_product_attention(q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1),
                                             attn_mask=mask)
        grad_out = torch.randn_like(ref)
        ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
        q16, k16, v16 = (t.detach().to(args.dtype).requires_grad_() for t in (q, k, v))
        out = sliding_window_attention(q16, k16, v16, window, {}, sparse, sink)
        grads = torch.autograd.grad(out, (q16, k16, v16), grad_out.to(args.dtype))
        out_err = (out.float() - ref).abs().max().item()
        grad_err = max(((g.float() - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, ref_grads))
        report("window_bf16", window=window, sparse=sparse, sink=sink, T=T, max_abs_out_err=out_err,
               max_rel_grad_err=grad_err, ok=out_err < 0.05 and grad_err < 0.05)


def check_compile(args):
    """torch.compile of the SmolLM2-shaped model with half its layers windowed: loss and gradients equal to
    eager in bf16, and the step time of each."""
    torch.manual_seed(0)
    shape = dict(SMOLLM2_135M, window=[64 if i % 2 else None for i in range(30)])
    model = GPT(GPTConfig(**shape)).init_weights().to(args.device)
    compiled = torch.compile(model)
    x = torch.randint(0, shape["vocab_size"], (args.batch, args.seq + 1), device=args.device)

    def loss_and_grad(m):
        with autocast(args.device_type, args.dtype):
            loss = F.cross_entropy(model.lm_head(m(x[:, :-1])).float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
        return loss.item(), grad

    t0 = time.perf_counter()
    loss_c, grad_c = loss_and_grad(compiled)
    compile_s = time.perf_counter() - t0
    loss_e, grad_e = loss_and_grad(model)
    rel = ((grad_c - grad_e).norm() / grad_e.norm()).item()
    eager_s = timed(lambda: loss_and_grad(model), 5, args.device)
    compiled_s = timed(lambda: loss_and_grad(compiled), 5, args.device)
    report("compile_bf16", loss_eager=loss_e, loss_compiled=loss_c, grad_rel_diff=rel, first_call_s=compile_s,
           step_eager_s=eager_s, step_compiled_s=compiled_s, tokens=args.batch * args.seq,
           ok=abs(loss_c - loss_e) < 1e-2 * abs(loss_e) and rel < 0.05)
    del model, compiled
    torch.cuda.empty_cache()


def median_or_none(values):
    return statistics.median(values) if values else None


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_script(name, argv, timeout, nproc=None):
    """Run a repo script as a user would (through torchrun when `nproc` is given); returns (rc, seconds)."""
    cmd = torchrun(argv[0], nproc, *argv[1:]) if nproc else [sys.executable, *argv]
    t0 = time.perf_counter()
    with open(os.path.join(LOGS, f"{name}.log"), "w") as log:
        # its own process group, so that a timeout ends torchrun's workers too, not only torchrun
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
    seconds = time.perf_counter() - t0
    if rc != 0:
        with open(os.path.join(LOGS, f"{name}.log")) as f:
            print(f"--- {name} failed ({rc}); log tail:\n" + "".join(f.readlines()[-25:]), flush=True)
    return rc, seconds


def check_train(args):
    """train.py under torchrun (NCCL, one rank), bf16 autocast, eager and compiled: tokens/s and MFU from its
    own metrics.jsonl (steps after the first 5), and an eval + checkpoint + resume on the GPU."""
    from bench_train import make_tokenizer_and_shards
    tok_dir, data_dir = make_tokenizer_and_shards(os.path.join(args.work, "train"), 4_000_000, 512)
    shape = json.dumps(SMOLLM2_135M)
    for compile_flag in args.train_compile.split(","):
        run_dir = os.path.join(args.work, f"train_compile_{compile_flag}")
        common = ["train.py", "--device", args.device, "--dtype", args.dtype_name, "--tokenizer", tok_dir, "--data-dir",
                  data_dir, "--run-dir", run_dir, "--model-config", shape, "--batch-size", str(args.batch),
                  "--seq-len", str(args.seq), "--warmup-steps", "5", "--eval-every", "20", "--eval-tokens", str(args.eval_tokens),
                  "--checkpoint-every", "20", "--compile", compile_flag, "--log-every", "10"]
        rc, seconds = run_script(f"train_compile_{compile_flag}", common + ["--max-steps", "20"], 300, nproc=1)
        if rc == 0:  # resume from step 20 to step 30: the checkpoint written on the GPU loads and continues
            rc, more = run_script(f"train_compile_{compile_flag}_resume",
                                  common + ["--max-steps", "30", "--resume", "true"], 300, nproc=1)
            seconds += more
        rows = metrics(run_dir) if rc == 0 else []
        steps = [r for r in rows if "tokens_per_s" in r and r.get("tokens_per_s") and r["step"] > 5]
        evals = [r for r in rows if "val_loss" in r]
        report("train_py", compile=compile_flag, rc=rc, wall_s=round(seconds, 1), steps=len(steps),
               median_tokens_per_s=median_or_none([r["tokens_per_s"] for r in steps]),
               median_mfu=median_or_none([r["mfu"] for r in steps if r.get("mfu")]),
               val_losses=[round(r["val_loss"], 4) for r in evals], last_step=max((r["step"] for r in steps),
                                                                                    default=None), ok=rc == 0)


def check_distill(args):
    """distill.py (the CPU recipe's settings, run on the GPU: lsq prune init, a short phase 1 and 2) under
    torchrun with NCCL, bf16, the phase-1 cache on the device; then sample.py from its newest checkpoint."""
    from bench_train import make_tokenizer_and_shards
    from conftest import make_tiny_llama
    tok_dir, data_dir = make_tokenizer_and_shards(os.path.join(args.work, "distill"), 4_000_000, 512)
    teacher = make_tiny_llama(os.path.join(args.work, "teacher"), tok_dir, num_kv_heads=3, vocab_size=512,
                              hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                              max_position_embeddings=2048, rope_theta=100000.0)
    run_dir = os.path.join(args.work, "distill_run")
    rc, seconds = run_script("distill", [
        "distill.py", "--config", "configs/distill_smollm2_cpu_30min.yaml", "--teacher", teacher,
        "--data-dir", data_dir, "--run-dir", run_dir, "--device", args.device, "--dtype", args.dtype_name, "--phases", "12",
        "--num-batches", "8", "--steps-per-layer", "4", "--warmup-layer", "2", "--max-steps", "30",
        "--warmup-steps", "5", "--batch-size", str(args.batch), "--seq-len", str(args.seq),
        "--eval-tokens", str(args.eval_tokens), "--checkpoint-every", "15", "--top-k", "0"], 400, nproc=1)
    rows = metrics(run_dir) if rc == 0 else []
    rate = lambda phase: median_or_none([r["tokens_per_s"] for r in rows if r.get("phase") == phase and
                                         r.get("tokens_per_s") and r.get("step", 0) > 5])
    evals = [{k: r[k] for k in ("phase", "step", "val_ce", "teacher_ce", "kl", "eval_seconds") if k in r} for r in rows
             if r.get("event") == "eval"]
    report("distill_py", rc=rc, wall_s=round(seconds, 1), phase1_tokens_per_s=rate(1),
           phase2_tokens_per_s=rate(2), evals=evals, ok=rc == 0)
    if rc == 0:
        rc, seconds = run_script("sample", ["sample.py", run_dir, "--prompt", "The history of", "--max-new-tokens",
                                            "64", "--device", args.device, "--seed", "1"], 200)
        with open(os.path.join(LOGS, "sample.log")) as f:
            tail = f.read()[-400:]
        report("sample_py", rc=rc, wall_s=round(seconds, 1), tail=tail, ok=rc == 0)


def check_benches(args):
    """The model benchmark (ours vs transformers, training step and forward, tokens/s and peak memory)."""
    rc, seconds = run_script("bench_model", ["bench/bench_model.py", "--device", args.device, "--dtype", args.dtype_name,
                                             "--batch", str(args.batch), "--seq", str(args.seq), "--steps", "10"], 240)
    with open(os.path.join(LOGS, "bench_model.log")) as f:
        tail = f.read()[-2500:]
    report("bench_model", rc=rc, wall_s=round(seconds, 1), tail=tail, ok=rc == 0)


def check_pytest(args):
    """The suite's own GPU tests (skipped on CPU CI): pinned host memory, CUDA batches, bf16 Newton-Schulz."""
    rc, seconds = run_script("pytest", ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda or pinned",
                                        "tests/test_data.py", "tests/test_muon.py", "tests/test_distill.py"], 240)
    with open(os.path.join(LOGS, "pytest.log")) as f:
        tail = f.read()[-800:]
    report("pytest_gpu", rc=rc, wall_s=round(seconds, 1), tail=tail, ok=rc == 0)


CHECKS = {"env": check_env, "parity": check_parity, "window": check_window, "pytest": check_pytest,
          "train": check_train, "distill": check_distill, "compile": check_compile, "bench": check_benches}


def main():
    global OUT, LOGS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "bench", "out", "gpu"))
    p.add_argument("--work", default="/tmp/gpu_checks", help="scratch dir for shards, teacher and run dirs")
    p.add_argument("--only", default=",".join(CHECKS), help="comma-separated subset of " + ",".join(CHECKS))
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the script (fp32), to test it without a GPU")
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument("--train-compile", default="false,true", help="train.py runs: eager, compiled or both")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    args = p.parse_args()
    OUT, LOGS = args.out, os.path.join(args.work, "logs")
    os.makedirs(LOGS, exist_ok=True)
    os.makedirs(OUT, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    args.device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    if args.device_type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu_checks.py needs a CUDA (or ROCm) GPU; torch.cuda.is_available() is False")
    # --device cpu is a dry run of this script itself (fp32, small shapes), not a check of anything GPU
    args.dtype, args.dtype_name = ((torch.bfloat16, "bfloat16") if args.device_type == "cuda" else
                                   (torch.float32, "float32"))
    for name in args.only.split(","):
        t0 = time.perf_counter()
        try:
            CHECKS[name](args)
        except Exception as e:  # one broken path must not hide the others
            report(name, ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-1500:])
        print(f"[{name}: {time.perf_counter() - t0:.0f}s]", flush=True)


if __name__ == "__main__":
    main()
