"""The config layer: constants < YAML < command line, typed, with named errors for unknown keys and bad values."""
import json
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

SCRIPT = textwrap.dedent('''
    import json, sys
    from typing import Optional
    sys.path.insert(0, {repo!r})
    from config import configure
    from data import MAGIC  # an imported constant: a tool of the script, never one of its settings

    LEARNING_RATE = 3e-4  # peak learning rate
    MAX_STEPS = 100  # optimizer steps
    COMPILE = False  # torch.compile the model
    RUN_NAME = "default"  # run directory name
    WINDOWS: list[Optional[int]] = [None, 128]  # per-layer attention windows
    BETAS = (0.9, 0.95)  # AdamW betas
    INIT_FROM: Optional[str] = None  # model to start from
    MODEL_CONFIG: dict = {{"n_layer": 2}}  # GPTConfig fields

    config = configure(globals(), positional={positional})
    print("RESULT " + json.dumps(config))
''')


def run_config_script(tmp_path, *args, positional=()):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(repo=REPO, positional=tuple(positional)))
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=tmp_path)


def result(proc):
    assert proc.returncode == 0, proc.stderr
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_defaults_are_the_constants_the_script_defines(tmp_path):
    config = result(run_config_script(tmp_path))
    assert config == {"learning_rate": 3e-4, "max_steps": 100, "compile": False, "run_name": "default",
                      "windows": [None, 128], "betas": [0.9, 0.95], "init_from": None,
                      "model_config": {"n_layer": 2}}


def test_all_three_cli_forms_and_types(tmp_path):
    config = result(run_config_script(tmp_path, "--learning-rate", "1e-3", "--max_steps=7", "run_name=exp",
                                      "--compile", "--windows", "[64, null, 32]", "betas=0.8,0.99",
                                      "--init-from", "models/x", "--model-config", "{n_layer: 4, n_embd: 64}"))
    assert config["learning_rate"] == 1e-3 and config["max_steps"] == 7 and config["run_name"] == "exp"
    assert config["compile"] is True and config["windows"] == [64, None, 32] and config["betas"] == [0.8, 0.99]
    assert config["init_from"] == "models/x" and config["model_config"] == {"n_layer": 4, "n_embd": 64}


def test_cli_wins_over_yaml_wins_over_constant(tmp_path):
    (tmp_path / "c.yaml").write_text("max_steps: 50\nlearning_rate: 0.01\ncompile: true\ninit_from: null\n")
    config = result(run_config_script(tmp_path, "--config", "c.yaml", "--max-steps", "9"))
    assert config["max_steps"] == 9 and config["learning_rate"] == 0.01 and config["compile"] is True


def test_optional_accepts_none_and_bool_accepts_explicit_false(tmp_path):
    config = result(run_config_script(tmp_path, "--init-from", "models/a", "init_from=none", "--compile", "false"))
    assert config["init_from"] is None and config["compile"] is False


def test_positional_argument_fills_named_constant(tmp_path):
    config = result(run_config_script(tmp_path, "models/m", "--max-steps", "3", positional=["INIT_FROM"]))
    assert config["init_from"] == "models/m"


@pytest.mark.parametrize("args,message", [
    (["--lerning-rate", "1"], "unknown key 'lerning_rate'.*did you mean 'learning_rate'"),
    (["max_step=3"], "unknown key 'max_step'.*did you mean 'max_steps'"),
    (["--max-steps", "ten"], "key 'max_steps': expected an int, got 'ten'"),
    (["--max-steps", "2.5"], "key 'max_steps': expected an int"),
    (["--compile=maybe"], "key 'compile': expected a bool"),
    (["--learning-rate", "fast"], "key 'learning_rate': expected a float"),
    (["--betas", "0.9"], "key 'betas': expected 2 items"),
    (["--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
    (["stray"], "unexpected argument"),
])
def test_bad_keys_and_values_exit_nonzero_with_named_message(tmp_path, args, message):
    import re

    proc = run_config_script(tmp_path, *args)
    assert proc.returncode != 0
    assert re.search(message, proc.stderr), proc.stderr


def test_unknown_or_ill_typed_yaml_key_names_the_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("max_steps: 10\nwarmup: 5\n")
    proc = run_config_script(tmp_path, "--config", "bad.yaml")
    assert proc.returncode != 0 and "unknown key 'warmup' (from bad.yaml)" in proc.stderr
    (tmp_path / "bad2.yaml").write_text("max_steps: many\n")
    proc = run_config_script(tmp_path, "--config", "bad2.yaml")
    assert proc.returncode != 0 and "max_steps in bad2.yaml" in proc.stderr


def test_help_lists_every_constant_with_default_and_comment(tmp_path):
    proc = run_config_script(tmp_path, "--help")
    assert proc.returncode == 0
    for flag, comment in [("--learning-rate", "peak learning rate"), ("--max-steps", "optimizer steps"),
                          ("--windows", "per-layer attention windows"), ("--init-from", "model to start from")]:
        assert flag in proc.stdout and comment in proc.stdout
    assert "default 0.0003" in proc.stdout


def test_effective_config_is_printed(tmp_path):
    proc = run_config_script(tmp_path, "--max-steps", "4")
    assert "max_steps = 4" in proc.stdout
