"""Small layers shared by every model, each carrying logical axis names.

Logical axis vocabulary (the mesh rules in `glide_jax/parallel` map these to mesh axes):

  parameters
    'vocab'        token-embedding rows
    'embed'        transformer width (text encoder, CLIP towers)
    'mlp'          transformer MLP hidden width
    'qkv'          fused attention projection outputs (head-major, so sharding splits heads)
    'kv'           fused text key/value projection outputs (U-Net `encoder_kv`)
    'length'       positional / padding embedding rows
    'conv_in'      input channels of a convolution or 1x1 projection
    'conv_out'     output channels of a convolution or 1x1 projection
    'kernel'       spatial kernel axes (never sharded)
    'norm'         scales and biases of norms, and other biases (never sharded)
    'time_embed'   width of the U-Net timestep/conditioning embedding
    'timesteps'    rows of a per-timestep embedding table
  activations
    'batch', 'act_length', 'act_embed', 'act_height', 'act_width', 'act_channels'
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any
_default_kernel_init = nn.initializers.lecun_normal()


def with_names(init, names: Sequence[str | None]):
  """Wraps an initializer so the parameter it creates carries logical axis names."""
  return nn.with_logical_partitioning(init, tuple(names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Logical sharding constraint on an activation; a no-op outside a mesh context."""
  return nn.with_logical_constraint(x, tuple(names))


class Dense(nn.Module):
  """`nn.Dense` whose kernel is named (in_name, out_name) and bias ('norm',)."""
  features: int
  names: tuple[str | None, str | None] = ("embed", "mlp")
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Any = _default_kernel_init

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", with_names(self.kernel_init, self.names),
                        (x.shape[-1], self.features), jnp.float32)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", with_names(nn.initializers.zeros_init(), ("norm",)),
                        (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class Conv(nn.Module):
  """NHWC convolution, kernel [kh, kw, in, out] named ('kernel', 'kernel', 'conv_in', 'conv_out')."""
  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: str | int = "SAME"
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Any = _default_kernel_init

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", with_names(self.kernel_init, ("kernel", "kernel", "conv_in", "conv_out")),
                        (k, k, x.shape[-1], self.features), jnp.float32)
    pad = self.padding if isinstance(self.padding, str) else [(self.padding, self.padding)] * 2
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), (self.strides, self.strides), pad,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      bias = self.param("bias", with_names(nn.initializers.zeros_init(), ("norm",)),
                        (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def _group_mean(v: jax.Array, groups: int) -> jax.Array:
  """v: [B, N, C] -> the mean of each (example, group), broadcast back per channel: [B, C].

  Reduces over the spatial axis first (contiguous in NHWC), then over the few channels of a group:
  far cheaper on CPU than one reduction over a strided [N, C/G] slab."""
  b, _, c = v.shape
  per = c // groups
  return jnp.repeat(jnp.mean(v, axis=1).reshape(b, groups, per).mean(-1), per, axis=1)


def _group_normalize_fwd(x, groups, epsilon):
  mean = _group_mean(x, groups)
  rstd = jax.lax.rsqrt(_group_mean(jnp.square(x - mean[:, None]), groups) + epsilon)  # two-pass variance
  return (x - mean[:, None]) * rstd[:, None], (x, mean, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def group_normalize(x: jax.Array, groups: int, epsilon: float) -> jax.Array:
  """(x - mean) / sqrt(var + eps) per (example, group) of x: [B, N, C] float32.

  The hand-written backward keeps only x and two [B, C] statistics and makes two reductions; the
  autodiff of the forward makes several strided ones and was the step's second cost on CPU."""
  return _group_normalize_fwd(x, groups, epsilon)[0]


def _group_normalize_bwd(groups, epsilon, res, g):
  del epsilon
  x, mean, rstd = res
  xhat = (x - mean[:, None]) * rstd[:, None]
  gm = lambda v: _group_mean(v, groups)[:, None]
  return (rstd[:, None] * (g - gm(g) - xhat * gm(g * xhat)),)


group_normalize.defvjp(_group_normalize_fwd, _group_normalize_bwd)


class GroupNorm32(nn.Module):
  """GroupNorm with 32 groups, eps 1e-5, computed in float32 and cast back (as GLIDE's GroupNorm32).

  `swish=True` fuses the SiLU that GLIDE's `normalization(ch, swish=1.0)` applies after the norm.
  The channel count must be a multiple of the group count (PyTorch refuses otherwise; a reshape
  would silently mix spatial positions into the groups).
  """
  num_groups: int = 32
  swish: bool = False
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"GroupNorm {self.name or ''}: {c} channels are not divisible by {self.num_groups} "
                       f"groups (input shape {tuple(x.shape)}); use channel counts that are multiples of "
                       f"{self.num_groups}")
    scale = self.param("scale", with_names(nn.initializers.ones_init(), ("norm",)), (c,), jnp.float32)
    bias = self.param("bias", with_names(nn.initializers.zeros_init(), ("norm",)), (c,), jnp.float32)
    shape = x.shape
    h = group_normalize(x.astype(jnp.float32).reshape(shape[0], -1, c), self.num_groups, self.epsilon)
    h = h.reshape(shape) * scale + bias
    if self.swish:
      h = nn.silu(h)
    return h.astype(x.dtype)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis in float32, cast back to the input dtype (as GLIDE's xf.LayerNorm)."""
  epsilon: float = 1e-5
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", with_names(nn.initializers.ones_init(), ("norm",)), (c,), jnp.float32)
    h = x.astype(jnp.float32)
    mean = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
    h = (h - mean) * jax.lax.rsqrt(var + self.epsilon) * scale
    if self.use_bias:
      h = h + self.param("bias", with_names(nn.initializers.zeros_init(), ("norm",)), (c,), jnp.float32)
    return h.astype(x.dtype)


ATTENTION_IMPLS = (None, "xla", "cudnn")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
              implementation: str | None = None) -> jax.Array:
  """Multi-head attention through `jax.nn.dot_product_attention`, with GLIDE's scale 1/sqrt(ch).

  q: [B, Lq, H, D]; k, v: [B, Lk, H, D] (same dtype as q); mask: bool, broadcastable to
  [B, H, Lq, Lk], True = attend. Returns [B, Lq, H, D] in q's dtype.

  The reference scales q and k each by ch**-0.25 before q.k; the scale is passed whole here (the
  same product, one rounding fewer in bf16). `implementation` (the model option `attention_impl`):
    None / 'xla'  XLA's attention: logits q.k accumulated in float32 (for bf16 inputs the dot is
                  bf16 x bf16 -> float32), scaled, masked and softmaxed in float32; the weights are
                  cast to v's dtype for weights.v (as the reference's `softmax(w.float()).type(w.dtype)`).
    'cudnn'       cuDNN's fused (flash) attention on a GPU: bf16/fp16 inputs only, float32 softmax
                  statistics. On another backend (CPU, TPU) it falls back to XLA with a warning, so
                  a model configured for GPUs still samples elsewhere; on a GPU an unsupported
                  dtype or shape is an error.
  """
  if implementation not in ATTENTION_IMPLS:
    raise ValueError(f"attention implementation {implementation!r}: choose from {ATTENTION_IMPLS}")
  if mask is not None:
    mask = jnp.asarray(mask, bool)
  scale = q.shape[-1] ** -0.5
  if implementation == "cudnn" and jax.default_backend() != "gpu":
    warnings.warn(f"attention_impl='cudnn' needs a GPU; the backend is {jax.default_backend()!r}, "
                  "so XLA's attention runs instead", RuntimeWarning, stacklevel=2)
    implementation = "xla"
  if implementation != "cudnn":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=implementation)
  try:
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
  except (NotImplementedError, ValueError, RuntimeError) as e:
    raise ValueError(f"attention_impl='cudnn' cannot run q {q.dtype}{tuple(q.shape)}, k {tuple(k.shape)}: {e} "
                     "(cuDNN's fused attention takes bfloat16/float16; use attention_impl=None for "
                     "float32)") from e
