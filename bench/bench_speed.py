"""From-scratch training per token: Muon + the speedrun options against a plain AdamW baseline, same model size
and token budget, on real English text.

Text: the six Jane Austen novels of Debian's r-cran-janeaustenr (bench/bench_quality.py prepares them, tokenized
with the SmolLM2 tokenizer, held-out passages for val). Two real `python train.py` runs, one per config:
configs/train_gpt_small_speed.yaml (OPTIMIZER muon, residual gates, U-Net skips, value embeddings, block-sparse
windows on a window schedule) and configs/train_gpt_small_adamw.yaml (the same dims, AdamW, plain blocks). Their
metrics.jsonl give the val-loss curves; reported: each final val loss, and the tokens the Muon run needed to reach
the baseline's final loss (interpolated between its evals).

Then, in this process, Muon's share of a training step: the speed config's model, its batch shape, forward +
backward timed apart from optimizer.step(), alternating steps of the two optimizers on the same model shape.

    python bench/bench_quality.py --deb r-cran-janeaustenr_1.0.0-1_all.deb --init-only   # once: prepares the text
    python bench/bench_speed.py --tokenizer bench/out/quality/teacher --data-dir bench/out/quality/data
    python bench/bench_speed.py --ddp    # Newton-Schulz under 2 gloo processes: replicated vs split + all_gather
"""
import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
OUT = os.path.join(REPO, "bench", "out", "speed")
CONFIGS = ("train_gpt_small_adamw", "train_gpt_small_speed")


def run(config, args):
    run_dir = os.path.join(OUT, config)
    if not args.reuse or not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        subprocess.run(["rm", "-rf", run_dir], check=True)
        cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config", os.path.join(REPO, "configs", config + ".yaml"),
               "--tokenizer", args.tokenizer, "--data-dir", args.data_dir, "--run-dir", run_dir]
        print("$ " + " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        os.makedirs(OUT, exist_ok=True)
        with open(os.path.join(OUT, config + ".log"), "w") as log:
            subprocess.run(cmd, check=True, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        print(f"{config}: {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    with open(os.path.join(run_dir, "config.json")) as f:
        tokens_per_step = json.load(f)["tokens_per_step"]
    evals = [(r["step"] * tokens_per_step, r["val_loss"]) for r in records if "val_loss" in r]
    steps = [r for r in records if "loss" in r]
    seconds = sum(r["dt"] for r in steps)
    return {"evals": evals, "train_seconds": seconds, "tokens": steps[-1]["tokens"]}


def tokens_to_reach(evals, target):
    """Tokens at which the val-loss curve first reaches `target`, linear between evals; None if it never does."""
    for (t0, l0), (t1, l1) in zip(evals, evals[1:]):
        if l1 <= target:
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1) if l0 > target else t0
    return None


def optimizer_share(args, steps=6):
    """Seconds of forward + backward and of optimizer.step() for the speed config's model, Muon and AdamW
    alternating on the same batches."""
    import torch
    import yaml

    import losses
    from data import TokenLoader
    from model import GPT, GPTConfig

    with open(os.path.join(REPO, "configs", "train_gpt_small_speed.yaml")) as f:
        config = yaml.safe_load(f)
    muon_lrs = {"matrix": config["matrix_lr"], "embed": config["embed_lr"], "head": config.get("head_lr", 0.004),
                "scalar": config["scalar_lr"], "momentum": config.get("muon_momentum", 0.95)}
    batch_size = args.share_batch_size or config["batch_size"]
    loader = TokenLoader(args.data_dir, "train", batch_size, config["seq_len"])
    batches = [loader.next_batch() for _ in range(steps)]
    times = {"muon": [0.0, 0.0], "adamw": [0.0, 0.0]}
    for kind in ("muon", "adamw") * 2:
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_dict({"vocab_size": 49152, **config["model_config"]})).init_weights()
        optimizer = model.configure_optimizer(config["lr"], 0.0, (0.9, 0.95), "cpu",
                                              muon=muon_lrs if kind == "muon" else None)
        for x, y in batches:
            t0 = time.perf_counter()
            hidden = model(x).flatten(0, 1)
            loss, _, _ = losses.head_loss(hidden, model.lm_head.weight, y.reshape(-1))
            loss.backward()
            t1 = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[kind][0] += t1 - t0
            times[kind][1] += time.perf_counter() - t1
    return times


def ddp_newton_schulz(rank, world_size, port, shapes, repeats, result):
    """One gloo rank: per step, Newton-Schulz on every matrix (what muon.py does under DDP) vs on this rank's
    share of them followed by an all-gather of the orthogonalised updates (the speedruns' split)."""
    import torch
    import torch.distributed as dist

    from muon import newton_schulz

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    grads = [torch.randn(shape) for shape in shapes]
    # the split: the matrices of each shape dealt out in turn, so each all_gather call moves equal shapes; a
    # rank with no matrix left in a round sends zeros
    rounds = []
    for shape in sorted(set(shapes)):
        same = [g for g in grads if tuple(g.shape) == shape]
        rounds += [same[i:i + world_size] for i in range(0, len(same), world_size)]
    times = {"every rank, every matrix": [], "split + all_gather": []}
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        for g in grads:
            newton_schulz(g)
        dist.barrier()
        times["every rank, every matrix"].append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        for group in rounds:
            mine = newton_schulz(group[rank]) if rank < len(group) else torch.zeros_like(group[0])
            dist.all_gather([torch.empty_like(mine) for _ in range(world_size)], mine)
        dist.barrier()
        times["split + all_gather"].append(time.perf_counter() - t0)
    if rank == 0:
        result.update({k: sorted(v)[len(v) // 2] for k, v in times.items()})
    dist.destroy_process_group()


def ddp_share(args):
    """The Muon config's matrices under 2 gloo processes on this CPU: replicated Newton-Schulz vs split."""
    import torch.multiprocessing as mp
    import yaml

    from model import GPT, GPTConfig

    with open(os.path.join(REPO, "configs", "train_gpt_small_speed.yaml")) as f:
        config = yaml.safe_load(f)
    model = GPT(GPTConfig.from_dict({"vocab_size": 49152, **config["model_config"]}))
    muon_lrs = {"matrix": 0.02, "embed": 0.003, "head": 0.003, "scalar": 0.01, "momentum": 0.95}
    optimizer = model.configure_optimizer(1e-3, 0.0, (0.9, 0.95), "cpu", muon=muon_lrs)
    shapes = [tuple(p.shape) for g in optimizer.param_groups if g["use_muon"] for p in g["params"]]
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(ddp_newton_schulz, args=(2, 29517, shapes, args.ddp_repeats, result), nprocs=2)
        print(f"Muon's Newton-Schulz under 2 gloo processes ({len(shapes)} matrices, "
              f"{sum(a * b for a, b in shapes) / 1e6:.2f}M entries), median of {args.ddp_repeats} steps:")
        for kind, seconds in result.items():
            print(f"  {kind}: {1000 * seconds:.1f} ms per step")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", default=os.path.join(REPO, "bench", "out", "quality", "teacher"))
    parser.add_argument("--data-dir", default=os.path.join(REPO, "bench", "out", "quality", "data"))
    parser.add_argument("--reuse", action="store_true", help="read finished runs instead of running them again")
    parser.add_argument("--share-only", action="store_true", help="only the optimizer-step share")
    parser.add_argument("--share-batch-size", type=int, default=None,
                        help="the optimizer-step share at this batch size instead of the config's")
    parser.add_argument("--ddp", action="store_true",
                        help="only Newton-Schulz under 2 gloo processes: every rank all matrices vs split + all_gather")
    parser.add_argument("--ddp-repeats", type=int, default=9)
    args = parser.parse_args()
    if args.ddp:
        return ddp_share(args)
    if not args.share_only:
        results = {config: run(config, args) for config in CONFIGS}
        base, speed = results[CONFIGS[0]], results[CONFIGS[1]]
        target = base["evals"][-1][1]
        reach = tokens_to_reach(speed["evals"], target)
        print("\n| config | final val loss | tokens | train min |\n|---|---|---|---|")
        for config in CONFIGS:
            r = results[config]
            print(f"| {config} | {r['evals'][-1][1]:.4f} | {r['tokens']:,} | {r['train_seconds'] / 60:.1f} |")
        print(f"\nthe Muon run reached the AdamW run's final val loss {target:.4f} at "
              + (f"{reach:,.0f} tokens = {reach / base['tokens']:.2f}x the baseline's tokens" if reach else "no eval"))
        for config in CONFIGS:
            print(f"{config} evals (tokens, val loss): "
                  + ", ".join(f"({t:,}, {l:.3f})" for t, l in results[config]["evals"]))
    times = optimizer_share(args)
    for kind, (fwd_bwd, opt) in times.items():
        print(f"{kind}: forward+backward {fwd_bwd:.2f} s, optimizer.step {opt:.2f} s = "
              f"{100 * opt / (fwd_bwd + opt):.1f}% of the step")
    print(f"batch {args.share_batch_size or 'of the config'} | machine: {os.cpu_count()} CPUs, fp32")


if __name__ == "__main__":
    main()
