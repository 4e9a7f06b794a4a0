"""The teacher cache: its KL math against the live teacher's, distill.py writing it (1 and 2 processes, after a
kill), phase 2 reading it instead of the teacher (same weights as the live top-k run), parquet round trip, and
each refusal by name."""
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, make_tiny_llama, torchrun, write_token_dataset
from data import TokenLoader

import distill
import losses
import teacher_cache
from hf_interop import load_model
from teacher_cache import CacheError, TeacherCache

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = ["--device", "cpu", "--dtype", "float32", "--batch-size", "4", "--seq-len", "32", "--eval-tokens", "1024",
        "--num-batches", "4", "--log-every", "1000", "--loss-chunk", "48", "--plot", "false"]
PHASE2 = ["--phases", "2", "--max-steps", "6", "--checkpoint-every", "3", "--top-k", "16", "--alpha", "0.7"]
WRITE = ["--phases", "cache", "--cache-k", "16", "--cache-dtype", "float32", "--cache-from", "0",
         "--cache-shard-tokens", "300"]  # 300 -> 256 per shard (two windows of 4 x 32): several shards


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models on a shared 2-core box


def run_here(*args):
    distill.main([str(a) for a in args])


def base(teacher_dir, data_dir, *extra):
    return ["--teacher", teacher_dir, "--data-dir", data_dir, *TINY, *PHASE2, *extra]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, teacher_dir, data_dir):
    out = tmp_path_factory.mktemp("cache") / "c"
    run_here(*base(teacher_dir, data_dir, *WRITE, "--grad-accum", "2", "--teacher-cache", out))  # [0, 1536)
    return out


def shard_bytes(directory):
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))
            if n.endswith(".topk")}


# ----------------------------------------------------------------------------------------------------------
# The math

def test_cached_kl_equals_the_live_topk_kl_and_its_gradient():
    torch.manual_seed(0)
    student, teacher = torch.randn(20, 50, dtype=torch.float64), 2 * torch.randn(20, 50, dtype=torch.float64)
    targets = torch.randint(0, 50, (20,))
    ids, values = teacher_cache.topk_entries_(teacher.clone(), targets, 8)
    assert values.dtype == torch.float32 and values.shape == (20, 10)
    torch.testing.assert_close(values[:, :8].exp().sum(-1) + values[:, 8].exp(), torch.ones(20))
    torch.testing.assert_close(values[:, 9], torch.log_softmax(teacher.float(), -1)[torch.arange(20), targets])
    s = student.float().requires_grad_(True)
    live = losses.kl_topk(s, teacher.float(), 8)
    (g_live,) = torch.autograd.grad(live.sum(), s)
    cached = losses.kl_cached(s, ids, values)
    (g_cached,) = torch.autograd.grad(cached.sum(), s)
    torch.testing.assert_close(cached, live, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_cached, g_live, atol=1e-6, rtol=1e-5)
    # fewer ids: the dropped ones join the tail, exactly as a live top-4
    narrow = teacher_cache.narrow_entries(ids, values, 4)
    torch.testing.assert_close(losses.kl_cached(s, *narrow), losses.kl_topk(s, teacher.float(), 4), atol=1e-6,
                               rtol=1e-5)


def test_at_another_temperature_the_tail_is_tempered_as_one_token():
    """With vocab = k + 1 the tail is one token, so tempering it as one is exact: the cached KL at T = 2 equals
    the full KL at T = 2. With a real tail it is the stated approximation, not the live top-k KL."""
    torch.manual_seed(1)
    student, teacher = torch.randn(6, 9), 3 * torch.randn(6, 9)
    ids, values = teacher_cache.topk_entries_(teacher.clone(), torch.zeros(6, dtype=torch.long), 8)
    torch.testing.assert_close(losses.kl_cached(student, ids, values, 2.0), losses.kl_full(student, teacher, 2.0),
                               atol=1e-5, rtol=1e-5)
    ids, values = teacher_cache.topk_entries_(teacher.clone(), torch.zeros(6, dtype=torch.long), 4)
    assert not torch.allclose(losses.kl_cached(student, ids, values, 2.0), losses.kl_topk(student, teacher, 4, 2.0))


@pytest.mark.parametrize("dtype,bound", [("float16", 1e-3), ("bfloat16", 1e-2), ("float32", 1e-6)])
def test_stored_values_round_trip_within_their_dtype(tmp_path, dtype, bound):
    torch.manual_seed(2)
    ids, values = teacher_cache.topk_entries_(3 * torch.randn(64, 100), torch.randint(0, 100, (64,)), 8)
    path = str(tmp_path / "train_000000.topk")
    teacher_cache.write_shard(path, ids, values, dtype, 32, 100)
    record = {"bytes": os.path.getsize(path), "sha256": teacher_cache.file_sha256(path), "count": 64}
    read_ids, read_values, code = teacher_cache.open_shard(path, record, 8)
    assert read_ids.dtype == np.dtype("<u2") and np.array_equal(read_ids, ids.numpy())
    decoded = teacher_cache.decode_values(np.asarray(read_values), code)
    student = torch.randn(64, 100)
    gap = (losses.kl_cached(student, ids, decoded) - losses.kl_cached(student, ids, values)).abs().mean().item()
    assert gap <= bound, gap  # per token, for a student far from its teacher (the real-model figure: README)


# ----------------------------------------------------------------------------------------------------------
# Writing: aligned with TokenLoader's windows, the same bytes for 1 and 2 processes and after a kill

def test_cached_ids_at_each_window_are_the_teachers_top_k_there(cache_dir, teacher_dir, data_dir):
    teacher, _ = load_model(teacher_dir)
    teacher.eval()
    cache = TeacherCache(str(cache_dir))
    assert [s["count"] for s in cache.manifest["splits"]["train"]["shards"]][:2] == [256, 256]
    loader = TokenLoader(data_dir, "train", 4, 32)
    for w in (0, 3, 5):  # windows inside a shard, and after a shard boundary
        x, y = loader.window_at(w * 128)
        with torch.no_grad():
            want_ids, want_values = teacher_cache.topk_entries_(teacher.logits(x).flatten(0, 1), y.reshape(-1), 16)
        ids, values = cache.entries("train", w * 128, 128)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(values, want_values, atol=1e-6, rtol=1e-6)


def test_two_processes_and_a_killed_write_give_the_same_bytes(cache_dir, teacher_dir, data_dir, tmp_path):
    args = [*base(teacher_dir, data_dir, *WRITE, "--grad-accum", "2")]
    two = tmp_path / "two"
    proc = subprocess.run(torchrun("distill.py", 2, *args, "--teacher-cache", two), cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # two ranks' phase 2 reads twice the windows: the cache covers them, the shards in common are the same bytes
    one, both = shard_bytes(cache_dir), shard_bytes(two)
    assert TeacherCache(str(two)).manifest["splits"]["train"]["end"] == 2 * 6 * 2 * 128
    assert {n: both[n] for n in one} == one and len(both) > len(one)
    killed = tmp_path / "killed"
    fault = [sys.executable, os.path.join(REPO, "tests", "faults.py"), "torn_temp:^train_000002\\.topk$",
             "distill.py", *map(str, args), "--teacher-cache", str(killed)]
    proc = subprocess.run(fault, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not os.path.exists(killed / "manifest.json") and any(".tmp." in n for n in os.listdir(killed))
    run_here(*args, "--teacher-cache", killed)
    assert shard_bytes(killed) == shard_bytes(cache_dir)
    assert not any(".tmp." in n for n in os.listdir(killed))
    assert TeacherCache(str(killed)).manifest["splits"] == TeacherCache(str(cache_dir)).manifest["splits"]


# ----------------------------------------------------------------------------------------------------------
# Reading it in phase 2

def test_phase2_from_the_cache_trains_the_same_weights_as_the_live_teacher(cache_dir, teacher_dir, data_dir,
                                                                          tmp_path, capsys):
    run_here(*base(teacher_dir, data_dir, "--run-dir", tmp_path / "live", "--grad-accum", "2"))
    capsys.readouterr()
    run_here(*base(teacher_dir, data_dir, "--run-dir", tmp_path / "cached", "--grad-accum", "2",
                   "--teacher-cache", cache_dir))
    assert "phase 2 runs no teacher" in capsys.readouterr().out
    a, b = (torch.load(tmp_path / run / "step_000006.pt", weights_only=True) for run in ("live", "cached"))
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], atol=1e-5, rtol=1e-5, msg=k)
    live, cached = (records(tmp_path / run) for run in ("live", "cached"))
    losses_of = lambda log: [r["loss"] for r in log if "loss" in r]
    assert len(losses_of(live)) == 6 and all(abs(x - y) < 1e-5 for x, y in zip(losses_of(live), losses_of(cached)))
    evals = lambda log: [r for r in log if r.get("event") == "eval"]
    for a, b in zip(evals(live), evals(cached)):  # the stored target log-probs give the teacher's CE exactly
        assert abs(a["teacher_ce"] - b["teacher_ce"]) < 1e-5 and abs(a["top1_agree"] - b["top1_agree"]) < 1e-9
        assert b["kl"] <= a["kl"] + 1e-6 and b["kl_kind"].startswith("top-16 + tail")  # a bound of the full KL


@pytest.mark.parametrize("order", ["stream", "shuffled"])
def test_phase1_then_phase2_from_a_cache_written_for_where_phase1_ends(teacher_dir, data_dir, tmp_path, order):
    """The default CACHE_FROM is where phase 1's batches end: phases 12 with the cache (the teacher runs for
    phase 1 only) train the same student as with the live teacher. Shuffled, the cache spans the rounds that
    phase 2 will read, wherever they lie."""
    args = base(teacher_dir, data_dir, "--phases", "12", "--layers", "[0, 2]", "--steps-per-layer", "3",
                "--data-order", order)
    run_here(*args, "--phases", "cache", "--teacher-cache", tmp_path / "cache", "--cache-k", "16",
             "--cache-dtype", "float32")
    cached = TeacherCache(str(tmp_path / "cache")).manifest["splits"]["train"]
    if order == "stream":
        assert cached["start"] == 4 * 128
    else:  # the span of phase 2's rounds, from the tokens phase 1 read (or --cache-from, here 0: phase 2 alone)
        loader = TokenLoader(data_dir, "train", 4, 32, order="shuffled", seed=1337)  # TINY, distill's SEED
        for start, cache in ((4 * 128, cached), (0, None)):
            if cache is None:
                run_here(*args, "--phases", "cache", "--teacher-cache", tmp_path / "c0", "--cache-from", 0)
                cache = TeacherCache(str(tmp_path / "c0")).manifest["splits"]["train"]
            loader.position = start
            assert (cache["start"], cache["end"]) == loader.span(6) and cache["end"] - cache["start"] > 6 * 128
    run_here(*args, "--run-dir", tmp_path / "live")
    run_here(*args, "--run-dir", tmp_path / "cached", "--teacher-cache", tmp_path / "cache")
    a, b = (torch.load(tmp_path / run / "step_000006.pt", weights_only=True) for run in ("live", "cached"))
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], atol=1e-5, rtol=1e-5, msg=k)


def records(run_dir):
    import json

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("phase") == 2]


def test_phase2_from_the_cache_loads_no_teacher_and_resumes_exactly(cache_dir, teacher_dir, data_dir, tmp_path,
                                                                    monkeypatch, capsys):
    """The student from a checkpoint, TEACHER a path that no longer exists: phase 2 runs from the cache alone."""
    start = tmp_path / "start"
    run_here(*base(teacher_dir, data_dir, "--run-dir", start, "--max-steps", "1", "--alpha", "0"))
    gone = str(tmp_path / "teacher_elsewhere")
    shutil.copytree(teacher_dir, gone)
    cache = tmp_path / "cache_gone"
    shutil.copytree(cache_dir, cache)
    manifest = os.path.join(cache, "manifest.json")
    text = open(manifest).read().replace(f'"source": "{teacher_dir}"', f'"source": "{gone}"')
    open(manifest, "w").write(text)  # as if written from a teacher at `gone`
    common = [*TINY, *PHASE2, "--teacher", gone, "--data-dir", data_dir, "--teacher-cache", cache]
    init = ["--init-from", start / "step_000001.pt"]
    run_here(*common, *init, "--run-dir", tmp_path / "straight")
    shutil.rmtree(gone)
    monkeypatch.setattr(distill, "load_model", lambda *a, **k: pytest.fail("phase 2 loaded a teacher"))
    straight = torch.load(tmp_path / "straight" / "step_000006.pt", weights_only=True)
    # the same run, crashed after its step-3 checkpoint and resumed, with the teacher gone
    resumed = tmp_path / "resumed"
    calls, loss = [0], distill.phase2_loss

    def crashing(*a, **k):
        calls[0] += 1
        if calls[0] > 4:
            raise RuntimeError("simulated crash")
        return loss(*a, **k)

    monkeypatch.setattr(distill, "phase2_loss", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_here(*common, *init, "--run-dir", resumed)
    monkeypatch.setattr(distill, "phase2_loss", loss)
    run_here(*common, "--run-dir", resumed, "--resume")
    b = torch.load(resumed / "step_000006.pt", weights_only=True)
    for k in straight["model"]:
        assert torch.equal(straight["model"][k], b["model"][k]), k


# ----------------------------------------------------------------------------------------------------------
# Refusals and interop

def test_a_cache_of_other_data_teacher_range_or_damaged_shards_is_refused(cache_dir, teacher_dir, data_dir,
                                                                            tmp_path, bpe_tokenizer_dir):
    def refused(match, *args, **kw):
        with pytest.raises((CacheError, SystemExit), match=match):
            run_here(*base(kw.get("teacher", teacher_dir), kw.get("data", data_dir), "--run-dir",
                           tmp_path / f"r{len(os.listdir(tmp_path))}", "--teacher-cache", kw.get("cache", cache_dir),
                           *args))

    other_data = write_token_dataset(tmp_path / "other_data", bpe_tokenizer_dir, n_docs=300, seed=9, val_tokens=4000)
    refused("made from the shards of .* whose shards or tokenizer differ", data=other_data)
    other_teacher = make_tiny_llama(tmp_path / "other_teacher", bpe_tokenizer_dir, seed=4)
    refused("made from teacher .* this run names teacher", teacher=other_teacher)
    same_path = tmp_path / "same_path_teacher"  # the cache's teacher path, other weights in it
    shutil.copytree(teacher_dir, same_path)
    moved = tmp_path / "moved_cache"
    shutil.copytree(cache_dir, moved)
    text = open(moved / "manifest.json").read().replace(f'"source": "{teacher_dir}"', f'"source": "{same_path}"')
    open(moved / "manifest.json", "w").write(text)
    shutil.copy(os.path.join(other_teacher, "model.safetensors"), same_path / "model.safetensors")
    refused("made from other weights", teacher=same_path, cache=moved)
    refused(r"this run reads train offsets \[0, 2,560\), but the cache covers \[0, 1,536\)", "--max-steps", "20")
    refused("seq_len 32, this run has seq_len 16", "--seq-len", "16")
    refused("holds only the top 16 ids", "--top-k", "32")
    damaged = tmp_path / "damaged"
    shutil.copytree(cache_dir, damaged)
    with open(damaged / "train_000001.topk", "r+b") as f:
        f.seek(2000)
        byte = f.read(1)
        f.seek(2000)
        f.write(bytes([byte[0] ^ 1]))
    refused("train_000001.topk' does not match its sha256", cache=damaged)
    with open(damaged / "train_000000.topk", "r+b") as f:
        f.truncate(5000)
    refused("train_000000.topk' has 5000 bytes, the manifest says", cache=damaged)
    assert teacher_cache.verify(str(damaged)) == 2


def test_parquet_export_then_import_round_trips_exactly(cache_dir, tmp_path):
    import pyarrow.parquet as pq

    teacher_cache.export_parquet(str(cache_dir), str(tmp_path / "cache.parquet"))
    table = pq.read_table(tmp_path / "cache.parquet")
    assert {"idx", "topk_indices", "topk_values"} <= set(table.column_names)
    assert len(table.column("topk_indices")[0]) == 32 * 16  # one row per sequence: SEQ_LEN x k ids
    teacher_cache.import_parquet(str(tmp_path / "cache.parquet"), str(tmp_path / "imported"), shard_tokens=256)
    assert shard_bytes(tmp_path / "imported") == shard_bytes(cache_dir)
    assert TeacherCache(str(tmp_path / "imported")).manifest == TeacherCache(str(cache_dir)).manifest


def test_a_seeds_parquet_of_ids_and_values_imports_given_the_teacher_data_and_seq_len(cache_dir, teacher_dir,
                                                                                       data_dir, tmp_path):
    """The seeds' three columns (idx, topk_indices, topk_values; one row per sequence) carry no identity and no
    tail: the import is told the teacher, data and seq_len, and rebuilds the tail as log(1 - top-k mass)."""
    import pyarrow as pa
    import pyarrow.compute  # noqa: F401 (pa.compute)
    import pyarrow.parquet as pq

    teacher_cache.export_parquet(str(cache_dir), str(tmp_path / "ours.parquet"))
    ours = pq.read_table(tmp_path / "ours.parquet")
    train = ours.filter(pa.compute.equal(ours.column("split"), "train"))
    seed = pa.table({name: train.column(name) for name in ("idx", "topk_indices", "topk_values")})
    pq.write_table(seed, tmp_path / "seed.parquet")
    with pytest.raises(SystemExit, match="no teacher_cache metadata"):
        teacher_cache.main(["import", str(tmp_path / "seed.parquet"), str(tmp_path / "refused")])
    teacher_cache.main(["import", str(tmp_path / "seed.parquet"), str(tmp_path / "imported"), "--teacher",
                        teacher_dir, "--data-dir", data_dir, "--seq-len", "32", "--value-dtype", "float32"])
    imported, original = TeacherCache(str(tmp_path / "imported")), TeacherCache(str(cache_dir))
    for key in ("teacher", "data", "k", "seq_len"):
        assert imported.manifest[key] == original.manifest[key], key
    ids, values = imported.entries("train", 0, 1536)
    want_ids, want_values = original.entries("train", 0, 1536)
    assert torch.equal(ids, want_ids) and torch.equal(values[:, :16], want_values[:, :16])
    torch.testing.assert_close(values[:, 16].exp(), want_values[:, 16].exp(), atol=1e-6, rtol=1e-4)  # the tail
    assert torch.isnan(values[:, 17]).all()  # the target log-probs are not in a seed's file
