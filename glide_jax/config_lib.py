"""Loading `configs/<stage>.py:arg` files, command-line overrides and config comparison.

A config file defines `get_config(arg: str | None) -> ml_collections.ConfigDict` and, optionally,
`sweep(add, arg)`. `arg` is a comma-separated list of `key=value` or bare `key` (a bare key is
True), parsed with `parse_arg` against the defaults the file declares, so a typo is an error.

Overrides have the form `--config.a.b=value` and are applied by `ml_collections.config_flags`
(on a private absl `FlagValues`, so nothing global changes): the value is parsed by the type of the
field it replaces (tuples as `0.9,0.99` or `"('a b', 'c')"`). A key that the config does not have,
or a whole group, is refused first, naming the key and the nearest valid keys. `parse_args`
takes the overrides out of a command line before argparse sees the rest.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import importlib.util
import json
import keyword
import os
import sys
import types
from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

ConfigDict = ml_collections.ConfigDict
OVERRIDE_PREFIX = "--config."


class ConfigError(ValueError):
  """A config file, option, override or value that cannot be used."""


# ----------------------------------------------------------------------------- arg options
_ARG_PARSERS = {bool: flags.BooleanParser(), int: flags.IntegerParser(), float: flags.FloatParser()}


def _parse_arg_value(text: str, like: Any, where: str) -> Any:
  """Parses a config-file option's `text` as the type of its default (bool, int, float or str)."""
  parser = _ARG_PARSERS.get(type(like))
  if parser is None:
    return text
  try:
    return parser.parse(text)
  except ValueError as e:
    raise ConfigError(f"{where}: expected a {type(like).__name__}, got {text!r} ({e})") from None


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
      options[key] = _parse_arg_value(value.strip(), defaults[key], f"config option {key!r}")
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


def _field(config: ConfigDict, key: str) -> tuple[ConfigDict, str]:
  """(the group holding `key`, its last name); refuses a key the config lacks, or a group."""
  parts = key.split(".")
  node = config
  for part in parts[:-1]:
    if not isinstance(node, ConfigDict) or part not in node:
      raise _unknown_key(key, config)
    node = node[part]
  leaf = parts[-1]
  if not isinstance(node, ConfigDict) or leaf not in node:
    raise _unknown_key(key, config)
  if isinstance(node[leaf], ConfigDict):
    raise ConfigError(f"config key {key!r} is a group; override its fields "
                      f"({', '.join(sorted(node[leaf].keys()))}) one by one")
  return node, leaf


def _split_override(item: str) -> tuple[str, str]:
  text = item.removeprefix(OVERRIDE_PREFIX)
  key, eq, value = text.partition("=")
  if not eq or not key.strip():
    raise ConfigError(f"override {item!r} is not of the form --config.key=value")
  return key.strip(), value


def apply_overrides(config: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
  """A copy of `config` with each '--config.key=value' (or 'key=value') applied, in order, by
  `ml_collections.config_flags`; the copy is locked if `config` was."""
  config = copy.deepcopy(config)
  if not overrides:
    return config
  locked = config.is_locked
  config.unlock()
  pairs = [_split_override(item) for item in overrides]
  fields = [_field(config, key) for key, _ in pairs]  # every key checked before anything changes
  # config_flags cannot address a field named by a Python keyword (`checkpoint.async`): those are
  # parsed here by the type of their current value (bool, int, float or str) and set directly.
  direct = [i for i, (key, _) in enumerate(pairs) if any(keyword.iskeyword(p) for p in key.split("."))]
  for i in direct:
    (key, value), (node, leaf) = pairs[i], fields[i]
    node[leaf] = _parse_arg_value(value, node[leaf], f"--config.{key}")
  pairs = [pr for i, pr in enumerate(pairs) if i not in direct]
  fields = [f for i, f in enumerate(fields) if i not in direct]
  if not pairs:
    if locked:
      config.lock()
    return config
  untyped = False
  for node, leaf in fields:
    if leaf in node and node[leaf] is None:
      # A None default has no type for config_flags to parse by; the field is re-added from the
      # override as a Python literal (or the text), as config_flags does for new attributes.
      del node[leaf]
      untyped = True
  argv = ["glide-jax"] + [f"{OVERRIDE_PREFIX}{key}={value}" for key, value in pairs]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_dict("config", config, flag_values=values, lock_config=False,
                                           accept_new_attributes=untyped, sys_argv=argv)
  try:
    values(argv)
  except (flags.Error, TypeError, ValueError) as e:
    raise ConfigError(str(e).splitlines()[0]) from None
  config = holder.value
  if locked:
    config.lock()
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
  """Adds `--config FILE.py[:arg]` to a command's parser; `parse_args(parser, argv)` then also
  takes any number of `--config.key=value` overrides (into `args.config_overrides`, a list), and
  `config_from_args(args)` builds the config. argparse cannot declare open-ended option names,
  so the overrides are taken out of argv before the parser sees it."""
  parser.add_argument("--config", required=required, metavar="FILE.py[:ARG]",
                      help="config file and its arg, e.g. configs/base.py:variant=small; "
                           "override fields with --config.key=value")
  parser.set_defaults(config_overrides=[])


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
  """`parser.parse_args` of argv without its `--config.*` overrides, which land, in order, in
  `args.config_overrides`."""
  try:
    rest, overrides = parse_overrides(argv)
  except ConfigError as e:
    parser.error(str(e))
  args = parser.parse_args(rest)
  args.config_overrides = list(args.config_overrides or []) + overrides
  return args


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
    apply_overrides(base, make_override_args(run["overrides"]))
    if not run["name"]:
      run["name"] = default_run_name(run["overrides"]) or f"run{index}"
  return runs


def format_value(value: Any) -> str:
  """The command-line text of an override value, as `apply_overrides` parses it back: numbers
  joined by commas for a tuple of numbers, a Python literal for any other tuple."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (tuple, list)):
    if value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
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
  """{'optimizer.lr': 1e-4} -> ['--config.optimizer.lr=0.0001']."""
  return [f"{OVERRIDE_PREFIX}{k}={format_value(v)}" for k, v in overrides.items()]

