"""Logical axis names -> mesh shardings, with divisibility fallbacks, and global batches.

The rule table (config `rules`) is a sequence of `(logical name, mesh axes)`; `mesh axes` is None,
one mesh axis name, or a tuple of them. A logical name may appear several times: the rules are
tried in order, and the first one whose mesh axes are unused in that array, larger than 1 and
divide the dimension wins; a rule mapping to None stops the search (replicated). If none fits,
the dimension is replicated and the fallback is reported.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

Rules = Sequence[tuple[str, Any]]

# Logical axis -> mesh axes (names: the vocabulary of glide_jax/models/layers.py); every config's
# `rules` starts from these. Rules are tried top to bottom and a mesh axis is used at most once per
# array, so a conv kernel ('kernel', 'kernel', 'conv_in', 'conv_out') gets fsdp on its input
# channels and tensor on its output channels.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # activations: the batch is split over every data-parallel axis (fsdp included: ZeRO-3)
    ("batch", ("replica", "data", "fsdp")),
    ("act_length", None),
    ("act_height", None),
    ("act_width", None),
    ("act_embed", None),           # the residual stream stays whole (Megatron-style tensor parallel)
    ("act_channels", "tensor"),
    # parameters: tensor parallelism splits heads, MLP and output channels; fsdp shards the other
    # large dimension of every matrix and kernel. A rule to a size-1 axis means "replicated".
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("qkv", "tensor"),
    ("kv", "tensor"),
    ("conv_out", "tensor"),
    ("conv_in", "fsdp"),
    ("time_embed", "fsdp"),
    ("time_embed", "tensor"),
    # never sharded: spatial kernel axes, norms and biases, small tables
    ("kernel", None),
    ("norm", None),
    ("length", None),
    ("timesteps", None),
    ("layers", None),              # the stacked axis of scanned blocks (scan_layers): each layer whole
)


def normalize_rules(rules: Iterable[Any]) -> tuple[tuple[str, Any], ...]:
  """Config rules (lists from JSON, tuples from Python) -> tuple of (name, None | str | tuple)."""
  out = []
  for item in rules:
    if len(item) != 2:
      raise ValueError(f"rules: each entry must be (logical name, mesh axes), got {item!r}")
    name, axes = item
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes) if len(axes) != 1 else axes[0]
      if axes == ():
        axes = None
    out.append((str(name), axes))
  return tuple(out)


def _axes_tuple(axes: Any) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], rules: Rules, mesh: Mesh,
                    notes: list[str] | None = None, where: str = "") -> P:
  """Logical names of one array -> a PartitionSpec valid for `shape` on `mesh`.

  A mesh axis of size 1 is dropped (it shards nothing); an axis already used by an earlier
  dimension is not reused; a rule whose axes do not divide the dimension is skipped (noted).
  """
  if len(names) != len(shape):
    raise ValueError(f"{where}: {len(names)} logical names {tuple(names)} for shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    chosen: Any = None
    if name is not None:
      candidates = [axes for n, axes in rules if n == name]
      for axes in candidates:
        axes_t = tuple(a for a in _axes_tuple(axes) if mesh.shape.get(a, 1) > 1)
        for a in _axes_tuple(axes):
          if a not in mesh.shape:
            raise ValueError(f"rules: {name!r} -> {axes!r} names mesh axis {a!r}, not in {tuple(mesh.shape)}")
        if axes is None:
          break  # an explicit "replicate" rule
        if not axes_t:
          continue  # only size-1 mesh axes: they shard nothing, try the next rule for this name
        if used.intersection(axes_t):
          continue
        size = math.prod(mesh.shape[a] for a in axes_t)
        if dim % size:
          if notes is not None:
            notes.append(f"{where}: dim {dim} ({name}) not divisible by {axes_t} (size {size}); "
                         "trying the next rule or replicating")
          continue
        chosen = axes_t if len(axes_t) > 1 else axes_t[0]
        used.update(axes_t)
        break
    spec.append(chosen)
  return P(*spec)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def tree_shardings(boxed_tree: Any, mesh: Mesh, rules: Rules, log_fallbacks: bool = True) -> Any:
  """A tree whose array leaves may be `nn.Partitioned` (abstract or concrete) -> NamedShardings.

  Boxed leaves are sharded by their logical names; plain leaves (step counters, keys) are
  replicated. The result has the structure of `nn.meta.unbox(boxed_tree)`.
  """
  notes: list[str] = []

  def one(path, leaf):
    if isinstance(leaf, nn.Partitioned):
      value = leaf.value
      return NamedSharding(mesh, logical_to_spec(leaf.names, value.shape, rules, mesh, notes, _path_str(path)))
    return NamedSharding(mesh, P())

  out = jax.tree_util.tree_map_with_path(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  if notes and log_fallbacks:
    log.info("sharding fallbacks (%d):\n  %s", len(notes), "\n  ".join(notes[:50]))
  return out


def batch_spec(ndim: int, mesh: Mesh, rules: Rules | None = None) -> P:
  """Leading (batch) axis over the batch mesh axes, the rest replicated."""
  axes = dict(normalize_rules(rules or DEFAULT_RULES)).get("batch", ("replica", "data", "fsdp"))
  axes_t = tuple(a for a in _axes_tuple(axes) if mesh.shape.get(a, 1) > 1)
  first = None if not axes_t else (axes_t if len(axes_t) > 1 else axes_t[0])
  return P(first, *([None] * (ndim - 1)))


def batch_shardings(batch: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
  return jax.tree.map(lambda x: NamedSharding(mesh, batch_spec(np.ndim(x), mesh, rules)), batch)


def num_batch_shards(mesh: Mesh, rules: Rules | None = None) -> int:
  axes = dict(normalize_rules(rules or DEFAULT_RULES)).get("batch", ("replica", "data", "fsdp"))
  return math.prod(mesh.shape[a] for a in _axes_tuple(axes))


def host_local_to_global(batch: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
  """This process's slice of the global batch (numpy) -> global jax.Arrays sharded over the batch axes.

  Each process holds the rows for its addressable devices, in device order along the batch axis.
  """
  def one(x):
    x = np.asarray(x)
    sharding = NamedSharding(mesh, batch_spec(x.ndim, mesh, rules))
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)
  return jax.tree.map(one, batch)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(x: Any, mesh: Mesh) -> Any:
  """The same value on every process -> a global array replicated over `mesh` (works multi-host,
  where `device_put` onto non-addressable devices is refused)."""
  return jax.jit(lambda a: a, out_shardings=replicated(mesh))(x)


def constrain_batch(batch: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
  """Inside jit: pins every batch leaf to the batch sharding."""
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, batch_spec(x.ndim, mesh, rules))), batch)
