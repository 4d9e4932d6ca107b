"""A loaded model -> samples: encode prompts once, run a compiled sampler with guidance.

`SamplerModel` holds a Flax U-Net, its parameters, a tokenizer (anything with `encode_batch` and
`empty`) and the diffusion settings; `generate` samples from it. Loading one from a bundle, the
cascades and image resizing live a layer up, in `glide_jax/sampling.py`, the module to import for
sampling; this one needs nothing of ours but the diffusion package.

Each (model, sampler, steps, shape, options) compiles once: parameters and conditioning are traced
arguments of one `jit` around one `lax.scan`; the text transformer runs once per batch, before it.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from glide_jax.diffusion import guidance, residual, samplers, schedules

_SAMPLER_ALIASES = {"ddpm": "ancestral", "p_sample": "ancestral", "dpm-solver++": "dpm++", "dpmpp": "dpm++"}


def canonical_sampler(name: str) -> str:
  name = _SAMPLER_ALIASES.get(name, name)
  if name not in samplers.SAMPLERS:
    raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(samplers.SAMPLERS)}")
  return name


@dataclasses.dataclass
class SamplerModel:
  """A U-Net with its parameters, tokenizer and diffusion settings, ready to sample (built from a
  bundle by `sampling.load_sampler_model`, from the train state by the training previews)."""
  kind: str
  model: Any                 # the Flax module
  params: Any                # unboxed parameter tree (device arrays)
  meta: dict
  tokenizer: Any             # has encode_batch / empty, or None
  image_size: int
  diffusion_settings: dict   # steps, noise_schedule, timestep_respacing, sampler, guidance_scale, upsample_temp,
                             # prediction, upsample_residual
  options: dict = dataclasses.field(default_factory=dict)

  @property
  def is_upsampler(self) -> bool:
    return self.kind in ("upsample", "upsample_inpaint")

  @property
  def is_inpaint(self) -> bool:
    return self.kind in ("inpaint", "upsample_inpaint")


def settings_from_config(config: Any) -> dict:
  """The `diffusion` settings of a training config as a bundle records them (`meta['diffusion']`).
  A distill config's students sample on the trailing grid (`timestep_spacing`, see make_diffusion)."""
  out = {"steps": int(config.diffusion.steps), "noise_schedule": config.diffusion.noise_schedule,
         "timestep_respacing": str(config.sampling.steps), "sampler": config.sampling.sampler,
         "guidance_scale": float(config.sampling.guidance_scale),
         "prediction": schedules.prediction_of(config.diffusion),
         "upsample_residual": residual.residual_of(config.diffusion)}
  if config.get("stage") == "distill":
    out["timestep_spacing"] = "trailing"
  return out


def make_diffusion(sm: SamplerModel, respacing: str | int | None = None) -> schedules.Diffusion:
  """The bundle's diffusion respaced by `respacing` (default: the bundle's). Where the settings say
  `timestep_spacing: trailing` (distilled students), a bare count N means 'trailingN', the grid the
  student was distilled on."""
  return diffusion_of_settings(sm.diffusion_settings, respacing)


def diffusion_of_settings(settings: dict, respacing: str | int | None = None) -> schedules.Diffusion:
  """`make_diffusion` for a bundle's diffusion settings (`settings_from_config`'s dict)."""
  respacing = settings.get("timestep_respacing", "") if respacing is None else str(respacing)
  if settings.get("timestep_spacing") == "trailing" and respacing.strip().isdigit():
    respacing = f"trailing{respacing.strip()}"
  return schedules.diffusion_from_settings(settings, respacing)


def check_distilled_steps(sm: SamplerModel, diffusion: schedules.Diffusion, sampler: str) -> None:
  """Warns (once per message) when a progressively distilled student is sampled otherwise than
  with DDIM on the trailing grid of a step count it was distilled for (`meta['distill']`)."""
  distilled = [int(n) for n in (sm.meta.get("distill") or {}).get("distilled_steps") or []]
  n = diffusion.num_timesteps
  if distilled and (sampler != "ddim" or n not in distilled or diffusion.timestep_respacing != f"trailing{n}"):
    warnings.warn(f"this student was distilled for DDIM with {', '.join(map(str, distilled))} steps (trailing "
                  f"grid); sampling it with {sampler} {diffusion.timestep_respacing or n} is outside what it "
                  "learned", UserWarning, stacklevel=3)


# Compiled samplers, shared by every SamplerModel of the same architecture (so loading a bundle twice,
# e.g. one run per prompt file, compiles once). The progress callback is looked up at run time.
_COMPILED: dict[tuple, Callable] = {}
_PROGRESS: list[Callable | None] = [None]


def _report_progress(done):
  if _PROGRESS[0] is not None:
    _PROGRESS[0](done)


def sampling_program(model: Any, diffusion: schedules.Diffusion, shape: tuple[int, ...], *, sampler: str,
                     cfg: bool, low_res: bool = False, inpaint: bool = False, inpaint_inputs: bool = False,
                     upsample_residual: str = "", guided_input: bool = False, clip_module: Any = None,
                     threshold: Any = None, progress: Callable | None = None) -> Callable:
  """The whole sampler of one Flax U-Net as one traceable function, unjitted:

    run(params, tokens, mask, u_tokens, u_mask, low_res_img, inpaint_image, inpaint_mask, rng,
        guidance_scale, temperature, eta, clip_params, clip_z_text, clip_scale) -> images `shape`

  `generate` jits it (`_compiled_sampler`) and `glide-jax export --serialize` exports it, so a served
  sampler computes what `generate` does. Inputs a configuration does not use may be None: u_* without
  `cfg`, low_res_img without `low_res`, the inpaint pair without `inpaint`, clip_* without `clip_module`.
  inpaint: known pixels (inpaint_mask = 1) are written into each predicted x0; inpaint_inputs: the
  model also takes the masked image and the mask (inpainting models). guided_input: a
  guidance-distilled student, w an input, one pass per step on the conditional batch.
  """
  def run(params, tokens, mask, u_tokens, u_mask, low_res_img, inpaint_image, inpaint_mask, rng,
          guidance_scale, temperature, eta, clip_params, clip_z_text, clip_scale):
    variables = {"params": params}
    text = model.apply(variables, tokens, mask, method="encode_text")
    extra = {}
    if low_res:  # on the 8-bit grid, as the training data's low-res images were
      low_res_img = guidance.round_to_uint8(low_res_img)
      extra["low_res"] = low_res_img
    if inpaint and inpaint_inputs:
      extra["inpaint_image"] = inpaint_image * inpaint_mask
      extra["inpaint_mask"] = inpaint_mask
    if guided_input:  # w is an input: one pass per step, no doubled batch
      extra["guidance"] = jnp.full((shape[0],), guidance_scale, jnp.float32)

    def apply_fn(x, t, cond):
      text_cond, kw = cond
      return model.apply(variables, x, t, text_cond=text_cond, **kw).astype(x.dtype)

    if cfg:
      u_text = model.apply(variables, u_tokens, u_mask, method="encode_text")
      model_fn = guidance.cfg_model_fn(apply_fn, (text, extra), (u_text, extra), guidance_scale)
    else:
      model_fn = lambda x, t: apply_fn(x, t, (text, extra))
    denoised_fn = guidance.inpaint_denoised_fn(inpaint_image, inpaint_mask) if inpaint else None
    # With diffusion.upsample_residual the sampler runs on image - up(low_res) (diffusion/residual.py).
    denoised_fn, clip_denoised, finish = residual.sampler_wrapping(upsample_residual, low_res_img, shape[1],
                                                                   denoised_fn)
    cond_fn = None
    if clip_module is not None:
      cond_fn = guidance.clip_cond_fn(clip_module, clip_params, clip_z_text, clip_scale)
    return finish(samplers.sample_loop(model_fn, diffusion, shape, rng, sampler=sampler, denoised_fn=denoised_fn,
                                       clip_denoised=clip_denoised, cond_fn=cond_fn, temperature=temperature,
                                       threshold=threshold, eta=eta, progress=progress))

  return run


def _compiled_sampler(sm: SamplerModel, diffusion: schedules.Diffusion, shape: tuple[int, ...], *, sampler: str,
                      cfg: bool, low_res: bool, inpaint: bool, clip: Any, threshold: Any,
                      progress: bool, guided_input: bool = False) -> Callable:
  # Flax modules hash and compare by their fields, so equal architectures share a program; the
  # diffusion's buffers and prediction target are baked into it, so every static field is in the key.
  upsample_residual = residual.residual_of(sm.diffusion_settings) if low_res else ""
  key = (sm.kind, sm.model,
         diffusion.noise_schedule, diffusion.timestep_respacing, diffusion.original_num_steps,
         diffusion.num_timesteps, diffusion.prediction, upsample_residual, shape, sampler,
         cfg, low_res, inpaint, None if clip is None else id(clip[0]), threshold, progress, guided_input)
  if key in _COMPILED:
    return _COMPILED[key]
  fn = jax.jit(sampling_program(sm.model, diffusion, shape, sampler=sampler, cfg=cfg, low_res=low_res,
                                inpaint=inpaint, inpaint_inputs=sm.is_inpaint,
                                upsample_residual=upsample_residual, guided_input=guided_input,
                                clip_module=None if clip is None else clip[0], threshold=threshold,
                                progress=_report_progress if progress else None))
  _COMPILED[key] = fn
  return fn


def generate(sm: SamplerModel, prompts: Sequence[str], key: jax.Array, *, guidance_scale: float | None = None,
             sampler: str | None = None, respacing: str | int | None = None, low_res: np.ndarray | None = None,
             inpaint_image: np.ndarray | None = None, inpaint_mask: np.ndarray | None = None,
             temperature: float | None = None, threshold: Any = None, eta: float = 0.0, clip_model: Any = None,
             clip_guidance_scale: float = 0.0, progress: Callable | None = None) -> np.ndarray:
  """Samples one image per prompt: [B, S, S, 3] float32 in [-1, 1], S = the model's image size.

  guidance_scale: classifier-free guidance (None = the bundle's default, 1 = no CFG, 0 = unconditional; the
  upsampler runs without it, as GLIDE). low_res: [B, s, s, 3] for upsamplers (rounded to 8 bits
  here). inpaint_image [B, S, S, 3] with inpaint_mask [B, S, S, 1] (1 = known). clip_model:
  (module, params, z_text [B, D]) for CLIP guidance at `clip_guidance_scale` (no CFG then, as GLIDE).
  A model with `guidance_embed` (a distilled student) takes guidance_scale as an input instead: one
  forward pass per step on the conditional batch (1 under CLIP guidance); a progressively distilled
  one warns when sampled with other steps than it was distilled for (`check_distilled_steps`).
  """
  settings = sm.diffusion_settings
  sampler = canonical_sampler(sampler or settings.get("sampler", "ancestral"))
  if guidance_scale is None:
    guidance_scale = 1.0 if sm.is_upsampler else float(settings.get("guidance_scale", 3.0))
  if temperature is None:
    temperature = float(settings.get("upsample_temp", guidance.UPSAMPLE_TEMPERATURE)) if sm.is_upsampler else 1.0
  use_clip = clip_model is not None and clip_guidance_scale != 0
  guided_input = bool(getattr(sm.model, "guidance_embed", False))
  cfg = guidance_scale != 1.0 and not use_clip and not guided_input  # 0 = the unconditional model, via the CFG mix
  if guided_input and use_clip:
    guidance_scale = 1.0
  if sm.tokenizer is None:
    raise ValueError("this model has no tokenizer; load it with one")
  b, s = len(prompts), sm.image_size
  tokens, mask = sm.tokenizer.encode_batch(list(prompts))
  u_tokens, u_mask = sm.tokenizer.empty(b)
  if sm.is_upsampler:
    if low_res is None:
      raise ValueError(f"the {sm.kind} model needs low_res images")
    low_res = np.asarray(low_res, np.float32)  # rounded to the 8-bit grid inside the sampler
    if low_res.shape[0] != b:
      raise ValueError(f"low_res has {low_res.shape[0]} images for {b} prompts")
  elif low_res is not None:
    raise ValueError(f"the {sm.kind} model takes no low_res input")
  if sm.is_upsampler and residual.residual_of(settings) and (threshold is not None or use_clip):
    raise ValueError("an upsampler with diffusion.upsample_residual clamps its images itself: it takes "
                     "no threshold and no CLIP guidance")
  inpaint = inpaint_image is not None
  if inpaint:
    if inpaint_mask is None:
      raise ValueError("inpainting needs both an image and a mask")
    inpaint_image = np.broadcast_to(np.asarray(inpaint_image, np.float32), (b, s, s, 3))
    inpaint_mask = np.broadcast_to(np.asarray(inpaint_mask, np.float32), (b, s, s, 1))
    guidance.check_inpaint_mask(inpaint_mask)
  zeros_img = np.zeros((b, s, s, 3), np.float32)
  clip_params = clip_z = None
  if use_clip:
    clip_params, clip_z = clip_model[1], clip_model[2]
  diffusion = make_diffusion(sm, respacing)
  if isinstance(threshold, list):
    threshold = tuple(threshold)
  check_distilled_steps(sm, diffusion, sampler)
  fn = _compiled_sampler(sm, diffusion, (b, s, s, 3), sampler=sampler, cfg=cfg, low_res=sm.is_upsampler,
                         inpaint=inpaint, clip=clip_model if use_clip else None, threshold=threshold,
                         progress=progress is not None, guided_input=guided_input)
  _PROGRESS[0] = progress
  out = fn(sm.params, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(u_tokens), jnp.asarray(u_mask),
           low_res if low_res is not None else jnp.zeros((b, 1, 1, 3)),
           inpaint_image if inpaint else zeros_img, inpaint_mask if inpaint else zeros_img[..., :1],
           key, jnp.float32(guidance_scale), jnp.float32(temperature), jnp.float32(eta), clip_params, clip_z,
           jnp.float32(clip_guidance_scale))
  out = np.asarray(out)
  _PROGRESS[0] = None
  return out
