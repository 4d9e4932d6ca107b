"""The app's work without the page: load the bundles, generate, inpaint, upsample, and write each result
as a PNG whose text metadata (and the `glide-jax sample` command shown beside it) reproduces it.

Every image goes through the same `glide_jax.sampling` calls as `glide-jax sample` (one `cascade` per
batch, the key `fold_in(PRNGKey(seed), 0)`), so the command line printed for a result writes the same
pixels. Nothing here imports gradio: the page (`glide_jax/app/ui.py`) only shows what this returns.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shlex
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from glide_jax.errors import UserError

SAMPLERS = ("ancestral", "ddim", "plms", "dpm++")
EDITOR_SIZE = 256  # the editor shows an image at least this many pixels wide (nearest-neighbour zoom)
MAX_BATCH = 16
# One sampler at a time: the pipeline's progress hook is one global, and two batches on the CPU at
# once would each run at half speed anyway.
_LOCK = threading.Lock()


class AppError(UserError):
  """A request the page cannot carry out as given; its message goes to the page's status line."""


@dataclasses.dataclass
class Models:
  """The loaded bundles, and for each button the reason it is disabled (None = enabled)."""
  base: Any
  inpaint: Any = None
  upsample: Any = None
  clip: Any = None
  paths: dict = dataclasses.field(default_factory=dict)
  reasons: dict = dataclasses.field(default_factory=dict)

  def reason(self, button: str) -> str | None:
    return self.reasons.get(button)


def _load(flag: str, path: str, tokenizer: Any = None):
  from glide_jax import sampling

  try:
    return sampling.load_sampler_model(path, tokenizer=tokenizer)
  except (OSError, ValueError) as e:
    raise UserError(f"{flag} {path}: {e}") from e


def load_models(bundle: str, upsample_bundle: str | None = None, inpaint_bundle: str | None = None,
                clip_bundle: str | None = None, tokenizer: Any = None) -> Models:
  """Loads the bundles given. A path that is no bundle is a UserError (one line at start-up); a
  bundle of the wrong kind for its button leaves the button disabled with the reason."""
  base = _load("--bundle", bundle, tokenizer)
  models = Models(base=base, paths={"base": str(bundle)})
  if base.is_upsampler:
    models.reasons["generate"] = (f"--bundle {bundle} holds an upsampler ({base.kind}); Generate needs a base "
                                  "(text2im or inpaint) bundle")
  if inpaint_bundle:
    model = _load("--inpaint-bundle", inpaint_bundle, tokenizer)
    if model.kind != "inpaint":
      models.reasons["inpaint"] = (f"--inpaint-bundle {inpaint_bundle} holds a {model.kind} model, "
                                   "not a base inpainting one (inpaint)")
    else:
      models.inpaint, models.paths["inpaint"] = model, str(inpaint_bundle)
  elif base.kind == "inpaint":
    models.inpaint, models.paths["inpaint"] = base, str(bundle)
  else:
    models.reasons["inpaint"] = (f"no inpainting bundle: --bundle holds a {base.kind} model; start the app "
                                 "with --inpaint-bundle (a bundle of kind inpaint)")
  if upsample_bundle:
    model = _load("--upsample-bundle", upsample_bundle, tokenizer)
    if not model.is_upsampler:
      models.reasons["upsample"] = f"--upsample-bundle {upsample_bundle} holds a {model.kind} model, not an upsampler"
    else:
      models.upsample, models.paths["upsample"] = model, str(upsample_bundle)
  else:
    models.reasons["upsample"] = "no upsampler: start the app with --upsample-bundle"
  if clip_bundle:
    from glide_jax.eval import clip_score

    try:
      models.clip = clip_score.load_clip_bundle(clip_bundle)
    except (OSError, ValueError) as e:
      raise UserError(f"--clip-bundle {clip_bundle}: {e}") from e
    models.paths["clip"] = str(clip_bundle)
  else:
    models.reasons["clip"] = "no CLIP bundle: start the app with --clip-bundle for CLIP guidance"
  return models


def defaults(sm) -> dict:
  """The bundle's own sampler, steps and guidance, as the page's initial values."""
  from glide_jax import sampling

  s = sm.diffusion_settings
  steps = s.get("timestep_respacing") or str(s.get("steps", 1000))
  return {"sampler": sampling.canonical_sampler(s.get("sampler", "ancestral")), "steps": str(steps),
          "guidance": float(s.get("guidance_scale", 3.0)),
          "temperature": float(s.get("upsample_temp", 0.997))}


@dataclasses.dataclass
class Batch:
  """One sampler call: what made it and what came out (uint8, the known pixels pasted back)."""
  mode: str                     # 'generate' | 'inpaint' | 'upsample'
  settings: dict                # prompt, seed, sampler, steps, ... (also the PNGs' metadata)
  raw: np.ndarray               # [N, S, S, 3] uint8 as the sampler wrote it (the CLI's PNGs)
  images: np.ndarray            # [N, S, S, 3] uint8 shown on the page
  command: list[str]            # the `glide-jax sample` argv whose output DIR/{i:06d}.png is image i
  inpaint_file: str | None = None
  mask_file: str | None = None


@dataclasses.dataclass
class Result:
  """One image on the page: its batch, its index there, and its PNG (with metadata) on disk."""
  id: int
  batch: Batch
  index: int
  path: pathlib.Path
  parent: int | None = None

  @property
  def image(self) -> np.ndarray:
    return self.batch.images[self.index]

  @property
  def metadata(self) -> dict:
    return dict(self.batch.settings, id=self.id, parent=self.parent, index=self.index,
                command=self.command, output=f"{self.index:06d}.png")

  @property
  def command(self) -> str:
    return shlex.join(self.batch.command)

  @property
  def label(self) -> str:
    prompt = self.batch.settings.get("prompt", "")
    return f"#{self.id} {self.batch.mode}: {prompt} (seed {self.batch.settings.get('seed')})"


class Store:
  """A session's results, written to `root` as PNGs (the page serves them from there)."""

  def __init__(self, root: str | os.PathLike):
    self.root = pathlib.Path(root)
    self.root.mkdir(parents=True, exist_ok=True)
    self.results: list[Result] = []
    self.batches = 0

  def get(self, result_id: int | None) -> Result:
    if result_id is None:
      raise AppError("select an image first (click one in the gallery or the history)")
    for r in self.results:
      if r.id == result_id:
        return r
    raise AppError(f"no result #{result_id} in this session")

  def add(self, batch: Batch, parent: int | None = None, indices=None) -> list[Result]:
    self.batches += 1
    out = []
    for i in (range(len(batch.images)) if indices is None else indices):
      rid = len(self.results) + 1
      r = Result(rid, batch, i, self.root / f"{rid:04d}.png", parent)
      write_png(r.path, r.image, r.metadata)
      self.results.append(r)
      out.append(r)
    return out

  def new_file(self, suffix: str) -> pathlib.Path:
    return self.root / f"batch{self.batches + 1:03d}-{suffix}"


def write_png(path: str | os.PathLike, image: np.ndarray, metadata: dict) -> pathlib.Path:
  """An [H, W, 3] uint8 image as PNG with `metadata` in its text chunks: every key as text, and the
  whole dict as JSON under 'glide-jax' (PIL's PngInfo; any PNG reader shows them)."""
  from PIL import Image, PngImagePlugin

  info = PngImagePlugin.PngInfo()
  info.add_text("glide-jax", json.dumps(metadata, sort_keys=True))
  for key, value in metadata.items():
    if value is not None:
      info.add_text(key, str(value))
  path = pathlib.Path(path)
  Image.fromarray(np.asarray(image, np.uint8)).save(path, format="PNG", pnginfo=info)
  return path


def read_png_metadata(path: str | os.PathLike) -> dict:
  """The 'glide-jax' JSON of a PNG written by write_png."""
  from PIL import Image

  with Image.open(path) as im:
    text = im.text.get("glide-jax")
  if text is None:
    raise ValueError(f"{path}: no glide-jax metadata in the PNG")
  return json.loads(text)


def _steps(steps: Any) -> str:
  text = str(steps).strip()
  if not text:
    raise AppError("steps: give a number of steps (e.g. 25) or a respacing spec (fast27, ddim50)")
  return text


def _sampler(name: str) -> str:
  if name not in SAMPLERS:
    raise AppError(f"sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
  return name


def _batch_size(n: Any) -> int:
  try:
    n = int(n)
  except (TypeError, ValueError):
    raise AppError(f"batch size {n!r} is not a whole number") from None
  if not 1 <= n <= MAX_BATCH:
    raise AppError(f"batch size must be 1 to {MAX_BATCH}, got {n}")
  return n


def _seed(seed: Any) -> int:
  try:
    return int(seed)
  except (TypeError, ValueError):
    raise AppError(f"seed {seed!r} is not a whole number") from None


def _prompt(prompt: str | None, what: str = "prompt") -> str:
  prompt = (prompt or "").strip()
  if not prompt:
    raise AppError(f"the {what} is empty: write what the image should show")
  return prompt


def _run(sm, prompts: list[str], seed: int, kwargs: dict, progress: Callable | None, **inputs) -> np.ndarray:
  """One batch through sampling.cascade exactly as `glide-jax sample` runs its first batch."""
  import jax

  from glide_jax import images, sampling

  key = jax.random.fold_in(jax.random.PRNGKey(seed), 0)
  with _LOCK:
    try:
      small, _ = sampling.cascade(sm, prompts, key, None, base_kwargs=dict(kwargs, progress=progress), **inputs)
    except ValueError as e:  # a steps spec the schedule cannot respace, an unknown sampler, ...
      raise AppError(str(e)) from e
  return images.to_uint8(small)


def _progress_hook(progress: Callable | None, total: int, desc: str) -> Callable | None:
  if progress is None:
    return None
  return lambda done: progress((int(done), total), desc=desc, unit="step")


def _diffusion_steps(sm, steps: str) -> int:
  from glide_jax import sampling

  try:
    return sampling.make_diffusion(sm, steps).num_timesteps
  except (ValueError, KeyError) as e:
    raise AppError(f"steps {steps!r}: {e}") from e


def _common(bundle_path: str, prompt: str, n: int, seed: int, guidance: float, sampler: str, steps: str) -> list[str]:
  argv = ["glide-jax", "sample", "--bundle", bundle_path]
  for _ in range(n):
    argv += ["--prompt", prompt]
  return argv + ["--batch-size", str(n), "--seed", str(seed), "--guidance-scale", _num(guidance),
                 "--sampler", sampler, "--steps", steps]


def _num(x: float) -> str:
  return repr(float(x))


def _clip_kwargs(models: Models, prompts: list[str], clip_scale: float, argv: list[str]) -> dict:
  if not clip_scale:
    return {}
  if models.clip is None:
    raise AppError(models.reason("clip"))
  import jax.numpy as jnp

  clip = models.clip
  tokens, mask = clip.tokenizer.encode_batch(prompts)
  z_text = clip.model.apply({"params": clip.params}, jnp.asarray(tokens), jnp.asarray(mask.sum(-1), jnp.int32),
                            method="encode_text")
  argv += ["--clip-guidance-scale", _num(clip_scale), "--clip-bundle", models.paths["clip"]]
  return {"clip_model": (clip.model, clip.params, z_text), "clip_guidance_scale": float(clip_scale)}


def generate(models: Models, store: Store, prompt: str, guidance: float, sampler: str, steps: Any, seed: Any,
             batch_size: Any, clip_scale: float = 0.0, progress: Callable | None = None) -> list[Result]:
  """Text -> a batch of images from the base bundle (the Generate button)."""
  if models.reason("generate"):
    raise AppError(models.reason("generate"))
  prompt, sampler, steps = _prompt(prompt), _sampler(sampler), _steps(steps)
  n, seed, sm = _batch_size(batch_size), _seed(seed), models.base
  argv = _common(models.paths["base"], prompt, n, seed, guidance, sampler, steps)
  kw = {"guidance_scale": float(guidance), "sampler": sampler, "respacing": steps}
  kw.update(_clip_kwargs(models, [prompt] * n, clip_scale, argv))
  total = _diffusion_steps(sm, steps)
  raw = _run(sm, [prompt] * n, seed, kw, _progress_hook(progress, total, "generate"))
  settings = {"mode": "generate", "prompt": prompt, "seed": seed, "guidance_scale": float(guidance),
              "sampler": sampler, "steps": steps, "batch_size": n, "clip_guidance_scale": float(clip_scale),
              "bundle": models.paths["base"]}
  return store.add(Batch("generate", settings, raw, raw.copy(), argv + ["--out", "DIR"]))


def editor_inputs(value: Any, size: int, source: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, str]:
  """The editor's value -> (image [S, S, 3] uint8, known mask [S, S] bool, note) at the model's size.

  The painted (brushed, not erased) pixels of any layer are the region to generate; a model pixel is
  generated if any of the screen pixels it covers is painted. The background is the image to edit:
  when it is `source` (or any S x S image) zoomed by nearest neighbour (what `editor_value` shows),
  that image itself, so the known pixels are the selected result's bytes; any other image is resized
  to S (bicubic)."""
  from PIL import Image

  if not isinstance(value, dict) or value.get("background") is None:
    raise AppError("the editor is empty: select an image (or upload one) and paint the region to change")
  bg = np.asarray(value["background"])
  if bg.ndim == 2:
    bg = np.repeat(bg[..., None], 3, -1)
  h, w = bg.shape[:2]
  rgb = bg[..., :3].astype(np.uint8)
  painted = np.zeros((h, w), bool)
  for layer in value.get("layers") or []:
    painted |= _layer_paint(layer, h, w)
  note = ""
  if h == w and h % size == 0:
    # `source` zoomed, or any image zoomed by whole pixels: its own pixels, not a resampling
    source = rgb[::h // size, ::h // size] if source is None else np.asarray(source, np.uint8)
  if source is not None and h == w and h % size == 0 and np.array_equal(rgb, zoom(source, h // size)):
    image = np.asarray(source, np.uint8)
  elif (h, w) == (size, size):
    image = rgb
  else:
    image = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC))
    note = f"the image ({w}x{h} px) was resized to the model's {size}x{size} px"
  # a model pixel covers the screen pixels [y*h/S, (y+1)*h/S) x [x*w/S, (x+1)*w/S)
  ys, xs = (np.arange(size + 1) * h) // size, (np.arange(size + 1) * w) // size
  row_any = np.logical_or.reduceat(painted, ys[:-1], axis=0) if h >= size else painted[(np.arange(size) * h) // size]
  gen = np.logical_or.reduceat(row_any, xs[:-1], axis=1) if w >= size else row_any[:, (np.arange(size) * w) // size]
  return image, ~gen, note


def _layer_paint(layer: Any, h: int, w: int) -> np.ndarray:
  """Where an editor layer is painted, [h, w] bool: an RGBA layer where its alpha is not 0 (erased
  paint has none), any other where a channel is not 0; a layer of another size than the image is refused."""
  layer = np.asarray(layer)
  if layer.shape[:2] != (h, w):
    raise AppError(f"a mask layer is {layer.shape[1]}x{layer.shape[0]} px, the image {w}x{h}: paint on the image")
  return (layer[..., 3] > 0) if layer.ndim == 3 and layer.shape[-1] == 4 else (layer.reshape(h, w, -1).max(-1) > 0)


def zoom(image: np.ndarray, factor: int) -> np.ndarray:
  """[H, W, C] -> [H*f, W*f, C] by repeating pixels, so a 32 px image can be painted on a screen."""
  return np.repeat(np.repeat(np.asarray(image), factor, 0), factor, 1)


def editor_value(image: np.ndarray) -> dict:
  """An ImageEditor value showing `image` zoomed to at least EDITOR_SIZE px, with no paint."""
  factor = max(1, EDITOR_SIZE // image.shape[0])
  rgba = zoom(image, factor)
  rgba = np.concatenate([rgba, np.full(rgba.shape[:2] + (1,), 255, np.uint8)], -1)
  return {"background": rgba, "layers": [], "composite": rgba}


PAINT = (255, 0, 255, 255)  # the editor's brush colour (ui.py), so a rectangle looks like brushed paint


def _whole(name: str, x: Any) -> int:
  try:
    f = float(x)
  except (TypeError, ValueError):
    raise AppError(f"rectangle {name} {x!r} is not a whole number") from None
  if not f.is_integer():
    raise AppError(f"rectangle {name} {x!r} is not a whole number of pixels")
  return int(f)


def paint_rectangle(value: Any, size: int, left: Any, top: Any, right: Any, bottom: Any) -> dict:
  """The editor's value with the model pixels [top, bottom) x [left, right) of a `size` px model painted
  over whatever paint it has, so that `editor_inputs` generates exactly that box (GLIDE's notebook's
  rectangular masks); the brush and eraser still work on it. On an image smaller than the model's
  size a screen pixel stands for several model pixels, and the box grows to whole screen pixels."""
  if not isinstance(value, dict) or value.get("background") is None:
    raise AppError("the editor is empty: select an image (or upload one), then paint the rectangle")
  box = {k: _whole(k, v) for k, v in (("left", left), ("top", top), ("right", right), ("bottom", bottom))}
  for lo, hi in (("left", "right"), ("top", "bottom")):
    if not 0 <= box[lo] < box[hi] <= size:
      raise AppError(f"rectangle {lo} {box[lo]}, {hi} {box[hi]}: need 0 <= {lo} < {hi} <= {size} "
                     f"(model pixels; {hi} is not included)")
  bg = np.asarray(value["background"])
  h, w = bg.shape[:2]
  layers = [np.asarray(layer) for layer in value.get("layers") or []]
  drawn = [_layer_paint(layer, h, w) for layer in layers]

  def screen(lo: int, hi: int, n: int) -> np.ndarray:
    # the screen pixels editor_inputs reads for model pixels lo..hi-1 (the same rule, inverted)
    if n >= size:
      return np.arange((lo * n) // size, (hi * n) // size)
    return np.unique((np.arange(lo, hi) * n) // size)
  rows, cols = screen(box["top"], box["bottom"], h), screen(box["left"], box["right"], w)
  # the first layer as RGBA paint (an RGB or grey one: PAINT where it is painted), the box added
  if layers and layers[0].ndim == 3 and layers[0].shape[-1] == 4:
    paint = np.array(layers[0], np.uint8, copy=True)
  else:
    paint = np.zeros((h, w, 4), np.uint8)
    if layers:
      paint[drawn[0]] = PAINT
  paint[np.ix_(rows, cols)] = PAINT
  layers, drawn = [paint, *layers[1:]], [paint[..., 3] > 0, *drawn[1:]]
  rgba = bg if bg.ndim == 3 and bg.shape[-1] == 4 else np.concatenate(
      [np.repeat(bg[..., None], 3, -1) if bg.ndim == 2 else bg[..., :3],
       np.full((h, w, 1), 255, np.uint8)], -1)
  composite = rgba.astype(np.uint8, copy=True)
  for layer, where in zip(layers, drawn, strict=True):  # what the editor shows: each RGBA layer over the image
    if layer.ndim == 3 and layer.shape[-1] == 4:
      composite[where] = layer[where]
  return {"background": value["background"], "layers": layers, "composite": composite}


def check_known(known: np.ndarray) -> float:
  """The kept fraction of a known mask, refusing masks that keep everything or nothing."""
  frac = float(np.mean(known))
  if frac == 1.0:
    raise AppError("the mask keeps every pixel: paint over the region to change (brush, or Paint rectangle), "
                   "then press Inpaint")
  if frac == 0.0:
    raise AppError("the mask covers the whole image, so nothing is kept: paint only the region to change "
                   "(or use Generate for a new image)")
  return frac


def paste_known(samples: np.ndarray, image: np.ndarray, known: np.ndarray) -> np.ndarray:
  """samples [N, S, S, 3] uint8 with the known pixels (known [S, S] True) of image [S, S, 3] written back."""
  return np.where(known[None, :, :, None], image[None], samples).astype(np.uint8)


def inpaint(models: Models, store: Store, value: Any, caption: str, guidance: float, sampler: str, steps: Any,
            seed: Any, batch_size: Any, source: Result | None = None,
            progress: Callable | None = None) -> tuple[list[Result], str]:
  """The editor's image and painted region + a caption -> a batch of inpainted images (the Inpaint
  button). Returns the results and a note for the status line."""
  from glide_jax import images

  if models.reason("inpaint"):
    raise AppError(models.reason("inpaint"))
  sm = models.inpaint
  caption, sampler, steps = _prompt(caption, "caption of the painted region"), _sampler(sampler), _steps(steps)
  n, seed = _batch_size(batch_size), _seed(seed)
  image, known, note = editor_inputs(value, sm.image_size, None if source is None else source.image)
  frac = check_known(known)
  image_file, mask_file = store.new_file("inpaint-image.png"), store.new_file("inpaint-mask.png")
  images.save_png(image_file, image)
  images.save_png(mask_file, (known[..., None] * 255).astype(np.uint8))
  argv = _common(models.paths["inpaint"], caption, n, seed, guidance, sampler, steps)
  argv += ["--inpaint-image", str(image_file), "--inpaint-mask", str(mask_file)]
  kw = {"guidance_scale": float(guidance), "sampler": sampler, "respacing": steps}
  total = _diffusion_steps(sm, steps)
  # as `glide-jax sample` reads the two files: the image at its size, the mask at the model's
  loaded = images.load_image(image_file)[None]
  mask = images.load_mask(mask_file, sm.image_size)[None]
  raw = _run(sm, [caption] * n, seed, kw, _progress_hook(progress, total, "inpaint"),
             inpaint_image=np.repeat(loaded, n, 0), inpaint_mask=np.repeat(mask, n, 0))
  settings = {"mode": "inpaint", "prompt": caption, "seed": seed, "guidance_scale": float(guidance),
              "sampler": sampler, "steps": steps, "batch_size": n, "bundle": models.paths["inpaint"],
              "known_fraction": round(frac, 4), "source": None if source is None else source.id}
  batch = Batch("inpaint", settings, raw, paste_known(raw, image, known), argv + ["--out", "DIR"],
                str(image_file), str(mask_file))
  return store.add(batch, parent=None if source is None else source.id), note


def upsample(models: Models, store: Store, result: Result, temperature: float, steps: Any, sampler: str,
             progress: Callable | None = None) -> Result:
  """The selected image -> the upsampler's (the Upsample button). The whole batch it came from is
  upsampled with the cascade's key and inputs, so `glide-jax sample ... --upsample U` writes the same
  image; the selected one is kept."""
  import jax

  from glide_jax import images, sampling

  if models.reason("upsample"):
    raise AppError(models.reason("upsample"))
  up, parent = models.upsample, result.batch
  if parent.mode == "upsample":
    raise AppError(f"#{result.id} is already an upsampled image; select a base image to upsample")
  steps, sampler = _steps(steps), _sampler(sampler)
  settings = parent.settings
  n = len(parent.raw)
  prompts = [settings["prompt"]] * n
  kw = {"sampler": sampler, "respacing": steps, "temperature": float(temperature)}
  if parent.mode == "inpaint":
    base_size = parent.raw.shape[1]
    loaded = images.load_image(parent.inpaint_file)[None]
    mask = images.load_mask(parent.mask_file, base_size)[None]
    stage = sampling.inpaint_stages(np.repeat(loaded, n, 0), np.repeat(mask, n, 0), [base_size, up.image_size])[1]
    kw.update(inpaint_image=stage[0], inpaint_mask=stage[1])
  total = _diffusion_steps(up, steps)
  kw["progress"] = _progress_hook(progress, total, "upsample")
  key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(int(settings["seed"])), 0))[1]
  with _LOCK:
    try:
      big = sampling.generate(up, prompts, key, low_res=images.from_uint8(parent.raw), **kw)
    except ValueError as e:
      raise AppError(str(e)) from e
  raw = images.to_uint8(big)
  shown = raw
  if parent.mode == "inpaint":
    known = kw["inpaint_mask"][0, ..., 0] > 0.5
    shown = paste_known(raw, images.to_uint8(kw["inpaint_image"][0]), known)
  argv = parent.command[:-2] + ["--upsample", models.paths["upsample"], "--upsample-sampler", sampler,
                                "--upsample-steps", steps, "--upsample-temperature", _num(temperature), "--out", "DIR"]
  up_settings = dict(settings, mode="upsample", upsample_bundle=models.paths["upsample"], upsample_sampler=sampler,
                     upsample_steps=steps, upsample_temperature=float(temperature), source=result.id)
  batch = Batch("upsample", up_settings, raw, shown, argv, parent.inpaint_file, parent.mask_file)
  return store.add(batch, parent=result.id, indices=[result.index])[0]
