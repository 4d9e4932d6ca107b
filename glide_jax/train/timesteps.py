"""Timestep samplers as pure functions whose state lives in the train state.

`uniform`: t ~ U{0..T-1}, weights 1. `loss-second-moment` ([GD] `LossSecondMomentResampler`):
keeps the last 10 losses per t; until every t has 10 it samples uniformly; then
p_t ∝ sqrt(mean(loss_t²)), mixed as (1 − 0.001)·p + 0.001/T, with importance weights 1/(T·p_t).
The update runs inside the jitted step on the *global* batch's (t, loss), so every host holds
the same history without an explicit all-gather.
`logit-normal` (Esser et al. 2024, SD3): t/T = sigmoid(loc + scale * N(0, 1)), weights 1, so the
objective itself moves weight to the middle (loc 0) or, with loc > 0, to the noisy steps where a
caption decides the layout. Not in GLIDE; its configs keep `uniform`.
`stratified` (low-discrepancy, Kingma et al. 2021, VDM §A.2): one offset u ~ U[0, 1) per global
batch, example i at (u + i/b) mod 1 in a shuffled order, so every t is still uniform (weights 1,
the same objective as `uniform`) while the batch covers [0, T) evenly: the batch-mean loss, and the
gradient's share of variance that comes from which t were drawn, shrink. Not in GLIDE.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from glide_jax.train.step import TimestepSampler

HISTORY_PER_TERM = 10
UNIFORM_PROB = 0.001


def _stateless(name: str, draw) -> TimestepSampler:
  """A sampler with no state and weights 1 from `draw(key, b) -> t [b] int32`."""
  def sample(state, key, b):
    del state
    return draw(key, b), jnp.ones((b,), jnp.float32)
  return TimestepSampler(init=dict, sample=sample, update=lambda state, t, losses: state, name=name)


def _timestep_of(u, num_timesteps: int):
  """The integer timestep whose bin [t/T, (t+1)/T) holds u in [0, 1] (u = 1 falls in the last)."""
  return jnp.clip(jnp.floor(u * num_timesteps), 0, num_timesteps - 1).astype(jnp.int32)


def uniform(num_timesteps: int) -> TimestepSampler:
  return _stateless("uniform", lambda key, b: jax.random.randint(key, (b,), 0, num_timesteps, jnp.int32))


def loss_second_moment(num_timesteps: int, history: int = HISTORY_PER_TERM,
                       uniform_prob: float = UNIFORM_PROB) -> TimestepSampler:
  n = num_timesteps

  def init():
    return {"history": jnp.zeros((n, history), jnp.float32), "count": jnp.zeros((n,), jnp.int32)}

  def probabilities(state):
    warm = jnp.all(state["count"] >= history)
    w = jnp.sqrt(jnp.mean(jnp.square(state["history"]), axis=-1))
    p = w / jnp.maximum(jnp.sum(w), 1e-30)
    p = p * (1.0 - uniform_prob) + uniform_prob / n
    return jnp.where(warm, p, jnp.full((n,), 1.0 / n, jnp.float32))

  def sample(state, key, b):
    p = probabilities(state)
    t = jax.random.categorical(key, jnp.log(p), shape=(b,)).astype(jnp.int32)
    return t, 1.0 / (n * p[t])

  def update(state, t, losses):
    # Sequential over the batch, as the reference's Python loop: a FIFO of the last `history` per t.
    def body(carry, tl):
      hist, count = carry
      ti, li = tl
      full = count[ti] >= history
      row = hist[ti]
      shifted = jnp.concatenate([row[1:], li[None]])
      filled = row.at[jnp.minimum(count[ti], history - 1)].set(li)
      hist = hist.at[ti].set(jnp.where(full, shifted, filled))
      count = count.at[ti].set(jnp.minimum(count[ti] + 1, history))
      return (hist, count), None
    (hist, count), _ = jax.lax.scan(body, (state["history"], state["count"]),
                                    (t.astype(jnp.int32), losses.astype(jnp.float32)))
    return {"history": hist, "count": count}

  return TimestepSampler(init=init, sample=sample, update=update, name="loss-second-moment")


def logit_normal(num_timesteps: int, loc: float = 0.0, scale: float = 1.0) -> TimestepSampler:
  if not scale > 0:
    raise ValueError(f"diffusion.logit_normal_scale must be > 0, got {scale}")

  def draw(key, b):
    u = jax.nn.sigmoid(loc + scale * jax.random.normal(key, (b,), jnp.float32))
    return _timestep_of(u, num_timesteps)
  return _stateless(f"logit-normal(loc={loc:g}, scale={scale:g})", draw)


def stratified(num_timesteps: int) -> TimestepSampler:
  def draw(key, b):
    k_offset, k_order = jax.random.split(key)
    offset = jax.random.uniform(k_offset, (), jnp.float32)
    # Shuffled, so a microbatch or a data shard (contiguous slices of the global batch) gets strata
    # spread over [0, T) rather than one end of it.
    order = jax.random.permutation(k_order, b)
    u = jnp.mod(offset + order.astype(jnp.float32) / b, 1.0)
    return _timestep_of(u, num_timesteps)
  return _stateless("stratified", draw)


SAMPLERS = ("uniform", "stratified", "loss-second-moment", "logit-normal")


def make_sampler(name: str, num_timesteps: int, loc: float = 0.0, scale: float = 1.0) -> TimestepSampler:
  if name == "uniform":
    return uniform(num_timesteps)
  if name == "stratified":
    return stratified(num_timesteps)
  if name in ("loss-second-moment", "loss_second_moment"):
    return loss_second_moment(num_timesteps)
  if name in ("logit-normal", "logit_normal"):
    return logit_normal(num_timesteps, loc, scale)
  raise ValueError(f"diffusion.schedule_sampler must be one of {SAMPLERS}, got {name!r}")


def sampler_from_config(config, num_timesteps: int) -> TimestepSampler:
  """The sampler a config's `diffusion` section asks for (the CLIP stage always samples uniformly)."""
  d = config.diffusion
  name = "uniform" if config.get("stage") == "clip" else str(d.schedule_sampler)
  return make_sampler(name, num_timesteps, float(d.get("logit_normal_loc", 0.0)),
                      float(d.get("logit_normal_scale", 1.0)))
