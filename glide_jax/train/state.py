"""The train state, created sharded: `jax.eval_shape` for shapes and logical names, then
`jit(out_shardings=...)`, so no device ever holds the whole state.

  TrainState
    step      int32 []            optimizer steps taken (including skipped ones)
    params    float32 tree        the trained parameters
    opt_state optax state         float32, sharded like the parameters
    ema       {rate: params}      one float32 copy per EMA rate (never written into params)
    skipped   int32 []            steps whose loss or gradient was not finite
    sampler   timestep-sampler state (loss-second-moment history), or {}
    teacher   float32 tree        the distill stage's frozen teacher, sharded like params; else None
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from glide_jax.parallel import sharding as shard_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema: dict[str, Any]
  skipped: jax.Array
  sampler: Any
  teacher: Any = None


def ema_key(rate: float) -> str:
  """EMA trees are keyed by the rate as written, e.g. '0.9999'."""
  return repr(float(rate))


def _state_from(params: Any, tx: optax.GradientTransformation, ema_rates: Sequence[float],
                sampler_init: Callable[[], Any] | None, teacher: bool = False) -> TrainState:
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
      ema={ema_key(r): jax.tree.map(lambda p: p, params) for r in ema_rates},
      skipped=jnp.zeros((), jnp.int32), sampler=sampler_init() if sampler_init else {},
      teacher=jax.tree.map(lambda p: p, params) if teacher else None)


def state_shardings(boxed_init: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                    ema_rates: Sequence[float], sampler_init: Callable[[], Any] | None, mesh: Mesh,
                    rules: Any, teacher: bool = False) -> tuple[TrainState, TrainState]:
  """(abstract unboxed state, shardings) from a function rng -> boxed params (`model.init(...)['params']`).

  The optimizer, EMA and teacher copies inherit the parameters' logical names because they map
  over the boxed tree, so the whole state is sharded by one rule table.
  """
  boxed_abstract = jax.eval_shape(lambda r: _state_from(boxed_init(r), tx, ema_rates, sampler_init, teacher),
                                  jax.random.key(0))
  shardings = shard_lib.tree_shardings(boxed_abstract, mesh, rules)
  return nn.meta.unbox(boxed_abstract), shardings


def create_train_state(boxed_init: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                       ema_rates: Sequence[float], mesh: Mesh, rules: Any, rng: jax.Array,
                       sampler_init: Callable[[], Any] | None = None,
                       params: Any | None = None,
                       compiler_options: dict[str, Any] | None = None,
                       teacher: bool = False) -> tuple[TrainState, TrainState]:
  """Returns (state, shardings). With `params` (host arrays, e.g. an imported checkpoint) those
  become the parameters, the EMA (and the teacher); otherwise they are initialised from `rng` on the
  devices."""
  abstract, shardings = state_shardings(boxed_init, tx, ema_rates, sampler_init, mesh, rules, teacher)
  with jax.set_mesh(mesh):
    if params is None:
      init = jax.jit(lambda r: _state_from(nn.meta.unbox(boxed_init(r)), tx, ema_rates, sampler_init, teacher),
                     out_shardings=shardings)
      state = init.lower(rng).compile(compiler_options=compiler_options)(rng)
    else:
      _check_tree(params, abstract.params)
      params = jax.device_put(params, shardings.params)
      init = jax.jit(lambda p: _state_from(p, tx, ema_rates, sampler_init, teacher),
                     in_shardings=(shardings.params,), out_shardings=shardings)
      state = init.lower(params).compile(compiler_options=compiler_options)(params)
  return state, shardings


def _check_tree(params: Any, expected: Any) -> None:
  """Names the first missing / unexpected / misshapen parameter."""
  got = {jax.tree_util.keystr(p): jnp.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
  want = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(expected)}
  missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  bad = sorted(k for k in set(got) & set(want) if tuple(got[k]) != tuple(want[k]))
  if missing or unexpected or bad:
    raise ValueError(f"initial parameters do not fit the model: missing {missing[:10]}, "
                     f"unexpected {unexpected[:10]}, shape mismatch "
                     f"{[(k, got[k], want[k]) for k in bad[:10]]}")
