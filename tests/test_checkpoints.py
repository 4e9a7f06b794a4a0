"""Checkpoint IO in checkpoints.py: atomic, inspectable, never a half-written file taken as complete."""
import json

import pytest
import torch

import checkpoints
from hf_interop import load_model
from model import GPT, GPTConfig


def tiny_checkpoint(step):
    model = GPT(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, head_dim=8, mlp_hidden=32))
    from dataclasses import asdict
    return {"model": model.state_dict(), "model_config": asdict(model.config), "step": step, "config": {"lr": 0.1}}


def test_save_writes_pt_then_json_metadata_and_loads_with_weights_only(tmp_path):
    path = tmp_path / "step_000003.pt"
    checkpoints.save_checkpoint(str(path), tiny_checkpoint(3))
    meta = json.loads((tmp_path / "step_000003.json").read_text())
    assert meta["step"] == 3 and meta["config"] == {"lr": 0.1} and "model" not in meta
    loaded = checkpoints.load_checkpoint(str(path))
    assert loaded["step"] == 3 and not list(tmp_path.glob("*.tmp.*"))


def test_pt_without_json_is_an_interrupted_save_and_is_ignored(tmp_path):
    checkpoints.save_checkpoint(str(tmp_path / "step_000001.pt"), tiny_checkpoint(1))
    torch.save(tiny_checkpoint(2), tmp_path / "step_000002.pt")  # no .json: the save did not finish
    assert checkpoints.complete_checkpoints(str(tmp_path)) == [str(tmp_path / "step_000001.pt")]
    assert checkpoints.newest_checkpoint(str(tmp_path)) == str(tmp_path / "step_000001.pt")


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 10):
        checkpoints.save_checkpoint(str(tmp_path / f"step_{step:06d}.pt"), tiny_checkpoint(step))
    checkpoints.prune_checkpoints(str(tmp_path), keep=2)
    assert [p.rsplit("/", 1)[1] for p in checkpoints.complete_checkpoints(str(tmp_path))] == ["step_000002.pt",
                                                                                      "step_000010.pt"]


def test_newest_run_checkpoint_prefers_steps_then_final_then_layers(tmp_path):
    checkpoints.save_checkpoint(str(tmp_path / "layer_000.pt"), tiny_checkpoint(0))
    checkpoints.save_checkpoint(str(tmp_path / "layer_001.pt"), tiny_checkpoint(1))
    assert checkpoints.newest_checkpoint(str(tmp_path)).endswith("layer_001.pt")
    checkpoints.save_checkpoint(str(tmp_path / "final.pt"), tiny_checkpoint(2))
    assert checkpoints.newest_checkpoint(str(tmp_path)).endswith("final.pt")
    checkpoints.save_checkpoint(str(tmp_path / "step_000005.pt"), tiny_checkpoint(5))
    model, checkpoint = load_model(str(tmp_path))
    assert checkpoint["step"] == 5 and isinstance(model, GPT)


def test_unreadable_checkpoint_is_a_named_error(tmp_path):
    bad = tmp_path / "step_000001.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="step_000001.pt.*could not be read"):
        checkpoints.load_checkpoint(str(bad))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt.*no 'model'/'model_config'"):
        checkpoints.load_checkpoint(str(tmp_path / "other.pt"))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        checkpoints.load_checkpoint(str(tmp_path / "missing.pt"))
