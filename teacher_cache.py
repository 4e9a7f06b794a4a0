"""The teacher's top-k next-token distribution, computed once per token of the stream, so that phase 2 (and every
replay or sweep after it) runs without the teacher.

    python distill.py --config C --phases cache --teacher-cache DIR     # write it (torchrun: each rank a slice)
    python distill.py --config C --teacher-cache DIR                    # phase 2 reads it; no teacher forward
    python teacher_cache.py verify DIR | export DIR OUT.parquet | import IN.parquet DIR

Alignment. Entry p of a split is for stream offset p (unwrapped: offsets past the split's end wrap like
TokenLoader's): the teacher's distribution over the token after p, given the row of SEQ_LEN tokens that starts at
p - p % SEQ_LEN. TokenLoader's windows start at multiples of SEQ_LEN and are rows of SEQ_LEN, so window w's
entries are offsets [w*B*T, (w+1)*B*T): found by arithmetic, for any batch size and world size.

Files. DIR/manifest.json (written last: a dir without it is unfinished) and shards {train,val}_NNNNNN.topk, each
a header of 256 int32 [magic, version, k, count, id bytes (2 or 4), value code (16 fp16, -16 bf16, 32 fp32),
seq_len], then ids (count, k) little-endian uint16 (int32 for a vocab over 65,536), then values (count, k + 2):
log-probabilities at temperature 1 of the k ids (highest first), of the tail (all other ids as one bucket, from
a logsumexp, not 1 - sum) and of the actual next token (for the teacher's val CE; NaN when unknown).
"""
import hashlib
import json
import os
import re
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from checkpoints import atomic_write_text, lock_dir
from config import ConfigError
from data import HEADER_BYTES, HEADER_INTS, TokenLoader, check_data_matches_tokenizer, read_manifest
from hf_interop import load_model, load_tokenizer, tokenizer_source
from runtime import say

CACHE_MAGIC = 20241130
CACHE_VERSION = 1
VALUE_CODES = {"float16": 16, "bfloat16": -16, "float32": 32}
SHARD_NAME = re.compile(r"^(train|val)_(\d{6})\.topk$")


class CacheError(ValueError):
    """A teacher cache that does not match the run, or a damaged one; the message names the file and the fault."""


# ----------------------------------------------------------------------------------------------------------
# Entries

def topk_entries_(logits, targets, k):
    """ids (N, k) of the k most likely next tokens and values (N, k + 2) fp32: their log-probabilities, the
    tail's and the target's, from logits (N, vocab) at temperature 1. In place: fp32 `logits` are overwritten
    with exp(logits - max), and no copy of them is made; the tail mass is summed over the other ids themselves
    (no 1 - sum cancellation). Two passes fewer than logsumexp twice: half the time on a CPU (README)."""
    logits = logits.float()
    peak = logits.max(-1, keepdim=True).values
    top, ids = logits.topk(k, dim=-1)
    target = logits.gather(-1, targets[:, None])
    weights = logits.sub_(peak).exp_()
    log_total = weights.sum(-1, keepdim=True).log_()
    log_tail = weights.scatter_(-1, ids, 0.0).sum(-1, keepdim=True).log_()
    return ids, torch.cat([top - peak, log_tail, target - peak], dim=-1).sub_(log_total)


def narrow_entries(ids, values, k):
    """The same entries with only the first `k` ids kept: the others join the tail bucket."""
    if k >= ids.shape[-1]:
        return ids, values
    tail = torch.cat([values[:, k:-2], values[:, -2:-1]], dim=-1).logsumexp(-1, keepdim=True)
    return ids[:, :k], torch.cat([values[:, :k], tail, values[:, -1:]], dim=-1)


def encode_values(values, value_dtype):
    if value_dtype == "bfloat16":
        return values.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2")
    return values.numpy().astype("<f2" if value_dtype == "float16" else "<f4")


def decode_values(raw, code):
    if code == -16:
        return torch.from_numpy(raw.astype(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(raw.astype(np.float32))


# ----------------------------------------------------------------------------------------------------------
# Identity: what a cache was made from, checked before it is used

def data_fingerprint(data_dir):
    """sha256 of the data manifest's shard list (their names, sizes and hashes) and tokenizer fingerprint."""
    manifest = read_manifest(data_dir)
    canonical = json.dumps([manifest["shards"], manifest["tokenizer"]["fingerprint"]], sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def weights_fingerprint(model):
    """sha256 over each tensor's name, shape and a strided sample of its values (at most 4,096 per tensor): a
    different checkpoint gives a different print, in milliseconds even for an 8B model."""
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // 4096)].float().cpu()
        digest.update(f"{name}{tuple(t.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def identity(teacher_source, teacher, data_dir, seq_len, k, value_dtype):
    from dataclasses import asdict

    return {"teacher": {"source": teacher_source, "config": asdict(teacher.config),
                        "weights_fingerprint": weights_fingerprint(teacher)},
            "data": {"dir": os.path.abspath(data_dir), "fingerprint": data_fingerprint(data_dir)},
            "seq_len": seq_len, "k": k, "value_dtype": value_dtype}


# ----------------------------------------------------------------------------------------------------------
# Writing

def shard_plan(start, end, shard_tokens):
    """[(index, first offset, count)] of a split's shards over offsets [start, end)."""
    return [(j, a, min(shard_tokens, end - a)) for j, a in enumerate(range(start, end, shard_tokens))]


def write_shard(path, ids, values, value_dtype, seq_len, vocab_size):
    """One shard, atomically (temp file, fsync, rename): a killed write leaves only a *.tmp.PID."""
    k = ids.shape[1]
    ids_np = ids.numpy().astype("<u2" if vocab_size <= 2 ** 16 else "<i4")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:7] = CACHE_MAGIC, CACHE_VERSION, k, len(ids), ids_np.itemsize, VALUE_CODES[value_dtype], seq_len
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(ids_np.tobytes())
        f.write(encode_values(values, value_dtype).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@torch.no_grad()
def write_split(cache_dir, split, teacher, data_dir, start, end, s, env, ctx, bar):
    """This rank's shards (shard j goes to rank j % world size) of `split` over offsets [start, end): the teacher
    runs over windows of BATCH_SIZE rows of SEQ_LEN, exactly as TokenLoader cuts them. A shard already on disk is
    complete (rename is atomic) and is skipped, so a rerun after a kill redoes only the unfinished ones."""
    loader = TokenLoader(data_dir, split, s.batch_size, s.seq_len, device=env.device,
                         vocab_size=teacher.config.vocab_size)
    window = s.batch_size * s.seq_len
    for j, first, count in shard_plan(start, end, shard_tokens(s)):
        path = os.path.join(cache_dir, f"{split}_{j:06d}.topk")
        if j % env.world_size != env.rank or os.path.exists(path):
            bar.update(count if j % env.world_size == env.rank else 0)
            continue
        ids, values = [], []
        for offset in range(first, first + count, window):
            x, y = loader.window_at(offset)
            with ctx:
                logits = teacher.logits(x)
            i, v = topk_entries_(logits.flatten(0, 1), y.reshape(-1), s.cache_k)
            ids.append(i.cpu())
            values.append(v.cpu())
            bar.update(window)
        write_shard(path, torch.cat(ids), torch.cat(values), s.cache_dtype, s.seq_len, teacher.config.vocab_size)


def shard_tokens(s):
    """Entries per shard: CACHE_SHARD_TOKENS rounded down to whole windows (at least one)."""
    window = s.batch_size * s.seq_len
    return max(window, s.cache_shard_tokens // window * window)


def write_cache(cache_dir, teacher, teacher_source, ranges, s, env, ctx):
    """The whole cache: each rank writes its shards of every split in `ranges` ({split: (start, end)}), then
    rank 0 hashes them all and writes manifest.json last. Resumable: a rerun continues where a kill stopped."""
    ident = identity(teacher_source, teacher, s.data_dir, s.seq_len, s.cache_k, s.cache_dtype)
    manifest_path = os.path.join(cache_dir, "manifest.json")
    if env.is_master:
        lock_dir(cache_dir, "teacher cache")
        for name in os.listdir(cache_dir):  # temp files of killed writers
            if ".tmp." in name:
                os.remove(os.path.join(cache_dir, name))
        plan = os.path.join(cache_dir, "plan.json")
        wanted = json.loads(json.dumps({**ident, "ranges": ranges, "batch_size": s.batch_size,
                                        "shard_tokens": shard_tokens(s)}))  # as it reads back from plan.json
        if os.path.exists(plan):
            with open(plan, encoding="utf-8") as f:
                before = json.load(f)
            if before != wanted:
                changed = sorted(k for k in set(before) | set(wanted) if before.get(k) != wanted.get(k))
                raise CacheError(f"teacher cache '{cache_dir}' holds a cache of other settings ({', '.join(changed)} "
                                 f"differ); choose another --teacher-cache dir or delete this one")
        atomic_write_text(json.dumps(wanted, indent=2) + "\n", plan)
    if os.path.exists(manifest_path):
        return read_cache_manifest(cache_dir)
    if env.ddp:
        torch.distributed.barrier()  # the plan is checked before any rank writes
    total = sum(end - start for start, end in ranges.values())
    bar = tqdm(total=total, disable=not env.is_master, desc="teacher cache", unit="tok", unit_scale=True,
               dynamic_ncols=True)
    for split, (start, end) in ranges.items():
        write_split(cache_dir, split, teacher, s.data_dir, start, end, s, env, ctx, bar)
    bar.close()
    if env.ddp:
        torch.distributed.barrier()
    if env.is_master:
        splits = {}
        for split, (start, end) in ranges.items():
            shards = []
            for j, first, count in shard_plan(start, end, shard_tokens(s)):
                name = f"{split}_{j:06d}.topk"
                shards.append({"file": name, "first": first, "count": count, "bytes":
                               os.path.getsize(os.path.join(cache_dir, name)), "sha256": file_sha256(
                                   os.path.join(cache_dir, name))})
            splits[split] = {"start": start, "end": end, "shards": shards}
        write_manifest(cache_dir, ident, splits)
    if env.ddp:
        torch.distributed.barrier()
    return read_cache_manifest(cache_dir)


def write_manifest(cache_dir, ident, splits):
    atomic_write_text(json.dumps({"format": "teacher-topk", "version": CACHE_VERSION, **ident,
                                  "splits": splits}, indent=2) + "\n", os.path.join(cache_dir, "manifest.json"))


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Reading

def read_cache_manifest(cache_dir):
    path = os.path.join(cache_dir, "manifest.json")
    if not os.path.exists(path):
        raise CacheError(f"'{path}' does not exist: '{cache_dir}' is not a teacher cache, or its writing has not "
                         f"finished (manifest.json is written last); run distill.py --phases cache --teacher-cache "
                         f"{cache_dir} with the run's config")
    with open(path, encoding="utf-8") as f:
        try:
            manifest = json.load(f)
        except json.JSONDecodeError as e:
            raise CacheError(f"'{path}' is not valid JSON ({e})") from e
    for key in ("format", "version", "teacher", "data", "seq_len", "k", "value_dtype", "splits"):
        if key not in manifest:
            raise CacheError(f"'{path}' has no '{key}' key; expected a manifest written by teacher_cache.py")
    if manifest["format"] != "teacher-topk" or manifest["version"] != CACHE_VERSION:
        raise CacheError(f"'{path}': format {manifest['format']} version {manifest['version']}; this code reads "
                         f"teacher-topk version {CACHE_VERSION}")
    return manifest


class TeacherCache:
    """A written cache, opened for reading: `entries(split, offset, count)` gives the ids and log-probabilities of
    offsets [offset, offset + count). Each shard's sha256 is checked the first time it is opened."""

    def __init__(self, cache_dir):
        self.dir = cache_dir
        self.manifest = read_cache_manifest(cache_dir)
        self.k, self.seq_len = self.manifest["k"], self.manifest["seq_len"]
        self._open = {}

    def check_matches(self, *, data_dir, seq_len, teacher_source, teacher=None):
        """Refuse a cache of other shards, another tokenizer, another SEQ_LEN or another teacher (by source and,
        when the teacher is loaded in this run anyway, by config and weights)."""
        m, where = self.manifest, os.path.join(self.dir, "manifest.json")
        if m["data"]["fingerprint"] != data_fingerprint(data_dir):
            raise CacheError(f"{where}: made from the shards of '{m['data']['dir']}', but this run reads "
                             f"'{data_dir}', whose shards or tokenizer differ (data fingerprints "
                             f"{m['data']['fingerprint'][:12]} vs {data_fingerprint(data_dir)[:12]})")
        if m["seq_len"] != seq_len:
            raise CacheError(f"{where}: made with seq_len {m['seq_len']}, this run has seq_len {seq_len}; the "
                             f"teacher saw other contexts, so its distributions differ")
        if os.path.abspath(m["teacher"]["source"]) != os.path.abspath(teacher_source) and \
                m["teacher"]["source"] != teacher_source:
            raise CacheError(f"{where}: made from teacher '{m['teacher']['source']}', this run names teacher "
                             f"'{teacher_source}'")
        if teacher is not None:
            from model import GPTConfig

            # compared as configs, not dicts: a cache written before GPTConfig gained (default-off) fields stays valid
            if GPTConfig.from_dict(m["teacher"]["config"]) != teacher.config or \
                    m["teacher"]["weights_fingerprint"] != weights_fingerprint(teacher):
                raise CacheError(f"{where}: made from other weights or another architecture than the teacher "
                                 f"'{teacher_source}' loaded now (weights fingerprint "
                                 f"{m['teacher']['weights_fingerprint'][:12]} vs {weights_fingerprint(teacher)[:12]})")

    def check_covers(self, split, start, end, hint=""):
        """Refuse a run that would read offsets outside the cached range of `split`."""
        have = self.manifest["splits"].get(split)
        if have is None or start < have["start"] or end > have["end"] or start % self.seq_len:
            covered = f"[{have['start']:,}, {have['end']:,})" if have else "nothing"
            raise CacheError(f"teacher cache '{self.dir}': this run reads {split} offsets [{start:,}, {end:,}), "
                             f"but the cache covers {covered} of split '{split}'{hint}")

    def entries(self, split, offset, count, device="cpu"):
        """(ids int64 (count, k), values float32 (count, k + 2)) for offsets [offset, offset + count)."""
        info = self.manifest["splits"][split]
        ids, values = [], []
        for shard in info["shards"]:
            lo, hi = max(offset, shard["first"]), min(offset + count, shard["first"] + shard["count"])
            if lo >= hi:
                continue
            shard_ids, shard_values = self._shard(shard)
            ids.append(torch.from_numpy(shard_ids[lo - shard["first"]:hi - shard["first"]].astype(np.int64)))
            values.append(decode_values(shard_values[lo - shard["first"]:hi - shard["first"]], self._code))
        return torch.cat(ids).to(device), torch.cat(values).to(device)

    def _shard(self, shard):
        if shard["file"] not in self._open:
            self._open[shard["file"]] = open_shard(os.path.join(self.dir, shard["file"]), shard, self.k)
        ids, values, self._code = self._open[shard["file"]]
        return ids, values


def open_shard(path, record, k):
    """Memory-map a shard after checking its size, header and sha256 against the manifest's record."""
    if not os.path.exists(path):
        raise CacheError(f"teacher cache shard '{path}' is missing")
    size = os.path.getsize(path)
    if size != record["bytes"]:
        raise CacheError(f"teacher cache shard '{path}' has {size} bytes, the manifest says {record['bytes']}: it "
                         f"is truncated or was replaced; rewrite the cache")
    if file_sha256(path) != record["sha256"]:
        raise CacheError(f"teacher cache shard '{path}' does not match its sha256 in the manifest: it is "
                         f"corrupted; rewrite the cache (python teacher_cache.py verify DIR checks every shard)")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, shard_k, count, id_bytes, code = (int(v) for v in header[:6])
    if magic != CACHE_MAGIC or version != CACHE_VERSION or shard_k != k or count != record["count"]:
        raise CacheError(f"teacher cache shard '{path}': header (magic {magic}, version {version}, k {shard_k}, "
                         f"count {count}) does not match the manifest")
    ids = np.memmap(path, dtype="<u2" if id_bytes == 2 else "<i4", mode="r", offset=HEADER_BYTES,
                    shape=(count, k))
    values = np.memmap(path, dtype="<i2" if code == -16 else ("<f2" if code == 16 else "<f4"), mode="r",
                       offset=HEADER_BYTES + count * k * id_bytes, shape=(count, k + 2))
    return ids, values, code


# ----------------------------------------------------------------------------------------------------------
# distill.py's use of it: --phases cache writes the windows its phase 2 and evals read; phase 2 opens it

def write_for_run(s, env, ctx):
    """--phases cache: the teacher's top-k entries over the train windows that phase 2 with distill.py's settings
    `s` will read and the val windows every eval reads, into TEACHER_CACHE. No run dir, no student."""
    if not s.teacher_cache:
        raise ConfigError("phases = cache writes the teacher cache: give --teacher-cache DIR")
    t0 = time.perf_counter()
    teacher, teacher_checkpoint = load_model(s.teacher)
    teacher.to(env.device).eval().requires_grad_(False)
    check_data_matches_tokenizer(s.data_dir, load_tokenizer(tokenizer_source(s.teacher, teacher_checkpoint)),
                                 teacher.config.vocab_size)
    window = s.batch_size * s.seq_len
    start = s.cache_from if s.cache_from is not None else s.rotations * s.num_batches * window * env.world_size
    # the train offsets phase 2 will read from there (shuffled: the span of the split its rounds fall in)
    loader = TokenLoader(s.data_dir, "train", s.batch_size, s.seq_len, world_size=env.world_size,
                         order=s.data_order, seed=s.seed, grad_accum=s.grad_accum)
    loader.position = start
    ranges = {"train": loader.span(s.max_steps), "val": (0, n_val_windows(s) * window)}
    say(f"teacher cache {s.teacher_cache}: top-{s.cache_k} in {s.cache_dtype} of {s.teacher} over train offsets "
        f"[{ranges['train'][0]:,}, {ranges['train'][1]:,}) and val [0, {ranges['val'][1]:,})")
    t1 = time.perf_counter()
    write_cache(s.teacher_cache, teacher, s.teacher, ranges, s, env, ctx)
    tokens, seconds = sum(b - a for a, b in ranges.values()), time.perf_counter() - t1
    say(f"teacher cache written: {tokens:,} tokens in {seconds:.1f}s ({tokens / seconds:,.0f} tok/s; "
        f"{t1 - t0:.1f}s loading before): {s.teacher_cache}")


def n_val_windows(s):
    """How many val windows every eval reads (data.val_batches cuts them the same way)."""
    total = sum(r["ntok"] for r in read_manifest(s.data_dir)["shards"] if r["split"] == "val")
    return (min(s.eval_tokens, total) - 1) // (s.batch_size * s.seq_len)


def open_for_run(s, teacher):
    """TEACHER_CACHE, checked against distill.py's settings `s` before anything trains: data, SEQ_LEN, teacher (and
    its weights when the run loads it anyway), TOP_K within the cached k, the val windows covered."""
    cache = TeacherCache(s.teacher_cache)
    cache.check_matches(data_dir=s.data_dir, seq_len=s.seq_len, teacher_source=s.teacher, teacher=teacher)
    if s.top_k > cache.k:
        raise ConfigError(f"top_k = {s.top_k}, but teacher cache '{s.teacher_cache}' holds only the top "
                          f"{cache.k} ids per token; use top_k <= {cache.k} (0 = all {cache.k})")
    cache.check_covers("val", 0, n_val_windows(s) * s.batch_size * s.seq_len, " (eval_tokens or batch_size differ "
                       "from the settings the cache was written with)")
    say(f"teacher cache {s.teacher_cache}: top-{cache.k} {cache.manifest['value_dtype']} entries of "
        f"{cache.manifest['teacher']['source']}; phase 2 runs no teacher")
    return cache


def val_entries(cache, s, env):
    """The cache's entries of this rank's val windows, on the device (data.val_batches' windows r, r+W, ...)."""
    window = s.batch_size * s.seq_len
    return [cache.entries("val", w * window, window, env.device)
            for w in range(env.rank, n_val_windows(s), env.world_size)]


# ----------------------------------------------------------------------------------------------------------
# Parquet interop: one row per sequence of SEQ_LEN positions

def export_parquet(cache_dir, out_path):
    """Columns: split, idx (the sequence's index in the stream: its first offset / SEQ_LEN), topk_indices
    list<int32> and topk_values list<float32> (SEQ_LEN x k, row-major; log-probabilities), tail_logprob and
    target_logprob list<float32> (SEQ_LEN). The cache's manifest rides along in the file's metadata."""
    cache = TeacherCache(cache_dir)
    T, k = cache.seq_len, cache.k
    meta = {key: v for key, v in cache.manifest.items() if key != "splits"}
    meta["ranges"] = {split: [info["start"], info["end"]] for split, info in cache.manifest["splits"].items()}
    schema = pa.schema([("split", pa.string()), ("idx", pa.int64()), ("topk_indices", pa.list_(pa.int32())),
                        ("topk_values", pa.list_(pa.float32())), ("tail_logprob", pa.list_(pa.float32())),
                        ("target_logprob", pa.list_(pa.float32()))], metadata={"teacher_cache": json.dumps(meta)})
    tmp = f"{out_path}.tmp.{os.getpid()}"
    with pq.ParquetWriter(tmp, schema) as writer:
        for split, info in cache.manifest["splits"].items():
            for shard in info["shards"]:
                ids, values = cache.entries(split, shard["first"], shard["count"])
                rows = shard["count"] // T
                writer.write_table(pa.table({
                    "split": [split] * rows,
                    "idx": np.arange(shard["first"] // T, shard["first"] // T + rows, dtype=np.int64),
                    "topk_indices": list(ids.to(torch.int32).reshape(rows, T * k).numpy()),
                    "topk_values": list(values[:, :k].reshape(rows, T * k).numpy()),
                    "tail_logprob": list(values[:, k].reshape(rows, T).numpy()),
                    "target_logprob": list(values[:, k + 1].reshape(rows, T).numpy())}, schema=schema))
    os.replace(tmp, out_path)


def import_parquet(in_path, cache_dir, shard_tokens=2 ** 20, foreign=None):
    """A cache from a parquet file: one written by export_parquet (its metadata says what it was made from), or
    a seed's file of `idx`, `topk_indices`, `topk_values` only, one row per sequence of SEQ_LEN tokens (idx its
    index in the train stream, values log-probabilities), when `foreign` gives what the file does not say:
    {"ident": identity(...) of the teacher and data it was made from, "split"}. A seed's file has no tail column:
    the tail is log(1 - the top k's mass), and the target log-probs are unknown (NaN: evals report no teacher CE)."""
    table = pq.read_table(in_path)
    raw = (table.schema.metadata or {}).get(b"teacher_cache")
    if raw is None and foreign is None:
        raise CacheError(f"'{in_path}' has no teacher_cache metadata: give the teacher, data dir and seq_len it "
                         f"was made with (teacher_cache.py import --teacher T --data-dir D --seq-len N)")
    if raw is None:
        table = with_tail_and_target(table, foreign["ident"]["seq_len"], in_path)
        idx = table.column("idx").to_numpy()
        T = foreign["ident"]["seq_len"]
        meta = {**foreign["ident"], "ranges": {foreign["split"]: [int(idx.min()) * T, (int(idx.max()) + 1) * T]}}
        table = table.append_column("split", pa.array([foreign["split"]] * len(table)))
    else:
        meta = json.loads(raw)
    T, k = meta["seq_len"], meta["k"]
    os.makedirs(cache_dir, exist_ok=True)
    ident = {key: meta[key] for key in ("teacher", "data", "seq_len", "k", "value_dtype")}
    splits = {}
    for split, (start, end) in meta["ranges"].items():
        rows = table.filter(pc.equal(table.column("split"), split)).sort_by("idx")
        idx = rows.column("idx").to_numpy()
        if len(idx) != (end - start) // T or (len(idx) and (idx[0] != start // T or np.any(np.diff(idx) != 1))):
            raise CacheError(f"'{in_path}': split {split} should hold sequences {start // T}..{end // T - 1} in "
                             f"full, one row each")
        ids = torch.from_numpy(np.stack(rows.column("topk_indices").to_numpy(zero_copy_only=False)).astype(
            np.int64).reshape(-1, k))
        values = torch.cat([torch.from_numpy(np.stack(rows.column(c).to_numpy(zero_copy_only=False)).astype(
            np.float32).reshape(-1, n)) for c, n in (("topk_values", k), ("tail_logprob", 1),
                                                     ("target_logprob", 1))], dim=1)
        shards = []
        per_shard = max(T, shard_tokens // T * T)
        for j, first, count in shard_plan(start, end, per_shard):
            name = f"{split}_{j:06d}.topk"
            path = os.path.join(cache_dir, name)
            write_shard(path, ids[first - start:first - start + count], values[first - start:first - start + count],
                        meta["value_dtype"], T, meta["teacher"]["config"]["vocab_size"])
            shards.append({"file": name, "first": first, "count": count, "bytes": os.path.getsize(path),
                           "sha256": file_sha256(path)})
        splits[split] = {"start": start, "end": end, "shards": shards}
    write_manifest(cache_dir, ident, splits)


def with_tail_and_target(table, seq_len, in_path):
    """A seed's table with the columns export_parquet writes beside its ids and values."""
    n = len(table.column("topk_values")[0]) if len(table) else 0
    if n % seq_len:
        raise CacheError(f"'{in_path}': a row holds {n} values, not a multiple of seq_len {seq_len}; expected one "
                         f"row per sequence of seq_len tokens x k")
    values = np.stack(table.column("topk_values").to_numpy(zero_copy_only=False)).astype(np.float64)
    values = values.reshape(len(table), seq_len, n // seq_len)
    if np.any(values > 1e-6):
        raise CacheError(f"'{in_path}': topk_values holds values > 0, so they are not log-probabilities (logits "
                         f"cannot be normalised without the whole vocabulary)")
    tail = np.log(np.clip(1 - np.exp(values).sum(-1), 1e-30, None)).astype(np.float32)
    target = np.full(tail.shape, np.nan, dtype=np.float32)
    return table.append_column("tail_logprob", pa.array(list(tail))).append_column(
        "target_logprob", pa.array(list(target)))


def verify(cache_dir):
    """Re-hash every shard against the manifest; returns the number of bad shards (each printed)."""
    cache = TeacherCache(cache_dir)
    bad = 0
    for info in cache.manifest["splits"].values():
        for shard in info["shards"]:
            try:
                open_shard(os.path.join(cache_dir, shard["file"]), shard, cache.k)
            except CacheError as e:
                print(e)
                bad += 1
    n = sum(len(info["shards"]) for info in cache.manifest["splits"].values())
    print(f"{cache_dir}: {n - bad} of {n} shards match manifest.json")
    return bad


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="Check, export or import a teacher cache (see the module docstring).")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("verify").add_argument("cache_dir")
    export = sub.add_parser("export")
    export.add_argument("cache_dir")
    export.add_argument("out_parquet")
    imp = sub.add_parser("import", help="a parquet of ours, or a seed's given --teacher, --data-dir and --seq-len")
    imp.add_argument("in_parquet")
    imp.add_argument("cache_dir")
    imp.add_argument("--shard-tokens", type=int, default=2 ** 20)
    imp.add_argument("--teacher", help="a seed's file: the teacher it was made from (loaded for its fingerprint)")
    imp.add_argument("--data-dir", help="a seed's file: the prepared data whose train stream idx indexes")
    imp.add_argument("--seq-len", type=int, help="a seed's file: tokens per row")
    imp.add_argument("--split", default="train")
    imp.add_argument("--value-dtype", choices=sorted(VALUE_CODES), default="float16")
    a = p.parse_args(argv)
    try:
        if a.command == "verify":
            sys.exit(1 if verify(a.cache_dir) else 0)
        if a.command == "export":
            export_parquet(a.cache_dir, a.out_parquet)
            return
        foreign = None
        if a.teacher:
            first = pq.read_table(a.in_parquet).column("topk_indices")[0]
            teacher, _ = load_model(a.teacher)
            foreign = {"split": a.split, "ident": identity(a.teacher, teacher, a.data_dir, a.seq_len,
                                                           len(first) // a.seq_len, a.value_dtype)}
        import_parquet(a.in_parquet, a.cache_dir, a.shard_tokens, foreign)
    except CacheError as e:
        sys.exit(f"teacher_cache.py: {e}")


if __name__ == "__main__":
    main()
