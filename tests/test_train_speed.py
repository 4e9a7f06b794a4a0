"""train.py with OPTIMIZER=muon, the speedrun model options and a window schedule, run as a user runs it: exact
resume, 2 processes == 1, the optimizer's groups, the schedule, and the shipped from-scratch configs."""
import os
import shutil
import subprocess

import pytest
import torch
import yaml

from conftest import REPO, run_script, torchrun, write_token_dataset
from model import GPT, GPTConfig
from training import window_at

pytestmark = pytest.mark.usefixtures("one_thread")

SPEED_MODEL = {"n_layer": 4, "n_head": 4, "n_kv_head": 2, "n_embd": 64, "head_dim": 16, "mlp_hidden": 128,
               "max_seq_len": 128, "residual_gates": True, "skip_connections": True, "value_embeds": 1,
               "window": [16, 16, 16, None], "block_sparse": [4, 4, 4, None]}
SPEED_RUN = {"model_config": SPEED_MODEL, "device": "cpu", "dtype": "float32", "batch_size": 4, "seq_len": 64,
             "grad_accum": 2, "max_steps": 6, "lr": 3e-3, "warmup_steps": 2, "lr_schedule": "cosine",
             "optimizer": "muon", "matrix_lr": 0.02, "embed_lr": 3e-3, "scalar_lr": 0.01,
             "window_schedule": [16, 64], "eval_every": 3, "eval_tokens": 2 * 4 * 64 + 1, "checkpoint_every": 3,
             "keep_checkpoints": 0, "log_every": 1}
MUON_LRS = {"matrix": 0.02, "embed": 3e-3, "head": 4e-3, "scalar": 0.01, "momentum": 0.95}


@pytest.fixture(scope="module")
def shards(tmp_path_factory, bpe_tokenizer_dir):
    return write_token_dataset(tmp_path_factory.mktemp("shards"), bpe_tokenizer_dir)


def losses_of(run_dir):
    import json

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}, {r["step"]: r["val_loss"] for r in records
                                                                     if "val_loss" in r}


@pytest.fixture(scope="module")
def muon_run(tmp_path_factory, shards, bpe_tokenizer_dir):
    config = tmp_path_factory.mktemp("cfg") / "speed.yaml"
    config.write_text(yaml.safe_dump(SPEED_RUN))
    run_dir = tmp_path_factory.mktemp("runs") / "straight"
    run_script("train.py", "--config", config, "--tokenizer", bpe_tokenizer_dir, "--data-dir", shards,
               "--run-dir", run_dir)
    return str(run_dir), str(config)


def test_muon_routes_every_parameter_to_its_group_at_its_own_lr():
    model = GPT(GPTConfig(vocab_size=512, tie_embeddings=False, **SPEED_MODEL)).init_weights()
    optimizer = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95), "cpu", muon=MUON_LRS)
    groups = {g["role"]: g for g in optimizer.param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    matrices = [names[id(p)] for p in groups["matrix"]["params"]]
    assert groups["matrix"]["use_muon"] and all(n.startswith("blocks.") and "norm" not in n for n in matrices)
    assert len(matrices) == 4 * 4  # qkv, proj, the MLP's two matrices, in each of the 4 blocks
    assert sorted(names[id(p)] for p in groups["embed"]["params"]) == ["embed.weight", "value_embeds.0.weight"]
    assert [names[id(p)] for p in groups["head"]["params"]] == ["lm_head.weight"]
    scalars = [names[id(p)] for p in groups["scalar"]["params"]]
    assert all(n.endswith(("_gate", "norm.weight")) for n in scalars) and groups["scalar"]["weight_decay"] == 0
    for role, key in (("matrix", "matrix"), ("embed", "embed"), ("head", "head"), ("scalar", "scalar")):
        assert groups[role]["lr_scale"] == pytest.approx(MUON_LRS[key] / 1e-3)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_the_window_schedule_grows_in_steps_of_64_and_ends_at_its_end():
    windows = [window_at(s, 100, 64, 512) for s in range(100)]
    assert windows[0] == 64 and windows[-1] == 512
    assert windows == sorted(windows) and all(w % 64 == 0 for w in windows)
    assert window_at(0, 1, 64, 512) == 512  # a one-step run trains at the end window


def test_muon_run_with_every_option_trains_and_resumes_exactly(tmp_path, muon_run, shards, bpe_tokenizer_dir):
    straight_dir, config = muon_run
    losses, evals = losses_of(straight_dir)
    assert evals[6] < evals[0]
    run_dir = tmp_path / "resumed"
    shutil.copytree(straight_dir, run_dir)
    os.remove(run_dir / "step_000006.json")  # the last save "crashed": resume from step 3
    proc = run_script("train.py", "--config", config, "--tokenizer", bpe_tokenizer_dir, "--data-dir", shards,
                      "--run-dir", run_dir, "--resume")
    assert "steps 3 -> 6" in proc.stdout
    resumed, resumed_evals = losses_of(run_dir)
    assert resumed == losses and resumed_evals == evals
    a = torch.load(os.path.join(straight_dir, "step_000006.pt"), weights_only=True)
    b = torch.load(run_dir / "step_000006.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # the schedule ended at its last window, and the checkpoint records it
    assert a["model_config"]["window"] == [64, 64, 64, None]


def test_muon_two_processes_equal_one(tmp_path, muon_run, shards, bpe_tokenizer_dir):
    straight_dir, config = muon_run
    ddp_dir = tmp_path / "ddp"
    proc = subprocess.run(torchrun("train.py", 2, "--config", config, "--tokenizer", bpe_tokenizer_dir,
                                   "--data-dir", shards, "--run-dir", ddp_dir, "--grad-accum", 1),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, single_evals = losses_of(straight_dir)
    ddp, ddp_evals = losses_of(ddp_dir)
    assert sorted(ddp) == list(range(1, 7))
    assert ddp == pytest.approx(single, abs=1e-5) and ddp_evals == pytest.approx(single_evals, abs=1e-5)


def test_a_model_with_options_on_is_refused_by_the_hf_export(muon_run, tmp_path):
    from hf_interop import load_model, save_pretrained

    straight_dir, _ = muon_run
    model, _ = load_model(straight_dir)
    with pytest.raises(ValueError, match="residual_gates=True"):
        save_pretrained(model, str(tmp_path / "hf"), os.path.join(straight_dir, "tokenizer"))


@pytest.mark.parametrize("name", ["train_gpt_small_speed", "train_gpt_small_adamw"])
def test_the_from_scratch_configs_parse_and_build_the_same_dims(name):
    from config import configure
    from test_train import train_constants

    config = configure(train_constants(), argv=["--config", os.path.join(REPO, "configs", f"{name}.yaml"),
                                                "--tokenizer", "models/smollm2_135m"])
    model = GPTConfig.from_dict({"vocab_size": 49152, **config["model_config"]})
    assert (model.n_layer, model.n_embd, model.mlp_hidden[0]) == (6, 256, 768)
    assert config["target_tokens"] == 393_216 and config["seq_len"] == 256
    assert config["optimizer"] == ("muon" if name.endswith("speed") else "adamw")
