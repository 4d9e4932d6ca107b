"""Multi-host start-up and checks.

`initialize()` starts `jax.distributed` when there is more than one process: automatically on TPU
(and other cluster environments jax detects), from flags or the environment elsewhere:
  GLIDE_JAX_COORDINATOR=host:port  GLIDE_JAX_NUM_PROCESSES=N  GLIDE_JAX_PROCESS_ID=i
On CPU the collectives go through gloo. A watchdog turns a hang (a dead peer blocks every
collective) into an exit with a message.
"""
from __future__ import annotations

import functools
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


def _checksum(x: jax.Array) -> jax.Array:
  """Two uint32 checksums of a block's bits ([2]): their wrapped sum and a position-weighted sum,
  so one flipped bit (or -0.0 for 0.0) anywhere changes them."""
  import jax.numpy as jnp
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = jnp.ravel(jax.lax.bitcast_convert_type(x, width)).astype(jnp.uint32)
  weights = (jnp.arange(bits.size, dtype=jnp.uint32) % 65521 + 1).astype(jnp.uint32)
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])


def _named_leaves(params: Any) -> tuple[list[str], list[jax.Array]]:
  """The leaves of `params` laid out on one mesh (NamedSharding), with their tree paths."""
  names, leaves, mesh = [], [], None
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
      continue
    if mesh is None:
      mesh = sharding.mesh
    if sharding.mesh == mesh:
      names.append(jax.tree_util.keystr(path))
      leaves.append(leaf)
  return names, leaves


def params_fingerprint(params: Any) -> jax.Array:
  """Every device's checksums of its own block of every leaf, computed on the devices:
  [devices of the mesh, leaves, 2] uint32, row r = `mesh.devices.flat[r]`.

  A shard_map over the leaves' own specs, so each device sums the copy it holds (nothing crosses
  devices, and nothing reaches the host until the caller fetches these few numbers). Leaves not
  laid out on the first leaf's mesh are left out."""
  _, leaves = _named_leaves(params)
  if not leaves:
    return np.zeros((0, 0, 2), np.uint32)
  return _fingerprint_fn(leaves[0].sharding.mesh, tuple(leaf.sharding.spec for leaf in leaves))(*leaves)


@functools.lru_cache(maxsize=8)
def _fingerprint_fn(mesh: Any, specs: tuple) -> Any:
  """The jitted per-device checksum of leaves with these specs (compiled once per layout)."""

  def local(*blocks):
    return jax.numpy.stack([_checksum(b) for b in blocks])[None]  # [1, leaves, 2] on each device

  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs,
                               out_specs=jax.sharding.PartitionSpec(mesh.axis_names), check_vma=False))


def check_params_agree(params: Any, step: int) -> None:
  """Raises if two devices (on any processes) hold different copies of the same block of a
  parameter (bit for bit, by checksum).

  The checksums are taken on the devices (`params_fingerprint`); only they, a few bytes per leaf
  and device, are gathered to every process (`process_allgather`), so no parameter is copied to
  the host. Every process must call it at the same step."""
  names, leaves = _named_leaves(params)
  if not leaves:
    return
  table = params_fingerprint(params)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    table = multihost_utils.process_allgather(table, tiled=True)
  table = np.asarray(table)  # [devices, leaves, 2]
  devices = list(leaves[0].sharding.mesh.devices.flat)
  row = {d.id: r for r, d in enumerate(devices)}
  bad = []
  for j, (name, leaf) in enumerate(zip(names, leaves)):
    holders: dict[tuple, list[int]] = {}
    for device, index in leaf.sharding.devices_indices_map(leaf.shape).items():
      key = tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in index)
      holders.setdefault(key, []).append(row[device.id])
    for rows in holders.values():
      sums = table[rows, j]
      odd = [r for r, x in zip(rows, sums) if np.any(x != sums[0])]
      if odd:
        procs = sorted({devices[r].process_index for r in [rows[0]] + odd})
        bad.append(f"{name} (device {devices[rows[0]].id} vs {[devices[r].id for r in odd]}, "
                   f"processes {procs})")
        break
  if bad:
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    raise RuntimeError(f"step {step}: copies of the parameters differ between devices: "
                       f"{', '.join(bad[:3])}{more}")


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
