"""Noise schedules, timestep respacing and the diffusion buffers (docs/reference.md, section 4).

Everything here is computed once, in float64 numpy, exactly as [G]/[GD] do; the buffers are then
cast to the diffusion's storage dtype (float32 by default, like the reference's
`_extract_into_tensor(...).float()`), so a float64 computation downstream promotes the same
float32-rounded coefficients the reference used.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from flax import struct

SCHEDULES = ("linear", "squaredcos_cap_v2")
# What the model's first C output channels predict: GLIDE's epsilon, or v = sqrt(abar) eps -
# sqrt(1 - abar) x0 (Salimans & Ho 2022, arXiv 2202.00512), whose x0 estimate stays accurate at
# high noise; it suits short runs of small models (the shapes demo); or x0 itself ([GD]'s START_X),
# whose zero output at initialisation is the clean image "x0 = 0" (with `upsample_residual`, the
# interpolated input itself). Samplers always see epsilon and x0.
PREDICTIONS = ("epsilon", "v", "x0")
# Names accepted for the cosine schedule: [GD] calls it 'cosine', [G] 'squaredcos_cap_v2'.
_ALIASES = {"cosine": "squaredcos_cap_v2"}


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
  """Returns betas [T] float64 for 'linear' or 'squaredcos_cap_v2' (alias 'cosine')."""
  name = _ALIASES.get(name, name)
  if name == "linear":
    # Scaled so that T=1000 gives 1e-4..0.02 and other T keep the same total noise.
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
  if name == "squaredcos_cap_v2":
    def alpha_bar(s: float) -> float:
      return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
             for i in range(num_timesteps)]
    return np.array(betas, dtype=np.float64)
  raise ValueError(f"unknown noise schedule {name!r}; choose from {', '.join(SCHEDULES)} (or 'cosine')")


def space_timesteps(num_timesteps: int, section_counts: str | int | list[int]) -> set[int]:
  """The set of original timesteps kept by a respacing spec, as [G] respace.space_timesteps.

  `section_counts`: '' (keep all), 'N' or 'a,b,c' (split [0, T) into equal sections and take
  evenly rounded strides in each), 'ddimN' (uniform integer stride), 'fast27', or 'trailingN'
  (ours, not [G]'s: `trailing_timesteps`, the grid of the distilled students).
  """
  if isinstance(section_counts, int):
    section_counts = [section_counts]
  if isinstance(section_counts, str):
    spec = section_counts.strip()
    if spec == "":
      return set(range(num_timesteps))
    if spec.startswith("ddim"):
      desired = int(spec[len("ddim"):])
      for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired:
          return set(range(0, num_timesteps, stride))
      raise ValueError(f"cannot make exactly {desired} steps out of {num_timesteps} with an integer stride")
    if spec.startswith("trailing"):
      return set(trailing_timesteps(num_timesteps, int(spec[len("trailing"):])))
    if spec == "fast27":
      steps = space_timesteps(num_timesteps, "10,10,3,2,2")
      # [G] quirk: the noisiest step T-1 is swapped for T-3 "to reduce DDIM artifacts".
      steps.remove(num_timesteps - 1)
      steps.add(num_timesteps - 3)
      return steps
    try:
      section_counts = [int(x) for x in spec.split(",")]
    except ValueError:
      raise ValueError(f"bad timestep respacing {spec!r}: expected '', 'N', 'a,b,...', 'ddimN', 'trailingN' "
                       "or 'fast27'") from None
  size_per, extra = divmod(num_timesteps, len(section_counts))
  start, kept = 0, []
  for i, count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if size < count:
      raise ValueError(f"cannot take {count} steps from a section of {size} timesteps")
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    cur = 0.0
    for _ in range(count):
      kept.append(start + round(cur))  # Python's round (half to even), as the reference
      cur += stride
    start += size
  return set(kept)


def round_half_even(num: int, den: int) -> int:
  """round(num / den) of positive integers, ties to even, in integers (so jnp code can match it)."""
  q, r = divmod(int(num), int(den))
  return q + (1 if 2 * r > den or (2 * r == den and q % 2) else 0)


def trailing_timesteps(num_timesteps: int, steps: int) -> list[int]:
  """'trailingN': the original timesteps round(u T / N) - 1 for u = N..1, noisiest first (T - 1).

  The grid the distilled students sample on (Salimans & Ho's t_u = u / N on T discrete steps; the
  "trailing" spacing of Lin et al. 2023): it starts at T - 1 and its last step goes from
  round(T / N) - 1 to the data. Every other point of the 2N-step grid is the N-step grid, since
  round(2u T / 2N) = round(u T / N), so each halving keeps the teacher's points.
  """
  if not 1 <= steps <= num_timesteps:
    raise ValueError(f"trailing{steps}: the step count must lie in 1..{num_timesteps}")
  return [round_half_even(u * num_timesteps, steps) - 1 for u in range(steps, 0, -1)]


def respace_betas(betas: np.ndarray, use_timesteps: set[int]) -> tuple[np.ndarray, np.ndarray]:
  """betas' for the kept steps (beta'_i = 1 - abar_i / abar_prev_kept) and the timestep map, float64."""
  alphas_cumprod = np.cumprod(1.0 - betas)
  last, new_betas, timestep_map = 1.0, [], []
  for i, abar in enumerate(alphas_cumprod):
    if i in use_timesteps:
      new_betas.append(1 - abar / last)
      last = abar
      timestep_map.append(i)
  return np.array(new_betas, dtype=np.float64), np.array(timestep_map, dtype=np.int32)


@struct.dataclass
class Diffusion:
  """The buffers of a (possibly respaced) Gaussian diffusion; a pytree whose leaves are [T'] arrays.

  Indices `t` used everywhere in `glide_jax.diffusion` run over the T' kept steps; the model is
  always called with `timestep_map[t]`, the original 0..T-1 timestep ([G] `_WrappedModel`,
  no float rescaling).
  """
  betas: Any
  log_betas: Any
  alphas_cumprod: Any
  alphas_cumprod_prev: Any
  sqrt_alphas_cumprod: Any
  sqrt_one_minus_alphas_cumprod: Any
  sqrt_recip_alphas_cumprod: Any
  sqrt_recipm1_alphas_cumprod: Any
  posterior_variance: Any
  posterior_log_variance_clipped: Any
  posterior_mean_coef1: Any
  posterior_mean_coef2: Any
  ddim_sigma_unit: Any
  timestep_map: Any
  num_timesteps: int = struct.field(pytree_node=False, default=0)
  original_num_steps: int = struct.field(pytree_node=False, default=0)
  noise_schedule: str = struct.field(pytree_node=False, default="")
  timestep_respacing: str = struct.field(pytree_node=False, default="")
  prediction: str = struct.field(pytree_node=False, default="epsilon")


def diffusion_from_betas(betas: np.ndarray, timestep_map: np.ndarray | None = None, *,
                         dtype: Any = np.float32, original_num_steps: int | None = None,
                         noise_schedule: str = "", timestep_respacing: str = "",
                         prediction: str = "epsilon") -> Diffusion:
  """Builds every buffer in float64 from betas [T'] and casts them to `dtype`."""
  if prediction not in PREDICTIONS:
    raise ValueError(f"unknown model prediction {prediction!r}; choose from {', '.join(PREDICTIONS)}")
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
    raise ValueError(f"betas must be a 1-D array in (0, 1], got shape {betas.shape}")
  n = betas.shape[0]
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  abar_prev = np.append(1.0, abar[:-1])
  post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
  # log of the posterior variance, with index 0 (which is 0) replaced by index 1's value.
  post_log_var = np.log(np.append(post_var[1], post_var[1:])) if n > 1 else np.log(betas)
  cast = lambda a: np.asarray(a, dtype=dtype)
  abar_cast, abar_prev_cast = cast(abar), cast(abar_prev)
  # DDIM's sigma at eta = 1, formed here as the reference forms it on the fly (from the cast
  # buffers, in their dtype): 1 - abar / abar_prev cancels at small t, so one ulp off in a device's
  # division (a GPU's float32 division need not round correctly) moved a DDIM eta 0.5 step by 4e-5.
  one = np.asarray(1, dtype)
  ddim_sigma_unit = (np.sqrt((one - abar_prev_cast) / (one - abar_cast))
                     * np.sqrt(one - abar_cast / abar_prev_cast))
  if timestep_map is None:
    timestep_map = np.arange(n, dtype=np.int32)
  return Diffusion(
      betas=cast(betas),
      log_betas=cast(np.log(betas)),
      alphas_cumprod=abar_cast,
      alphas_cumprod_prev=abar_prev_cast,
      sqrt_alphas_cumprod=cast(np.sqrt(abar)),
      sqrt_one_minus_alphas_cumprod=cast(np.sqrt(1.0 - abar)),
      sqrt_recip_alphas_cumprod=cast(np.sqrt(1.0 / abar)),
      sqrt_recipm1_alphas_cumprod=cast(np.sqrt(1.0 / abar - 1.0)),
      posterior_variance=cast(post_var),
      posterior_log_variance_clipped=cast(post_log_var),
      posterior_mean_coef1=cast(betas * np.sqrt(abar_prev) / (1.0 - abar)),
      posterior_mean_coef2=cast((1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)),
      ddim_sigma_unit=ddim_sigma_unit,
      timestep_map=np.asarray(timestep_map, dtype=np.int32),
      num_timesteps=n,
      original_num_steps=int(original_num_steps or n),
      noise_schedule=noise_schedule,
      timestep_respacing=timestep_respacing,
      prediction=prediction,
  )


def create_diffusion(steps: int = 1000, noise_schedule: str = "squaredcos_cap_v2",
                     timestep_respacing: str | int = "", dtype: Any = np.float32,
                     prediction: str = "epsilon") -> Diffusion:
  """A GLIDE diffusion: `steps` original timesteps, respaced by `timestep_respacing` ('' = all).

  >>> d = create_diffusion(1000, 'squaredcos_cap_v2', '100'); d.num_timesteps, d.timestep_map[:3]
  (100, array([ 0, 10, 20], dtype=int32))
  """
  noise_schedule = _ALIASES.get(noise_schedule, noise_schedule)
  base = get_named_beta_schedule(noise_schedule, steps)
  respacing = str(timestep_respacing)
  betas, timestep_map = respace_betas(base, space_timesteps(steps, respacing))
  return diffusion_from_betas(betas, timestep_map, dtype=dtype, original_num_steps=steps,
                              noise_schedule=noise_schedule, timestep_respacing=respacing,
                              prediction=prediction)


def prediction_of(settings: Any) -> str:
  """`settings['prediction']` of a config's `diffusion` section or a bundle's `meta['diffusion']`;
  workdirs and bundles from before the field, and imported GLIDE weights, predict epsilon."""
  return str(settings.get("prediction", "epsilon"))


def diffusion_from_settings(settings: Any, respacing: str | int = "") -> Diffusion:
  """The Diffusion a config's `diffusion` section or a bundle's `meta['diffusion']` describes
  (keys steps, noise_schedule, prediction), respaced by `respacing`."""
  return create_diffusion(int(settings["steps"]), settings["noise_schedule"], respacing,
                          prediction=prediction_of(settings))
