"""bfloat16 against float32 compute on this machine, alternated in one process.

  python -m benchmarks.run dtype                         # demo train step and released base forward
  python -m benchmarks.run dtype --what demo_step --rounds 9
  python -m benchmarks.run dtype --preset tiny --rounds 2 --fast-compile   # the harness (tests)

Two programs, each compiled once per compute dtype (parameters stay float32, as in training):
`demo_step`, the demo's train step (configs/shapes.py, its batch, the trainer's program with the
state donated), and `forward`, the released base model's CFG-pair forward (batch 2, 64 px). After
one warm-up call each, the two dtypes run in alternating rounds (float32, bf16, float32, ...), so
load on a shared machine hits both alike; the summary gives each median and the ratio
bf16 / float32 (below 1: bf16 is faster). On a CPU without native bf16 arithmetic XLA emulates it,
so the ratio is the figure, not either time.
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time

from benchmarks import common

WHAT = ("demo_step", "forward")
DTYPES = ("float32", "bfloat16")


def _demo_step(args, dtype: str):
  """A zero-argument callable running one donated train step of the demo config at `dtype`."""
  from benchmarks import train_step
  ns = argparse.Namespace(preset=args.preset if args.preset in ("tiny", "micro") else "shapes",
                          attention_impl=args.attention_impl, dtype=dtype, batch=args.batch)
  return train_step.demo_step(train_step.benchmark_config("shapes", ns), args)


def _forward(args, dtype: str):
  import jax
  import jax.numpy as jnp

  from benchmarks import forward
  from glide_jax.models import registry
  options = common.model_options("text2im", args.preset, args.attention_impl)
  model = registry.create_model("text2im", options, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
  params = jax.device_put(common.random_params("text2im", options, args.seed))
  x, t, tokens, mask = (jnp.asarray(a) for a in forward.inputs(options, 2, args.seed))
  fwd = jax.jit(lambda p_, x_, t_, k_, m_: model.apply({"params": p_}, x_, t_, k_, m_))
  compiled, compile_s, flops = common.compile_timed(fwd, params, x, t, tokens, mask,
                                                    options=common.compiler_options(args))
  text = fwd.lower(params, x, t, tokens, mask).as_text()
  meta = {"batch": 2, "params": common.count_params(params),
          "program_fingerprint": hashlib.sha256(text.encode()).hexdigest()}
  return (lambda: compiled(params, x, t, tokens, mask)), compile_s, flops, meta


BUILDERS = {"demo_step": _demo_step, "forward": _forward}


def measure(what: str, args) -> dict:
  """Builds both dtypes' programs, warms each up, then alternates them for `args.rounds` rounds."""
  import jax
  runs, info = {}, {}
  for dtype in DTYPES:
    fn, compile_s, flops, meta = BUILDERS[what](args, dtype)
    jax.block_until_ready(fn())  # warm-up
    runs[dtype] = fn
    info[dtype] = {"compile_s": round(compile_s, 2), "gflop": flops and round(flops / 1e9, 3), **meta}
  times = {d: [] for d in DTYPES}
  for r in range(max(1, args.rounds)):
    order = DTYPES if r % 2 == 0 else DTYPES[::-1]
    for dtype in order:
      t0 = time.perf_counter()
      jax.block_until_ready(runs[dtype]())
      times[dtype].append(time.perf_counter() - t0)
  med = {d: statistics.median(v) for d, v in times.items()}
  for dtype in DTYPES:
    common.emit({"benchmark": "dtype", "what": what, "dtype": dtype, "median_s": round(med[dtype], 4),
                 "runs_s": [round(v, 4) for v in times[dtype]], **info[dtype]})
  return {"what": what, "float32_s": round(med["float32"], 4), "bfloat16_s": round(med["bfloat16"], 4),
          "bf16_over_f32": round(med["bfloat16"] / med["float32"], 4)}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="dtype", description=__doc__.splitlines()[0])
  common.add_common_args(p)
  p.add_argument("--what", nargs="+", default=list(WHAT), choices=list(WHAT))
  p.add_argument("--rounds", type=int, default=7, help="alternating rounds after the warm-up")
  p.add_argument("--batch", type=int, default=None, help="demo_step batch (default: the config's)")
  args = p.parse_args(argv)
  common.enable_compile_cache()
  common.emit({"benchmark": "dtype", "machine": common.machine(), "preset": args.preset, "rounds": args.rounds})
  results = [measure(w, args) for w in args.what]
  common.emit({"benchmark": "dtype", "summary": True, "results": results,
               "load_avg_1m": common.machine()["load_avg_1m"]})
  return 0


if __name__ == "__main__":
  sys.exit(main())
