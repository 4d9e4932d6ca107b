"""GLIDE's text transformer ("xf", `[G] glide_text2im/xf.py` + `Text2ImUNet.get_text_emb`).

Parameter tree (the importer maps it by name to the reference's keys):
  token_embedding/embedding   [n_vocab, W]  <- token_embedding.weight
  positional_embedding        [L, W]        <- positional_embedding
  padding_embedding           [L, W]        <- padding_embedding (only when `padding`)
  resblocks_{i}/{ln_1, attn/c_qkv, attn/c_proj, ln_2, mlp/c_fc, mlp/c_proj}
                                             <- transformer.resblocks.{i}.*
                                                (scan_layers: one `resblocks/...` stacked on a
                                                leading 'layers' axis, see models/layout.py)
  final_ln                                  <- final_ln (only when `final_ln`)
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from glide_jax.models import layers, layout

Dtype = layers.Dtype


class MultiheadAttention(nn.Module):
  """Self-attention with a fused, head-major qkv projection and NO mask (as GLIDE)."""
  width: int
  heads: int
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None  # layers.attention's implementation

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, L, W] -> [B, L, W]."""
    b, length, _ = x.shape
    qkv = layers.Dense(3 * self.width, names=("embed", "qkv"), dtype=self.dtype, name="c_qkv")(x)
    qkv = layers.constrain(qkv, ("batch", "act_length", "qkv"))
    # The reference views the fused output as (B, L, heads, 3*ch) and splits q|k|v inside each head.
    qkv = qkv.reshape(b, length, self.heads, 3 * (self.width // self.heads))
    q, k, v = jnp.split(qkv, 3, axis=-1)
    h = layers.attention(q, k, v, implementation=self.attention_impl).reshape(b, length, self.width)
    return layers.Dense(self.width, names=("qkv", "embed"), dtype=self.dtype, name="c_proj")(h)


class MLP(nn.Module):
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.Dense(4 * self.width, names=("embed", "mlp"), dtype=self.dtype, name="c_fc")(x)
    h = layers.constrain(h, ("batch", "act_length", "mlp"))
    h = nn.gelu(h, approximate=False)  # torch nn.GELU() is the exact erf form
    return layers.Dense(self.width, names=("mlp", "embed"), dtype=self.dtype, name="c_proj")(h)


class ResidualAttentionBlock(nn.Module):
  """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""
  width: int
  heads: int
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    attn = MultiheadAttention(self.width, self.heads, self.dtype, self.attention_impl, name="attn")
    x = x + attn(layers.LayerNorm(name="ln_1")(x))
    x = x + MLP(self.width, self.dtype, name="mlp")(layers.LayerNorm(name="ln_2")(x))
    return layers.constrain(x, ("batch", "act_length", "act_embed"))


class TextEncoder(nn.Module):
  """tokens [B, L] int, mask [B, L] bool (True = real token) -> xf_out [B, L, W] (after final_ln).

  The pooled vector the U-Net uses is `xf_out[:, -1]`, the LAST POSITION, not the last real token
  (the reference's choice; for short prompts it sits on a padding embedding).
  """
  n_vocab: int = 50257
  text_ctx: int = 128
  width: int = 512
  layers: int = 16
  heads: int = 8
  final_ln: bool = True
  padding: bool = True
  dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = False  # run the blocks under nn.scan (stacked params: a smaller program)
  attention_impl: str | None = None  # layers.attention's implementation (the model option)
  # Init only (no effect on imported weights). 0.02 is CLIP's; 1.0 is torch's nn.Embedding default,
  # i.e. what [G]'s code does when trained from scratch.
  token_init_std: float = 0.02

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    if tokens.ndim != 2 or tokens.shape[1] != self.text_ctx:
      raise ValueError(f"tokens must be [B, {self.text_ctx}], got {tokens.shape}")
    if self.width % self.heads:
      raise ValueError(f"xf_width {self.width} is not divisible by xf_heads {self.heads}")
    init = nn.initializers.normal(self.token_init_std)
    emb = nn.Embed(self.n_vocab, self.width, embedding_init=layers.with_names(init, ("vocab", "embed")),
                   param_dtype=jnp.float32, dtype=jnp.float32, name="token_embedding")
    pos = self.param("positional_embedding", layers.with_names(nn.initializers.normal(0.01), ("length", "embed")),
                     (self.text_ctx, self.width), jnp.float32)
    x = emb(tokens) + pos[None]
    if self.padding:
      if mask is None:
        raise ValueError("xf_padding is on: the text encoder needs a mask ([B, L] bool, True = real token)")
      pad = self.param("padding_embedding", layers.with_names(nn.initializers.normal(0.01), ("length", "embed")),
                       (self.text_ctx, self.width), jnp.float32)
      # Padded positions get the learned per-position vector instead of token + position.
      x = jnp.where(mask.astype(bool)[..., None], x, pad[None])
    x = layers.constrain(x.astype(self.dtype), ("batch", "act_length", "act_embed"))
    x = layout.repeat_blocks(ResidualAttentionBlock, (self.width, self.heads, self.dtype, self.attention_impl), x,
                             length=self.layers, name="resblocks", scan=self.scan_layers,
                             remat_policy=self.remat_policy)
    if self.final_ln:
      x = layers.LayerNorm(name="final_ln")(x)
    return x

