"""The settings layer. A script's settings are its annotated UPPER_CASE module constants, each with a one-line
comment (`BATCH_SIZE: int = 8  # sequences per batch`); a `Literal[...]` annotation lists the allowed values; a
plain constant without an annotation is fixed by the code. `configure(globals())` applies `--config file.yaml`
and command-line overrides through argparse, coerces each value to the annotated type, writes the effective
values back into the namespace, and returns them as a plain dict (lower-case keys) to be saved with runs and
checkpoints.
"""
import argparse
import ast
import difflib
import io
import math
import os
import re
import sys
import tokenize
import types
import typing

import yaml

_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
_EXPECTED = {bool: "a bool (true/false)", int: "an int", float: "a float", str: "a string", dict: "a mapping"}


class ConfigError(SystemExit):
    """A bad key or value from YAML or the command line: exits non-zero with a message for the user."""

    def __init__(self, message):
        super().__init__(f"config error: {message}")


class _YamlLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping, where PyYAML would silently keep the last."""

    def construct_mapping(self, node, deep=False):
        seen = []  # a list, not a set: a YAML key may be unhashable, and the base class reports that itself
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.append(key)
        return super().construct_mapping(node, deep)


def _type_name(tp):
    if typing.get_origin(tp) is typing.Literal:
        return "|".join(map(str, typing.get_args(tp)))
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def coerce(value, tp, key):
    """Convert `value` (a YAML-parsed object or a command-line string) to type `tp`, or raise ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or str(value).lower() in ("none", "null", "~")):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"key '{key}': value {value!r} is not {_type_name(tp)}")
    if origin is typing.Literal:  # a choice: `PHASES: Literal["1", "2", "12"]`
        for choice in args:
            try:
                if coerce(value, type(choice), key) == choice:
                    return choice
            except ConfigError:
                pass
        raise ConfigError(f"key '{key}': value {value!r} is not one of {', '.join(map(str, args))}")
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str):  # a command-line list: YAML's `[64, null]` or plain `64,null`
            text = value.strip()
            value = _parse_yaml(text if text.startswith("[") else f"[{text}]", key) if text else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"key '{key}': expected a list, got {value!r}")
        container = tuple if (origin or tp) is tuple else list
        if container is tuple and args and args[-1] is not Ellipsis:  # tuple[float, float]: exactly two
            if len(args) != len(value):
                raise ConfigError(f"key '{key}': expected {len(args)} items, got {len(value)}: {value!r}")
            return tuple(coerce(v, a, key) for v, a in zip(value, args))
        return container(coerce(v, args[0], key) if args else v for v in value)
    if tp is typing.Any:
        return value
    kind = origin or tp  # dict[str, int] is checked as a dict
    if kind not in _EXPECTED:
        raise ConfigError(f"key '{key}': unsupported constant type {_type_name(tp)}")
    if kind is dict and isinstance(value, str):  # --model-config "{n_layer: 4}"
        value = _parse_yaml(value, key)
    try:
        return _scalar(value, kind)
    except ValueError:
        raise ConfigError(f"key '{key}': expected {_EXPECTED[kind]}, got {value!r}") from None


def _parse_yaml(text, key):
    try:
        return yaml.load(text, _YamlLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"key '{key}': {text!r} is not valid YAML: {e}") from None


def _scalar(value, tp):
    """`value` as the scalar type `tp` (bool, int, float, str or dict), or ValueError where it is not one."""
    if tp is bool:
        value = _BOOLS.get(value.lower(), value) if isinstance(value, str) else value
        if isinstance(value, bool):
            return value
    elif isinstance(value, bool):
        raise ValueError  # YAML's `true` is not the int 1, nor the string "true"
    elif tp is int:
        number = float(value.replace("_", "")) if isinstance(value, str) else value  # "65_536" and "1e6" are ints
        if isinstance(number, int) or (isinstance(number, float) and number.is_integer()):
            return int(number)
    elif tp is float and isinstance(value, (int, float, str)):
        if math.isfinite(float(value)):  # nan or inf is never a learning rate, a fraction or a temperature
            return float(value)
    elif tp is str and isinstance(value, (int, float, str)):
        return str(value)  # YAML reads `out_dir: 2024` as an int; a path is still what was meant
    elif tp is dict and isinstance(value, dict):
        return value
    raise ValueError


def _settings(namespace):
    """{NAME: type} of the annotated UPPER_CASE names: an un-annotated one (a fixed table, an imported data.MAGIC)
    is a tool of the script, not a setting."""
    settings = {}
    for name, tp in namespace.get("__annotations__", {}).items():
        if name.isupper() and not name.startswith("_"):
            if isinstance(tp, str):  # `from __future__ import annotations` would make every type a string
                raise TypeError(f"constant {name} has a string annotation {tp!r}; write the type itself")
            if name not in namespace:
                raise TypeError(f"setting {name} has a type but no default value")
            settings[name] = tp
    return settings


def _comments(source_file):
    """NAME -> the comment on the line where `NAME: type = value` starts in the script: its --help text."""
    if not source_file or not os.path.exists(source_file):
        return {}
    with open(source_file, "rb") as f:
        source = f.read()
    starts = {node.lineno: node.target.id for node in ast.parse(source).body
              if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
    return {starts[tok.start[0]]: tok.string.lstrip("#").strip()
            for tok in tokenize.tokenize(io.BytesIO(source).readline)
            if tok.type == tokenize.COMMENT and tok.start[0] in starts}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print its usage and exit 2; this says what is wrong like the rest
        raise ConfigError(message)


def _parser(namespace, settings, positional):
    script = os.path.basename(namespace.get("__file__", "script"))
    usage = " ".join(["%(prog)s", *(p.lower() for p in positional), "[--config FILE.yaml]",
                      "[--name value | --name=value | name=value ...]"])
    parser = _Parser(prog=f"python {script}", usage=usage, allow_abbrev=False,
                     formatter_class=argparse.RawTextHelpFormatter,
                     description="Each setting below can be set in a YAML file (lower-case key) or on the command "
                                 "line;\nthe command line wins over YAML, YAML wins over the default. "
                                 "A bool flag given alone means true.")
    parser.add_argument("--config", action="append", default=[], metavar="FILE.yaml",
                        help="YAML file of settings (lower-case keys); repeat it to apply several in order")
    comments = _comments(namespace.get("__file__"))
    for name, tp in settings.items():
        text = f"{comments.get(name, '')} (default {namespace[name]!r})".strip()
        parser.add_argument("--" + name.lower().replace("_", "-"), dest=name, metavar=_type_name(tp),
                            default=argparse.SUPPRESS, help=text.replace("%", "%%"))
    return parser


def _normalise(argv, settings):
    """argv with each override as one `--name-with-dashes=value` token: `name=value` and `--name_x` are the same
    override, a bare bool flag means true, and a value such as `--prompt a=b` or `-0.5` is never read as an option."""
    out, rest = [], list(argv)
    while rest:
        arg = rest.pop(0)
        if re.match(r"[A-Za-z_][\w-]*=", arg):
            arg = "--" + arg
        if not arg.startswith("--") or arg == "--":
            out.append(arg)
            continue
        key, eq, value = arg[2:].partition("=")
        key = key.lower().replace("_", "-")
        tp = str if key == "config" else settings.get(key.replace("-", "_").upper())
        if not eq and tp is bool:
            eq, value = "=", rest.pop(0) if rest and rest[0].lower() in _BOOLS else "true"
        elif not eq and tp and rest:
            eq, value = "=", rest.pop(0)
        out.append(f"--{key}{eq}{value}")
    return out


def _unknown_key(key, known, origin):
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "."
    return ConfigError(f"unknown key '{key}' (from {origin}){hint} Known keys: {', '.join(sorted(known))}")


def _read_yaml(path, settings):
    if not os.path.exists(path):
        raise ConfigError(f"config file '{path}' does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            loaded = yaml.load(f, _YamlLoader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {e}")
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file '{path}' must be a mapping of key: value, got {type(loaded).__name__}")
    known = {name.lower() for name in settings}
    overrides = {}
    for key, value in loaded.items():
        key = str(key).replace("-", "_").lower()
        if key not in known:
            raise _unknown_key(key, known, path)
        overrides[key.upper()] = coerce(value, settings[key.upper()], f"{key} in {path}")
    return overrides


def configure(namespace, argv=None, positional=()):
    """Apply `--config FILE.yaml` files, then positional values, then `--name value`, `--name=value` or `name=value`
    overrides to the settings in `namespace`. `positional` names settings filled, in order, by bare arguments
    (e.g. sample.py's MODEL). Returns {lower_case_name: value} of the effective config, printed on rank 0."""
    settings = _settings(namespace)
    parser = _parser(namespace, settings, positional)
    args, extras = parser.parse_known_args(_normalise(sys.argv[1:] if argv is None else argv, settings))
    for extra in extras:
        if extra.startswith("-"):
            key = extra.lstrip("-").partition("=")[0].replace("-", "_")
            raise _unknown_key(key, [n.lower() for n in settings], f"command line '{extra}'")
    if len(extras) > len(positional):
        raise ConfigError(f"unexpected argument(s) {extras[len(positional):]!r}; "
                          f"overrides look like --name value, --name=value or name=value")
    overrides = {}
    for path in args.config:
        overrides.update(_read_yaml(path, settings))
    given = {**dict(zip(positional, extras)), **{k: v for k, v in vars(args).items() if k != "config"}}
    overrides.update({name: coerce(value, settings[name], name.lower()) for name, value in given.items()})
    namespace.update(overrides)
    config = {name.lower(): namespace[name] for name in settings}
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"config for {os.path.basename(namespace.get('__file__', 'script'))}:")
        for key, value in config.items():
            print(f"  {key} = {value!r}")
    return config


def check_at_least(settings, minimum, names):
    """Refuse any of the `names` in `settings` (a script's globals, or a dict of lower-case settings) below
    `minimum`, naming the key."""
    for name in names:
        if settings[name] < minimum:
            kind = "an int" if isinstance(minimum, int) else "a value"
            raise ConfigError(f"{name.lower()} = {settings[name]}; expected {kind} >= {minimum}")


def check_fraction(settings, names):
    """Refuse any of the `names` in `settings` outside [0, 1] (mixing weights, fractions of a schedule)."""
    for name in names:
        values = settings[name] if isinstance(settings[name], (list, tuple)) else [settings[name]]
        if not all(0 <= v <= 1 for v in values):
            raise ConfigError(f"{name.lower()} = {settings[name]}; expected value(s) in [0, 1]")


def check_positive(settings, names):
    """Refuse any of the `names` in `settings` that is not > 0 (learning rates, temperatures), naming the key."""
    for name in names:
        if not settings[name] > 0:
            raise ConfigError(f"{name.lower()} = {settings[name]}; expected a value > 0")
