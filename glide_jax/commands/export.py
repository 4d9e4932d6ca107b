"""`glide-jax export --workdir W --out BUNDLE`: a training workdir -> an inference bundle.

  glide-jax export --workdir /tmp/base --out bundles/base            # EMA params (first rate)
  glide-jax export --workdir /tmp/base --out b --params raw --bf16   # trained params, cast to bf16
  glide-jax export --workdir /tmp/base --out b --serialize           # + the sampler via jax.export

The bundle (glide_jax/bundle.py) holds the params, the model kind and options, the diffusion and
sampling settings of the config, and the tokenizer (its files copied in). `--serialize` also
writes `sampler.jax_exported`: the whole sampling loop, serialized with `jax.export`, so a server
can sample with no glide-jax model code:

  f = jax.export.deserialize(open("sampler.jax_exported", "rb").read())
  text2im           f.call(params, tokens, mask, uncond_tokens, uncond_mask, key_data, guidance_scale)
  inpaint           f.call(params, tokens, mask, uncond_tokens, uncond_mask, image, image_mask,
                           key_data, guidance_scale)
  upsample          f.call(params, tokens, mask, low_res, key_data, temperature)
  upsample_inpaint  f.call(params, tokens, mask, low_res, image, image_mask, key_data, temperature)

params: the bundle's tree (`bundle.load_bundle`); tokens [B, L] int32 and mask [B, L] bool from the
bundle's tokenizer, uncond_* its empty caption; key_data [2] uint32 = jax.random.key_data(key);
guidance_scale and temperature float32 scalars; image [B, S, S, 3] in [-1, 1] with image_mask
[B, S, S, 1] (1 = keep that pixel); low_res [B, s, s, 3] in [-1, 1], s = the config's
data.low_res_size (rounded to 8 bits inside, as `sampling.generate` does). Returns images
[B, S, S, 3] float32 in [-1, 1]. Text2im and inpaint use classifier-free guidance; the upsamplers
none (as GLIDE samples them), with x_T scaled by `temperature` (GLIDE's 0.997). The function is
traced for a fixed batch B (`--serialize-batch`), the config's sampler and step count;
`sampler.json` lists the inputs with their shapes. It samples exactly what `sampling.generate` does
for the same inputs and key.
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
  from glide_jax.train.checkpoint import restore_workdir_item

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
  from glide_jax.sampling import settings_from_config
  kind = config.model.kind
  meta = {
      "model": {"kind": kind, "options": json.loads(json.dumps(config.model.options.to_dict()))},
      "diffusion": settings_from_config(config),
      "tokenizer": tokenizer_spec,
      "dtype": dtype,
      "source": {"format": "glide-jax-train", "step": int(step), "params": which, "stage": config.stage},
  }
  if config.stage == "distill":
    meta["distill"] = distill_meta(config, step)
    if meta["distill"]["distilled_steps"]:  # sample it as it was distilled: DDIM, its count, trailing
      meta["diffusion"].update(sampler="ddim", timestep_respacing=str(meta["distill"]["distilled_steps"][-1]))
    else:  # guidance-distilled only: any sampler and grid, as the teacher
      meta["diffusion"].pop("timestep_spacing", None)
  return meta


def distill_meta(config: Any, step: int) -> dict:
  """What a distill checkpoint's student is: `distilled_steps` (the DDIM step counts it was distilled
  for: [N] in a progressive round of 2N -> N, [] after phase 1 alone), the phase, round and teacher
  steps, the guidance range it takes as input, the grid ('trailing') and the whole schedule."""
  from glide_jax.train import stages
  schedule = stages.distill_schedule(config)
  d = stages.distill_settings(config)
  info = schedule.describe(step)
  return {"distilled_steps": [info["student_steps"]] if info["student_steps"] else [],
          "phase": info["phase"], "round": info["round"], "teacher_steps": info["teacher_steps"],
          "guidance_embed": True, "guidance_range": [float(d.guidance_min), float(d.guidance_max)],
          "grid": "trailing", "schedule": {"guidance_steps": schedule.guidance_steps,
                                            "start_steps": schedule.start_steps,
                                            "final_steps": schedule.final_steps,
                                            "steps_per_round": schedule.steps_per_round,
                                            "student_steps": schedule.student_counts()}}


def export(workdir: str, out: str | None = None, which: str = "ema", rate: float | None = None,
           step: int | None = None, bf16: bool = False, serialize: bool = False, serialize_batch: int = 1):
  """Writes the bundle; returns its path."""
  from glide_jax import bundle, config_lib
  from glide_jax.train import checkpoint as ckpt_lib

  cfg_file = os.path.join(workdir, "config.json")
  if not os.path.isfile(cfg_file):
    raise FileNotFoundError(f"{workdir} is not a training workdir: {cfg_file} is missing")
  with open(cfg_file) as f:
    config = ckpt_lib.upgrade_saved_config(config_lib.config_from_json(f.read()))
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
    write_serialized_sampler(path, config, params, serialize_batch, meta["diffusion"])
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


# The positional inputs of the serialized sampler of each kind (after `params`). Upsamplers run
# without classifier-free guidance, as GLIDE samples them; their x_T is scaled by `temperature`
# (GLIDE's upsample_temp, 0.997).
SIGNATURES = {
    "text2im": ("tokens", "mask", "uncond_tokens", "uncond_mask", "key_data", "guidance_scale"),
    "inpaint": ("tokens", "mask", "uncond_tokens", "uncond_mask", "image", "image_mask", "key_data",
                "guidance_scale"),
    "upsample": ("tokens", "mask", "low_res", "key_data", "temperature"),
    "upsample_inpaint": ("tokens", "mask", "low_res", "image", "image_mask", "key_data", "temperature"),
    # A guidance-distilled text2im student (`guidance_embed`): w is the model's input, one pass per step.
    "student": ("tokens", "mask", "key_data", "guidance_scale"),
}


def signature_name(config) -> str:
  """The SIGNATURES entry of a training config's model: its kind, or 'student'."""
  from glide_jax.models import registry

  kind = registry.canonical_kind(config.model.kind)
  if config.model.options.get("guidance_embed"):
    if kind != "text2im":
      raise ValueError(f"--serialize supports guidance-distilled text2im students, not {kind!r} ones")
    return "student"
  if kind not in SIGNATURES:
    raise ValueError(f"--serialize supports {', '.join(k for k in SIGNATURES if k != 'student')} bundles "
                     f"and distilled students, not {kind!r}")
  return kind


def low_res_size(config) -> int:
  """The upsampler's conditioning size: the training data's, else the released ratio (1/4)."""
  return int(config.data.get("low_res_size", 0) or 0) or int(config.model.options.image_size) // 4


def sampling_function(config, settings: dict):
  """(fn, image size) for a training config and its bundle's diffusion settings (`meta['diffusion']`:
  its sampler and step count; a student's on the trailing grid it was distilled on).
  fn(params, *inputs) -> images [B, H, W, 3], inputs named by SIGNATURES[signature_name(config)]
  (`key` a typed PRNG key here; the serialized function takes its raw `key_data` instead).

  It is the program `sampling.generate` jits for that kind (`pipeline.sampling_program`): CFG on one
  doubled batch for text2im and inpaint; a distilled student's guidance scale as its input, one pass
  per step; low_res rounded to the 8-bit grid; inpainting feeds `image * image_mask` and the mask to
  the model and writes the known pixels (image_mask = 1) into each predicted x0.
  """
  import jax
  import jax.numpy as jnp

  from glide_jax.diffusion import pipeline, residual
  from glide_jax.models import registry
  from glide_jax.sampling import canonical_sampler

  kind = registry.canonical_kind(config.model.kind)
  name = signature_name(config)
  options = dict(config.model.options)
  model = registry.create_model(kind, options)
  size = registry.image_size_of(kind, options)
  diffusion = pipeline.diffusion_of_settings(settings)
  sampler = canonical_sampler(settings["sampler"])
  upsampler, inpaint = kind in ("upsample", "upsample_inpaint"), kind in ("inpaint", "upsample_inpaint")

  def fn(params, *inputs):
    named = dict(zip(SIGNATURES[name], inputs, strict=True))
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    b = named["tokens"].shape[0]
    f32 = lambda k: named[k].astype(jnp.float32) if k in named else None
    run = pipeline.sampling_program(
        model, diffusion, (b, size, size, 3), sampler=sampler, cfg="uncond_tokens" in named,
        low_res=upsampler, inpaint=inpaint, inpaint_inputs=inpaint, guided_input=name == "student",
        upsample_residual=residual.residual_of(settings) if upsampler else "")
    return run(params, named["tokens"], named["mask"], named.get("uncond_tokens"), named.get("uncond_mask"),
               f32("low_res"), f32("image"), f32("image_mask"), named["key_data"],
               named.get("guidance_scale", 1.0), named.get("temperature", 1.0), 0.0, None, None, 0.0)
  return fn, size


def input_specs(config, batch: int) -> tuple[list, list[str]]:
  """ShapeDtypeStructs (after params) and their descriptions for the serialized sampler's inputs."""
  import jax
  import jax.numpy as jnp

  from glide_jax.models import registry

  kind = registry.canonical_kind(config.model.kind)
  L = int(config.model.options.text_ctx)
  size = registry.image_size_of(kind, dict(config.model.options))
  s = low_res_size(config)
  table = {
      "tokens": ((batch, L), jnp.int32, f"tokens [{batch}, {L}] int32"),
      "mask": ((batch, L), jnp.bool_, f"mask [{batch}, {L}] bool"),
      "uncond_tokens": ((batch, L), jnp.int32, f"uncond_tokens [{batch}, {L}] int32 (the empty caption)"),
      "uncond_mask": ((batch, L), jnp.bool_, f"uncond_mask [{batch}, {L}] bool"),
      "low_res": ((batch, s, s, 3), jnp.float32, f"low_res [{batch}, {s}, {s}, 3] float32 in [-1, 1]"),
      "image": ((batch, size, size, 3), jnp.float32, f"image [{batch}, {size}, {size}, 3] float32 in [-1, 1]"),
      "image_mask": ((batch, size, size, 1), jnp.float32, f"image_mask [{batch}, {size}, {size}, 1] float32, 1 = keep"),
      "key_data": ((2,), jnp.uint32, "key_data [2] uint32 (jax.random.key_data of a threefry key)"),
      "guidance_scale": ((), jnp.float32, "guidance_scale [] float32"),
      "temperature": ((), jnp.float32, "temperature [] float32 (x_T scale; GLIDE uses 0.997)"),
  }
  names = SIGNATURES[signature_name(config)]
  return ([jax.ShapeDtypeStruct(table[n][0], table[n][1]) for n in names],
          ["params"] + [table[n][2] for n in names])


def write_serialized_sampler(path, config, params, batch: int, settings: dict) -> None:
  """Writes `sampler.jax_exported` and `sampler.json` into the bundle at `path` (its diffusion
  settings: `settings`), through a temporary file so that no half-written program is left."""
  import jax
  import jax.numpy as jnp

  from glide_jax.diffusion import pipeline

  fn, _ = sampling_function(config, settings)
  specs, described = input_specs(config, batch)
  names = SIGNATURES[signature_name(config)]
  key_at = names.index("key_data")
  args = (jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype), params), *specs)

  def with_raw_key(p, *inputs):
    inputs = list(inputs)
    inputs[key_at] = jax.random.wrap_key_data(inputs[key_at])
    return fn(p, *inputs)

  exported = jax.export.export(jax.jit(with_raw_key))(*args)
  tmp = os.path.join(str(path), ".sampler.jax_exported.tmp")
  with open(tmp, "wb") as f:
    f.write(exported.serialize())
  os.replace(tmp, os.path.join(str(path), "sampler.jax_exported"))
  spec = {"kind": config.model.kind, "inputs": described, "batch": batch,
          "text_ctx": int(config.model.options.text_ctx),
          "output": "images [B, H, W, 3] float32 in [-1, 1]",
          "sampler": settings["sampler"], "steps": pipeline.diffusion_of_settings(settings).timestep_respacing}
  if "low_res" in names:
    spec["low_res_size"] = low_res_size(config)
  with open(os.path.join(str(path), "sampler.json"), "w") as f:
    json.dump(spec, f, indent=2)


def run(args: argparse.Namespace) -> int:
  try:
    path = export(args.workdir, args.out, args.params, args.ema_rate, args.step, args.bf16, args.serialize,
                  args.serialize_batch)
  except (FileNotFoundError, KeyError, ValueError) as e:
    print(f"glide-jax export: {e}", file=sys.stderr)
    return 2
  print(f"wrote {path}")
  return 0
