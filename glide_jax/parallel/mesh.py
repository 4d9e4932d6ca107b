"""The device mesh: axes `replica` (across slices, over DCN), `data`, `fsdp`, `tensor`.

`replica` is the only axis that crosses the slow data-centre network; the other three live inside
a slice (ICI). On a single slice (or CPU/GPU) the mesh is simply `jax.make_mesh` over all devices.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from glide_jax import settings

AXES: tuple[str, ...] = ("replica", "data", "fsdp", "tensor")
# The `mesh` section's keys: sizes inside a slice (one may be -1) and across slices (DCN).
DEFAULTS = {**{a: 1 for a in AXES}, **{f"dcn_{a}": 1 for a in AXES}}


def resolve_axis_sizes(mesh_cfg: Any, num_devices: int) -> dict[str, int]:
  """Config sizes (one may be -1 = "the rest") -> concrete sizes whose product is `num_devices`."""
  m = settings.section(mesh_cfg, DEFAULTS, "mesh")
  sizes = {a: int(getattr(m, a)) for a in AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {free} in {sizes}")
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise ValueError(f"mesh.{a} = {s}: sizes must be positive or -1")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"mesh {sizes}: the fixed axes ({fixed} devices) do not divide {num_devices} devices")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices but {num_devices} are available")
  return sizes


def make_mesh(mesh_cfg: Any = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the 4-axis mesh from `config.mesh` (missing axes are 1).

  `mesh.{replica,data,fsdp,tensor}` are sizes inside a slice (ICI, one may be -1);
  `mesh.dcn_{replica,data,fsdp,tensor}` are sizes across slices (DCN). With more than one slice
  the devices are laid out by `mesh_utils.create_hybrid_device_mesh`, so only the DCN axes
  (normally just `replica`) cross the slow network.
  """
  devices = list(jax.devices() if devices is None else devices)
  m = settings.section(mesh_cfg, DEFAULTS, "mesh")
  dcn = {a: int(getattr(m, f"dcn_{a}")) for a in AXES}
  num_dcn = math.prod(dcn.values())
  if len(devices) % num_dcn:
    raise ValueError(f"mesh: dcn sizes {dcn} (product {num_dcn}) do not divide {len(devices)} devices")
  ici = resolve_axis_sizes(mesh_cfg, len(devices) // num_dcn)
  if num_dcn > 1:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_hybrid_device_mesh([ici[a] for a in AXES], [dcn[a] for a in AXES],
                                                devices=devices, allow_split_physical_axes=True)
    return Mesh(grid, AXES)
  shape = tuple(ici[a] for a in AXES)
  # Physical order (mesh_utils, through jax.make_mesh) on TPUs and on compile-only topology devices;
  # an order the physical mapper rejects (an axis split across the torus) falls back to the
  # splitting mapper, then to device order. Auto axes: the compiler propagates our constraints.
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  from jax.experimental import mesh_utils
  try:
    return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):  # the physical mapper's refusals
    try:
      grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
      grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, AXES, axis_types=auto)


def describe(mesh: Mesh) -> str:
  return " x ".join(f"{a}={mesh.shape[a]}" for a in AXES) + f" ({mesh.size} devices)"
