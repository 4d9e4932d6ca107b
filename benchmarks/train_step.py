"""One optimizer step (batch 4) of the released base model and of the upsampler; or of the demo.

  python -m benchmarks.run train_step                       # base and upsample, released sizes
  python -m benchmarks.run train_step --stages base --repeats 3
  python -m benchmarks.run train_step --preset tiny --repeats 1
  python -m benchmarks.run train_step --stages shapes       # configs/shapes.py as it trains (batch 32)
  python -m benchmarks.run train_step --stages shapes shapes_distill --batch 16 --no-reference

Ours: the real train step (glide_jax.train.step: caption dropout, timestep and noise draws, hybrid
loss, AdamW, EMA, non-finite skip) jitted with the state donated, on one device, from
configs/base.py and configs/upsample.py (variant=released) at --dtype (float32 by default; the
configs ask bf16); `shapes` is configs/shapes.py itself (its model, batch and recipe; --batch
and --dtype override them, --preset tiny or micro shrinks the model); `shapes_distill` is
configs/shapes_distill.py, the demo's distill step (student and teacher with random weights, no
reference side), so one run gives its cost as a ratio to the base demo's step. Reference: glide-text2im's
model in train mode with the same weights, the same hybrid loss, torch AdamW and an EMA update.
Prints the compile time of our step, the median step time, the achieved GFLOP/s (XLA's FLOP count
/ time), TFLOP/s and MFU against the chip's peak (glide_jax.hardware) and the ratio ours/reference.
"""
from __future__ import annotations

import argparse
import sys

from benchmarks import common

STAGES = {"base": ("configs.base", "text2im"), "upsample": ("configs.upsample", "upsample"),
          "shapes": ("configs.shapes", "text2im"), "shapes_distill": ("configs.shapes_distill", "text2im")}
DEMO_STAGES = ("shapes", "shapes_distill")  # the demo configs' own model, batch and recipe
DEFAULT_STAGES = ("base", "upsample")


def make_batch(stage: str, options: dict, batch: int, low_res_size: int, seed: int) -> dict:
  import numpy as np
  rng = np.random.default_rng(seed + 2)
  size, ctx = int(options["image_size"]), int(options["text_ctx"])
  out = {"image": rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
         "tokens": rng.integers(0, min(1000, int(options.get("n_vocab", 1000))), (batch, ctx)).astype(np.int32),
         "mask": np.arange(ctx)[None].repeat(batch, 0) < rng.integers(1, ctx, (batch, 1))}
  if stage == "upsample":
    out["low_res"] = rng.uniform(-1, 1, (batch, low_res_size, low_res_size, 3)).astype(np.float32)
  return out


def benchmark_config(stage_name: str, args):
  """configs/{base,upsample}.py:variant=released at the benchmark's sizes, dtype and batch; or
  configs/shapes.py with its own model (tiny or micro under those presets), batch and dtype unless given."""
  import importlib
  module, kind = STAGES[stage_name]
  if stage_name in DEMO_STAGES:
    config = importlib.import_module(module).get_config("")
    preset = args.preset if args.preset in ("tiny", "micro") else "shapes"
    options = common.model_options(kind, preset, args.attention_impl)
    if config.model.options.get("guidance_embed"):
      options["guidance_embed"] = True
    if preset != "shapes":
      options["n_vocab"] = int(config.model.options["n_vocab"])  # the demo's closed vocabulary
    with config.unlocked():
      config.model.options = options
      config.model.dtype = args.dtype or config.model.dtype
      config.batch_size = args.batch or config.batch_size
      config.microbatches = 1
      config.data.tokenizer.text_ctx = int(options["text_ctx"])
    return config
  config = importlib.import_module(module).get_config("variant=released")
  options = common.model_options(kind, args.preset, args.attention_impl)
  with config.unlocked():
    config.model.options = options
    config.model.dtype = args.dtype or "float32"
    config.batch_size = args.batch or 4
    config.microbatches = 1
    config.data.tokenizer.text_ctx = int(options["text_ctx"])
    if stage_name == "upsample":
      config.data.low_res_size = int(options["image_size"]) // 4
  return config


def build_program(config, devices):
  """The trainer's program (glide_jax/train/program.py) on `devices`: the step timed here."""
  from glide_jax.train import program as program_lib
  return program_lib.build(config, devices=devices)


def demo_step(config, args):
  """One donated train step of a demo `config` (random weights, the benchmark's batch), compiled:
  returns (run, compile_s, flops, meta); `run()` advances the state and returns the loss. Shared
  by the benchmarks that alternate demo programs (dtype, demo_variants)."""
  import jax
  program = build_program(config, jax.devices()[:1])
  options = dict(config.model.options)
  params = common.random_params("text2im", options, args.seed)
  holder = [program.init_state(jax.random.key(args.seed), params=params)]
  batch = program.put_batch(make_batch("shapes", options, int(config.batch_size), 0, args.seed))
  rng = program.put_rng(jax.random.key(args.seed + 3))
  compiled, compile_s, flops, fingerprint = common.compile_program_timed(program, options=common.compiler_options(args))

  def run():
    holder[0], metrics = compiled(holder[0], batch, rng)
    return metrics["loss"]
  return run, compile_s, flops, {"batch": int(config.batch_size), "params": common.count_params(params),
                                 "program_fingerprint": fingerprint}


def run_stage(stage_name: str, args, use_ref: bool, threads: int | None) -> None:
  import jax
  import numpy as np

  _, kind = STAGES[stage_name]
  config = benchmark_config(stage_name, args)
  phase = common.Phases("train_step", stage=stage_name, dtype=str(config.model.dtype))
  options = dict(config.model.options)
  program = build_program(config, jax.devices()[:1])
  params = common.random_params(kind, options, args.seed)
  phase("params", params=common.count_params(params))
  state = jax.block_until_ready(program.init_state(jax.random.key(args.seed), params=params))
  phase("state")
  ema_rates = program.ema_rates
  low = int(config.data.get("low_res_size", 0) or 0)
  host_batch = make_batch(stage_name, options, int(config.batch_size), low, args.seed)
  batch = program.put_batch(host_batch)
  rng = program.put_rng(jax.random.key(args.seed + 3))
  cfg = {"stage": stage_name, "preset": args.preset, "kind": kind, "params": common.count_params(params),
         "batch": int(config.batch_size), "image_size": int(options["image_size"]), "dtype": str(config.model.dtype),
         "prediction": str(config.diffusion.get("prediction", "epsilon")), "attention_impl": args.attention_impl,
         "optimizer": "adamw", "ema_rates": list(ema_rates), "dropout": float(options["dropout"])}
  compiled, compile_s, flops, fingerprint = common.compile_program_timed(program, options=common.compiler_options(args),
                                                                         phase=phase)
  phase("compiled", compile_s=round(compile_s, 3))
  holder = [state]

  def run_ours():
    holder[0], metrics = compiled(holder[0], batch, rng)
    return metrics["loss"]
  ours = common.time_fn(run_ours, args.repeats)
  loss = float(run_ours())
  phase("timed", runs=ours["runs"])
  common.emit({"benchmark": "train_step", "side": "ours", "config": cfg, "program_fingerprint": fingerprint,
               "shapes": {k: list(v.shape) for k, v in host_batch.items()}, "compile_s": round(compile_s, 3),
               "gflop": flops and flops / 1e9, "gflops_per_s": flops and flops / 1e9 / ours["median_s"],
               "loss": loss, **common.round_floats(ours)})
  summary = {"benchmark": "train_step", "summary": True, "config": cfg, "ours_s": round(ours["median_s"], 4),
             "steps_per_s": 1.0 / ours["median_s"], "compile_s": round(compile_s, 3), "loss": loss,
             "ours_gflops_per_s": flops and round(flops / 1e9 / ours["median_s"], 2),
             "gflop": flops and flops / 1e9, **common.utilisation(flops, ours["median_s"], str(config.model.dtype))}
  holder.clear()  # free the donated state before the reference allocates its own
  del state

  if use_ref and stage_name != "shapes_distill":  # the reference has no distill step
    import torch

    from benchmarks import reference
    tmodel = reference.build_model(kind, options, params).train()
    diff = reference.diffusion(int(config.diffusion.steps), str(config.diffusion.noise_schedule), "")
    oc = config.optimizer
    opt = torch.optim.AdamW(tmodel.parameters(), lr=float(oc.lr), betas=(float(oc.b1), float(oc.b2)),
                            eps=float(oc.eps), weight_decay=float(oc.weight_decay))
    ema = [p.detach().clone() for p in tmodel.parameters()]
    g = torch.Generator().manual_seed(args.seed)
    x0 = reference.nchw(host_batch["image"])
    kw = {"tokens": torch.from_numpy(host_batch["tokens"].astype(np.int64)), "mask": torch.from_numpy(host_batch["mask"])}
    if "low_res" in host_batch:
      kw["low_res"] = reference.nchw(host_batch["low_res"])

    def run_ref():
      t = torch.randint(0, diff.num_timesteps, (int(config.batch_size),), generator=g)
      noise = torch.randn(x0.shape, generator=g)
      opt.zero_grad(set_to_none=True)
      loss = reference.hybrid_loss(tmodel, diff, x0, t, noise, kw)
      loss.backward()
      if float(oc.grad_clip_norm) > 0:
        torch.nn.utils.clip_grad_norm_(tmodel.parameters(), float(oc.grad_clip_norm))
      opt.step()
      with torch.no_grad():
        torch._foreach_lerp_(ema, [p.detach() for p in tmodel.parameters()], 1.0 - ema_rates[0])
      return loss
    ref = common.time_fn(run_ref, args.repeats, block=lambda r: r)
    common.emit({"benchmark": "train_step", "side": "reference", "config": cfg, "torch": torch.__version__,
                 "torch_threads": threads, "loss": float(run_ref().detach()),
                 "gflops_per_s": flops and flops / 1e9 / ref["median_s"], **common.round_floats(ref)})
    summary.update(reference_s=round(ref["median_s"], 4), ratio=round(ours["median_s"] / ref["median_s"], 4),
                   reference_gflops_per_s=flops and round(flops / 1e9 / ref["median_s"], 2))
  summary["load_avg_1m"] = common.machine()["load_avg_1m"]
  common.emit(summary)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="train_step", description=__doc__.splitlines()[0])
  common.add_common_args(p)
  p.add_argument("--batch", type=int, default=None, help="default 4; the config's own for shapes")
  p.add_argument("--stages", nargs="+", default=list(DEFAULT_STAGES), choices=list(STAGES))
  p.set_defaults(dtype=None)  # base/upsample: float32; shapes: its config's own
  args = p.parse_args(argv)
  cache = common.enable_compile_cache()
  use_ref, why = common.reference_status(args.no_reference)
  threads = common.setup_torch(args.threads) if use_ref else None
  common.emit({"benchmark": "train_step", "machine": common.machine(), "torch_threads": threads, "reference": why,
               "compile_cache": cache})
  for name in args.stages:
    run_stage(name, args, use_ref, threads)
  return 0


if __name__ == "__main__":
  sys.exit(main())
