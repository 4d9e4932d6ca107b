"""Loading `configs/<stage>.py:arg` files, command-line overrides and config comparison.

A config file defines `get_config(arg: str | None) -> ml_collections.ConfigDict` and, optionally,
`sweep(add, arg)`. `arg` is a comma-separated list of `key=value` or bare `key` (a bare key is
True), parsed with `parse_arg` against the defaults the file declares, so a typo is an error.

Overrides have the form `--config.a.b=value`; the value is parsed by the type of the field it
replaces, and a key that the config does not have is refused with the nearest valid keys.
"""
from __future__ import annotations

import argparse
import ast
import copy
import difflib
import importlib.util
import json
import os
import sys
import types
from typing import Any, Callable, Iterable, Sequence

import ml_collections

ConfigDict = ml_collections.ConfigDict
OVERRIDE_PREFIX = "--config."


class ConfigError(ValueError):
  """A config file, option, override or value that cannot be used."""


# ----------------------------------------------------------------------------- arg options
def _parse_scalar(text: str, like: Any, where: str) -> Any:
  """Parses `text` as the type of `like` (bool, int, float, str, tuple/list or None)."""
  if isinstance(like, bool):
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on", "t", "y"):
      return True
    if low in ("0", "false", "no", "off", "f", "n"):
      return False
    raise ConfigError(f"{where}: expected a bool (true/false), got {text!r}")
  if isinstance(like, int):
    try:
      return int(text)
    except ValueError:
      try:  # accept '1e6' and '2048.0' when they are whole numbers
        value = float(text)
      except ValueError:
        value = None
      if value is not None and value.is_integer():
        return int(value)
      raise ConfigError(f"{where}: expected an int, got {text!r}") from None
  if isinstance(like, float):
    try:
      return float(text)
    except ValueError:
      raise ConfigError(f"{where}: expected a float, got {text!r}") from None
  if isinstance(like, str):
    return text
  if isinstance(like, (tuple, list)):
    stripped = text.strip()
    if stripped[:1] in ("(", "["):
      try:
        value = ast.literal_eval(stripped)
      except (ValueError, SyntaxError):
        raise ConfigError(f"{where}: cannot parse {text!r} as a Python tuple") from None
      if not isinstance(value, (tuple, list)):
        raise ConfigError(f"{where}: expected a tuple, got {text!r}")
      return type(like)(value)
    if not stripped:
      return type(like)()
    items = [s.strip() for s in stripped.split(",")]
    elem = like[0] if len(like) else None
    if elem is None or isinstance(elem, (tuple, list, dict)):
      return type(like)(_literal_or_str(s) for s in items)
    return type(like)(_parse_scalar(s, elem, where) for s in items)
  if like is None:
    return _literal_or_str(text)
  raise ConfigError(f"{where}: cannot override a field of type {type(like).__name__}")


def _literal_or_str(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_arg(arg: str | None, **defaults: Any) -> types.SimpleNamespace:
  """Parses a config `arg` like 'variant=small,runlocal' against typed defaults.

  Every key must be among `defaults`; its value is parsed by the default's type; a bare key
  sets a bool option to True.

  >>> parse_arg('variant=tiny,runlocal', variant='released', runlocal=False, steps=0)
  namespace(variant='tiny', runlocal=True, steps=0)
  """
  options = dict(defaults)
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    key, eq, value = part.partition("=")
    key = key.strip()
    if key not in defaults:
      near = difflib.get_close_matches(key, list(defaults), n=3)
      hint = f"; did you mean {', '.join(near)}?" if near else ""
      raise ConfigError(f"unknown config option {key!r} in arg {arg!r}; valid options: "
                        f"{', '.join(sorted(defaults))}{hint}")
    if not eq:
      if not isinstance(defaults[key], bool):
        raise ConfigError(f"config option {key!r} needs a value ({key}=...)")
      options[key] = True
    else:
      options[key] = _parse_scalar(value.strip(), defaults[key], f"config option {key!r}")
  return types.SimpleNamespace(**options)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
  """Refuses a config option value that is not one of `choices`."""
  choices = list(choices)
  if value not in choices:
    raise ConfigError(f"config option {name}={value!r} is not one of {choices}")


# ----------------------------------------------------------------------------- loading
def split_spec(spec: str) -> tuple[str, str | None]:
  """'configs/base.py:variant=tiny' -> ('configs/base.py', 'variant=tiny')."""
  path, sep, arg = spec.partition(".py:")
  if sep:
    return path + ".py", arg
  return spec, None


def resolve_config_path(path: str) -> str:
  """Finds a config file: as given, relative to the working directory, or to the repo root."""
  candidates = [path]
  if not os.path.isabs(path):
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidates.append(os.path.join(repo_root, path))
    candidates.append(os.path.join(repo_root, "configs", os.path.basename(path)))
  for candidate in candidates:
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  raise ConfigError(f"config file {path!r} not found (looked in: {', '.join(candidates)})")


def _ensure_importable(path: str) -> None:
  # Config files share defaults through `from configs import common`; make the directory that
  # holds `configs/` importable (the repo root, or wherever a copied config tree lives).
  parent = os.path.dirname(os.path.dirname(path))
  if os.path.isfile(os.path.join(os.path.dirname(path), "__init__.py")) and parent not in sys.path:
    sys.path.append(parent)


def load_module(path: str) -> types.ModuleType:
  """Imports a config file by path (config files are scripts, not package modules)."""
  path = resolve_config_path(path)
  _ensure_importable(path)
  name = "glide_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  if module_spec is None or module_spec.loader is None:
    raise ConfigError(f"cannot import config file {path!r}")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config(arg)")
  return module


def load_config(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
  """Builds the config named by `spec` ('configs/base.py:variant=tiny,runlocal') and applies
  `overrides` ('--config.a.b=value' strings). The result is locked: new keys are refused."""
  path, arg = split_spec(spec)
  module = load_module(path)
  config = module.get_config(arg)
  if not isinstance(config, ConfigDict):
    raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict, "
                      f"got {type(config).__name__}")
  config = apply_overrides(config, overrides)
  config.lock()
  return config


def flat_keys(config: ConfigDict, prefix: str = "") -> list[str]:
  """Every leaf key as a dotted path."""
  keys = []
  for key, value in config.items():
    full = f"{prefix}{key}"
    if isinstance(value, ConfigDict):
      keys.extend(flat_keys(value, full + "."))
    else:
      keys.append(full)
  return keys


def _unknown_key(key: str, config: ConfigDict) -> ConfigError:
  valid = flat_keys(config)
  near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
  if not near:  # a wrong leaf under a right parent: list the parent's keys
    parent = key.rpartition(".")[0]
    near = [k for k in valid if k.startswith(parent + ".")][:8] if parent else []
  hint = f"; nearest valid keys: {', '.join(near)}" if near else ""
  return ConfigError(f"unknown config key {key!r}{hint}")


def set_by_path(config: ConfigDict, key: str, text: str) -> None:
  """Sets `config.<key>` from the string `text`, parsed by the existing field's type."""
  parts = key.split(".")
  node = config
  for part in parts[:-1]:
    if not isinstance(node, ConfigDict) or part not in node:
      raise _unknown_key(key, config)
    node = node[part]
  leaf = parts[-1]
  if not isinstance(node, ConfigDict) or leaf not in node:
    raise _unknown_key(key, config)
  current = node[leaf]
  if isinstance(current, ConfigDict):
    raise ConfigError(f"config key {key!r} is a group; override its fields "
                      f"({', '.join(sorted(current.keys()))}) one by one")
  value = _parse_scalar(text, current, f"--config.{key}")
  with node.unlocked():
    node[leaf] = value


def apply_overrides(config: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
  """Returns a copy of `config` with each '--config.key=value' (or 'key=value') applied."""
  config = copy.deepcopy(config)
  for item in overrides:
    text = item[len(OVERRIDE_PREFIX):] if item.startswith(OVERRIDE_PREFIX) else item
    key, eq, value = text.partition("=")
    if not eq or not key:
      raise ConfigError(f"override {item!r} is not of the form --config.key=value")
    set_by_path(config, key.strip(), value)
  return config


# ----------------------------------------------------------------------------- JSON and diffs
def _to_plain(value: Any) -> Any:
  if isinstance(value, ConfigDict):
    return {k: _to_plain(v) for k, v in value.items()}
  if isinstance(value, (tuple, list)):
    return [_to_plain(v) for v in value]
  return value


def _from_plain(value: Any) -> Any:
  # JSON has no tuples; every sequence in a config is a tuple, so lists become tuples again.
  if isinstance(value, dict):
    return ConfigDict({k: _from_plain(v) for k, v in value.items()})
  if isinstance(value, list):
    return tuple(_from_plain(v) for v in value)
  return value


def config_to_json(config: ConfigDict, indent: int | None = 2) -> str:
  """A JSON text of the config, keys sorted (saved in every checkpoint workdir)."""
  return json.dumps(_to_plain(config), indent=indent, sort_keys=True)


def config_from_json(text: str) -> ConfigDict:
  """Inverse of `config_to_json` (sequences come back as tuples); the result is locked."""
  config = _from_plain(json.loads(text))
  config.lock()
  return config


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
  if isinstance(value, dict):
    for k, v in value.items():
      _flatten(v, f"{prefix}{k}.", out)
    if not value and prefix:
      out[prefix[:-1]] = {}
  else:
    out[prefix[:-1]] = value


def diff_configs(a: ConfigDict, b: ConfigDict, ignore: Iterable[str] = ()) -> list[str]:
  """Dotted keys whose values differ between `a` and `b` (or exist in only one), sorted.

  Keys equal to or under any prefix in `ignore` are skipped (e.g. 'log', 'checkpoint').
  """
  flat_a: dict[str, Any] = {}
  flat_b: dict[str, Any] = {}
  _flatten(json.loads(config_to_json(a)), "", flat_a)
  _flatten(json.loads(config_to_json(b)), "", flat_b)
  ignore = tuple(ignore)

  def ignored(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in ignore)

  keys = set(flat_a) | set(flat_b)
  return sorted(k for k in keys if not ignored(k) and flat_a.get(k, _MISSING) != flat_b.get(k, _MISSING))


_MISSING = object()


def describe_diff(a: ConfigDict, b: ConfigDict, keys: Sequence[str]) -> list[str]:
  """'key: a_value != b_value' lines for the keys `diff_configs` returned."""
  flat_a: dict[str, Any] = {}
  flat_b: dict[str, Any] = {}
  _flatten(json.loads(config_to_json(a)), "", flat_a)
  _flatten(json.loads(config_to_json(b)), "", flat_b)
  return [f"{k}: {flat_a.get(k, '<missing>')!r} != {flat_b.get(k, '<missing>')!r}" for k in keys]


# ----------------------------------------------------------------------------- command line
def parse_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Splits argv into (other arguments, config overrides).

  Accepts '--config.key=value' and '--config.key value'; overrides keep their order.
  """
  rest: list[str] = []
  overrides: list[str] = []
  argv = list(argv)
  i = 0
  while i < len(argv):
    item = argv[i]
    if item == "--":  # everything after '--' belongs to someone else
      rest.extend(argv[i:])
      break
    if item.startswith(OVERRIDE_PREFIX):
      if "=" in item:
        overrides.append(item)
      elif i + 1 < len(argv):
        overrides.append(f"{item}={argv[i + 1]}")
        i += 1
      else:
        raise ConfigError(f"override {item!r} has no value")
    else:
      rest.append(item)
    i += 1
  return rest, overrides


def add_config_flags(parser: argparse.ArgumentParser, required: bool = True) -> None:
  """Adds `--config FILE.py[:arg]` and accepts any number of `--config.key=value` overrides.

  The overrides land in `args.config_overrides` (a list); `config_from_args(args)` builds the
  config. argparse cannot declare open-ended option names, so the parser's `parse_known_args`
  is wrapped to take them out of argv first.
  """
  parser.add_argument("--config", required=required, metavar="FILE.py[:ARG]",
                      help="config file and its arg, e.g. configs/base.py:variant=small; "
                           "override fields with --config.key=value")
  parser.set_defaults(config_overrides=[])
  original = parser.parse_known_args

  def parse_known_args(args=None, namespace=None):
    argv = list(sys.argv[1:] if args is None else args)
    try:
      rest, overrides = parse_overrides(argv)
    except ConfigError as e:
      parser.error(str(e))
    namespace, extras = original(rest, namespace)
    namespace.config_overrides = list(getattr(namespace, "config_overrides", []) or []) + overrides
    return namespace, extras

  parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def config_from_args(args: argparse.Namespace) -> ConfigDict:
  """The config named by `args.config` with `args.config_overrides` applied."""
  return load_config(args.config, getattr(args, "config_overrides", []) or [])


# ----------------------------------------------------------------------------- sweeps
def expand_sweep(spec: str) -> list[dict[str, Any]]:
  """Calls the config file's `sweep(add, arg)` and returns the runs it adds.

  `add(**overrides)` records one run: keyword names use '.' written as '__' or passed through a
  dict (`add(**{'optimizer.lr': 1e-4})`); a reserved `name=` key names the run. Each override is
  checked against the config now, so a typo fails before anything is launched.
  """
  path, arg = split_spec(spec)
  module = load_module(path)
  if not hasattr(module, "sweep"):
    raise ConfigError(f"config file {path!r} defines no sweep(add, arg)")
  runs: list[dict[str, Any]] = []

  def add(**kwargs: Any) -> None:
    name = kwargs.pop("name", None)
    overrides = {k.replace("__", "."): v for k, v in kwargs.items()}
    runs.append({"name": name, "overrides": overrides})

  module.sweep(add, arg)
  base = module.get_config(arg)
  for index, run in enumerate(runs):
    for key, value in run["overrides"].items():
      set_by_path(copy.deepcopy(base), key, format_value(value))
    if not run["name"]:
      run["name"] = default_run_name(run["overrides"]) or f"run{index}"
  return runs


def format_value(value: Any) -> str:
  """The command-line text of an override value (parsed back by `_parse_scalar`)."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (tuple, list)):
    if all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in value) and \
       not any(isinstance(v, str) and ("," in v or not v) for v in value):
      return ",".join(str(v) for v in value)
    return repr(tuple(value))
  return str(value)


def default_run_name(overrides: dict[str, Any]) -> str:
  """A short, filesystem-safe run name from the overrides: 'lr=0.0001_batch_size=64'."""
  parts = []
  for key, value in overrides.items():
    short = key.rsplit(".", 1)[-1]
    text = format_value(value).replace("/", "-").replace(",", "-").replace(" ", "")
    parts.append(f"{short}={text}")
  return "_".join(parts)


def make_override_args(overrides: dict[str, Any]) -> list[str]:
  return [f"{OVERRIDE_PREFIX}{k}={format_value(v)}" for k, v in overrides.items()]

