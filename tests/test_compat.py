"""Checkpoints written by the code before the restructure (commit f6757ea: common.py, one distill.py, GPT.forward
returning logits) still load and resume with the code of today.

The old code is taken from git into a temp dir and run there as a user ran it; its run dirs are then read and
continued by the new code, bitwise: the new GPT.logits equals the old GPT.forward on the same weights, a train
run the old code stopped at step 3 and the new code resumes to step 6 ends as the old code's 6 straight steps,
and an old distill phase 1 continued by the new phase 2 ends as one uninterrupted new run.
"""
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import REPO, make_tiny_llama, run_script, write_token_dataset

OLD_COMMIT = "f6757ea"  # the last commit before common.py and distill.py were split into modules
# one thread everywhere, and torch's own matmuls (as the old code had): bitwise-equal results need the same
# reduction order
ENV = {"OMP_NUM_THREADS": "1", "CPU_ONEDNN_MATMUL": "0"}
TINY_RUN = {"model_config": {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64, "head_dim": 16,
                             "mlp_hidden": 128, "max_seq_len": 64},
            "device": "cpu", "dtype": "float32", "batch_size": 2, "seq_len": 32, "grad_accum": 2, "lr": 3e-3,
            # constant after warmup: max_steps does not change the schedule, so a run can be extended exactly
            "warmup_steps": 2, "lr_schedule": "constant", "eval_every": 0, "eval_tokens": 2 * 32 + 1,
            "checkpoint_every": 3, "keep_checkpoints": 0, "log_every": 1}
DISTILL_TINY = ["--device", "cpu", "--dtype", "float32", "--batch-size", "2", "--seq-len", "32", "--eval-tokens",
                "256", "--num-batches", "2", "--log-every", "1000", "--loss-chunk", "48", "--steps-per-layer", "3",
                "--layers", "[0, 1]", "--max-steps", "3", "--warmup-steps", "1", "--checkpoint-every", "3"]


@pytest.fixture(scope="module")
def old_code(tmp_path_factory):
    """The repo as of OLD_COMMIT, extracted from git without touching the work tree."""
    if subprocess.run(["git", "-C", REPO, "cat-file", "-e", f"{OLD_COMMIT}^{{commit}}"],
                      capture_output=True).returncode != 0:
        pytest.skip(f"commit {OLD_COMMIT} is not in this clone (shallow?); the compatibility check needs it")
    path = tmp_path_factory.mktemp("old_code")
    archive = subprocess.run(["git", "-C", REPO, "archive", OLD_COMMIT], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(path)], input=archive, check=True)
    return str(path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, bpe_tokenizer_dir):
    return write_token_dataset(tmp_path_factory.mktemp("shards"), bpe_tokenizer_dir, n_docs=340, val_tokens=4000)


def run_old(old_code, *args):
    """Run the old code's script or `-c` snippet in its own dir, so that it imports its own modules."""
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=old_code, env={**os.environ, **ENV},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (f"old {args[:2]} exited {proc.returncode}\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def assert_same_weights(path_a, path_b):
    """Bitwise the same weights and data position."""
    a, b = (torch.load(p, weights_only=True) for p in (path_a, path_b))
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # the same data position; the order and seed keys are newer than the old code (absent: stream order)
    as_old = lambda state: {k: v for k, v in state.items() if k not in ("order", "seed")}
    assert as_old(a["loader"]) == as_old(b["loader"])
    assert a["loader"].get("order", "stream") == b["loader"].get("order", "stream") == "stream"


def old_train(old_code, config, tokenizer, data_dir, run_dir, max_steps):
    return run_old(old_code, "train.py", "--config", config, "--tokenizer", tokenizer, "--data-dir", data_dir,
                   "--run-dir", run_dir, "--max-steps", max_steps)


def test_checkpoints_written_before_the_restructure_load_and_resume(old_code, shards, bpe_tokenizer_dir, tmp_path,
                                                                    monkeypatch):
    import model as model_module
    from hf_interop import load_model

    monkeypatch.setattr(model_module, "CPU_ONEDNN_MATMUL", False)

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_RUN))
    run, straight = tmp_path / "run", tmp_path / "straight"
    old_train(old_code, config, bpe_tokenizer_dir, shards, run, 3)
    old_train(old_code, config, bpe_tokenizer_dir, shards, straight, 6)

    # the new loader reads the old checkpoint, and the new GPT.logits equals the old GPT.forward
    run_old(old_code, "-c", "import sys, torch, common; model, _ = common.load_model(sys.argv[1]); "
                            "torch.manual_seed(0); idx = torch.randint(0, 512, (2, 24)); "
                            "torch.save({'idx': idx, 'logits': model.eval()(idx)}, sys.argv[2])",
            run, tmp_path / "old_logits.pt")
    old = torch.load(tmp_path / "old_logits.pt", weights_only=True)
    model, checkpoint = load_model(str(run))
    assert checkpoint["step"] == 3
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            assert torch.equal(model.eval().logits(old["idx"]), old["logits"])
    finally:
        torch.set_num_threads(threads)

    # the new train.py extends the old run 3 -> 6 exactly as the old code runs 6 steps straight
    proc = run_script("train.py", "--config", config, "--data-dir", shards, "--run-dir", run, "--resume",
                      "--max-steps", 6, env=ENV)
    assert "steps 3 -> 6" in proc.stdout
    assert_same_weights(run / "step_000006.pt", straight / "step_000006.pt")


def test_an_old_distill_phase1_is_continued_by_the_new_phase2_as_in_one_new_run(old_code, shards,
                                                                               bpe_tokenizer_dir, tmp_path):
    """Compared with a new uninterrupted run, not an old one: phase 2's loss was rewritten (closed-form CE
    gradient in losses.py instead of autograd through F.cross_entropy), which moves its weights by ~1e-7."""
    teacher = make_tiny_llama(tmp_path / "teacher", bpe_tokenizer_dir, seed=3)
    run, straight = tmp_path / "run", tmp_path / "straight"
    args = ["distill.py", "--teacher", teacher, "--data-dir", shards, *DISTILL_TINY]
    run_old(old_code, *args, "--run-dir", run, "--phases", "1")
    # the old code's phase 1: zero-init MLPs and the plain MSE (the new defaults are prune and nmse)
    run_script(*args, "--run-dir", straight, "--phases", "12", "--mlp-init", "zero", "--layer-loss", "mse", env=ENV)
    assert os.path.exists(run / "final.pt") and not os.path.exists(run / "step_000003.pt")
    assert_same_weights(run / "final.pt", straight / "final.pt")  # phase 1 is unchanged

    run_script(*args, "--run-dir", run, "--phases", "2", "--resume", env=ENV)
    assert_same_weights(run / "step_000003.pt", straight / "step_000003.pt")
