"""Shard format, manifest, tokenizer fingerprint and the batch loaders of data.py."""
import io
import json
import os

import numpy as np
import pytest
import torch

from data import (HEADER_BYTES, MAGIC, VERSION, ShardError, TokenLoader, load_shard, read_manifest,
                  tokenizer_fingerprint, val_batches, write_shard)


def make_dataset(path, splits, seed=0, vocab=500):
    """Write shards of random tokens and a manifest; returns {split: the split's tokens concatenated}."""
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    shards, streams = [], {}
    for split, sizes in splits.items():
        parts = []
        for i, n in enumerate(sizes):
            tokens = rng.integers(0, vocab, size=n).astype(np.uint16)
            name = f"{split}_{i:06d}.bin"
            sha = write_shard(os.path.join(path, name), tokens)
            shards.append({"split": split, "file": name, "bytes": HEADER_BYTES + 2 * n, "sha256": sha, "ntok": n})
            parts.append(tokens)
        streams[split] = np.concatenate(parts)
    manifest = {"shards": shards,
                "tokenizer": {"source": "test", "vocab_size": vocab, "fingerprint": "0" * 64, "separator_id": 0,
                              "separator_token": "<|endoftext|>"},
                "totals": {s: {"tokens": int(t.size)} for s, t in streams.items()}}
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return streams


def window(stream, start, n):
    """n tokens of the endless stream from `start`, wrapping around."""
    return np.take(stream, np.arange(start, start + n) % stream.size).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# Shards

def test_write_then_load_round_trips_tokens_as_a_memmap(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65536, size=10_001).astype(np.uint16)
    path = str(tmp_path / "a.bin")
    sha = write_shard(path, tokens)
    loaded = load_shard(path)
    assert isinstance(loaded, np.memmap) and loaded.dtype == np.uint16
    np.testing.assert_array_equal(loaded, tokens)
    raw = open(path, "rb").read()
    assert len(raw) == HEADER_BYTES + 2 * tokens.size
    assert np.frombuffer(raw[:12], "<i4").tolist() == [MAGIC, VERSION, tokens.size]
    import hashlib
    assert sha == hashlib.sha256(raw).hexdigest()
    assert os.listdir(tmp_path) == ["a.bin"]  # the temp file was renamed, not left behind


def test_write_shard_accepts_python_ints_and_refuses_ids_that_do_not_fit_uint16(tmp_path):
    write_shard(str(tmp_path / "ok.bin"), [0, 1, 65535])
    assert load_shard(str(tmp_path / "ok.bin")).tolist() == [0, 1, 65535]
    with pytest.raises(ValueError, match="fit uint16"):
        write_shard(str(tmp_path / "big.bin"), [1, 65536])
    with pytest.raises(ValueError, match="fit uint16"):
        write_shard(str(tmp_path / "neg.bin"), np.array([-1, 3]))
    with pytest.raises(ValueError, match="1..2147483647 tokens"):
        write_shard(str(tmp_path / "empty.bin"), np.zeros(0, np.uint16))
    assert sorted(os.listdir(tmp_path)) == ["ok.bin"]


def corrupt(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("fault, damage, message", [
    ("bad magic", lambda p: corrupt(p, 0, np.array([12345], "<i4").tobytes()), "has magic 12345, expected 20240520"),
    ("bad version", lambda p: corrupt(p, 4, np.array([2], "<i4").tobytes()), "format version 2, expected 1"),
    ("truncated", lambda p: os.truncate(p, os.path.getsize(p) - 2), "should be 1224 bytes"),
    ("wrong count", lambda p: corrupt(p, 8, np.array([101], "<i4").tobytes()), "header says ntok=101"),
    ("zero count", lambda p: corrupt(p, 8, np.array([0], "<i4").tobytes()), "expected a positive token count"),
    ("cut inside header", lambda p: os.truncate(p, 100), "shorter than the 1024-byte header"),
])
def test_load_shard_names_the_file_and_the_fault(tmp_path, fault, damage, message):
    path = str(tmp_path / "shard.bin")
    write_shard(path, np.arange(100, dtype=np.uint16))
    damage(path)
    with pytest.raises(ShardError, match=message) as err:
        load_shard(path)
    assert path in str(err.value)
    assert isinstance(err.value, ValueError)


def test_load_shard_of_a_missing_file_names_it(tmp_path):
    with pytest.raises(ShardError, match="nope.bin' does not exist"):
        load_shard(str(tmp_path / "nope.bin"))


# ----------------------------------------------------------------------------------------------------------
# Manifest and tokenizer identity

def test_read_manifest_names_a_missing_file_and_a_missing_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json' does not exist"):
        read_manifest(str(tmp_path))
    make_dataset(str(tmp_path), {"train": [50]})
    assert read_manifest(str(tmp_path))["shards"][0]["ntok"] == 50
    manifest = json.load(open(tmp_path / "manifest.json"))
    del manifest["shards"][0]["sha256"]
    json.dump(manifest, open(tmp_path / "manifest.json", "w"))
    with pytest.raises(ValueError, match=r"shards\[0\] has no 'sha256' key"):
        read_manifest(str(tmp_path))
    del manifest["tokenizer"]
    json.dump(manifest, open(tmp_path / "manifest.json", "w"))
    with pytest.raises(ValueError, match="has no 'tokenizer' key"):
        read_manifest(str(tmp_path))


def test_tokenizer_fingerprint_depends_on_the_vocabulary_not_on_where_it_was_loaded_from(bpe_tokenizer_dir, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bpe_tokenizer_dir)
    tok.save_pretrained(tmp_path / "copy")
    fingerprint = tokenizer_fingerprint(tok)
    assert len(fingerprint) == 64
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / "copy")) == fingerprint
    assert tokenizer_fingerprint(Tokenizer.from_file(os.path.join(bpe_tokenizer_dir, "tokenizer.json"))) == fingerprint
    tok.add_tokens(["<|extra|>"])
    assert tokenizer_fingerprint(tok) != fingerprint


# ----------------------------------------------------------------------------------------------------------
# Train loader

def test_loader_windows_are_exact_and_cross_shard_boundaries_and_wrap(tmp_path):
    stream = make_dataset(str(tmp_path), {"train": [37, 50, 29]})["train"]
    B, T = 2, 7
    loader = TokenLoader(str(tmp_path), "train", B, T)
    for k in range(40):  # 40 windows of 14 tokens go round the 116-token stream almost 5 times
        x, y = loader.next_batch()
        assert x.dtype == torch.int64 and x.shape == (B, T) and y.shape == (B, T)
        expected = window(stream, k * B * T, B * T + 1)
        assert x.flatten().tolist() == expected[:-1].tolist()
        assert y.flatten().tolist() == expected[1:].tolist()
        assert loader.epoch == ((k + 1) * B * T) // stream.size


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_ranks_read_disjoint_windows_that_together_cover_the_stream(tmp_path, world_size):
    make_dataset(str(tmp_path), {"train": [400, 333]})
    B, T, rounds = 3, 5, 20
    single = TokenLoader(str(tmp_path), "train", B, T)
    expected = [single.next_batch()[0] for _ in range(rounds * world_size)]
    loaders = [TokenLoader(str(tmp_path), "train", B, T, rank=r, world_size=world_size) for r in range(world_size)]
    for i in range(rounds):
        for r, loader in enumerate(loaders):
            x, _ = loader.next_batch()
            assert torch.equal(x, expected[i * world_size + r]), f"round {i} rank {r}"


@pytest.mark.parametrize("order", ["stream", "shuffled"])
def test_resume_from_state_dict_yields_the_same_next_batches_as_an_uninterrupted_run(tmp_path, order):
    make_dataset(str(tmp_path), {"train": [101, 202, 57]})
    B, T = 4, 9
    for world_size in (1, 2):
        for rank in range(world_size):
            loader = TokenLoader(str(tmp_path), "train", B, T, rank=rank, world_size=world_size, order=order, seed=5)
            for _ in range(13):
                loader.next_batch()
            buffer = io.BytesIO()
            torch.save({"loader": loader.state_dict()}, buffer)  # as inside a checkpoint
            buffer.seek(0)
            state = torch.load(buffer, weights_only=True)["loader"]
            resumed = TokenLoader(str(tmp_path), "train", B, T, rank=rank, world_size=world_size, order=order,
                                  seed=5)
            resumed.load_state_dict(state)
            assert resumed.epoch == loader.epoch > 0
            for _ in range(10):
                for a, b in zip(loader.next_batch(), resumed.next_batch()):
                    assert torch.equal(a, b)


def test_resume_with_another_batch_shape_or_world_size_continues_at_the_same_stream_position(tmp_path):
    stream = make_dataset(str(tmp_path), {"train": [500, 123]})["train"]
    loader = TokenLoader(str(tmp_path), "train", 2, 8)
    for _ in range(7):
        loader.next_batch()
    state = loader.state_dict()
    # nothing that a resume may change (the order and seed it may not: refused below)
    assert set(state) == {"split", "position", "total_tokens", "epoch", "order", "seed"}
    old_style = {k: v for k, v in state.items() if k not in ("order", "seed")}  # states saved before orders
    old_style.update(batch_size=2, seq_len=8, world_size=1)  # and before that, these
    for saved in (state, old_style):
        resumed = TokenLoader(str(tmp_path), "train", 3, 5, rank=1, world_size=2)
        resumed.load_state_dict(saved)
        x, y = resumed.next_batch()  # rank 1 of 2 takes the second window after the saved position
        expected = window(stream, 7 * 2 * 8 + 3 * 5, 3 * 5 + 1)
        assert x.flatten().tolist() == expected[:-1].tolist() and y.flatten().tolist() == expected[1:].tolist()
        assert resumed.position == 7 * 2 * 8 + 2 * 3 * 5


def test_shuffled_order_reads_every_whole_round_once_per_epoch_in_a_new_order_and_splits_rounds_as_stream_does(
        tmp_path):
    stream = make_dataset(str(tmp_path), {"train": [400, 333]})["train"]  # 733 tokens: 24 whole windows of 30
    B, T = 6, 5
    loader = TokenLoader(str(tmp_path), "train", B, T, order="shuffled", seed=3)
    epochs = []
    for epoch in range(3):
        starts = []
        for k in range(24):
            assert loader.epoch == epoch
            first, end = loader.span(24 - k)  # what the rest of this epoch reads
            x, y = loader.next_batch()
            starts.append(loader.last_start)
            assert first <= loader.last_start and loader.last_start + B * T <= end
            expected = window(stream, loader.last_start, B * T + 1)
            assert x.flatten().tolist() == expected[:-1].tolist() and y.flatten().tolist() == expected[1:].tolist()
        assert sorted(starts) == [w * B * T for w in range(24)]  # each whole window once; the tail never
        epochs.append(starts)
    assert loader.epoch == 3 and len({tuple(e) for e in epochs}) == 3  # a new permutation each epoch
    assert epochs[0] != sorted(epochs[0])
    other_seed = TokenLoader(str(tmp_path), "train", B, T, order="shuffled", seed=4)
    assert [other_seed.stream_offset(k * B * T) for k in range(24)] != epochs[0]
    assert loader.span(0) == (loader.position, loader.position)
    for world_size in (2, 3):  # W ranks with batch B / W read the rows of one process's windows, in rank order
        ranks = [TokenLoader(str(tmp_path), "train", B // world_size, T, rank=r, world_size=world_size,
                             order="shuffled", seed=3) for r in range(world_size)]
        one = TokenLoader(str(tmp_path), "train", B, T, order="shuffled", seed=3)
        for _ in range(30):
            x, y = one.next_batch()
            rows = [rank.next_batch() for rank in ranks]
            assert torch.equal(torch.cat([r[0] for r in rows]), x) and torch.equal(torch.cat([r[1] for r in rows]), y)
    # one process with 2 micro-batches a step reads what 2 processes with 1 read, step by step, as in stream order
    accum = TokenLoader(str(tmp_path), "train", 3, T, order="shuffled", seed=3, grad_accum=2)
    ranks = [TokenLoader(str(tmp_path), "train", 3, T, rank=r, world_size=2, order="shuffled", seed=3)
             for r in range(2)]
    for step in range(20):
        for k, rank in enumerate(ranks):
            assert torch.equal(accum.next_batch()[0], rank.next_batch()[0]), (step, k)
    state = loader.state_dict()
    for order, seed in (("stream", 3), ("shuffled", 4)):
        with pytest.raises(ValueError, match=r"order shuffled \(seed 3\).*resume with the order and seed"):
            TokenLoader(str(tmp_path), "train", B, T, order=order, seed=seed).load_state_dict(state)
    with pytest.raises(ValueError, match="loader order 'random'"):
        TokenLoader(str(tmp_path), "train", B, T, order="random")
    with pytest.raises(ValueError, match=r"fewer than one round of grad_accum x world_size windows \(901 tokens\)"):
        TokenLoader(str(tmp_path), "train", B, T, rank=0, world_size=30, order="shuffled")
    with pytest.raises(ValueError, match="seed -1: a shuffled loader order needs a seed >= 0"):
        TokenLoader(str(tmp_path), "train", B, T, order="shuffled", seed=-1)


def test_window_at_reads_any_offset_without_moving_the_loader(tmp_path):
    stream = make_dataset(str(tmp_path), {"train": [40, 41]})["train"]
    loader = TokenLoader(str(tmp_path), "train", 2, 4)
    x, y = loader.window_at(75)  # wraps: 75..83 of an 81-token stream
    expected = window(stream, 75, 9)
    assert x.tolist() == expected[:-1].reshape(2, 4).tolist() and y.tolist() == expected[1:].reshape(2, 4).tolist()
    assert loader.position == 0
    assert torch.equal(loader.next_batch()[0], loader.window_at(0)[0])


def test_spread_windows_cover_the_whole_split_and_split_a_batch_over_ranks_as_next_batch_does(tmp_path):
    stream = make_dataset(str(tmp_path), {"train": [400, 333]})["train"]  # 733 tokens: 24 whole windows of 30
    B, T = 6, 5
    one = TokenLoader(str(tmp_path), "train", B, T).spread_windows(6)
    starts = [k * 24 // 6 * B * T for k in range(6)]  # windows 0, 4, ..., 20: from the start to the last sixth
    assert starts[-1] >= 733 * 4 // 5
    for (x, y), start in zip(one, starts):
        expected = window(stream, start, B * T + 1)
        assert x.flatten().tolist() == expected[:-1].tolist() and y.flatten().tolist() == expected[1:].tolist()
    for world_size in (2, 3):  # W ranks with batch B / W read the rows of one process's windows, in rank order
        per_rank = [TokenLoader(str(tmp_path), "train", B // world_size, T, rank=r, world_size=world_size)
                    .spread_windows(6) for r in range(world_size)]
        for k, (x, y) in enumerate(one):
            assert torch.equal(torch.cat([per_rank[r][k][0] for r in range(world_size)]), x)
            assert torch.equal(torch.cat([per_rank[r][k][1] for r in range(world_size)]), y)
    few = TokenLoader(str(tmp_path), "train", B, T).spread_windows(30)  # more than the 24 windows: stream order
    assert all(torch.equal(x, torch.from_numpy(window(stream, k * B * T, B * T)).view(B, T))
               for k, (x, _) in enumerate(few))


def test_importing_data_does_not_import_torch():
    # prepare.py's tokenizer worker processes import data.py; torch would cost each ~1.5 s and ~150 MB
    import subprocess
    import sys

    from conftest import REPO

    code = "import sys, data; assert 'torch' not in sys.modules, 'data.py imported torch'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_load_state_dict_refuses_a_state_from_different_data(tmp_path):
    make_dataset(str(tmp_path / "a"), {"train": [300]})
    make_dataset(str(tmp_path / "b"), {"train": [301]})
    state = TokenLoader(str(tmp_path / "a"), "train", 2, 4).state_dict()
    with pytest.raises(ValueError, match="data changed"):
        TokenLoader(str(tmp_path / "b"), "train", 2, 4).load_state_dict(state)


def test_loader_refuses_token_ids_outside_the_model_vocab(tmp_path):
    make_dataset(str(tmp_path), {"train": [100, 100]}, vocab=500)
    loader = TokenLoader(str(tmp_path), "train", 2, 8, vocab_size=100)
    with pytest.raises(ValueError, match=r"train_000000.bin' holds token id \d+, but the model's vocab_size is 100"):
        loader.next_batch()
    TokenLoader(str(tmp_path), "train", 2, 8, vocab_size=500).next_batch()


def test_loader_refuses_a_split_smaller_than_one_window(tmp_path):
    make_dataset(str(tmp_path), {"train": [20], "val": [10]})
    TokenLoader(str(tmp_path), "train", 1, 19)
    with pytest.raises(ValueError, match="has 20 tokens, fewer than one batch window of batch_size"):
        TokenLoader(str(tmp_path), "train", 2, 10)
    with pytest.raises(ValueError, match="lists no 'test' shards"):
        TokenLoader(str(tmp_path), "test", 1, 4)


def test_loader_reports_a_shard_that_does_not_match_the_manifest(tmp_path):
    make_dataset(str(tmp_path), {"train": [64]})
    write_shard(str(tmp_path / "train_000000.bin"), np.arange(60, dtype=np.uint16))
    with pytest.raises(ShardError, match="holds 60 tokens but manifest.json says 64"):
        TokenLoader(str(tmp_path), "train", 2, 8).next_batch()


# ----------------------------------------------------------------------------------------------------------
# Val

def test_val_batches_are_the_same_tokens_for_any_world_size(tmp_path):
    stream = make_dataset(str(tmp_path), {"train": [100], "val": [150, 90]})["val"]
    B, T, num_tokens = 2, 6, 200
    n_windows = (num_tokens - 1) // (B * T)
    for _ in range(2):  # every eval sees the same windows
        for world_size in (1, 2, 3, 5):
            seen = {}
            for rank in range(world_size):
                for j, (x, y) in enumerate(val_batches(str(tmp_path), B, T, num_tokens, rank, world_size)):
                    seen[rank + j * world_size] = (x, y)
            assert sorted(seen) == list(range(n_windows))
            for k, (x, y) in seen.items():
                expected = stream[k * B * T:k * B * T + B * T + 1].astype(np.int64)
                assert x.flatten().tolist() == expected[:-1].tolist()
                assert y.flatten().tolist() == expected[1:].tolist()


def test_val_batches_use_all_val_tokens_when_asked_for_more_and_refuse_less_than_a_window(tmp_path):
    make_dataset(str(tmp_path), {"train": [100], "val": [49]})
    assert len(list(val_batches(str(tmp_path), 2, 6, 10**9))) == 4  # (49 - 1) // 12
    with pytest.raises(ValueError, match="num_tokens=12 is less than one window"):
        val_batches(str(tmp_path), 2, 6, 12)
    with pytest.raises(ValueError, match="split 'val' .* has 49 tokens, fewer than one batch window"):
        val_batches(str(tmp_path), 5, 10, 1000)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_loader_puts_batches_on_the_gpu(tmp_path):
    stream = make_dataset(str(tmp_path), {"train": [300]})["train"]
    x, y = TokenLoader(str(tmp_path), "train", 2, 8, device="cuda").next_batch()
    assert x.is_cuda and y.is_cuda
    assert x.flatten().tolist() == stream[:16].astype(np.int64).tolist()
