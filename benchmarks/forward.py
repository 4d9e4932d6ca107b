"""One classifier-free-guidance pair forward pass of the base model (batch 2: prompt + empty caption).

  python -m benchmarks.run forward                    # released base (385M), 64 px, 128 tokens
  python -m benchmarks.run forward --preset tiny --repeats 1

Both sides run the full forward (text transformer + U-Net) on identical weights and inputs; ours is
one jitted `model.apply`. Also times ours with the text encoding precomputed (`text_cond`), which is
what the samplers run per step. Prints JSON lines; the last one is the summary with the ratio
ours/reference and the achieved GFLOP/s (XLA's FLOP count of our program / median time).
"""
from __future__ import annotations

import argparse
import sys

from benchmarks import common


def inputs(options: dict, batch: int, seed: int):
  import numpy as np
  rng = np.random.default_rng(seed + 1)
  size, ctx = int(options["image_size"]), int(options["text_ctx"])
  x = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
  t = np.full((batch,), 500, np.int32)
  tokens = rng.integers(0, 1000, (batch, ctx)).astype(np.int32)
  mask = np.zeros((batch, ctx), bool)
  mask[0, :12] = True  # a 12-token prompt, then the empty caption (all padding)
  tokens[1] = 0
  return x, t, tokens, mask


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="forward", description=__doc__.splitlines()[0])
  common.add_common_args(p)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--full-only", action="store_true", help="skip the U-Net with the text encoding precomputed")
  args = p.parse_args(argv)

  cache = common.enable_compile_cache()
  import jax
  import jax.numpy as jnp
  import numpy as np

  from glide_jax.models import registry

  kind = "text2im"
  options = common.model_options(kind, args.preset, args.attention_impl)
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  model = registry.create_model(kind, options, dtype=dtype)
  params = common.random_params(kind, options, args.seed)
  x, t, tokens, mask = inputs(options, args.batch, args.seed)
  use_ref, why = common.reference_status(args.no_reference)
  threads = common.setup_torch(args.threads) if use_ref else None
  config = {"preset": args.preset, "kind": kind, "params": common.count_params(params), "batch": args.batch,
            "image_size": int(options["image_size"]), "text_ctx": int(options["text_ctx"]), "dtype": args.dtype,
            "attention_impl": args.attention_impl}
  common.emit({"benchmark": "forward", "config": config, "machine": common.machine(), "torch_threads": threads,
               "reference": why, "compile_cache": cache})

  dparams = jax.device_put(params)
  dx, dt, dtok, dmask = (jnp.asarray(a) for a in (x, t, tokens, mask))
  fwd = jax.jit(lambda p_, x_, t_, k_, m_: model.apply({"params": p_}, x_, t_, k_, m_))
  compiled, compile_s, flops = common.compile_timed(fwd, dparams, dx, dt, dtok, dmask, options=common.compiler_options(args))
  ours = common.time_fn(lambda: compiled(dparams, dx, dt, dtok, dmask), args.repeats)
  out = np.asarray(compiled(dparams, dx, dt, dtok, dmask), np.float32)
  shapes = {"x": list(x.shape), "tokens": list(tokens.shape), "out": list(out.shape)}
  common.emit({"benchmark": "forward", "side": "ours", "what": "text encoder + U-Net", "shapes": shapes,
               "compile_s": round(compile_s, 3), "gflop": flops and flops / 1e9,
               "gflops_per_s": flops and flops / 1e9 / ours["median_s"], **common.round_floats(ours)})

  if not args.full_only:
    # What a sampler step runs: the U-Net with the text encoded beforehand.
    text = jax.jit(lambda p_, k_, m_: model.apply({"params": p_}, k_, m_, method="encode_text"))(dparams, dtok, dmask)
    unet = jax.jit(lambda p_, x_, t_, c_: model.apply({"params": p_}, x_, t_, text_cond=c_))
    c_unet, _, flops_unet = common.compile_timed(unet, dparams, dx, dt, text, options=common.compiler_options(args))
    cached = common.time_fn(lambda: c_unet(dparams, dx, dt, text), args.repeats)
    common.emit({"benchmark": "forward", "side": "ours", "what": "U-Net, text_cond precomputed",
                 "gflop": flops_unet and flops_unet / 1e9,
                 "gflops_per_s": flops_unet and flops_unet / 1e9 / cached["median_s"], **common.round_floats(cached)})

  summary = {"benchmark": "forward", "summary": True, "config": config, "ours_s": round(ours["median_s"], 4),
             "ours_gflops_per_s": flops and round(flops / 1e9 / ours["median_s"], 2),
             "gflop": flops and flops / 1e9, **common.utilisation(flops, ours["median_s"], args.dtype),
             "load_avg_1m": common.machine()["load_avg_1m"]}
  if use_ref:
    import torch

    from benchmarks import reference
    tmodel = reference.build_model(kind, options, params).eval()
    tx, tt = reference.nchw(x), torch.from_numpy(t.astype(np.int64))
    ttok, tmask = torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(mask)

    def run_ref():
      with torch.inference_mode():
        return tmodel(tx, tt, tokens=ttok, mask=tmask)
    ref = common.time_fn(run_ref, args.repeats, block=lambda r: r)
    err = reference.rel_err(out, reference.nhwc(run_ref()))
    common.emit({"benchmark": "forward", "side": "reference", "torch": torch.__version__, "torch_threads": threads,
                 "max_rel_err": err, "gflops_per_s": flops and flops / 1e9 / ref["median_s"],
                 **common.round_floats(ref)})
    summary.update(reference_s=round(ref["median_s"], 4), ratio=round(ours["median_s"] / ref["median_s"], 4),
                   reference_gflops_per_s=flops and round(flops / 1e9 / ref["median_s"], 2), max_rel_err=err)
  common.emit(summary)
  return 0


if __name__ == "__main__":
  sys.exit(main())
