"""A stack of identical blocks in one of two parameter layouts, and conversion between them.

  per layer  {name}_0/..., {name}_1/..., ...  one subtree per block, a python loop (the reference's
             naming, what the importers map by name)
  scanned    {name}/...  one subtree whose every leaf has a leading [layers] axis (logical name
             'layers'), run by `nn.scan`: the compiled program holds one block instead of N

The stacks: the text transformer `resblocks` (the U-Net's `text_encoder/`, or a bare TextEncoder)
and the noised CLIP's `block` (its `image/` and `text/` towers, or a bare tower). The conversions
move values only (np.stack / indexing), so per layer -> scanned -> per layer is bit-exact.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glide_jax.models.remat import remat

LAYERS_AXIS = "layers"  # logical name of the stacked axis (kept off the mesh by DEFAULT_RULES)
# (where in the tree, block name): every place a stack of blocks can sit in a model's params.
STACKS: tuple[tuple[tuple[str, ...], str], ...] = (
    ((), "resblocks"), (("text_encoder",), "resblocks"),  # TextEncoder, U-Net
    ((), "block"), (("image",), "block"), (("text",), "block"))  # CLIP tower, NoisedCLIP


def _carry(block, x, _):
  return block(x), None


def repeat_blocks(block_cls, args: Sequence[Any], x: jax.Array, *, length: int, name: str,
                  scan: bool = False, remat_policy: str | None = "none") -> jax.Array:
  """x -> block_{length-1}(... block_0(x)), each `block_cls(*args)` mapping x to the same shape.

  Call inside a compact method. scan=False makes `{name}_{i}` submodules; scan=True one `{name}`
  under `nn.scan` (params stacked on axis 0, rngs split per layer). remat_policy applies per block
  (inside the scan body when scanned). 0 layers is the identity in both layouts.
  """
  if scan and length > 0:
    block = remat(block_cls, remat_policy, prevent_cse=False)(*args, name=name)
    scanned = nn.scan(_carry, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      length=length, metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})
    return scanned(block, x, None)[0]
  cls = remat(block_cls, remat_policy)
  for i in range(length):
    x = cls(*args, name=f"{name}_{i}")(x)
  return x


# ---------------------------------------------------------------------------------- conversion

def _stack_leaves(leaves: Sequence[Any]) -> Any:
  first = leaves[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype)
  if any(isinstance(a, jax.Array) for a in leaves):
    return jnp.stack(leaves)
  return np.stack([np.asarray(a) for a in leaves])


def _unstack_leaf(leaf: Any, i: int) -> Any:
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype)
  return leaf[i]


def _layer_indices(tree: Mapping[str, Any], name: str) -> list[int]:
  pattern = re.compile(rf"{re.escape(name)}_(\d+)")
  return sorted(int(m.group(1)) for k in tree if (m := pattern.fullmatch(k)))


def stack_blocks(tree: Mapping[str, Any], name: str) -> dict[str, Any]:
  """One module's params with `{name}_0..{name}_{n-1}` -> the same with one stacked `{name}`."""
  tree = dict(tree)
  indices = _layer_indices(tree, name)
  if not indices:
    return tree
  if name in tree:
    raise ValueError(f"params hold both {name!r} and {name}_{{i}}: mixed layouts")
  if indices != list(range(len(indices))):
    raise ValueError(f"{name}_{{i}} blocks are not numbered 0..n-1: {indices}")
  blocks = [tree.pop(f"{name}_{i}") for i in indices]
  structure = jax.tree_util.tree_structure(blocks[0])
  for i, b in enumerate(blocks):
    if jax.tree_util.tree_structure(b) != structure:
      raise ValueError(f"{name}_{i} does not have the parameters of {name}_0: cannot stack")
    shapes = [np.shape(a) for a in jax.tree_util.tree_leaves(b)]
    if shapes != [np.shape(a) for a in jax.tree_util.tree_leaves(blocks[0])]:
      raise ValueError(f"{name}_{i} has other parameter shapes than {name}_0: cannot stack")
  tree[name] = jax.tree_util.tree_map(lambda *leaves: _stack_leaves(leaves), *blocks)
  return tree


def unstack_blocks(tree: Mapping[str, Any], name: str) -> dict[str, Any]:
  """Inverse of `stack_blocks`: a stacked `{name}` -> `{name}_0..{name}_{n-1}` (n = leading axis)."""
  tree = dict(tree)
  if name not in tree:
    return tree
  if _layer_indices(tree, name):
    raise ValueError(f"params hold both {name!r} and {name}_{{i}}: mixed layouts")
  stacked = tree.pop(name)
  sizes = {(tuple(np.shape(a)) or (None,))[0] for a in jax.tree_util.tree_leaves(stacked)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"{name!r} is not a stack of blocks: leading axes {sorted(map(str, sizes))}")
  for i in range(sizes.pop()):
    tree[f"{name}_{i}"] = jax.tree_util.tree_map(lambda a, i=i: _unstack_leaf(a, i), stacked)
  return tree


def _convert(params: Mapping[str, Any], fn) -> dict[str, Any]:
  out = dict(params)
  for where, name in STACKS:
    if not where:
      out = fn(out, name)
    elif isinstance(out.get(where[0]), Mapping):
      out[where[0]] = fn(out[where[0]], name)
  return out


def to_scanned(params: Mapping[str, Any]) -> dict[str, Any]:
  """A model's params (U-Net, NoisedCLIP, a TextEncoder or one CLIP tower) with every stack of
  per-layer blocks stacked; what is already stacked passes through."""
  return _convert(params, stack_blocks)


def to_per_layer(params: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `to_scanned`: every stacked block subtree split back into `{name}_{i}`."""
  return _convert(params, unstack_blocks)


def to_layout(params: Mapping[str, Any], scan_layers: bool) -> dict[str, Any]:
  """`params` in the layout a model built with `scan_layers` expects, whichever layout they are in."""
  return to_scanned(params) if scan_layers else to_per_layer(params)


def is_scanned(params: Mapping[str, Any]) -> bool | None:
  """True if the params hold a stacked block subtree, False if per-layer ones, None if neither
  (no stack, or 0 layers: the two layouts are the same tree then)."""
  found = set()
  for where, name in STACKS:
    node = params
    for key in where:
      node = node.get(key) if isinstance(node, Mapping) else None
    if isinstance(node, Mapping):
      if name in node:
        found.add(True)
      if _layer_indices(node, name):
        found.add(False)
  if len(found) > 1:
    raise ValueError("params mix the per-layer and the scanned layout")
  return found.pop() if found else None
