"""glide_shapes: the TFDS builder, checked against SHAPES_DATASET.md by reading pixels back.

The reader below is written from the spec only (palette, radii, positions, shape areas); it does
not call the renderer's geometry.
"""
import re

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

# From the spec, independently of glide_jax.data.render.
PALETTE = {"red": (220, 40, 40), "yellow": (225, 200, 30), "green": (40, 170, 60),
           "cyan": (30, 185, 200), "blue": (40, 70, 220), "purple": (150, 60, 190)}
COLOURS = ["red", "yellow", "green", "cyan", "blue", "purple"]
SHAPES = ["circle", "square", "triangle"]
SIZES = ["small", "large"]
POSITIONS = ["left", "right", "top", "bottom", "center"]
CENTRES = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
           "center": (0.5, 0.5)}
WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
         "center": "in the center"}
AREA_PER_R2 = {"circle": np.pi, "square": 4.0, "triangle": 3 * np.sqrt(3) / 4}


def read_attributes(image: np.ndarray) -> dict:
  """Colour, shape, size, position and background grey of one rendered image, from pixels."""
  img = image.astype(np.float64)
  s = img.shape[0]
  spread = img.max(-1) - img.min(-1)
  grey = np.median(img[spread == 0][:, 0])  # background: the most common neutral value
  bg = np.array([grey] * 3)
  shape_pixels = img[spread > 30]  # well inside the shape: far from neutral
  colour_rgb = np.median(shape_pixels, axis=0)
  colour = min(COLOURS, key=lambda c: np.sum((np.array(PALETTE[c]) - colour_rgb) ** 2))
  # Coverage per pixel: where the pixel lies between background and the shape colour.
  d = np.array(PALETTE[colour]) - bg
  alpha = np.clip(((img - bg) @ d) / (d @ d), 0.0, 1.0)
  area = alpha.sum()
  # Bounding box with sub-pixel edges: each column counts by its largest coverage (and rows alike).
  width = alpha.max(axis=0).sum()
  height = alpha.max(axis=1).sum()
  fill = area / (width * height)  # square 1, circle pi/4, triangle 1/2 (less at 32 px: pixel edges)
  shape = "square" if fill > 0.9 else "circle" if fill > 0.73 else "triangle"
  r = np.sqrt(area / AREA_PER_R2[shape])
  size = "small" if r < 0.17 * s else "large"
  ys, xs = np.mgrid[0:s, 0:s] + 0.5
  cx, cy = (alpha * xs).sum() / area / s, (alpha * ys).sum() / area / s
  position = min(POSITIONS, key=lambda p: (CENTRES[p][0] - cx) ** 2 + (CENTRES[p][1] - cy) ** 2)
  exact = np.any(np.all(image == np.array(PALETTE[colour], np.uint8), axis=-1))
  return {"colour": colour, "shape": shape, "size": size, "position": position, "grey": grey,
          "fill": fill, "r": r / s, "centre": (cx, cy), "exact_colour_pixel": exact}


@pytest.fixture(scope="module")
def shapes32(tmp_path_factory):
  import glide_jax.data
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  builder = glide_jax.data.shapes.GlideShapes(config="size32", train_examples=20,
                                              validation_examples=300, data_dir=data_dir)
  builder.download_and_prepare()
  return data_dir


def test_registered_and_features(shapes32):
  assert "glide_shapes" in tfds.list_builders()
  builder = tfds.builder("glide_shapes/size64", data_dir=shapes32)
  f = builder.info.features
  assert f["colour"].names == COLOURS and f["shape"].names == SHAPES
  assert f["size"].names == SIZES and f["position"].names == POSITIONS
  assert f["image"].shape == (64, 64, 3) and f["image"].dtype == np.uint8
  assert [c.name for c in builder.BUILDER_CONFIGS] == ["size32", "size64", "size256"]
  for c in builder.BUILDER_CONFIGS[:2]:
    assert c.train_examples >= 50_000 and c.validation_examples >= 5_000


def check_split(examples, size):
  assert len(examples) >= 100
  for k, ex in enumerate(examples):
    assert ex["index"] == k  # record k is example k
    img = ex["image"]
    assert img.shape == (size, size, 3) and img.dtype == np.uint8
    got = read_attributes(img)
    want = {n: names[ex[n]] for n, names in (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES),
                                              ("position", POSITIONS))}
    assert {n: got[n] for n in want} == want, (k, got, ex["caption"])
    assert 190 <= got["grey"] <= 235
    assert got["exact_colour_pixel"]  # flat fill: interior pixels are exactly the palette colour
    # The caption names all four attributes, in one of the three templates.
    cap = ex["caption"].decode()
    w = {n: want[n] for n in want}
    w["where"] = WHERE[want["position"]]
    templates = [f"a {w['size']} {w['colour']} {w['shape']} {w['where']}",
                 f"a {w['colour']} {w['shape']}, {w['size']}, {w['where']}",
                 f"{w['where']}: a {w['size']} {w['colour']} {w['shape']}"]
    assert cap in templates, cap
    assert cap == cap.lower()


def test_pixels_match_labels_size32(shapes32):
  ds = tfds.load("glide_shapes/size32", split="validation", data_dir=shapes32)
  check_split(list(ds.as_numpy_iterator()), 32)


def test_pixels_match_labels_size64(tmp_path):
  from glide_jax.data import shapes
  builder = shapes.GlideShapes(config="size64", train_examples=5, validation_examples=120,
                               data_dir=str(tmp_path))
  builder.download_and_prepare()
  ds = tfds.load("glide_shapes/size64", split="validation", data_dir=str(tmp_path))
  examples = list(ds.as_numpy_iterator())
  check_split(examples, 64)
  # Attribute frequencies look uniform (all values present).
  for key, names in (("colour", COLOURS), ("shape", SHAPES), ("position", POSITIONS)):
    assert {int(e[key]) for e in examples} == set(range(len(names)))


def brute_force(size, shape, colour, grey, cx, cy, r):
  """Supersample the whole canvas 4x and box-average 4x4, straight from the spec."""
  n = 4 * size
  c = (np.arange(n) + 0.5) / 4
  x, y = np.meshgrid(c - cx, c - cy)
  if shape == "circle":
    inside = x * x + y * y <= r * r
  elif shape == "square":
    inside = (np.abs(x) <= r) & (np.abs(y) <= r)
  else:  # vertices (0, -r), (+-r cos30, r/2); inside = below both upper edges and above the base
    s3 = np.sqrt(3)
    inside = (y <= r / 2) & (y >= s3 * x - r) & (y >= -s3 * x - r)
  hi = np.where(inside[..., None], np.array(PALETTE[colour], float), float(grey))
  return np.rint(hi.reshape(size, 4, size, 4, 3).mean(axis=(1, 3))).astype(np.uint8)


def test_renderer_equals_full_canvas_supersampling():
  from glide_jax.data import render
  for size in (32, 64):
    a = render.sample_attributes(7, 0, 40)
    imgs = render.render(a, size)
    for i in range(40):
      pos = CENTRES[POSITIONS[a["position"][i]]]
      cx = pos[0] * size + 0.04 * size * a["jitter_x"][i]
      cy = pos[1] * size + 0.04 * size * a["jitter_y"][i]
      r = (0.12, 0.22)[a["size"][i]] * size
      want = brute_force(size, SHAPES[a["shape"][i]], COLOURS[a["colour"][i]], a["grey"][i], cx, cy, r)
      np.testing.assert_array_equal(imgs[i], want)


def test_example_is_pure_function_of_seed_and_index():
  from glide_jax.data import render
  whole = list(render.generate(11, 0, 30, 32, chunk=7))
  part = list(render.generate(11, 17, 5, 32, chunk=2))
  for k, ex in enumerate(part):
    np.testing.assert_array_equal(ex["image"], whole[17 + k]["image"])
    assert ex["caption"] == whole[17 + k]["caption"]
  other = list(render.generate(12, 17, 5, 32))
  assert any(o["caption"] != p["caption"] for o, p in zip(other, part))
  assert render.SPLIT_SEEDS["train"] != render.SPLIT_SEEDS["validation"]
  a = render.sample_attributes(3, 0, 2000)
  assert a["grey"].min() >= 190 and a["grey"].max() <= 235
  assert np.abs(a["jitter_x"]).max() <= 1 and np.abs(a["jitter_y"]).max() <= 1
  for key, n in (("colour", 6), ("shape", 3), ("size", 2), ("position", 5), ("template", 3)):
    counts = np.bincount(a[key], minlength=n)
    assert len(counts) == n and counts.min() > 2000 / n * 0.8  # roughly uniform


def test_train_and_validation_differ(shapes32):
  tr = list(tfds.load("glide_shapes/size32", split="train", data_dir=shapes32).as_numpy_iterator())
  va = list(tfds.load("glide_shapes/size32", split="validation", data_dir=shapes32).take(20).as_numpy_iterator())
  assert len(tr) == 20
  assert sum(np.array_equal(t["image"], v["image"]) for t, v in zip(tr, va)) == 0
  assert re.fullmatch(r"[a-z ,:]+", tr[0]["caption"].decode())
