"""One CLIP-guided denoising step: the base U-Net's forward plus the noised CLIP's image gradient.

  python -m benchmarks.run clip_guidance                       # released base + released noised CLIP
  python -m benchmarks.run clip_guidance --preset tiny --repeats 1

This is what every step of a CLIP-guided sample runs (GLIDE's notebook: no classifier-free guidance,
the text encoded once): ours is one jitted function of (x_t, t) returning epsilon and
grad_scale * d/dx_t <z_text, z_image(x_t, t)>; the reference is glide-text2im's U-Net forward plus
its `CLIPModel.cond_fn`, on identical weights (max_rel_err compares the two gradients).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

from benchmarks import common

TINY_CLIP = {"image_size": 16, "patch_size": 4, "n_embd": 32, "n_head_state_text": 16, "n_head_text": 2,
             "n_xf_blocks_text": 1, "n_head_state_image": 16, "n_head_image": 2, "n_xf_blocks_image": 1}


def ref_clip(options: dict, params):
  """glide-text2im's CLIPModel built from `options` (via a config.yaml) with our params."""
  import torch
  import yaml
  from glide_text2im.clip.model_creation import create_clip_model

  from glide_jax.interop import clip_keys
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "config.yaml")
    with open(path, "w") as f:
      yaml.safe_dump(options, f)
    model = create_clip_model(config_path=path, device=torch.device("cpu"))
  state = clip_keys.export_clip_state_dict(params, options)
  for tower, module in (("text", model.text_encoder), ("image", model.image_encoder)):
    sub = {k[len(tower) + 1:]: torch.from_numpy(v) for k, v in state.items() if k.startswith(tower + "/")}
    module.load_state_dict(sub, strict=True)
  return model


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="clip_guidance", description=__doc__.splitlines()[0])
  common.add_common_args(p)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--grad-scale", type=float, default=3.0)
  args = p.parse_args(argv)
  cache = common.enable_compile_cache()
  import jax
  import jax.numpy as jnp
  import numpy as np

  from glide_jax.diffusion import guidance
  from glide_jax.models import clip as clip_lib
  from glide_jax.models import registry

  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  options = common.model_options("text2im", args.preset)
  clip_opts = clip_lib.resolve_clip_options(TINY_CLIP if args.preset == "tiny" else {})
  model = registry.create_model("text2im", options, dtype=dtype)
  clip_model = clip_lib.create_clip_model(clip_opts, dtype=dtype)
  params = common.random_params("text2im", options, args.seed)
  clip_params = common.random_params("noised_clip", clip_opts, args.seed + 5)
  use_ref, why = common.reference_status(args.no_reference)
  threads = common.setup_torch(args.threads) if use_ref else None
  b, size, ctx = args.batch, int(options["image_size"]), int(options["text_ctx"])
  rng = np.random.default_rng(args.seed + 1)
  x = rng.standard_normal((b, size, size, 3)).astype(np.float32)
  t = np.full((b,), 500, np.int32)
  tokens = rng.integers(0, 1000, (b, ctx)).astype(np.int32)
  mask = np.arange(ctx)[None].repeat(b, 0) < 12
  clip_len = int(clip_opts["max_text_len"])
  clip_tokens = rng.integers(0, 1000, (b, clip_len)).astype(np.int32)
  clip_text_len = np.full((b,), 8, np.int32)
  config = {"preset": args.preset, "batch": b, "image_size": size, "dtype": args.dtype,
            "unet_params": common.count_params(params), "clip_params": common.count_params(clip_params),
            "grad_scale": args.grad_scale}
  common.emit({"benchmark": "clip_guidance", "config": config, "machine": common.machine(),
               "torch_threads": threads, "reference": why, "compile_cache": cache})

  dp, dc = jax.device_put(params), jax.device_put(clip_params)
  # Computed once per prompt, outside the step (as the sampler does).
  text = jax.jit(lambda p_, k_, m_: model.apply({"params": p_}, k_, m_, method="encode_text"))(dp, tokens, mask)
  z_text = jax.jit(lambda c_, k_, l_: clip_model.apply({"params": c_}, k_, l_, method="encode_text"))(
      dc, clip_tokens, clip_text_len)

  def step(p_, c_, z_, x_, t_, text_):
    eps = model.apply({"params": p_}, x_, t_, text_cond=text_)
    grad = guidance.clip_cond_fn(clip_model, c_, z_, args.grad_scale)(x_, t_)
    return eps, grad
  dx, dt = jnp.asarray(x), jnp.asarray(t)
  compiled, compile_s, flops = common.compile_timed(jax.jit(step), dp, dc, z_text, dx, dt, text,
                                                    options=common.compiler_options(args))
  ours = common.time_fn(lambda: compiled(dp, dc, z_text, dx, dt, text), args.repeats)
  _, grad = compiled(dp, dc, z_text, dx, dt, text)
  common.emit({"benchmark": "clip_guidance", "side": "ours", "shapes": {"x": list(x.shape), "tokens": list(tokens.shape)},
               "compile_s": round(compile_s, 3), "gflop": flops and flops / 1e9,
               "gflops_per_s": flops and flops / 1e9 / ours["median_s"], **common.round_floats(ours)})
  summary = {"benchmark": "clip_guidance", "summary": True, "config": config, "ours_s": round(ours["median_s"], 4),
             "compile_s": round(compile_s, 3)}
  if use_ref:
    import torch

    from benchmarks import reference
    tmodel = reference.build_model("text2im", options, params).eval()
    cmodel = ref_clip(clip_opts, clip_params)
    with torch.no_grad():
      z = cmodel.text_encoder(torch.from_numpy(clip_tokens.astype(np.int64)),
                              torch.from_numpy(clip_text_len.astype(np.int64)))
      z_t = z / (torch.linalg.norm(z, dim=-1, keepdim=True) + 1e-12)
    tx, tt = reference.nchw(x), torch.from_numpy(t.astype(np.int64))
    ttok, tmask = torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(mask)

    def cond_fn(xx, ts):  # CLIPModel.cond_fn's body, with z_t from our tokens
      with torch.enable_grad():
        x_var = xx.detach().requires_grad_(True)
        loss = torch.exp(cmodel.logit_scale) * (z_t * cmodel.image_embeddings(x_var, ts)).sum()
        return torch.autograd.grad(loss, x_var)[0].detach() * args.grad_scale

    def run_ref():
      with torch.no_grad():
        eps = tmodel(tx, tt, tokens=ttok, mask=tmask)
      return eps, cond_fn(tx, tt)
    ref = common.time_fn(run_ref, args.repeats, block=lambda r: r)
    err = reference.rel_err(np.asarray(grad, np.float32), reference.nhwc(run_ref()[1]))
    common.emit({"benchmark": "clip_guidance", "side": "reference", "torch_threads": threads,
                 "max_rel_err_clip_grad": err, **common.round_floats(ref)})
    summary.update(reference_s=round(ref["median_s"], 4), ratio=round(ours["median_s"] / ref["median_s"], 4),
                   max_rel_err_clip_grad=err)
  summary["load_avg_1m"] = common.machine()["load_avg_1m"]
  common.emit(summary)
  return 0


if __name__ == "__main__":
  sys.exit(main())
