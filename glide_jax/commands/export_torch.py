"""`glide-jax export-torch`: a glide-jax bundle -> a glide-text2im state_dict (.safetensors or .pt).

  glide-jax export-torch --bundle bundles/base --out base.safetensors
  glide-jax export-torch --bundle bundles/clip --tower image --out clip_image_enc.pt

The result loads into the reference with `model.load_state_dict(...)` (strict); writing .pt needs torch.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.description = __doc__
  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  parser.add_argument("--bundle", required=True, help="bundle directory (from import-torch or export)")
  parser.add_argument("--out", required=True, help="output file, .safetensors or .pt")
  parser.add_argument("--tower", choices=("image", "text", "both"), default="both",
                      help="noised CLIP bundles only: write one released tower file (keys 'blocks.*'), or "
                           "both towers with 'image/' and 'text/' key prefixes (default)")


def export_bundle(bundle_dir: str, out: str, tower: str = "both"):
  from glide_jax import bundle
  from glide_jax.interop import glide_text2im as g

  params, meta = bundle.load_bundle(bundle_dir)
  kind, options = meta["model"]["kind"], meta["model"].get("options") or {}
  if kind == "noised_clip":
    from glide_jax.interop import clip_keys
    from glide_jax.models import clip
    clip.resolve_clip_options(options)  # refuses unknown option names early
    if tower == "both":
      sd = clip_keys.export_clip_state_dict(params, options)
    else:
      if tower not in params:
        raise SystemExit(f"{bundle_dir} has no {tower!r} tower (it has {sorted(params)})")
      sd = clip_keys.export_tower_state_dict(params[tower], tower, options)
  else:
    sd = g.export_state_dict(params, kind, options)
  return g.save_state_dict(sd, out)


def run(args: argparse.Namespace) -> int:
  path = export_bundle(args.bundle, args.out, args.tower)
  print(f"wrote {path}")
  return 0
