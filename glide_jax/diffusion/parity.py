"""Reproduces every array of a reference diffusion dump (`diffusion.npz`, see the fixtures README).

Key layout: `betas/<schedule>`, `respace/<spec>`, `<schedule>/<respacing|full>/{input,output}/<name>`,
`loss/<cosine|linear>/{input,output}/<name>`, `config`. Dump images are NCHW; ours are NHWC.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from glide_jax.diffusion import gaussian, losses, schedules

_GROUP_OUTPUTS = ("betas", "q_sample", "posterior_mean", "posterior_log_variance", "model_timesteps",
                  "p_mean", "p_variance", "p_log_variance", "p_pred_xstart", "p_sample", "condition_mean")
_LOSS_OUTPUTS = ("loss", "mse", "vb")


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
  """max |ours - ref| / max |ref| (the README's measure), in float64."""
  ours = np.asarray(ours, dtype=np.float64)
  ref = np.asarray(ref, dtype=np.float64)
  ours = np.broadcast_to(ours, ref.shape)
  err = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
  scale = float(np.max(np.abs(ref))) if ref.size else 0.0
  return err / scale if scale > 0 else err


def _nhwc(a: np.ndarray) -> np.ndarray:
  return np.moveaxis(a, 1, -1) if a.ndim == 4 else a


def _nchw(a) -> np.ndarray:
  a = np.asarray(a)
  return np.moveaxis(a, -1, 1) if a.ndim == 4 else a


def _need(data: Mapping[str, np.ndarray], key: str) -> np.ndarray:
  if key not in data:
    raise KeyError(f"diffusion dump is missing {key!r}")
  return np.asarray(data[key])


def _group_outputs(data, prefix: str, schedule: str, respacing: str, steps: int, dtype) -> dict[str, np.ndarray]:
  diffusion = schedules.create_diffusion(steps, schedule, "" if respacing == "full" else respacing)
  inp = lambda name: jnp.asarray(_nhwc(_need(data, f"{prefix}/input/{name}")), dtype=dtype)
  t = jnp.asarray(_need(data, f"{prefix}/input/t"), dtype=jnp.int32)
  x_start, noise, x_t, model_out = inp("x_start"), inp("noise"), inp("x_t"), inp("model_out")
  ours: dict[str, np.ndarray] = {"betas": np.asarray(diffusion.betas),
                                 "model_timesteps": np.asarray(gaussian.model_timesteps(diffusion, t))}
  ours["q_sample"] = gaussian.q_sample(diffusion, x_start, t, noise)
  mean, _, log_var = gaussian.q_posterior_mean_variance(diffusion, x_start, x_t, t)
  ours["posterior_mean"], ours["posterior_log_variance"] = mean, log_var
  out = gaussian.p_mean_variance(diffusion, model_out, x_t, t, clip_denoised=True)
  ours.update(p_mean=out.mean, p_variance=out.variance, p_log_variance=out.log_variance,
              p_pred_xstart=out.pred_xstart)
  step_key = f"{prefix}/input/step_noise"
  if step_key in data:
    step_noise = inp("step_noise")
    ours["p_sample"] = gaussian.p_sample_step(out, x_t, t, step_noise)
    for key in data:
      if key.startswith(f"{prefix}/output/ddim_eta"):
        eta = float(key.rsplit("ddim_eta", 1)[1])
        ours[key.rsplit("/", 1)[1]] = gaussian.ddim_step(diffusion, out, x_t, t, step_noise, eta)
  if f"{prefix}/input/cond_grad" in data:
    grad = inp("cond_grad")
    ours["condition_mean"] = gaussian.condition_mean(diffusion, lambda x, tt: grad, out, x_t, t)
  return {k: _nchw(v) for k, v in ours.items()}


def _steps_of(data, schedule: str) -> int:
  """T from the dump's own `betas/<schedule>` when present (either spelling of cosine), else 1000."""
  for name in (schedule, "squaredcos_cap_v2" if schedule == "cosine" else schedule):
    if f"betas/{name}" in data:
      return int(np.asarray(data[f"betas/{name}"]).shape[0])
  return 1000


def _loss_outputs(data, prefix: str, schedule: str, dtype) -> dict[str, np.ndarray]:
  diffusion = schedules.create_diffusion(_steps_of(data, schedule), schedule, "")
  inp = lambda name: jnp.asarray(_nhwc(_need(data, f"{prefix}/input/{name}")), dtype=dtype)
  t = jnp.asarray(_need(data, f"{prefix}/input/t"), dtype=jnp.int32)
  model_out = inp("model_out")
  terms = losses.training_losses(diffusion, lambda x, tt: model_out, inp("x_start"), t, inp("noise"))
  return {k: np.asarray(v) for k, v in terms.items()}


def check_diffusion_dump(data: Mapping[str, np.ndarray], dtype: str = "float64") -> dict[str, float]:
  """Relative error (max|a-b| / max|b|, compared in float64) for every array in the dump.

  `dtype='float64'` runs the JAX code in float64 (x64 enabled for the duration), 'float32' in
  float32. Every `output`, `betas/` and `respace/` array is reproduced; a key this function does not
  know is an error, so nothing in a dump goes unchecked.
  """
  if dtype not in ("float64", "float32"):
    raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
  ctx = jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()
  jdtype = jnp.float64 if dtype == "float64" else jnp.float32
  errors: dict[str, float] = {}
  with ctx:
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key in sorted(data):
      ref = np.asarray(data[key])
      parts = key.split("/")
      if key == "config" or (len(parts) == 4 and parts[2] == "input") or (
          len(parts) == 4 and parts[0] == "loss" and parts[2] == "input"):
        continue
      if parts[0] == "betas" and len(parts) == 2:
        ours = schedules.get_named_beta_schedule(parts[1], ref.shape[0])
      elif parts[0] == "respace" and len(parts) == 2:
        steps = data["betas/linear"].shape[0] if "betas/linear" in data else 1000
        ours = np.array(sorted(schedules.space_timesteps(steps, parts[1])))
        if ours.shape != ref.shape:
          raise ValueError(f"{key}: we keep {ours.shape[0]} timesteps, the dump {ref.shape[0]}")
      elif len(parts) == 4 and parts[0] == "loss" and parts[2] == "output":
        prefix = "/".join(parts[:2])
        if prefix not in groups:
          groups[prefix] = _loss_outputs(data, prefix, parts[1], jdtype)
        if parts[3] not in groups[prefix]:
          raise KeyError(f"{key}: unknown loss output {parts[3]!r} (known: {', '.join(_LOSS_OUTPUTS)})")
        ours = groups[prefix][parts[3]]
      elif len(parts) == 4 and parts[2] == "output":
        prefix = "/".join(parts[:2])
        if prefix not in groups:
          groups[prefix] = _group_outputs(data, prefix, parts[0], parts[1], _steps_of(data, parts[0]), jdtype)
        if parts[3] not in groups[prefix]:
          raise KeyError(f"{key}: unknown diffusion output {parts[3]!r} "
                         f"(known: {', '.join(_GROUP_OUTPUTS)}, ddim_eta<eta>)")
        ours = groups[prefix][parts[3]]
      else:
        raise KeyError(f"diffusion dump key {key!r} does not follow the documented layout")
      ours = np.asarray(ours)
      if ours.ndim == ref.ndim and ours.shape != ref.shape and not all(
          a in (1, b) for a, b in zip(ours.shape, ref.shape)):
        raise ValueError(f"{key}: our shape {ours.shape} does not match the dump's {ref.shape}")
      errors[key] = relative_error(ours, ref)
  return errors
