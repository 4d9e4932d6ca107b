"""`glide-jax app`: the interactive editor in the browser (Gradio), on 127.0.0.1 by default.

  glide-jax app --bundle runs/shapes/bundle --inpaint-bundle runs/shapes_inpaint/bundle \
      --upsample-bundle runs/shapes_upsample/bundle

Generate from a prompt, select an image, paint the region to change, caption it and Inpaint, Upsample;
every result downloads as a PNG with its settings and the `glide-jax sample` command that writes it.
"""
from __future__ import annotations

import argparse

from glide_jax.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--bundle", required=True, help="the base bundle (text2im or inpaint), or a workdir with one")
  parser.add_argument("--upsample-bundle", help="an upsampler bundle for the Upsample button")
  parser.add_argument("--inpaint-bundle", help="an inpainting bundle for Inpaint (default: --bundle if it inpaints)")
  parser.add_argument("--clip-bundle", help="a noised CLIP bundle for CLIP guidance")
  parser.add_argument("--tokenizer", help="tokenizer file/directory overriding the bundles' (as `sample`)")
  parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
  parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
  parser.add_argument("--out", help="directory for the results' PNGs (default: a new temporary directory)")


def run(args) -> int:
  from glide_jax.app import core

  if not 0 < args.port < 65536:
    raise UserError(f"--port must be 1-65535, got {args.port}")
  models = core.load_models(args.bundle, args.upsample_bundle, args.inpaint_bundle, args.clip_bundle,
                            tokenizer=args.tokenizer)
  try:
    from glide_jax.app import ui
  except ImportError as e:
    raise UserError(f"the app needs gradio ({e}); install it with pip install -e '.[app]'") from e
  page = ui.build(models, args.out)
  print(f"glide-jax app: results go to {page.glide_jax_root}; open http://{args.host}:{args.port}")
  try:
    ui.launch(page, args.host, args.port, block=True)
  except OSError as e:  # the port is taken, the address is not this machine's
    raise UserError(f"cannot serve on {args.host}:{args.port}: {e}") from e
  return 0
