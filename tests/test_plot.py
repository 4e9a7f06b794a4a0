"""plot.py: the curves drawn are exactly the values in metrics.jsonl, at the token counts of config.json; the PNG is
written whole; a run still being written (no records, a torn last line, null values) never breaks it."""
import json
import math
import os

import matplotlib.image
import pytest

import plot
from checkpoints import MetricsLog
from conftest import run_script

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRAIN_CONFIG = {"batch_size": 4, "seq_len": 16, "grad_accum": 2, "world_size": 3}  # 384 tokens per step
DISTILL_CONFIG = {"phases": "12", "batch_size": 2, "seq_len": 8, "grad_accum": 1, "world_size": 2}  # 32


def write_config(run_dir, config):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({**config, "model_config": {"n_layer": 3}}, f)


def train_run(run_dir):
    """A train.py run: an eval at step 0 and every 3 steps; step 4's loss was NaN (logged as null)."""
    write_config(run_dir, TRAIN_CONFIG)
    log = MetricsLog(run_dir)
    log.write(step=0, val_loss=4.5, val_ppl=math.exp(4.5))
    for step in range(1, 7):
        loss = float("nan") if step == 4 else 5.0 - 0.25 * step
        log.write(step=step, loss=loss, lr=1e-3, grad_norm=1.0, tokens=step * 384, dt=0.1, tokens_per_s=3840.0,
                  mfu=None, epoch=0)
        if step % 3 == 0:
            log.write(step=step, val_loss=4.5 - 0.1 * step, val_ppl=math.exp(4.5 - 0.1 * step))
    return run_dir


def distill_run(run_dir):
    """A distill.py run through both phases, with a teacher: layers 0 and 2 (layer 0 logged before R^2 was),
    two rotations, unknown events in between."""
    write_config(run_dir, DISTILL_CONFIG)
    log = MetricsLog(run_dir)
    teacher = {"teacher_ce": 2.0, "eval_seconds": 1.5}
    log.write(phase=1, step=0, event="eval", layer=None, val_ce=6.0, val_ppl=math.exp(6.0), kl=4.0, top1_agree=0.2,
              **teacher)
    step = 0
    for rotation in range(2):
        for layer, r2 in ((0, None), (2, 0.9)):
            for layer_step in range(1, 3):
                step += 1
                log.write(phase=1, step=step, rotation=rotation, layer=layer, layer_step=layer_step,
                          loss=1.0 / step, lr=1e-3, tokens_per_s=100.0)
            r2s = {} if r2 is None else {"r2_before": r2 - 0.5, "r2_after": r2}
            log.write(phase=1, event="layer_done", step=step, rotation=rotation, layer=layer,
                      val_loss_before=0.8 - 0.1 * step, val_loss_after=0.4 - 0.04 * step, **r2s)
        log.write(phase=1, step=step, event="eval", rotation=rotation, layer=2, val_ce=3.0 - rotation,
                  val_ppl=1.0, kl=1.0 - 0.5 * rotation, top1_agree=0.6 + 0.1 * rotation, **teacher)
    log.write(phase=1, step=step, event="phase1_done", seconds=12.0)
    for step in range(1, 5):
        log.write(phase=2, step=step, loss=1.5 - 0.1 * step, ce=2.5 - 0.1 * step, kd=0.5 - 0.1 * step, lr=1e-4,
                  grad_norm=0.5, alpha=0.5, tokens_per_s=200.0, epoch=0)
    log.write(phase=2, step=4, event="eval", val_ce=2.1, val_ppl=math.exp(2.1), kl=0.1, top1_agree=0.9, **teacher)
    log.write(phase=2, step=4, event="alpha_switch", alpha_before=0.5, alpha_after=0.0)
    log.write(phase=2, step=4, event="something_new", value=1)
    return run_dir


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > 100 and width > 100
    assert not [n for n in os.listdir(os.path.dirname(path)) if ".tmp." in n], "a temp file was left behind"


def plotted_lines(fig):
    """{(panel title, legend label): (xs, ys)} of every line in `fig`."""
    return {(ax.get_title(), line.get_label()): (list(line.get_xdata()), list(line.get_ydata()))
            for ax in fig.axes for line in ax.lines}


def test_train_run_curves_are_its_records_against_tokens_from_config(tmp_path):
    run = train_run(str(tmp_path / "d12"))
    rows = records(run)
    train = [r for r in rows if "loss" in r and r["loss"] is not None]
    val = [r for r in rows if "val_loss" in r]
    data = plot.series(run)
    assert set(data) == {"train_loss", "val_loss"}
    assert data["train_loss"] == ([r["step"] * 384 for r in train], [r["loss"] for r in train])
    assert data["train_loss"][0] == [r["tokens"] for r in train]  # the tokens train.py logged itself
    assert 4 * 384 not in data["train_loss"][0]  # the NaN step (null in the file) is left out, not drawn as 0
    assert data["val_loss"] == ([0, 3 * 384, 6 * 384], [r["val_loss"] for r in val])
    lines = plotted_lines(plot.figure([run]))
    assert lines[("train.py: loss", "train")] == data["train_loss"]
    assert lines[("train.py: loss", "val")] == data["val_loss"]

    assert plot.plot_runs([run]) == [os.path.join(run, "loss.png")]
    assert_png(os.path.join(run, "loss.png"))


def test_distill_run_draws_phase1_layers_phase2_tokens_and_the_evals(tmp_path):
    run = distill_run(str(tmp_path / "distill"))
    rows = records(run)
    layers = [r for r in rows if r.get("event") == "layer_done"]
    phase2 = [r for r in rows if r.get("phase") == 2 and "event" not in r]
    evals = [r for r in rows if r.get("event") == "eval"]
    data = plot.series(run)
    assert data["p1_val_loss_before"] == ([0, 1, 2, 3], [r["val_loss_before"] for r in layers])
    assert data["p1_val_loss_after"] == ([0, 1, 2, 3], [r["val_loss_after"] for r in layers])
    assert data["p1_r2_after"] == ([1, 3], [0.9, 0.9])  # layer 0 logged no R^2: its positions are left out
    assert data["p2_ce"] == ([r["step"] * 32 for r in phase2], [r["ce"] for r in phase2])
    assert data["p2_kd"] == ([r["step"] * 32 for r in phase2], [r["kd"] for r in phase2])
    assert data["eval_val_ce"] == ([0, 1, 2, 3], [r["val_ce"] for r in evals])
    assert data["eval_teacher_ce"] == ([0, 1, 2, 3], [2.0] * 4)
    assert data["eval_kl"][1] == [r["kl"] for r in evals]
    assert data["eval_top1_agree"][1] == [r["top1_agree"] for r in evals]

    fig = plot.figure([run])
    lines = plotted_lines(fig)
    assert lines[("phase 1: layer-local val loss", "after")] == data["p1_val_loss_after"]
    assert lines[("phase 2: train loss", "KD")] == data["p2_kd"]
    assert lines[("evals: val CE", "teacher")] == data["eval_teacher_ce"]
    layer_ax = next(ax for ax in fig.axes if ax.get_title() == "phase 1: layer R^2")
    assert [t.get_text() for t in layer_ax.get_xticklabels()] == ["0", "2", "r1:0", "r1:2"]
    assert len(fig.axes) == 6

    assert plot.plot_runs([run]) == [os.path.join(run, "loss.png")]
    assert_png(os.path.join(run, "loss.png"))


def test_phase2_only_run_without_teacher_skips_the_panels_it_has_no_data_for(tmp_path):
    run = str(tmp_path / "ce_only")
    write_config(run, {**DISTILL_CONFIG, "phases": "2"})
    log = MetricsLog(run)
    log.write(phase=2, step=0, event="eval", val_ce=3.0, val_ppl=math.exp(3.0))
    for step in (1, 2):  # alpha = 0: kd is null
        log.write(phase=2, step=step, loss=2.0, ce=2.0, kd=None, lr=1e-4, grad_norm=0.5, alpha=0.0,
                  tokens_per_s=1.0, epoch=0)
    assert set(plot.series(run)) == {"p2_ce", "eval_val_ce"}
    assert [ax.get_title() for ax in plot.figure([run]).axes] == ["phase 2: train loss", "evals: val CE"]
    assert_png(plot.plot_runs([run])[0])


def test_several_runs_are_overlaid_into_runs_png_named_by_their_dirs(tmp_path):
    a, b = distill_run(str(tmp_path / "relu2")), distill_run(str(tmp_path / "swiglu"))
    labels = {label for _, label in plotted_lines(plot.figure([a, b]))}
    assert {"relu2 CE", "swiglu CE", "relu2 student", "swiglu teacher"} <= labels
    out = str(tmp_path / "compare")
    assert plot.plot_runs([a, b], out) == [os.path.join(out, "runs.png")]
    assert_png(os.path.join(out, "runs.png"))
    assert plot.plot_runs([a, b]) == [os.path.join(a, "runs.png")]  # default: the first run dir


def test_cli_draws_one_run_and_an_overlay(tmp_path):
    train, distill = train_run(str(tmp_path / "d12")), distill_run(str(tmp_path / "distill"))
    proc = run_script("plot.py", train)
    assert proc.stdout.strip() == os.path.join(train, "loss.png")
    assert_png(os.path.join(train, "loss.png"))
    out = str(tmp_path / "plots")
    proc = run_script("plot.py", train, distill, "--out", out)
    assert proc.stdout.strip() == os.path.join(out, "runs.png")
    assert_png(os.path.join(out, "runs.png"))


def test_a_torn_last_line_is_left_out_not_fatal(tmp_path):
    run = train_run(str(tmp_path / "d12"))
    before = plot.series(run)
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"step": 7, "loss": 3.')  # the run died while writing this record
    assert plot.series(run) == before
    assert_png(plot.plot_runs([run])[0])
    assert_png(run_script("plot.py", run).stdout.strip().splitlines()[-1])


def test_a_run_without_records_yet_is_skipped(tmp_path):
    empty, started = str(tmp_path / "empty"), str(tmp_path / "started")
    os.makedirs(empty)
    write_config(started, TRAIN_CONFIG)
    open(os.path.join(started, "metrics.jsonl"), "w").close()
    assert plot.series(empty) == {} and plot.series(started) == {}
    assert plot.plot_runs([empty]) == [] and plot.plot_runs([started]) == []
    assert os.listdir(empty) == []
    run = train_run(str(tmp_path / "d12"))
    assert plot.plot_runs([empty, run]) == [os.path.join(empty, "runs.png")]


def test_cli_refuses_a_run_dir_without_metrics_naming_it(tmp_path):
    missing = str(tmp_path / "not_a_run")
    os.makedirs(missing)
    proc = run_script("plot.py", missing, check=False)
    assert proc.returncode != 0
    assert missing in proc.stderr and "metrics.jsonl" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_without_token_counts_is_an_error_naming_file_and_keys(tmp_path):
    run = train_run(str(tmp_path / "d12"))
    write_config(run, {"batch_size": 4, "seq_len": 16})
    with pytest.raises(ValueError, match=r"config\.json.*grad_accum.*world_size"):
        plot.series(run)
