"""One writer per run dir (and per prepare.py out dir): an OS lock that a second writer is refused by, naming the
holder, and that dies with its process; and damaged or torn files met on the way, each refused or handled by name."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

import checkpoints
from conftest import REPO, run_script

HOLD = ("import sys, time; sys.path.insert(0, {repo!r}); import checkpoints; checkpoints.lock_dir(sys.argv[1]); "
        "print('locked', flush=True); time.sleep(600)")


def hold_lock(path):
    """Another process that takes `path`'s lock and keeps it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(repo=REPO), str(path)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.parametrize("script,dir_flag,what", [("train.py", "--run-dir", "run dir"),
                                                  ("distill.py", "--run-dir", "run dir"),
                                                  ("prepare.py", "--out-dir", "out dir")])
def test_a_second_writer_is_refused_naming_the_holder(tmp_path, bpe_tokenizer_dir, script, dir_flag, what):
    target = tmp_path / "target"
    holder = hold_lock(target)
    try:
        args = {"train.py": ["--data-dir", tmp_path / "no_data", "--device", "cpu"],
                "distill.py": ["--data-dir", tmp_path / "no_data", "--teacher", tmp_path / "no_teacher",
                               "--device", "cpu"],
                "prepare.py": ["--model", bpe_tokenizer_dir, "--dataset", tmp_path / "none.txt"]}[script]
        if script == "prepare.py":
            (tmp_path / "none.txt").write_text("some text\n")
        proc = run_script(script, dir_flag, target, *args, check=False)
        assert proc.returncode != 0
        assert f"{what} '{target}' is in use by pid {holder.pid} on host {os.uname().nodename}" in proc.stderr, \
            proc.stderr[-2000:]
        assert sorted(os.listdir(target)) == [".lock"]  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    first = hold_lock(tmp_path / "run")
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = hold_lock(tmp_path / "run")  # taken at once: the OS released the dead process's lock
    second.kill()
    second.wait()


def test_non_finite_metrics_are_written_as_json_null(tmp_path):
    log = checkpoints.MetricsLog(tmp_path)
    log.write(step=1, loss=float("nan"), grad_norm=float("inf"), lr=1e-3)
    line = (tmp_path / "metrics.jsonl").read_text()
    record = json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert record == {"step": 1, "loss": None, "grad_norm": None, "lr": 1e-3}


def test_a_bad_metrics_line_before_the_last_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a JSON record"):
        checkpoints.read_metrics(str(path))
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    assert checkpoints.read_metrics(str(path)) == [{"step": 1}]


def test_a_checkpoint_with_a_torn_mark_is_incomplete_and_removed_at_start_up(tmp_path):
    for step in (1, 2):
        checkpoints.save_checkpoint(str(tmp_path / f"step_{step:06d}.pt"), {"model": {}, "model_config": {},
                                                                            "step": step})
    (tmp_path / "step_000002.json").write_text('{"step": 2, "mod')
    (tmp_path / "tokenizer.tmp.77").mkdir()
    assert checkpoints.newest_checkpoint(str(tmp_path), "step_") == str(tmp_path / "step_000001.pt")
    assert checkpoints.remove_unfinished_saves(str(tmp_path)) == ["step_000002.pt", "tokenizer.tmp.77"]
    assert sorted(os.listdir(tmp_path)) == ["step_000001.json", "step_000001.pt"]


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_tensor(tmp_path):
    import torch

    path = str(tmp_path / "step_000001.pt")
    weights = {"embed.weight": torch.ones(4, 2), "blocks.0.mlp.down.weight": torch.tensor([[1.0, float("nan")]])}
    checkpoints.save_checkpoint(path, {"model": weights, "model_config": {}, "step": 1})
    with pytest.raises(ValueError, match=r"holds NaN/inf weights in blocks.0.mlp.down.weight.*earlier checkpoint"):
        checkpoints.load_checkpoint(path)


def test_an_hf_model_dir_with_nan_weights_is_refused_naming_the_tensor(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file, save_file

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_llama_dir, damaged)
    weights = load_file(damaged / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, damaged / "model.safetensors", metadata={"format": "pt"})
    proc = run_script("sample.py", damaged, "--prompt", "The", "--max-new-tokens", 2, "--device", "cpu", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"model '{damaged}' holds NaN/inf weights in model.layers.1.mlp.down_proj.weight" in proc.stderr


def test_a_prompt_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"caf\xe9\n")
    proc = run_script("sample.py", "some/model", "--prompt-file", tmp_path / "p.txt", check=False)
    assert proc.returncode != 0 and f"--prompt-file '{tmp_path / 'p.txt'}' is not UTF-8 text" in proc.stderr


FULL_DISK = """
import resource, signal, sys, torch
sys.path.insert(0, {repo!r})
import checkpoints
checkpoints.save_checkpoint(sys.argv[1] + "/step_000001.pt", {{"model": {{"w": torch.ones(8)}}, "model_config": {{}},
                                                            "step": 1}})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
checkpoints.save_checkpoint(sys.argv[1] + "/step_000002.pt", {{"model": {{"w": torch.ones(1_000_000)}},
                                                            "model_config": {{}}, "step": 2}})
"""


def test_a_full_disk_during_a_save_names_the_file_and_sizes_and_keeps_the_earlier_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-c", FULL_DISK.format(repo=REPO), str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert f"cannot save '{tmp_path}/step_000002.pt': File too large" in proc.stderr, proc.stderr[-1500:]
    assert "of about 3.8 MiB" in proc.stderr and "the earlier checkpoints are intact" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["step_000001.json", "step_000001.pt"]  # no temp file left
    assert checkpoints.load_checkpoint(str(tmp_path / "step_000001.pt"))["step"] == 1


def test_a_gguf_name_on_an_unreadable_body_is_refused_in_one_line(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(64))  # the magic, then nothing
    (tmp_path / "t.txt").write_text("some text\n")
    proc = run_script("prepare.py", "--model", tmp_path / "bad.gguf", "--model-dir", tmp_path / "m", "--dataset",
                      tmp_path / "t.txt", "--out-dir", tmp_path / "out", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"--model: '{tmp_path / 'bad.gguf'}' could not be read as a GGUF model" in proc.stderr
