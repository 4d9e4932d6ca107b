"""The train step: caption dropout, timestep and noise draws, gradient accumulation, AdamW, EMA,
and the skip of non-finite updates. Everything random comes from `fold_in(rng, state.step)`, so a
resumed run replays exactly the same draws.

The stage (glide_jax/train/stages.py) supplies `loss_fn(params, batch, dropout_rng) -> (loss, aux)`:
`batch` carries the data keys plus `t` [B] int32, `weights` [B] float32 and `noise` [B, H, W, 3]
drawn here for the whole global batch (so microbatching does not change any example's draws);
`aux` holds per-example arrays [b] (`losses` feeds the loss-second-moment sampler and the
quartile logs; `mse`, `vb`, ... are averaged into metrics).

Distillation (`StepConfig.distill`, a `DistillSchedule`): the loss is called with `teacher=` (the
frozen teacher in `state.teacher`) and `step=`, the batch carries the empty caption, and at the
first step of every progressive round the teacher becomes the current student while the optimizer
state and the EMA restart from it (Salimans & Ho start each round afresh); the EMA warmup and the
learning-rate schedule then count from the round's start.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from glide_jax.parallel import sharding as shard_lib
from glide_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class TimestepSampler:
  """Functional timestep sampler: state lives in the train state, updates see the global batch."""
  init: Callable[[], Any]
  sample: Callable[[Any, jax.Array, int], tuple[jax.Array, jax.Array]]  # (state, key, B) -> (t, w)
  update: Callable[[Any, jax.Array, jax.Array], Any]  # (state, t [B], losses [B]) -> state
  name: str = ""  # for logs


@dataclasses.dataclass(frozen=True)
class StepConfig:
  ema_rates: tuple[float, ...] = (0.9999,)
  ema_warmup: bool = False
  microbatches: int = 1
  caption_dropout: float = 0.0
  num_timesteps: int = 1000
  uses_text: bool = True
  distill: Any = None  # a diffusion.distillation.DistillSchedule: the distill stage


def apply_caption_dropout(batch: dict[str, jax.Array], key: jax.Array, rate: float,
                          empty_tokens: jax.Array, empty_mask: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
  """Replaces each example's tokens and mask by the empty caption with probability `rate`.

  tokens [B, L], mask [B, L]; empty_tokens [L], empty_mask [L] (the tokenizer's `empty(1)[i][0]`,
  the very caption the sampler uses for the unconditional half). Returns (batch, dropped [B] bool).
  """
  b = batch["tokens"].shape[0]
  dropped = jax.random.bernoulli(key, rate, (b,))
  out = dict(batch)
  out["tokens"] = jnp.where(dropped[:, None], empty_tokens[None].astype(batch["tokens"].dtype), batch["tokens"])
  out["mask"] = jnp.where(dropped[:, None], empty_mask[None].astype(batch["mask"].dtype), batch["mask"])
  return out, dropped


def _ema_update(ema: Any, params: Any, rate: jax.Array) -> Any:
  return jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, ema, params)


def _split_microbatches(tree: Any, m: int, mesh: Mesh | None, rules: Any) -> Any:
  """[B, ...] -> [m, B/m, ...] taking every m-th example, so each microbatch stays spread over all
  batch shards (a contiguous split would put microbatch 0 on the first devices only)."""
  def one(x):
    b = x.shape[0]
    y = jnp.swapaxes(x.reshape((b // m, m) + x.shape[1:]), 0, 1)
    if mesh is not None:
      spec = shard_lib.batch_spec(x.ndim, mesh, rules)
      y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(None, *spec)))
    return y
  return jax.tree.map(one, tree)


def prepare_batch(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, cfg: StepConfig,
                  sampler: TimestepSampler, empty_caption: tuple[Any, Any] | None
                  ) -> tuple[dict[str, jax.Array], jax.Array, dict[str, jax.Array]]:
  """The step's random draws for the whole global batch, from `fold_in(rng, state.step)`:
  caption dropout, then `t`, `weights` (timestep sampler) and `noise`. Returns (batch, model
  dropout key, metrics)."""
  key = jax.random.fold_in(rng, state.step)
  k_drop, k_t, k_noise, k_model = jax.random.split(key, 4)
  b = batch["image"].shape[0]
  metrics: dict[str, jax.Array] = {}
  if cfg.uses_text and cfg.caption_dropout > 0:
    if empty_caption is None:
      raise ValueError("caption dropout needs the tokenizer's empty caption")
    batch, dropped = apply_caption_dropout(batch, k_drop, cfg.caption_dropout, *empty_caption)
    metrics["caption_dropout_rate"] = jnp.mean(dropped.astype(jnp.float32))
  else:
    metrics["caption_dropout_rate"] = jnp.zeros((), jnp.float32)
  t, weights = sampler.sample(state.sampler, k_t, b)
  batch = dict(batch, t=t.astype(jnp.int32), weights=weights.astype(jnp.float32),
               noise=jax.random.normal(k_noise, batch["image"].shape, jnp.float32))
  if cfg.distill is not None:  # the teacher's unconditional half (phase 1)
    if empty_caption is None:
      raise ValueError("distillation needs the tokenizer's empty caption")
    batch["uncond_tokens"] = jnp.broadcast_to(empty_caption[0][None].astype(batch["tokens"].dtype),
                                              batch["tokens"].shape)
    batch["uncond_mask"] = jnp.broadcast_to(empty_caption[1][None].astype(batch["mask"].dtype),
                                            batch["mask"].shape)
  return batch, k_model, metrics


def begin_round(state: TrainState, tx: optax.GradientTransformation, cfg: StepConfig) -> TrainState:
  """At the first step of a progressive round: teacher := params, a fresh optimizer state, the EMA
  restarted at params; otherwise the state unchanged (a select, so it stays inside the one step)."""
  start = cfg.distill.round_start(state.step)
  pick = lambda new, old: jax.tree.map(lambda a, c: jnp.where(start, a, c), new, old)
  return state.replace(
      teacher=pick(state.params, state.teacher), opt_state=pick(tx.init(state.params), state.opt_state),
      ema={k: pick(state.params, e) for k, e in state.ema.items()})


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    cfg: StepConfig, sampler: TimestepSampler, empty_caption: tuple[Any, Any] | None,
                    mesh: Mesh | None = None, rules: Any = None):
  """Returns `step(state, batch, rng) -> (state, metrics)` (pure; jit it with shardings outside)."""
  m = int(cfg.microbatches)

  def step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
    b = batch["image"].shape[0]
    if b % m:
      raise ValueError(f"global batch {b} is not divisible by microbatches={m}")
    batch, k_model, metrics = prepare_batch(state, batch, rng, cfg, sampler, empty_caption)
    if mesh is not None:
      batch = shard_lib.constrain_batch(batch, mesh, rules)
    loss = loss_fn
    if cfg.distill is not None:
      state = begin_round(state, tx, cfg)
      loss = functools.partial(loss_fn, teacher=state.teacher, step=state.step)

    # --- gradients, accumulated over microbatches with lax.scan --------------------------------
    grad_fn = jax.value_and_grad(loss, has_aux=True)
    if m == 1:
      (loss, aux), grads = grad_fn(state.params, batch, k_model)
    else:
      micro = _split_microbatches(batch, m, mesh, rules)

      def body(carry, xs):
        i, mb = xs
        (l, a), g = grad_fn(state.params, mb, jax.random.fold_in(k_model, i))
        g_sum, l_sum = carry
        return (jax.tree.map(jnp.add, g_sum, g), l_sum + l), a

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (g_sum, l_sum), aux = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), (jnp.arange(m), micro))
      # Mean over microbatches = the full-batch mean gradient (guided-diffusion sums instead).
      grads = jax.tree.map(lambda g: g / m, g_sum)
      loss = l_sum / m
      # [m, B/m] back to the original example order [B].
      aux = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1).reshape((b,) + a.shape[2:]), aux)

    # --- update, unless the loss or a gradient is not finite ----------------------------------
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    new_ema = {}
    for r in cfg.ema_rates:
      k = repr(float(r))
      rate = jnp.float32(r)
      if cfg.ema_warmup:  # the "(1 + n) / (10 + n)" warmup many diffusion codebases use
        n = (state.step if cfg.distill is None else cfg.distill.steps_into_phase(state.step)).astype(jnp.float32)
        rate = jnp.minimum(rate, (1.0 + n) / (10.0 + n))
      new_ema[k] = _ema_update(state.ema[k], new_params, rate)
    keep = lambda new, old: jax.tree.map(lambda a, c: jnp.where(finite, a, c), new, old)
    new_sampler = sampler.update(state.sampler, batch["t"], jax.lax.stop_gradient(aux["losses"])) \
        if "losses" in aux else state.sampler
    new_state = state.replace(
        step=state.step + 1, params=keep(new_params, state.params), opt_state=keep(new_opt, state.opt_state),
        ema=keep(new_ema, state.ema), skipped=state.skipped + (~finite).astype(jnp.int32),
        sampler=keep(new_sampler, state.sampler))

    # --- metrics -------------------------------------------------------------------------------
    metrics.update(
        loss=loss, grad_norm=grad_norm, param_norm=optax.tree.norm(new_state.params),
        lr=jnp.asarray(schedule(_opt_count(state) if cfg.distill is None
                                else cfg.distill.steps_into_phase(state.step)), jnp.float32),
        skipped=new_state.skipped, finite=finite.astype(jnp.int32))
    for name, value in aux.items():
      if name != "losses":
        metrics[name] = jnp.mean(value)
    if "losses" in aux:
      quartile = jnp.clip((4 * batch["t"]) // cfg.num_timesteps, 0, 3)
      for q in range(4):
        sel = (quartile == q).astype(jnp.float32)
        metrics[f"loss_q{q}"] = jnp.sum(aux["losses"] * sel) / jnp.maximum(jnp.sum(sel), 1.0)
        metrics[f"count_q{q}"] = jnp.sum(sel)
    return new_state, metrics

  return step


def _opt_count(state: TrainState) -> jax.Array:
  """The number of applied updates: steps minus skipped ones (what the lr schedule sees)."""
  return state.step - state.skipped
