"""Distillation of a classifier-free-guided v-prediction model into a few-step student.

Meng et al., "On Distillation of Guided Diffusion Models" (CVPR 2023): phase 1 trains a student that
takes the guidance scale w as an input (`UNet.guidance_embed`) to reproduce the teacher's guided
prediction in one pass; phase 2 halves its DDIM step count round by round with progressive
distillation (Salimans & Ho, ICLR 2022). Pure functions of arrays and a `DistillSchedule`; the train
stage (glide_jax/train/stages.py) runs them inside the jitted step.

Conventions. w is GLIDE's guidance scale s: pred = pred_u + s (pred_c - pred_u) (1 = conditional),
combined by `guidance.cfg_combine`, the function the sampler's `cfg_model_fn` combines with. Time: the students' grid is
`schedules.trailing_timesteps`. A point of it is written tau in 0..T (tau = round(u T / N) for
u = 0..N): the model sees the original timestep tau - 1 and tau = 0 is the data (abar = 1), so
`abar_ext[tau]` = [1, alphas_cumprod...][tau].
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from glide_jax.diffusion.schedules import Diffusion


@dataclasses.dataclass(frozen=True)
class DistillSchedule:
  """Which phase and round each train step belongs to; everything follows from the step counter.

  Steps [0, guidance_steps) are phase 1. Then round r = 0, 1, ... of `steps_per_round` steps each
  distils a (start_steps / 2^r)-step DDIM teacher into a student of half as many steps, down to
  `final_steps`; steps past the last round keep training it. At the first step of every round the
  teacher becomes the current student (the train step does that), so a resumed run needs nothing
  but its step.
  """
  guidance_steps: int
  start_steps: int
  final_steps: int
  steps_per_round: int
  num_timesteps: int = 1000

  def __post_init__(self):
    g, n0, n1, s, t = (self.guidance_steps, self.start_steps, self.final_steps, self.steps_per_round,
                       self.num_timesteps)
    if g < 0 or s < 0:
      raise ValueError(f"distill.guidance_steps={g} and distill.steps_per_round={s} must be >= 0")
    if not 1 <= n1 <= n0 <= t:
      raise ValueError(f"distill needs 1 <= final_steps ({n1}) <= start_steps ({n0}) <= the diffusion's "
                       f"{t} steps")
    if n0 % n1 or (n0 // n1) & (n0 // n1 - 1):
      raise ValueError(f"distill.start_steps={n0} must be final_steps={n1} times a power of 2: each "
                       "round halves the step count")
    if self.rounds and s < 1:
      raise ValueError(f"distill.steps_per_round must be >= 1 for the {self.rounds} rounds {n0} -> {n1}")
    if self.rounds == 0 and g < 1:
      raise ValueError("distill has nothing to do: no guidance phase and start_steps == final_steps")

  @property
  def rounds(self) -> int:
    return int(self.start_steps // self.final_steps).bit_length() - 1

  @property
  def total_steps(self) -> int:
    """Train steps of the whole schedule (phase 1 plus every round)."""
    return self.guidance_steps + self.rounds * self.steps_per_round

  def student_counts(self) -> list[int]:
    """The student's step count after each round: start/2, start/4, ..., final."""
    return [self.start_steps >> (r + 1) for r in range(self.rounds)]

  # ---- host side: a Python step
  def describe(self, step: int) -> dict[str, Any]:
    """What the parameters after `step` train steps are: {'phase', 'round', 'teacher_steps',
    'student_steps'} ('guidance' or 'progressive'; round and counts None in phase 1)."""
    step = int(step)
    if step <= self.guidance_steps or self.rounds == 0:
      return {"phase": "guidance", "round": None, "teacher_steps": None, "student_steps": None}
    r = min((step - 1 - self.guidance_steps) // self.steps_per_round, self.rounds - 1)
    return {"phase": "progressive", "round": r, "teacher_steps": self.start_steps >> r,
            "student_steps": self.start_steps >> (r + 1)}

  # ---- traced: step is an int32 [] array inside the jitted step
  def round_index(self, step: jax.Array) -> jax.Array:
    """The round of train step `step` (0-based; -1 in phase 1)."""
    if self.rounds == 0:
      return jnp.full(jnp.shape(step), -1, jnp.int32)
    past = step - self.guidance_steps
    r = jnp.minimum(past // max(self.steps_per_round, 1), self.rounds - 1)
    return jnp.where(past < 0, -1, r).astype(jnp.int32)

  def round_start(self, step: jax.Array) -> jax.Array:
    """True at the first step of each round: the teacher := the student, optimizer and EMA reset."""
    if self.rounds == 0:
      return jnp.zeros(jnp.shape(step), bool)
    past = step - self.guidance_steps
    s = max(self.steps_per_round, 1)
    return (past >= 0) & (past % s == 0) & (past // s < self.rounds)

  def steps_into_phase(self, step: jax.Array) -> jax.Array:
    """Steps since the start of the current phase or round (the EMA warmup counts from there)."""
    r = self.round_index(step)
    return jnp.where(r < 0, step, step - self.guidance_steps - r * max(self.steps_per_round, 1))

  def student_times(self, t: jax.Array, r: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For round r and uniform draws t [B] in 0..T-1: (tau, tau_mid, tau_end) [B] int32.

    The student's step i = floor(t N_s / T) + 1 in 1..N_s (uniform when N_s divides T) goes from
    tau = tau_i of its N_s-step grid to tau_end = tau_{i-1}; the 2 N_s-step teacher passes through
    tau_mid, the point between them on its grid."""
    n_teacher = jnp.right_shift(jnp.int32(self.start_steps), r)
    n_student = n_teacher // 2
    i = (t.astype(jnp.int32) * n_student) // self.num_timesteps + 1
    tau = trailing_point(2 * i, n_teacher, self.num_timesteps)
    tau_mid = trailing_point(2 * i - 1, n_teacher, self.num_timesteps)
    tau_end = trailing_point(2 * i - 2, n_teacher, self.num_timesteps)
    return tau, tau_mid, tau_end


def trailing_point(u: jax.Array, n: jax.Array, num_timesteps: int) -> jax.Array:
  """round(u T / n), ties to even, in integers: `schedules.trailing_timesteps` + 1, traced."""
  num = u * num_timesteps
  q, rem = num // n, num % n
  up = (2 * rem > n) | ((2 * rem == n) & (q % 2 == 1))
  return (q + up.astype(q.dtype)).astype(jnp.int32)


def extended_alphas_cumprod(diffusion: Diffusion) -> jax.Array:
  """[T + 1] float32: abar at tau = 0 (the data, 1) and at the original timesteps 0..T-1 (tau 1..T).
  `diffusion` must not be respaced."""
  if diffusion.num_timesteps != diffusion.original_num_steps:
    raise ValueError("distillation needs the full (not respaced) diffusion")
  abar = np.asarray(diffusion.alphas_cumprod, np.float64)
  return jnp.asarray(np.concatenate([[1.0], abar]), jnp.float32)


def _bcast(a: jax.Array, x: jax.Array) -> jax.Array:
  return a.astype(x.dtype).reshape(a.shape + (1,) * (x.ndim - a.ndim))


def x0_from_v(z: jax.Array, v: jax.Array, abar: jax.Array) -> jax.Array:
  """x0 = sqrt(abar) z - sqrt(1 - abar) v (as `gaussian.eps_and_xstart` for v); abar [B]."""
  return _bcast(jnp.sqrt(abar), z) * z - _bcast(jnp.sqrt(1 - abar), z) * v


def ddim_move(z: jax.Array, x0: jax.Array, abar_from: jax.Array, abar_to: jax.Array) -> jax.Array:
  """The deterministic DDIM step (eta = 0) from abar_from to abar_to given the x0 prediction:
  z' = sqrt(abar_to) x0 + sqrt(1 - abar_to) eps with eps = (z - sqrt(abar_from) x0) / sqrt(1 - abar_from),
  `gaussian.ddim_step`'s update. abar_to = 1 returns x0."""
  eps = (z - _bcast(jnp.sqrt(abar_from), z) * x0) / _bcast(jnp.sqrt(1 - abar_from), z)
  return _bcast(jnp.sqrt(abar_to), z) * x0 + _bcast(jnp.sqrt(1 - abar_to), z) * eps


def progressive_target(teacher_x0: Callable[[jax.Array, jax.Array], jax.Array], z: jax.Array,
                       tau: jax.Array, tau_mid: jax.Array, tau_end: jax.Array, abar_ext: jax.Array
                       ) -> jax.Array:
  """Salimans & Ho's Algorithm 2 target x~ for a student step tau -> tau_end (the train stage does the
  same with its two teacher calls laid out for one program; tests/test_distill.py checks both).

  teacher_x0(z, tau) -> x0 prediction [B, ...] at grid point tau [B] (the model called at tau - 1,
  clipped or not as the sampler would). The teacher takes two DDIM steps z -> z_mid -> z_end, and
  `x_target` gives the x0 for which one DDIM step from z lands on z_end."""
  a, a_mid, a_end = abar_ext[tau], abar_ext[tau_mid], abar_ext[tau_end]
  z_mid = ddim_move(z, teacher_x0(z, tau), a, a_mid)
  z_end = ddim_move(z_mid, teacher_x0(z_mid, tau_mid), a_mid, a_end)
  return x_target(z, z_end, a, a_end)


def x_target(z: jax.Array, z_end: jax.Array, abar: jax.Array, abar_end: jax.Array) -> jax.Array:
  """x~ = (z_end - (sigma_end / sigma) z) / (alpha_end - (sigma_end / sigma) alpha): the x0 whose
  DDIM step from z (at abar) lands on z_end (at abar_end)."""
  ratio = jnp.sqrt(1 - abar_end) / jnp.sqrt(1 - abar)
  return (z_end - _bcast(ratio, z) * z) / _bcast(jnp.sqrt(abar_end) - ratio * jnp.sqrt(abar), z)


def truncated_snr_weight(abar: jax.Array) -> jax.Array:
  """max(SNR, 1) = max(abar / (1 - abar), 1): Salimans & Ho's weighting of the x0 error."""
  return jnp.maximum(abar / (1 - abar), 1.0)
