"""State dicts in and out of files: `.pt`/`.pth` (weights-only torch loading), `.safetensors`, `.npz`.

The one place that opens checkpoint files for the interop modules (glide_text2im.py, clip_keys.py):
it reads names -> numpy arrays and knows nothing of models, so both key mappings import it and not
each other. torch is imported only for `.pt` files.
"""
from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np


def to_numpy(value: Any) -> np.ndarray:
  """A numpy array of an array or a (CPU) torch tensor, without importing torch; bfloat16 tensors,
  which numpy has no dtype for, come back as float32."""
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _torch():
  try:
    import torch
  except ImportError as e:
    raise ImportError("reading or writing .pt files needs PyTorch (pip install 'glide-jax[torch]'); "
                      "convert to .safetensors elsewhere or install torch") from e
  return torch


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a state_dict from .pt/.pth (torch.load weights_only=True: never unpickles code),
  .safetensors or .npz (keys as they are, or prefixed 'param/' as in the reference dumps)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  suffix = path.suffix.lower()
  if suffix == ".safetensors":
    from safetensors.numpy import load_file
    return dict(load_file(str(path)))
  if suffix == ".npz":
    with np.load(path, allow_pickle=False) as data:
      keys = list(data.files)
      if any(k.startswith("param/") for k in keys):
        return {k[len("param/"):]: data[k] for k in keys if k.startswith("param/")}
      return {k: data[k] for k in keys}
  if suffix in (".pt", ".pth", ".bin", ".ckpt"):
    torch = _torch()
    try:
      obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError for anything but tensors and containers
      raise ValueError(f"{path}: refused to load: weights-only loading failed (the file holds more than "
                       f"tensors, e.g. pickled Python objects, which are never unpickled): {e}") from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
      obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
      raise ValueError(f"{path}: expected a state_dict (a mapping of names to tensors), got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
      if not hasattr(v, "detach"):
        raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
      out[k] = to_numpy(v)
    return out
  raise ValueError(f"{path}: unknown checkpoint format {suffix!r}; use .pt, .safetensors or .npz")


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> pathlib.Path:
  """Writes a state_dict as .safetensors, or .pt/.pth (needs torch)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in state_dict.items()}
  suffix = path.suffix.lower()
  if suffix == ".safetensors":
    from safetensors.numpy import save_file
    save_file(arrays, str(path))
  elif suffix in (".pt", ".pth"):
    torch = _torch()
    torch.save({k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, str(path))
  else:
    raise ValueError(f"{path}: unknown output format {suffix!r}; use .safetensors or .pt")
  return path
