"""The config layer: constants < YAML < command line, typed, with named errors for unknown keys and bad values."""
import json
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

SCRIPT = textwrap.dedent('''
    import json, sys
    from typing import Literal, Optional
    sys.path.insert(0, {repo!r})
    from config import configure
    from data import MAGIC  # an imported constant: a tool of the script, never one of its settings

    LEARNING_RATE: float = 3e-4  # peak learning rate
    MAX_STEPS: int = 100  # optimizer steps
    COMPILE: bool = False  # torch.compile the model
    RUN_NAME: str = "default"  # run directory name
    WINDOWS: list[Optional[int]] = [None, 128]  # per-layer attention windows
    BETAS: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    INIT_FROM: Optional[str] = None  # model to start from
    MODEL_CONFIG: dict = {{"n_layer": 2}}  # GPTConfig fields
    PHASES: Literal["1", "2", "12"] = "12"  # which phases run
    WIDTH: Literal[256, 512] = 256  # a choice of ints
    SPLITS = ("train", "val")  # no annotation: fixed by the code, not a setting

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
                      "model_config": {"n_layer": 2}, "phases": "12", "width": 256}


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
    (["--phases", "3"], "key 'phases': value '3' is not one of 1, 2, 12"),
    (["width=300"], "key 'width': value '300' is not one of 256, 512"),
])
def test_bad_keys_and_values_exit_nonzero_with_named_message(tmp_path, args, message):
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


def test_unannotated_constant_is_not_a_setting(tmp_path):
    assert "splits" not in result(run_config_script(tmp_path))
    proc = run_config_script(tmp_path, "--splits", "a,b")
    assert proc.returncode != 0 and "unknown key 'splits'" in proc.stderr
    assert "--splits" not in run_config_script(tmp_path, "--help").stdout


def test_help_shows_type_default_and_the_comment_of_an_annotated_setting(tmp_path):
    proc = run_config_script(tmp_path, "-h")
    assert proc.returncode == 0
    line = next(l for l in proc.stdout.splitlines() if "--run-name" in l)
    assert "str" in line and "run directory name (default 'default')" in proc.stdout


def test_help_without_the_source_file_still_lists_the_settings(capsys):
    from config import configure

    namespace = {"__annotations__": {"MAX_STEPS": int}, "MAX_STEPS": 3}
    with pytest.raises(SystemExit) as exit_:
        configure(namespace, argv=["--help"])
    assert exit_.value.code == 0 and "--max-steps" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--max-steps", "7"], ["--max-steps=7"], ["max_steps=7"], ["--max_steps", "7"],
                                  ["max-steps=7"], ["MAX_STEPS=7"]])
def test_every_cli_form_sets_the_same_setting(tmp_path, args):
    assert result(run_config_script(tmp_path, *args))["max_steps"] == 7


def test_bare_bool_flag_means_true_and_leaves_the_next_argument_alone(tmp_path):
    config = result(run_config_script(tmp_path, "--compile", "models/m", positional=["INIT_FROM"]))
    assert config["compile"] is True and config["init_from"] == "models/m"


def test_a_value_that_looks_like_an_override_or_an_option_stays_a_value(tmp_path):
    config = result(run_config_script(tmp_path, "--run-name", "a=b", "--learning-rate", "-1e-3"))
    assert config["run_name"] == "a=b" and config["learning_rate"] == -1e-3


def test_duplicate_yaml_key_is_refused_naming_key_and_file(tmp_path):
    (tmp_path / "dup.yaml").write_text("max_steps: 10\ncompile: true\nmax_steps: 20\n")
    proc = run_config_script(tmp_path, "--config", "dup.yaml")
    assert proc.returncode != 0
    assert "duplicate key 'max_steps'" in proc.stderr and "dup.yaml" in proc.stderr


def test_string_annotation_is_refused():
    from config import configure

    with pytest.raises(TypeError, match="MAX_STEPS has a string annotation 'int'"):
        configure({"__annotations__": {"MAX_STEPS": "int"}, "MAX_STEPS": 3}, argv=[])


def test_a_literal_setting_takes_each_listed_value_from_yaml_or_cli_and_shows_them_in_help(tmp_path):
    (tmp_path / "c.yaml").write_text("phases: 2\nwidth: 512\n")  # YAML reads both as ints
    config = result(run_config_script(tmp_path, "--config", "c.yaml"))
    assert config["phases"] == "2" and config["width"] == 512
    assert result(run_config_script(tmp_path, "phases=1", "--width", "256"))[("phases")] == "1"
    (tmp_path / "bad.yaml").write_text("phases: 21\n")
    proc = run_config_script(tmp_path, "--config", "bad.yaml")
    assert proc.returncode != 0 and "key 'phases in bad.yaml': value 21 is not one of 1, 2, 12" in proc.stderr
    line = next(l for l in run_config_script(tmp_path, "--help").stdout.splitlines() if "--phases" in l)
    assert "1|2|12" in line


@pytest.mark.parametrize("script,args,message", [
    ("train.py", ["--lr", "nan"], "key 'lr': expected a float, got 'nan'"),
    ("train.py", ["--lr", "-1"], "lr = -1.0; expected a value > 0"),
    ("train.py", ["--weight-decay", "-0.1"], "weight_decay = -0.1; expected a value >= 0.0"),
    ("train.py", ["--betas", "0.9,1.5"], "betas = (0.9, 1.5); expected value(s) in [0, 1]"),
    ("distill.py", ["--temperature", "inf"], "key 'temperature': expected a float, got 'inf'"),
    ("distill.py", ["--lr-layer", "0"], "lr_layer = 0.0; expected a value > 0"),
    ("distill.py", ["--refit-ridge", "0"], "refit_ridge = 0.0; expected a value > 0"),
    ("distill.py", ["--alpha", "1.5"], "alpha = 1.5; expected value(s) in [0, 1]"),
    ("distill.py", ["--min-lr-frac", "2"], "min_lr_frac = 2.0; expected value(s) in [0, 1]"),
])
def test_a_numeric_setting_out_of_its_range_is_refused_by_name_before_any_work(script, args, message):
    proc = subprocess.run([sys.executable, f"{REPO}/{script}", *args, "--data-dir", "/nonexistent"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-1500:]
