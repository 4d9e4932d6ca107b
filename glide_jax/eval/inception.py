"""The FID Inception-v3 in Flax, with an importer for the user's copy of its standard weights.

FID numbers are only comparable when computed with one particular network: the TensorFlow
Inception graph of 2015-12-05 that the original FID code used, as ported to PyTorch by pytorch-fid
(`pt_inception-2015-12-05-6726825d.pth`). That network differs from torchvision's Inception-v3 in
three places, reproduced here:
  * the 3x3 average pools inside the A, C and first E blocks exclude the zero padding from the
    average (TensorFlow's convention; PyTorch's `count_include_pad=False`);
  * the last E block pools its fourth branch with a 3x3 *max* pool, not an average pool;
  * the classifier has 1008 classes (unused: FID reads the 2048-d pool3 features).
Inputs are resized to 299x299 bilinearly with half-pixel centres and no anti-aliasing (PyTorch's
`interpolate(..., align_corners=False)`) and scaled from [0, 1] to [-1, 1].

We never download the weights: `load_fid_inception_weights(path)` reads a file the user provides,
either the PyTorch state_dict (read with `torch.load(weights_only=True)`, never unpickled) or a
`.safetensors` / `.npz` conversion of it with the same key names.

Parameter tree: one entry per PyTorch BasicConv2d, named as in PyTorch ('Mixed_6b' -> 'branch7x7_2'),
each {'kernel' [kh, kw, in, out], 'scale', 'bias', 'mean', 'var' [out]} (conv without bias, then
inference-mode BatchNorm with eps 1e-3).
"""
from __future__ import annotations

import copy
import functools
import os
import pathlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glide_jax.models import layers

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BN_EPS = 1e-3
WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"

# PyTorch BatchNorm entry -> our leaf name. `num_batches_tracked` (newer PyTorch) is ignored.
_BN_LEAVES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_IGNORED_SUFFIXES = ("num_batches_tracked",)


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm (inference, eps 1e-3) -> ReLU, as PyTorch's BasicConv2d."""
  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel
    c = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, c, self.features), jnp.float32)
    scale = self.param("scale", nn.initializers.ones_init(), (self.features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    mean = self.param("mean", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    var = self.param("var", nn.initializers.ones_init(), (self.features,), jnp.float32)
    ph, pw = self.padding
    y = jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride), [(ph, ph), (pw, pw)],
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
    y = (y - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias
    return nn.relu(y)


def max_pool(x: jax.Array, window: int = 3, stride: int = 2, pad: int = 0) -> jax.Array:
  """NHWC max pool; padding counts as -inf (PyTorch's max_pool2d)."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1),
                               [(0, 0), (pad, pad), (pad, pad), (0, 0)])


def avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average pool, padding 1, averaging only over real pixels (TensorFlow's pool)."""
  pads = [(0, 0), (1, 1), (1, 1), (0, 0)]
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
  return total / count


class InceptionA(nn.Module):
  """FIDInceptionA: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool(excl. pad)->1x1."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(64, name="branch1x1")(x)
    b5 = BasicConv2d(48, name="branch5x5_1")(x)
    b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv2d(64, name="branch3x3dbl_1")(x)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(self.pool_features, name="branch_pool")(avg_pool_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Grid reduction 35 -> 17: 3x3/2 | 1x1->3x3->3x3/2 | maxpool/2."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = BasicConv2d(64, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, max_pool(x)], axis=-1)


class InceptionC(nn.Module):
  """FIDInceptionC: factorised 7x7 branches; avgpool excludes padding."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    row, col = {"kernel": (1, 7), "padding": (0, 3)}, {"kernel": (7, 1), "padding": (3, 0)}
    b1 = BasicConv2d(192, name="branch1x1")(x)
    b7 = BasicConv2d(c7, name="branch7x7_1")(x)
    b7 = BasicConv2d(c7, **row, name="branch7x7_2")(b7)
    b7 = BasicConv2d(192, **col, name="branch7x7_3")(b7)
    bd = BasicConv2d(c7, name="branch7x7dbl_1")(x)
    bd = BasicConv2d(c7, **col, name="branch7x7dbl_2")(bd)
    bd = BasicConv2d(c7, **row, name="branch7x7dbl_3")(bd)
    bd = BasicConv2d(c7, **col, name="branch7x7dbl_4")(bd)
    bd = BasicConv2d(192, **row, name="branch7x7dbl_5")(bd)
    bp = BasicConv2d(192, name="branch_pool")(avg_pool_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Grid reduction 17 -> 8: 1x1->3x3/2 | 1x1->1x7->7x1->3x3/2 | maxpool/2."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(192, name="branch3x3_1")(x)
    b3 = BasicConv2d(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv2d(192, name="branch7x7x3_1")(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, max_pool(x)], axis=-1)


class InceptionE(nn.Module):
  """FIDInceptionE_1 (`pool='avg'`, padding excluded) and FIDInceptionE_2 (`pool='max'`)."""
  pool: str = "avg"

  @nn.compact
  def __call__(self, x):
    row, col = {"kernel": (1, 3), "padding": (0, 1)}, {"kernel": (3, 1), "padding": (1, 0)}
    b1 = BasicConv2d(320, name="branch1x1")(x)
    b3 = BasicConv2d(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv2d(384, **row, name="branch3x3_2a")(b3),
                          BasicConv2d(384, **col, name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv2d(448, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv2d(384, **row, name="branch3x3dbl_3a")(bd),
                          BasicConv2d(384, **col, name="branch3x3dbl_3b")(bd)], axis=-1)
    # The FID graph's last block max-pools here (a quirk of the TF graph that FID is defined by).
    pooled = max_pool(x, 3, 1, 1) if self.pool == "max" else avg_pool_exclude_pad(x)
    bp = BasicConv2d(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """The FID Inception-v3 up to its 2048-d pool3 features.

  __call__(x): x [B, H, W, 3] float in [0, 1] -> [B, 2048]. `resize=False` skips the 299x299 resize
  (tests feed small inputs; the smallest the network accepts is 75x75).
  """
  resize: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    if self.resize:
      x = layers.resize_bilinear(x, INPUT_SIZE, INPUT_SIZE)
    x = 2.0 * x - 1.0
    x = BasicConv2d(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = max_pool(x)
    x = BasicConv2d(80, name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = max_pool(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


# --- weights ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _param_shapes_cached() -> dict[str, Any]:
  tree = jax.eval_shape(lambda: FIDInceptionV3(resize=False).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 75, 75, 3))))["params"]
  return jax.tree_util.tree_map(lambda s: tuple(s.shape), tree)


def param_shapes() -> dict[str, Any]:
  """The parameter tree's shapes (traced, no weights computed): {block: {conv: {leaf: shape}}}."""
  return copy.deepcopy(_param_shapes_cached())


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def torch_state_dict_shapes() -> dict[str, tuple[int, ...]]:
  """The PyTorch key names and shapes of the FID weights file that this network reads.

  Includes the unused classifier (`fc.weight` [1008, 2048], `fc.bias` [1008]) that the file carries.
  """
  out: dict[str, tuple[int, ...]] = {}
  inverse_bn = {v: k for k, v in _BN_LEAVES.items()}
  for path, shape in _flatten(param_shapes()).items():
    *module, leaf = path
    name = ".".join(module)
    if leaf == "kernel":
      kh, kw, cin, cout = shape
      out[f"{name}.conv.weight"] = (cout, cin, kh, kw)
    else:
      out[f"{name}.bn.{inverse_bn[leaf]}"] = shape
  out["fc.weight"] = (NUM_CLASSES, FEATURE_DIM)
  out["fc.bias"] = (NUM_CLASSES,)
  return out


def _read_tensor_file(path: pathlib.Path) -> dict[str, np.ndarray]:
  suffix = path.suffix.lower()
  if suffix == ".safetensors":
    from safetensors.numpy import load_file
    return dict(load_file(str(path)))
  if suffix == ".npz":
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  if suffix in (".pth", ".pt", ".bin"):
    try:
      import torch
    except ImportError as e:  # torch is an optional extra
      raise ImportError(f"reading {path} needs PyTorch (pip install 'glide-jax[torch]'), or convert it "
                        "to .safetensors / .npz with the same key names") from e
    # weights_only: the file is data, never code; a pickle with objects in it is refused.
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
      raise ValueError(f"{path}: expected a state_dict (a mapping of names to tensors), "
                       f"got {type(sd).__name__}")
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
      sd = sd["state_dict"]
    return {k: v.detach().cpu().numpy() for k, v in sd.items() if hasattr(v, "detach")}
  raise ValueError(f"{path}: unknown weights format {suffix!r}; use the PyTorch .pth state_dict "
                   "or a .safetensors / .npz file with the same key names")


def params_from_state_dict(state_dict: Mapping[str, Any], source: str = "state_dict") -> dict[str, Any]:
  """PyTorch FID-Inception state_dict -> our parameter tree (by name; conv kernels transposed).

  Raises KeyError naming every missing and unexpected key, ValueError naming misshaped ones.
  """
  expected = torch_state_dict_shapes()
  sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
  sd = {k: v for k, v in sd.items() if not k.endswith(_IGNORED_SUFFIXES)}
  missing = sorted(k for k in expected if k not in sd and not k.startswith("fc."))
  unexpected = sorted(k for k in sd if k not in expected)
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"{len(missing)} missing keys: {_short_list(missing)}")
    if unexpected:
      parts.append(f"{len(unexpected)} unexpected keys: {_short_list(unexpected)}")
    raise KeyError(f"{source} is not the FID Inception-v3 state_dict ({WEIGHTS_FILENAME}): "
                   + "; ".join(parts))
  bad = []
  arrays = {}
  for k, v in sd.items():
    a = np.asarray(v, np.float32)
    if tuple(a.shape) != expected[k]:
      bad.append(f"{k}: {tuple(a.shape)} (expected {expected[k]})")
    arrays[k] = a
  if bad:
    raise ValueError(f"{source}: misshaped tensors: " + "; ".join(bad))
  params: dict[str, Any] = {}
  for k, a in arrays.items():
    if k.startswith("fc."):
      continue  # the 1008-way classifier: FID reads the features before it
    module, kind, leaf = k.rsplit(".", 2)
    node = params
    for part in module.split("."):
      node = node.setdefault(part, {})
    if kind == "conv":
      node["kernel"] = np.transpose(a, (2, 3, 1, 0))  # [out, in, kh, kw] -> [kh, kw, in, out]
    else:
      node[_BN_LEAVES[leaf]] = a
  return params


def state_dict_from_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Inverse of `params_from_state_dict` (without the classifier): our tree -> PyTorch names."""
  inverse_bn = {v: k for k, v in _BN_LEAVES.items()}
  out = {}
  for path, a in _flatten(params).items():
    *module, leaf = path
    name = ".".join(module)
    a = np.asarray(a)
    if leaf == "kernel":
      out[f"{name}.conv.weight"] = np.ascontiguousarray(np.transpose(a, (3, 2, 0, 1)))
    else:
      out[f"{name}.bn.{inverse_bn[leaf]}"] = a
  return out


def _short_list(keys: list[str], limit: int = 8) -> str:
  shown = ", ".join(keys[:limit])
  return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_fid_inception_weights(path: str | os.PathLike) -> dict[str, Any]:
  """Reads the user's FID Inception weights file -> parameter tree for `FIDInceptionV3`.

  path: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (PyTorch state_dict, read with
  weights_only=True), or a `.safetensors` / `.npz` with the same key names.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(
        f"FID Inception weights not found at {path}. glide-jax never downloads them: fetch "
        f"{WEIGHTS_FILENAME} (released with pytorch-fid) yourself and pass its path.")
  return params_from_state_dict(_read_tensor_file(path), source=str(path))


@functools.partial(jax.jit, static_argnames=("resize",))
def _features(params, x, resize):
  # Module-level jit with params as an argument: one compilation per (batch shape, resize).
  return FIDInceptionV3(resize=resize).apply({"params": params}, x)


def make_feature_fn(params: Mapping[str, Any], resize: bool = True) -> Callable[[np.ndarray], np.ndarray]:
  """A function: images uint8 [B, H, W, 3] (or float in [0, 1]) -> pool3 features [B, 2048] float64.

  `resize=False` feeds the images at their own size (>= 75 px): for tests only; FID is defined at 299.
  """
  device_params = jax.tree_util.tree_map(jnp.asarray, params)

  def fn(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"expected images [B, H, W, 3], got shape {x.shape}")
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    return np.asarray(_features(device_params, jnp.asarray(x), resize), np.float64)

  return fn


def batched_features(feature_fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray | Iterable,
                     batch_size: int) -> Iterable[np.ndarray]:
  """Yields features of fixed-size batches (the last one padded, then trimmed: one compilation)."""
  images = np.asarray(images)
  for lo in range(0, len(images), batch_size):
    chunk = images[lo:lo + batch_size]
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
    yield feature_fn(chunk)[:n]
