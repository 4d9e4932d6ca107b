"""The one training program: everything a train step needs, built from a config and a mesh.

The trainer (`glide_jax/train/train.py`), `glide-jax plan` and `benchmarks/train_step.py` all call
`build`, so the step a plan compiles for a TPU pod is the step the trainer runs, and the step a
benchmark times:

  program = build(config, mesh=mesh)             # or devices=[...] (the config's mesh over them)
  lowered = program.lower()                      # abstract state, batch and key: nothing allocated
  program.fingerprint(lowered)                   # sha256 of the StableHLO text
  compiled = lowered.compile()
  state = program.init_state(jax.random.key(0))  # sharded; or params=host arrays (init_from)
  state, metrics = compiled(state, program.put_batch(host_batch), program.put_rng(rng))

What it fixes per stage: the stage's own diffusion (its timestep count), the per-stage caption
dropout (base, inpaint and upsample drop captions; clip never), and the tokenizer's empty caption
(the one the sampler's unconditional half uses), all baked into the jitted, donated step.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from glide_jax.models import layers
from glide_jax.parallel import mesh as mesh_lib
from glide_jax.parallel import sharding as shard_lib
from glide_jax.train import optim, stages, timesteps
from glide_jax.train import state as state_lib
from glide_jax.train import step as step_lib

log = logging.getLogger(__name__)

# Stages whose step replaces captions by the empty one (what classifier-free guidance rests on).
CAPTION_DROPOUT_STAGES = ("base", "inpaint", "upsample")
# Stages whose step needs the empty caption: those, and distill (the teacher's unconditional half).
EMPTY_CAPTION_STAGES = CAPTION_DROPOUT_STAGES + ("distill",)


def mesh_platform(mesh: Mesh) -> str:
  """The platform of `mesh`'s devices: what the models are traced for (`layers.target_platform`)."""
  return str(mesh.devices.flat[0].platform)


def traced_for(platform: str, fn: Any) -> Any:
  """`fn`, traced with the models' platform-dependent choices (attention) made for `platform`."""
  @functools.wraps(fn)
  def on_platform(*args, **kwargs):
    with layers.target_platform(platform):
      return fn(*args, **kwargs)
  return on_platform


class ProgramError(ValueError):
  """A config that cannot make a step on these devices (batch not divisible, ...)."""


def caption_dropout_rate(config: Any) -> float:
  """`data.caption_dropout` for the stages that drop captions, 0 for clip."""
  return float(config.data.caption_dropout) if config.stage in CAPTION_DROPOUT_STAGES else 0.0


def empty_caption(config: Any, tokenizer: Any = None) -> tuple[np.ndarray, np.ndarray] | None:
  """The tokenizer's empty caption (tokens [L] int32, mask [L] bool), or None for a stage without one.

  Without a tokenizer object the config's `data.tokenizer` is loaded. Where its files are absent
  (planning a gpt2/clip config on a machine without the vocabulary) the empty caption is still
  known: it is every position at the tokenizer's pad id with an all-False mask, and the pad id of
  the file-based kinds does not depend on the files (gpt2: n_vocab - 1; clip and words: 0).
  """
  if config.stage not in EMPTY_CAPTION_STAGES:
    return None
  if tokenizer is None:
    from glide_jax.data import tokenizers as tokenizers_lib
    spec = dict(config.data.tokenizer)
    try:
      tokenizer = tokenizers_lib.load_tokenizer(spec)
    except (ValueError, OSError) as e:
      kind = str(spec.get("type"))
      ctx = int(spec.get("text_ctx") or config.model.options.get("text_ctx", 128))
      if kind in ("gpt2", "gpt2_bpe"):
        pad = int(config.model.options.get("n_vocab", 50257)) - 1
      elif kind in ("clip", "words"):
        pad = 0
      else:
        raise ProgramError(f"the empty caption needs the tokenizer of data.tokenizer={spec}: {e}") from e
      log.info("tokenizer files not available (%s); empty caption = pad id %d", e, pad)
      return np.full((ctx,), pad, np.int32), np.zeros((ctx,), bool)
  tokens, mask = tokenizer.empty(1)
  return np.asarray(tokens[0], np.int32), np.asarray(mask[0], bool)


def abstract_batch(stage: stages.Stage, config: Any, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch the step takes: shapes and dtypes of every key the stage reads."""
  s = stage.image_size
  ctx = int(config.data.tokenizer.text_ctx)
  out = {"image": jax.ShapeDtypeStruct((batch_size, s, s, 3), jnp.float32),
         "tokens": jax.ShapeDtypeStruct((batch_size, ctx), jnp.int32),
         "mask": jax.ShapeDtypeStruct((batch_size, ctx), jnp.bool_)}
  if "low_res" in stage.batch_keys:
    low = int(config.data.get("low_res_size", 0) or s // 4)
    out["low_res"] = jax.ShapeDtypeStruct((batch_size, low, low, 3), jnp.float32)
  if "inpaint_mask" in stage.batch_keys:
    out["inpaint_mask"] = jax.ShapeDtypeStruct((batch_size, s, s, 1), jnp.float32)
  return {k: v for k, v in out.items() if k in stage.batch_keys}


@dataclasses.dataclass
class Program:
  """A config's train step on one mesh, with the shardings of everything it takes and returns."""
  config: Any
  mesh: Mesh
  rules: tuple
  stage: stages.Stage
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  sampler: step_lib.TimestepSampler
  ema_rates: tuple[float, ...]
  step_config: step_lib.StepConfig
  empty_caption: tuple[np.ndarray, np.ndarray] | None
  abstract_state: state_lib.TrainState
  state_shardings: state_lib.TrainState
  abstract_batch: dict[str, jax.ShapeDtypeStruct]
  batch_shardings: dict[str, NamedSharding]
  rng_sharding: NamedSharding
  step_fn: Any     # pure step(state, batch, rng) -> (state, metrics)
  jitted: Any      # step_fn jitted with the shardings above, the state donated

  @property
  def batch_size(self) -> int:
    return int(self.config.batch_size)

  @property
  def platform(self) -> str:
    """The platform of the mesh's devices ('cpu', 'gpu', 'tpu'), which the step is traced for."""
    return mesh_platform(self.mesh)

  def abstract_rng(self) -> jax.ShapeDtypeStruct:
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=self.rng_sharding)

  def abstract_args(self) -> tuple[Any, Any, Any]:
    """(state, batch, rng) as ShapeDtypeStructs carrying their shardings."""
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         self.abstract_state, self.state_shardings)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_shardings[k])
             for k, v in self.abstract_batch.items()}
    return state, batch, self.abstract_rng()

  def lower(self) -> Any:
    """The step lowered on abstract arguments (nothing is allocated)."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.jitted.lower(*self.abstract_args())

  @staticmethod
  def fingerprint(lowered: Any) -> str:
    """sha256 of the lowered StableHLO text: equal for the same config on the same devices."""
    return hashlib.sha256(lowered.as_text().encode()).hexdigest()

  def compile(self, compiler_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """(compiled step, fingerprint)."""
    lowered = self.lower()
    return lowered.compile(compiler_options=dict(compiler_options) if compiler_options else None), \
        self.fingerprint(lowered)

  def init_state(self, rng: jax.Array, params: Any | None = None,
                 compiler_options: Mapping[str, Any] | None = None) -> state_lib.TrainState:
    """A sharded train state: initialised from `rng`, or from host `params` (init_from)."""
    state, _ = state_lib.create_train_state(
        self.stage.init, self.tx, self.ema_rates, self.mesh, self.rules, rng, self.sampler.init,
        params=params, compiler_options=dict(compiler_options) if compiler_options else None,
        teacher=self.stage.distill is not None)
    return state

  def put_batch(self, host_batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """This process's rows of the global batch (numpy) -> global arrays in the step's shardings.

    Only the stage's keys are taken, cast to the step's dtypes; a missing key or a shape that is
    not the step's is an error naming the key."""
    n_proc = jax.process_count()
    out = {}
    for k, want in self.abstract_batch.items():
      if k not in host_batch:
        raise ProgramError(f"batch has no {k!r} (keys {sorted(host_batch)}); stage {self.stage.name!r} "
                           f"needs {sorted(self.abstract_batch)}")
      x = np.asarray(host_batch[k]).astype(want.dtype, copy=False)
      local = (want.shape[0] // n_proc,) + tuple(want.shape[1:])
      if x.shape != local:
        raise ProgramError(f"batch[{k!r}] has shape {x.shape}; this process's rows of the step's global "
                           f"batch {tuple(want.shape)} are {local}")
      out[k] = x
    return shard_lib.host_local_to_global(out, self.mesh, self.rules)

  def put_rng(self, rng: jax.Array) -> jax.Array:
    """The same key on every process -> a global replicated array."""
    return shard_lib.replicate(rng, self.mesh)


def build(config: Any, *, mesh: Mesh | None = None, devices: Sequence[Any] | None = None,
          tokenizer: Any = None, batch_size: int | None = None) -> Program:
  """The config's train step over `mesh` (or the config's mesh over `devices`, default all devices).

  `tokenizer`: the trainer passes the one its data pipeline uses, so the dropped captions are the
  sampler's empty caption; without one it comes from `empty_caption(config)`.
  """
  if mesh is None:
    mesh = mesh_lib.make_mesh(config.mesh, devices)
  rules = shard_lib.normalize_rules(config.rules)
  batch = int(config.batch_size if batch_size is None else batch_size)
  shards = shard_lib.num_batch_shards(mesh, rules)
  micro = int(config.microbatches)
  if micro < 1:
    raise ProgramError(f"microbatches={micro} must be at least 1")
  if batch % (shards * micro):
    raise ProgramError(f"batch_size={batch} must be divisible by the {shards} batch shards x {micro} "
                       "microbatches")
  stage = stages.make_stage(config)
  if stage.name == "clip" and micro > 1:
    raise ProgramError("config.microbatches must be 1 for the clip stage: the contrastive loss spans the "
                       "whole batch, so accumulated microbatch gradients would not equal it")
  tx, schedule = optim.make_optimizer(config.optimizer)
  sampler = timesteps.sampler_from_config(config, stage.diffusion.num_timesteps)
  if stage.distill is not None and sampler.name != "uniform":
    raise ProgramError(f"the distill stage draws its student steps from uniform timesteps; "
                       f"diffusion.schedule_sampler={config.diffusion.schedule_sampler!r} must be 'uniform'")
  ema_rates = tuple(float(r) for r in config.ema.rates)
  empty = empty_caption(config, tokenizer) if stage.uses_text else None
  with layers.target_platform(mesh_platform(mesh)):  # its eval_shape traces the model's init
    abstract, shardings = state_lib.state_shardings(stage.init, tx, ema_rates, sampler.init, mesh, rules,
                                                    teacher=stage.distill is not None)
  step_cfg = step_lib.StepConfig(ema_rates=ema_rates, ema_warmup=bool(config.ema.warmup), microbatches=micro,
                                 caption_dropout=caption_dropout_rate(config),
                                 num_timesteps=stage.diffusion.num_timesteps, uses_text=stage.uses_text,
                                 distill=stage.distill)
  empty_dev = None if empty is None else (jnp.asarray(empty[0]), jnp.asarray(empty[1]))
  step_fn = step_lib.make_train_step(stage.loss, tx, schedule, step_cfg, sampler, empty_dev, mesh, rules)
  # Traced for the mesh's devices, not this host's backend: a plan lowered on a CPU machine for a
  # TPU pod then holds the attention the pod runs.
  step_fn = traced_for(mesh_platform(mesh), step_fn)
  a_batch = abstract_batch(stage, config, batch)
  batch_sh = shard_lib.batch_shardings(a_batch, mesh, rules)
  repl = shard_lib.replicated(mesh)
  jitted = jax.jit(step_fn, in_shardings=(shardings, batch_sh, repl), out_shardings=(shardings, repl),
                   donate_argnums=(0,))
  return Program(config=config, mesh=mesh, rules=rules, stage=stage, tx=tx, schedule=schedule,
                 sampler=sampler, ema_rates=ema_rates, step_config=step_cfg, empty_caption=empty,
                 abstract_state=abstract, state_shardings=shardings, abstract_batch=a_batch,
                 batch_shardings=batch_sh, rng_sharding=repl, step_fn=step_fn, jitted=jitted)
