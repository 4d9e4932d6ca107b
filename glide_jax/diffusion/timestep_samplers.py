"""Timestep samplers for training ([GD] resample.py), as pure functions with explicit state and keys.

Both return `(t [B] int32, weights [B] float32)`; the loss to minimise is `mean(loss * weights)`.
The loss-second-moment sampler keeps its history as an array state, updated from losses gathered
over the whole global batch (every host must feed it the same arrays to stay in agreement).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def sample_uniform(key: jax.Array, batch_size: int, num_timesteps: int) -> tuple[jax.Array, jax.Array]:
  """t ~ U{0..T-1}, all weights 1."""
  t = jax.random.randint(key, (batch_size,), 0, num_timesteps, dtype=jnp.int32)
  return t, jnp.ones((batch_size,), jnp.float32)


class LossHistory(NamedTuple):
  """State of the loss-second-moment sampler."""
  history: jax.Array  # [T, history_per_term] float32, most recent last once full
  counts: jax.Array   # [T] int32, number of losses recorded (saturates at history_per_term)


def loss_history_init(num_timesteps: int, history_per_term: int = 10) -> LossHistory:
  return LossHistory(jnp.zeros((num_timesteps, history_per_term), jnp.float32),
                     jnp.zeros((num_timesteps,), jnp.int32))


def loss_history_update(state: LossHistory, t: jax.Array, losses: jax.Array) -> LossHistory:
  """Records losses [N] at timesteps [N] in order (a repeated t shifts its history each time)."""
  n_hist = state.history.shape[1]

  def one(st: LossHistory, tl):
    ti, li = tl
    row, count = st.history[ti], st.counts[ti]
    full = count >= n_hist
    shifted = jnp.concatenate([row[1:], li[None]])
    filled = row.at[jnp.minimum(count, n_hist - 1)].set(li)
    row = jnp.where(full, shifted, filled)
    return LossHistory(st.history.at[ti].set(row), st.counts.at[ti].set(jnp.minimum(count + 1, n_hist))), None

  state, _ = jax.lax.scan(one, state, (t.astype(jnp.int32), losses.astype(jnp.float32)))
  return state


def loss_second_moment_probs(state: LossHistory, uniform_prob: float = 0.001) -> jax.Array:
  """p_t ∝ sqrt(E[loss_t^2]) mixed with uniform_prob of the uniform law; uniform until warmed up. [T]"""
  num_timesteps, n_hist = state.history.shape
  warm = jnp.all(state.counts >= n_hist)
  w = jnp.sqrt(jnp.mean(state.history ** 2, axis=-1))
  p = w / jnp.maximum(jnp.sum(w), 1e-30)
  p = p * (1 - uniform_prob) + uniform_prob / num_timesteps
  return jnp.where(warm, p, jnp.full((num_timesteps,), 1.0 / num_timesteps))


def sample_loss_second_moment(key: jax.Array, state: LossHistory, batch_size: int,
                              uniform_prob: float = 0.001) -> tuple[jax.Array, jax.Array]:
  """t ~ p (see `loss_second_moment_probs`), importance weights 1 / (T p_t)."""
  p = loss_second_moment_probs(state, uniform_prob)
  num_timesteps = p.shape[0]
  t = jax.random.choice(key, num_timesteps, (batch_size,), p=p).astype(jnp.int32)
  return t, (1.0 / (num_timesteps * p[t])).astype(jnp.float32)
