"""`init_from`: the parameters a run starts from, converted to the stage's model.

A training workdir, an inference bundle or a glide-text2im `.pt` / `.safetensors` file becomes a
host parameter tree for `stage`: a text2im or upsample tree given to an inpaint stage grows zero
input channels, a per-layer text stack is stacked for a `scan_layers` model (or back), and a
source that predicts another target than the config (epsilon against v) is refused. The distill
stage's teacher (a v-prediction text2im workdir or bundle) gets the student's guidance embedding,
whose last layer is zero, so the student starts as the teacher's conditional model.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from glide_jax import config_lib
from glide_jax.train import checkpoint as ckpt_lib
from glide_jax.train import stages


def _check_prediction(config: Any, src: str, src_diffusion: Any) -> None:
  """Fine-tuning an epsilon model as a v model (or back) would silently start from nonsense.
  `src_diffusion`: the source workdir's config `diffusion` section or its bundle's meta['diffusion']."""
  from glide_jax.diffusion.schedules import prediction_of
  ours, src_prediction = prediction_of(config.diffusion), prediction_of(src_diffusion)
  if config.stage != "clip" and src_prediction != ours:
    raise ValueError(f"init_from={src} predicts {src_prediction!r} but this config has "
                     f"diffusion.prediction={ours!r}; set --config.diffusion.prediction={src_prediction}")


def _check_distill_source(config: Any, src: str, kind: str, options: dict) -> None:
  """A distill teacher must be a text2im model of the student's architecture (but for guidance_embed)."""
  from glide_jax.models import registry
  if registry.canonical_kind(kind) != "text2im":
    raise ValueError(f"init_from={src} holds a {kind!r} model; the distill stage distils a text2im "
                     "(base) model")
  ours = registry.resolve_options("text2im", {k: v for k, v in dict(config.model.options).items()
                                              if k not in ("guidance_embed", "attention_impl", "scan_layers")})
  theirs = registry.resolve_options("text2im", {k: v for k, v in dict(options).items()
                                                if k not in ("guidance_embed", "attention_impl", "scan_layers")})
  diff = sorted(k for k in ours if ours[k] != theirs[k])
  if diff:
    raise ValueError(f"init_from={src}: the teacher's model options differ from the student's in "
                     + ", ".join(f"{k} ({theirs[k]!r} != {ours[k]!r})" for k in diff))


def add_guidance_embedding(params: Any, stage: stages.Stage, seed: int = 0) -> Any:
  """A teacher's tree + the student's `guidance_embed_*` subtree from its init (last layer zero);
  a tree that already has it (a distilled student as the teacher) is returned as it is."""
  params = dict(params)
  if "guidance_embed_0" in params:
    return params
  import flax.linen as nn
  init = jax.device_get(nn.meta.unbox(jax.jit(stage.init)(jax.random.key(seed))))
  for name in ("guidance_embed_0", "guidance_embed_2"):
    params[name] = init[name]
  return params


def load_init_params(config: Any, stage: stages.Stage) -> Any | None:
  """`init_from`: a training workdir, a bundle, or a glide-text2im .pt / .safetensors -> host params.

  A text2im or upsample tree given to an inpaint stage is grown with zero input channels. The clip
  stage also takes the released pair 'clip_image_enc.pt,clip_text_enc.pt', a directory holding both,
  or one two-tower file (`clip_keys.load_clip_checkpoint`).
  """
  src = str(config.init_from or "")
  if not src:
    return None
  distill = stage.name == "distill"
  if os.path.isdir(os.path.join(src, "checkpoints")):
    params = ckpt_lib.load_workdir_params(src, which="params")
    cfg_path = os.path.join(src, "config.json")
    if os.path.isfile(cfg_path):
      with open(cfg_path) as f:
        src_config = config_lib.config_from_json(f.read())
      _check_prediction(config, src, src_config.diffusion)
      if distill:
        _check_distill_source(config, src, src_config.model.kind, dict(src_config.model.options))
    elif distill:
      raise ValueError(f"init_from={src}: a distill teacher workdir needs its config.json")
  elif os.path.isfile(os.path.join(src, "meta.json")):
    from glide_jax.bundle import load_bundle
    params, meta = load_bundle(src)
    _check_prediction(config, src, meta.get("diffusion") or {})
    if distill:
      _check_distill_source(config, src, meta["model"]["kind"], meta["model"].get("options") or {})
    if stage.kind == "noised_clip" and sorted(params) != ["image", "text"]:
      # import-torch writes one tower per call; a half-imported bundle would fail later, less clearly
      raise ValueError(f"init_from bundle {src} holds the towers {sorted(params)}; the clip stage needs "
                       "'image' and 'text' (import the other with glide-jax import-torch --out into it)")
  elif distill:
    raise ValueError(f"init_from={src!r}: the distill stage's teacher is a glide-jax training workdir or "
                     "bundle (a v-prediction text2im model)")
  elif stage.kind == "noised_clip":
    from glide_jax.interop import clip_keys
    params = clip_keys.load_clip_checkpoint(src, dict(config.model.options))
  elif os.path.isfile(src):
    from glide_jax.interop import glide_text2im
    sd = glide_text2im.load_state_dict(src)
    source_kind = stage.kind
    if stage.kind in ("inpaint", "upsample_inpaint"):
      in_ch = next((np.shape(v)[1] for k, v in sd.items() if k == "input_blocks.0.0.weight"), None)
      if in_ch in (3, 6):  # a base / upsample checkpoint fine-tuned into an inpainting model
        source_kind = "text2im" if stage.kind == "inpaint" else "upsample"
    opts = dict(config.model.options)
    params = glide_text2im.import_state_dict(sd, source_kind, opts)
  else:
    raise FileNotFoundError(f"init_from={src!r} is neither a workdir with checkpoints/, a bundle, nor a file")
  if stage.kind in ("inpaint", "upsample_inpaint"):
    k = params.get("input_blocks_0_0", {}).get("kernel")
    if k is not None and np.shape(k)[2] in (3, 6):
      from glide_jax.interop.glide_text2im import inpaint_params_from_base
      params = inpaint_params_from_base(params)
  # A per-layer source into a scan_layers model, or back: the text blocks to the model's layout.
  from glide_jax.models import layout
  params = layout.to_layout(params, bool(getattr(stage.model, "scan_layers", False)))
  if distill:
    params = add_guidance_embedding(params, stage)
  return jax.tree.map(np.asarray, params)
