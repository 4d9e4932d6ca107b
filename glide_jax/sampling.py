"""Sampling for a user: a bundle -> a `SamplerModel` -> images, and the GLIDE cascades.

  from glide_jax import sampling
  base = sampling.load_sampler_model("bundles/base")
  images = sampling.generate(base, ["a red circle"], jax.random.key(0), guidance_scale=3.0)  # [1, 64, 64, 3]
  up = sampling.load_sampler_model("bundles/upsample")
  big = sampling.generate(up, ["a red circle"], key, low_res=images)                        # [1, 256, 256, 3]

This layer loads bundles, tokenizers and images and hands arrays to the sampling core
(`glide_jax/diffusion/pipeline.py`: `SamplerModel`, `generate`, ... are re-exported here, so one
import serves `glide-jax sample`, evaluation and applications).
"""
from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from glide_jax import bundle, images
from glide_jax.data import tokenizers
from glide_jax.diffusion.pipeline import SamplerModel, canonical_sampler, generate, make_diffusion, settings_from_config
from glide_jax.models import layout, registry

__all__ = ["UNET_KINDS", "SamplerModel", "canonical_sampler", "cascade", "compute_dtype", "generate",
    "inpaint_stages", "load_sampler_model", "make_diffusion", "resolve_bundle_dir", "settings_from_config"]

UNET_KINDS = ("text2im", "upsample", "inpaint", "upsample_inpaint")


def resolve_bundle_dir(path: str | os.PathLike) -> pathlib.Path:
  """A bundle directory, or a training workdir holding one under WORKDIR/bundle (written by export)."""
  path = pathlib.Path(path)
  if (path / "meta.json").is_file():
    return path
  if (path / "bundle" / "meta.json").is_file():
    return path / "bundle"
  raise FileNotFoundError(
      f"{path} is neither a glide-jax bundle (no meta.json) nor a workdir with an exported bundle "
      f"({path / 'bundle'}); run `glide-jax export` on the workdir first")


compute_dtype = registry.compute_dtype  # the CLI's --dtype; one name -> dtype table for every model


def load_sampler_model(path: str | os.PathLike, tokenizer: Any = None, dtype: Any = jnp.float32,
                       scan_layers: bool | None = None) -> SamplerModel:
  """Loads a bundle (or WORKDIR/bundle). `tokenizer` overrides the bundle's (e.g. a GPT-2 BPE directory
  for an imported glide-text2im bundle, whose meta names no files): a tokenizer object, or a path.
  `scan_layers` overrides the bundle's option; the params are converted to the model's layout."""
  path = resolve_bundle_dir(path)
  params, meta = bundle.load_bundle(path)
  kind = registry.canonical_kind(meta["model"]["kind"])
  if kind not in UNET_KINDS:
    raise ValueError(f"{path}: bundle holds a {kind!r} model; `sample` needs one of {UNET_KINDS}")
  options = dict(meta["model"].get("options") or {})
  if scan_layers is not None:
    options["scan_layers"] = bool(scan_layers)
  model = registry.create_model(kind, options, dtype=dtype)
  if "params" in params and len(params) == 1:
    params = params["params"]
  params = jax.tree_util.tree_map(jnp.asarray, layout.to_layout(params, model.scan_layers))
  tok = _load_tokenizer(meta, tokenizer, path)
  settings = dict(meta.get("diffusion") or {})
  settings.setdefault("steps", 1000)
  settings.setdefault("noise_schedule", "linear" if kind in ("upsample", "upsample_inpaint") else "squaredcos_cap_v2")
  return SamplerModel(kind=kind, model=model, params=params, meta=meta, tokenizer=tok,
                      image_size=registry.image_size_of(kind, options), diffusion_settings=settings,
                      options=options)


def _load_tokenizer(meta: dict, override: Any, path: pathlib.Path):
  if override is not None and not isinstance(override, (str, os.PathLike)):
    return override
  spec = dict(meta.get("tokenizer") or {})
  if override is not None:
    spec["path"] = str(override)
    spec.pop("files", None)
  text_ctx = int((meta["model"].get("options") or {}).get("text_ctx", 128))
  spec.setdefault("text_ctx", text_ctx)
  if not spec.get("type"):
    raise ValueError(f"{path}/meta.json names no tokenizer; pass one (--tokenizer)")
  try:
    return tokenizers.load_tokenizer(spec)
  except (ValueError, OSError) as e:
    raise ValueError(f"{path}: cannot build the bundle's tokenizer ({e}); pass --tokenizer") from e


def cascade(base: SamplerModel, prompts: Sequence[str], key: jax.Array, upsampler: SamplerModel | None = None,
            *, base_kwargs: dict | None = None, upsample_kwargs: dict | None = None,
            inpaint_image: np.ndarray | None = None, inpaint_mask: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray | None]:
  """prompt -> base sample (64 px) -> upsampled sample (256 px); with an image and mask (1 = known),
  the inpainting cascade, the stages' inputs made by `inpaint_stages`.
  Returns (base samples, upsampled samples or None)."""
  k_base, k_up = jax.random.split(key)
  kw, ukw = dict(base_kwargs or {}), dict(upsample_kwargs or {})
  if inpaint_image is not None:
    sizes = [base.image_size] + ([upsampler.image_size] if upsampler is not None else [])
    stages = inpaint_stages(inpaint_image, inpaint_mask, sizes)
    kw.update(inpaint_image=stages[0][0], inpaint_mask=stages[0][1])
    if upsampler is not None:
      ukw.update(inpaint_image=stages[1][0], inpaint_mask=stages[1][1])
  small = generate(base, prompts, k_base, **kw)
  if upsampler is None:
    return small, None
  big = generate(upsampler, prompts, k_up, low_res=small, **ukw)
  return small, big


def inpaint_stages(image: np.ndarray, mask: np.ndarray, sizes: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
  """The (image, mask) of each cascade stage, as GLIDE's inpainting notebook: the mask is defined at
  the first (base) size, taken there by nearest neighbour if given larger, and nearest-upsampled to
  the others, so every stage keeps exactly the same region; the image is resized to each size from
  the one given (bicubic on 8 bits; pass it at the file's own size, as the notebook reads it)."""
  image, mask = np.asarray(image), np.asarray(mask)
  base_mask = images.resize_mask_nearest(mask, sizes[0])
  out = []
  for size in sizes:
    same = image.shape[1:3] == (size, size)
    out.append((image if same else images.resize_images(image, size), images.resize_mask_nearest(base_mask, size)))
  return out
