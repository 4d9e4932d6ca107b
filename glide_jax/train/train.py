"""The training loop for every stage (base, upsample, inpaint, clip), top to bottom.

  glide-jax train --config configs/base.py:variant=tiny --workdir /tmp/base [--config.key=value ...]

Sections: multi-host start, mesh, stage and data, optimizer and sharded state, checkpoint
restore, the compiled step, then the loop (log, check, checkpoint, preemption). The loop does no
host work per step beyond dispatching it (docs/training.md, "The loop on the host").
"""
from __future__ import annotations

import collections
import logging
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from glide_jax import config_lib, hardware
from glide_jax.parallel import mesh as mesh_lib
from glide_jax.parallel import multihost
from glide_jax.train import checkpoint as ckpt_lib
from glide_jax.train import init_from, stages
from glide_jax.train import program as program_lib
from glide_jax.train import state as state_lib
from glide_jax.train.logging import (
  MetricWriter,
  StepProfiler,
  peak_flops,
  profile_range,
)
from glide_jax.train.program import caption_dropout_rate  # noqa: F401  (re-exported for callers)

log = logging.getLogger(__name__)

# train() returns the per-step losses of its run, at most the last this many (host floats, filled
# at log steps from the fetched metrics).
KEPT_LOSSES = 100_000
# The pending metrics are stacked on device every this many steps (see _Pending).
PENDING_CHUNK = 256


class _StopSignal:
  """SIGTERM (or a preemption notice) asks the loop to save at the current step and exit 0."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def install(self) -> None:
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. inside some test runners): no handler
      self._previous = None

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.requested = True


class _StopCheck:
  """After each step: stop? (and was it SIGTERM, which forces a save?).

  jax's preemption sync point is asked every step: it is host-local (jax agrees on the step in the
  background), and every process answers True at the same step. SIGTERM only sets a local flag:
  one process reads it every step; several agree on it (`multihost.agree_on_flag`, a blocking
  collective) only every `every` steps, when every process is at the same step."""

  def __init__(self, signal_: _StopSignal, every: int, multi_process: bool):
    self.signal, self.every, self.multi = signal_, max(1, int(every)), bool(multi_process)

  def poll(self, step: int) -> tuple[bool, bool]:
    notice = _preemption_notice(step)
    if not self.multi:
      by_signal = self.signal.requested
    elif step % self.every == 0:
      by_signal = multihost.agree_on_flag(self.signal.requested)
    else:
      by_signal = False
    return notice or by_signal, by_signal


def _multi_process() -> bool:
  """Whether the loop agrees with other processes (a function, so tests can run that path in one)."""
  return jax.process_count() > 1


def _check_intervals(config: Any) -> tuple[int, int]:
  """(checkpoint.check_every, checkpoint.params_check_every), refused by name when out of range."""
  check_every = int(config.checkpoint.check_every)
  params_every = int(config.checkpoint.params_check_every)
  if check_every < 1:
    raise ValueError(f"checkpoint.check_every={check_every} must be >= 1 (1 = agree on a SIGTERM every step)")
  if params_every < 0:
    raise ValueError(f"checkpoint.params_check_every={params_every} must be >= 0 (0 = at the start and end)")
  return check_every, params_every


def _stack_metrics(steps: list[dict]) -> dict:
  return jax.tree.map(lambda *xs: jax.numpy.stack(xs), *steps)


_stack_jit = jax.jit(_stack_metrics)


class _Pending:
  """The metrics of the steps since the last log, still on the devices.

  Every `chunk` steps they are stacked on device into one [chunk] array per metric (an async
  dispatch, no host transfer), so however large log.every is, about 2 x chunk x (metrics) buffers
  stay alive; `fetch()` brings them all to the host at once, in step order."""

  def __init__(self, chunk: int | None = None):
    self.chunk = int(chunk or PENDING_CHUNK)
    self._steps: list[dict] = []
    self._stacked: list[dict] = []

  def __len__(self) -> int:
    return len(self._steps) + sum(len(next(iter(c.values()))) for c in self._stacked)

  def add(self, metrics: dict) -> None:
    self._steps.append(metrics)
    if len(self._steps) >= self.chunk:
      self._stacked.append(_stack_jit(self._steps))
      self._steps = []

  def fetch(self) -> list[dict]:
    stacked, steps = jax.device_get((self._stacked, self._steps))
    self._stacked, self._steps = [], []
    out = []
    for chunk in stacked:
      n = len(next(iter(chunk.values())))
      out.extend({k: v[i] for k, v in chunk.items()} for i in range(n))
    return out + list(steps)


def train(config: Any, workdir: str, *, data_iterator: Iterator | None = None, tokenizer: Any = None,
          progress: bool = True, mesh: Any = None,
          compiler_options: dict[str, Any] | None = None) -> dict[str, Any]:
  """Runs (or resumes) training to `config.total_steps`. Returns {'state', 'losses', 'stopped', 'step'}.

  `data_iterator` (host-local numpy batches with get_state/set_state) replaces the configured
  pipeline (tests); `losses` are this run's per-step losses as floats (the last KEPT_LOSSES of
  them), fetched at log steps. `compiler_options` go to XLA (tests on CPU pass
  {'xla_backend_optimization_level': 0} to compile faster).
  """
  # ---------------------------------------------------------------------- multi-host and logging
  _check_intervals(config)  # refuse a bad interval or profile range before anything is built
  profile_range(config.log.profile_steps)
  multihost.initialize()
  workdir = os.path.abspath(workdir)
  main = multihost.is_main()
  writer = MetricWriter(workdir, main, bool(config.log.tensorboard), int(config.total_steps), 0,
                        progress=progress and main)
  writer.text(f"glide-jax train: stage {config.stage}, workdir {workdir}, process "
              f"{jax.process_index()}/{jax.process_count()}")
  if main:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.config_to_json(config))

  # ---------------------------------------------------------------------- tokenizer and the program
  # The program (glide_jax/train/program.py) is the one `glide-jax plan` and the benchmarks build:
  # mesh, stage, optimizer, sharded state, batch shardings, empty caption and the donated step.
  if tokenizer is None and (data_iterator is None or config.stage in program_lib.EMPTY_CAPTION_STAGES):
    from glide_jax.data.pipeline import tokenizer_from_config
    tokenizer = tokenizer_from_config(config.data)
  program = program_lib.build(config, mesh=mesh, tokenizer=tokenizer)
  mesh, stage = program.mesh, program.stage
  writer.text(f"mesh {mesh_lib.describe(mesh)}")
  batch_size = program.batch_size
  if data_iterator is None:
    from glide_jax.data.pipeline import make_train_iterator
    data_iterator = make_train_iterator(config.data, config.stage, batch_size, stage.image_size,
                                        tokenizer=tokenizer, seed=int(config.seed))

  # ---------------------------------------------------------------------- sharded state
  rng = jax.random.key(int(config.seed))
  init_rng, step_rng = jax.random.split(rng)
  step_rng = program.put_rng(step_rng)  # a global (multi-host) array
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), int(config.checkpoint.every),
                               int(config.checkpoint.keep), bool(config.checkpoint["async"]))
  resume_step = ckpt.latest_step()
  if resume_step is None:
    # (No logical_axis_rules context here: unboxing under it would constrain conv kernels whose
    # two spatial axes share the name 'kernel'; our own rule resolution handles that.)
    state = program.init_state(init_rng, params=init_from.load_init_params(config, stage),
                               compiler_options=compiler_options)

  # ---------------------------------------------------------------------- resume
  else:
    # Refuse a mismatched config before anything is compiled; restore straight into the current
    # mesh's shardings from the abstract state (nothing is initialised just to be overwritten).
    ckpt.check_config(config, resume_step)
    state, step_rng, data_state = ckpt.restore(program.abstract_state, program.state_shardings, resume_step)
    if data_state:
      data_iterator.set_state(data_state)
    writer.text(f"resumed from step {resume_step} of {ckpt.directory}")
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  writer.text(f"{n_params:,} parameters; EMA rates {program.ema_rates}; sampler {program.sampler.name}")

  # ---------------------------------------------------------------------- the compiled step
  t0 = time.perf_counter()
  lowered = program.lower()
  fingerprint = program.fingerprint(lowered)
  compiled = lowered.compile(compiler_options=compiler_options)
  mem = compiled.memory_analysis()
  flops = hardware.compiled_flops(compiled)
  writer.text(f"compiled the train step in {time.perf_counter() - t0:.1f}s; memory per device: "
              f"{_format_memory(mem)}; {flops / 1e9 if flops else float('nan'):.3f} GFLOP per step")
  writer.text(f"program_fingerprint {fingerprint}")
  t_wait = time.perf_counter()
  host_batch = next(data_iterator)
  data_wait = time.perf_counter() - t_wait
  batch = program.put_batch(host_batch)
  peak = peak_flops(jax.devices()[0].device_kind, config.model.dtype, jax.config.jax_default_matmul_precision)

  # ---------------------------------------------------------------------- the loop
  # Per step the host only dispatches, waits for the previous step (block_until_ready: no transfer)
  # and asks the stop and save questions; metrics reach the host at log steps, parameters at save,
  # sample and parameter-check steps.
  step = int(state.step)
  total = int(config.total_steps)
  log_every = max(1, int(config.log.every))
  sample_every = int(config.log.sample_every or 0)
  check_every, params_every = _check_intervals(config)
  multi = _multi_process()
  profiler = StepProfiler(os.path.join(workdir, "profile"), config.log.profile_steps, main, writer, step)
  if multi:
    multihost.check_params_agree(state.params, step)
  stop = _StopSignal()
  stop.install()
  stops = _StopCheck(stop, check_every, multi)
  # A dead peer blocks the others inside a collective: on multi-process runs, exit after 30 min
  # without a finished step (GLIDE_JAX_WATCHDOG_SECONDS overrides; 0 = off).
  default_watchdog = "1800" if multi else "0"
  watchdog = multihost.Watchdog(float(os.environ.get("GLIDE_JAX_WATCHDOG_SECONDS", default_watchdog) or 0))
  sample_low_res = np.asarray(host_batch["low_res"]) if "low_res" in host_batch else None
  losses: collections.deque[float] = collections.deque(maxlen=KEPT_LOSSES)
  pending = _Pending()
  previous = None  # the last dispatched step's loss: the loop waits on it after the next dispatch
  stopped = False
  t_last, wait_acc, steps_since = time.perf_counter(), data_wait, 0
  writer.progress(step, float("nan"), 0.0)
  try:
    while step < total:
      if batch is None:
        t_wait = time.perf_counter()
        host_batch = next(data_iterator)
        batch = program.put_batch(host_batch)
        wait_acc += time.perf_counter() - t_wait
      profiler.before(step + 1, previous)
      with profiler.annotate(step + 1):
        state, metrics = compiled(state, batch, step_rng)
      # At most two steps in flight (this one and the previous one, which keeps the device fed):
      # without the wait the host runs ahead to the next log step, and a SIGTERM or preemption
      # notice would only be seen there, up to log.every steps later.
      if previous is not None:
        previous.block_until_ready()
      previous = metrics["loss"]
      batch = None
      step += 1
      steps_since += 1
      watchdog.kick()
      pending.add(metrics)
      profiler.after(step, previous)

      if step % log_every == 0 or step == total:
        fetched = pending.fetch()
        losses.extend(float(h["loss"]) for h in fetched)
        elapsed = time.perf_counter() - t_last
        summary = _summarize(fetched, stage.diffusion.num_timesteps)
        images_s = steps_since * batch_size / max(elapsed, 1e-9)
        summary.update(images_per_s=images_s, images_per_s_per_device=images_s / mesh.size,
                       data_wait_s=wait_acc / steps_since, step_time_s=elapsed / steps_since)
        if flops:
          tflops = flops / (elapsed / steps_since) / mesh.size / 1e12
          summary["model_tflops_per_device"] = tflops
          if peak:
            summary["mfu"] = tflops * 1e12 / peak
        writer.scalars(step, summary)
        writer.progress(step, summary.get("loss", float("nan")), images_s)
        t_last, wait_acc, steps_since = time.perf_counter(), 0.0, 0

      if sample_every and (step % sample_every == 0 or step == total):
        write_sample_grids(config, stage, tokenizer, state, step, workdir, writer, sample_low_res)
        watchdog.kick()

      stop_now, by_signal = stops.poll(step)
      final = step == total
      # orbax decides the periodic and preemption saves; the last step and a SIGTERM force one.
      if final or by_signal or ckpt.should_save(step):
        ckpt.save(step, state, step_rng, data_iterator.get_state(), config, force=final or by_signal)
      if multi and (final or stop_now or (params_every and step % params_every == 0)):
        multihost.check_params_agree(state.params, step)
      if stop_now:
        writer.text(f"stop requested (SIGTERM or preemption): saved step {step}, exiting")
        stopped = True
        break
  finally:
    profiler.close()
    watchdog.stop()
    stop.uninstall()
    ckpt.close()
    writer.close()
  return {"state": state, "losses": list(losses), "stopped": stopped, "step": step,
          "program_fingerprint": fingerprint}


def write_sample_grids(config: Any, stage: stages.Stage, tokenizer: Any, state: state_lib.TrainState, step: int,
                       workdir: str, writer: MetricWriter, low_res: np.ndarray | None = None) -> None:
  """Samples `log.sample_prompts` from a fixed seed with the EMA (first rate) and raw parameters;
  writes `WORKDIR/samples/{ema,raw}_<step>.png` and TensorBoard images. Runs on every process
  (the sampler is SPMD over the gathered params); only process 0 writes."""
  if stage.name == "clip" or tokenizer is None or not config.log.sample_prompts:
    return
  from glide_jax import images
  from glide_jax.diffusion.pipeline import SamplerModel, generate, settings_from_config

  prompts = list(config.log.sample_prompts)
  settings = settings_from_config(config)
  ema_key = state_lib.ema_key(float(config.ema.rates[0])) if len(config.ema.rates) else None
  trees = {"raw": state.params}
  if ema_key is not None:
    trees = {"ema": state.ema[ema_key], "raw": state.params}
  extra = {}
  if stage.kind in ("upsample", "upsample_inpaint"):
    if low_res is None:
      return
    reps = -(-len(prompts) // low_res.shape[0])
    extra["low_res"] = np.concatenate([low_res] * reps)[:len(prompts)]
  for name, tree in trees.items():
    params = _host_params(tree)
    sm = SamplerModel(kind=stage.kind, model=stage.model, params=params, meta={}, tokenizer=tokenizer,
                      image_size=stage.image_size, diffusion_settings=settings)
    samples = generate(sm, prompts, jax.random.key(int(config.log.sample_seed)), **extra)
    if multihost.is_main():
      grid = images.make_grid(images.to_uint8(np.asarray(samples)))
      images.save_png(os.path.join(workdir, "samples", f"{name}_{step:08d}.png"), grid)
      writer.image(step, f"samples/{name}", grid)
  writer.text(f"step {step}: wrote sample grids of {len(prompts)} prompts to {workdir}/samples")


def _host_params(tree: Any) -> Any:
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def _preemption_notice(step: int) -> bool:
  """Whether every process has reached the step at which a preemption notice says to save.

  jax's preemption sync manager answers (it exists once jax.distributed is initialised); without
  jax.distributed the call returns False at once, so single-process runs ask too (and tests can
  replace the function to deliver a notice).
  """
  from jax.experimental import multihost_utils
  try:
    return bool(multihost_utils.reached_preemption_sync_point(step))
  except RuntimeError:  # jax.distributed without the preemption service (jax_enable_preemption_service off)
    return False


def _summarize(history: list[dict], num_timesteps: int) -> dict[str, float]:
  """Means over the steps since the last log; quartile losses weighted by their counts."""
  out: dict[str, float] = {}
  keys = [k for k in history[0] if not k.startswith(("loss_q", "count_q"))]
  finite = [h for h in history if int(h["finite"])] or history
  for k in keys:
    if k in ("skipped",):
      out[k] = float(history[-1][k])
    elif k == "finite":
      continue
    else:
      out[k] = float(np.mean([float(h[k]) for h in finite]))
  for q in range(4):
    if f"count_q{q}" in history[0]:
      n = sum(float(h[f"count_q{q}"]) for h in finite)
      if n > 0:
        out[f"loss_q{q}"] = sum(float(h[f"loss_q{q}"]) * float(h[f"count_q{q}"]) for h in finite) / n
  return out


def _format_memory(mem) -> str:
  if mem is None:
    return "unavailable"
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
  return ", ".join(f"{f.replace('_size_in_bytes', '')} {getattr(mem, f, 0) / 2**20:.1f} MiB" for f in fields)

