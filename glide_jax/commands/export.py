"""`glide-jax export --workdir W --out BUNDLE`: a training workdir -> an inference bundle.

  glide-jax export --workdir /tmp/base --out bundles/base            # EMA params (first rate)
  glide-jax export --workdir /tmp/base --out b --params raw --bf16   # trained params, cast to bf16
  glide-jax export --workdir /tmp/base --out b --serialize           # + the sampler via jax.export

The bundle (glide_jax/bundle.py) holds the params, the model kind and options, the diffusion and
sampling settings of the config, and the tokenizer (its files copied in). `--serialize` also
writes `sampler.jax_exported`: the whole CFG sampling loop, serialized with `jax.export`, so a
server can sample with `jax.export.deserialize(...).call(params, tokens, mask, key)` and no
glide-jax model code. It is traced for a fixed batch (`--serialize-batch`) and guidance scale
(an input), for the config's sampler and step count.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--workdir", required=True, help="a training workdir (glide-jax train)")
  parser.add_argument("--out", default=None, help="bundle directory (default: WORKDIR/bundle)")
  parser.add_argument("--params", choices=("ema", "raw"), default="ema", help="which parameters to export")
  parser.add_argument("--ema-rate", type=float, default=None, help="which EMA rate (default: the first)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  parser.add_argument("--bf16", action="store_true", help="cast floating parameters to bfloat16")
  parser.add_argument("--serialize", action="store_true",
                      help="also write the sampling function serialized with jax.export")
  parser.add_argument("--serialize-batch", type=int, default=1, help="batch size of the serialized sampler")


def load_params(workdir: str, which: str, rate: float | None, step: int | None) -> tuple[Any, int]:
  """Host numpy params from the workdir's checkpoint: trained ('raw') or an EMA copy."""
  from glide_jax.train.train import restore_workdir_item

  restored, step = restore_workdir_item(workdir, "ema" if which == "ema" else "state", step)
  if which == "raw":
    return restored["params"], step
  if rate is None:
    key = next(iter(restored))  # the first rate of the config
  else:
    key = next((k for k in restored if abs(float(k) - rate) < 1e-12), None)
    if key is None:
      raise KeyError(f"the checkpoint has EMA rates {sorted(restored)}, not {rate}")
  return restored[key], step


def bundle_meta(config: Any, tokenizer_spec: dict | None, dtype: str, step: int, which: str) -> dict:
  kind = config.model.kind
  meta = {
      "model": {"kind": kind, "options": json.loads(json.dumps(config.model.options.to_dict()))},
      "diffusion": {"steps": int(config.diffusion.steps), "noise_schedule": config.diffusion.noise_schedule,
                    "timestep_respacing": str(config.sampling.steps), "sampler": config.sampling.sampler,
                    "guidance_scale": float(config.sampling.guidance_scale)},
      "tokenizer": tokenizer_spec,
      "dtype": dtype,
      "source": {"format": "glide-jax-train", "step": int(step), "params": which, "stage": config.stage},
  }
  return meta


def export(workdir: str, out: str | None = None, which: str = "ema", rate: float | None = None,
           step: int | None = None, bf16: bool = False, serialize: bool = False, serialize_batch: int = 1):
  """Writes the bundle; returns its path."""
  from glide_jax import bundle, config_lib

  cfg_file = os.path.join(workdir, "config.json")
  if not os.path.isfile(cfg_file):
    raise FileNotFoundError(f"{workdir} is not a training workdir: {cfg_file} is missing")
  with open(cfg_file) as f:
    config = config_lib.config_from_json(f.read())
  if which == "ema" and not len(config.ema.rates):
    print("glide-jax export: this run keeps no EMA; exporting the trained parameters", file=sys.stderr)
    which = "raw"
  if rate is None and len(config.ema.rates):
    rate = float(config.ema.rates[0])  # the config's first EMA rate
  params, step = load_params(workdir, which, rate, step)
  dtype = "float32"
  if bf16:
    import ml_dtypes
    params = _map(lambda x: x.astype(ml_dtypes.bfloat16) if np.issubdtype(x.dtype, np.floating) else x, params)
    dtype = "bfloat16"
  tok_spec, tok_files = _tokenizer(config)
  out = out or os.path.join(workdir, "bundle")
  meta = bundle_meta(config, tok_spec, dtype, step, which)
  path = bundle.save_bundle(out, params, meta, tok_files)
  if serialize:
    write_serialized_sampler(path, config, params, serialize_batch)
  return path


def _map(fn, tree):
  if isinstance(tree, dict):
    return {k: _map(fn, v) for k, v in tree.items()}
  return fn(np.asarray(tree))


def _tokenizer(config) -> tuple[dict | None, dict | None]:
  from glide_jax.data.pipeline import tokenizer_from_config
  try:
    tok = tokenizer_from_config(config.data)
  except (ValueError, OSError) as e:
    print(f"glide-jax export: warning: no tokenizer in the bundle ({e})", file=sys.stderr)
    return None, None
  spec = dict(tok.spec())
  files = {os.path.basename(str(p)): str(p) for p in (spec.pop("files", None) or {}).values() if p}
  return spec, files or None


def sampling_function(config, params_dtype=None):
  """(params, tokens [B, L], mask [B, L], u_tokens, u_mask, key, guidance_scale) -> images [B, H, W, 3]."""
  import jax
  import jax.numpy as jnp

  from glide_jax.diffusion import guidance, samplers, schedules
  from glide_jax.models import registry

  kind = registry.canonical_kind(config.model.kind)
  if kind not in ("text2im",):
    raise ValueError(f"--serialize supports text2im bundles, not {kind!r}")
  options = dict(config.model.options)
  model = registry.create_model(kind, options)
  size = registry.image_size_of(kind, options)
  diffusion = schedules.create_diffusion(int(config.diffusion.steps), config.diffusion.noise_schedule,
                                         str(config.sampling.steps))
  sampler = {"plms": "plms", "ddim": "ddim", "ddpm": "ancestral"}.get(config.sampling.sampler, config.sampling.sampler)

  def fn(params, tokens, mask, u_tokens, u_mask, key, guidance_scale):
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    variables = {"params": params}
    cond = model.apply(variables, tokens, mask, method="encode_text")
    uncond = model.apply(variables, u_tokens, u_mask, method="encode_text")

    def apply_fn(x, t, text_cond):
      return model.apply(variables, x, t, text_cond=text_cond)

    model_fn = guidance.cfg_model_fn(apply_fn, cond, uncond, guidance_scale)
    return samplers.sample_loop(model_fn, diffusion, (tokens.shape[0], size, size, 3), key, sampler=sampler)
  return fn, size


def write_serialized_sampler(path, config, params, batch: int) -> None:
  import jax
  import jax.numpy as jnp

  fn, _ = sampling_function(config)
  L = int(config.model.options.text_ctx)
  args = (jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype), params),
          jax.ShapeDtypeStruct((batch, L), jnp.int32), jax.ShapeDtypeStruct((batch, L), jnp.bool_),
          jax.ShapeDtypeStruct((batch, L), jnp.int32), jax.ShapeDtypeStruct((batch, L), jnp.bool_),
          jax.ShapeDtypeStruct((2,), jnp.uint32), jax.ShapeDtypeStruct((), jnp.float32))

  def with_raw_key(p, t, m, ut, um, key_data, scale):
    return fn(p, t, m, ut, um, jax.random.wrap_key_data(key_data), scale)

  exported = jax.export.export(jax.jit(with_raw_key))(*args)
  tmp = os.path.join(str(path), ".sampler.jax_exported.tmp")
  with open(tmp, "wb") as f:
    f.write(exported.serialize())
  os.replace(tmp, os.path.join(str(path), "sampler.jax_exported"))
  with open(os.path.join(str(path), "sampler.json"), "w") as f:
    json.dump({"inputs": ["params", "tokens [B, L] int32", "mask [B, L] bool", "uncond tokens", "uncond mask",
                          "key data [2] uint32", "guidance_scale [] float32"],
               "batch": batch, "text_ctx": L, "output": "images [B, H, W, 3] float32 in [-1, 1]",
               "sampler": config.sampling.sampler, "steps": str(config.sampling.steps)}, f, indent=2)


def run(args: argparse.Namespace) -> int:
  try:
    path = export(args.workdir, args.out, args.params, args.ema_rate, args.step, args.bf16, args.serialize,
                  args.serialize_batch)
  except (FileNotFoundError, KeyError, ValueError) as e:
    print(f"glide-jax export: {e}", file=sys.stderr)
    return 2
  print(f"wrote {path}")
  return 0
