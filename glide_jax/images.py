"""Image I/O shared by the sampler, training previews and evaluation: [-1, 1] float <-> uint8 PNG, grids."""
from __future__ import annotations

import math
import os
import pathlib

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[..., H, W, 3] float in [-1, 1] -> uint8, rounding to the nearest of 256 levels (as GLIDE)."""
  x = np.asarray(images, dtype=np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(images: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1]."""
  return np.asarray(images, dtype=np.float32) / 127.5 - 1.0


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
  """[N, H, W, C] uint8 -> one [rows*(H+pad)+pad, ncols*(W+pad)+pad, C] uint8 image, row-major."""
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"make_grid wants [N, H, W, C] images, got shape {images.shape}")
  n, h, w, c = images.shape
  ncols = ncols or math.ceil(math.sqrt(n))
  rows = math.ceil(n / ncols)
  grid = np.full((rows * (h + pad) + pad, ncols * (w + pad) + pad, c), pad_value, dtype=images.dtype)
  for i in range(n):
    r, col = divmod(i, ncols)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y:y + h, x:x + w] = images[i]
  return grid


def save_png(path: str | os.PathLike, image: np.ndarray) -> pathlib.Path:
  """Writes one [H, W, 3] (or [H, W, 1]) uint8 image as PNG."""
  from PIL import Image

  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"save_png wants [H, W, 3] or [H, W, 1] uint8, got {image.shape} {image.dtype}")
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path, format="PNG")
  return path


def write_samples(out_dir: str | os.PathLike, images: np.ndarray, start: int = 0) -> list[pathlib.Path]:
  """images [N, H, W, 3] in [-1, 1] -> out_dir/{start:06d}.png, ... in order."""
  u8 = to_uint8(images)
  return [save_png(pathlib.Path(out_dir) / f"{start + i:06d}.png", img) for i, img in enumerate(u8)]


def write_grid(path: str | os.PathLike, images: np.ndarray, ncols: int | None = None) -> pathlib.Path:
  """images [N, H, W, 3] in [-1, 1] -> one grid PNG."""
  return save_png(path, make_grid(to_uint8(images), ncols))


def load_image(path: str | os.PathLike, size: int | None = None) -> np.ndarray:
  """An RGB image file -> [H, W, 3] float32 in [-1, 1], resized (bicubic) to size x size if given."""
  from PIL import Image

  with Image.open(path) as im:
    im = im.convert("RGB")
    if size is not None and im.size != (size, size):
      im = im.resize((size, size), Image.BICUBIC)
    return from_uint8(np.asarray(im))


def load_mask(path: str | os.PathLike, size: int | None = None) -> np.ndarray:
  """A mask image (white / nonzero = KNOWN pixel) -> [H, W, 1] float32 in {0, 1}, nearest-resized."""
  from PIL import Image

  with Image.open(path) as im:
    im = im.convert("L")
    if size is not None and im.size != (size, size):
      im = im.resize((size, size), Image.NEAREST)
    return (np.asarray(im) >= 128).astype(np.float32)[..., None]


def resize_mask_nearest(mask: np.ndarray, size: int) -> np.ndarray:
  """[B, h, w, 1] -> [B, size, size, 1] by nearest neighbour (GLIDE upsamples the 64 px mask this way)."""
  mask = np.asarray(mask)
  _b, h, w, _c = mask.shape
  rows = (np.arange(size) * h) // size
  cols = (np.arange(size) * w) // size
  return mask[:, rows][:, :, cols]


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
  """[B, H, W, 3] in [-1, 1] -> [B, size, size, 3] via PIL bicubic on the 8-bit images."""
  from PIL import Image

  out = [np.asarray(Image.fromarray(u).resize((size, size), Image.BICUBIC)) for u in to_uint8(images)]
  return from_uint8(np.stack(out))
