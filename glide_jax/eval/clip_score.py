"""CLIP score of samples under a noised CLIP evaluated at t = 0 (clean images).

CLIP score here = exp(logit_scale) x cos(z_text, z_image) with the noised CLIP's own fixed
logit scale, i.e. **100 x cosine** for GLIDE's (and our) noised CLIP; it ranges over [-100, 100].
It is NOT the OpenAI CLIP ViT-L/14 score papers usually quote (GLIDE's own Pareto figures use a
public CLIP); numbers from a noised CLIP trained on glide_shapes are comparable only with each other.
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclass
class ClipBundle:
  """A noised CLIP ready to score: the Flax module, its params and the tokenizer it was trained with."""
  model: Any
  params: Mapping[str, Any]
  tokenizer: Any
  source: str = "in-memory"


def load_clip_bundle(path: str | os.PathLike) -> ClipBundle:
  """A glide-jax bundle of kind 'noised_clip' (or WORKDIR/bundle) -> ClipBundle (model, params,
  tokenizer); the params in the layout of the model its options build (models/layout.py)."""
  from glide_jax import bundle
  from glide_jax.data.tokenizers import load_tokenizer
  from glide_jax.models import layout
  from glide_jax.models.clip import create_clip_model
  from glide_jax.sampling import resolve_bundle_dir

  path = resolve_bundle_dir(path)
  params, meta = bundle.load_bundle(path)
  kind = meta["model"]["kind"]
  if kind not in ("noised_clip", "clip"):
    raise ValueError(f"{path}: bundle holds a {kind!r} model, not a noised CLIP")
  if not meta.get("tokenizer"):
    raise ValueError(f"{path}: the CLIP bundle has no tokenizer in meta.json; CLIP scores need the "
                     "tokenizer the CLIP was trained with")
  model = create_clip_model(meta["model"].get("options") or {}, jnp.float32)
  if "params" in params and len(params) == 1:
    params = params["params"]
  # A bundle is written per layer (the exporters unstack); a scan_layers model wants them stacked.
  params = layout.to_layout(params, model.scan_layers)
  return ClipBundle(model, params, load_tokenizer(meta["tokenizer"]), source=str(path))


def score_scale(model: Any) -> float:
  """The factor in front of the cosine: exp(logit_scale) (100 for the released noised CLIP)."""
  return float(math.exp(float(model.logit_scale)))


def _resize_to(images: np.ndarray, size: int) -> np.ndarray:
  """uint8 [N, H, W, 3] -> float [N, size, size, 3] in [-1, 1] (bilinear, anti-aliased when shrinking)."""
  x = images.astype(np.float32) / 127.5 - 1.0
  if x.shape[1] != size or x.shape[2] != size:
    x = np.asarray(jax.image.resize(jnp.asarray(x), (x.shape[0], size, size, 3), "bilinear"))
  return x


@functools.partial(jax.jit, static_argnums=0)
def _encode_jit(model, variables, x, tokens, text_len):
  # The module is static (hashable), params are traced: one compilation per model and batch shape.
  t = jnp.zeros((x.shape[0],), jnp.int32)  # t = 0: the images are clean samples
  return (model.apply(variables, x, t, method="encode_image"),
          model.apply(variables, tokens, text_len, method="encode_text"))


def encode(clip: ClipBundle, images: np.ndarray, captions: Sequence[str], batch_size: int = 64
           ) -> tuple[np.ndarray, np.ndarray]:
  """-> (z_image [N, D], z_text [N, D]) float64, unnormalised, images encoded at t = 0.

  images: uint8 [N, H, W, 3] (resized to the CLIP's image size if needed); captions: N strings.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected images [N, H, W, 3], got shape {images.shape}")
  if len(captions) != len(images):
    raise ValueError(f"{len(images)} images but {len(captions)} captions")
  model, tok = clip.model, clip.tokenizer
  variables = {"params": clip.params.get("params", clip.params)}
  max_len = int(model.max_text_len)

  zi, zt = [], []
  for lo in range(0, len(images), batch_size):
    x = _resize_to(images[lo:lo + batch_size], int(model.image_size))
    tokens, mask = tok.encode_batch(list(captions[lo:lo + batch_size]))
    text_len = mask.sum(axis=-1).astype(np.int32)  # pooled at sum(mask) - 1, as in CLIP training
    if tokens.shape[1] > max_len:
      if (text_len > max_len).any():
        raise ValueError(f"a caption has {int(text_len.max())} tokens, more than the CLIP's "
                         f"max_text_len={max_len}")
      tokens = tokens[:, :max_len]
    n = x.shape[0]
    if n < batch_size and len(images) > batch_size:  # pad the last batch: one compilation
      pad = batch_size - n
      x = np.concatenate([x, np.repeat(x[-1:], pad, 0)])
      tokens = np.concatenate([tokens, np.repeat(tokens[-1:], pad, 0)])
      text_len = np.concatenate([text_len, np.repeat(text_len[-1:], pad, 0)])
    a, b = _encode_jit(model, variables, jnp.asarray(x), jnp.asarray(tokens, jnp.int32),
                       jnp.asarray(text_len))
    zi.append(np.asarray(a, np.float64)[:n])
    zt.append(np.asarray(b, np.float64)[:n])
  return np.concatenate(zi), np.concatenate(zt)


def clip_score_of_samples(clip: ClipBundle | str | os.PathLike | tuple, images: np.ndarray,
                          captions: Sequence[str], tokenizer: Any = None,
                          batch_size: int = 64) -> dict[str, Any]:
  """CLIP score of each (image, caption) pair at t = 0, summarised.

  clip: a ClipBundle, a bundle directory, or a (model, params) pair (then `tokenizer` is
  required); `tokenizer` overrides the bundle's.
  Returns {'mean', 'std', 'n', 'scale': 'exp(logit_scale) x cosine = 100 x cosine',
  'multiplier': 100.0, 'timestep': 0, 'clip': source, 'per_sample': [N] float64}.
  """
  if isinstance(clip, tuple):
    if len(clip) != 2 or tokenizer is None:
      raise ValueError("clip as a tuple must be (model, params), with tokenizer= given")
    clip = ClipBundle(clip[0], clip[1], tokenizer, source="in-memory")
  elif not isinstance(clip, ClipBundle):
    clip = load_clip_bundle(clip)
  if tokenizer is not None:
    clip = ClipBundle(clip.model, clip.params, tokenizer, clip.source)
  z_image, z_text = encode(clip, images, captions, batch_size)
  mult = score_scale(clip.model)
  cos = np.sum(z_image * z_text, axis=-1) / (
      (np.linalg.norm(z_image, axis=-1) + 1e-12) * (np.linalg.norm(z_text, axis=-1) + 1e-12))
  per = mult * cos
  return {"mean": float(per.mean()), "std": float(per.std()), "n": len(per),
          "scale": f"exp(logit_scale) x cosine = {mult:g} x cosine (noised CLIP at t=0)",
          "multiplier": mult, "timestep": 0, "clip": clip.source, "per_sample": per}


def format_clip_score(result: Mapping[str, Any]) -> str:
  return (f"CLIP score {result['mean']:.3f} +- {result['std']:.3f} over {result['n']} samples "
          f"[{result['scale']}; {result['clip']}]")
