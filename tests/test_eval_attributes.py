"""The shapes attribute reader, on images drawn by an independent PIL renderer and on the dataset's."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from glide_jax.eval import attributes as A

# The spec's palette, written out again here so the test does not trust the module's copy.
_PALETTE = [(220, 40, 40), (225, 200, 30), (40, 170, 60), (30, 185, 200), (40, 70, 220),
            (150, 60, 190)]
_CENTRES = [(0.25, 0.5), (0.75, 0.5), (0.5, 0.25), (0.5, 0.75), (0.5, 0.5)]


def pil_render(colour: int, shape: int, size_cls: int, position: int, size: int,
               rng: np.random.Generator) -> np.ndarray:
  """Draws one example with PIL at 4x, then 4x4 box-downsamples it (the spec's recipe)."""
  s = 4
  grey = int(rng.integers(190, 236))
  big = Image.new("RGB", (size * s, size * s), (grey, grey, grey))
  draw = ImageDraw.Draw(big)
  jx, jy = rng.uniform(-0.04, 0.04, size=2) * size
  cx = (_CENTRES[position][0] * size + jx) * s
  cy = (_CENTRES[position][1] * size + jy) * s
  r = (0.12, 0.22)[size_cls] * size * s
  fill = _PALETTE[colour]
  # PIL fills pixel (i, j) when its index lies inside; pixel centres are at i + 0.5, so shift.
  ox, oy = cx - 0.5, cy - 0.5
  if shape == 0:
    draw.ellipse([ox - r, oy - r, ox + r, oy + r], fill=fill)
  elif shape == 1:
    draw.rectangle([ox - r, oy - r, ox + r, oy + r], fill=fill)
  else:
    pts = [(ox + r * math.cos(a), oy - r * math.sin(a)) for a in
           (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)]
    draw.polygon(pts, fill=fill)
  arr = np.asarray(big, np.float64).reshape(size, s, size, s, 3).mean(axis=(1, 3))
  return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def _random_set(n: int, size: int, seed: int):
  rng = np.random.default_rng(seed)
  attrs = {a: rng.integers(0, A.NUM_CLASSES[a], size=n) for a in A.ATTRIBUTES}
  images = np.stack([pil_render(attrs["colour"][i], attrs["shape"][i], attrs["size"][i],
                                attrs["position"][i], size, rng) for i in range(n)])
  return images, attrs


@pytest.mark.parametrize("size,n", [(32, 300), (64, 200)])
def test_reader_on_pil_rendered_images(size, n):
  images, attrs = _random_set(n, size, seed=size)
  acc = A.caption_accuracy(images, attrs)
  assert acc["n"] == n and acc["unreadable"] == 0
  for a in A.ATTRIBUTES:
    assert acc[a] >= 0.99, (a, acc)
  assert acc["all"] >= 0.98, acc


def _degrade(images: np.ndarray, low: int, noise: float, seed: int) -> np.ndarray:
  """Sample-like copies: bilinear down to `low` px and back (soft edges), plus Gaussian noise."""
  size = images.shape[1]
  rng = np.random.default_rng(seed)
  soft = np.asarray([np.asarray(Image.fromarray(im).resize((low, low), Image.BILINEAR)
                                .resize((size, size), Image.BILINEAR)) for im in images], np.float64)
  return np.clip(soft + rng.normal(0, noise, soft.shape), 0, 255).astype(np.uint8)


def test_reader_on_large_canvas_and_noise():
  """256 px (the upsampler's size), and blurred, noisy copies (what generated samples look like)."""
  images, attrs = _random_set(12, 256, seed=7)
  assert A.caption_accuracy(images, attrs)["all"] == 1.0
  for size, low, noise in ((64, 24, 25.0), (32, 16, 8.0)):
    clean, attrs = _random_set(80, size, seed=size + 1)
    acc = A.caption_accuracy(_degrade(clean, low, noise, seed=0), attrs)
    for a in A.ATTRIBUTES:
      assert acc[a] >= 0.97, (size, a, acc)


def test_reader_gives_unreadable_for_blank_and_errors_on_bad_shapes():
  blank = np.full((32, 32, 3), 200, np.uint8)
  assert A.read_attributes(blank) == (A.UNREADABLE,) * 4
  acc = A.caption_accuracy(blank[None], {a: [0] for a in A.ATTRIBUTES})
  assert acc["unreadable"] == 1 and acc["all"] == 0.0
  with pytest.raises(ValueError, match="shape"):
    A.read_attributes(np.zeros((32, 32), np.uint8))
  with pytest.raises(KeyError, match="position"):
    A.caption_accuracy(blank[None], {"colour": [0], "shape": [0], "size": [0]})
  with pytest.raises(ValueError, match="2 values"):
    A.caption_accuracy(blank[None], {a: [0, 1] for a in A.ATTRIBUTES})


def test_chance_accuracy():
  c = A.chance_accuracy()
  assert c["colour"] == pytest.approx(1 / 6) and c["position"] == pytest.approx(1 / 5)
  assert c["all"] == pytest.approx(1 / (6 * 3 * 2 * 5))


def test_caption_parsing_all_templates():
  rng = np.random.default_rng(1)
  for _ in range(60):
    want = {a: int(rng.integers(A.NUM_CLASSES[a])) for a in A.ATTRIBUTES}
    for t in range(3):
      cap = A.make_caption(want["colour"], want["shape"], want["size"], want["position"], t)
      assert A.parse_caption(cap) == want
  # The spec's own examples, spelled out by hand.
  assert A.parse_caption("a small red circle on the left") == {"colour": 0, "shape": 0, "size": 0, "position": 0}
  assert A.parse_caption("a blue triangle, large, at the bottom") == {"colour": 4, "shape": 2, "size": 1, "position": 3}
  assert A.parse_caption("in the center: a large purple square") == {"colour": 5, "shape": 1, "size": 1, "position": 4}
  with pytest.raises(ValueError, match="a pink circle"):
    A.parse_caption("a pink circle")


def test_reader_on_dataset_renderer():
  """The data pipeline's own renderer (glide_jax/data/render.py): the reader must be ~100% there."""
  from glide_jax.data import render
  for size, n in ((32, 300), (64, 150)):
    examples = list(render.generate(render.SPLIT_SEEDS["validation"], 0, n, size))
    images = np.stack([e["image"] for e in examples])
    attrs = {a: np.array([e[a] for e in examples]) for a in A.ATTRIBUTES}
    acc = A.caption_accuracy(images, attrs)
    for a in A.ATTRIBUTES:
      assert acc[a] >= 0.99, (size, a, acc)
    # The captions it wrote parse back to the integer features it stored.
    parsed = A.parse_captions([e["caption"] for e in examples])
    for a in A.ATTRIBUTES:
      np.testing.assert_array_equal(parsed[a], attrs[a])


def test_faint_blank_sample_is_unreadable_not_a_crash():
  # A generated sample can be a flat grey canvas with one pixel at exactly the contrast threshold.
  from glide_jax.eval import attributes as attrs
  img = np.full((32, 32, 3), 200.0)
  img[5, 5] = 200.0 + attrs._MIN_CONTRAST
  assert attrs.read_attributes(img) == (attrs.UNREADABLE,) * 4


def test_confusion_matrices_and_recall_by_value():
  """Counted by hand: rows = asked, columns = read, the last column = unreadable."""
  expected = {"colour": [0, 0, 1, 2], "shape": [0, 1, 2, 2], "size": [0, 1, 1, 1], "position": [2, 2, 0, 4]}
  read = {"colour": [0, 3, 1, A.UNREADABLE], "shape": [0, 1, 1, A.UNREADABLE],
          "size": [0, 1, 0, A.UNREADABLE], "position": [2, 2, 1, A.UNREADABLE]}
  m = A.confusion_matrices({k: np.array(v) for k, v in read.items()}, expected)
  assert m["colour"].shape == (6, 7) and m["position"].shape == (5, 6)
  assert m["colour"][0, 0] == 1 and m["colour"][0, 3] == 1 and m["colour"][2, 6] == 1 and m["colour"].sum() == 4
  assert m["shape"][2, 1] == 1 and m["shape"][2, 3] == 1
  rec = A.recall_by_value(m)
  assert rec["colour"]["red"] == 0.5 and rec["colour"]["yellow"] == 1.0 and rec["colour"]["green"] == 0.0
  assert rec["colour"]["blue"] is None  # nobody asked for blue
  assert rec["position"] == {"left": 0.0, "right": None, "top": 1.0, "bottom": None, "center": 0.0}
  assert rec["size"] == {"small": 1.0, "large": pytest.approx(1 / 3)}
