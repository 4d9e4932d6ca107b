"""Rematerialisation by policy name: one helper for every model's repeated blocks.

  'none'      no remat: the backward pass reads every activation the forward pass saved
  'full'      `nn.remat` with no policy: each block keeps only its inputs and recomputes the rest
  a name of `jax.checkpoint_policies` that is a policy itself (takes no arguments), e.g.
              'dots_saveable' (keep matmul outputs), 'dots_with_no_batch_dims_saveable',
              'nothing_saveable' (= 'full'), 'everything_saveable' (= 'none', through remat)
  aliases     'dots' = dots_saveable, 'dots_no_batch' = dots_with_no_batch_dims_saveable,
              'save_nothing' = nothing_saveable

Values and gradients do not depend on the policy; only what the backward pass keeps in memory
and recomputes does.
"""
from __future__ import annotations

import inspect

import flax.linen as nn
import jax

ALIASES = {"dots": "dots_saveable", "dots_no_batch": "dots_with_no_batch_dims_saveable",
           "save_nothing": "nothing_saveable"}


def _is_policy(obj) -> bool:
  """A policy is called as policy(prim, *args, **params); the factories (save_only_these_names,
  offload_dot_with_no_batch_dims, ...) take names or memory kinds instead and have no **params."""
  if not callable(obj):
    return False
  try:
    params = inspect.signature(obj).parameters.values()
  except (TypeError, ValueError):
    return False
  return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


JAX_POLICIES: tuple[str, ...] = tuple(sorted(
    n for n in dir(jax.checkpoint_policies) if not n.startswith("_") and _is_policy(getattr(jax.checkpoint_policies, n))))
POLICY_NAMES: tuple[str, ...] = ("none", "full") + JAX_POLICIES + tuple(ALIASES)


def checkpoint_policy(policy: str | None):
  """The jax policy a name stands for: None for 'full' (save nothing but the inputs).

  Raises ValueError for 'none' (no remat at all) and for an unknown name, listing the accepted ones.
  """
  name = ALIASES.get(policy, policy)
  if name == "full":
    return None
  if name not in JAX_POLICIES:
    raise ValueError(f"unknown remat_policy {policy!r}; choose from {', '.join(map(repr, POLICY_NAMES))}")
  return getattr(jax.checkpoint_policies, name)


def remat(cls, policy: str | None, *, prevent_cse: bool = True):
  """`cls` itself for policy 'none' (or '' / None), else `nn.remat(cls)` under the named policy.

  The parameters keep their names (nn.remat adds no scope). Inside `nn.scan` pass
  prevent_cse=False: the scan already keeps XLA from merging the recomputation into the forward.
  """
  if policy in ("none", "", None):
    return cls
  return nn.remat(cls, policy=checkpoint_policy(policy), prevent_cse=prevent_cse)
