"""Inference bundles: a directory holding one model's parameters and everything needed to sample it.

Layout of a bundle directory:
  meta.json            {"format": "glide-jax-bundle", "version": 1, "model": {"kind", "options"},
                        "diffusion": {...}, "tokenizer": {...} or null, "dtype": "float32", ...}
  params.safetensors   the parameter tree, flattened with '/'-joined keys
  tokenizer/           tokenizer files named in meta["tokenizer"]["files"] (relative paths)

Bundles are written to a temporary sibling directory and renamed into place, so a crash never
leaves a half-written bundle under the final name.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

FORMAT = "glide-jax-bundle"
VERSION = 1
SEP = "/"


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  """Nested dict of arrays -> {'a/b/c': array}. Keys must not contain '/'."""
  flat: dict[str, np.ndarray] = {}
  for key, value in tree.items():
    if SEP in key:
      raise ValueError(f"parameter name {key!r} contains {SEP!r}")
    path = f"{prefix}{SEP}{key}" if prefix else key
    if isinstance(value, Mapping):
      flat.update(flatten_params(value, path))
    else:
      flat[path] = np.asarray(value)
  return flat


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split(SEP)
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def save_bundle(path: str | os.PathLike, params: Mapping[str, Any], meta: Mapping[str, Any],
                tokenizer_files: Mapping[str, str | os.PathLike] | None = None) -> pathlib.Path:
  """Writes a bundle atomically. `tokenizer_files` maps a name inside `tokenizer/` to a source file."""
  from safetensors.numpy import save_file

  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if "model" not in meta or "kind" not in meta["model"]:
    raise ValueError("bundle meta needs a 'model' entry with a 'kind'")
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
  try:
    flat = {k: np.ascontiguousarray(v) for k, v in flatten_params(params).items()}
    save_file(flat, str(tmp / "params.safetensors"))
    full_meta = {"format": FORMAT, "version": VERSION, **dict(meta)}
    if tokenizer_files:
      (tmp / "tokenizer").mkdir()
      for name, src in tokenizer_files.items():
        shutil.copyfile(src, tmp / "tokenizer" / name)
      tok = dict(full_meta.get("tokenizer") or {})
      tok["files"] = {name: f"tokenizer/{name}" for name in tokenizer_files}
      full_meta["tokenizer"] = tok
    (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2, sort_keys=True, default=_json_default))
    if path.exists():
      old = path.with_name(f".{path.name}.old")
      shutil.rmtree(old, ignore_errors=True)
      path.rename(old)
      tmp.rename(path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      tmp.rename(path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


def load_bundle(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """Returns (params as nested dict of numpy arrays, meta). Tokenizer file paths in meta are made absolute."""
  from safetensors.numpy import load_file

  path = pathlib.Path(path)
  meta_file = path / "meta.json"
  if not meta_file.is_file():
    raise FileNotFoundError(f"{path} is not a glide-jax bundle: {meta_file} is missing")
  meta = json.loads(meta_file.read_text())
  if meta.get("format") != FORMAT:
    raise ValueError(f"{meta_file}: format is {meta.get('format')!r}, expected {FORMAT!r}")
  if meta.get("version", 0) > VERSION:
    raise ValueError(f"{meta_file}: bundle version {meta['version']} is newer than this glide-jax ({VERSION})")
  params = unflatten_params(load_file(str(path / "params.safetensors")))
  tok = meta.get("tokenizer")
  if tok and "files" in tok:
    tok["files"] = {k: str(path / v) for k, v in tok["files"].items()}
  return params, meta


def _json_default(obj):
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, (np.floating,)):
    return float(obj)
  if isinstance(obj, (tuple, set)):
    return list(obj)
  raise TypeError(f"cannot write {type(obj).__name__} to bundle meta")
