"""Multi-host start-up and checks.

`initialize()` starts `jax.distributed` when there is more than one process: automatically on TPU
(and other cluster environments jax detects), from flags or the environment elsewhere:
  GLIDE_JAX_COORDINATOR=host:port  GLIDE_JAX_NUM_PROCESSES=N  GLIDE_JAX_PROCESS_ID=i
On CPU the collectives go through gloo. A watchdog turns a hang (a dead peer blocks every
collective) into an exit with a message.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)

_initialized = False


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout_seconds: int = 60) -> bool:
  """Starts jax.distributed if this is a multi-process run; returns whether it did."""
  global _initialized
  if _initialized:
    return True
  coordinator = coordinator or os.environ.get("GLIDE_JAX_COORDINATOR") or None
  env_n = os.environ.get("GLIDE_JAX_NUM_PROCESSES")
  env_i = os.environ.get("GLIDE_JAX_PROCESS_ID")
  num_processes = num_processes if num_processes is not None else (int(env_n) if env_n else None)
  process_id = process_id if process_id is not None else (int(env_i) if env_i else None)
  on_tpu_pod = bool(os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))
  if coordinator is None and not on_tpu_pod:
    return False  # a single process
  if coordinator is not None and (num_processes is None or process_id is None):
    raise ValueError("a coordinator address needs the number of processes and this process's id "
                     "(GLIDE_JAX_NUM_PROCESSES, GLIDE_JAX_PROCESS_ID)")
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if coordinator is not None and (platforms == "" or "cpu" in platforms):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator is None:
    jax.distributed.initialize()  # TPU: everything is discovered
  else:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  _initialized = True
  log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def is_main() -> bool:
  return jax.process_index() == 0


def params_fingerprint(params: Any) -> np.ndarray:
  """Per-leaf float64 sums of this process's copy of every fully replicated leaf: [n_leaves]."""
  sums = []
  for leaf in jax.tree.leaves(params):
    if not hasattr(leaf, "sharding") or not leaf.sharding.is_fully_replicated:
      continue
    shard = leaf.addressable_shards[0].data
    sums.append(np.sum(np.asarray(shard, np.float64)))
  return np.asarray(sums, np.float64)


def check_params_agree(params: Any, step: int) -> None:
  """Raises if the processes' copies of the replicated parameters differ (bit for bit)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  local = params_fingerprint(params)
  every = np.asarray(multihost_utils.process_allgather(local))  # [processes, n_leaves]
  bad = np.nonzero(np.any(every != every[0:1], axis=1))[0]
  if bad.size:
    raise RuntimeError(f"step {step}: parameters differ between processes {[0] + bad.tolist()} "
                       f"(fingerprints {every[:, :4].tolist()} ...)")


def agree_on_flag(flag: bool) -> bool:
  """True on every process if it is True on any (e.g. one host got SIGTERM)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))))


class Watchdog:
  """Exits the process with a message if `kick()` is not called for `timeout` seconds.

  A peer that dies leaves the others blocked inside a collective forever; this makes them fail.
  """

  def __init__(self, timeout: float, what: str = "train step"):
    self.timeout, self.what = float(timeout), what
    self._last = time.monotonic()
    self._stop = threading.Event()
    self._thread = None
    if self.timeout > 0:
      self._thread = threading.Thread(target=self._run, daemon=True, name="glide-jax-watchdog")
      self._thread.start()

  def kick(self) -> None:
    self._last = time.monotonic()

  def stop(self) -> None:
    self._stop.set()

  def _run(self) -> None:
    while not self._stop.wait(min(5.0, self.timeout / 4)):
      idle = time.monotonic() - self._last
      if idle > self.timeout:
        msg = (f"glide-jax: no progress for {idle:.0f}s in the {self.what} on process "
               f"{jax.process_index()} of {jax.process_count()}; a peer process has probably died. "
               "Exiting; resume from the last checkpoint.")
        print(msg, file=sys.stderr, flush=True)
        log.error(msg)
        os._exit(3)
