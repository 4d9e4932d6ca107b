"""Checkpoints with orbax's CheckpointManager.

One checkpoint (directory `<workdir>/checkpoints/<step>`) holds five items:
  state   step, params, opt_state, skipped, timestep-sampler state (sharded arrays); the distill
          stage's teacher too
  ema     {rate: params}
  rng     the run's base key (uint32 key data, (2,) threefry or (4,) rbg); the step key is fold_in(rng, step)
  data    the data iterator's position (JSON)
  config  the config that wrote it (JSON)
orbax writes into a temporary directory and renames it when every item is complete, so a
process killed mid-save leaves no checkpoint under a step name; `latest_step` never sees it.
When to save is orbax's decision (`CheckpointManager.should_save`: the interval, or jax's preemption
sync point); the trainer forces a save only at its last step and on SIGTERM.
Restoring takes the *current* state's shardings as targets, so a checkpoint written on one mesh
loads onto another (more or fewer devices, other axis sizes).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from glide_jax import config_lib
from glide_jax.train.state import TrainState

log = logging.getLogger(__name__)

# Config keys that may differ between the run that saved and the run that resumes (the attention
# kernel changes no parameter, and a workdir saved before the option was listed lacks it;
# data.shuffle_buffer was never read and is gone, but older checkpoints' configs hold it).
RESUMABLE_KEYS = ("total_steps", "mesh", "checkpoint", "log", "sampling", "data.data_dir",
                  "data.shuffle_buffer", "data.prepare_timeout", "data.num_threads", "init_from",
                  "model.options.attention_impl")
# Keys added after checkpoints were first written, with the value those checkpoints ran with.
ADDED_KEYS = {"optimizer.name": "adamw", "optimizer.final_lr_frac": 0.0, "data.low_res_blur": 0.0,
              "data.low_res_noise": 0.0, "data.random_crop": True, "data.num_threads": 0}
# Keys older checkpoints' configs hold that the config no longer has (never read by anything).
REMOVED_KEYS = ("data.shuffle_buffer",)


def upgrade_saved_config(saved: config_lib.ConfigDict) -> config_lib.ConfigDict:
  """A config saved by an older glide-jax, in today's schema: each of ADDED_KEYS it lacks gets the
  value those runs ran with, REMOVED_KEYS go. Everything that reads a workdir's config (resume,
  export) goes through it, so no old workdir is refused for a key it could not have known."""
  with saved.unlocked():
    for key, value in ADDED_KEYS.items():
      section, name = key.split(".")
      if section in saved and name not in saved[section]:
        saved[section][name] = value
    for key in REMOVED_KEYS:
      section, name = key.split(".")
      if section in saved and name in saved[section]:
        del saved[section][name]
  return saved


class ConfigMismatchError(ValueError):
  """The config of a resumed run differs from the checkpoint's in a key that matters."""


def _state_items(state: TrainState) -> tuple[dict, dict]:
  main = {"step": state.step, "params": state.params, "opt_state": state.opt_state,
          "skipped": state.skipped, "sampler": state.sampler}
  if state.teacher is not None:  # only the distill stage has one; other checkpoints keep their layout
    main["teacher"] = state.teacher
  return main, state.ema


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
  """Saves when orbax's policy says so (every `every` steps, or at a preemption sync point; `force`
  for the final step and a SIGTERM stop), keeps the last `keep`, restores onto any mesh."""

  def __init__(self, directory: str, every: int, keep: int, use_async: bool = True):
    self.directory = os.path.abspath(directory)
    self.every = int(every)
    # orbax's default policy also saves at the first call of a fresh run (InitialSavePolicy): ours
    # saves only on the interval (none for every=0) and at jax's preemption sync point.
    policies = [ocp.checkpoint_managers.PreemptionCheckpointingPolicy()]
    if self.every > 0:
      policies.insert(0, ocp.checkpoint_managers.FixedIntervalPolicy(self.every))
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(policies),
        max_to_keep=int(keep) if keep else None, enable_async_checkpointing=bool(use_async), create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_names=("state", "ema", "rng", "data", "config"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    """orbax's decision for `step`: on the interval or at a preemption sync point, and past the
    latest checkpoint. Host-only (no device work); the loop asks it after every step."""
    return bool(self.manager.should_save(step))

  def save(self, step: int, state: TrainState, rng: jax.Array, data_state: dict, config: Any,
           force: bool = False) -> bool:
    """Starts a save of `state` at `step` if orbax's policy (or `force`) says so; returns whether one
    was started. A step already saved is never saved twice. Async saves finish in the background;
    `wait()` blocks until they are on disk."""
    if step in self.manager.all_steps():
      return False
    if not force and not self.should_save(step):
      return False
    main, ema = _state_items(state)
    cfg = json.loads(config_lib.config_to_json(config))
    items = dict(
        state=ocp.args.StandardSave(main),
        # host numpy: the same on every process (a single-device array cannot be saved multi-host)
        rng=ocp.args.StandardSave({"key_data": np.asarray(jax.random.key_data(rng))}),
        data=ocp.args.JsonSave(dict(data_state)), config=ocp.args.JsonSave(cfg))
    if ema:  # a run without EMA (the noised CLIP) has no `ema` item: orbax refuses empty trees
      items["ema"] = ocp.args.StandardSave(ema)
    args = ocp.args.Composite(**items)
    return bool(self.manager.save(step, args=args, force=bool(force)))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def saved_config(self, step: int | None = None) -> config_lib.ConfigDict:
    step = self.latest_step() if step is None else step
    restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return upgrade_saved_config(config_lib.config_from_json(json.dumps(restored["config"])))

  def check_config(self, config: Any, step: int | None = None) -> None:
    """Refuses to resume with a config that differs from the checkpoint's outside RESUMABLE_KEYS."""
    saved = self.saved_config(step)
    keys = config_lib.diff_configs(saved, config, ignore=RESUMABLE_KEYS)
    if keys:
      lines = config_lib.describe_diff(saved, config, keys)
      raise ConfigMismatchError(
          f"the config does not match the checkpoint in {self.directory} (step "
          f"{self.latest_step() if step is None else step}); differing keys (checkpoint != now):\n  "
          + "\n  ".join(lines) + "\nUse the checkpoint's config, or start a new workdir.")

  def restore(self, state_like: TrainState, shardings: TrainState, step: int | None = None
              ) -> tuple[TrainState, jax.Array, dict]:
    """Restores (state, rng, data_state) at `step` (default: latest) with `shardings` as targets.

    `state_like` may be abstract (jax.ShapeDtypeStruct leaves) or concrete.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    main_like, ema_like = _state_items(state_like)
    main_sh, ema_sh = _state_items(shardings)
    rng_sh = jax.sharding.NamedSharding(jax.tree.leaves(shardings)[0].mesh, jax.sharding.PartitionSpec())
    # The key data's shape is the PRNG implementation's: (2,) for threefry, (4,) for rbg.
    key_shape = jax.random.key_data(jax.random.key(0)).shape
    items = dict(
        state=ocp.args.StandardRestore(_abstract(main_like, main_sh)),
        rng=ocp.args.StandardRestore({"key_data": np.zeros(key_shape, np.uint32)}),
        data=ocp.args.JsonRestore())
    if ema_like:
      items["ema"] = ocp.args.StandardRestore(_abstract(ema_like, ema_sh))
    r = self.manager.restore(step, args=ocp.args.Composite(**items))
    m = r["state"]
    state = TrainState(step=m["step"], params=m["params"], opt_state=m["opt_state"], ema=r["ema"] if ema_like else {},
                       skipped=m["skipped"], sampler=m["sampler"], teacher=m.get("teacher"))
    key_data = np.asarray(r["rng"]["key_data"], np.uint32)
    if key_data.shape != key_shape:
      raise ValueError(
          f"the checkpoint's PRNG key in {self.directory} (step {step}) has shape {key_data.shape}, but "
          f"jax_default_prng_impl={jax.config.jax_default_prng_impl!r} keys have shape {key_shape}; resume "
          "with the PRNG implementation the run was started with")
    key = jax.random.wrap_key_data(key_data)
    rng = jax.jit(lambda k: k, out_shardings=rng_sh)(key)
    return state, rng, dict(r["data"] or {})


# ----------------------------------------------------------------------------- reading a workdir

def restore_workdir_item(workdir: str, item: str, step: int | None = None) -> tuple[Any, int]:
  """Host numpy copy of one checkpoint item ('state' or 'ema') of a workdir, and its step."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  with ocp.CheckpointManager(directory, item_names=("state", "ema", "rng", "data", "config"),
                             options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {directory}")
    meta = mngr.item_metadata(step)[item]
    tree = meta.tree if hasattr(meta, "tree") else meta
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = mngr.restore(step, args=ocp.args.Composite(**{
        item: ocp.args.PyTreeRestore(restore_args=restore_args)}))[item]
  return restored, step


def load_workdir_params(workdir: str, which: str = "ema", step: int | None = None) -> tuple[Any, ...] | Any:
  """Host numpy params of a workdir's latest checkpoint: `which` = 'params' or 'ema' (first rate)."""
  restored, _ = restore_workdir_item(workdir, "ema" if which == "ema" else "state", step)
  if which == "ema":
    return restored[next(iter(restored))]
  return restored["params"]
