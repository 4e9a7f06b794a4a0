"""Loss curves as PNG files, from the metrics.jsonl and config.json of train.py and distill.py run dirs.

A train.py run gets train and val loss against tokens. A distill.py run gets a panel for each thing it logged:
phase 1's per-layer val loss and R^2 before/after training the layer, phase 2's train CE and KD against tokens,
and the end-to-end evals (student and teacher CE, KL, top-1 agreement) in the order they ran. One run is drawn
into RUN_DIR/loss.png; several are overlaid, named by their dir, into runs.png in --out (default: the first).
train.py and distill.py can call `plot_runs` in-process; a run without records yet is skipped.

    python plot.py runs/d12
    python plot.py runs/distill_relu2 runs/distill_swiglu --out runs/compare
"""
import argparse
import json
import math
import os

import checkpoints

try:  # train.py and distill.py import this module to redraw at each eval; without matplotlib they just don't
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, and safe to call from a training process
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, MaxNLocator
except ImportError:
    matplotlib = None

LAYER_AXIS = "layer (in training order)"  # phase-1 panels: x is the position of the layer_done record
TOKEN_AXIS = "tokens"  # x = step * batch_size * seq_len * grad_accum * world_size
EVAL_AXIS = "eval # (phase 1, then phase 2)"  # x = the eval's position: phase-1 evals have no phase-2 tokens
# (title, x label, y label, {series name: legend label}); a panel is drawn when any run has one of its series
PANELS = [
    ("train.py: loss", TOKEN_AXIS, "CE (nats/token)", {"train_loss": "train", "val_loss": "val"}),
    ("phase 1: layer-local val loss", LAYER_AXIS, "val loss", {"p1_val_loss_before": "before",
                                                                "p1_val_loss_after": "after"}),
    ("phase 1: layer R^2", LAYER_AXIS, "R^2", {"p1_r2_before": "before", "p1_r2_after": "after"}),
    ("phase 2: train loss", "phase-2 " + TOKEN_AXIS, "nats/token", {"p2_ce": "CE", "p2_kd": "KD"}),
    ("evals: val CE", EVAL_AXIS, "CE (nats/token)", {"eval_val_ce": "student", "eval_teacher_ce": "teacher"}),
    ("evals: KL(teacher || student)", EVAL_AXIS, "nats/token", {"eval_kl": "KL"}),
    ("evals: top-1 agreement", EVAL_AXIS, "fraction", {"eval_top1_agree": "top-1"}),
]
LINE_STYLES = ["-", "--", ":"]  # the n-th series of a panel; with several runs the colour is the run's
COLUMNS = 3  # panels per row
MARKERS_UP_TO = 100  # series this short (evals, layers) get a marker at each point, so a lone eval is visible
DPI = 100


def read_run(run_dir):
    """(config, records) of a run dir; records [] while it has none (a run that has not logged yet)."""
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    records = checkpoints.read_metrics(metrics_path) if os.path.exists(metrics_path) else []
    if not records:
        return None, []
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"run dir '{run_dir}' has metrics.jsonl but no config.json; expected the "
                                f"config.json that train.py or distill.py writes at its start")
    with open(config_path, encoding="utf-8") as f:
        return json.load(f), records


def tokens_per_step(config, run_dir):
    keys = ("batch_size", "seq_len", "grad_accum", "world_size")
    missing = [k for k in keys if not isinstance(config.get(k), int)]
    if missing:
        raise ValueError(f"{os.path.join(run_dir, 'config.json')}: no integer {missing}; expected the config.json "
                         f"that train.py or distill.py writes, with {', '.join(keys)}")
    return math.prod(config[k] for k in keys)


def curve(records, key, xs):
    """(xs, ys) of `key` in `records`, leaving out the points where it is absent or null (json_safe writes a NaN
    or inf as null, and a phase-2 run with alpha = 0 logs kd as null)."""
    kept = [(x, r[key]) for x, r in zip(xs, records) if isinstance(r.get(key), (int, float))]
    return [x for x, _ in kept], [y for _, y in kept]


def run_series(config, records, run_dir):
    """{series name: (xs, ys)}: exactly what is drawn for one run (the names are PANELS'), empty series left out.
    Records of unknown events are ignored."""
    tokens = tokens_per_step(config, run_dir)
    found = {}
    if "phases" not in config:  # train.py: step records carry "loss", evals "val_loss"
        for name, key in (("train_loss", "loss"), ("val_loss", "val_loss")):
            rows = [r for r in records if key in r]
            found[name] = curve(rows, key, [r["step"] * tokens for r in rows])
    else:
        layers = [r for r in records if r.get("event") == "layer_done"]
        phase2 = [r for r in records if r.get("phase") == 2 and "event" not in r]
        evals = [r for r in records if r.get("event") == "eval"]
        for key in ("val_loss_before", "val_loss_after", "r2_before", "r2_after"):
            found["p1_" + key] = curve(layers, key, range(len(layers)))
        for key in ("ce", "kd"):
            found["p2_" + key] = curve(phase2, key, [r["step"] * tokens for r in phase2])
        for key in ("val_ce", "teacher_ce", "kl", "top1_agree"):
            found["eval_" + key] = curve(evals, key, range(len(evals)))
    return {name: xy for name, xy in found.items() if xy[0]}


def series(run_dir):
    """What `plot_runs` draws for `run_dir`: {series name: (xs, ys)}; {} while it has no records."""
    config, records = read_run(run_dir)
    return run_series(config, records, run_dir) if records else {}


def layer_labels(records):
    """Tick labels of the phase-1 panels: the layer of each layer_done record, with its rotation after the first."""
    done = [r for r in records if r.get("event") == "layer_done"]
    return [f"r{r.get('rotation')}:{r.get('layer')}" if r.get("rotation") else str(r.get("layer")) for r in done]


def figure(run_dirs):
    """One figure of `run_dirs` overlaid (legend entries prefixed by the run dir's name when there are several),
    a panel per PANELS entry with data. None when no run has records yet."""
    names = [os.path.basename(os.path.abspath(d)) for d in run_dirs]
    if len(set(names)) < len(names):  # runs/a/x and runs/b/x: the basename alone would not tell them apart
        names = [os.path.normpath(d) for d in run_dirs]
    runs = []
    for name, run_dir in zip(names, run_dirs):
        config, records = read_run(run_dir)
        if records:
            runs.append((name, run_series(config, records, run_dir), layer_labels(records)))
    panels = [p for p in PANELS if any(key in data for _, data, _ in runs for key in p[3])]
    if not panels:
        return None
    cols = min(COLUMNS, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(5.5 * cols, 3.8 * rows), dpi=DPI, layout="constrained")
    fig.suptitle(", ".join(name for name, _, _ in runs))
    for k, (title, xlabel, ylabel, keys) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        for j, (name, data, labels) in enumerate(runs):
            for n, (key, label) in enumerate(keys.items()):
                if key in data:
                    xs, ys = data[key]
                    ax.plot(xs, ys, LINE_STYLES[n], color=f"C{j if len(runs) > 1 else n}",
                            marker="o" if len(xs) <= MARKERS_UP_TO else None, markersize=3,
                            label=f"{name} {label}" if len(runs) > 1 else label)
            if xlabel == LAYER_AXIS and labels and any(key in data for key in keys):
                ax.set_xticks(range(len(labels)), labels, rotation=90 if len(labels) > 12 else 0, fontsize="small")
        if xlabel.endswith(TOKEN_AXIS):
            ax.xaxis.set_major_formatter(EngFormatter())  # 1.5G, not 1.5e9 in the corner
        elif xlabel == EVAL_AXIS:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def save_png(fig, path):
    """Save atomically: a reader (or the next eval's plot) never sees a half-written PNG."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"  # the run's start-up removes such leftovers (checkpoints.remove_unfinished_saves)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def plot_runs(run_dirs, out_dir=None):
    """Draw `run_dirs` (one: out_dir or its own dir / loss.png; several overlaid: out_dir or the first run dir /
    runs.png). Returns the PNG paths written: [] while no run has records yet."""
    fig = figure(run_dirs)
    if fig is None:
        return []
    path = os.path.join(out_dir or run_dirs[0], "loss.png" if len(run_dirs) == 1 else "runs.png")
    save_png(fig, path)
    return [path]


def refresh(run_dir):
    """Redraw RUN_DIR/loss.png: what train.py and distill.py call (rank 0) after each eval. Without matplotlib it
    does nothing; records it cannot draw get a note, never a stopped run."""
    if matplotlib is None:
        return []
    try:
        return plot_runs([run_dir])
    except (OSError, ValueError) as e:
        print(f"note: could not redraw the loss curves of '{run_dir}': {e}", flush=True)
        return []


def main(argv=None):
    if matplotlib is None:
        raise SystemExit("plot.py needs matplotlib: pip install matplotlib==3.11.2 (in requirements.txt)")
    parser = argparse.ArgumentParser(description="Draw loss curves of train.py / distill.py run dirs as PNG files.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run dirs holding metrics.jsonl")
    parser.add_argument("--out", help="directory of the PNG (default: the first RUN_DIR)")
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        if not os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
            raise SystemExit(f"run dir '{run_dir}' has no metrics.jsonl; expected the run dir of a train.py or "
                             f"distill.py run")
    written = plot_runs(args.run_dirs, args.out)
    if not written:
        raise SystemExit(f"nothing to plot yet: no records in the metrics.jsonl of {', '.join(args.run_dirs)}")
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
