"""What several scripts share: config overrides, device/DDP set-up, checkpoint IO, LR schedule, metrics.

Each script declares its defaults as UPPER_CASE module constants with a one-line comment, then calls
`configure(globals())`. That reads `--config file.yaml` and command-line overrides, checks every key and
type against the constants, writes the effective values back into the script's globals, and returns them
as a plain dict (lower-case keys) to be saved with runs and checkpoints.
"""
import contextlib
import difflib
import json
import math
import os
import random
import re
import sys
import types
import typing

import torch
import yaml


# ----------------------------------------------------------------------------------------------------------
# Config layer

class ConfigError(SystemExit):
    """A bad key or value from YAML or the command line: exits non-zero with a message for the user."""

    def __init__(self, message):
        super().__init__(f"config error: {message}")


def _constant_comments(source_file):
    """Map NAME -> the comment at the end of its `NAME = value  # comment` line in the script."""
    comments = {}
    if source_file and os.path.exists(source_file):
        with open(source_file, encoding="utf-8") as f:
            for line in f:
                m = re.match(r"^([A-Z][A-Z0-9_]*)\s*(?::[^=]+)?=.*?#\s*(.*)$", line)
                if m:
                    comments[m.group(1)] = m.group(2).strip()
    return comments


def _type_name(tp):
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def coerce(value, tp, key):
    """Convert `value` (a YAML-parsed object or a command-line string) to type `tp`, or raise ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"key '{key}': value {value!r} is not {_type_name(tp)}")
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str):
            text = value.strip()
            parsed = yaml.safe_load(text if text.startswith("[") else f"[{text}]") if text else []
            value = parsed
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"key '{key}': expected a list, got {value!r}")
        container = tuple if (origin or tp) is tuple else list
        if not args:
            return container(value)
        if container is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ConfigError(f"key '{key}': expected {len(args)} items, got {len(value)}: {value!r}")
            return tuple(coerce(v, a, key) for v, a in zip(value, args))
        return container(coerce(v, args[0], key) for v in value)
    if tp is typing.Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"key '{key}': expected a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"key '{key}': expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
        raise ConfigError(f"key '{key}': expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"key '{key}': expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML reads `out_dir: 2024` as an int; a path is still what was meant
        raise ConfigError(f"key '{key}': expected a string, got {value!r}")
    if tp is dict or typing.get_origin(tp) is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"key '{key}': expected a mapping, got {value!r}")
        return value
    raise ConfigError(f"key '{key}': unsupported constant type {_type_name(tp)}")


def _assigned_in_source(source_file):
    """Names the script itself assigns at top level (`NAME = ...`): its settings. Imported constants such as
    data.MAGIC are the script's tools, not its settings, and stay out of the config."""
    with open(source_file, encoding="utf-8") as f:
        return {m.group(1) for m in re.finditer(r"(?m)^([A-Z][A-Z0-9_]*)\s*(?::[^=\n]+)?=", f.read())}


def _constant_types(namespace):
    annotations = namespace.get("__annotations__", {})
    source_file = namespace.get("__file__")
    own = _assigned_in_source(source_file) if source_file and os.path.exists(source_file) else None
    types_ = {}
    for name, default in namespace.items():
        if not re.fullmatch(r"[A-Z][A-Z0-9_]*", name) or (own is not None and name not in own):
            continue
        if name in annotations:
            tp = annotations[name]
            if isinstance(tp, str):  # `from __future__ import annotations` would make every type a string
                raise TypeError(f"constant {name} has a string annotation {tp!r}; write the type itself")
        elif isinstance(default, tuple) and default:  # (0.9, 0.95) means exactly two floats
            tp = tuple[tuple(type(v) for v in default)]
        elif isinstance(default, list) and default and len({type(v) for v in default}) == 1:
            tp = list[type(default[0])]
        elif isinstance(default, (bool, int, float, str, list, tuple, dict)):
            tp = type(default)
        else:
            continue  # modules, classes, functions imported as UPPER_CASE are not config
        types_[name] = tp
    return types_


def _unknown_key(key, known, origin):
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "."
    return ConfigError(f"unknown key '{key}' (from {origin}){hint} Known keys: {', '.join(sorted(known))}")


def _help_text(script, types_, namespace, comments, positional):
    lines = [f"usage: python {os.path.basename(script)} "
             + " ".join(p.lower() for p in positional)
             + " [--config FILE.yaml] [--name value | --name=value | name=value ...]", "",
             "Every constant below can be set in a YAML file (lower-case key) or on the command line;",
             "the command line wins over YAML, YAML wins over the default. Bool flags may be given alone.", ""]
    width = max(len(n) for n in types_) + 2 if types_ else 10
    for name, tp in types_.items():
        flag = "--" + name.lower().replace("_", "-")
        lines.append(f"  {flag:<{width + 2}} {_type_name(tp):<18} default {namespace[name]!r}")
        if comments.get(name):
            lines.append(f"  {'':<{width + 2}} {comments[name]}")
    return "\n".join(lines)


def configure(namespace, argv=None, positional=()):
    """Apply `--config FILE.yaml` and CLI overrides to the UPPER_CASE constants in `namespace`.

    CLI forms: `--name value`, `--name=value`, `name=value`; a bool constant may be given as a bare `--name`.
    `positional` names constants filled, in order, by bare arguments (e.g. sample.py's MODEL).
    Returns {lower_case_name: value} of the effective config, and prints it on rank 0.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    script = namespace.get("__file__", "script")
    types_ = _constant_types(namespace)
    known = {n.lower(): n for n in types_}
    comments = _constant_comments(namespace.get("__file__"))
    if any(a in ("-h", "--help") for a in argv):
        print(_help_text(script, types_, namespace, comments, positional))
        raise SystemExit(0)

    cli, config_files, bare = [], [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            body = arg[2:]
            key, has_value, value = body.partition("=")
            key = key.replace("-", "_").lower()
            if key == "config":
                if not has_value:
                    if i + 1 >= len(argv):
                        raise ConfigError("--config needs a YAML file path")
                    value, i = argv[i + 1], i + 1
                config_files.append(value)
            elif has_value:
                cli.append((key, value, arg))
            elif key in known and types_[known[key]] is bool and (
                    i + 1 >= len(argv) or argv[i + 1].lower() not in ("true", "false", "1", "0", "yes", "no")):
                cli.append((key, "true", arg))
            else:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{arg} needs a value")
                cli.append((key, argv[i + 1], arg))
                i += 1
        elif re.match(r"^[A-Za-z_][A-Za-z0-9_-]*=", arg):
            key, _, value = arg.partition("=")
            cli.append((key.replace("-", "_").lower(), value, arg))
        else:
            bare.append(arg)
        i += 1
    if len(bare) > len(positional):
        raise ConfigError(f"unexpected argument(s) {bare[len(positional):]!r}; "
                          f"overrides look like --name value, --name=value or name=value")

    overrides = {}
    for path in config_files:
        if not os.path.exists(path):
            raise ConfigError(f"config file '{path}' does not exist")
        with open(path, encoding="utf-8") as f:
            try:
                loaded = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file '{path}' is not valid YAML: {e}")
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}' must be a mapping of key: value, got {type(loaded).__name__}")
        for key, value in loaded.items():
            key = str(key).replace("-", "_").lower()
            if key not in known:
                raise _unknown_key(key, known, path)
            overrides[known[key]] = coerce(value, types_[known[key]], f"{key} in {path}")
    for name, value in zip(positional, bare):
        overrides[name] = coerce(value, types_[name], name.lower())
    for key, value, origin in cli:
        if key not in known:
            raise _unknown_key(key, known, f"command line '{origin}'")
        overrides[known[key]] = coerce(value, types_[known[key]], key)

    namespace.update(overrides)
    config = {name.lower(): namespace[name] for name in types_}
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"config for {os.path.basename(script)}:")
        for key, value in config.items():
            print(f"  {key} = {value!r}")
    return config


# ----------------------------------------------------------------------------------------------------------
# Device, precision and DDP

def setup_device(device="auto"):
    """Initialise torch.distributed when launched by torchrun, and pick the device.

    Returns a SimpleNamespace with device, device_type, rank, local_rank, world_size, is_master and ddp.
    On CUDA and ROCm (which PyTorch also calls "cuda") the backend is NCCL/RCCL; on CPU it is gloo.
    """
    ddp = int(os.environ.get("RANK", "-1")) != -1
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"device '{device}' requested but torch sees no CUDA/ROCm GPU "
                             f"(torch {torch.__version__}); use --device cpu")
        if ddp:
            device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if ddp and not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend=backend, device_id=torch.device(device)
                                             if backend == "nccl" else None)
    return types.SimpleNamespace(device=device, device_type="cuda" if device.startswith("cuda") else "cpu",
                                 rank=rank, local_rank=local_rank, world_size=world_size,
                                 is_master=rank == 0, ddp=ddp)


def resolve_dtype(dtype, device_type):
    """'auto' -> bf16 on a GPU that supports it, fp32 otherwise (bf16 matmuls on CPU are very slow)."""
    if dtype == "auto":
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise SystemExit(f"unknown dtype '{dtype}'; expected one of auto, {', '.join(table)}")
    return table[dtype]


def autocast(device_type, dtype):
    """Mixed precision context: weights stay fp32, matmuls run in `dtype`. A no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def all_reduce_mean(value, env):
    """Average a Python float over DDP ranks (identity without DDP)."""
    if not env.ddp:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    torch.distributed.all_reduce(t)
    return t.item() / env.world_size


# ----------------------------------------------------------------------------------------------------------
# LR schedule

def lr_at(step, max_steps, lr, warmup_steps, schedule="trapezoid", cooldown_frac=0.2, min_lr_frac=0.0):
    """Learning rate at optimizer step `step` (0-based).

    trapezoid: linear warmup -> constant -> linear cooldown over the last `cooldown_frac` of the run;
    cosine: linear warmup -> cosine decay to min_lr_frac * lr at max_steps; constant: warmup then flat.
    """
    min_lr = lr * min_lr_frac
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "trapezoid":
        cooldown_steps = int(cooldown_frac * max_steps)
        cooldown_start = max_steps - cooldown_steps
        if cooldown_steps <= 0 or step < cooldown_start:
            return lr
        frac = (step - cooldown_start) / cooldown_steps
        return min_lr + (lr - min_lr) * (1.0 - frac)
    if schedule == "cosine":
        decay_steps = max(1, max_steps - warmup_steps)
        frac = min(1.0, (step - warmup_steps) / decay_steps)
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown lr schedule '{schedule}'; expected trapezoid, cosine or constant")


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: one .pt loadable with torch.load(weights_only=True), plus a JSON of metadata to `cat`

def atomic_torch_save(obj, path):
    """Write to a temp file in the same directory, fsync, then rename: a crash never leaves a partial file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(text, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
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
    meta = {k: v for k, v in checkpoint.items() if k not in ("model", "optimizer", "rng", "teacher_cache")}
    atomic_write_text(json.dumps(_json_safe(meta), indent=2) + "\n", os.path.splitext(path)[0] + ".json")


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
    return checkpoint


def complete_checkpoints(run_dir, prefix="step_"):
    """Checkpoints in `run_dir` whose save finished (the .json exists), oldest first by step number."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        m = re.fullmatch(rf"{re.escape(prefix)}(\d+)\.pt", name)
        if m and os.path.exists(os.path.join(run_dir, f"{prefix}{m.group(1)}.json")):
            found.append((int(m.group(1)), os.path.join(run_dir, name)))
    return [p for _, p in sorted(found)]


def prune_checkpoints(run_dir, keep, prefix="step_"):
    """Delete all but the newest `keep` complete checkpoints (keep <= 0 keeps everything)."""
    if keep <= 0:
        return
    for path in complete_checkpoints(run_dir, prefix)[:-keep]:
        os.remove(os.path.splitext(path)[0] + ".json")  # first the mark of completeness
        os.remove(path)


def rng_state():
    """RNG states as tensors and plain Python objects, so the checkpoint stays weights_only-loadable."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"].cpu())
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


# ----------------------------------------------------------------------------------------------------------
# Metrics

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
                f.write(json.dumps(_json_safe(record)) + "\n")


def peak_flops(device):
    """Peak dense bf16 FLOP/s of the GPU if we know it exactly, else None (no MFU beats a wrong MFU)."""
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device).lower()
    table = [("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("l40s", 362e12), ("a10g", 125e12),
             ("4090", 165e12), ("3090", 71e12), ("mi300x", 1307e12), ("mi250x", 383e12)]
    for key, flops in table:
        if key in name:
            return flops
    return None


# ----------------------------------------------------------------------------------------------------------
# Loading models and tokenizers from anything the repo reads or writes

def newest_run_checkpoint(run_dir):
    """The furthest checkpoint of a run dir: the last train/phase-2 step, else distill's final.pt, else the
    last completed layer. None if the directory holds no complete checkpoint."""
    steps = complete_checkpoints(run_dir, "step_")
    if steps:
        return steps[-1]
    if os.path.exists(os.path.join(run_dir, "final.json")):
        return os.path.join(run_dir, "final.pt")
    layers = complete_checkpoints(run_dir, "layer_")
    return layers[-1] if layers else None


def is_checkpoint(source):
    # a run dir holds config.json too (the run's config), so HF model dirs are told apart by their weights
    hf_weights = ("model.safetensors", "model.safetensors.index.json")
    return source.endswith(".pt") or (os.path.isdir(source) and newest_run_checkpoint(source) is not None
                                      and not any(os.path.exists(os.path.join(source, n)) for n in hf_weights))


def latest_checkpoint(run_dir, prefix="step_"):
    found = complete_checkpoints(run_dir, prefix)
    return found[-1] if found else None


def load_model(source, map_location="cpu"):
    """A GPT from one of our checkpoints (.pt, or a run dir -> newest_run_checkpoint), an HF model dir, a hub id
    or a .gguf file. Returns (model, checkpoint dict or None)."""
    from model import GPT, GPTConfig

    if is_checkpoint(source):
        path = newest_run_checkpoint(source) if os.path.isdir(source) else source
        checkpoint = load_checkpoint(path, map_location=map_location)
        model = GPT(GPTConfig.from_dict(checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
        return model, checkpoint
    return GPT.from_pretrained(source), None


def tokenizer_source(source, checkpoint=None):
    """Where a model's tokenizer lives: the run dir's tokenizer/ copy, what a checkpoint recorded, or the
    model source itself (HF dir, hub id, .gguf)."""
    if checkpoint is not None:
        run_copy = os.path.join(os.path.dirname(os.path.abspath(source)) if source.endswith(".pt") else source,
                                "tokenizer")
        if os.path.isdir(run_copy):
            return run_copy
        recorded = checkpoint.get("tokenizer")
        if not recorded:
            raise ValueError(f"checkpoint '{source}' records no tokenizer and has no tokenizer/ beside it")
        return recorded
    return source


def load_tokenizer(source):
    """A Hugging Face tokenizer from an HF dir, hub id, or .gguf file (never with remote code)."""
    from transformers import AutoTokenizer

    if source.endswith(".gguf"):
        if not os.path.exists(source):
            raise FileNotFoundError(f"GGUF file '{source}' does not exist")
        folder, name = os.path.split(os.path.abspath(source))
        return AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not os.path.exists(source) and not (source.count("/") == 1 and not source.startswith((".", "/"))):
        raise FileNotFoundError(f"tokenizer source '{source}' does not exist")
    return AutoTokenizer.from_pretrained(source)


def save_tokenizer_copy(tokenizer, run_dir):
    """Keep the tokenizer inside the run dir, so its checkpoints stay usable wherever they are moved."""
    path = os.path.join(run_dir, "tokenizer")
    if not os.path.isdir(path):
        tmp = f"{path}.tmp.{os.getpid()}"
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, path)
    return path


def check_data_matches_tokenizer(data_dir, tokenizer, vocab_size):
    """Refuse shards tokenized by a different tokenizer (by vocabulary fingerprint) or with a bigger vocab."""
    from data import read_manifest, tokenizer_fingerprint

    manifest = read_manifest(data_dir)
    recorded = manifest["tokenizer"]
    fingerprint = tokenizer_fingerprint(tokenizer)
    if recorded["fingerprint"] != fingerprint:
        raise SystemExit(f"{data_dir}/manifest.json: shards were made with tokenizer '{recorded['source']}' "
                         f"(fingerprint {recorded['fingerprint'][:12]}), but the model's tokenizer has fingerprint "
                         f"{fingerprint[:12]}; re-run prepare.py with this model's tokenizer")
    if recorded["vocab_size"] > vocab_size:
        raise SystemExit(f"{data_dir}/manifest.json: tokenizer vocab size {recorded['vocab_size']} exceeds the "
                         f"model's vocab_size {vocab_size}")
    return manifest


@torch.no_grad()
def evaluate_loss(model, batches, env, ctx):
    """Mean next-token CE over `batches`, summed over tokens and ranks so it is the same for any world size."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=env.device)
    for x, y in batches:
        with ctx:
            loss = model(x, y)
        total[0] += loss.double() * y.numel()
        total[1] += y.numel()
    if env.ddp:
        torch.distributed.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


# ----------------------------------------------------------------------------------------------------------
# Training pieces shared by train.py and distill.py (phase 2): settings checks, resume, one optimizer step,
# checkpoint saves, metrics on resume

def check_at_least(settings, minimum, names):
    """Refuse any of the upper-case `names` in `settings` (a script's globals) below `minimum`, naming the key."""
    for name in names:
        if settings[name] < minimum:
            raise ConfigError(f"{name.lower()} = {settings[name]}; expected an int >= {minimum}")


def changed_settings(prior, config, ignore):
    """{key: (saved, now)} for every config key whose value differs from the saved config `prior`, except
    `ignore` and the keys the saved config does not have."""
    return {k: (prior[k], v) for k, v in config.items() if k in prior and k not in ignore and prior[k] != v}


def load_optimizer_state(optimizer, state, source, hint, betas, weight_decay):
    """Restore a saved optimizer state, with a clear error when it does not fit this optimizer's groups; the
    saved groups carry the old betas and weight decay, and the current settings win."""
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError) as e:  # e.g. a checkpoint that trained other parameters
        raise SystemExit(f"checkpoint '{source}': its optimizer state does not fit this model's parameter groups "
                         f"({e}); {hint}")
    for group in optimizer.param_groups:
        group["betas"] = betas
        group["weight_decay"] = weight_decay if group["weight_decay"] > 0 else 0.0


def restore_training_state(checkpoint, optimizer, loader, source, hint, betas, weight_decay):
    """Continue exactly from a resumable checkpoint: optimizer, data position and RNG; returns its step."""
    for key in ("optimizer", "loader", "rng", "step"):
        if key not in checkpoint:
            raise SystemExit(f"checkpoint '{source}' has no '{key}' entry, so training cannot continue from it; "
                             f"{hint}")
    load_optimizer_state(optimizer, checkpoint["optimizer"], source, hint, betas, weight_decay)
    loader.load_state_dict(checkpoint["loader"])
    set_rng_state(checkpoint["rng"])
    return int(checkpoint["step"])


def stop_non_finite(what, run_dir, env):
    """End the run (every rank) on a NaN/inf, saving nothing: the last good checkpoint stays the latest."""
    latest = newest_run_checkpoint(run_dir)
    if env.ddp and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    raise SystemExit(f"stopping: {what}. Nothing was saved for this step; the latest good checkpoint is "
                     f"{latest or '(none yet)'}. Lower the learning rate, raise the warmup or check --grad-clip, "
                     f"then resume from it with --resume (or start a new --run-dir).")


def micro_batches(model, loader, grad_accum, env):
    """(x, y, sync) for each micro-batch of one optimizer step. Run forward and backward inside `with sync:`:
    under DDP the gradients are all-reduced once, in the last micro-batch's backward."""
    for micro in range(grad_accum):
        x, y = loader.next_batch()
        yield x, y, model.no_sync() if env.ddp and micro < grad_accum - 1 else contextlib.nullcontext()


def clip_and_step(optimizer, params, grad_clip, losses, env, run_dir, step):
    """Finish optimizer step `step` (0-based): clip the gradients (0 = only measure their norm), average
    `losses` (this rank's mean losses, a 1-d tensor) over ranks, stop on a non-finite loss or norm before the
    weights change, then step. Returns (the losses as floats, the grad norm)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if env.ddp:  # every rank's micro-batches hold the same number of tokens: the mean of means is the global mean
        torch.distributed.all_reduce(losses)
        losses = losses / env.world_size
    *values, norm = torch.cat([losses.float(), grad_norm.float().view(1)]).tolist()
    if not (all(math.isfinite(v) for v in values) and math.isfinite(norm)):
        stop_non_finite(f"non-finite loss {values[0]} / grad norm {norm} at step {step + 1}; the optimizer step "
                        f"was not taken", run_dir, env)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return values, norm


def save_run_checkpoint(path, model, entries, env, keep=0, prefix=None):
    """Rank 0 saves {"model": weights, **entries} (entries holds "step") and keeps the newest `keep` of
    `prefix`. Every rank checks the weights first, so a diverged model never becomes the latest checkpoint."""
    finite = torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all()
    if not finite:
        stop_non_finite(f"the weights hold NaN/inf after step {entries['step']}", os.path.dirname(path), env)
    if env.is_master:
        save_checkpoint(path, {"model": model.state_dict(), **entries})
        if prefix:
            prune_checkpoints(os.path.dirname(path), keep, prefix)
    if env.ddp:
        torch.distributed.barrier()  # nobody runs ahead while rank 0 writes, so a crash loses at most this save


def trim_metrics(path, until=None):
    """Prepare run_dir/metrics.jsonl for a run that starts now. Resuming (`until`, e.g. {"step": 120}): keep
    the records up to that point, in the order of until's keys; the later ones are about to be redone. A fresh
    start (None): empty it, dropping what a run that crashed before its first checkpoint left behind."""
    if not os.path.exists(path):
        return
    kept = []
    if until is not None:
        bound = tuple(until.values())
        with open(path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip()
                    and tuple(json.loads(line)[k] for k in until) <= bound]
    atomic_write_text("".join(kept), path)
