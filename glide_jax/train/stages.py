"""The four training stages. They share the loop and the step and differ only here: which model,
which batch keys, and the loss.

  base      text2im U-Net, hybrid diffusion loss, caption dropout (CFG)
  upsample  upsampler U-Net conditioned on `low_res`, hybrid loss, no caption dropout by default;
            with diffusion.upsample_residual, the diffused image is image - up(low_res)
  inpaint   inpainting U-Net fed `image * inpaint_mask` and the mask, hybrid loss
  clip      noised CLIP: images noised with the base schedule at uniform t, symmetric contrastive
            loss over the whole global batch (the logits matrix spans every device)

`loss(params, batch, rng) -> (scalar, aux)`; `batch` has the data keys plus `t`, `weights` and
`noise` [B, H, W, 3] from the step; aux values are per-example [b] arrays.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from glide_jax.constants import STAGES
from glide_jax.diffusion import gaussian
from glide_jax.diffusion.losses import training_losses
from glide_jax.diffusion.residual import residual_of, upsample_base
from glide_jax.diffusion.schedules import Diffusion, diffusion_from_settings
from glide_jax.models import registry

STAGE_KINDS = {"base": ("text2im",), "upsample": ("upsample",), "inpaint": ("inpaint", "upsample_inpaint"),
               "clip": ("noised_clip",)}


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  kind: str
  model: nn.Module
  diffusion: Diffusion
  image_size: int
  batch_keys: tuple[str, ...]
  uses_text: bool
  init: Callable[[jax.Array], Any]   # rng -> boxed params
  loss: Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


def _dtype(name: str):
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]
  except KeyError:
    raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {name!r}") from None


def _diffusion_loss(model, diffusion, extra_keys, residual: str = ""):
  def loss(params, batch, rng):
    extra = {k: batch[k] for k in extra_keys}
    if "inpaint_mask" in extra:
      extra["inpaint_image"] = batch["image"]
    x_start = batch["image"]
    if residual:  # diffuse image - up(low_res) (diffusion/residual.py); the model's inputs are unchanged
      x_start = x_start - upsample_base(batch["low_res"], x_start.shape[1], residual).astype(x_start.dtype)

    def model_fn(x_t, t_model):
      return model.apply({"params": params}, x_t, t_model, batch["tokens"], batch["mask"], train=True,
                         rngs={"dropout": rng}, **extra)

    terms = training_losses(diffusion, model_fn, x_start, batch["t"], batch["noise"])
    total = jnp.mean(terms["loss"] * batch["weights"])
    return total, {"losses": terms["loss"], "mse": terms["mse"], "vb": terms["vb"]}
  return loss


def _clip_loss(model, diffusion):
  from glide_jax.models.clip import contrastive_loss

  def loss(params, batch, rng):
    del rng
    x_t = gaussian.q_sample(diffusion, batch["image"], batch["t"], batch["noise"])
    t_model = gaussian.model_timesteps(diffusion, batch["t"])
    variables = {"params": params}
    z_image = model.apply(variables, x_t, t_model, method="encode_image")
    text_len = jnp.sum(batch["mask"].astype(jnp.int32), axis=-1)
    z_text = model.apply(variables, batch["tokens"], text_len, method="encode_text")
    total = contrastive_loss(z_image, z_text, model.logit_scale)
    return total, {}
  return loss


def make_stage(config: Any) -> Stage:
  """Builds the stage named by `config.stage` from `config.model` and `config.diffusion`."""
  name = config.stage
  if name not in STAGES:
    raise ValueError(f"config.stage must be one of {STAGES}, got {name!r}")
  kind = registry.canonical_kind(config.model.kind)
  if kind not in STAGE_KINDS[name]:
    raise ValueError(f"config.model.kind={config.model.kind!r} does not fit stage {name!r} "
                     f"(expected one of {STAGE_KINDS[name]})")
  dtype = _dtype(config.model.dtype)
  options = dict(config.model.options)
  model = registry.create_model(kind, options, dtype=dtype, remat_policy=config.model.remat_policy)
  diffusion = diffusion_from_settings(config.diffusion)

  if name == "clip":
    size = int(model.image_size)
    text_len = int(model.max_text_len)

    def init(rng):
      return model.init(rng, jnp.zeros((1, size, size, 3)), jnp.zeros((1,), jnp.int32),
                        jnp.zeros((1, text_len), jnp.int32), jnp.ones((1,), jnp.int32))["params"]
    return Stage(name, kind, model, diffusion, size, ("image", "tokens", "mask"), False, init,
                 _clip_loss(model, diffusion))

  size = registry.image_size_of(kind, options)
  extra: tuple[str, ...] = ()
  if kind in ("upsample", "upsample_inpaint"):
    extra += ("low_res",)
  if kind in ("inpaint", "upsample_inpaint"):
    extra += ("inpaint_mask",)
  low = int(config.data.get("low_res_size", 0) or 0)
  residual = residual_of(config.diffusion)
  if residual and "low_res" not in extra:
    raise ValueError(f"diffusion.upsample_residual={residual!r} needs an upsampler (model.kind upsample or "
                     f"upsample_inpaint), not {kind!r}")

  def init(rng):
    inputs = model.dummy_inputs(1, size)
    if "low_res" in inputs and low:
      inputs["low_res"] = jnp.zeros((1, low, low, 3), jnp.float32)
    return model.init({"params": rng, "dropout": rng}, **inputs)["params"]

  return Stage(name, kind, model, diffusion, size, ("image", "tokens", "mask") + extra, True, init,
               _diffusion_loss(model, diffusion, extra, residual))
