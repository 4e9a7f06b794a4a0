"""Run-dir IO: checkpoints (a weights_only .pt plus a .json of metadata written last as the completion mark),
which checkpoint is the newest, atomic text writes, metrics.jsonl and the run dir's own config and tokenizer.

Names in a run dir: step_XXXXXX.pt (train.py and distill phase 2), layer_XXX.pt (distill phase 1, one per
finished layer), final.pt (the end of distill phase 1), phase1_state.pt (distill's rolling mid-layer state).
A checkpoint is complete when its .json exists; every function here ignores the others. A run dir (and
prepare.py's out dir) has one writer at a time: `lock_dir` holds an OS lock on its .lock file.
"""
import errno
import fcntl
import json
import math
import os
import re
import shutil
import socket
import time
import types

import torch


def atomic_torch_save(obj, path):
    """Write to a temp file in the same directory, fsync, then rename: a crash never leaves a partial file. A full
    disk (or file-size limit) ends the run with the file, the space needed and free, and the earlier checkpoints
    untouched."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:  # torch.save re-raises a failed write as a RuntimeError
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        if os.path.exists(tmp):
            os.remove(tmp)
        cause = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None or cause.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        raise SystemExit(f"cannot save '{path}': {cause.strerror} after {written / 2**20:.1f} MiB of about "
                         f"{tensor_bytes(obj) / 2**20:.1f} MiB ({free / 2**20:.1f} MiB free on its disk). Nothing "
                         f"was replaced: the earlier checkpoints are intact. Free some space, then --resume.") from e
    os.replace(tmp, path)


def tensor_bytes(obj):
    """The bytes of the tensors in a (nested) checkpoint dict: about the size of its file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def atomic_write_text(text, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def json_safe(obj):
    """`obj` as plain JSON: tensors described, other objects as their repr, NaN/inf as null (JSON has none)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return f"<tensor {tuple(obj.shape)} {obj.dtype}>"
    return repr(obj)


def save_checkpoint(path, checkpoint):
    """Save a checkpoint dict atomically, and a `.json` beside it with everything but tensors.

    The .json is written after the .pt, so a .pt without a .json is an interrupted save, never the latest.
    """
    atomic_torch_save(checkpoint, path)
    meta = {k: v for k, v in checkpoint.items() if k not in ("model", "optimizer", "rng")}
    atomic_write_text(json.dumps(json_safe(meta), indent=2) + "\n", os.path.splitext(path)[0] + ".json")


def load_checkpoint(path, map_location="cpu"):
    """Load one of our checkpoints safely (no pickled code), with an error that names the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint '{path}' could not be read ({type(e).__name__}: {e}); "
                         f"it may be truncated or not a checkpoint of this repo") from e
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "model_config" not in checkpoint:
        raise ValueError(f"checkpoint '{path}' has no 'model'/'model_config' entries; "
                         f"expected a checkpoint written by train.py or distill.py")
    # the runs never save non-finite weights, so these were damaged after the save: refused, never resumed from
    refuse_non_finite(checkpoint["model"], f"checkpoint '{path}'", "it was damaged after it was saved: use an "
                                                                    "earlier checkpoint")
    return checkpoint


def refuse_non_finite(state, what, advice):
    """Raise a ValueError naming the tensors of `state` (name -> tensor) that hold NaN/inf, if any: weights like
    that only give a NaN error deep inside sampling or training."""
    broken = [name for name, t in state.items() if t.is_floating_point() and not t.isfinite().all()]
    if broken:
        raise ValueError(f"{what} holds NaN/inf weights in {', '.join(broken[:3])}"
                         f"{f' and {len(broken) - 3} more tensors' if len(broken) > 3 else ''}; {advice}")


def checkpoint_meta(path):
    """The .json beside a checkpoint: its metadata without loading any tensor. None when it is missing or torn
    (not whole JSON): then the save did not finish."""
    try:
        with open(os.path.splitext(path)[0] + ".json", encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):  # ValueError: JSONDecodeError, or bytes that are not UTF-8
        return None


def is_complete(path):
    return os.path.exists(path) and checkpoint_meta(path) is not None


def remove_unfinished_saves(run_dir):
    """At the start of a run (under its lock): delete what killed or failed saves left, the temp files of atomic
    writes and checkpoints whose .json mark is missing or torn. Returns the names removed."""
    removed = []
    for name in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
        path = os.path.join(run_dir, name)
        torn = name.endswith(".pt") and not is_complete(path)
        if re.search(r"\.tmp\.\d+$", name) or torn:
            if os.path.isdir(path):  # the tokenizer copy is saved into a temp dir, then renamed
                shutil.rmtree(path)
            else:
                os.remove(path)
            if torn and os.path.exists(os.path.splitext(path)[0] + ".json"):
                os.remove(os.path.splitext(path)[0] + ".json")
            removed.append(name)
    return removed


def complete_checkpoints(run_dir, prefix="step_"):
    """Checkpoints `prefix`NNN.pt in `run_dir` whose save finished, oldest first by number."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        m = re.fullmatch(rf"{re.escape(prefix)}(\d+)\.pt", name)
        if m and is_complete(os.path.join(run_dir, name)):
            found.append((int(m.group(1)), os.path.join(run_dir, name)))
    return [p for _, p in sorted(found)]


def newest_checkpoint(run_dir, prefix=None):
    """The newest complete `prefix` checkpoint, or with no prefix the furthest of the run: the last
    train/phase-2 step, else distill's final.pt, else the last finished layer. None if there is none."""
    if prefix is not None:
        found = complete_checkpoints(run_dir, prefix)
        return found[-1] if found else None
    final = os.path.join(run_dir, "final.pt")
    return (newest_checkpoint(run_dir, "step_") or (final if is_complete(final) else None)
            or newest_checkpoint(run_dir, "layer_"))


def furthest_phase1_state(run_dir):
    """Distill phase 1's furthest saved state: the rolling mid-layer state or the newest layer checkpoint,
    whichever is later by (rotation, position in LAYERS, step). None if there is neither."""
    found = []
    for path in (os.path.join(run_dir, "phase1_state.pt"), newest_checkpoint(run_dir, "layer_")):
        meta = checkpoint_meta(path) if path is not None and os.path.exists(path) else None
        if meta is not None:  # complete: the .pt and a whole .json mark
            p = meta["progress"]
            found.append(((p["rotation"], p["position"], p["step"]), path))
    return max(found)[1] if found else None


def distill_start(run_dir, phases, resume, init_from):
    """Where a distill.py run starts: which phases run (`phases` "1", "2" or "12") and from which checkpoint (the
    newest phase-2 step, else the furthest phase-1 state, else phase 1's final.pt, else `init_from`, else path None:
    a student built from the teacher). A run dir with checkpoints is refused without `resume`, and `resume` is
    refused on a run dir without any."""
    final = os.path.join(run_dir, "final.pt")
    phase1_state = os.path.join(run_dir, "phase1_state.pt")
    existing = newest_checkpoint(run_dir) or \
        next((p for p in (phase1_state, final) if os.path.exists(p)), None)
    if existing and not resume:
        raise SystemExit(f"run dir '{run_dir}' already holds checkpoints ({existing}); pass --resume to "
                         f"continue it, or choose a new --run-dir")
    if resume and not existing:
        raise SystemExit(f"--resume: run dir '{run_dir}' holds no complete checkpoint; nothing to resume")
    phase1_done = is_complete(final)
    phase2_path = newest_checkpoint(run_dir, "step_") if resume else None
    phase1_path = None
    if resume and not phase1_done and not phase2_path:
        phase1_path = furthest_phase1_state(run_dir)
    return types.SimpleNamespace(
        run1="1" in phases and not phase1_done and phase2_path is None, run2="2" in phases,
        phase1_path=phase1_path, phase2_path=phase2_path,
        path=phase2_path or phase1_path or (final if phase1_done else None) or init_from)


def prune_checkpoints(run_dir, keep, prefix="step_"):
    """Delete all but the newest `keep` complete checkpoints (keep <= 0 keeps everything)."""
    if keep <= 0:
        return
    for path in complete_checkpoints(run_dir, prefix)[:-keep]:
        os.remove(os.path.splitext(path)[0] + ".json")  # first the mark of completeness
        os.remove(path)


def rng_state():
    """torch's RNG states (tensors, so the checkpoint stays weights_only-loadable)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


class MetricsLog:
    """Appends one JSON object per line to run_dir/metrics.jsonl (only on the master rank)."""

    def __init__(self, run_dir, enabled=True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = enabled
        if enabled:
            os.makedirs(run_dir, exist_ok=True)

    def write(self, **record):
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(json_safe(record)) + "\n")


def trim_metrics(path, until=None):
    """Prepare run_dir/metrics.jsonl for a run that starts now. Resuming (`until`, e.g. {"step": 120}): keep
    the records up to that point, in the order of until's keys; the later ones are about to be redone. A fresh
    start (None): empty it, dropping what a run that crashed before its first checkpoint left behind."""
    if not os.path.exists(path):
        return
    kept = []
    if until is not None:
        bound = tuple(until.values())
        for record in read_metrics(path):
            if tuple(record[k] for k in until) <= bound:
                kept.append(json.dumps(record) + "\n")
    atomic_write_text("".join(kept), path)


def read_metrics(path):
    """The records of a metrics.jsonl. A torn last line (the process died mid-write) is dropped with a note; a
    bad line anywhere else is an error naming the file and line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    records = []
    for n, line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            if n != lines[-1][0]:
                raise ValueError(f"{path}: line {n} is not a JSON record: {line[:80]!r}") from None
            print(f"note: {path}: dropped its torn last line {n} (the run died while writing it): {line[:80]!r}")
    return records


def save_tokenizer_copy(tokenizer, run_dir):
    """Keep the tokenizer inside the run dir, so its checkpoints stay usable wherever they are moved."""
    path = os.path.join(run_dir, "tokenizer")
    if not os.path.isdir(path):
        tmp = f"{path}.tmp.{os.getpid()}"
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, path)
    return path


def start_run_dir(run_dir, run_config, tokenizer, resume_until=None):
    """Rank 0 at the start of a run: write config.json (the effective config), keep a tokenizer copy, and trim
    metrics.jsonl to `resume_until` (see trim_metrics; None for a fresh start). Returns the MetricsLog."""
    metrics = MetricsLog(run_dir)
    atomic_write_text(json.dumps(json_safe(run_config), indent=2) + "\n", os.path.join(run_dir, "config.json"))
    save_tokenizer_copy(tokenizer, run_dir)
    trim_metrics(metrics.path, resume_until)
    return metrics


_LOCKS = {}  # directory -> its open lock file: the lock lasts while this process keeps the file open


def lock_dir(path, what="run dir"):
    """Take `path`'s single-writer lock, an OS lock (flock) on path/.lock that ends with this process however it
    ends (a SIGKILL leaves no stale lock); exit naming the holder's pid and host if another process has it."""
    if os.path.abspath(path) in _LOCKS:  # this process holds it already (a script's main() run again in-process)
        return
    os.makedirs(path, exist_ok=True)
    f = open(os.path.join(path, ".lock"), "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise SystemExit(f"{what} '{path}' is in use by {holder}: two writers would mix their checkpoints and "
                         f"metrics; wait for it to end, or choose another directory")
    f.truncate(0)
    f.write(f"pid {os.getpid()} on host {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
    f.flush()
    _LOCKS[os.path.abspath(path)] = f


def claim_run_dir(run_dir):
    """The start of every run that writes `run_dir` (rank 0 only): take its lock, then remove and list what
    killed or failed saves left behind."""
    lock_dir(run_dir)
    removed = remove_unfinished_saves(run_dir)
    if removed:
        print(f"removed {len(removed)} leftover(s) of unfinished saves from '{run_dir}': {', '.join(removed)}",
              flush=True)
