"""The settings layer. Each script declares its defaults as UPPER_CASE module constants with a one-line comment,
then calls `configure(globals())`. That reads `--config file.yaml` and command-line overrides, checks every key
and type against the constants, writes the effective values back into the namespace, and returns them as a
plain dict (lower-case keys) to be saved with runs and checkpoints.
"""
import difflib
import os
import re
import sys
import types
import typing

import yaml

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



def check_at_least(settings, minimum, names):
    """Refuse any of the upper-case `names` in `settings` (a script's globals) below `minimum`, naming the key."""
    for name in names:
        if settings[name] < minimum:
            raise ConfigError(f"{name.lower()} = {settings[name]}; expected an int >= {minimum}")
