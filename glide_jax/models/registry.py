"""Build models from glide-text2im option names (`[G] model_creation.py`), and the named presets.

  create_model("text2im", {"num_channels": 64}, dtype=jnp.bfloat16)
  create_model(*PRESETS["upsample"])
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from glide_jax.models import layers
from glide_jax.models.unet import KINDS, UNet

# `model_and_diffusion_defaults()` of the released base model (plus n_vocab, fixed by its tokenizer).
BASE_DEFAULTS: dict[str, Any] = dict(
    image_size=64, num_channels=192, num_res_blocks=3, channel_mult="", num_heads=1,
    num_head_channels=64, num_heads_upsample=-1, attention_resolutions="32,16,8", dropout=0.1,
    text_ctx=128, xf_width=512, xf_layers=16, xf_heads=8, xf_final_ln=True, xf_padding=True,
    use_scale_shift_norm=True, resblock_updown=True, n_vocab=50257,
    diffusion_steps=1000, noise_schedule="squaredcos_cap_v2", timestep_respacing="", use_fp16=True,
    cache_text_emb=False, inpaint=False, super_res=False,
    input_pos_emb=False,  # ours, not the reference's: see UNet.input_pos_emb
    xf_token_init_std=0.02,  # initialisation only (TextEncoder.token_init_std)
    scan_layers=False,  # ours: the text encoder's blocks under nn.scan (params stacked, models/layout.py)
    guidance_embed=False,  # ours: the guidance scale as an input (distilled students; UNet.guidance_embed)
    attention_impl=None)  # ours, runtime only: None/'xla' lets XLA choose, 'cudnn' (GPU), 'flash' (TPU Pallas) (layers.attention)
# `model_and_diffusion_defaults_upsampler()`.
UPSAMPLE_DEFAULTS: dict[str, Any] = {**BASE_DEFAULTS, "image_size": 256, "num_res_blocks": 2,
                                     "noise_schedule": "linear", "super_res": True}
# Options that configure the diffusion or the torch runtime; accepted and ignored by the model.
_NON_MODEL = {"diffusion_steps", "noise_schedule", "timestep_respacing", "use_fp16", "cache_text_emb",
              "inpaint", "super_res"}

ALIASES = {"base": "text2im", "base_inpaint": "inpaint", "base-inpaint": "inpaint",
           "upsample-inpaint": "upsample_inpaint", "clip": "noised_clip"}

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    # The four released GLIDE (filtered) checkpoints.
    "base": ("text2im", {}),
    "upsample": ("upsample", {}),
    "base-inpaint": ("inpaint", {}),
    "upsample-inpaint": ("upsample_inpaint", {}),
    # The released noised CLIP (empty options = its released values, glide_jax.models.clip).
    "clip": ("noised_clip", {}),
    # The paper's unreleased sizes ([P] 4.1): ADM-64 at width 512 + a 24-block, 2048-wide text
    # transformer (3.5B); the upsampler at 384 channels with a 1024-wide text transformer (1.5B).
    "base-full": ("text2im", dict(num_channels=512, xf_width=2048, xf_layers=24, xf_heads=32)),
    "upsample-full": ("upsample", dict(num_channels=384, xf_width=1024, xf_layers=16, xf_heads=16)),
}


def canonical_kind(kind: str) -> str:
  kind = ALIASES.get(kind, kind)
  if kind not in KINDS + ("noised_clip",):
    raise ValueError(f"unknown model kind {kind!r}; choose from {KINDS + ('noised_clip',)} "
                     f"or an alias {sorted(ALIASES)}")
  return kind


def defaults_for(kind: str) -> dict[str, Any]:
  kind = canonical_kind(kind)
  base = UPSAMPLE_DEFAULTS if kind in ("upsample", "upsample_inpaint") else BASE_DEFAULTS
  return {**base, "inpaint": kind in ("inpaint", "upsample_inpaint")}


def resolve_options(kind: str, options: Mapping[str, Any] | None = None, **overrides) -> dict[str, Any]:
  """The released defaults for `kind`, updated by `options` then `overrides`; unknown names are refused."""
  full = defaults_for(kind)
  given = {**dict(options or {}), **overrides}
  unknown = sorted(set(given) - set(full))
  if unknown:
    raise ValueError(f"unknown model option(s) {unknown}; known: {sorted(full)}")
  full.update(given)
  kind = canonical_kind(kind)
  if bool(full["inpaint"]) != (kind in ("inpaint", "upsample_inpaint")):
    raise ValueError(f"option inpaint={full['inpaint']} contradicts kind {kind!r}")
  if "super_res" in given and bool(full["super_res"]) != (kind in ("upsample", "upsample_inpaint")):
    raise ValueError(f"option super_res={full['super_res']} contradicts kind {kind!r}")
  return full


def channel_mult_for(image_size: int, channel_mult: str | tuple[int, ...]) -> tuple[int, ...]:
  """'' picks the reference's per-size default; '1,2,2' is parsed."""
  if isinstance(channel_mult, (tuple, list)):
    return tuple(int(m) for m in channel_mult)
  if channel_mult == "":
    auto = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
    if image_size not in auto:
      raise ValueError(f"no default channel_mult for image_size {image_size}; pass channel_mult")
    return auto[image_size]
  return tuple(int(m) for m in str(channel_mult).split(","))


def attention_ds_for(image_size: int, attention_resolutions: str | tuple[int, ...]) -> tuple[int, ...]:
  """Pixel resolutions "32,16,8" -> downsample rates image_size // res."""
  if isinstance(attention_resolutions, str):
    res = [int(r) for r in attention_resolutions.split(",") if r.strip()]
  else:
    res = [int(r) for r in attention_resolutions]
  return tuple(image_size // r for r in res)


def attention_impl_of(options: Mapping[str, Any]) -> str | None:
  """The `attention_impl` option ('' and None both let XLA choose), checked against layers.ATTENTION_IMPLS."""
  return layers.attention_impl_option(options.get("attention_impl"))


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str, what: str = "compute dtype") -> Any:
  """'float32' | 'bfloat16' -> the jnp dtype a model computes in (config's model.dtype, the CLI's
  --dtype); `what` names the setting in the error."""
  try:
    return COMPUTE_DTYPES[name]
  except KeyError:
    raise ValueError(f"{what} must be 'float32' or 'bfloat16', got {name!r}") from None


def create_model(kind: str, options: Mapping[str, Any] | None = None, dtype: Any = jnp.float32,
                 remat_policy: str = "none", **overrides):
  """A Flax module for `kind` (text2im | upsample | inpaint | upsample_inpaint | noised_clip or an alias).

  `options` uses glide-text2im's names; missing ones take the released defaults of that kind.
  """
  kind = canonical_kind(kind)
  if kind == "noised_clip":
    try:
      from glide_jax.models.clip import create_clip_model
    except ImportError as e:
      raise ImportError(f"the noised CLIP model (glide_jax/models/clip.py) is not available: {e}") from e
    return create_clip_model({**dict(options or {}), **overrides}, dtype, remat_policy=remat_policy)
  o = resolve_options(kind, options, **overrides)
  size = int(o["image_size"])
  return UNet(
      kind=kind, model_channels=int(o["num_channels"]), channel_mult=channel_mult_for(size, o["channel_mult"]),
      num_res_blocks=int(o["num_res_blocks"]), attention_ds=attention_ds_for(size, o["attention_resolutions"]),
      num_heads=int(o["num_heads"]), num_head_channels=int(o["num_head_channels"]),
      num_heads_upsample=int(o["num_heads_upsample"]), dropout=float(o["dropout"]),
      use_scale_shift_norm=bool(o["use_scale_shift_norm"]), resblock_updown=bool(o["resblock_updown"]),
      n_vocab=int(o["n_vocab"]), text_ctx=int(o["text_ctx"]), xf_width=int(o["xf_width"]),
      xf_layers=int(o["xf_layers"]), xf_heads=int(o["xf_heads"]), xf_final_ln=bool(o["xf_final_ln"]),
      xf_padding=bool(o["xf_padding"]), input_pos_emb=bool(o["input_pos_emb"]),
      xf_token_init_std=float(o["xf_token_init_std"]), dtype=dtype,
      remat_policy=remat_policy, scan_layers=bool(o["scan_layers"]),
      attention_impl=attention_impl_of(o), guidance_embed=bool(o["guidance_embed"]))


def preset(name: str) -> tuple[str, dict[str, Any]]:
  """(kind, options) of a named preset; the noised CLIP ones come from glide_jax.models.clip.CLIP_PRESETS."""
  if name in PRESETS and PRESETS[name][0] != "noised_clip":
    kind, options = PRESETS[name]
    return kind, dict(options)
  from glide_jax.models.clip import CLIP_PRESETS
  if name in CLIP_PRESETS:
    return "noised_clip", dict(CLIP_PRESETS[name])
  raise ValueError(f"unknown preset {name!r}; choose from {sorted(set(PRESETS) | set(CLIP_PRESETS))}")


def image_size_of(kind: str, options: Mapping[str, Any] | None = None) -> int:
  return int(resolve_options(kind, options)["image_size"])


def param_shapes(kind: str, options: Mapping[str, Any] | None = None, **overrides):
  """The (unboxed) parameter tree of a model as jax.ShapeDtypeStructs, without allocating it."""
  import flax.linen as nn
  import jax

  model = create_model(kind, options, **overrides)
  if canonical_kind(kind) == "noised_clip":
    raise ValueError("param_shapes covers the U-Net kinds; use glide_jax.models.clip for the noised CLIP")
  inputs = model.dummy_inputs(1, image_size_of(kind, {**dict(options or {}), **overrides}))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), **inputs))
  return nn.meta.unbox(variables["params"])
