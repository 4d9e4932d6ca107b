"""GLIDE's noised CLIP (`[G] glide_text2im/clip/encoders.py`, `model_creation.py`, `config.yaml`).

Two towers, each a pre-LN transformer of `TransformerBlock`s (attention then MLP):
  image: (x + 1) * 127.5 -> CLIP mean/std -> 4x4 patch conv -> [w_t[t], patches] + w_pos -> LN
         -> blocks (no mask) -> LN(token 0) -> f          (timestep-conditioned ViT)
  text:  w_voc[tokens] + w_pos -> blocks (causal) -> LN(h[text_len - 1]) -> f

Parameter tree (names mirror the reference so `interop/clip_keys.py` maps by name):
  image/input/{w_t [T, W], patch_proj/kernel [p, p, 3, W], w_pos [1 + n^2, W], ln/{scale, bias}}
  text/input/{w_voc [V, W], w_pos [L, W]}
  {image,text}/block_{i}/f_attn/{ln, f_q/{kernel, bias}, f_k/kernel, f_v/{kernel, bias}, f_c/{kernel, bias}}
  {image,text}/block_{i}/f_mlp/{ln, f_1/{kernel, bias}, f_2/{kernel, bias}}
  {image,text}/output/{ln/{scale, bias}, f/kernel [W, n_embd]}
With `scan_layers` the `block_{i}` subtrees of a tower are one `block/...`, stacked on a leading
'layers' axis (models/layout.py converts).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from glide_jax.models import layers, layout

Dtype = layers.Dtype

# The reference's own constants (`encoders.py`): CLIP's mean/std in 0-255 units. They differ from
# 255 * (0.48145466, 0.4578275, 0.40821073) / (0.26862954, 0.26130258, 0.27577711) in the 7th digit;
# we keep the reference's digits so a checkpoint sees exactly the inputs it was trained on.
IMAGE_CHANNEL_MEANS = (122.77093945, 116.74601272, 104.09373519)
IMAGE_CHANNEL_STDS = (68.50053285, 66.63215831, 70.32316309)

# `[G] clip/config.yaml`: the released noised CLIP (ViT-B-like image tower).
_RELEASED = {
    "logit_scale": 100.0,
    "beta_schedule": "squaredcos_cap_v2",
    "n_timesteps": 1000,
    "image_size": 64,
    "patch_size": 4,
    "n_vocab": 65536,
    "max_text_len": 77,
    "n_embd": 512,
    "n_head_state_text": 64,
    "n_head_text": 8,
    "n_xf_blocks_text": 12,
    "n_head_state_image": 64,
    "n_head_image": 12,
    "n_xf_blocks_image": 12,
}

CLIP_PRESETS: dict[str, dict] = {
    "clip": dict(_RELEASED),
    # The paper ([P] section 6) only says "ViT-L" for its own noised CLIP. We take ViT-L/14's sizes
    # from the CLIP paper (image tower 24 x 1024, 16 heads; text tower 12 x 768, 12 heads;
    # embedding 768) and keep GLIDE's 64 px input, 4 px patches, vocabulary and context.
    "clip-full": dict(_RELEASED, n_embd=768,
                      n_head_image=16, n_xf_blocks_image=24, n_head_state_image=64,
                      n_head_text=12, n_xf_blocks_text=12, n_head_state_text=64),
}

LOG_100 = math.log(100.0)  # the reference's fixed logit scale, log(100)

# Options a tower may take per tower (`n_head_text`) or shared by both towers (`n_head`, as in
# the reference dumps); the per-tower name wins.
_TOWER_OPTIONS = ("n_head", "n_xf_blocks", "n_head_state")
# Ours (not the reference's): `scan_layers`, both towers' blocks under nn.scan (models/layout.py);
# `attention_impl`, the kernel of every attention (layers.attention, runtime only).
_KNOWN_OPTIONS = (set(_RELEASED) | set(_TOWER_OPTIONS) | {"n_timestep", "scan_layers", "attention_impl"})


def resolve_clip_options(options: dict | None) -> dict:
  """Fills missing options with the released values; returns every option per tower.

  Accepts the reference's `config.yaml` names, the shared `n_head`/`n_xf_blocks`/`n_head_state` and
  `n_timestep` spellings used by the dumps; any other key is an error naming it.
  """
  options = dict(options or {})
  unknown = sorted(set(options) - _KNOWN_OPTIONS)
  if unknown:
    raise ValueError(f"unknown noised CLIP option(s) {unknown}; known: {sorted(_KNOWN_OPTIONS)}")
  if "n_timestep" in options:
    if "n_timesteps" in options and int(options["n_timesteps"]) != int(options["n_timestep"]):
      raise ValueError(f"n_timesteps={options['n_timesteps']} and n_timestep={options['n_timestep']} disagree")
    options["n_timesteps"] = options.pop("n_timestep")
  out = {k: options.get(k, v) for k, v in _RELEASED.items() if not k.endswith(("_text", "_image"))}
  for tower in ("text", "image"):
    for name in _TOWER_OPTIONS:
      key = f"{name}_{tower}"
      out[key] = int(options.get(key, options.get(name, _RELEASED[key])))
  for key in ("n_timesteps", "image_size", "patch_size", "n_vocab", "max_text_len", "n_embd"):
    out[key] = int(out[key])
  out["logit_scale"] = float(out["logit_scale"])
  out["scan_layers"] = bool(options.get("scan_layers", False))
  out["attention_impl"] = layers.attention_impl_option(options.get("attention_impl"))
  if out["image_size"] % out["patch_size"]:
    raise ValueError(f"image_size {out['image_size']} is not a multiple of patch_size {out['patch_size']}")
  return out


class AttentionResblock(nn.Module):
  """`f_attn`: x + f_c(attn(ln(x))), with f_q/f_v biased and f_k unbiased (the reference's choice)."""
  width: int
  heads: int
  n_resblocks: int
  causal: bool = False
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None  # layers.attention's implementation

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, L, W] -> [B, L, W]."""
    b, length, _ = x.shape
    std = 1 / math.sqrt(self.width)
    r = layers.LayerNorm(name="ln")(x)

    def proj(name, use_bias):
      h = layers.Dense(self.width, names=("embed", "qkv"), use_bias=use_bias, dtype=self.dtype,
                       kernel_init=nn.initializers.normal(std), name=name)(r)
      # Heads are contiguous channel slices: view (B, L, heads, ch), as the reference.
      return h.reshape(b, length, self.heads, self.width // self.heads)

    q, k, v = proj("f_q", True), proj("f_k", False), proj("f_v", True)
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None] if self.causal else None
    # layers.attention scales q and k each by ch**-0.25 (= sqrt(qk_scale)) and softmaxes in float32.
    h = layers.attention(q, k, v, mask=mask, implementation=self.attention_impl).reshape(b, length, self.width)
    h = layers.constrain(h, ("batch", "act_length", "qkv"))
    out_std = 1 / math.sqrt(self.width * self.n_resblocks ** 2)
    h = layers.Dense(self.width, names=("qkv", "embed"), dtype=self.dtype,
                     kernel_init=nn.initializers.normal(out_std), name="f_c")(h)
    return x + h


class FullyConnectedResblock(nn.Module):
  """`f_mlp`: x + f_2(gelu(f_1(ln(x)))), 4x hidden width, exact (erf) GELU as torch F.gelu."""
  width: int
  n_resblocks: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    r = layers.LayerNorm(name="ln")(x)
    h = layers.Dense(4 * self.width, names=("embed", "mlp"), dtype=self.dtype,
                     kernel_init=nn.initializers.normal(math.sqrt(2 / (4 * self.width))), name="f_1")(r)
    h = layers.constrain(h, ("batch", "act_length", "mlp"))
    h = nn.gelu(h, approximate=False)
    out_std = 1 / math.sqrt(self.width * self.n_resblocks ** 2)
    h = layers.Dense(self.width, names=("mlp", "embed"), dtype=self.dtype,
                     kernel_init=nn.initializers.normal(out_std), name="f_2")(h)
    return x + h


class TransformerBlock(nn.Module):
  width: int
  heads: int
  n_resblocks: int
  causal: bool = False
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = AttentionResblock(self.width, self.heads, self.n_resblocks, self.causal, self.dtype,
                          self.attention_impl, name="f_attn")(x)
    x = FullyConnectedResblock(self.width, self.n_resblocks, self.dtype, name="f_mlp")(x)
    return layers.constrain(x, ("batch", "act_length", "act_embed"))


def _check_heads(width: int, heads: int, tower: str):
  if heads < 1 or width % heads:
    raise ValueError(f"{tower} tower: width {width} is not divisible by {heads} heads")


class ImageEmbedding(nn.Module):
  """`blocks.input` of the image tower: pixels (0-255 units) and timesteps -> [B, 1 + n^2, W]."""
  image_size: int
  patch_size: int
  width: int
  n_timestep: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
    """x: [B, H, W, 3] in 0..255 (float32); t: [B] int -> [B, 1 + (H/p)^2, W] float32."""
    n_patch = self.image_size // self.patch_size
    mean = jnp.asarray(IMAGE_CHANNEL_MEANS, jnp.float32)
    std = jnp.asarray(IMAGE_CHANNEL_STDS, jnp.float32)
    x = (x.astype(jnp.float32) - mean) / std
    patch_init = nn.initializers.normal(math.sqrt(2 / (self.width * self.patch_size ** 2)))
    x = layers.Conv(self.width, kernel_size=self.patch_size, strides=self.patch_size, padding="VALID",
                    use_bias=False, dtype=self.dtype, kernel_init=patch_init, name="patch_proj")(x)
    # NHWC [B, h, w, W] -> [B, h*w, W] is row-major over h then w, the order of the reference's
    # reshape of its NCHW conv output to (B, W, h*w).
    x = x.reshape(x.shape[0], n_patch * n_patch, self.width).astype(jnp.float32)
    init = nn.initializers.normal(1 / math.sqrt(self.width))
    w_t = self.param("w_t", layers.with_names(init, ("timesteps", "embed")), (self.n_timestep, self.width), jnp.float32)
    w_pos = self.param("w_pos", layers.with_names(init, ("length", "embed")), (1 + n_patch ** 2, self.width), jnp.float32)
    # The noised CLIP's "class token" is a per-timestep embedding (t = the ORIGINAL 0..T-1 step).
    sot = jnp.take(w_t, t.astype(jnp.int32), axis=0)[:, None]
    x = jnp.concatenate([sot, x], axis=1) + w_pos[None]
    return layers.LayerNorm(name="ln")(x)


class TextEmbedding(nn.Module):
  """`blocks.input` of the text tower: tokens [B, L] -> w_voc[tokens] + w_pos[:L], [B, L, W] float32."""
  n_vocab: int
  n_context: int
  width: int

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    w_voc = self.param("w_voc", layers.with_names(nn.initializers.normal(0.02), ("vocab", "embed")),
                       (self.n_vocab, self.width), jnp.float32)
    w_pos = self.param("w_pos", layers.with_names(nn.initializers.normal(0.01), ("length", "embed")),
                       (self.n_context, self.width), jnp.float32)
    # The tower is causal, so a context shorter than max_text_len gives the same features as
    # padding it out: we accept L <= max_text_len and use the first L positions.
    return jnp.take(w_voc, tokens, axis=0) + w_pos[None, : tokens.shape[1]]


class FeatureExtractor(nn.Module):
  """`blocks.output`: LN of one pooled token, then `f` (no bias) to the joint embedding."""
  n_embd: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, W] -> [B, n_embd] float32."""
    x = layers.LayerNorm(name="ln")(x)
    # The output axis is the joint embedding, not a tower width: left unnamed (replicated).
    f = layers.Dense(self.n_embd, names=("embed", None), use_bias=False, dtype=self.dtype,
                     kernel_init=nn.initializers.normal(math.sqrt(2 / (x.shape[-1] + self.n_embd))), name="f")
    return f(x).astype(jnp.float32)


class CLIPImageEncoder(nn.Module):
  """image [B, H, W, 3] in [-1, 1], timesteps [B] int -> z_image [B, n_embd] (unnormalised)."""
  image_size: int = 64
  patch_size: int = 4
  width: int = 768
  heads: int = 12
  n_xf_blocks: int = 12
  n_embd: int = 512
  n_timestep: int = 1000
  dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = False  # the blocks under nn.scan: one stacked `block/` subtree
  attention_impl: str | None = None  # layers.attention's implementation

  @nn.compact
  def __call__(self, image: jax.Array, timesteps: jax.Array) -> jax.Array:
    _check_heads(self.width, self.heads, "image")
    s = self.image_size
    if image.ndim != 4 or image.shape[1:] != (s, s, 3):
      raise ValueError(f"image must be [B, {s}, {s}, 3] (NHWC, in [-1, 1]), got {image.shape}")
    if timesteps.shape != image.shape[:1]:
      raise ValueError(f"timesteps must be [B] = {image.shape[:1]}, got {timesteps.shape}")
    # `CLIPModel.image_embeddings` feeds (x + 1) * 127.5 to the encoder.
    x = (image.astype(jnp.float32) + 1) * 127.5
    h = ImageEmbedding(s, self.patch_size, self.width, self.n_timestep, self.dtype, name="input")(x, timesteps)
    h = layers.constrain(h, ("batch", "act_length", "act_embed"))
    # n_resblocks = 2 * n_xf_blocks in the reference (it only sets init scales).
    h = layout.repeat_blocks(TransformerBlock, (self.width, self.heads, 2 * self.n_xf_blocks, False, self.dtype,
                                                self.attention_impl), h,
                             length=self.n_xf_blocks, name="block", scan=self.scan_layers,
                             remat_policy=self.remat_policy)
    return FeatureExtractor(self.n_embd, self.dtype, name="output")(h[:, 0])


class CLIPTextEncoder(nn.Module):
  """tokens [B, L] int (L <= max_text_len), text_len [B] int -> z_text [B, n_embd] (unnormalised).

  Layout (`SimpleTokenizer.padded_tokens_and_len`): [SOT] + tokens + [EOT], zero-padded;
  text_len counts SOT and EOT, and the features are taken at position text_len - 1 (the EOT).
  """
  n_vocab: int = 65536
  max_text_len: int = 77
  width: int = 512
  heads: int = 8
  n_xf_blocks: int = 12
  n_embd: int = 512
  dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = False
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, tokens: jax.Array, text_len: jax.Array) -> jax.Array:
    _check_heads(self.width, self.heads, "text")
    if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= self.max_text_len:
      raise ValueError(f"tokens must be [B, L] with L <= max_text_len={self.max_text_len}, got {tokens.shape}")
    if text_len.shape != tokens.shape[:1]:
      raise ValueError(f"text_len must be [B] = {tokens.shape[:1]}, got {text_len.shape}")
    h = TextEmbedding(self.n_vocab, self.max_text_len, self.width, name="input")(tokens)
    h = layers.constrain(h, ("batch", "act_length", "act_embed"))
    h = layout.repeat_blocks(TransformerBlock, (self.width, self.heads, 2 * self.n_xf_blocks, True, self.dtype,
                                                self.attention_impl), h,
                             length=self.n_xf_blocks, name="block", scan=self.scan_layers,
                             remat_policy=self.remat_policy)
    # Pool at the last real token. text_len 0 (which the reference tokenizer never makes, as it
    # always adds SOT and EOT) would index -1; we clamp to position 0 instead of wrapping around.
    index = jnp.clip(text_len.astype(jnp.int32) - 1, 0, tokens.shape[1] - 1)
    pooled = jnp.take_along_axis(h, index[:, None, None], axis=1)[:, 0]
    return FeatureExtractor(self.n_embd, self.dtype, name="output")(pooled)


class NoisedCLIP(nn.Module):
  """Both towers; `init` through `__call__` creates the parameters of both.

  `logit_scale` is the LOG of the score scale (the reference fixes it at log(100); not a parameter).
  """
  image_size: int = 64
  patch_size: int = 4
  n_timestep: int = 1000
  image_width: int = 768
  image_heads: int = 12
  image_blocks: int = 12
  n_vocab: int = 65536
  max_text_len: int = 77
  text_width: int = 512
  text_heads: int = 8
  text_blocks: int = 12
  n_embd: int = 512
  logit_scale: float = LOG_100
  dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = False
  attention_impl: str | None = None  # layers.attention's implementation, in both towers

  def setup(self):
    self.image = CLIPImageEncoder(self.image_size, self.patch_size, self.image_width, self.image_heads,
                              self.image_blocks, self.n_embd, self.n_timestep, self.dtype, self.remat_policy,
                              self.scan_layers, self.attention_impl)
    self.text = CLIPTextEncoder(self.n_vocab, self.max_text_len, self.text_width, self.text_heads,
                            self.text_blocks, self.n_embd, self.dtype, self.remat_policy, self.scan_layers,
                            self.attention_impl)

  def encode_image(self, image: jax.Array, timesteps: jax.Array) -> jax.Array:
    """image [B, H, W, 3] in [-1, 1], timesteps [B] int (original 0..T-1) -> [B, n_embd] float32."""
    return self.image(image, timesteps)

  def encode_text(self, tokens: jax.Array, text_len: jax.Array) -> jax.Array:
    """tokens [B, L] int, text_len [B] int -> [B, n_embd] float32."""
    return self.text(tokens, text_len)

  def __call__(self, image: jax.Array, timesteps: jax.Array, tokens: jax.Array,
               text_len: jax.Array) -> tuple[jax.Array, jax.Array]:
    """-> (z_image [B, n_embd], z_text [B', n_embd]), both unnormalised."""
    return self.encode_image(image, timesteps), self.encode_text(tokens, text_len)


def create_clip_model(options: dict | None = None, dtype: Dtype = jnp.float32,
                      remat_policy: str = "none") -> NoisedCLIP:
  """Builds the noised CLIP from the reference's option names (`config.yaml`, or the dumps' shared
  `n_head`/`n_xf_blocks`/`n_head_state`/`n_timestep`); missing options take the released values."""
  o = resolve_clip_options(options)
  return NoisedCLIP(
      image_size=o["image_size"], patch_size=o["patch_size"], n_timestep=o["n_timesteps"],
      image_width=o["n_head_image"] * o["n_head_state_image"], image_heads=o["n_head_image"],
      image_blocks=o["n_xf_blocks_image"],
      n_vocab=o["n_vocab"], max_text_len=o["max_text_len"],
      text_width=o["n_head_text"] * o["n_head_state_text"], text_heads=o["n_head_text"],
      text_blocks=o["n_xf_blocks_text"],
      n_embd=o["n_embd"], logit_scale=math.log(o["logit_scale"]), dtype=dtype, remat_policy=remat_policy,
      scan_layers=o["scan_layers"], attention_impl=o["attention_impl"])


def normalise(z: jax.Array) -> jax.Array:
  """z / (||z|| + 1e-12) over the last axis, as the reference (not an eps inside the sqrt)."""
  return z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + 1e-12)


def clip_score(z_text: jax.Array, z_image: jax.Array, logit_scale: float | jax.Array = LOG_100) -> jax.Array:
  """exp(logit_scale) * cos(z_text, z_image): [B, D], [B, D] -> [B]; 100 * cosine by default."""
  return jnp.exp(logit_scale) * jnp.sum(normalise(z_text) * normalise(z_image), axis=-1)


def _params_of(params: Any) -> dict:
  """Accepts either the params tree or the full variables dict {'params': ...}."""
  return params.get("params", params)


def guidance_grad(model: NoisedCLIP, params: Any, image: jax.Array, timesteps: jax.Array,
                  z_text: jax.Array, logit_scale: float | jax.Array | None = None) -> jax.Array:
  """d/d image of sum_b clip_score(z_text[b], encode_image(image, t)[b]) (`CLIPModel.cond_fn`).

  image: [B, H, W, 3] in [-1, 1]; timesteps: [B] original steps; z_text: [B, D] (held constant).
  Returns [B, H, W, 3] float32. Multiply by the guidance scale outside.
  """
  scale = model.logit_scale if logit_scale is None else logit_scale
  variables = {"params": _params_of(params)}
  z_text = jax.lax.stop_gradient(z_text)

  def total_score(x):
    z_image = model.apply(variables, x, timesteps, method=NoisedCLIP.encode_image)
    return jnp.sum(clip_score(z_text, z_image, scale))

  return jax.grad(total_score)(image.astype(jnp.float32))


def contrastive_loss(z_image: jax.Array, z_text: jax.Array,
                     logit_scale: float | jax.Array = LOG_100) -> jax.Array:
  """CLIP's symmetric cross-entropy over the batch: the i-th image belongs with the i-th text.

  z_image, z_text: [B, D] unnormalised; logits = exp(logit_scale) * normalise(z_image) @ normalise(z_text).T.
  Returns the scalar mean of the image->text and text->image cross-entropies.
  """
  if z_image.shape != z_text.shape or z_image.ndim != 2:
    raise ValueError(f"z_image and z_text must both be [B, D], got {z_image.shape} and {z_text.shape}")
  zi = normalise(z_image.astype(jnp.float32))
  zt = normalise(z_text.astype(jnp.float32))
  logits = jnp.exp(logit_scale) * zi @ zt.T
  diag = jnp.diagonal(logits)
  loss_i = jnp.mean(jax.nn.logsumexp(logits, axis=1) - diag)
  loss_t = jnp.mean(jax.nn.logsumexp(logits, axis=0) - diag)
  return 0.5 * (loss_i + loss_t)


def count_params(tree: Any) -> int:
  """Number of scalars in a (possibly abstract, possibly boxed) parameter tree."""
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.meta.unbox(tree)))


__all__: list[str] = ["CLIP_PRESETS", "CLIPImageEncoder", "CLIPTextEncoder", "NoisedCLIP", "clip_score",
    "contrastive_loss", "count_params", "create_clip_model", "guidance_grad", "normalise", "resolve_clip_options"]
