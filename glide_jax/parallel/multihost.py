"""Multi-host start-up and checks.

`initialize()` starts `jax.distributed` when the environment announces more than one process:
our own variables (launch/local.py, or the `train` flags), which win,
  GLIDE_JAX_COORDINATOR=host:port  GLIDE_JAX_NUM_PROCESSES=N  GLIDE_JAX_PROCESS_ID=i
or a launcher jax detects by itself: SLURM (srun), Open MPI (mpirun), a TPU pod or multislice,
a Kubernetes Indexed Job/JobSet (`detect_cluster` reads the variables the way jax's cluster
classes do). A run that announces several processes but ends with `jax.process_count() == 1` is
refused (MultiHostError), so processes never train alone on the same data unnoticed;
GLIDE_JAX_NUM_PROCESSES=1 runs one process on purpose. On CPU the collectives go through gloo.
A watchdog turns a hang (a dead peer blocks every collective) into an exit with a message.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
import threading
import time
from typing import Any

import jax
import numpy as np

from glide_jax import errors

log = logging.getLogger(__name__)

_initialized = False

# The variables each cluster launcher sets, in the order jax's auto-detection tries the clusters
# (jax/_src/clusters: Open MPI, SLURM, mpi4py (opt-in), GKE TPU, GCE TPU, Kubernetes).
_SLURM_JAX = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_SINGLE_HINT = "set GLIDE_JAX_NUM_PROCESSES=1 to run a single process on purpose"


class MultiHostError(errors.UserError):
  """The environment announces several processes but they did not join one jax.distributed run
  (a UserError: the CLI prints it in one line)."""


@dataclasses.dataclass(frozen=True)
class Cluster:
  """What the environment says about this process's job (`detect_cluster`).

  kind: 'single', 'explicit' (GLIDE_JAX_* or flags), 'ompi', 'slurm', 'mpi' (PMI_*: MPICH, Intel
  MPI), 'tpu', 'kubernetes'. num_processes: the count the launcher announces (None: only jax can
  tell, from the TPU metadata or the Kubernetes API). method: jax's cluster_detection_method
  (None: its default order). jax_detects: whether jax's auto-detection will find this cluster;
  missing: the variables (or package) it lacks. seen: the variables this was decided from.
  """
  kind: str
  num_processes: int | None = None
  process_id: int | None = None
  coordinator: str | None = None
  method: str | None = None
  jax_detects: bool = True
  missing: tuple[str, ...] = ()
  seen: tuple[tuple[str, str], ...] = ()

  @property
  def multi(self) -> bool:
    """Whether to start jax.distributed: more than one process announced, or a count only jax knows."""
    return self.kind != "single" and (self.num_processes is None or self.num_processes > 1)

  def describe(self) -> str:
    return " ".join(f"{k}={v}" for k, v in self.seen) or "nothing"


def _int(environ, key: str) -> int | None:
  value = environ.get(key, "").strip()
  try:
    return int(value) if value else None
  except ValueError:
    raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def _seen(environ, *keys: str) -> tuple[tuple[str, str], ...]:
  return tuple((k, environ[k]) for k in keys if k in environ)


def detect_cluster(environ=None, *, on_tpu_vm: bool = False, have_mpi4py: bool = False,
                   have_kubernetes: bool = False) -> Cluster:
  """The job this process belongs to, from its environment alone (a pure function).

  Our explicit variables win; then the first launcher whose variables are set, in jax's order.
  `on_tpu_vm` (jax found TPU chips), `have_mpi4py` and `have_kubernetes` (importable) are what
  jax's own detection of GCE TPU VMs, PMI-only MPI and Kubernetes needs besides the environment.
  """
  env = os.environ if environ is None else environ
  # ---- ours: GLIDE_JAX_COORDINATOR/NUM_PROCESSES/PROCESS_ID (launch/local.py, flags of `train`)
  if any(k in env for k in ("GLIDE_JAX_COORDINATOR", "GLIDE_JAX_NUM_PROCESSES", "GLIDE_JAX_PROCESS_ID")):
    seen = _seen(env, "GLIDE_JAX_COORDINATOR", "GLIDE_JAX_NUM_PROCESSES", "GLIDE_JAX_PROCESS_ID")
    n, i = _int(env, "GLIDE_JAX_NUM_PROCESSES"), _int(env, "GLIDE_JAX_PROCESS_ID")
    coordinator = env.get("GLIDE_JAX_COORDINATOR") or None
    if coordinator is None and n in (None, 1):
      return Cluster("single", 1, 0, seen=seen)  # GLIDE_JAX_NUM_PROCESSES=1: one process on purpose
    if coordinator is None or n is None or i is None:
      raise ValueError(f"{' '.join(f'{k}={v}' for k, v in seen)}: a multi-process run needs all three of "
                       "GLIDE_JAX_COORDINATOR=host:port, GLIDE_JAX_NUM_PROCESSES and GLIDE_JAX_PROCESS_ID")
    if not 0 <= i < n:
      raise ValueError(f"GLIDE_JAX_PROCESS_ID={i} is not in [0, GLIDE_JAX_NUM_PROCESSES={n})")
    return Cluster("explicit", n, i, coordinator, seen=seen)
  # ---- Open MPI (mpirun): jax reads the launcher's URI, set by Open MPI 4 and older
  if "OMPI_COMM_WORLD_SIZE" in env:
    seen = _seen(env, "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
                 "OMPI_MCA_orte_hnp_uri")
    n, i = _int(env, "OMPI_COMM_WORLD_SIZE"), _int(env, "OMPI_COMM_WORLD_RANK")
    if "OMPI_MCA_orte_hnp_uri" in env:
      return Cluster("ompi", n, i, seen=seen)
    return Cluster("ompi", n, i, method="mpi4py" if have_mpi4py else None, jax_detects=have_mpi4py,
                   missing=() if have_mpi4py else ("OMPI_MCA_orte_hnp_uri (Open MPI 5 does not set it)",
                                                   "or the mpi4py package"), seen=seen)
  # ---- SLURM (srun): a step's task count and this task's rank
  if "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
    seen = _seen(env, *_SLURM_JAX, "SLURM_STEP_NUM_NODES", "SLURM_STEP_NUM_TASKS")
    missing = tuple(k for k in _SLURM_JAX if k not in env)
    return Cluster("slurm", _int(env, "SLURM_NTASKS"), _int(env, "SLURM_PROCID"), jax_detects=not missing,
                   missing=missing, seen=seen)
  # ---- MPICH, Intel MPI, srun --mpi=pmi2 without SLURM's task variables: only mpi4py finds the root
  if "PMI_SIZE" in env:
    seen = _seen(env, "PMI_SIZE", "PMI_RANK")
    return Cluster("mpi", _int(env, "PMI_SIZE"), _int(env, "PMI_RANK"), method="mpi4py" if have_mpi4py else None,
                   jax_detects=have_mpi4py, missing=() if have_mpi4py else ("the mpi4py package",), seen=seen)
  # ---- TPU: GKE sets the workers (jax/_src/clusters/cloud_tpu_cluster.py), a GCE TPU VM serves them
  # from its metadata, multislice adds MEGASCALE_*
  hosts_var = next((k for k in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES") if env.get(k)), None)
  if hosts_var or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    seen = _seen(env, hosts_var or "", "TPU_WORKER_ID", "MEGASCALE_COORDINATOR_ADDRESS", "MEGASCALE_NUM_SLICES",
                 "MEGASCALE_SLICE_ID")
    slices = _int(env, "MEGASCALE_NUM_SLICES") or 1
    n = i = None
    if hosts_var:
      per_slice = len(env[hosts_var].split(","))
      n = per_slice * slices
      if _int(env, "TPU_WORKER_ID") is not None:
        i = _int(env, "TPU_WORKER_ID") + (_int(env, "MEGASCALE_SLICE_ID") or 0) * per_slice
    return Cluster("tpu", n, i, jax_detects=on_tpu_vm and bool(hosts_var),
                   missing=() if on_tpu_vm else ("TPU chips on this machine",), seen=seen)
  if on_tpu_vm:
    return Cluster("tpu", None, None, seen=(("TPU VM", "metadata"),))  # jax asks the metadata server
  # ---- Kubernetes Indexed Job / JobSet (GPU hosts): the count comes from the Kubernetes API
  if "KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env:
    seen = _seen(env, "JOB_COMPLETION_INDEX", "JOBSET_NAME", "HOSTNAME")
    i = _int(env, "JOB_COMPLETION_INDEX")
    return Cluster("kubernetes", None, i, jax_detects=have_kubernetes,
                   missing=() if have_kubernetes else ("the kubernetes package (pip install 'jax[k8s]')",),
                   seen=seen)
  return Cluster("single", 1, 0)


def _importable(module: str) -> bool:
  import importlib.util
  return importlib.util.find_spec(module) is not None


def _refusal(cluster: Cluster, why: str) -> MultiHostError:
  count = "several" if cluster.num_processes is None else str(cluster.num_processes)
  return MultiHostError(f"{cluster.describe()} announce {count} {cluster.kind} processes but {why}; each "
                        "would train alone on the same data. Start every process with the same launcher, "
                        "or set GLIDE_JAX_COORDINATOR=host:port, GLIDE_JAX_NUM_PROCESSES and "
                        f"GLIDE_JAX_PROCESS_ID ({_SINGLE_HINT})")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout_seconds: int = 60) -> bool:
  """Starts jax.distributed if this is a multi-process run; returns whether it did.

  Arguments (the `train` flags) override GLIDE_JAX_*; without either, the cluster launcher's
  variables decide (`detect_cluster`). A run whose launcher announces several processes but that
  ends with one process (or another count) raises MultiHostError. Calling it again is a no-op.
  """
  global _initialized
  if _initialized or jax.distributed.is_initialized():
    _initialized = True
    return True
  env = dict(os.environ)
  for key, value in (("GLIDE_JAX_COORDINATOR", coordinator), ("GLIDE_JAX_NUM_PROCESSES", num_processes),
                     ("GLIDE_JAX_PROCESS_ID", process_id)):
    if value is not None:
      env[key] = str(value)
  from jax._src import cloud_tpu_init  # jax's own "TPU chips and libtpu present" flag
  cluster = detect_cluster(env, on_tpu_vm=bool(cloud_tpu_init.running_in_cloud_tpu_vm),
                           have_mpi4py=_importable("mpi4py"), have_kubernetes=_importable("kubernetes"))
  if not cluster.multi:
    return False  # a single process
  if cluster.kind == "kubernetes" and not cluster.jax_detects and not cluster.process_id:
    # Index 0 of an Indexed Job cannot tell a one-pod job from a larger one without the API.
    log.warning("%s: a Kubernetes Indexed Job, but jax cannot read its size without %s; running as one "
                "process", cluster.describe(), ", ".join(cluster.missing))
    return False
  if not cluster.jax_detects:
    srun = ": start the command with srun" if cluster.kind == "slurm" else ""
    raise _refusal(cluster, f"jax cannot start them here (missing {', '.join(cluster.missing)}{srun})")
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms == "" or "cpu" in platforms:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    if cluster.kind == "explicit":
      jax.distributed.initialize(coordinator_address=cluster.coordinator, num_processes=cluster.num_processes,
                                 process_id=cluster.process_id,
                                 heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    else:
      jax.distributed.initialize(cluster_detection_method=cluster.method,
                                 heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  except ValueError as e:  # jax found no cluster after all (e.g. a GCE TPU VM without its metadata)
    if cluster.kind == "tpu" and cluster.num_processes is None and not cluster.process_id:
      log.info("TPU VM: jax.distributed found no TPU pod (%s); running as one process", e)
      return False
    raise _refusal(cluster, f"jax.distributed could not start them ({e})") from e
  count = jax.process_count()
  if cluster.num_processes is not None and count != cluster.num_processes:
    raise _refusal(cluster, f"jax.process_count()=={count}")  # e.g. 1: this process started alone
  _initialized = True
  log.info("jax.distributed (%s): process %d of %d, %d local / %d global devices", cluster.kind,
           jax.process_index(), count, jax.local_device_count(), jax.device_count())
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
