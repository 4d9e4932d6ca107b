"""`glide-jax import-torch`: a glide-text2im checkpoint (.pt / .safetensors / .npz) -> a glide-jax bundle.

  glide-jax import-torch --kind base --checkpoint base.pt --out bundles/base
  glide-jax import-torch --kind upsample --checkpoint upsample.pt --out bundles/upsample
  glide-jax import-torch --kind clip_image_enc --checkpoint clip_image_enc.pt --out bundles/clip
  glide-jax import-torch --kind clip_text_enc  --checkpoint clip_text_enc.pt  --out bundles/clip

.pt files are read with torch.load(weights_only=True): pickled code is refused, never run. Keys are
matched by name; a missing, unexpected or wrongly shaped key is an error naming it. The two noised CLIP
towers are separate files upstream: importing the second into the same --out adds it to the bundle.
The bundle's tokenizer is GPT-2 BPE ("clip" BPE for the noised CLIP) without files: pass
encoder.json / vocab.bpe (or bpe_simple_vocab_16e6.txt.gz) when sampling.
"""
from __future__ import annotations

import argparse
import json
import pathlib

from glide_jax.errors import UserError

KINDS = ("base", "upsample", "base_inpaint", "upsample_inpaint", "clip_image_enc", "clip_text_enc")

# How the released models are sampled ([G] notebooks): base models 100 respaced steps of the cosine
# schedule with ancestral sampling; upsamplers 'fast27' of the linear schedule.
DIFFUSION = {
    "base": dict(steps=1000, noise_schedule="squaredcos_cap_v2", timestep_respacing="100", sampler="ancestral",
                 guidance_scale=3.0),
    "base_inpaint": dict(steps=1000, noise_schedule="squaredcos_cap_v2", timestep_respacing="100",
                         sampler="ancestral", guidance_scale=5.0),
    "upsample": dict(steps=1000, noise_schedule="linear", timestep_respacing="fast27", sampler="ddim",
                     upsample_temp=0.997),
    "upsample_inpaint": dict(steps=1000, noise_schedule="linear", timestep_respacing="fast27", sampler="ancestral",
                             upsample_temp=0.997),
    "noised_clip": dict(steps=1000, noise_schedule="squaredcos_cap_v2"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.description = __doc__
  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  parser.add_argument("--kind", required=True, choices=KINDS,
                      help="which released checkpoint this is (the file names of glide-text2im's download.py)")
  parser.add_argument("--checkpoint", required=True, help="the .pt, .safetensors or .npz state_dict")
  parser.add_argument("--out", required=True, help="bundle directory to write (replaced atomically)")
  parser.add_argument("--options", default=None,
                      help="JSON object of glide-text2im model options overriding the released defaults, "
                           "e.g. '{\"num_channels\": 64}'")


def _clip_modules():
  try:
    from glide_jax.interop import clip_keys
    from glide_jax.models import clip
  except ImportError as e:
    raise SystemExit(f"importing the noised CLIP needs glide_jax.models.clip and glide_jax.interop.clip_keys, "
                     f"which are not available: {e}") from e
  return clip, clip_keys


def import_checkpoint(kind: str, checkpoint: str, out: str, options: dict | None = None) -> pathlib.Path:
  """Converts one checkpoint and writes (or, for a second CLIP tower, extends) the bundle at `out`."""
  from glide_jax import bundle
  from glide_jax.interop import glide_text2im as g
  from glide_jax.models import registry

  options = dict(options or {})
  if kind.startswith("clip_"):
    clip, clip_keys = _clip_modules()
    tower = "image" if kind == "clip_image_enc" else "text"
    clip.resolve_clip_options(options)  # refuses unknown option names before reading the checkpoint
    state_dict = g.load_state_dict(checkpoint)
    tower_params = clip_keys.import_tower_state_dict(state_dict, tower, options)
    params: dict = {}
    out_path = pathlib.Path(out)
    if (out_path / "meta.json").is_file():  # add this tower to a bundle holding the other one
      old_params, old_meta = bundle.load_bundle(out_path)
      if old_meta["model"]["kind"] == "noised_clip" and old_meta["model"]["options"] == options:
        params = {k: v for k, v in old_params.items() if k != tower}
    params[tower] = tower_params
    meta = dict(model={"kind": "noised_clip", "options": options}, diffusion=DIFFUSION["noised_clip"],
                tokenizer={"type": "clip"}, dtype="float32", towers=sorted(params),
                source={"checkpoint": str(checkpoint), "format": "glide-text2im"})
    return bundle.save_bundle(out, params, meta)
  model_kind = g.CHECKPOINT_KINDS[kind]
  registry.resolve_options(model_kind, options)  # refuses unknown option names before reading the checkpoint
  params = g.import_state_dict(g.load_state_dict(checkpoint), model_kind, options)
  meta = dict(model={"kind": model_kind, "options": options}, diffusion=DIFFUSION[kind],
              tokenizer={"type": "gpt2_bpe"}, dtype="float32",
              source={"checkpoint": str(checkpoint), "format": "glide-text2im"})
  return bundle.save_bundle(out, params, meta)


def run(args: argparse.Namespace) -> int:
  try:
    options = json.loads(args.options) if args.options else {}
  except json.JSONDecodeError as e:
    raise UserError(f"--options is not JSON ({e}): {args.options!r}") from e
  if not isinstance(options, dict):
    raise SystemExit("--options must be a JSON object")
  path = import_checkpoint(args.kind, args.checkpoint, args.out, options)
  print(f"wrote {path}")
  return 0
