"""The four training stages. They share the loop and the step and differ only here: which model,
which batch keys, and the loss.

  base      text2im U-Net, hybrid diffusion loss, caption dropout (CFG)
  upsample  upsampler U-Net conditioned on `low_res`, hybrid loss, no caption dropout by default;
            with diffusion.upsample_residual, the diffused image is image - up(low_res)
  inpaint   inpainting U-Net fed `image * inpaint_mask` and the mask, hybrid loss
  clip      noised CLIP: images noised with the base schedule at uniform t, symmetric contrastive
            loss over the whole global batch (the logits matrix spans every device)
  distill   a text2im student with the guidance scale as an input (guidance_embed), distilled from a
            frozen teacher held in the train state: the guided teacher (phase 1), then progressive
            halving of its DDIM steps (phase 2); glide_jax/diffusion/distillation.py

`loss(params, batch, rng) -> (scalar, aux)`; `batch` has the data keys plus `t`, `weights` and
`noise` [B, H, W, 3] from the step; aux values are per-example [b] arrays. The distill stage's loss
also takes `teacher=` (the frozen teacher's parameters) and `step=` (the state's step), and its
batch the empty caption (`uncond_tokens`, `uncond_mask`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from glide_jax import settings
from glide_jax.constants import STAGES
from glide_jax.diffusion import distillation, gaussian, guidance
from glide_jax.diffusion.losses import training_losses
from glide_jax.diffusion.residual import residual_of, upsample_base
from glide_jax.diffusion.schedules import Diffusion, diffusion_from_settings
from glide_jax.models import registry

STAGE_KINDS = {"base": ("text2im",), "upsample": ("upsample",), "inpaint": ("inpaint", "upsample_inpaint"),
               "clip": ("noised_clip",), "distill": ("text2im",)}

# The `distill` section's keys and defaults (configs/shapes_distill.py declares them all).
DISTILL_DEFAULTS = {"guidance_steps": 0, "start_steps": 16, "final_steps": 4, "steps_per_round": 0,
                    "guidance_min": 1.0, "guidance_max": 4.0, "clip_x0": True}


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
  distill: distillation.DistillSchedule | None = None  # the distill stage: a teacher in the state


def _dtype(name: str):
  return registry.compute_dtype(name, "model.dtype")


def _diffusion_loss(model, diffusion, extra_keys, residual: str = "", vb_weight: float = 1.0,
                    min_snr_gamma: float = 0.0):
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

    terms = training_losses(diffusion, model_fn, x_start, batch["t"], batch["noise"], vb_weight, min_snr_gamma)
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


def distill_settings(config: Any):
  """The config's `distill` section over DISTILL_DEFAULTS (an unknown key refused by name)."""
  return settings.section(config.get("distill"), DISTILL_DEFAULTS, "distill")


def distill_schedule(config: Any) -> distillation.DistillSchedule:
  d = distill_settings(config)
  return distillation.DistillSchedule(int(d.guidance_steps), int(d.start_steps), int(d.final_steps),
                                      int(d.steps_per_round), int(config.diffusion.steps))


def _distill_loss(model, diffusion, schedule: distillation.DistillSchedule, d):
  """Phase 1 (step < guidance_steps): MSE between the student's output (all channels, with w as an
  input) and the teacher's guided output at the step's x_t (`guidance.cfg_combine` of its conditional
  and unconditional outputs). Phase 2: Salimans & Ho's x0 target of two teacher DDIM steps, the x0
  error weighted by max(SNR, 1). The teacher is frozen (stop_gradient) and in eval mode.

  Both phases are one computation: two teacher calls and one student call, their inputs chosen by
  the phase with `where` (phase 1: x_t with the caption, then x_t with the empty caption; phase 2:
  z_tau, then the teacher's first DDIM step z_mid, both with the caption). A `lax.cond` between two
  phase bodies made the demo's step 15 times slower on XLA:CPU."""
  abar_ext = distillation.extended_alphas_cumprod(diffusion)
  w_lo, w_hi, clip = float(d.guidance_min), float(d.guidance_max), bool(d.clip_x0)
  only = "guidance" if schedule.rounds == 0 else "progressive" if schedule.guidance_steps == 0 else None

  def loss(params, batch, rng, *, teacher, step):
    image, tokens, mask, noise = batch["image"], batch["tokens"], batch["mask"], batch["noise"]
    b, c = image.shape[0], image.shape[-1]
    k_w, k_drop = jax.random.split(rng)
    w = jax.random.uniform(k_w, (b,), jnp.float32, w_lo, w_hi)
    tvars = {"params": jax.lax.stop_gradient(teacher)}
    guided = jnp.asarray(only == "guidance") if only else step < schedule.guidance_steps
    sel = lambda p1, p2: jax.tree.map(lambda u, v: jnp.where(guided, u, v), p1, p2)

    def teacher_apply(x, t_model, text):
      return model.apply(tvars, x, t_model, text_cond=text, guidance=w)

    def teacher_x0(x, out, abar):
      x0 = distillation.x0_from_v(x, out[..., :c], abar)
      return jnp.clip(x0, -1, 1) if clip else x0

    # phase 1's point: x_t at the step's t; phase 2's: z at the student step's grid point tau
    x_t = gaussian.q_sample(diffusion, image, batch["t"], noise)
    t_model = gaussian.model_timesteps(diffusion, batch["t"])
    r = jnp.maximum(schedule.round_index(step), 0)
    tau, tau_mid, tau_end = schedule.student_times(batch["t"], r)
    a, a_mid, a_end = abar_ext[tau], abar_ext[tau_mid], abar_ext[tau_end]
    z = distillation._bcast(jnp.sqrt(a), image) * image + distillation._bcast(jnp.sqrt(1 - a), image) * noise
    x_in, t_in = sel(x_t, z), sel(t_model, tau - 1)

    text_c = model.apply(tvars, tokens, mask, method="encode_text")
    text_u = model.apply(tvars, batch["uncond_tokens"], batch["uncond_mask"], method="encode_text")
    out_a = teacher_apply(x_in, t_in, text_c)
    z_mid = distillation.ddim_move(z, teacher_x0(z, out_a, a), a, a_mid)
    out_b = teacher_apply(sel(x_t, z_mid), sel(t_model, tau_mid - 1), sel(text_u, text_c))
    z_end = distillation.ddim_move(z_mid, teacher_x0(z_mid, out_b, a_mid), a_mid, a_end)
    target_1 = guidance.cfg_combine(out_a, out_b, w[:, None, None, None], c)
    target_2 = distillation.x_target(z, z_end, a, a_end)

    out = model.apply({"params": params}, x_in, t_in, tokens, mask, guidance=w, train=True,
                      rngs={"dropout": k_drop})
    err_1 = jnp.mean(jnp.square(out - jax.lax.stop_gradient(target_1)), axis=(1, 2, 3))
    x0 = distillation.x0_from_v(z, out[..., :c], a)
    err_2 = jnp.mean(jnp.square(x0 - jax.lax.stop_gradient(target_2)), axis=(1, 2, 3))
    err = jnp.where(guided, err_1, err_2)
    per_example = jnp.where(guided, err_1, distillation.truncated_snr_weight(a) * err_2)
    total = jnp.mean(per_example * batch["weights"])
    rnd = jnp.broadcast_to(schedule.round_index(step).astype(jnp.float32), (b,))
    return total, {"losses": per_example, "mse": err, "round": rnd, "guidance": w}
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
  if name == "distill":
    from glide_jax.diffusion.schedules import prediction_of
    if not bool(options.get("guidance_embed", False)):
      raise ValueError("the distill stage's student takes the guidance scale as an input: set "
                       "model.options.guidance_embed=True")
    if prediction_of(config.diffusion) != "v":
      raise ValueError(f"the distill stage distils v-prediction models (Salimans & Ho's targets); "
                       f"diffusion.prediction={prediction_of(config.diffusion)!r}")
    d = distill_settings(config)
    if not float(d.guidance_min) <= float(d.guidance_max):
      raise ValueError(f"distill.guidance_min={d.guidance_min} must be <= distill.guidance_max={d.guidance_max}")
    schedule = distill_schedule(config)

    def init(rng):
      return model.init({"params": rng, "dropout": rng}, **model.dummy_inputs(1, size))["params"]
    return Stage(name, kind, model, diffusion, size, ("image", "tokens", "mask"), True, init,
                 _distill_loss(model, diffusion, schedule, d), distill=schedule)

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
               _diffusion_loss(model, diffusion, extra, residual, float(config.diffusion.get("vb_weight", 1.0)),
                               float(config.diffusion.get("min_snr_gamma", 0.0))))
