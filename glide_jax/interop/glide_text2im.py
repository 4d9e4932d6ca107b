"""glide-text2im (PyTorch) checkpoints <-> glide-jax parameters, and reference-dump parity.

Mapping is by NAME: every leaf of our parameter tree has exactly one reference key, derived from its
path (`input_blocks_3_1/qkv/kernel` <-> `input_blocks.3.1.qkv.weight`, `text_encoder/resblocks_0/...`
<-> `transformer.resblocks.0...`). Layouts: Conv2d OIHW <-> HWIO; Conv1d (O, I, 1) and Linear (O, I)
<-> (I, O); GroupNorm/LayerNorm weight <-> scale; embeddings as they are. A model with the option
`scan_layers` keeps its text blocks stacked (`text_encoder/resblocks/...`): import maps per layer and
then stacks, export unstacks first (glide_jax/models/layout.py).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from glide_jax.bundle import flatten_params, unflatten_params
from glide_jax.errors import UserError
from glide_jax.interop.state_dicts import load_state_dict, save_state_dict, to_numpy  # noqa: F401 (re-exported)


class KeysMismatchError(UserError, KeyError):
  """A state_dict or parameter tree whose keys are not the model's (a checkpoint of another kind or
  size): names the missing and unexpected keys. A KeyError, as before, and a user error for the CLI."""
  __str__ = Exception.__str__  # the message as written, not KeyError's repr of it


def _keys(keys: list[str], shown: int = 8) -> str:
  """The list as written, or its first `shown` keys and how many more."""
  if len(keys) <= shown:
    return str(keys)
  return f"{keys[:shown]} and {len(keys) - shown} more"


# Checkpoint file names of [G] download.py -> our model kinds.
CHECKPOINT_KINDS = {"base": "text2im", "upsample": "upsample", "base_inpaint": "inpaint",
                    "upsample_inpaint": "upsample_inpaint"}
_CONV1D = {"qkv", "encoder_kv", "proj_out"}  # the U-Net attention's Conv1d(k=1) projections
_TEXT_TOP = {"token_embedding", "positional_embedding", "padding_embedding", "final_ln"}


def torch_key(path: str) -> str:
  """Our '/'-joined parameter path -> the reference state_dict key."""
  parts = path.split("/")
  if parts[0] == "text_encoder":
    parts = parts[1:] if parts[1] in _TEXT_TOP else ["transformer"] + parts[1:]
  leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(parts[-1], parts[-1])
  mods = [re.sub(r"(?<!^ln)_(\d+)", r".\1", p) for p in parts[:-1]]
  return ".".join(mods + [leaf]) if leaf not in ("positional_embedding", "padding_embedding") else leaf


def _layout(path: str, ndim: int) -> str:
  """How a leaf's layout differs from the reference: 'conv2d', 'conv1d', 'linear' or 'same'."""
  parts = path.split("/")
  if parts[-1] != "kernel":
    return "same"
  if ndim == 4:
    return "conv2d"
  return "conv1d" if parts[-2] in _CONV1D and parts[0] != "text_encoder" else "linear"


def to_torch(path: str, value: np.ndarray) -> np.ndarray:
  kind = _layout(path, value.ndim)
  if kind == "conv2d":
    return np.ascontiguousarray(np.transpose(value, (3, 2, 0, 1)))
  if kind == "linear":
    return np.ascontiguousarray(value.T)
  if kind == "conv1d":
    return np.ascontiguousarray(value.T[:, :, None])
  return np.asarray(value)


def from_torch(path: str, value: np.ndarray, ndim: int) -> np.ndarray:
  kind = _layout(path, ndim)
  if kind == "conv2d":
    return np.ascontiguousarray(np.transpose(value, (2, 3, 1, 0)))
  if kind == "linear":
    return np.ascontiguousarray(value.T)
  if kind == "conv1d":
    return np.ascontiguousarray(value[:, :, 0].T)
  return np.asarray(value)


def torch_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  kind = _layout(path, len(shape))
  if kind == "conv2d":
    return (shape[3], shape[2], shape[0], shape[1])
  if kind == "linear":
    return (shape[1], shape[0])
  if kind == "conv1d":
    return (shape[1], shape[0], 1)
  return tuple(shape)


def expected_shapes(kind: str, options: Mapping[str, Any] | None = None) -> dict[str, tuple[int, ...]]:
  """Our flattened parameter paths -> shapes, for a model of `kind` with `options` (no allocation)."""
  from glide_jax.models import registry
  return {k: tuple(v.shape) for k, v in _flatten(registry.param_shapes(kind, options)).items()}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Like bundle.flatten_params, but keeps the leaves as they are (e.g. ShapeDtypeStructs)."""
  out: dict[str, Any] = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else key
    out.update(_flatten(value, path) if isinstance(value, Mapping) else {path: value})
  return out


def _per_layer(options: Mapping[str, Any] | None) -> dict[str, Any]:
  """The options of the same model in the per-layer layout, the one that maps key by key."""
  return {**dict(options or {}), "scan_layers": False}


def _is_unet_kind(kind: str) -> bool:
  from glide_jax.models import registry
  return registry.canonical_kind(kind) != "noised_clip"


def import_state_dict(state_dict: Mapping[str, Any], kind: str,
                      options: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """A reference state_dict (numpy or torch tensors) -> our nested float32 params dict, in the
  layout of the model `options` describe (stacked text blocks with `scan_layers`).

  Raises KeyError naming every missing and unexpected key, ValueError naming every wrong shape.
  """
  from glide_jax.models import layout

  kind = CHECKPOINT_KINDS.get(kind, kind)
  if not _is_unet_kind(kind):
    raise ValueError("use glide_jax.interop.clip_keys for the noised CLIP towers")
  shapes = expected_shapes(kind, _per_layer(options))
  by_key = {torch_key(p): p for p in shapes}
  if len(by_key) != len(shapes):
    raise AssertionError("two parameters map to one reference key")  # a bug in torch_key
  missing = sorted(set(by_key) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(by_key))
  if missing or unexpected:
    raise KeysMismatchError(f"state_dict does not match a {kind!r} model: missing keys {_keys(missing)}, "
                            f"unexpected keys {_keys(unexpected)}")
  wrong = []
  flat = {}
  for key, path in by_key.items():
    value = to_numpy(state_dict[key])
    want = torch_shape(path, shapes[path])
    if tuple(value.shape) != want:
      wrong.append(f"{key}: got {tuple(value.shape)}, expected {want}")
      continue
    flat[path] = from_torch(path, value.astype(np.float32), len(shapes[path]))
  if wrong:
    raise ValueError(f"state_dict shapes do not match a {kind!r} model with these options: " + "; ".join(wrong))
  return layout.to_layout(unflatten_params(flat), bool((options or {}).get("scan_layers", False)))


def export_state_dict(params: Mapping[str, Any], kind: str,
                      options: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
  """Our params (either layout) -> the reference state_dict (numpy, PyTorch layouts). Exact inverse
  of import."""
  from glide_jax.models import layout

  kind = CHECKPOINT_KINDS.get(kind, kind)
  if (options or {}).get("input_pos_emb"):
    raise ValueError("this model uses input_pos_emb, which glide-text2im's UNet does not have; "
                     "it cannot be written as a reference state_dict")
  flat = flatten_params(layout.to_per_layer(params))
  shapes = expected_shapes(kind, _per_layer(options))
  missing = sorted(set(shapes) - set(flat))
  unexpected = sorted(set(flat) - set(shapes))
  if missing or unexpected:
    raise KeysMismatchError(f"params do not match a {kind!r} model: missing {_keys(missing)}, "
                            f"unexpected {_keys(unexpected)}")
  bad = [f"{p}: got {tuple(np.shape(flat[p]))}, expected {s}" for p, s in shapes.items()
         if tuple(np.shape(flat[p])) != s]
  if bad:
    raise ValueError("params have wrong shapes: " + "; ".join(bad))
  return {torch_key(p): to_torch(p, np.asarray(v)) for p, v in flat.items()}


def inpaint_params_from_base(params: Mapping[str, Any], new_channels: int = 4) -> dict[str, Any]:
  """Grows a text2im (or upsample) model's input conv for inpainting: the `new_channels` new input
  channels ([image*mask (3), mask (1)]) get zero weights ([P] 4.3), inserted right after x_t's 3
  channels, so with a zero image and mask the inpaint model computes exactly what the base one did.

  params: a text2im tree (input conv [3, 3, 3, C]) or upsample tree ([3, 3, 6, C]).
  """
  flat = dict(flatten_params(params))
  key = "input_blocks_0_0/kernel"
  if key not in flat:
    raise KeysMismatchError(f"params have no {key}; is this a U-Net parameter tree?")
  k = np.asarray(flat[key])
  if k.shape[2] not in (3, 6):
    raise ValueError(f"{key} has {k.shape[2]} input channels; expected 3 (text2im) or 6 (upsample)")
  zeros = np.zeros(k.shape[:2] + (new_channels, k.shape[3]), k.dtype)
  # Our input order is [x_t, image*mask, mask] (+ [low_res] for upsample), as the reference.
  flat[key] = np.concatenate([k[:, :, :3], zeros, k[:, :, 3:]], axis=2)
  return unflatten_params(flat)


# ---------------------------------------------------------------------------------- reference dumps

def _rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  if ours.shape != ref.shape:
    raise ValueError(f"shape mismatch: ours {ours.shape}, reference {ref.shape}")
  return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def model_from_dump(data: Mapping[str, np.ndarray], dtype: Any = None, options: Mapping[str, Any] | None = None):
  """(model, params, config) rebuilt from a text2im_* reference dump; `options` override the dump's
  (e.g. {"scan_layers": True}: the same network in the scanned layout)."""
  import jax.numpy as jnp

  from glide_jax.models import registry

  config = json.loads(str(data["config"]))
  kind, options = config["kind"], {**dict(config["options"]), **dict(options or {})}
  model = registry.create_model(kind, options, dtype=dtype or jnp.float32)
  sd = {k[len("param/"):]: data[k] for k in data if k.startswith("param/")}
  return model, import_state_dict(sd, kind, options), config


def run_model_dump(data: Mapping[str, np.ndarray], dtype: Any = None,
                   options: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
  """Our outputs for a text2im_* dump's inputs, in the dump's layouts (NCHW / NCL)."""
  import jax
  import jax.numpy as jnp

  model, params, _ = model_from_dump(data, dtype, options)
  nhwc = lambda a: jnp.asarray(np.transpose(a, (0, 2, 3, 1)), jnp.float32)
  kw = dict(x=nhwc(data["input/x"]), timesteps=jnp.asarray(data["input/timesteps"], jnp.int32),
            tokens=jnp.asarray(data["input/tokens"], jnp.int32), mask=jnp.asarray(data["input/mask"], bool))
  for name in ("low_res", "inpaint_image", "inpaint_mask"):
    if f"input/{name}" in data:
      kw[name] = nhwc(data[f"input/{name}"])
  variables = {"params": jax.tree_util.tree_map(jnp.asarray, params)}
  out = jax.jit(lambda v, kw: model.apply(v, **kw))(variables, kw)
  result = {"out": np.transpose(np.asarray(out, np.float32), (0, 3, 1, 2))}
  if "output/xf_out" in data or "output/xf_proj" in data:
    encode = jax.jit(lambda v, t, m: model.apply(v, t, m, method="encode_text"))
    cond = encode(variables, kw["tokens"], kw["mask"])
    result["xf_proj"] = np.asarray(cond["xf_proj"], np.float32)
    result["xf_out"] = np.transpose(np.asarray(cond["xf_out"], np.float32), (0, 2, 1))
  return result


def check_dump(path: str | os.PathLike, dtype: Any = None) -> dict[str, float]:
  """max|ours - ref| / max|ref| for every output of a reference dump (model, noised CLIP or diffusion)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"reference dump {path} does not exist")
  with np.load(path, allow_pickle=False) as z:
    data = {k: z[k] for k in z.files}
  if any(k.startswith("betas/") for k in data):
    from glide_jax.diffusion.parity import check_diffusion_dump
    return check_diffusion_dump(data)
  if "config" not in data:
    raise ValueError(f"{path}: not a reference dump (no 'config' and no 'betas/' keys)")
  kind = json.loads(str(data["config"])).get("kind")
  if kind == "noised_clip":
    from glide_jax.interop.clip_keys import check_clip_dump
    return check_clip_dump(data) if dtype is None else check_clip_dump(data, dtype=dtype)
  ours = run_model_dump(data, dtype)
  return {name: _rel_err(ours[name], data[f"output/{name}"])
          for name in sorted(ours) if f"output/{name}" in data}
