"""The ADM U-Net with GLIDE's text conditioning (`[G] unet.py`, `text2im_model.py`), NHWC.

Parameter names follow the reference's module paths with '.' written as '_' (so
`input_blocks.3.1.qkv.weight` lives at `input_blocks_3_1/qkv/kernel`); the text transformer lives
under `text_encoder/` (the reference's top-level `token_embedding`, `transformer.*`, `final_ln`).
`unet_layout` is the one place the topology is derived; the module and the checkpoint mapping
both read it.

Input variants (`kind`), concatenated on the channel axis in the reference's order:
  text2im           x_t                                         (3 channels)
  upsample          [x_t, bilinear(low_res)]                    (6)
  inpaint           [x_t, image * mask, mask]                   (7)
  upsample_inpaint  [x_t, image * mask, mask, bilinear(low_res)] (10)
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glide_jax.models import layers
from glide_jax.models.remat import remat
from glide_jax.models.text_encoder import TextEncoder

Dtype = layers.Dtype
KINDS = ("text2im", "upsample", "inpaint", "upsample_inpaint")
IN_CHANNELS = {"text2im": 3, "upsample": 6, "inpaint": 7, "upsample_inpaint": 10}
_zeros = nn.initializers.zeros_init()
# w is multiplied by this before the sinusoidal embedding: guidance scales 0..10 then span
# arguments 0..1000, the range the timestep embedding's frequencies are laid out for.
GUIDANCE_EMBED_SCALE = 100.0


@dataclasses.dataclass(frozen=True)
class Layer:
  """One module of a TimestepEmbedSequential: 'res' (optionally up/down), 'attn', 'down', 'up'."""
  type: str
  in_ch: int
  out_ch: int
  heads: int = 0
  up: bool = False
  down: bool = False


def unet_layout(model_channels: int, channel_mult: tuple[int, ...], num_res_blocks: int,
                attention_ds: tuple[int, ...], num_heads: int, num_head_channels: int,
                num_heads_upsample: int, resblock_updown: bool) -> dict[str, list[list[Layer]]]:
  """The reference UNetModel.__init__ topology. input_blocks[0] is the input conv ([])."""
  if num_heads_upsample == -1:
    num_heads_upsample = num_heads

  def heads(ch: int, n: int) -> int:
    if num_head_channels == -1:
      if ch % n:
        raise ValueError(f"{ch} channels are not divisible by {n} heads")
      return n
    if ch % num_head_channels:
      raise ValueError(f"{ch} channels are not divisible by num_head_channels={num_head_channels}")
    return ch // num_head_channels

  ch = channel_mult[0] * model_channels
  inputs: list[list[Layer]] = [[]]
  chans, ds = [ch], 1
  for level, mult in enumerate(channel_mult):
    for _ in range(num_res_blocks):
      blk = [Layer("res", ch, mult * model_channels)]
      ch = mult * model_channels
      if ds in attention_ds:
        blk.append(Layer("attn", ch, ch, heads(ch, num_heads)))
      inputs.append(blk)
      chans.append(ch)
    if level != len(channel_mult) - 1:
      inputs.append([Layer("res", ch, ch, down=True) if resblock_updown else Layer("down", ch, ch)])
      chans.append(ch)
      ds *= 2
  middle = [Layer("res", ch, ch), Layer("attn", ch, ch, heads(ch, num_heads)), Layer("res", ch, ch)]
  outputs: list[list[Layer]] = []
  for level, mult in list(enumerate(channel_mult))[::-1]:
    for i in range(num_res_blocks + 1):
      blk = [Layer("res", ch + chans.pop(), model_channels * mult)]
      ch = model_channels * mult
      if ds in attention_ds:
        blk.append(Layer("attn", ch, ch, heads(ch, num_heads_upsample)))
      if level and i == num_res_blocks:
        blk.append(Layer("res", ch, ch, up=True) if resblock_updown else Layer("up", ch, ch))
        ds //= 2
      outputs.append(blk)
  return {"input_blocks": inputs, "middle_block": [middle], "output_blocks": outputs}


def timestep_embedding(t: jax.Array, dim: int, max_period: int = 10000) -> jax.Array:
  """t: [B] (any numeric) -> [B, dim] float32, [cos | sin] (cos FIRST, as the reference)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def upsample_nearest(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, 2H, 2W, C]."""
  b, h, w, c = x.shape
  return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


def avg_pool2(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, H/2, W/2, C] (2x2 average, stride 2)."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)).astype(x.dtype)


def sincos_2d_init(key, shape, dtype=jnp.float32):
  """[H, W, C] fixed-form start for `input_pos_emb`: C/4 frequencies, from one half-period across
  the canvas up to the Nyquist rate, as (sin x, cos x, sin y, cos y) blocks; amplitude 1, the
  scale of the input conv's output, so position is usable from the first step (a small random
  init stayed at 2 % of the features after 700 demo steps). `key` is unused: deterministic."""
  del key
  height, width, ch = shape
  if ch % 4:
    raise ValueError(f"input_pos_emb needs channels divisible by 4, got {ch}")
  n = ch // 4
  freqs = (min(height, width) / 2.0) ** (np.arange(n) / max(n - 1, 1))  # half-periods per canvas

  def axis(size):
    angle = np.pi * (np.arange(size)[:, None] + 0.5) / size * freqs[None]
    return np.sin(angle), np.cos(angle)

  sx, cx = axis(width)
  sy, cy = axis(height)
  grid = np.concatenate([np.broadcast_to(sx[None], (height, width, n)), np.broadcast_to(cx[None], (height, width, n)),
                         np.broadcast_to(sy[:, None], (height, width, n)), np.broadcast_to(cy[:, None], (height, width, n))],
                        axis=-1)
  return jnp.asarray(grid, dtype)


class ResBlock(nn.Module):
  """ADM ResBlock; `up`/`down` resample inside (BigGAN style); scale-shift norm or additive emb."""
  out_channels: int
  use_scale_shift_norm: bool = True
  dropout: float = 0.0
  up: bool = False
  down: bool = False
  deterministic: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    """x: [B, H, W, C_in], emb: [B, E] float32 -> [B, H', W', C_out]."""
    out = self.out_channels
    h = layers.GroupNorm32(swish=True, name="in_layers_0")(x)
    if self.up:
      h, x = upsample_nearest(h), upsample_nearest(x)
    elif self.down:
      h, x = avg_pool2(h), avg_pool2(x)
    h = layers.Conv(out, 3, padding=1, dtype=self.dtype, name="in_layers_2")(h)
    # emb_layers stays in float32 (as the reference's fp16 conversion) and is cast to h's dtype.
    emb_out = layers.Dense(2 * out if self.use_scale_shift_norm else out, names=("time_embed", "conv_out"),
                           name="emb_layers_1")(nn.silu(emb)).astype(h.dtype)[:, None, None, :]
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(emb_out, 2, axis=-1)  # scale first
      h = layers.GroupNorm32(swish=False, name="out_layers_0")(h) * (1 + scale) + shift
      h = nn.silu(h)
    else:
      h = layers.GroupNorm32(swish=True, name="out_layers_0")(h + emb_out)
    if self.dropout > 0:
      h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
    h = layers.Conv(out, 3, padding=1, dtype=self.dtype, kernel_init=_zeros, name="out_layers_3")(h)
    if x.shape[-1] != out:
      x = layers.Conv(out, 1, padding=0, dtype=self.dtype, name="skip_connection")(x)
    return layers.constrain(x.astype(h.dtype) + h, ("batch", "act_height", "act_width", "act_channels"))


class AttentionBlock(nn.Module):
  """Self-attention over H*W with the text keys/values (encoder_kv of xf_out) PREPENDED."""
  heads: int
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None  # layers.attention's implementation

  @nn.compact
  def __call__(self, x: jax.Array, xf_out: jax.Array) -> jax.Array:
    """x: [B, H, W, C], xf_out: [B, T, W_xf] -> [B, H, W, C]."""
    b, height, width, c = x.shape
    ch = c // self.heads
    h = layers.GroupNorm32(name="norm")(x).reshape(b, height * width, c)
    qkv = layers.Dense(3 * c, names=("conv_in", "qkv"), dtype=self.dtype, name="qkv")(h)
    # Head-major ("legacy") layout: each head owns a contiguous [q | k | v] slice of 3*ch channels.
    q, k, v = jnp.split(qkv.reshape(b, height * width, self.heads, 3 * ch), 3, axis=-1)
    kv = layers.Dense(2 * c, names=("embed", "kv"), dtype=self.dtype, name="encoder_kv")(xf_out)
    ek, ev = jnp.split(kv.reshape(b, kv.shape[1], self.heads, 2 * ch), 2, axis=-1)  # per head [k | v]
    k = jnp.concatenate([ek.astype(k.dtype), k], axis=1)  # text tokens first, one softmax, no mask
    v = jnp.concatenate([ev.astype(v.dtype), v], axis=1)
    a = layers.attention(q, k, v, implementation=self.attention_impl).reshape(b, height * width, c)
    a = layers.Dense(c, names=("qkv", "conv_out"), dtype=self.dtype, kernel_init=_zeros, name="proj_out")(a)
    return x + a.reshape(b, height, width, c).astype(x.dtype)


class Downsample(nn.Module):
  """Conv resampling (resblock_updown=False): a stride-2 3x3 conv, padding 1 ([G] `Downsample.op`)."""
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.Conv(self.out_channels, 3, strides=2, padding=1, dtype=self.dtype, name="op")(x)


class Upsample(nn.Module):
  """Conv resampling (resblock_updown=False): nearest x2 then a 3x3 conv ([G] `Upsample.conv`)."""
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.Conv(self.out_channels, 3, padding=1, dtype=self.dtype, name="conv")(upsample_nearest(x))


class UNet(nn.Module):
  """GLIDE's Text2ImUNet and its upsample / inpaint variants. Output [B, H, W, 6] = [eps | v]."""
  kind: str = "text2im"
  model_channels: int = 192
  channel_mult: tuple[int, ...] = (1, 2, 3, 4)
  num_res_blocks: int = 3
  attention_ds: tuple[int, ...] = (2, 4, 8)
  num_heads: int = 1
  num_head_channels: int = 64
  num_heads_upsample: int = -1
  dropout: float = 0.1
  use_scale_shift_norm: bool = True
  resblock_updown: bool = True
  out_channels: int = 6
  n_vocab: int = 50257
  text_ctx: int = 128
  xf_width: int = 512
  xf_layers: int = 16
  xf_heads: int = 8
  xf_final_ln: bool = True
  xf_padding: bool = True
  # Not in the reference (off for GLIDE's models): a learned [H, W, C] embedding added after the
  # input conv. At high noise x_t carries no layout, so without it the only cue for "on the left"
  # is the zero padding, which a small model learns slowly (the shapes demo).
  input_pos_emb: bool = False
  xf_token_init_std: float = 0.02  # initialisation of the text encoder's token embedding only
  dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = False  # the text encoder's blocks under nn.scan (models/layout.py)
  attention_impl: str | None = None  # None/'xla': XLA's attention; 'cudnn': cuDNN's; 'flash': TPU Pallas (layers.attention)
  # Ours (guidance distillation, Meng et al. 2023): the guidance scale w [B] is an input, embedded
  # like the timestep (sinusoid of GUIDANCE_EMBED_SCALE * w -> MLP) and added to the timestep
  # embedding. The MLP's last layer starts at zero, so a teacher's weights plus this subtree give
  # exactly the teacher's (conditional) output whatever w is.
  guidance_embed: bool = False

  def setup(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown U-Net kind {self.kind!r}; choose from {KINDS}")
    self.text_encoder = TextEncoder(self.n_vocab, self.text_ctx, self.xf_width, self.xf_layers, self.xf_heads,
                                    self.xf_final_ln, self.xf_padding, self.dtype, self.remat_policy,
                                    token_init_std=self.xf_token_init_std, scan_layers=self.scan_layers,
                                    attention_impl=self.attention_impl)
    self.transformer_proj = layers.Dense(4 * self.model_channels, names=("embed", "time_embed"),
                                         dtype=self.dtype)

  def layout(self) -> dict[str, list[list[Layer]]]:
    return unet_layout(self.model_channels, tuple(self.channel_mult), self.num_res_blocks,
                       tuple(self.attention_ds), self.num_heads, self.num_head_channels,
                       self.num_heads_upsample, self.resblock_updown)

  def encode_text(self, tokens: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """tokens [B, L] int, mask [B, L] bool -> {"xf_proj": [B, 4*C] float32, "xf_out": [B, L, W]}."""
    xf_out = self.text_encoder(tokens, mask)
    # Pooled at the LAST POSITION (index L-1), not at the last real token: the reference's choice.
    xf_proj = self.transformer_proj(xf_out[:, -1])
    return {"xf_proj": xf_proj.astype(jnp.float32), "xf_out": xf_out}

  def dummy_inputs(self, batch: int = 1, image_size: int = 64) -> dict[str, jax.Array]:
    """Zero inputs of the right shapes for `init` / `jax.eval_shape`."""
    x = jnp.zeros((batch, image_size, image_size, 3), jnp.float32)
    kw = dict(x=x, timesteps=jnp.zeros((batch,), jnp.int32), tokens=jnp.zeros((batch, self.text_ctx), jnp.int32),
              mask=jnp.zeros((batch, self.text_ctx), bool))
    if self.kind in ("upsample", "upsample_inpaint"):
      kw["low_res"] = jnp.zeros((batch, image_size // 4, image_size // 4, 3), jnp.float32)
    if self.kind in ("inpaint", "upsample_inpaint"):
      kw["inpaint_image"] = x
      kw["inpaint_mask"] = jnp.zeros((batch, image_size, image_size, 1), jnp.float32)
    if self.guidance_embed:
      kw["guidance"] = jnp.ones((batch,), jnp.float32)
    return kw

  def _input(self, x, low_res, inpaint_image, inpaint_mask):
    parts = [x]
    if self.kind in ("inpaint", "upsample_inpaint"):
      if inpaint_image is None:  # the reference's defaults: zeros, i.e. plain text2im behaviour
        inpaint_image = jnp.zeros_like(x)
      if inpaint_mask is None:
        inpaint_mask = jnp.zeros_like(x[..., :1])
      parts += [inpaint_image * inpaint_mask, inpaint_mask.astype(x.dtype)]
    if self.kind in ("upsample", "upsample_inpaint"):
      if low_res is None:
        raise ValueError(f"a {self.kind} model needs low_res [B, h, w, 3]")
      parts.append(layers.resize_bilinear(low_res, x.shape[1], x.shape[2]))
    return jnp.concatenate([p.astype(jnp.float32) for p in parts], axis=-1)

  @nn.compact
  def __call__(self, x: jax.Array, timesteps: jax.Array, tokens: jax.Array | None = None,
               mask: jax.Array | None = None, low_res: jax.Array | None = None,
               inpaint_image: jax.Array | None = None, inpaint_mask: jax.Array | None = None,
               train: bool = False, text_cond: dict[str, jax.Array] | None = None,
               guidance: jax.Array | None = None) -> jax.Array:
    """x [B, H, W, 3], timesteps [B] (original 0..T-1) -> [B, H, W, 6] float32 (see docs/architecture.md).

    `guidance` [B]: the guidance scale, for a model with `guidance_embed` only (and required there)."""
    if self.guidance_embed and guidance is None:
      raise ValueError("this model takes the guidance scale as an input (guidance_embed): pass guidance [B]")
    if not self.guidance_embed and guidance is not None:
      raise ValueError("guidance= is an input of guidance_embed models only")
    if text_cond is None:
      if tokens is None:
        raise ValueError("pass tokens and mask, or text_cond from encode_text")
      text_cond = self.encode_text(tokens, mask)
    xf_out = text_cond["xf_out"].astype(self.dtype)
    mc = self.model_channels
    # time_embed stays float32 (the reference does not convert it to fp16).
    emb = layers.Dense(4 * mc, names=(None, "time_embed"), name="time_embed_0")(timestep_embedding(timesteps, mc))
    emb = layers.Dense(4 * mc, names=("time_embed", None), name="time_embed_2")(nn.silu(emb))
    emb = emb + text_cond["xf_proj"].astype(jnp.float32)
    if self.guidance_embed:
      w = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), timesteps.shape)
      g = layers.Dense(4 * mc, names=(None, "time_embed"), name="guidance_embed_0")(
          timestep_embedding(w * GUIDANCE_EMBED_SCALE, mc))
      emb = emb + layers.Dense(4 * mc, names=("time_embed", None), kernel_init=_zeros,
                               name="guidance_embed_2")(nn.silu(g))

    res_cls = remat(ResBlock, self.remat_policy)
    attn_cls = remat(AttentionBlock, self.remat_policy)

    def run(block: list[Layer], prefix: str, h):
      for j, lay in enumerate(block):
        name = f"{prefix}_{j}"
        if lay.type == "res":
          h = res_cls(lay.out_ch, self.use_scale_shift_norm, self.dropout, lay.up, lay.down, not train,
                      self.dtype, name=name)(h, emb)
        elif lay.type == "attn":
          h = attn_cls(lay.heads, self.dtype, self.attention_impl, name=name)(h, xf_out)
        elif lay.type == "down":
          h = Downsample(lay.out_ch, self.dtype, name=name)(h)
        else:
          h = Upsample(lay.out_ch, self.dtype, name=name)(h)
      return h

    lay = self.layout()
    h = self._input(x, low_res, inpaint_image, inpaint_mask).astype(self.dtype)
    h = layers.Conv(self.channel_mult[0] * mc, 3, padding=1, dtype=self.dtype, name="input_blocks_0_0")(h)
    if self.input_pos_emb:
      pos = self.param("input_pos_emb", layers.with_names(sincos_2d_init, (None, None, "conv_out")),
                       h.shape[1:], jnp.float32)
      h = h + pos[None].astype(h.dtype)
    hs = [h]
    for i, block in enumerate(lay["input_blocks"][1:], start=1):
      h = run(block, f"input_blocks_{i}", h)
      hs.append(h)
    h = run(lay["middle_block"][0], "middle_block", h)
    for i, block in enumerate(lay["output_blocks"]):
      h = run(block, f"output_blocks_{i}", jnp.concatenate([h, hs.pop()], axis=-1))
    # The head (GN + SiLU + conv) runs in float32, as in the reference.
    h = layers.GroupNorm32(swish=True, name="out_0")(h.astype(jnp.float32))
    return layers.Conv(self.out_channels, 3, padding=1, kernel_init=_zeros, name="out_2")(h)
