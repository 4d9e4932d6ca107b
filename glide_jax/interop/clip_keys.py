"""Noised CLIP weights: the reference's PyTorch state_dict keys <-> our Flax parameter tree, by NAME.

Reference keys (`[G] clip/encoders.py`; the released `clip_image_enc.pt` / `clip_text_enc.pt`):
  blocks.input.{w_voc | w_t, w_pos, patch_proj, ln.g, ln.b}
  blocks.block_{i}.f_attn.{ln.g, ln.b, f_q.w, f_q.b, f_k.w, f_v.w, f_v.b, f_c.w, f_c.b}
  blocks.block_{i}.f_mlp.{ln.g, ln.b, f_1.w, f_1.b, f_2.w, f_2.b}
  blocks.output.{ln.g, ln.b, f.w}
Rules: `blocks.` is dropped and the dotted rest is our path; Affine `w` (out, in) -> `kernel` (in, out);
`patch_proj` OIHW -> `patch_proj/kernel` HWIO; LayerNorm `g`/`b` -> `scale`/`bias`; Affine `b` -> `bias`.
A two-tower state_dict prefixes the keys with `text/` and `image/` (as the reference dumps do).
With the option `scan_layers` a tower's blocks are one stacked `block/...`: import maps per layer and
then stacks, export unstacks first (glide_jax/models/layout.py).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from glide_jax.interop.state_dicts import load_state_dict, to_numpy
from glide_jax.models import layout

TOWERS = ("image", "text")
_RAW_PARAMS = ("w_voc", "w_pos", "w_t")  # raw nn.Parameters of `blocks.input`, same layout in both


class StateDictError(ValueError):
  """A state_dict that does not fit the model: lists the missing, unexpected and wrongly shaped keys."""


def _ref_to_path(key: str) -> tuple[tuple[str, ...], str] | None:
  """'blocks.block_0.f_attn.f_q.w' -> (('block_0', 'f_attn', 'f_q', 'kernel'), 'linear'); None if foreign."""
  parts = key.split(".")
  if len(parts) < 3 or parts[0] != "blocks":
    return None
  parts = parts[1:]
  if parts[0] == "input" and len(parts) == 2 and parts[1] in _RAW_PARAMS:
    return tuple(parts), "copy"
  if parts == ["input", "patch_proj"]:
    return ("input", "patch_proj", "kernel"), "conv"
  head, leaf = parts[:-1], parts[-1]
  if head[-1] == "ln" and leaf in ("g", "b"):
    return tuple(head) + ("scale" if leaf == "g" else "bias",), "copy"
  if leaf == "w":
    return tuple(head) + ("kernel",), "linear"
  if leaf == "b":
    return tuple(head) + ("bias",), "copy"
  return None


def _path_to_ref(path: tuple[str, ...]) -> tuple[str, str]:
  """Inverse of `_ref_to_path`: our path -> (reference key, transform)."""
  if path[0] == "input" and len(path) == 2 and path[1] in _RAW_PARAMS:
    return "blocks." + ".".join(path), "copy"
  if path == ("input", "patch_proj", "kernel"):
    return "blocks.input.patch_proj", "conv"
  head, leaf = path[:-1], path[-1]
  if head and head[-1] == "ln":
    if leaf not in ("scale", "bias"):
      raise StateDictError(f"parameter {'/'.join(path)} has no reference key")
    return "blocks." + ".".join(head) + (".g" if leaf == "scale" else ".b"), "copy"
  if leaf == "kernel":
    return "blocks." + ".".join(head) + ".w", "linear"
  if leaf == "bias":
    return "blocks." + ".".join(head) + ".b", "copy"
  raise StateDictError(f"parameter {'/'.join(path)} has no reference key")


def _to_ours(x: np.ndarray, transform: str) -> np.ndarray:
  if transform == "linear":
    return np.ascontiguousarray(x.T)  # (out, in) -> (in, out)
  if transform == "conv":
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))  # OIHW -> HWIO
  return x


def _to_ref(x: np.ndarray, transform: str) -> np.ndarray:
  if transform == "linear":
    return np.ascontiguousarray(x.T)
  if transform == "conv":
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))  # HWIO -> OIHW
  return x


def _ref_shape(shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
  return tuple(_to_ref(np.empty(shape, np.bool_), transform).shape)


def expected_shapes(options: dict) -> dict[str, dict[tuple[str, ...], tuple[int, ...]]]:
  """{tower: {path: shape}} of the model `create_clip_model(options)` builds (abstract, no compute)."""
  from glide_jax.models import clip  # lazy: keep the key mapping importable without building models

  model = clip.create_clip_model(options)
  s, length = model.image_size, model.max_text_len
  abstract = jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1, s, s, 3)), jnp.zeros((1,), jnp.int32),
      jnp.zeros((1, length), jnp.int32), jnp.ones((1,), jnp.int32))
  params = nn.meta.unbox(abstract["params"])
  return {tower: {p: tuple(v.shape) for p, v in traverse_util.flatten_dict(params[tower]).items()}
          for tower in TOWERS}


def _per_layer(options: dict | None) -> dict:
  """The options of the same model in the per-layer layout, the one that maps key by key."""
  return {**dict(options or {}), "scan_layers": False}


def _scanned(options: dict | None) -> bool:
  return bool((options or {}).get("scan_layers", False))


def _format_problems(missing: list[str], unexpected: list[str], wrong: list[str]) -> str:
  def block(title, items):
    shown = items[:40] + ([f"... and {len(items) - 40} more"] if len(items) > 40 else [])
    return f"{title} ({len(items)}): " + ", ".join(shown)

  parts = []
  if missing:
    parts.append(block("missing keys", missing))
  if unexpected:
    parts.append(block("unexpected keys", unexpected))
  if wrong:
    parts.append(block("wrongly shaped keys", wrong))
  return "noised CLIP state_dict does not fit the model: " + "; ".join(parts)


def _import_tower(state_dict: Mapping[str, Any], expected: dict, prefix: str,
                  problems: tuple[list, list, list]) -> dict:
  missing, unexpected, wrong = problems
  flat = {}
  for key, value in state_dict.items():
    mapped = _ref_to_path(key)
    if mapped is None or mapped[0] not in expected:
      unexpected.append(prefix + key)
      continue
    path, transform = mapped
    array = np.array(to_numpy(value), dtype=np.float32)
    want = _ref_shape(expected[path], transform)
    if array.shape != want:
      wrong.append(f"{prefix}{key} {tuple(array.shape)} (expected {want})")
      continue
    flat[path] = _to_ours(array, transform)
  for path in expected:
    key = _path_to_ref(path)[0]
    if key not in state_dict:
      missing.append(prefix + key)
  return traverse_util.unflatten_dict(flat)


def import_tower_state_dict(state_dict: Mapping[str, Any], tower: str, options: dict) -> dict:
  """One released tower file (`clip_image_enc.pt` / `clip_text_enc.pt`, keys `blocks....`) -> the
  `params[tower]` subtree (numpy float32). Raises `StateDictError` naming every bad key."""
  if tower not in TOWERS:
    raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
  problems: tuple[list, list, list] = ([], [], [])
  params = _import_tower(state_dict, expected_shapes(_per_layer(options))[tower], "", problems)
  if any(problems):
    raise StateDictError(f"{tower} tower: " + _format_problems(*problems))
  return layout.to_layout(params, _scanned(options))


def import_clip_state_dict(state_dict: Mapping[str, Any], options: dict) -> dict:
  """{'text/blocks...': w, 'image/blocks...': w} (PyTorch layout) -> params {'image': ..., 'text': ...}.

  Use as `model.apply({'params': params}, ...)`. Arrays come back as numpy float32.
  Raises `StateDictError` naming every missing, unexpected or wrongly shaped key.
  """
  expected = expected_shapes(_per_layer(options))
  split: dict[str, dict[str, Any]] = {tower: {} for tower in TOWERS}
  problems: tuple[list, list, list] = ([], [], [])
  for key, value in state_dict.items():
    tower, sep, rest = key.partition("/")
    if not sep or tower not in TOWERS:
      problems[1].append(key)
      continue
    split[tower][rest] = value
  params = {tower: _import_tower(split[tower], expected[tower], f"{tower}/", problems) for tower in TOWERS}
  if any(problems):
    raise StateDictError(_format_problems(*problems))
  return layout.to_layout(params, _scanned(options))


def _export_tower(params: Mapping[str, Any], expected: dict, prefix: str) -> dict[str, np.ndarray]:
  """One tower's params (either layout) against the per-layer `expected` shapes -> reference keys."""
  flat = traverse_util.flatten_dict(layout.to_per_layer(nn.meta.unbox(dict(params))))
  missing = ["/".join((prefix.rstrip("/"),) + p) for p in expected if p not in flat]
  unexpected = ["/".join((prefix.rstrip("/"),) + p) for p in flat if p not in expected]
  wrong = ["/".join((prefix.rstrip("/"),) + p) + f" {tuple(np.shape(v))} (expected {expected[p]})"
           for p, v in flat.items() if p in expected and tuple(np.shape(v)) != expected[p]]
  if missing or unexpected or wrong:
    raise StateDictError("parameter tree does not fit the model: "
                         + _format_problems(missing, unexpected, wrong).split(": ", 1)[1])
  out = {}
  for path, value in flat.items():
    key, transform = _path_to_ref(path)
    # np.array copies from device; float32 is the checkpoint dtype (bit-exact for float32 params).
    out[prefix + key] = _to_ref(np.array(value, dtype=np.float32), transform)
  return out


def export_tower_state_dict(params: Mapping[str, Any], tower: str, options: dict) -> dict[str, np.ndarray]:
  """`params[tower]` -> the released single-tower layout (keys `blocks....`, PyTorch shapes)."""
  if tower not in TOWERS:
    raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
  return _export_tower(params, expected_shapes(_per_layer(options))[tower], "")


def export_clip_state_dict(params: Mapping[str, Any], options: dict) -> dict[str, np.ndarray]:
  """Inverse of `import_clip_state_dict`: params (or {'params': params}) -> {'text/blocks...': ...}."""
  if "params" in params:
    params = params["params"]
  extra = sorted(set(params) - set(TOWERS))
  if extra:
    raise StateDictError(f"parameter tree has unexpected top-level entries {extra}; expected {TOWERS}")
  expected = expected_shapes(_per_layer(options))
  out: dict[str, np.ndarray] = {}
  for tower in TOWERS:
    if tower not in params:
      raise StateDictError(f"parameter tree has no {tower!r} tower")
    out.update(_export_tower(params[tower], expected[tower], f"{tower}/"))
  return out


def _rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  if ours.shape != ref.shape:
    raise ValueError(f"shape mismatch: ours {ours.shape}, reference {ref.shape}")
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def load_dump_config(data: Mapping[str, np.ndarray]) -> dict:
  """The `config` JSON of a reference dump (a 0-d string array) as a dict."""
  raw = np.asarray(data["config"]).item()
  return json.loads(raw.decode() if isinstance(raw, bytes) else raw)


def check_clip_dump(data: Mapping[str, np.ndarray], dtype: Any = jnp.float32,
                    options: dict | None = None) -> dict[str, float]:
  """Runs our noised CLIP on a reference dump (`noised_clip.npz`, as loaded by np.load) with its
  imported weights; returns max|ours - ref| / max|ref| for text_emb, image_emb and guidance_grad.
  `options` override the dump's (e.g. {"scan_layers": True})."""
  from glide_jax.models import clip

  config = load_dump_config(data)
  if config.get("kind") != "noised_clip":
    raise ValueError(f"not a noised CLIP dump: config kind is {config.get('kind')!r}")
  options = {**config["options"], **dict(options or {})}
  state_dict = {k[len("param/"):]: data[k] for k in data if k.startswith("param/")}
  params = import_clip_state_dict(state_dict, options)
  model = clip.create_clip_model(options, dtype=dtype)
  variables = {"params": params}
  tokens = jnp.asarray(data["input/text"], jnp.int32)
  text_len = jnp.asarray(data["input/text_len"], jnp.int32)
  image = jnp.asarray(np.transpose(data["input/image"], (0, 2, 3, 1)))  # NCHW -> NHWC
  timesteps = jnp.asarray(data["input/timesteps"], jnp.int32)

  @jax.jit
  def run(variables, tokens, text_len, image, timesteps):
    z_text = model.apply(variables, tokens, text_len, method=clip.NoisedCLIP.encode_text)
    z_image = model.apply(variables, image, timesteps, method=clip.NoisedCLIP.encode_image)
    return z_text, z_image, clip.guidance_grad(model, variables, image, timesteps, z_text)

  z_text, z_image, grad = run(variables, tokens, text_len, image, timesteps)
  return {
      "text_emb": _rel_err(z_text, data["output/text_emb"]),
      "image_emb": _rel_err(z_image, data["output/image_emb"]),
      "guidance_grad": _rel_err(np.transpose(np.asarray(grad), (0, 3, 1, 2)), data["output/guidance_grad"]),
  }


# ------------------------------------------------------------------ released files -> params (init_from)
RELEASED_NAMES = {"image": "clip_image_enc", "text": "clip_text_enc"}  # [G] download.py's file names
_FILE_SUFFIXES = (".pt", ".pth", ".safetensors", ".npz")


def tower_of(state_dict: Mapping[str, Any]) -> str | None:
  """Which tower a single-tower state_dict holds, told by its input keys (None if neither)."""
  if "blocks.input.w_t" in state_dict or "blocks.input.patch_proj" in state_dict:
    return "image"
  if "blocks.input.w_voc" in state_dict:
    return "text"
  return None


def _released_files_in(directory: str) -> list[str]:
  found, looked = [], []
  for tower in TOWERS:
    names = [RELEASED_NAMES[tower] + s for s in _FILE_SUFFIXES]
    hit = next((os.path.join(directory, n) for n in names if os.path.isfile(os.path.join(directory, n))), None)
    if hit is None:
      looked.append(" / ".join(names))
    else:
      found.append(hit)
  if looked:
    raise FileNotFoundError(f"{directory} holds no released noised CLIP tower file named {'; '.join(looked)}")
  return found


def load_clip_checkpoint(source: str, options: dict) -> dict:
  """The released noised CLIP (or a two-tower state_dict) -> params {'image': ..., 'text': ...}.

  `source` is one of
    'IMAGE_FILE,TEXT_FILE'  the two released files (`clip_image_enc.pt`, `clip_text_enc.pt`), in either
                            order: each file's tower is told by its keys;
    a directory             holding `clip_image_enc` and `clip_text_enc` (.pt / .pth / .safetensors / .npz);
    one file                with both towers under `image/` and `text/` key prefixes (the layout of the
                            reference dumps and of `glide-jax export-torch` without --tower).
  Files are read by `state_dicts.load_state_dict`: torch.load(weights_only=True) or safetensors,
  never an unpickler. Errors name the file, and `StateDictError` every bad key with both shapes.
  """
  source = str(source)
  if os.path.isfile(source):
    paths = [source]
  elif os.path.isdir(source):
    paths = _released_files_in(source)
  else:
    paths = [p.strip() for p in source.split(",")]
    if len(paths) != 2 or not all(paths):
      raise FileNotFoundError(f"{source!r} is not a file, a directory, nor a pair 'IMAGE_FILE,TEXT_FILE'")
    for p in paths:
      if not os.path.isfile(p):
        raise FileNotFoundError(f"noised CLIP checkpoint {p} does not exist (from {source!r})")

  if len(paths) == 1:
    sd = load_state_dict(paths[0])
    tower = tower_of(sd)
    if tower is not None:
      other = RELEASED_NAMES["text" if tower == "image" else "image"]
      raise ValueError(f"{paths[0]} holds only the {tower} tower of the noised CLIP; give both released "
                       f"files as 'clip_image_enc.pt,clip_text_enc.pt' (the {other} file is missing)")
    try:
      return import_clip_state_dict(sd, options)
    except StateDictError as e:
      raise StateDictError(f"{paths[0]}: {e}") from None

  params: dict[str, dict] = {}
  origin: dict[str, str] = {}
  for path in paths:
    sd = load_state_dict(path)
    tower = tower_of(sd)
    if tower is None:
      raise StateDictError(f"{path}: not a noised CLIP tower file: it has none of blocks.input.w_t, "
                           f"blocks.input.patch_proj (image) or blocks.input.w_voc (text); "
                           f"first keys: {sorted(sd)[:8]}")
    if tower in params:
      raise ValueError(f"{origin[tower]} and {path} both hold the {tower} tower; give one image and one "
                       "text file")
    try:
      params[tower] = import_tower_state_dict(sd, tower, options)
    except StateDictError as e:
      raise StateDictError(f"{path}: {e}") from None
    origin[tower] = path
  return params
