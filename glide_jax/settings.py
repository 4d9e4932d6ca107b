"""A config section read by attribute: declared defaults filled in, an unknown key refused.

The library's entry points (`optim.make_optimizer`, `mesh.make_mesh`, the input pipeline) take a
section of the config (an ml_collections ConfigDict from configs/, or a plain dict from a test or a
script). Reading it through `section` means a key misspelt by the caller is an error naming it,
and a key misspelt in our code is an AttributeError, instead of a silent default. Plain Python
(no ml_collections), so the train program imports without it.
"""
from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any


def section(cfg: Any, defaults: Mapping[str, Any], name: str) -> types.SimpleNamespace:
  """`cfg` (ConfigDict, dict or None) over `defaults`; a None value takes the default."""
  if cfg is None:
    given: dict[str, Any] = {}
  elif isinstance(cfg, types.SimpleNamespace):  # already read: idempotent
    given = vars(cfg)
  elif hasattr(cfg, "to_dict"):
    given = cfg.to_dict()
  elif isinstance(cfg, Mapping):
    given = dict(cfg)
  else:
    raise TypeError(f"{name}: expected a config section (ConfigDict or dict), got {type(cfg).__name__}")
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise KeyError(f"unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                   f"{name} takes {', '.join(sorted(defaults))}")
  values = dict(defaults)
  values.update({k: v for k, v in given.items() if v is not None})
  return types.SimpleNamespace(**values)
