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
    'layers'       the leading axis of blocks stacked by `nn.scan` (scan_layers; never sharded)
  activations
    'batch', 'act_length', 'act_embed', 'act_height', 'act_width', 'act_channels'
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import warnings
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
_default_kernel_init = nn.initializers.lecun_normal()


def with_names(init, names: Sequence[str | None]):
  """Wraps an initializer so the parameter it creates carries logical axis names."""
  return nn.with_logical_partitioning(init, tuple(names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Logical sharding constraint on an activation; a no-op outside a mesh context."""
  return nn.with_logical_constraint(x, tuple(names))


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of 1-D linear resampling with half-pixel centres, no anti-aliasing, edge
  clamp: what PyTorch's `interpolate(mode='bilinear', align_corners=False)` applies per axis."""
  src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
  src = np.maximum(src, 0.0)  # PyTorch clamps negative source coordinates to 0
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  w1 = src - i0
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), i0), 1.0 - w1)
  np.add.at(m, (np.arange(n_out), i1), w1)
  return m.astype(np.float32)


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
  """x: [B, h, w, C] -> [B, height, width, C] float32, = torch F.interpolate(bilinear,
  align_corners=False), up or down. Separable: two small matrix products (fusion friendly, the same
  weights as PyTorch). Used by the upsampler for its low-res input and by the FID Inception."""
  mh = jnp.asarray(bilinear_matrix(x.shape[1], height))
  mw = jnp.asarray(bilinear_matrix(x.shape[2], width))
  x = x.astype(jnp.float32)
  return jnp.einsum("oh,bhwc,pw->bopc", mh, x, mw, precision=jax.lax.Precision.HIGHEST)


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


ATTENTION_IMPLS = (None, "xla", "cudnn", "flash")

# The platform a program is traced for. `jax.default_backend()` is the host's, which is wrong when a
# CPU machine lowers a step for TPU devices (`glide-jax plan`): the train program sets this while it
# traces, so the plan compiles the attention a TPU runs, not the CPU's einsum.
_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("glide_jax_target_platform",
                                                                              default=None)


@contextlib.contextmanager
def target_platform(platform: str | None):
  """Trace the models inside for `platform` ('cpu', 'gpu', 'tpu'; None: the default backend)."""
  token = _TARGET_PLATFORM.set(platform)
  try:
    yield
  finally:
    _TARGET_PLATFORM.reset(token)


def traced_platform() -> str:
  """The platform being traced for: `target_platform`'s, else `jax.default_backend()`."""
  return _TARGET_PLATFORM.get() or jax.default_backend()


def attention_impl_option(value: str | None) -> str | None:
  """The model option `attention_impl` as `attention`'s implementation: '' and None both mean None
  (a config's string field may hold ''); anything not in ATTENTION_IMPLS is a ValueError."""
  impl = value or None
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention_impl {impl!r}; choose from {ATTENTION_IMPLS}")
  return impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
              implementation: str | None = None) -> jax.Array:
  """Multi-head attention with GLIDE's scale 1/sqrt(ch), logits and softmax in float32.

  q: [B, Lq, H, D]; k, v: [B, Lk, H, D] (same dtype as q); mask: bool, broadcastable to
  [B, H, Lq, Lk], True = attend. Returns [B, Lq, H, D] in q's dtype. Every path accumulates the
  logits q.k in float32 (bf16 inputs: a bf16 x bf16 -> float32 dot), masks and softmaxes them in
  float32, and casts the weights to v's dtype for weights.v (the reference's
  `softmax(w.float()).type(w.dtype)`). `implementation` (the model option `attention_impl`):
    None   the default: on the CPU (`traced_platform()`) `_einsum_attention` (jax's XLA attention materialises
           two transposes of the [B, H, Lq, Lk] weights in its backward pass there and was 25-30 %
           slower on the demo's 16x16 attention, docs/performance.md); elsewhere
           `jax.nn.dot_product_attention` with its default choice (XLA's today).
    'xla'  `jax.nn.dot_product_attention(implementation='xla')` on every backend (scale passed whole).
    'cudnn'  cuDNN's fused (flash) attention on a GPU: bf16/fp16 inputs only, float32 softmax
           statistics. On another backend it falls back to the default with a warning, so a model
           configured for GPUs still samples elsewhere; on a GPU an unsupported dtype or shape is a
           ValueError.
    'flash'  Pallas's TPU flash attention (`_flash_attention`): the [B, H, Lq, Lk] logits never
           reach HBM, so neither their memory nor the compiler's work on them grows with the batch.
           Masked attention (the CLIP text tower's) keeps XLA's. On another platform it falls back
           to the default with a warning, as 'cudnn' does.
  """
  if implementation not in ATTENTION_IMPLS:
    raise ValueError(f"attention implementation {implementation!r}: choose from {ATTENTION_IMPLS}")
  if mask is not None:
    mask = jnp.asarray(mask, bool)
  backend = traced_platform()
  needs = {"cudnn": "gpu", "flash": "tpu"}.get(implementation)
  if needs and backend != needs:
    warnings.warn(f"attention_impl={implementation!r} needs a {needs.upper()}; the backend is {backend!r}, so "
                  "the default attention runs instead", RuntimeWarning, stacklevel=2)
    implementation = None
  if implementation == "flash":
    if mask is None:
      return _flash_attention(q, k, v)
    implementation = "xla"
  if implementation is None and backend == "cpu":
    return _einsum_attention(q, k, v, mask)
  scale = q.shape[-1] ** -0.5
  if implementation != "cudnn":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=implementation)
  try:
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
  except (NotImplementedError, ValueError, RuntimeError) as e:
    raise ValueError(f"attention_impl='cudnn' cannot run q {q.dtype}{tuple(q.shape)}, k {tuple(k.shape)}: {e} "
                     "(cuDNN's fused attention takes bfloat16/float16; use attention_impl=None for "
                     "float32)") from e


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _flash_attention(q, k, v):
  """[B, L, H, D] attention through `jax.experimental.pallas.ops.tpu.flash_attention`.

  The kernel wants [B, H, L, D] and key blocks of 128: keys and values are padded to a multiple of
  128 and the padding is masked with segment ids (real keys 1, padding 0); queries are padded to
  their block (padded rows attend to the real keys and are cut off, so their cotangent is zero).
  Logits and softmax statistics are float32 inside the kernel. Under a mesh it runs per batch
  shard (`_per_batch_shard`): the SPMD partitioner cannot split a Pallas call itself.
  """
  from jax.experimental.pallas.ops.tpu import flash_attention as fa

  b, lq, _, d = q.shape
  lk = k.shape[1]
  block_q = 128 if lq >= 128 else _round_up(lq, 8)
  lq_p, lk_p = _round_up(lq, block_q), _round_up(lk, 128)
  block_k_major = next(m for m in (512, 256, 128) if lk_p % m == 0)
  blocks = fa.BlockSizes(block_q=block_q, block_k_major=block_k_major, block_k=128, block_b=1,
                         block_q_major_dkv=block_q, block_k_major_dkv=block_k_major, block_k_dkv=128,
                         block_q_dkv=block_q, block_k_major_dq=block_k_major, block_k_dq=128, block_q_dq=block_q)

  def heads_first(a, length):
    return jnp.pad(a.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, length - a.shape[1]), (0, 0)))

  qt, kt, vt = heads_first(q, lq_p), heads_first(k, lk_p), heads_first(v, lk_p)
  seg_q = jnp.ones((b, lq_p), jnp.int32)
  seg_kv = jnp.broadcast_to((jnp.arange(lk_p) < lk).astype(jnp.int32), (b, lk_p))

  def kernel(qt, kt, vt, seg_q, seg_kv):
    segments = fa.SegmentIds(q=seg_q, kv=seg_kv) if lk_p != lk else None
    return fa.flash_attention(qt, kt, vt, segment_ids=segments, sm_scale=d ** -0.5, block_sizes=blocks)

  out = _per_batch_shard(kernel, qt, kt, vt, seg_q, seg_kv)
  return out[:, :, :lq].transpose(0, 2, 1, 3)


def _per_batch_shard(fn, *args):
  """`fn(*args)` (every arg batch-major) under `jax.shard_map` over the ambient mesh's batch axes
  (the logical rules' 'batch', default replica/data/fsdp), each device on its own rows; called
  directly without a mesh, or when the batch does not divide over those axes."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(*args)
  rules = dict(nn.get_logical_axis_rules())
  named = rules.get("batch", ("replica", "data", "fsdp"))
  named = (named,) if isinstance(named, str) else tuple(named or ())
  axes = tuple(a for a in named if a in mesh.axis_names and mesh.shape[a] > 1)
  shards = int(np.prod([mesh.shape[a] for a in axes]))
  if not axes or args[0].shape[0] % shards:
    return fn(*args)
  spec = jax.sharding.PartitionSpec(axes)
  # check_vma=False: the Pallas call's outputs carry no varying-axes annotation.
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec, check_vma=False)(*args)


def _einsum_attention(q, k, v, mask):
  """The reference's QKVAttention with float32 logits and softmax.

  float32: q and k each scaled by ch**-0.25 before q.k, as the reference (the fastest on the CPU).
  Narrower dtypes: the float32 logits are scaled by 1/sqrt(ch) instead, since scaling q and k in
  bf16 would round every element to 8 bits (1.8e-2 relative error on the output for
  tests/test_attention.py's inputs, against 2.2e-3 scaled after)."""
  d = q.shape[-1]
  if q.dtype == jnp.float32:
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * d ** -0.25, k * d ** -0.25, preferred_element_type=jnp.float32)
  else:
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * d ** -0.5
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
