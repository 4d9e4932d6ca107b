"""Mesh construction from the config and logical-axis rules -> shardings."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_support as ts
from jax.sharding import PartitionSpec as P

from glide_jax.models import layers, registry
from glide_jax.parallel import mesh as mesh_lib
from glide_jax.parallel import sharding as shard_lib
from glide_jax.train import optim
from glide_jax.train import state as state_lib


def test_mesh_from_config_sizes():
  m = mesh_lib.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
  assert dict(m.shape) == {"replica": 1, "data": 2, "fsdp": 2, "tensor": 2}
  m = mesh_lib.make_mesh(ts.tiny_config("base").mesh)  # data=-1: all devices
  assert m.shape["data"] == 8
  with pytest.raises(ValueError, match="at most one axis"):
    mesh_lib.make_mesh({"data": -1, "fsdp": -1})
  with pytest.raises(ValueError, match="needs 16 devices"):
    mesh_lib.make_mesh({"data": 4, "fsdp": 4})
  with pytest.raises(ValueError, match="do not divide"):
    mesh_lib.make_mesh({"data": 3, "fsdp": -1})


def test_rules_fall_back_to_replication_when_an_axis_does_not_divide():
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4})
  rules = shard_lib.normalize_rules(ts.tiny_config("base").rules)
  # a second rule for a name is a fallback: tried when the first one's axis is taken, size 1 or does not divide
  fallback = (("embed", "fsdp"), ("mlp", "tensor"), ("mlp", "fsdp"))
  notes: list[str] = []
  assert shard_lib.logical_to_spec(("embed", "mlp"), (8, 6), fallback, mesh, notes) == P("fsdp", None)
  assert shard_lib.logical_to_spec(("embed", "mlp"), (6, 8), fallback, mesh, notes) == P(None, "fsdp")
  assert shard_lib.logical_to_spec(("embed", "mlp"), (6, 6), fallback, mesh, notes) == P(None, None)
  assert any("not divisible" in n for n in notes)
  # the batch goes over every data-parallel axis; spatial kernel axes are never sharded
  assert shard_lib.logical_to_spec(("batch", None), (16, 3), rules, mesh) == P(("data", "fsdp"), None)
  assert shard_lib.logical_to_spec(("kernel", "kernel", "conv_in", "conv_out"), (3, 3, 32, 64), rules, mesh) \
      == P(None, None, "fsdp", None)
  with pytest.raises(ValueError, match="not in"):
    shard_lib.logical_to_spec(("embed",), (8,), (("embed", "model"),), mesh)


def test_unet_parameters_shard_over_fsdp_and_tensor():
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = shard_lib.normalize_rules(ts.tiny_config("base").rules)
  config = ts.tiny_config("base")
  model = registry.create_model("text2im", dict(config.model.options))
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), **model.dummy_inputs(1, 8)))["params"]
  sh = shard_lib.tree_shardings(boxed, mesh, rules)
  flat = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(sh)}
  conv = [v for k, v in flat.items() if k.endswith("['kernel']") and len(v) == 4]
  assert any(v[2] == "fsdp" and v[3] == "tensor" for v in conv)
  assert all(v[0] is None and v[1] is None for v in conv)
  assert any("tensor" in tuple(v) for k, v in flat.items() if "c_qkv" in k)


class Toy(nn.Module):
  @nn.compact
  def __call__(self, x):
    return layers.Dense(24, names=("embed", "mlp"))(x)


def test_state_is_created_sharded_never_whole_on_one_device():
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4})
  rules = shard_lib.normalize_rules(ts.tiny_config("base").rules)
  tx, _ = optim.make_optimizer({"lr": 1e-3})
  init = lambda r: Toy().init(r, jnp.zeros((1, 16)))["params"]
  state, _ = state_lib.create_train_state(init, tx, (0.9,), mesh, rules, jax.random.key(0))
  kernel = state.params["Dense_0"]["kernel"]
  assert kernel.shape == (16, 24) and kernel.sharding.spec == P("fsdp", None)
  assert {s.data.shape for s in kernel.addressable_shards} == {(4, 24)}
  mu = state.opt_state[0].mu["Dense_0"]["kernel"]  # the optimizer state follows the parameters
  assert mu.sharding.spec == P("fsdp", None)
  assert state.ema["0.9"]["Dense_0"]["kernel"].sharding.spec == P("fsdp", None)
  np.testing.assert_array_equal(np.asarray(kernel), np.asarray(state.ema["0.9"]["Dense_0"]["kernel"]))
  # the same values as an unsharded init
  ref = nn.meta.unbox(init(jax.random.key(0)))
  np.testing.assert_array_equal(np.asarray(kernel), np.asarray(ref["Dense_0"]["kernel"]))


def test_host_batch_becomes_a_global_array_sharded_over_the_batch_axes():
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4})
  batch = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
  g = shard_lib.host_local_to_global(batch, mesh)
  assert g["image"].sharding.spec == P(("data", "fsdp"), None)
  assert {s.data.shape for s in g["image"].addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(np.asarray(g["image"]), batch["image"])
