"""What a user watches: a tqdm bar, a plain-text log in the workdir, TensorBoard scalars, and on
request a profile of some steps.

Only process 0 writes; the others get a writer that does nothing.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

# Peak FLOP/s per chip for MFU: the one table, glide_jax/hardware.py. Unknown kinds report no MFU.
from glide_jax.hardware import peak_flops  # noqa: F401  (the trainer imports it from here)


class MetricWriter:
  def __init__(self, workdir: str, enabled: bool, tensorboard: bool, total_steps: int, start_step: int,
               progress: bool = True):
    self.enabled = enabled
    self._tb = None
    self._bar = None
    self._file = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._file = open(os.path.join(workdir, "train.log"), "a", buffering=1)  # noqa: SIM115 - open for the run; close()
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    if progress:
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="train")

  def text(self, message: str) -> None:
    logging.getLogger("glide_jax.train").info(message)
    if self._file:
      self._file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

  def scalars(self, step: int, values: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: float(np.asarray(v)) for k, v in values.items()}
    if self._tb:
      for k, v in values.items():
        self._tb.add_scalar(k, v, step)
    self.text(f"step {step} " + " ".join(f"{k}={v:.6g}" for k, v in sorted(values.items())))

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    """image: [H, W, 3] uint8."""
    if self.enabled and self._tb:
      self._tb.add_image(tag, image, step, dataformats="HWC")

  def progress(self, step: int, loss: float, images_per_s: float) -> None:
    if self._bar is not None:
      self._bar.n = step
      self._bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.1f}", refresh=False)
      self._bar.refresh()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tb:
      self._tb.close()
    if self._file:
      self._file.close()


def profile_range(value: Any) -> tuple[int, int]:
  """`log.profile_steps` as (first step, count); count 0 = no profile. Refuses anything else by name."""
  try:
    first, count = (int(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(f"log.profile_steps={value!r} must be a pair (first step, count), e.g. (100, 5); "
                     "(0, 0) = no profile") from None
  if count < 0 or (count > 0 and first < 1):
    raise ValueError(f"log.profile_steps={tuple(value)!r}: the first step must be >= 1 and the count >= 0")
  return first, count


class StepProfiler:
  """A jax.profiler trace of the steps `first .. first+count-1` (steps counted from 1, as logged) on
  process 0, written under `directory` (TensorBoard's profile plugin reads its `.xplane.pb`, Perfetto
  its `perfetto_trace.json.gz`). Each traced step is a `StepTraceAnnotation('train', step_num=s)`.

  The loop calls `before(s, previous)` before dispatching step s, `annotate(s)` around the dispatch
  and `after(s, output)` once it is dispatched; the trace starts after the previous step has finished
  and stops after the last traced step has (`block_until_ready`, no host transfer)."""

  def __init__(self, directory: str, steps: Any, enabled: bool, writer: MetricWriter, start_step: int = 0):
    self.directory = directory
    self.first, self.count = profile_range(steps)
    self.last = self.first + self.count - 1
    self.enabled = bool(enabled) and self.count > 0
    self.writer = writer
    self.tracing = False
    if self.enabled and start_step >= self.first:
      writer.text(f"log.profile_steps={self.first},{self.count}: this run starts after step {start_step}; no profile")
      self.enabled = False

  def before(self, step: int, previous: Any) -> None:
    if self.enabled and not self.tracing and step == self.first:
      import jax
      if previous is not None:
        previous.block_until_ready()
      os.makedirs(self.directory, exist_ok=True)
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
      self.tracing = True
      self.writer.text(f"profiling steps {self.first}-{self.last} into {self.directory}")

  def annotate(self, step: int) -> Any:
    if not self.tracing:
      return contextlib.nullcontext()
    import jax
    return jax.profiler.StepTraceAnnotation("train", step_num=step)

  def after(self, step: int, output: Any) -> None:
    if self.tracing and step >= self.last:
      output.block_until_ready()
      self._stop(f"steps {self.first}-{step}")

  def close(self) -> None:
    """Stops a trace still running (the run ended or stopped inside the range)."""
    if self.tracing:
      self._stop(f"steps from {self.first} (the run ended inside the range)")

  def _stop(self, what: str) -> None:
    import jax
    jax.profiler.stop_trace()
    self.tracing = False
    self.enabled = False
    runs = sorted(glob.glob(os.path.join(self.directory, "plugins", "profile", "*")), key=os.path.getmtime)
    where = runs[-1] if runs else self.directory
    self.writer.text(f"wrote a profile of {what} to {where} (tensorboard --logdir {self.directory}, "
                     "or open perfetto_trace.json.gz in ui.perfetto.dev)")
