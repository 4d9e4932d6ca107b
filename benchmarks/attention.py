"""Forward + backward of `layers.attention` per implementation, at the shapes demo model's attentions.

  python -m benchmarks.run attention                      # float32, batch 32, 25 alternated rounds
  python -m benchmarks.run attention --dtype bfloat16 --repeats 5

Shapes (configs/shapes.py at batch 32): the U-Net's 16x16 and 8x8 attentions with the 24 text
tokens prepended, and the text encoder's self-attention. Sides: `default` (implementation None: on
the CPU our einsum), `xla` (jax.nn.dot_product_attention), and `before` (the hand-written attention
this replaced, whose logits were rounded to the compute dtype). The sides run alternately, one call
each per round, so a changing machine load falls on all of them. Prints one JSON line per shape and
side.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from benchmarks import common

SHAPES = {"unet_16x16": (256, 280, 2, 32), "unet_8x8": (64, 88, 4, 32), "text": (24, 24, 4, 64)}


def _before(q, k, v):
  import jax
  import jax.numpy as jnp
  s = q.shape[-1] ** -0.25
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * s, k * s).astype(jnp.float32)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--repeats", type=int, default=25, help="alternated rounds after one warm-up call")
  args = p.parse_args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from glide_jax.models import layers

  dtype = jnp.dtype(args.dtype)
  sides = {"default": layers.attention, "xla": lambda q, k, v: layers.attention(q, k, v, implementation="xla"),
           "before": _before}
  common.emit({"machine": common.machine(), "reference": None,
               "config": {"dtype": args.dtype, "batch": args.batch, "repeats": args.repeats}})
  rng = np.random.default_rng(0)
  for name, (lq, lk, h, d) in SHAPES.items():
    b = args.batch
    q, k, v = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((b, lq, h, d), (b, lk, h, d), (b, lk, h, d)))
    steps = {side: jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v).astype(jnp.float32) ** 2),
                                    argnums=(0, 1, 2))) for side, f in sides.items()}
    for step in steps.values():
      jax.block_until_ready(step(q, k, v))
    times: dict[str, list[float]] = {side: [] for side in steps}
    for _ in range(args.repeats):
      for side, step in steps.items():
        t = time.perf_counter()
        jax.block_until_ready(step(q, k, v))
        times[side].append(time.perf_counter() - t)
    for side, t in times.items():
      common.emit({"shape": name, "side": side, "q": [b, lq, h, d], "k": [b, lk, h, d],
                   "median_s": statistics.median(t), "min_s": min(t), "runs": len(t)})
  return 0


if __name__ == "__main__":
  sys.exit(main())
