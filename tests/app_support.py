"""Tiny random-weight bundles of every kind the app uses (base, inpaint, upsample, CLIP), with a
sentencepiece tokenizer trained here, for tests/test_app.py and tests/test_app_browser.py."""
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glide_jax import bundle
from glide_jax.data import tokenizers
from glide_jax.models import registry

TINY = {"num_channels": 32, "channel_mult": "1,2", "attention_resolutions": "4", "num_res_blocks": 1, "xf_width": 32,
        "xf_layers": 1, "xf_heads": 2, "text_ctx": 8, "num_head_channels": 16, "dropout": 0.0}
CAPTIONS = ["a red circle", "a blue square", "a small green triangle", "a big yellow circle on the left",
            "two red squares", "a purple star at the top"] * 5
CLIP_TINY = {"image_size": 8, "patch_size": 4, "n_vocab": 64, "max_text_len": 8, "n_embd": 16, "n_head": 2,
             "n_head_state": 8, "n_xf_blocks": 1}


def random_params(kind: str, options: dict, seed: int):
  """Random weights of the right shapes without compiling an init; random output layers make every
  pixel depend on the weights (the reference zero-initialises them)."""
  shapes = registry.param_shapes(kind, options)
  leaves, _ = jax.tree_util.tree_flatten_with_path(shapes)
  rng = np.random.default_rng(seed)
  out = []
  for path, s in leaves:
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
    value = rng.normal(size=s.shape) / np.sqrt(fan_in) if len(s.shape) > 1 else 0.05 * rng.normal(size=s.shape)
    if "scale" in jax.tree_util.keystr(path):
      value = 1.0 + value
    out.append(value.astype(np.float32))
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), out)


def make_bundle(root: pathlib.Path, name: str, kind: str, image_size: int, sp_model, diffusion: dict, seed: int = 0):
  options = dict(TINY, image_size=image_size, n_vocab=64)
  meta = {"model": {"kind": kind, "options": options}, "diffusion": diffusion,
          "tokenizer": {"type": "sentencepiece", "text_ctx": 8}, "dtype": "float32"}
  return bundle.save_bundle(root / name, random_params(kind, options, seed), meta, tokenizer_files={"model": sp_model})


def make_clip_bundle(root: pathlib.Path, sp_model):
  from glide_jax.models import clip

  model = clip.create_clip_model(CLIP_TINY)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32),
                                             jnp.zeros((1, 8), jnp.int32), jnp.ones((1,), jnp.int32)))
  rng = np.random.default_rng(5)
  params = jax.tree_util.tree_map(lambda s: (rng.normal(size=s.shape) * 0.3).astype(np.float32),
                                  nn.meta.unbox(shapes["params"]))
  meta = {"model": {"kind": "noised_clip", "options": CLIP_TINY}, "diffusion": {},
          "tokenizer": {"type": "sentencepiece", "text_ctx": 8}, "dtype": "float32"}
  return bundle.save_bundle(root / "clip", params, meta, tokenizer_files={"model": sp_model})


def make_bundles(root: pathlib.Path, size: int = 8) -> dict[str, str]:
  """base (text2im), inpaint (both `size` px), upsample (2 x size), clip: name -> bundle path."""
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  sp = tokenizers.train_sentencepiece(CAPTIONS, 40, root / "sp.model")
  base_diff = {"steps": 1000, "noise_schedule": "squaredcos_cap_v2", "timestep_respacing": "4", "sampler": "ddpm",
               "guidance_scale": 3.0}
  up_diff = {"steps": 1000, "noise_schedule": "linear", "timestep_respacing": "3", "sampler": "ddim",
             "upsample_temp": 0.997}
  return {"base": str(make_bundle(root, "base", "text2im", size, sp, base_diff, 1)),
          "inpaint": str(make_bundle(root, "inpaint", "inpaint", size, sp, base_diff, 2)),
          "upsample": str(make_bundle(root, "upsample", "upsample", 2 * size, sp, up_diff, 3)),
          "clip": str(make_clip_bundle(root, sp)), "sp": str(sp)}
