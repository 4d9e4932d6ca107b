"""`glide-jax sample`: prompts -> PNGs (DIR/000000.png, ... in prompt order, plus DIR/grid.png).

  glide-jax sample --bundle bundles/base --prompt "a red circle" --guidance-scale 3 --out samples/
  glide-jax sample --workdir runs/base --prompt-file prompts.txt --sampler dpm++ --steps 20 --out s/
  glide-jax sample --bundle bundles/base --upsample bundles/upsample --prompt "a corgi" --out s/
  glide-jax sample --bundle bundles/base-inpaint --inpaint-image img.png --inpaint-mask mask.png ...

The same seed and inputs give identical images: batch i uses fold_in(PRNGKey(seed), i).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from glide_jax.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
  src = parser.add_argument_group("model (one of)")
  src.add_argument("--bundle", help="an inference bundle directory (glide-jax export / import-torch)")
  src.add_argument("--workdir", help="a training workdir; its exported WORKDIR/bundle is used")
  src.add_argument("--checkpoint", help="a bundle, a workdir, or WORKDIR/checkpoints/<step> (uses WORKDIR/bundle)")
  parser.add_argument("--tokenizer", help="tokenizer file/directory overriding the bundle's (e.g. GPT-2 BPE files)")
  parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
  parser.add_argument("--prompt-file", help="a text file, one prompt per line")
  parser.add_argument("--guidance-scale", type=float, default=None,
                      help="classifier-free guidance scale (default: the bundle's, else 3.0; 1 = none)")
  parser.add_argument("--sampler", choices=["ancestral", "ddim", "plms", "dpm++"], default=None,
                      help="default: the bundle's (GLIDE: ancestral)")
  parser.add_argument("--steps", default=None,
                      help="sampling steps, or any respacing spec ('100', 'fast27', 'ddim50', '10,10,5'); "
                           "default: the bundle's (GLIDE: 100)")
  parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (ddim only)")
  parser.add_argument("--threshold", default=None,
                      help="'static' (clip x0 to [-1, 1], the default) or 'dynamic:P' (e.g. dynamic:0.995)")
  parser.add_argument("--temperature", type=float, default=None, help="initial-noise temperature (default 1)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch-size", type=int, default=4)
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                      help="compute dtype of every model (parameters stay as stored; norms and softmax in float32)")
  parser.add_argument("--upsample", metavar="BUNDLE", help="an upsampler bundle: run the 64 -> 256 cascade")
  parser.add_argument("--upsample-sampler", choices=["ancestral", "ddim", "plms", "dpm++"], default=None,
                      help="default: the upsampler bundle's (GLIDE: ddim, or ancestral when inpainting)")
  parser.add_argument("--upsample-steps", default=None, help="default: the upsampler bundle's (GLIDE: fast27)")
  parser.add_argument("--upsample-temperature", type=float, default=None, help="default 0.997 (GLIDE)")
  parser.add_argument("--inpaint-image", help="image to inpaint (any size; resized)")
  parser.add_argument("--inpaint-mask", help="mask image, white = KNOWN pixel (kept), black = generated; read at the base model's size")
  parser.add_argument("--clip-guidance-scale", type=float, default=0.0,
                      help="CLIP guidance scale (GLIDE used 2-3); needs --clip-bundle; disables CFG")
  parser.add_argument("--clip-bundle", help="a noised CLIP bundle for --clip-guidance-scale")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _source(args) -> str:
  given = [p for p in (args.bundle, args.workdir, args.checkpoint) if p]
  if len(given) != 1:
    raise SystemExit("glide-jax sample: give exactly one of --bundle, --workdir, --checkpoint")
  path = pathlib.Path(given[0])
  if args.checkpoint and not (path / "meta.json").is_file() and path.parent.name == "checkpoints":
    path = path.parent.parent  # WORKDIR/checkpoints/<step> -> WORKDIR (its exported bundle)
  return str(path)


def _prompts(args) -> list[str]:
  prompts = list(args.prompt)
  if args.prompt_file:
    text = pathlib.Path(args.prompt_file).read_text(encoding="utf-8")
    prompts += [line.strip() for line in text.splitlines() if line.strip()]
  if not prompts:
    raise SystemExit("glide-jax sample: no prompts (use --prompt or --prompt-file)")
  return prompts


def _threshold(spec: str | None):
  if spec is None or spec == "static":
    return None if spec is None else "static"
  if spec.startswith("dynamic"):
    p = float(spec.split(":", 1)[1]) if ":" in spec else 0.995
    if not 0 < p < 1:
      raise SystemExit(f"--threshold dynamic:P needs 0 < P < 1, got {p}")
    return ("dynamic", p)
  raise SystemExit(f"--threshold must be 'static' or 'dynamic:P', got {spec!r}")


class _Progress:
  """One tqdm bar over every denoising step of the run; called from inside the compiled loop."""

  def __init__(self, total: int, enabled: bool):
    from tqdm import tqdm
    self.bar = tqdm(total=total, unit="step", disable=not enabled, file=sys.stderr)
    self.last = 0

  def __call__(self, done):
    done = int(done)
    if done < self.last:  # a new batch started
      self.last = 0
    self.bar.update(done - self.last)
    self.last = done


def run(args) -> int:
  import jax

  from glide_jax import images, sampling

  prompts = _prompts(args)
  if args.batch_size < 1:
    raise SystemExit("--batch-size must be >= 1")
  dtype = sampling.compute_dtype(args.dtype)
  base = sampling.load_sampler_model(_source(args), tokenizer=args.tokenizer, dtype=dtype)
  if base.is_upsampler:
    raise SystemExit(f"the model given is an upsampler ({base.kind}); pass the base model, and this one as --upsample")
  up = sampling.load_sampler_model(args.upsample, tokenizer=args.tokenizer, dtype=dtype) if args.upsample else None
  if up is not None and not up.is_upsampler:
    raise SystemExit(f"--upsample {args.upsample} holds a {up.kind} model, not an upsampler")

  inpaint_image = inpaint_mask = None
  if bool(args.inpaint_image) != bool(args.inpaint_mask):
    raise SystemExit("--inpaint-image and --inpaint-mask go together")
  if args.inpaint_image:
    # As GLIDE's notebook: the image is resized from the file for each stage, the mask read at the
    # base's size (the cascade upsamples it by nearest neighbour for the upsampler).
    inpaint_image = images.load_image(args.inpaint_image)[None]
    inpaint_mask = images.load_mask(args.inpaint_mask, base.image_size)[None]

  clip_model = None
  if args.clip_guidance_scale:
    if not args.clip_bundle:
      raise SystemExit("--clip-guidance-scale needs --clip-bundle")
    clip_model = _load_clip(args.clip_bundle, prompts)

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  threshold = _threshold(args.threshold)
  n_base = sampling.make_diffusion(base, args.steps).num_timesteps
  n_up = sampling.make_diffusion(up, args.upsample_steps).num_timesteps if up is not None else 0
  progress = _Progress(len(list(range(0, len(prompts), args.batch_size))) * (n_base + n_up), not args.no_progress)
  if args.eta and (args.sampler or base.diffusion_settings.get("sampler")) != "ddim":
    raise SystemExit("--eta applies to --sampler ddim only")

  root = jax.random.PRNGKey(args.seed)
  finals, smalls = [], []
  for index, start in enumerate(range(0, len(prompts), args.batch_size)):
    batch = prompts[start:start + args.batch_size]
    n = len(batch)
    base_kw = {"guidance_scale": args.guidance_scale, "sampler": args.sampler, "respacing": args.steps,
                   "temperature": args.temperature, "threshold": threshold, "eta": args.eta, "progress": progress}
    if clip_model is not None:
      base_kw.update(clip_model=(clip_model[0], clip_model[1], clip_model[2][start:start + n]),
                     clip_guidance_scale=args.clip_guidance_scale)
    up_sampler = args.upsample_sampler or ("ancestral" if inpaint_image is not None and up is not None
                                           and "sampler" not in up.diffusion_settings else None)
    up_kw = {"sampler": up_sampler, "respacing": args.upsample_steps, "temperature": args.upsample_temperature,
                 "progress": progress}
    kw = {}
    if inpaint_image is not None:
      kw = {"inpaint_image": np.repeat(inpaint_image, n, 0), "inpaint_mask": np.repeat(inpaint_mask, n, 0)}
    small, big = sampling.cascade(base, batch, jax.random.fold_in(root, index), up,
                                  base_kwargs=base_kw, upsample_kwargs=up_kw, **kw)
    final = big if big is not None else small
    images.write_samples(out, final, start=start)
    if big is not None:
      images.write_samples(out / "base", small, start=start)
    finals.append(final)
    smalls.append(small)
  progress.bar.close()
  finals = np.concatenate(finals)
  images.write_grid(out / "grid.png", finals)
  (out / "prompts.json").write_text(json.dumps(
      {f"{i:06d}.png": p for i, p in enumerate(prompts)}, indent=1))
  print(f"wrote {len(prompts)} samples and grid.png to {out}")
  return 0


def _load_clip(path: str, prompts: list[str]):
  """(module, params, z_text [N, D]) from a noised CLIP bundle (eval.clip_score.load_clip_bundle:
  params in the model's layout); its text tower sees the bundle's tokenizer's tokens."""
  import jax.numpy as jnp

  from glide_jax.eval import clip_score

  try:
    clip = clip_score.load_clip_bundle(path)
  except (ValueError, OSError) as e:
    raise UserError(f"--clip-bundle: {e}") from e
  tokens, mask = clip.tokenizer.encode_batch(prompts)
  z_text = clip.model.apply({"params": clip.params}, jnp.asarray(tokens), jnp.asarray(mask.sum(-1), jnp.int32),
                            method="encode_text")
  return clip.model, clip.params, z_text
