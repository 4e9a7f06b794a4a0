"""train.py as a user runs it: from scratch, from an HF model, torchrun DDP on gloo, exact resume, eval-only,
the non-finite stop and the refusal of shards that do not match the model."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, SPECIAL_TOKENS, english_like_documents, run_script, torchrun, write_token_dataset

TINY_MODEL = {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64, "head_dim": 16, "mlp_hidden": 128,
              "max_seq_len": 128}
# Small enough for CI, big enough that the steps differ: 2 micro-batches of 4 x 32 tokens per step.
TINY_RUN = {"model_config": TINY_MODEL, "device": "cpu", "dtype": "float32", "batch_size": 4, "seq_len": 32,
            "grad_accum": 2, "max_steps": 6, "lr": 3e-3, "warmup_steps": 2, "lr_schedule": "trapezoid",
            "cooldown_frac": 0.5, "eval_every": 3, "eval_tokens": 3 * 4 * 32 + 1, "checkpoint_every": 3,
            "keep_checkpoints": 0, "log_every": 1}


@pytest.fixture(scope="module")
def shards(tmp_path_factory, bpe_tokenizer_dir):
    return write_token_dataset(tmp_path_factory.mktemp("shards"), bpe_tokenizer_dir)


def write_config(path, **overrides):
    with open(path, "w") as f:
        yaml.safe_dump({**TINY_RUN, **overrides}, f)
    return str(path)


def train(*args, check=True, nproc=1, env=None):
    """Run train.py like a user: plain python, or torchrun with `nproc` gloo processes."""
    if nproc == 1:
        return run_script("train.py", *args, check=check, env=env)
    cmd = torchrun("train.py", nproc, *args)
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun train.py exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}"
                             f"\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = {r["step"]: r for r in records if "loss" in r}
    evals = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    return steps, evals


def eval_only(model, shards, nproc=1):
    proc = train("--eval-only", "--init-from", model, "--data-dir", shards, "--device", "cpu", "--batch-size", 4,
                 "--seq-len", 32, "--eval-tokens", 3 * 4 * 32 + 1, nproc=nproc)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("eval_only: "))
    return json.loads(line[len("eval_only: "):])


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, shards, bpe_tokenizer_dir):
    """6 uninterrupted steps from scratch, checkpoints at steps 3 and 6."""
    run_dir = tmp_path_factory.mktemp("runs") / "straight"
    config = write_config(tmp_path_factory.mktemp("cfg") / "tiny.yaml")
    train("--config", config, "--tokenizer", bpe_tokenizer_dir, "--data-dir", shards, "--run-dir", run_dir)
    return str(run_dir), config


def test_loss_falls_on_a_tiny_model_trained_from_scratch(tmp_path, shards, bpe_tokenizer_dir):
    config = write_config(tmp_path / "tiny.yaml", grad_accum=1, max_steps=30, warmup_steps=5, cooldown_frac=0.2,
                          eval_every=0, checkpoint_every=0)
    run_dir = tmp_path / "run"
    proc = train("--config", config, "--tokenizer", bpe_tokenizer_dir, "--data-dir", shards, "--run-dir", run_dir)
    assert "tokens per step: 128 = batch 4 x seq 32 x accum 1 x world 1" in proc.stdout
    steps, evals = metrics(run_dir)
    assert sorted(steps) == list(range(1, 31))
    assert sorted(evals) == [30]  # eval_every 0: only the final eval
    first, last = np.mean([steps[s]["loss"] for s in (1, 2, 3)]), np.mean([steps[s]["loss"] for s in (28, 29, 30)])
    assert first > 6.0  # ~ln(512) for a fresh model
    assert last < first - 1.0, (first, last)
    assert evals[30] < 5.5
    assert all(steps[s]["tokens"] == 128 * s and steps[s]["tokens_per_s"] > 0 for s in steps)
    assert all(steps[s]["mfu"] is None for s in steps)  # no known peak for a CPU: no MFU rather than a wrong one
    # the run dir holds what a later run or sample.py needs
    assert json.load(open(run_dir / "config.json"))["max_steps"] == 30
    assert os.path.exists(run_dir / "tokenizer" / "tokenizer.json")
    checkpoint = torch.load(run_dir / "step_000030.pt", weights_only=True)
    for key in ("model", "model_config", "config", "step", "tokenizer", "optimizer", "loader", "rng"):
        assert key in checkpoint, key
    assert checkpoint["step"] == 30 and checkpoint["loader"]["position"] == 30 * 128
    assert checkpoint["model_config"]["vocab_size"] == 512
    assert json.load(open(run_dir / "step_000030.json"))["step"] == 30


def test_target_tokens_sets_max_steps_and_cosine_schedule_runs(tmp_path, shards, bpe_tokenizer_dir):
    config = write_config(tmp_path / "tiny.yaml", lr_schedule="cosine", eval_every=0)
    run_dir = tmp_path / "run"
    # 1000 tokens at 256 tokens per step -> ceil = 4 steps
    proc = train("--config", config, "--tokenizer", bpe_tokenizer_dir, "--data-dir", shards, "--run-dir", run_dir,
                 "--target-tokens", 1000)
    assert "steps 0 -> 4" in proc.stdout
    steps, _ = metrics(run_dir)
    assert sorted(steps) == [1, 2, 3, 4]
    lrs = [steps[s]["lr"] for s in range(1, 5)]
    # warmup over 2 steps, then cosine from the peak at step index 2 to 0 at step index 4
    assert lrs == pytest.approx([1.5e-3, 3e-3, 3e-3, 1.5e-3])


def test_a_seq_len_beyond_the_models_max_trains_and_the_checkpoint_records_the_longer_context(
        tmp_path, shards, bpe_tokenizer_dir):
    """A long-context stage: TINY_MODEL's max_seq_len is 128, the run trains on 192-token rows (RoPE extends),
    and its checkpoint says 192, so sample.py then takes prompts of that length."""
    config = write_config(tmp_path / "tiny.yaml", seq_len=192, batch_size=2, grad_accum=1, max_steps=2,
                          eval_every=0, eval_tokens=2 * 192 + 1, checkpoint_every=0)
    run_dir = tmp_path / "run"
    proc = train("--config", config, "--tokenizer", bpe_tokenizer_dir, "--data-dir", shards, "--run-dir", run_dir,
                 "--lr-attn", "1e-3")
    assert "seq_len 192 is beyond the model's max_seq_len 128" in proc.stdout
    checkpoint = torch.load(run_dir / "step_000002.pt", weights_only=True)
    assert checkpoint["model_config"]["max_seq_len"] == 192
    assert sorted({round(g["lr"] / g["lr_scale"], 12) for g in checkpoint["optimizer"]["param_groups"]}) == \
        [round(checkpoint["optimizer"]["param_groups"][0]["lr"], 12)]  # one schedule, two peak LRs
    assert len({g["lr_scale"] for g in checkpoint["optimizer"]["param_groups"]}) == 2


@pytest.mark.parametrize("order", ["stream", "shuffled"])
def test_the_train_stream_wraps_and_each_step_logs_its_epoch(tmp_path, shards, bpe_tokenizer_dir, order):
    config = write_config(tmp_path / "tiny.yaml", batch_size=16, grad_accum=8, max_steps=7, eval_every=0,
                          eval_tokens=16 * 32 + 1, checkpoint_every=0)
    run_dir = tmp_path / "run"
    proc = train("--config", config, "--tokenizer", bpe_tokenizer_dir, "--data-dir", shards, "--run-dir", run_dir,
                 "--data-order", order)
    steps, _ = metrics(run_dir)
    state = torch.load(run_dir / "step_000007.pt", weights_only=True)["loader"]
    per_step = 16 * 32 * 8
    # an epoch: the whole stream, or (shuffled) every whole round of one step's 8 micro-batches
    epoch_tokens = state["total_tokens"] if order == "stream" else (state["total_tokens"] - 1) // per_step * per_step
    assert state["order"] == order and state["position"] == 7 * per_step
    assert 7 * per_step > epoch_tokens  # the run reads past the end of an epoch
    assert [steps[s]["epoch"] for s in range(1, 8)] == [s * per_step // epoch_tokens for s in range(1, 8)]
    wrap = next(s for s in range(1, 8) if s * per_step >= epoch_tokens)
    assert f"step {wrap}: the train stream wrapped around; epoch 1 begins" in proc.stdout
    assert f"step {wrap} | epoch 1 | loss" in proc.stdout


def test_two_torchrun_processes_match_one_process_at_the_same_global_batch(tmp_path, shards, bpe_tokenizer_dir,
                                                                          straight_run):
    """1 process x grad_accum 2 (the straight run) and 2 gloo processes x grad_accum 1 see the same tokens."""
    single_dir, config = straight_run
    ddp_dir = tmp_path / "ddp"
    proc = train("--config", config, "--tokenizer", bpe_tokenizer_dir, "--data-dir", shards, "--run-dir", ddp_dir,
                 "--grad-accum", 1, nproc=2)
    assert "accum 1 x world 2" in proc.stdout
    single, single_evals = metrics(single_dir)
    ddp, ddp_evals = metrics(ddp_dir)
    assert sorted(ddp) == sorted(single) == list(range(1, 7))
    for s in single:
        assert abs(ddp[s]["loss"] - single[s]["loss"]) < 1e-5, (s, ddp[s]["loss"], single[s]["loss"])
        assert abs(ddp[s]["grad_norm"] - single[s]["grad_norm"]) < 1e-4
        assert ddp[s]["tokens"] == single[s]["tokens"]
    assert sorted(ddp_evals) == sorted(single_evals) == [0, 3, 6]
    for s in single_evals:
        assert abs(ddp_evals[s] - single_evals[s]) < 1e-5
    # the loss went down, so the steps did something worth comparing
    assert single[6]["loss"] < single[1]["loss"]


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, shards, bpe_tokenizer_dir, straight_run):
    """Steps 1-3, then a fresh process resumes steps 4-6: the same losses as 6 straight steps (fp32 CPU)."""
    straight_dir, config = straight_run
    run_dir = tmp_path / "resumed"
    shutil.copytree(straight_dir, run_dir)
    # The step-6 save "crashed" after its .pt: without the .json it is not complete, so step 3 is the latest.
    os.remove(run_dir / "step_000006.json")
    proc = train("--config", config, "--tokenizer", bpe_tokenizer_dir, "--data-dir", shards, "--run-dir", run_dir,
                 "--resume")
    assert "steps 3 -> 6" in proc.stdout
    straight, straight_evals = metrics(straight_dir)
    resumed, resumed_evals = metrics(run_dir)
    assert sorted(resumed) == list(range(1, 7))  # records after step 3 were replaced, not duplicated
    for s in (4, 5, 6):
        for key in ("loss", "grad_norm", "lr"):
            assert abs(resumed[s][key] - straight[s][key]) <= 1e-6, (s, key, resumed[s][key], straight[s][key])
    assert abs(resumed_evals[6] - straight_evals[6]) <= 1e-6
    a = torch.load(os.path.join(straight_dir, "step_000006.pt"), weights_only=True)
    b = torch.load(run_dir / "step_000006.pt", weights_only=True)
    assert max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]) <= 1e-6
    assert a["loader"] == b["loader"]


def test_resume_after_power_loss_skips_a_torn_mark_drops_a_torn_metrics_line_and_removes_leftovers(
        tmp_path, shards, bpe_tokenizer_dir, straight_run):
    straight_dir, config = straight_run
    run_dir = tmp_path / "torn"
    shutil.copytree(straight_dir, run_dir)
    mark = run_dir / "step_000006.json"
    mark.write_text(mark.read_text()[:40])  # the step-6 mark is not whole JSON: that save did not finish
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.2')  # the process died mid-line
    (run_dir / "step_000009.pt.tmp.4242").write_bytes(b"half a checkpoint")
    proc = train("--config", config, "--tokenizer", bpe_tokenizer_dir, "--data-dir", shards, "--run-dir", run_dir,
                 "--resume")
    assert "removed 2 leftover(s) of unfinished saves" in proc.stdout
    assert "step_000006.pt" in proc.stdout and "step_000009.pt.tmp.4242" in proc.stdout
    assert "dropped its torn last line" in proc.stdout and "steps 3 -> 6" in proc.stdout
    assert not (run_dir / "step_000009.pt.tmp.4242").exists()
    straight, _ = metrics(straight_dir)
    resumed, _ = metrics(run_dir)
    assert sorted(resumed) == list(range(1, 7))
    for s in (4, 5, 6):
        assert abs(resumed[s]["loss"] - straight[s]["loss"]) <= 1e-6


def test_the_run_draws_its_loss_curves_at_each_eval(straight_run):
    import plot

    run_dir, _ = straight_run
    png = os.path.join(run_dir, "loss.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    _, evals = metrics(run_dir)
    xs, ys = plot.series(run_dir)["val_loss"]
    assert ys == [evals[s] for s in sorted(evals)] and xs == [s * 4 * 32 * 2 for s in sorted(evals)]


def test_a_bad_val_shard_stops_the_run_before_step_0(tmp_path, shards, bpe_tokenizer_dir):
    data = tmp_path / "data"
    shutil.copytree(shards, data)
    manifest = json.loads((data / "manifest.json").read_text())
    val_shard = data / next(s["file"] for s in manifest["shards"] if s["split"] == "val")
    raw = bytearray(val_shard.read_bytes())
    raw[:4] = (12345).to_bytes(4, "little")  # not the shard magic
    val_shard.write_bytes(bytes(raw))
    config = write_config(tmp_path / "tiny.yaml", eval_every=0)  # the only eval would be the final one
    proc = train("--config", config, "--tokenizer", bpe_tokenizer_dir, "--data-dir", data, "--run-dir",
                 tmp_path / "run", check=False)
    assert proc.returncode != 0 and val_shard.name in proc.stderr and "magic" in proc.stderr, proc.stderr[-2000:]
    assert "step 1 " not in proc.stdout and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_eval_only_gives_the_same_val_loss_for_one_and_two_processes(straight_run, shards):
    run_dir, _ = straight_run
    one = eval_only(run_dir, shards)
    two = eval_only(run_dir, shards, nproc=2)  # 3 val windows: rank 0 takes two, rank 1 one
    assert one["val_tokens"] == two["val_tokens"] == 3 * 4 * 32
    assert abs(one["val_loss"] - two["val_loss"]) < 1e-6
    assert one["val_ppl"] == pytest.approx(np.exp(one["val_loss"]))
    # the checkpoint's own final eval used the same val tokens
    _, evals = metrics(run_dir)
    assert abs(one["val_loss"] - evals[6]) < 1e-6


@pytest.mark.parametrize("checkpoint_every,message", [(1, "the weights hold NaN/inf after step 7"),
                                                      (100, "non-finite loss nan")])
def test_non_finite_training_stops_and_keeps_the_last_good_checkpoint_latest(tmp_path, shards, bpe_tokenizer_dir,
                                                                              straight_run, checkpoint_every,
                                                                              message):
    """An LR beyond float32's range (1e39: inf in the optimizer's fp32 arithmetic, while `--lr inf` itself is
    refused) wrecks the weights in one step: the run stops before a NaN model is saved or stepped."""
    import checkpoints
    from hf_interop import load_model

    straight_dir, config = straight_run
    run_dir = tmp_path / "diverged"
    shutil.copytree(straight_dir, run_dir)
    proc = train("--config", config, "--tokenizer", bpe_tokenizer_dir, "--data-dir", shards, "--run-dir", run_dir,
                 "--resume", "--max-steps", 12, "--lr", "1e39", "--checkpoint-every", checkpoint_every, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert f"latest good checkpoint is {run_dir / 'step_000006.pt'}" in proc.stderr
    assert checkpoints.newest_checkpoint(str(run_dir)) == str(run_dir / "step_000006.pt")
    assert [os.path.basename(p) for p in checkpoints.complete_checkpoints(str(run_dir))] == ["step_000003.pt",
                                                                                            "step_000006.pt"]
    model, _ = load_model(str(run_dir))
    assert all(p.isfinite().all() for p in model.parameters())


def test_shards_of_another_tokenizer_are_refused_before_step_0(tmp_path, shards, bpe_tokenizer_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(english_like_documents(200, seed=7), trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    other_dir = tmp_path / "other_tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=SPECIAL_TOKENS[0]).save_pretrained(other_dir)
    other_shards = write_token_dataset(tmp_path / "other_shards", other_dir, n_docs=60)
    config = write_config(tmp_path / "tiny.yaml")
    proc = train("--config", config, "--tokenizer", bpe_tokenizer_dir, "--data-dir", other_shards,
                 "--run-dir", tmp_path / "run", check=False)
    assert proc.returncode != 0
    assert "shards were made with tokenizer" in proc.stderr and str(other_dir) in proc.stderr
    assert "tokens per step" not in proc.stdout
    assert not os.path.exists(tmp_path / "run") or os.listdir(tmp_path / "run") == [".lock"]  # nothing written


def test_token_ids_beyond_the_model_vocab_are_refused_before_step_0(tmp_path, shards, bpe_tokenizer_dir):
    config = write_config(tmp_path / "tiny.yaml")
    # the manifest's tokenizer has 512 entries, the model only 256
    proc = train("--config", config, "--tokenizer", bpe_tokenizer_dir, "--data-dir", shards,
                 "--run-dir", tmp_path / "run", "--model-config", json.dumps({**TINY_MODEL, "vocab_size": 256}),
                 check=False)
    assert proc.returncode != 0 and "exceeds the model's vocab_size 256" in proc.stderr
    # the manifest is right but a shard holds an id the tokenizer never makes (a corrupt or mixed-up shard)
    poisoned = write_token_dataset(tmp_path / "poisoned", bpe_tokenizer_dir, n_docs=60, poison=600)
    proc = train("--config", config, "--tokenizer", bpe_tokenizer_dir, "--data-dir", poisoned,
                 "--run-dir", tmp_path / "run", check=False)
    assert proc.returncode != 0 and "(train split) holds token id 600" in proc.stderr
    assert "tokens per step" not in proc.stdout
    assert not os.path.exists(tmp_path / "run") or os.listdir(tmp_path / "run") == [".lock"]  # nothing written


def test_continue_an_hf_model_then_restart_the_schedule_from_its_checkpoint(tmp_path, shards, tiny_llama_dir):
    config = write_config(tmp_path / "tiny.yaml", model_config={}, max_steps=3, eval_every=0)
    hf_run = tmp_path / "from_hf"
    train("--config", config, "--init-from", tiny_llama_dir, "--data-dir", shards, "--run-dir", hf_run)
    checkpoint = torch.load(hf_run / "step_000003.pt", weights_only=True)
    assert checkpoint["model_config"]["n_layer"] == 3 and checkpoint["tokenizer"] == tiny_llama_dir
    # start a new run from those weights with a fresh schedule: step 0, warmup again
    fresh = tmp_path / "fresh"
    proc = train("--config", config, "--init-from", hf_run, "--ignore-prior-schedule", "--data-dir", shards,
                 "--run-dir", fresh)
    assert "steps 0 -> 3" in proc.stdout
    steps, _ = metrics(fresh)
    assert sorted(steps) == [1, 2, 3] and steps[1]["lr"] == pytest.approx(1.5e-3)
    first_from_hf, _ = metrics(hf_run)
    assert steps[1]["loss"] < first_from_hf[1]["loss"]  # it starts from the trained weights, not the HF ones
    # without --ignore-prior-schedule the schedule continues, so a finished run has nothing left to do
    proc = train("--config", config, "--init-from", hf_run, "--data-dir", shards, "--run-dir", tmp_path / "again")
    assert "nothing to do" in proc.stdout


def test_a_run_dir_with_checkpoints_is_not_overwritten_without_resume(tmp_path, straight_run, shards,
                                                                      bpe_tokenizer_dir):
    run_dir, config = straight_run
    proc = train("--config", config, "--tokenizer", bpe_tokenizer_dir, "--data-dir", shards, "--run-dir", run_dir,
                 check=False)
    assert proc.returncode != 0 and "already holds checkpoints" in proc.stderr and "--resume" in proc.stderr


def train_constants():
    """train.py's UPPER_CASE defaults, executed on their own (without running the script)."""
    import ast
    from typing import Literal, Optional

    path = os.path.join(REPO, "train.py")
    tree = ast.parse(open(path).read())
    body = [node for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
            and all(isinstance(t, ast.Name) and t.id.isupper()
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))]
    namespace = {"Optional": Optional, "Literal": Literal, "__file__": path}
    exec(compile(ast.Module(body=body, type_ignores=[]), path, "exec"), namespace)
    return namespace


@pytest.mark.parametrize("name", ["train_tiny_cpu", "train_smollm2_135m_fineweb", "train_gpt_small_scratch"])
def test_shipped_configs_name_only_known_keys_and_valid_models(name):
    from config import configure
    from model import GPTConfig

    config = configure(train_constants(), argv=["--config", os.path.join(REPO, "configs", f"{name}.yaml")])
    assert config["init_from"] or config["tokenizer"], "a config needs a model or a tokenizer to train from"
    if not config["init_from"]:
        GPTConfig.from_dict({"vocab_size": 49152, **config["model_config"]})
    assert config["seq_len"] <= config["model_config"].get("max_seq_len", config["seq_len"])


def test_the_long_context_stage_config_parses_with_the_model_given_on_the_command_line():
    from config import configure

    config = configure(train_constants(), argv=["--config", os.path.join(REPO, "configs",
                                                                         "train_smollm2_hybrid_long_cpu.yaml"),
                                                "--init-from", "runs/hybrid/step_000100.pt"])
    assert config["ignore_prior_schedule"] and config["seq_len"] == 2048 and config["lr_attn"] > config["lr"]


def test_tiny_cpu_config_trains(tmp_path, shards, bpe_tokenizer_dir):
    run_dir = tmp_path / "tiny"
    train("--config", os.path.join(REPO, "configs", "train_tiny_cpu.yaml"), "--tokenizer", bpe_tokenizer_dir,
          "--data-dir", shards, "--run-dir", run_dir, "--max-steps", 4, "--eval-tokens", 1025)
    steps, evals = metrics(run_dir)
    assert sorted(steps) == [1, 2, 3, 4] and sorted(evals) == [0, 4]


def test_eval_tokens_smaller_than_one_window_is_refused_before_training(tmp_path, shards, bpe_tokenizer_dir):
    config = tmp_path / "c.yaml"
    write_config(config, data_dir=shards, tokenizer=bpe_tokenizer_dir, run_dir=str(tmp_path / "run"), eval_every=0)
    proc = run_script("train.py", "--config", config, "--eval-tokens", "10", check=False)
    assert proc.returncode != 0 and "one eval window" in proc.stderr
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")
