"""Token shards on disk, and the batches that train.py and distill.py read from them.

A shard (llm.c's format): a header of 256 little-endian int32 -- [0] magic 20240520, [1] version 1, [2] ntok --
then ntok little-endian uint16 token ids. A dataset directory holds shards and manifest.json; prepare.py writes
the manifest last, so a directory without one is unfinished. Every reader of a shard goes through load_shard.

A conversation dataset (prepare.py --format chat | instruct) adds a mask shard beside each token shard: the same
header with magic 20241201, then one uint8 of flags per token: LOSS (1) on the tokens the loss trains on (the
assistant's), START (2) on the first token of each conversation. Its shards hold whole conversations, and
ConversationLoader batches them so that no conversation sees another.

torch is imported inside the functions that make tensors: prepare.py's tokenizer worker processes import this
file for the shard format and need no torch (importing it costs each one ~1.5 s and ~150 MB).
"""
import bisect
import hashlib
import json
import os

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_SHARD_TOKENS = 2**31 - 1  # ntok is an int32 in the header
MASK_MAGIC = 20241201  # a mask shard: the same header, then ntok uint8 flags, one per token of its token shard
LOSS, START = 1, 2  # mask flag bits: the token is a target of the loss (assistant); a conversation starts here

MANIFEST_KEYS = ("shards", "tokenizer", "totals")
SHARD_KEYS = ("split", "file", "bytes", "sha256", "ntok")
TOKENIZER_KEYS = ("source", "vocab_size", "fingerprint", "separator_id", "separator_token")
LOADER_ORDERS = ("stream", "shuffled")  # TokenLoader: the stream in order, or its rounds of windows shuffled each epoch


class ShardError(ValueError):
    """A shard that is missing, truncated or not in our format; the message names the file and the fault."""


# ----------------------------------------------------------------------------------------------------------
# Shards

def write_shard(path, tokens):
    """Write `tokens` as a shard, atomically (temp file, fsync, rename). Returns the file's sha256 hex."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"shard '{path}': expected a 1-D array of token ids, got shape {tokens.shape}")
    if tokens.dtype != np.uint16:
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"shard '{path}': expected integer token ids, got dtype {tokens.dtype}")
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.uint16).max):
            raise ValueError(f"shard '{path}': token ids must fit uint16 (0..65535), "
                             f"got min {tokens.min()} and max {tokens.max()}")
    return write_array(path, np.ascontiguousarray(tokens, dtype="<u2"), MAGIC)


def write_mask_shard(path, flags):
    """Write a conversation dataset's per-token flags (LOSS, START bits; uint8) beside its token shard."""
    flags = np.asarray(flags)
    if flags.ndim != 1 or flags.dtype != np.uint8:
        raise ValueError(f"mask shard '{path}': expected a 1-D uint8 array, got {flags.dtype} of shape {flags.shape}")
    return write_array(path, np.ascontiguousarray(flags), MASK_MAGIC)


def write_array(path, body, magic):
    if not 0 < body.size <= MAX_SHARD_TOKENS:
        raise ValueError(f"shard '{path}': expected 1..{MAX_SHARD_TOKENS} tokens, got {body.size}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = magic, VERSION, body.size
    digest = hashlib.sha256(header.tobytes())
    digest.update(memoryview(body))
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(memoryview(body))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return digest.hexdigest()


def load_shard(path):
    """Validate a shard's header and size, then map its tokens (uint16, no copy into memory)."""
    return load_array(path, MAGIC, np.uint16, "token shard")


def load_mask_shard(path):
    """Validate a mask shard's header and size, then map its per-token flags (uint8)."""
    return load_array(path, MASK_MAGIC, np.uint8, "mask shard")


def load_array(path, expected_magic, dtype, kind):
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise ShardError(f"shard '{path}' does not exist") from None
    if size < HEADER_BYTES:
        raise ShardError(f"shard '{path}' is truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, ntok = (int(v) for v in header[:3])
    if magic != expected_magic:
        raise ShardError(f"shard '{path}' has magic {magic}, expected {expected_magic}: not a {kind} of this repo")
    if version != VERSION:
        raise ShardError(f"shard '{path}' has format version {version}, expected {VERSION}")
    if ntok <= 0:
        raise ShardError(f"shard '{path}' header says ntok={ntok}, expected a positive token count")
    width = np.dtype(dtype).itemsize
    expected = HEADER_BYTES + width * ntok
    if size != expected:
        raise ShardError(f"shard '{path}' is {size} bytes but its header says ntok={ntok}, so it should be "
                         f"{expected} bytes ({HEADER_BYTES} header + {width} * ntok): truncated or a wrong token "
                         f"count")
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(ntok,))


def read_manifest(data_dir):
    """Load data_dir/manifest.json and check that the keys readers rely on are there."""
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"'{path}' does not exist: '{data_dir}' is not a prepared dataset, or prepare.py "
                                f"has not finished there (it writes the manifest last); run "
                                f"`python prepare.py --out-dir {data_dir}`")
    with open(path, encoding="utf-8") as f:
        try:
            manifest = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"'{path}' is not valid JSON ({e})") from e
    for key in MANIFEST_KEYS:
        if key not in manifest:
            raise ValueError(f"'{path}' has no '{key}' key; expected a manifest written by prepare.py")
    for i, shard in enumerate(manifest["shards"]):
        for key in SHARD_KEYS:
            if key not in shard:
                raise ValueError(f"'{path}': shards[{i}] has no '{key}' key (it has {sorted(shard)})")
    for key in TOKENIZER_KEYS:
        if key not in manifest["tokenizer"]:
            raise ValueError(f"'{path}': 'tokenizer' has no '{key}' key (it has {sorted(manifest['tokenizer'])})")
    return manifest


def tokenizer_fingerprint(tokenizer):
    """sha256 of the token -> id mapping, added tokens included, as canonical JSON.

    Only the vocabulary goes in, not file layout or config, so the same tokenizer gives the same fingerprint
    whether it was loaded from a hub snapshot, a local dir or a GGUF-converted dir. Accepts a transformers
    tokenizer or a raw `tokenizers.Tokenizer`.
    """
    import tokenizers

    if isinstance(tokenizer, tokenizers.Tokenizer):
        vocab = tokenizer.get_vocab(with_added_tokens=True)
    else:
        vocab = tokenizer.get_vocab()  # transformers' get_vocab includes added tokens
    canonical = json.dumps(sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])), ensure_ascii=False,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Batches

class TokenLoader:
    """Endless (x, y) batches from one split: its shards in order form one flat stream that wraps at the end.

    Window k is stream[k*B*T : k*B*T + B*T + 1], so a batch may cross document and shard boundaries. Rank r of
    W reads windows r, r+W, r+2W, ...: together the ranks read each window once. Where the ranks are in the
    stream is one integer (`position`, the same on every rank), which makes resume exact.

    order="shuffled" reads the same windows in a random order instead, by rounds of one optimizer step's
    windows (grad_accum x W consecutive windows: micro-batch k of rank r reads window k*W + r of its round): a
    fresh permutation of the split's whole rounds each epoch, drawn from (seed, epoch). A corpus stored book
    after book is then sampled all over from the first step, as nanoGPT's random windows are; a web corpus that
    prepare.py streams is shuffled already. `position` still counts the tokens read, so resume stays exact, and
    a round depends only on B * grad_accum * W, so trading processes for batch rows or micro-batches reads the
    same tokens, as in stream order. A resume with another round size continues another permutation. The
    split's last partial round is never read in this order.
    """

    def __init__(self, data_dir, split, batch_size, seq_len, *, rank=0, world_size=1, device="cpu", vocab_size=None,
                 order="stream", seed=0, grad_accum=1):
        if order not in LOADER_ORDERS:
            raise ValueError(f"loader order '{order}': expected one of {LOADER_ORDERS}")
        if order == "shuffled" and seed < 0:
            raise ValueError(f"seed {seed}: a shuffled loader order needs a seed >= 0")
        manifest = read_manifest(data_dir)
        shards = [s for s in manifest["shards"] if s["split"] == split]
        if not shards:
            present = sorted({s["split"] for s in manifest["shards"]})
            raise ValueError(f"'{os.path.join(data_dir, 'manifest.json')}' lists no '{split}' shards "
                             f"(splits present: {present})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.data_dir, self.split = data_dir, split
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.device, self.vocab_size = str(device), vocab_size
        self.paths = [os.path.join(data_dir, s["file"]) for s in shards]
        self.sizes = [int(s["ntok"]) for s in shards]
        self.starts = [0]
        for n in self.sizes[:-1]:
            self.starts.append(self.starts[-1] + n)
        self.total = sum(self.sizes)
        if self.total < batch_size * seq_len + 1:
            raise ValueError(f"split '{split}' of '{data_dir}' has {self.total} tokens, fewer than one batch "
                             f"window of batch_size * seq_len + 1 = {batch_size * seq_len + 1}")
        self.order, self.seed = order, seed
        self.round_tokens = grad_accum * world_size * batch_size * seq_len  # one optimizer step's windows
        self.rounds = (self.total - 1) // self.round_tokens  # whole rounds, each with its +1 token
        if order == "shuffled" and self.rounds == 0:
            raise ValueError(f"split '{split}' of '{data_dir}' has {self.total} tokens, fewer than one round of "
                             f"grad_accum x world_size windows ({self.round_tokens + 1} tokens) to shuffle")
        self._permutation = (None, None)  # (epoch, its order of the rounds), drawn when first needed
        self._shards = {}  # shard index -> memmap; opened, and vocab-checked, on first use
        self.position = 0  # stream offset where the ranks' next round of windows starts
        self.last_start = None  # the stream offset of the window next_batch returned last

    @property
    def epoch(self):
        """How many passes over the split have finished: the stream wrapped, or every round was shuffled in."""
        if self.order == "shuffled":
            return self.position // (self.rounds * self.round_tokens)
        return self.position // self.total

    def next_batch(self):
        window = self.batch_size * self.seq_len
        self.last_start = self.stream_offset(self.position) + self.rank * window
        batch = self.window_at(self.last_start)
        self.position += self.world_size * window
        return batch

    def stream_offset(self, position):
        """The stream offset where the ranks' windows start when `position` tokens have been read."""
        if self.order == "stream":
            return position
        epoch, index = divmod(position // self.round_tokens, self.rounds)
        if self._permutation[0] != epoch:
            self._permutation = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.rounds))
        return int(self._permutation[1][index]) * self.round_tokens + position % self.round_tokens

    def span(self, steps):
        """[first, last) stream offsets that the next `steps` rounds (optimizer steps) read (unwrapped: a stream-
        order span may run past the split's end, as the teacher cache counts offsets). Reads nothing."""
        if self.order == "stream" or steps <= 0:
            return self.position, self.position + max(steps, 0) * self.round_tokens
        starts = [self.stream_offset(self.position + k * self.round_tokens) for k in range(steps)]
        return min(starts), max(starts) + self.round_tokens

    def state_dict(self):
        # no batch size, seq_len or world size: a resume may change them (train.py reports what changed) and the
        # stream position alone says where to continue; epoch is derived, there for whoever reads the checkpoint
        return {"split": self.split, "position": self.position, "total_tokens": self.total, "epoch": self.epoch,
                "order": self.order, "seed": self.seed}

    def load_state_dict(self, state):
        """Continue at the saved stream position (any rank may load rank 0's state: it is the same on all).

        The position is a token offset, so it stays valid under another batch size, seq_len or world size: the
        next windows start where the saved run stopped. Only the split and the token count must match.
        """
        if state["split"] != self.split or int(state["total_tokens"]) != self.total:
            raise ValueError(f"loader state is for split '{state['split']}' with {state['total_tokens']} tokens, "
                             f"but this loader reads split '{self.split}' of '{self.data_dir}' with {self.total} "
                             f"tokens: the data changed since the checkpoint was saved")
        saved = (state.get("order", "stream"), int(state.get("seed", 0)))  # states saved before orders: stream
        if saved[0] != self.order or (self.order == "shuffled" and saved[1] != self.seed):
            raise ValueError(f"loader state was saved reading split '{self.split}' in order {saved[0]} (seed "
                             f"{saved[1]}), but this loader reads it in order {self.order} (seed {self.seed}): "
                             f"resume with the order and seed of the saved run")
        self.position = int(state["position"])

    def spread_windows(self, count):
        """`count` windows for this rank, spread evenly over the whole split instead of its first `count` rounds:
        a fit on them sees all of the corpus, not only its first documents (a local corpus is often stored book
        after book). Rounds of the ranks are placed as next_batch places them (rank r reads B*T tokens at offset
        r*B*T in each), so W ranks with batch B read exactly the tokens one process with batch W*B reads. A split
        with fewer than `count` whole rounds gives them in stream order, wrapping. Reads only."""
        window = self.batch_size * self.seq_len
        step = window * self.world_size  # one round of the ranks
        whole = (self.total - 1) // step
        return [self.window_at((k * whole // count if whole >= count else k) * step + self.rank * window)
                for k in range(count)]

    def window_at(self, start):
        """The window of B*T+1 tokens at stream offset `start` (wrapping), as (x, y) int64 (B, T) on the device.

        Reads only: it does not move the loader's position.
        """
        import torch

        B, T = self.batch_size, self.seq_len
        buf = torch.from_numpy(self._tokens(start, B * T + 1).astype(np.int64))
        if self.device.startswith("cuda"):
            # one pinned host buffer, copied once; x and y are views of it on the GPU
            buf = buf.pin_memory().to(self.device, non_blocking=True)
        return buf[:-1].view(B, T), buf[1:].view(B, T)

    def _tokens(self, start, count):
        out = np.empty(count, dtype=np.uint16)
        pos, filled = start % self.total, 0
        while filled < count:
            i = bisect.bisect_right(self.starts, pos) - 1
            lo = pos - self.starts[i]
            n = min(count - filled, self.sizes[i] - lo)
            out[filled:filled + n] = self._shard(i)[lo:lo + n]
            filled += n
            pos = (pos + n) % self.total
        return out

    def _shard(self, i):
        if i not in self._shards:
            tokens = load_shard(self.paths[i])
            if len(tokens) != self.sizes[i]:
                raise ShardError(f"shard '{self.paths[i]}' holds {len(tokens)} tokens but manifest.json says "
                                 f"{self.sizes[i]}")
            if self.vocab_size is not None:
                check_token_ids(f"shard '{self.paths[i]}'", int(tokens.max()), self.vocab_size)
            self._shards[i] = tokens
        return self._shards[i]


def val_batches(data_dir, batch_size, seq_len, num_tokens, rank=0, world_size=1, *, device="cpu", vocab_size=None):
    """The fixed val set: the first `num_tokens` val tokens (or all, if fewer) cut into windows of B*T+1.

    The windows do not depend on the world size; rank r yields windows r, r+W, ..., so summing losses and token
    counts over ranks gives the same number for any W. Checks happen here, before the first batch.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    loader = TokenLoader(data_dir, "val", batch_size, seq_len, device=device, vocab_size=vocab_size)
    window = batch_size * seq_len
    n_windows = (min(num_tokens, loader.total) - 1) // window
    if n_windows < 1:
        raise ValueError(f"val: num_tokens={num_tokens} is less than one window of batch_size * seq_len + 1 = "
                         f"{window + 1} tokens")
    return (loader.window_at(k * window) for k in range(rank, n_windows, world_size))


class ConversationLoader:
    """Endless (x, y, segments) batches of whole conversations from one split of a conversation dataset.

    Rows are built once, in the data's order: pack=True fills each row of seq_len + 1 tokens with as many whole
    conversations as fit (greedy, in order; the rest of the row is padding), pack=False puts one conversation in
    each row, padded to the batch's longest. y is -100 except where the next token is a LOSS token of the same
    conversation. segments (B, T) numbers the conversations of each row (padding is -1) for the model's
    block-diagonal attention; with pack=False it is None, since padding only follows the one conversation and a
    causal mask already keeps it out. Rank r of W reads rows r*B.. of each round of W*B rows; where the ranks are
    is one integer (`position`, in rows), so resume is exact.
    """

    def __init__(self, data_dir, split, batch_size, seq_len, *, pack=True, rank=0, world_size=1, device="cpu",
                 vocab_size=None):
        manifest = read_manifest(data_dir)
        if not manifest.get("conversations"):
            raise ValueError(f"'{os.path.join(data_dir, 'manifest.json')}' is a plain-text dataset: it has no "
                             f"loss masks (prepare it with --format chat or --format instruct)")
        shards = [s for s in manifest["shards"] if s["split"] == split]
        if not shards:
            raise ValueError(f"'{os.path.join(data_dir, 'manifest.json')}' lists no '{split}' shards")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.data_dir, self.split, self.pack = data_dir, split, pack
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size, self.device = rank, world_size, str(device)
        self.tokens, self.flags, starts = [], [], []  # per shard; starts: (shard, offset, length) per conversation
        for i, shard in enumerate(shards):
            tokens, flags = load_conversation_shard(data_dir, shard, vocab_size)
            first = np.flatnonzero(flags & START)
            if len(first) == 0 or first[0] != 0:
                raise ShardError(f"mask shard '{shard['mask']['file']}' does not start with a conversation: its "
                                 f"shards must hold whole conversations (prepare.py writes them so)")
            lengths = np.diff(np.append(first, len(tokens)))
            starts.append(np.stack([np.full_like(first, i), first, lengths], axis=1))
            self.tokens.append(tokens)
            self.flags.append(flags)
        self.conversations = np.concatenate(starts)  # (n, 3): shard, offset, length
        lengths = self.conversations[:, 2]
        if lengths.max() > seq_len + 1:
            raise ValueError(f"split '{split}' of '{data_dir}': {int((lengths > seq_len + 1).sum())} conversations "
                             f"are longer than seq_len + 1 = {seq_len + 1} tokens (the longest has "
                             f"{int(lengths.max())}); raise seq_len or prepare with --max-length {seq_len + 1}")
        self.row_bounds = pack_rows(lengths, seq_len + 1) if pack else np.arange(len(lengths) + 1)
        self.n_rows = len(self.row_bounds) - 1
        self.position = 0  # rows read by all ranks together

    @property
    def epoch(self):
        return self.position // self.n_rows

    def next_batch(self):
        first = self.position + self.rank * self.batch_size
        self.position += self.world_size * self.batch_size
        return self.rows_batch([(first + b) % self.n_rows for b in range(self.batch_size)])

    def state_dict(self):
        return {"split": self.split, "position": self.position, "rows": self.n_rows,
                "conversations": len(self.conversations), "pack": self.pack, "seq_len": self.seq_len,
                "epoch": self.epoch}

    def load_state_dict(self, state):
        """Continue at the saved row. Rows depend on seq_len and packing, so both must be as saved."""
        if "conversations" not in state:
            raise ValueError(f"loader state {state} is from a plain-text run; '{self.data_dir}' holds conversations")
        mine = (self.split, len(self.conversations), self.pack, self.seq_len)
        saved = (state["split"], state["conversations"], state["pack"], state["seq_len"])
        if saved != mine:
            raise ValueError(f"loader state is for (split, conversations, pack, seq_len) = {saved}, but this loader "
                             f"reads {mine} from '{self.data_dir}': the data or the row layout changed since the "
                             f"checkpoint was saved")
        self.position = int(state["position"])

    def row_tokens(self, row):
        lo, hi = self.row_bounds[row], self.row_bounds[row + 1]
        return int(self.conversations[lo:hi, 2].sum())

    def rows_batch(self, rows):
        """The batch made of these rows: x, y int64 (B, T') and segments int64 (B, T') or None (pack=False)."""
        import torch

        width = self.seq_len + 1 if self.pack else max(self.row_tokens(r) for r in rows)
        tokens = np.zeros((len(rows), width), np.int64)
        flags = np.zeros((len(rows), width), np.uint8)
        segments = np.full((len(rows), width), -1, np.int64)
        for b, row in enumerate(rows):
            at = 0
            for n, (shard, start, length) in enumerate(self.conversations[self.row_bounds[row]:
                                                                          self.row_bounds[row + 1]]):
                tokens[b, at:at + length] = self.tokens[shard][start:start + length]
                flags[b, at:at + length] = self.flags[shard][start:start + length]
                segments[b, at:at + length] = n
                at += length
        # position t predicts token t + 1: a target only if that token is a LOSS token of the same conversation
        is_target = (flags[:, 1:] & LOSS).astype(bool) & (segments[:, 1:] == segments[:, :-1])
        y = np.where(is_target, tokens[:, 1:], -100)
        x, y, seg = (torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
                     for a in (tokens[:, :-1], y, segments[:, :-1]))
        return x, y, seg if self.pack else None


def pack_rows(lengths, capacity):
    """Row bounds for greedy packing in order: row r holds conversations bounds[r]..bounds[r+1]-1, whose lengths
    sum to at most `capacity`. In order, not best-fit: the data order (and with it resume) stays the source's."""
    bounds, used = [0], 0
    for i, n in enumerate(lengths.tolist()):
        if used + n > capacity:
            bounds.append(i)
            used = 0
        used += n
    bounds.append(len(lengths))
    return np.asarray(bounds)


def load_conversation_shard(data_dir, shard, vocab_size=None):
    """A conversation dataset's token shard and its mask shard, checked against each other and the manifest."""
    path = os.path.join(data_dir, shard["file"])
    tokens = load_shard(path)
    if "mask" not in shard:
        raise ValueError(f"'{os.path.join(data_dir, 'manifest.json')}': shard '{shard['file']}' has no 'mask' "
                         f"entry, but the manifest says the dataset holds conversations")
    flags = load_mask_shard(os.path.join(data_dir, shard["mask"]["file"]))
    if len(tokens) != shard["ntok"] or len(flags) != len(tokens):
        raise ShardError(f"shard '{path}' holds {len(tokens)} tokens and its mask '{shard['mask']['file']}' "
                         f"{len(flags)} flags; manifest.json says {shard['ntok']} (expected all three equal)")
    if vocab_size is not None:
        check_token_ids(f"shard '{path}'", int(tokens.max()), vocab_size)
    return tokens, flags


def conversation_val_batches(data_dir, batch_size, seq_len, num_tokens, rank=0, world_size=1, *, pack=True,
                             device="cpu", vocab_size=None):
    """The fixed val set of a conversation dataset: its first rows up to `num_tokens` tokens (at least one row),
    in batches of batch_size rows (the last may be smaller); rank r yields batches r, r+W, ... The rows, and so
    the summed losses, do not depend on the world size."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    loader = ConversationLoader(data_dir, "val", batch_size, seq_len, pack=pack, device=device,
                                vocab_size=vocab_size)
    row_sizes = np.diff(np.cumsum(np.append(0, loader.conversations[:, 2]))[loader.row_bounds])
    n_rows = max(1, int(np.searchsorted(np.cumsum(row_sizes), num_tokens, side="right")))
    starts = range(0, n_rows, batch_size)
    return (loader.rows_batch(list(range(s, min(s + batch_size, n_rows)))) for s in starts[rank::world_size])


def is_conversation_data(data_dir):
    """Whether prepare.py made this dataset with --format chat or instruct (loss masks beside the tokens)."""
    return bool(read_manifest(data_dir).get("conversations"))


def check_data_matches_tokenizer(data_dir, tokenizer, vocab_size):
    """Refuse shards tokenized by a different tokenizer (by vocabulary fingerprint) or with a bigger vocab."""
    manifest = read_manifest(data_dir)
    recorded = manifest["tokenizer"]
    fingerprint = tokenizer_fingerprint(tokenizer)
    if recorded["fingerprint"] != fingerprint:
        raise SystemExit(f"{data_dir}/manifest.json: shards were made with tokenizer '{recorded['source']}' "
                         f"(fingerprint {recorded['fingerprint'][:12]}), but the model's tokenizer has fingerprint "
                         f"{fingerprint[:12]}; re-run prepare.py with this model's tokenizer")
    if recorded["vocab_size"] > vocab_size:
        raise SystemExit(f"{data_dir}/manifest.json: tokenizer vocab size {recorded['vocab_size']} exceeds the "
                         f"model's vocab_size {vocab_size}")
    return manifest


def check_token_ids(where, largest, vocab_size):
    """Refuse token ids the model's embedding does not have: `largest` is the largest id in `where` (a shard or a
    split, named in the message). One rule for train.py's scan before step 0 and TokenLoader's reads."""
    if largest >= vocab_size:
        raise ShardError(f"{where} holds token id {largest}, but the model's vocab_size is {vocab_size}: the "
                         f"shards were made with a different tokenizer")


def largest_token_id(data_dir, split, rank=0, world_size=1):
    """The largest token id in this rank's share (every world_size-th shard) of a split: one read per shard."""
    shards = [s for s in read_manifest(data_dir)["shards"] if s["split"] == split][rank::world_size]
    return max((int(load_shard(os.path.join(data_dir, s["file"])).max()) for s in shards), default=0)
