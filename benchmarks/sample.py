"""A full 64 px classifier-free-guided sample with each sampler at its default step count, and the
256 px upsampling pass; or, with --bundle and --shapes-accuracy, per-sampler caption accuracy.

  python -m benchmarks.run sample                                  # released sizes, random weights
  python -m benchmarks.run sample --samplers ancestral dpm++ --no-upsample
  python -m benchmarks.run sample --preset tiny --repeats 1 --steps ancestral=4,ddim=3,plms=3,dpm++=2
  python -m benchmarks.run sample --bundle runs/shapes/bundle --shapes-accuracy 200 --batch 25

Ours: `glide_jax.sampling.generate` (text encoded once per prompt, the CFG pair in one
batch, one compiled lax.scan per sampler). Reference: glide-text2im with the same weights, the CFG
model function of its notebook, `p_sample_loop` (ancestral, 100 steps) and `ddim_sample_loop` (DDIM);
it has no PLMS or DPM++. Every ours/reference ratio is against the reference's ancestral sample at
--reference-steps (GLIDE's 100), plus the like-for-like ratio where the reference has the sampler.
`compile_s` is the XLA compile time of the warm-up call, as JAX reports it (backend compile events).
"""
from __future__ import annotations

import argparse
import sys
import time

from benchmarks import common

# Step counts per sampler: GLIDE's 100 for ancestral; the usual counts of the faster solvers.
DEFAULT_STEPS = {"ancestral": "100", "ddim": "50", "plms": "50", "dpm++": "20"}
UPSAMPLE = {"sampler": "ddim", "steps": "fast27", "temperature": 0.997}  # GLIDE's upsampling defaults
PROMPT = "a small red circle on the left"


def parse_steps(spec: str) -> dict[str, str]:
  steps = dict(DEFAULT_STEPS)
  for item in filter(None, spec.split(",")):
    name, value = item.split("=")
    steps[name.strip()] = value.strip()
  return steps


def sampler_model(kind: str, options: dict, params, dtype):
  import jax
  import jax.numpy as jnp

  from glide_jax import sampling
  from glide_jax.data import tokenizers
  from glide_jax.models import registry
  schedule = "linear" if kind == "upsample" else "squaredcos_cap_v2"
  return sampling.SamplerModel(
      kind=kind, model=registry.create_model(kind, options, dtype=dtype),
      params=jax.tree_util.tree_map(jnp.asarray, params), meta={},
      tokenizer=tokenizers.load_tokenizer({"type": "words", "text_ctx": int(options["text_ctx"])}),
      image_size=int(options["image_size"]), options=options,
      diffusion_settings={"steps": 1000, "noise_schedule": schedule, "sampler": "ancestral", "guidance_scale": 3.0})


def ref_cfg_model_fn(model, scale: float):
  """glide-text2im notebook's classifier-free guidance: the pair in one batch, one epsilon for both."""
  import torch

  def fn(x_t, ts, **kwargs):
    half = x_t[: len(x_t) // 2]
    out = model(torch.cat([half, half], 0), ts, **kwargs)
    eps, rest = out[:, :3], out[:, 3:]
    cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond + scale * (cond - uncond)
    return torch.cat([torch.cat([half_eps, half_eps], 0), rest], dim=1)
  return fn


def ref_sample(diff, model_fn, shape, sampler: str, model_kwargs: dict, noise=None):
  import torch
  with torch.inference_mode():
    if sampler == "ancestral":
      return diff.p_sample_loop(model_fn, shape, noise=noise, device="cpu", clip_denoised=True, progress=False,
                                model_kwargs=model_kwargs)
    return diff.ddim_sample_loop(model_fn, shape, noise=noise, device="cpu", clip_denoised=True, progress=False,
                                 model_kwargs=model_kwargs, eta=0.0)


def speed(args, use_ref: bool, threads: int | None) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from glide_jax import sampling
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  steps = parse_steps(args.steps)
  options = common.model_options("text2im", args.preset)
  params = common.random_params("text2im", options, args.seed)
  sm = sampler_model("text2im", options, params, dtype)
  prompts = [PROMPT] * args.batch
  size = sm.image_size
  results = {}
  for name in args.samplers:
    run = lambda name=name: sampling.generate(sm, prompts, jax.random.PRNGKey(args.seed),
                                              guidance_scale=args.guidance_scale, sampler=name, respacing=steps[name])
    r = common.time_fn(run, args.repeats, block=lambda x: x)
    r["compile_s"] = r["warmup_compile_s"]
    results[name] = r
    common.emit({"benchmark": "sample", "side": "ours", "sampler": name, "steps": steps[name], "image_size": size,
                 "batch": args.batch, "forward_batch": 2 * args.batch, "guidance_scale": args.guidance_scale,
                 "dtype": args.dtype, "params": common.count_params(params), **common.round_floats(r)})
  ref = {}
  if use_ref:
    import torch

    from benchmarks import reference
    tmodel = reference.build_model("text2im", options, params).eval()
    tokens, mask = sm.tokenizer.encode_batch(prompts)
    u_tokens, u_mask = sm.tokenizer.empty(args.batch)
    kw = {"tokens": torch.from_numpy(np.concatenate([tokens, u_tokens]).astype(np.int64)),
          "mask": torch.from_numpy(np.concatenate([mask, u_mask]).astype(bool))}
    model_fn = ref_cfg_model_fn(tmodel, args.guidance_scale)
    ref_runs = {"ancestral": args.reference_steps} if args.reference_steps != "0" else {}
    if "ddim" in args.samplers:
      ref_runs["ddim"] = steps["ddim"]
    for name, st in ref_runs.items():
      diff = reference.diffusion(1000, "squaredcos_cap_v2", st)
      g = torch.Generator().manual_seed(args.seed)
      shape = (2 * args.batch, 3, size, size)
      r = common.time_fn(lambda d=diff, s=shape, n=name, g=g: ref_sample(d, model_fn, s, n, kw, torch.randn(s, generator=g)),
                         args.repeats, block=lambda x: x)
      ref[name] = r
      common.emit({"benchmark": "sample", "side": "reference", "sampler": name, "steps": st, "image_size": size,
                   "batch": args.batch, "forward_batch": 2 * args.batch, "torch_threads": threads,
                   **common.round_floats(r)})
  for name, r in results.items():
    row = {"benchmark": "sample", "summary": True, "sampler": name, "steps": steps[name], "ours_s": round(r["median_s"], 4),
           "compile_s": round(r["compile_s"], 3)}
    if "ancestral" in ref:
      row["reference_ancestral_steps"] = args.reference_steps
      row["ratio_vs_reference_ancestral"] = round(r["median_s"] / ref["ancestral"]["median_s"], 4)
    if name in ref and (name != "ancestral" or steps[name] == args.reference_steps):
      row["ratio_same_sampler"] = round(r["median_s"] / ref[name]["median_s"], 4)
    row["load_avg_1m"] = common.machine()["load_avg_1m"]
    common.emit(row)

  if args.no_upsample:
    return
  up_opts = common.model_options("upsample", args.preset)
  up_params = common.random_params("upsample", up_opts, args.seed + 7)
  up = sampler_model("upsample", up_opts, up_params, dtype)
  low = int(up_opts["image_size"]) // 4
  rng = np.random.default_rng(args.seed)
  low_res = rng.uniform(-1, 1, (args.batch, low, low, 3)).astype(np.float32)
  run = lambda: sampling.generate(up, prompts, jax.random.PRNGKey(args.seed), sampler=UPSAMPLE["sampler"],
                                  respacing=UPSAMPLE["steps"], low_res=low_res, temperature=UPSAMPLE["temperature"])
  r = common.time_fn(run, args.repeats, block=lambda x: x)
  r["compile_s"] = r["warmup_compile_s"]
  row = {"benchmark": "sample", "summary": True, "stage": "upsample", "sampler": UPSAMPLE["sampler"],
         "steps": UPSAMPLE["steps"], "image_size": up.image_size, "low_res": low, "batch": args.batch,
         "params": common.count_params(up_params), "ours_s": round(r["median_s"], 4), "compile_s": round(r["compile_s"], 3)}
  if use_ref:
    import torch

    from benchmarks import reference
    tmodel = reference.build_model("upsample", up_opts, up_params).eval()
    tokens, mask = up.tokenizer.encode_batch(prompts)
    low_q = np.asarray(np.round((low_res + 1) * 127.5) / 127.5 - 1, np.float32)  # 8-bit, as ours
    kw = {"tokens": torch.from_numpy(tokens.astype(np.int64)), "mask": torch.from_numpy(mask.astype(bool)),
          "low_res": reference.nchw(low_q)}
    diff = reference.diffusion(1000, "linear", UPSAMPLE["steps"])
    shape = (args.batch, 3, up.image_size, up.image_size)
    g = torch.Generator().manual_seed(args.seed)
    rr = common.time_fn(lambda: ref_sample(diff, tmodel, shape, UPSAMPLE["sampler"], kw,
                                           torch.randn(shape, generator=g) * UPSAMPLE["temperature"]),
                        args.repeats, block=lambda x: x)
    row.update(reference_s=round(rr["median_s"], 4), ratio=round(r["median_s"] / rr["median_s"], 4))
  row["load_avg_1m"] = common.machine()["load_avg_1m"]
  common.emit(row)


def shapes_accuracy(args) -> None:
  """Per sampler: caption accuracy (glide_jax.eval.attributes) of N samples and seconds per batch."""
  import jax
  import numpy as np

  from glide_jax import sampling
  from glide_jax.eval import attributes
  sm = sampling.load_sampler_model(args.bundle)
  steps = parse_steps(args.steps)
  rng = np.random.default_rng(args.seed)
  n = args.shapes_accuracy
  attrs = {a: rng.integers(0, attributes.NUM_CLASSES[a], n) for a in attributes.ATTRIBUTES}
  captions = [attributes.make_caption(*(int(attrs[a][i]) for a in attributes.ATTRIBUTES), template=int(i % 3))
              for i in range(n)]
  rows = {}
  for name in args.samplers:
    images, times = [], []
    for start in range(0, n, args.batch):
      chunk = captions[start:start + args.batch]
      t0 = time.perf_counter()
      out = sampling.generate(sm, chunk, jax.random.fold_in(jax.random.PRNGKey(args.seed), start),
                              guidance_scale=args.guidance_scale, sampler=name, respacing=steps[name])
      times.append(time.perf_counter() - t0)
      images.append(np.clip(np.round((out + 1) * 127.5), 0, 255).astype(np.uint8))
    acc = attributes.caption_accuracy(np.concatenate(images), attrs)
    # The first batch compiles; with one batch only its time is all there is.
    per_batch = float(np.median(times[1:])) if len(times) > 1 else times[0]
    rows[name] = acc["all"]
    common.emit({"benchmark": "sample", "mode": "shapes_accuracy", "bundle": str(args.bundle), "sampler": name,
                 "steps": steps[name], "n": n, "batch": args.batch, "guidance_scale": args.guidance_scale,
                 "accuracy": acc, "seconds_per_batch": round(per_batch, 4), "first_batch_s": round(times[0], 3),
                 "load_avg_1m": common.machine()["load_avg_1m"]})
  if "ancestral" in rows:
    ok = [s for s in rows if rows[s] >= rows["ancestral"] - 0.02]
    common.emit({"benchmark": "sample", "mode": "shapes_accuracy", "summary": True, "accuracy_all": rows,
                 "within_2_points_of_ancestral": ok})


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="sample", description=__doc__.splitlines()[0])
  common.add_common_args(p)
  p.add_argument("--samplers", nargs="+", default=list(DEFAULT_STEPS), choices=list(DEFAULT_STEPS))
  p.add_argument("--steps", default="", help="override step counts, e.g. 'ancestral=100,dpm++=15'")
  p.add_argument("--reference-steps", default="100", help="steps of the reference's ancestral sample; 0 skips it "
                 "(e.g. to time only the upsampling pass against the reference)")
  p.add_argument("--batch", type=int, default=1, help="samples per call (the model sees twice as many with CFG)")
  p.add_argument("--guidance-scale", type=float, default=3.0)
  p.add_argument("--no-upsample", action="store_true", help="skip the 256 px upsampling pass")
  p.add_argument("--bundle", default=None, help="a trained shapes bundle, for --shapes-accuracy")
  p.add_argument("--shapes-accuracy", type=int, default=0, metavar="N",
                 help="with --bundle: sample N shapes captions per sampler and report caption accuracy")
  args = p.parse_args(argv)
  cache = common.enable_compile_cache()
  if args.shapes_accuracy:
    if not args.bundle:
      p.error("--shapes-accuracy needs --bundle")
    common.emit({"benchmark": "sample", "mode": "shapes_accuracy", "machine": common.machine(), "compile_cache": cache})
    shapes_accuracy(args)
    return 0
  use_ref, why = common.reference_status(args.no_reference)
  threads = common.setup_torch(args.threads) if use_ref else None
  common.emit({"benchmark": "sample", "machine": common.machine(), "torch_threads": threads, "reference": why,
               "compile_cache": cache, "preset": args.preset, "steps": parse_steps(args.steps)})
  speed(args, use_ref, threads)
  return 0


if __name__ == "__main__":
  sys.exit(main())
