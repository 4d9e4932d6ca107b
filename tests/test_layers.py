"""GroupNorm32: values and gradients against float64 NumPy/PyTorch-semantics GroupNorm; refusal of bad shapes."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax.models import layers


def _numpy_group_norm(x: np.ndarray, groups: int, scale, bias, eps=1e-5) -> np.ndarray:
  # torch.nn.GroupNorm semantics on NCHW, written for NHWC: a group is C/G consecutive channels.
  b, h, w, c = x.shape
  xg = x.astype(np.float64).transpose(0, 3, 1, 2).reshape(b, groups, -1)
  y = (xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + eps)
  y = y.reshape(b, c, h, w).transpose(0, 2, 3, 1)
  return y * scale + bias


@pytest.mark.parametrize("shape", [(2, 5, 7, 64), (3, 4, 4, 32), (1, 1, 1, 96)])
def test_group_norm_matches_float64_reference(shape):
  rng = np.random.default_rng(0)
  x = (rng.standard_normal(shape) * 3 + 1.5).astype(np.float32)
  c = shape[-1]
  scale, bias = rng.uniform(0.5, 1.5, c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
  module = layers.GroupNorm32(swish=False)
  params = {"params": {"scale": scale, "bias": bias}}
  got = np.asarray(module.apply(params, jnp.asarray(x)))
  np.testing.assert_allclose(got, _numpy_group_norm(x, 32, scale, bias), rtol=1e-5, atol=2e-5)


def test_group_norm_gradient_matches_finite_differences():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 3, 3, 32)) * 2 + 0.7
  probe = rng.standard_normal(x.shape)
  scale, bias = rng.uniform(0.5, 1.5, 32), rng.standard_normal(32)
  module = layers.GroupNorm32(swish=True)
  params = {"params": {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}}

  def loss(v):
    return jnp.sum(module.apply(params, v) * probe.astype(np.float32))

  grad = np.asarray(jax.grad(loss)(jnp.asarray(x, jnp.float32)))

  def loss64(v):  # float64 NumPy loss for central differences
    y = _numpy_group_norm(v, 32, scale, bias)
    return float(np.sum(y / (1 + np.exp(-y)) * probe))
  eps = 1e-4
  for idx in [(0, 0, 0, 0), (1, 2, 1, 31), (0, 1, 2, 17), (1, 0, 0, 5)]:
    e = np.zeros_like(x)
    e[idx] = eps
    fd = (loss64(x + e) - loss64(x - e)) / (2 * eps)
    assert abs(grad[idx] - fd) < 2e-3 * max(1.0, abs(fd)), (idx, grad[idx], fd)


def test_group_norm_refuses_channels_not_divisible_by_groups():
  module = layers.GroupNorm32()
  with pytest.raises(ValueError, match="48 channels are not divisible by 32 groups"):
    module.init(jax.random.key(0), jnp.zeros((1, 4, 4, 48)))

