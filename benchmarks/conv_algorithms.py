"""3x3 convolutions: XLA's direct convolution against a Winograd F(2x2, 3x3) formulation.

  python -m benchmarks.run conv_algorithms                  # the released base model's 3x3 shapes
  python -m benchmarks.run conv_algorithms --shapes 2x64x192x192,32x32x32x32

The question it answers (docs/performance.md): can fewer multiplies beat the direct convolution
on a CPU? Winograd F(2x2, 3x3) computes each 2x2 output tile from a 4x4 input tile with 16
products per channel pair instead of 36, so its matrix products do 2.25x fewer FLOPs than the
direct convolution; the price is the input and output transforms (memory-bound elementwise work)
and 16 batched matrix products of [tiles, C_in] x [C_in, C_out]. The model does not use it: this
benchmark measures whether it would pay. For each shape (batch x size x C_in x C_out; stride 1,
'SAME' padding) it prints one JSON line with the median time of the forward and of the forward +
both gradients for each algorithm, the direct convolution's GFLOP/s, and the Winograd result's
maximum error relative to the direct one.
"""
from __future__ import annotations

import argparse

import numpy as np

from benchmarks import common, reference

# The distinct 3x3 convolutions of the released base model at the CFG batch of 2:
# (batch, size, C_in, C_out), from channel_mult (1, 2, 3, 4) x 192 at 64, 32, 16 and 8 px.
RELEASED_SHAPES = ((2, 64, 192, 192), (2, 32, 384, 384), (2, 16, 576, 576), (2, 8, 768, 768))

# Winograd F(2x2, 3x3) transforms (Lavin and Gray, 2016): Y = A^T [(G g G^T) * (B^T d B)] A.
_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], np.float32)


def _input_transform(d0, d1, d2, d3):
  """B^T applied along one axis to four rows (or columns) of a 4-wide tile."""
  return d0 - d2, d1 + d2, d2 - d1, d1 - d3


def _output_transform(m0, m1, m2, m3):
  """A^T applied along one axis: four transformed rows -> the tile's two output rows."""
  return m0 + m1 + m2, m1 - m2 - m3


def winograd_conv3x3(x, kernel):
  """x [N, H, W, C_in] (H, W even), kernel [3, 3, C_in, C_out] -> [N, H, W, C_out], stride 1, pad 1."""
  import jax.numpy as jnp

  n, h, w, c = x.shape
  if h % 2 or w % 2 or kernel.shape[:2] != (3, 3):
    raise ValueError(f"winograd_conv3x3 needs even H, W and a 3x3 kernel; got x {x.shape}, kernel {kernel.shape}")
  c_out = kernel.shape[-1]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # Tile (i, j) reads padded rows 2i..2i+3 and columns 2j..2j+3: strided slices pick row k of
  # every tile at once, so the transforms are elementwise over [N, H/2, W/2, C] arrays.
  rows = _input_transform(*[xp[:, k:k + h:2] for k in range(4)])
  tiles = []
  for r in rows:
    tiles += _input_transform(*[r[:, :, k:k + w:2] for k in range(4)])
  v = jnp.stack(tiles).reshape(16, n * (h // 2) * (w // 2), c)
  g = jnp.asarray(_G, kernel.dtype)
  u = jnp.einsum("ai,ijco,bj->abco", g, kernel, g).reshape(16, c, c_out)
  m = jnp.einsum("tpc,tco->tpo", v, u).reshape(4, 4, n, h // 2, w // 2, c_out)
  top, bottom = _output_transform(m[0], m[1], m[2], m[3])
  y = [_output_transform(*half) for half in (top, bottom)]  # y[row][col]: [N, H/2, W/2, C_out]
  y = jnp.stack([jnp.stack(y[0], -2), jnp.stack(y[1], -2)], 2)  # [N, H/2, 2, W/2, 2, C_out]
  return y.reshape(n, h, w, c_out)


def direct_conv3x3(x, kernel):
  import jax
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), [(1, 1), (1, 1)],
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
  out = []
  for item in text.split(","):
    parts = item.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
      raise ValueError(f"--shapes: {item!r} is not BATCHxSIZExC_INxC_OUT")
    out.append(tuple(int(p) for p in parts))
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="conv_algorithms", description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in RELEASED_SHAPES),
                      help="comma-separated BATCHxSIZExC_INxC_OUT (default: the released base model's)")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp

  common.emit({"benchmark": "conv_algorithms", "machine": common.machine(), "dtype": "float32"})
  for (n, size, c_in, c_out) in _parse_shapes(args.shapes):
    kx, kk = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (n, size, size, c_in), jnp.float32)
    kernel = jax.random.normal(kk, (3, 3, c_in, c_out), jnp.float32) / np.sqrt(9 * c_in)
    flop = 2 * 9 * n * size * size * c_in * c_out
    row = {"shape": [n, size, c_in, c_out], "direct_gflop": flop / 1e9}
    outputs = {}
    for name, fn in (("direct", direct_conv3x3), ("winograd", winograd_conv3x3)):
      fwd = jax.jit(fn)
      both = jax.jit(jax.grad(lambda a, k, f=fn: jnp.sum(f(a, k) ** 2), argnums=(0, 1)))
      outputs[name] = np.asarray(fwd(x, kernel))
      # each lambda is timed, and dropped, within this iteration
      row[f"{name}_fwd_s"] = common.time_fn(lambda: fwd(x, kernel), args.repeats)["median_s"]  # noqa: B023
      row[f"{name}_fwd_bwd_s"] = common.time_fn(lambda: both(x, kernel), args.repeats)["median_s"]  # noqa: B023
    row["winograd_max_rel_err"] = reference.rel_err(outputs["winograd"], outputs["direct"])
    row["direct_fwd_gflops"] = flop / row["direct_fwd_s"] / 1e9
    row["direct_fwd_bwd_gflops"] = 3 * flop / row["direct_fwd_bwd_s"] / 1e9
    row["winograd_over_direct_fwd"] = row["winograd_fwd_s"] / row["direct_fwd_s"]
    row["winograd_over_direct_fwd_bwd"] = row["winograd_fwd_bwd_s"] / row["direct_fwd_bwd_s"]
    common.emit(row)
  return 0
