"""Per-step cost of the compiled sampler loop versus one standalone forward pass.

  python -m benchmarks.run sampler_overhead                 # released base config (385M, 64 px)
  python -m benchmarks.run sampler_overhead --preset tiny   # a quick check of the script itself

Measures, for a classifier-free-guided batch (B samples -> one 2B forward per step):
  forward_s   median wall time of a jitted `model.apply` on the doubled batch (text encoded beforehand);
  loop_<n>_s  median wall time of the jitted ancestral sampler (one lax.scan) with n steps;
  step_s      (loop_<n2> - loop_<n1>) / (n2 - n1): the loop's cost per denoising step, with the
              fixed costs (initial noise, text encoding, dispatch) differenced away;
  overhead    step_s / forward_s - 1 (the issue asks for < 5%).
Prints one JSON object per line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time


def _timed(fn) -> tuple[float, float]:
  """(wall seconds, process CPU seconds, all threads) of one run."""
  import jax
  w0, c0 = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn())
  return time.perf_counter() - w0, time.process_time() - c0


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="sampler_overhead", description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="base", choices=["base", "tiny"])
  parser.add_argument("--batch", type=int, default=1, help="samples per batch (the forward sees 2x for CFG)")
  parser.add_argument("--steps", default="2,5", help="two loop lengths to difference")
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np

  from glide_jax.diffusion import guidance, samplers, schedules
  from glide_jax.models import registry

  if args.preset == "base":
    kind, options = registry.PRESETS["base"]
  else:
    kind, options = "text2im", {"num_channels": 32, "channel_mult": "1,2", "attention_resolutions": "4",
                                    "num_res_blocks": 1, "xf_width": 32, "xf_layers": 1, "xf_heads": 2, "text_ctx": 8,
                                    "num_head_channels": 16, "image_size": 8, "n_vocab": 64}
  model = registry.create_model(kind, options)
  size = registry.image_size_of(kind, options)
  shapes = registry.param_shapes(kind, options)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) * 0.02), shapes)
  n_params = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
  text_ctx = int(registry.resolve_options(kind, options)["text_ctx"])
  b = args.batch
  tokens = jnp.asarray(rng.integers(0, 50, (2 * b, text_ctx)), jnp.int32)
  mask = jnp.asarray(np.arange(text_ctx)[None] < 5).repeat(2 * b, 0)
  text = jax.jit(lambda p, t, m: model.apply({"params": p}, t, m, method="encode_text"))(params, tokens, mask)
  print(json.dumps({"benchmark": "sampler_overhead", "preset": args.preset, "params": n_params,
                    "image_size": size, "batch": b, "forward_batch": 2 * b,
                    "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "devices": str(jax.devices()), "jax": jax.__version__}), flush=True)

  x2 = jnp.asarray(rng.standard_normal((2 * b, size, size, 3), np.float32))
  t2 = jnp.full((2 * b,), 500, jnp.int32)
  forward = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, text_cond=c))
  def loop_fn(n: int):
    diffusion = schedules.create_diffusion(1000, "squaredcos_cap_v2", str(n))
    cond = jax.tree_util.tree_map(lambda a: a[:b], text)
    uncond = jax.tree_util.tree_map(lambda a: a[b:], text)

    @jax.jit
    def run(p, c, u, key):
      apply_fn = lambda x, t, cc: model.apply({"params": p}, x, t, text_cond=cc)
      model_fn = guidance.cfg_model_fn(apply_fn, c, u, 3.0)
      return samplers.sample_loop(model_fn, diffusion, (b, size, size, 3), key)
    return lambda: run(params, cond, uncond, jax.random.PRNGKey(0))

  n1, n2 = (int(s) for s in args.steps.split(","))
  runs = {"forward": lambda: forward(params, x2, t2, text), n1: loop_fn(n1), n2: loop_fn(n2)}
  for name, fn in runs.items():  # compile + warm up
    wall, cpu = _timed(fn)
    print(json.dumps({"warmup": str(name), "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}), flush=True)
  # Interleaved rounds (forward, short loop, long loop): a load spike on this shared machine then
  # hits all three in the same round instead of one of them; per-round and median figures are printed.
  results: dict = {name: [] for name in runs}
  for r in range(args.repeats):
    for name, fn in runs.items():
      results[name].append(_timed(fn))
    f, a, c = results["forward"][-1], results[n1][-1], results[n2][-1]
    print(json.dumps({"round": r, "forward_s": round(f[0], 3), "forward_cpu_s": round(f[1], 3),
                      f"loop_{n1}_s": round(a[0], 3), f"loop_{n1}_cpu_s": round(a[1], 3),
                      f"loop_{n2}_s": round(c[0], 3), f"loop_{n2}_cpu_s": round(c[1], 3),
                      "step_cpu_s": round((c[1] - a[1]) / (n2 - n1), 3),
                      "overhead_cpu": round((c[1] - a[1]) / (n2 - n1) / f[1] - 1, 4),
                      "load_avg": round(os.getloadavg()[0], 1)}), flush=True)
  med = {name: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for name, v in results.items()}
  forward_s, forward_cpu = med["forward"]
  step_s = (med[n2][0] - med[n1][0]) / (n2 - n1)
  step_cpu = (med[n2][1] - med[n1][1]) / (n2 - n1)
  print(json.dumps({"forward_s": round(forward_s, 4), "step_s": round(step_s, 4),
                    "overhead": round(step_s / forward_s - 1, 4),
                    "forward_cpu_s": round(forward_cpu, 4), "step_cpu_s": round(step_cpu, 4),
                    "overhead_cpu": round(step_cpu / forward_cpu - 1, 4)}), flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
