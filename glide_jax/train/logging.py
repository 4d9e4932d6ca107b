"""What a user watches: a tqdm bar, a plain-text log in the workdir, TensorBoard scalars.

Only process 0 writes; the others get a writer that does nothing.
"""
from __future__ import annotations

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
    self._file = open(os.path.join(workdir, "train.log"), "a", buffering=1)
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
