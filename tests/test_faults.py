"""Fault injection: each script killed (SIGKILL) or poisoned (NaN) at chosen points, then rerun; the result is
bitwise equal to an uninterrupted run, or the run stops with a message naming what to resume from.

The points are placed from outside by tests/faults.py (it wraps os.replace, os.remove and GPT.forward, then runs
the script as `python SCRIPT ARGS` would); the scripts have no test branches. Related cases live beside their
features: two writers on one dir and a torn mark or metrics line (test_run_dirs.py, test_train.py), a kill at a
random moment of prepare.py (test_prepare.py), crashes mid-layer and mid-phase-2 (test_distill.py).
"""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import REPO, english_like_documents, write_token_dataset

TINY_MODEL = {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64, "head_dim": 16, "mlp_hidden": 128,
              "max_seq_len": 128}
# 9 steps of 2 micro-batches, a checkpoint every 3 steps and only the newest kept: every save but the first prunes
TRAIN_RUN = {"model_config": TINY_MODEL, "device": "cpu", "dtype": "float32", "batch_size": 4, "seq_len": 32,
             "grad_accum": 2, "max_steps": 9, "lr": 3e-3, "warmup_steps": 2, "eval_every": 3,
             "eval_tokens": 3 * 4 * 32 + 1, "checkpoint_every": 3, "keep_checkpoints": 1, "log_every": 1,
             "plot": False}
DISTILL_ARGS = ["--device", "cpu", "--dtype", "float32", "--batch-size", "4", "--seq-len", "32", "--eval-tokens",
                "1024", "--num-batches", "4", "--log-every", "1000", "--phases", "12", "--layers", "[0, 2]",
                "--steps-per-layer", "4", "--checkpoint-every-layer", "2", "--mlp-hidden", "40", "--max-steps", "6",
                "--checkpoint-every", "2", "--keep-checkpoints", "1", "--top-k", "16", "--plot", "false"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run(script, *args, fault=None):
    """`python SCRIPT ARGS`, or the same under tests/faults.py with `fault` injected."""
    cmd = [os.path.join(REPO, "tests", "faults.py"), fault, script] if fault else [os.path.join(REPO, script)]
    return subprocess.run([sys.executable, *cmd, *map(str, args)], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=600)


def ok(proc):
    assert proc.returncode == 0, f"exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def killed(proc):
    assert proc.returncode == -signal.SIGKILL, f"expected a SIGKILL, got {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def same_weights(a, b):
    a, b = (torch.load(p, weights_only=True) for p in (a, b))
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a.get("loader") == b.get("loader")
    if "optimizer" in a:
        for (i, x), (j, y) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
            assert i == j and all(torch.equal(x[k], y[k]) for k in x), i


def losses(run_dir):
    """Each step's logged numbers, by (phase, step); the rerun replaces what the killed run logged after its
    checkpoint, so every step appears once."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                key = (r.get("phase"), r["step"])
                assert key not in out, f"step {key} logged twice in {run_dir}"
                out[key] = r["loss"]
    return out


def leftovers(run_dir):
    names = os.listdir(run_dir)
    return [n for n in names if ".tmp." in n or (n.endswith(".pt") and n[:-3] + ".json" not in names)]


# ----------------------------------------------------------------------------------------------------------
# train.py

@pytest.fixture(scope="module")
def train_setup(tmp_path_factory, bpe_tokenizer_dir):
    shards = write_token_dataset(tmp_path_factory.mktemp("shards"), bpe_tokenizer_dir)
    config = tmp_path_factory.mktemp("cfg") / "run.yaml"
    config.write_text(yaml.safe_dump(TRAIN_RUN))
    base = ["--config", config, "--tokenizer", bpe_tokenizer_dir, "--data-dir", shards]
    straight = tmp_path_factory.mktemp("runs") / "straight"
    ok(run("train.py", *base, "--run-dir", straight))
    return base, straight


@pytest.mark.parametrize("fault,resumes_from", [
    ("torn_temp:^step_000006\\.pt$", 3),     # killed mid-write of a checkpoint's temp file
    ("after_rename:^step_000006\\.pt$", 3),  # the .pt is in place, its .json mark is not
    ("torn_temp:^step_000006\\.json$", 3),   # killed mid-write of the mark
    ("after_remove:^step_000003\\.json$", 6),  # mid-prune: step 3's mark removed, its .pt not yet
])
def test_train_killed_at_a_save_resumes_to_the_uninterrupted_run(tmp_path, train_setup, fault, resumes_from):
    base, straight = train_setup
    run_dir = tmp_path / "run"
    killed(run("train.py", *base, "--run-dir", run_dir, fault=fault))
    proc = ok(run("train.py", *base, "--run-dir", run_dir, "--resume"))
    assert f"steps {resumes_from} -> 9" in proc.stdout
    if resumes_from == 3 or "remove" in fault:  # a half-done save or prune left files; they were named and removed
        assert "leftover(s) of unfinished saves" in proc.stdout
    same_weights(straight / "step_000009.pt", run_dir / "step_000009.pt")
    assert losses(run_dir) == losses(straight)
    assert sorted(os.listdir(run_dir)) == sorted(os.listdir(straight))  # pruned alike, nothing left over
    assert leftovers(run_dir) == []


def test_train_with_a_nan_step_stops_naming_the_last_good_checkpoint_then_resumes_exactly(tmp_path, train_setup):
    base, straight = train_setup
    run_dir = tmp_path / "run"
    proc = run("train.py", *base, "--run-dir", run_dir, fault="nan_forward@9")  # step 5's first micro-batch
    assert proc.returncode == 1
    assert "non-finite loss nan" in proc.stderr and "at step 5" in proc.stderr
    assert f"the latest good checkpoint is {run_dir / 'step_000003.pt'}" in proc.stderr
    assert not os.path.exists(run_dir / "step_000006.pt")
    ok(run("train.py", *base, "--run-dir", run_dir, "--resume"))
    same_weights(straight / "step_000009.pt", run_dir / "step_000009.pt")
    assert losses(run_dir) == losses(straight)


def test_train_killed_in_its_final_eval_has_already_saved_the_last_step(tmp_path, train_setup):
    base, straight = train_setup
    run_dir = tmp_path / "run"
    # evals at steps 0, 3, 6 and 9, of 3 batches each: the 10th eval forward is the final eval's first
    killed(run("train.py", *base, "--run-dir", run_dir, fault="kill_eval@10"))
    same_weights(straight / "step_000009.pt", run_dir / "step_000009.pt")
    assert os.path.exists(run_dir / "step_000009.json")


# ----------------------------------------------------------------------------------------------------------
# distill.py (phase 1 then phase 2 in one run)

@pytest.fixture(scope="module")
def distill_straight(tmp_path_factory, teacher_dir, data_dir):
    base = ["--teacher", teacher_dir, "--data-dir", data_dir, *DISTILL_ARGS]
    straight = tmp_path_factory.mktemp("distill") / "straight"
    ok(run("distill.py", *base, "--run-dir", straight))
    return base, straight


@pytest.mark.parametrize("fault", [
    "torn_temp:^phase1_state\\.pt$@2",   # phase 1, mid-write of the rolling mid-layer state
    "after_rename:^layer_000\\.pt$",     # phase 1, a finished layer's checkpoint without its mark
    "after_rename:^final\\.pt$",         # the end of phase 1, without its mark
    "torn_temp:^step_000004\\.pt$",      # phase 2, mid-write of a step checkpoint
    "after_remove:^step_000002\\.json$",  # phase 2, mid-prune
])
def test_distill_killed_at_a_save_resumes_to_the_uninterrupted_run(tmp_path, distill_straight, fault):
    base, straight = distill_straight
    run_dir = tmp_path / "run"
    killed(run("distill.py", *base, "--run-dir", run_dir, fault=fault))
    ok(run("distill.py", *base, "--run-dir", run_dir, "--resume"))
    for name in ("final.pt", "step_000006.pt"):
        same_weights(straight / name, run_dir / name)
    assert losses(run_dir) == losses(straight)
    assert leftovers(run_dir) == []


@pytest.mark.parametrize("fault,latest", [
    ("nan_forward:PlainMLP@7", "phase1_state.pt"),  # phase 1: layer 2, step 3 (its rolling state is at step 2)
    ("nan_forward:GPT@3", "step_000002.pt"),  # phase 2, step 3
])
def test_distill_with_a_nan_step_stops_naming_the_last_good_state_then_resumes_exactly(tmp_path, distill_straight,
                                                                                         fault, latest):
    base, straight = distill_straight
    run_dir = tmp_path / "run"
    proc = run("distill.py", *base, "--run-dir", run_dir, fault=fault)
    assert proc.returncode == 1 and "non-finite loss nan" in proc.stderr, proc.stderr[-3000:]
    assert "the latest good checkpoint is" in proc.stderr and latest in proc.stderr
    ok(run("distill.py", *base, "--run-dir", run_dir, "--resume"))
    same_weights(straight / "step_000006.pt", run_dir / "step_000006.pt")
    assert losses(run_dir) == losses(straight)


# ----------------------------------------------------------------------------------------------------------
# prepare.py

@pytest.fixture(scope="module")
def prepare_setup(tmp_path_factory, bpe_tokenizer_dir):
    src = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in english_like_documents(600, seed=5)))
    base = ["--model", bpe_tokenizer_dir, "--dataset", src, "--train-bytes", 10**8, "--val-bytes", 10**8,
            "--shard-tokens", 1500, "--docs-per-batch", 32, "--workers", 1]
    reference = tmp_path_factory.mktemp("prepared") / "reference"
    ok(run("prepare.py", *base, "--out-dir", reference))
    return base, reference


@pytest.mark.parametrize("fault", [
    "after_rename:^train_000002\\.bin$",  # a shard landed, the progress file does not know it yet
    "torn_temp:^prepare_progress\\.json$@3",  # killed mid-write of the progress file
    "torn_temp:^manifest\\.json$",  # killed mid-write of the completion mark
])
def test_prepare_killed_mid_write_reruns_to_byte_identical_shards(tmp_path, prepare_setup, fault):
    base, reference = prepare_setup
    out = tmp_path / "out"
    killed(run("prepare.py", *base, "--out-dir", out, fault=fault))
    assert not os.path.exists(out / "manifest.json")
    ok(run("prepare.py", *base, "--out-dir", out))
    shards = sorted(n for n in os.listdir(reference) if re.fullmatch(r"(train|val)_\d{6}\.bin", n))
    assert sorted(n for n in os.listdir(out) if n != ".lock") == sorted(
        n for n in os.listdir(reference) if n != ".lock")
    for name in shards:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (reference, out))
    assert a["shards"] == b["shards"] and a["totals"] == b["totals"]
