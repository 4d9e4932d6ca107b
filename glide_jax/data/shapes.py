"""`glide_shapes`: the built-in procedural text-to-image dataset, as a TFDS builder.

Configs `size32`, `size64`, `size256` (canvas size). Each example has `image` (uint8 [S, S, 3]),
`caption`, the attributes `colour`, `shape`, `size`, `position` as ClassLabels (names and order as
in the spec, see `render.py`) and `index` (the example's number in its split). Example `i` of a
split is a pure function of (split seed, i), so the split is the same wherever it is prepared.
Records are written in index order (no TFDS shuffling): record k of a split is example k.

The spec's default train size is 1,000,000; the registered configs use sizes that prepare in a
few minutes on a laptop (see `DEFAULT_COUNTS`). Other sizes: `GlideShapes(config="size64",
train_examples=N, validation_examples=M, data_dir=...)` - put them in their own data_dir, since
TFDS keys prepared data by name/config/version only.

`glide-jax data prepare` and the pipeline's preparation on first use write ArrayRecord
(`pipeline.DEFAULT_FILE_FORMAT`); `GlideShapes(...).download_and_prepare()` called directly keeps
TFDS's default, TFRecord, unless given `file_format=`. Both are read the same way.
"""
from __future__ import annotations

import dataclasses
import io
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from glide_jax.data import render

# (train, validation) examples per config.
DEFAULT_COUNTS = {32: (60_000, 10_000), 64: (60_000, 10_000), 256: (10_000, 1_000)}


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  image_size: int = 32
  train_examples: int = 60_000
  validation_examples: int = 10_000


def _config(size: int) -> ShapesConfig:
  train, validation = DEFAULT_COUNTS[size]
  return ShapesConfig(name=f"size{size}", description=f"{size}x{size} px, {train} train examples",
                      image_size=size, train_examples=train, validation_examples=validation)


class GlideShapes(tfds.core.GeneratorBasedBuilder):
  """Coloured shapes on grey with captions naming colour, shape, size and position."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release, following SHAPES_DATASET.md."}
  BUILDER_CONFIGS: ClassVar[list[ShapesConfig]] = [_config(32), _config(64), _config(256)]
  DEFAULT_CONFIG_NAME = "size32"

  def __init__(self, *, train_examples: int | None = None, validation_examples: int | None = None,
               **kwargs):
    self._counts_override = {"train": train_examples, "validation": validation_examples}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(s, s, 3), dtype=np.uint8),
            "caption": tfds.features.Text(),
            "colour": tfds.features.ClassLabel(names=list(render.COLOURS)),
            "shape": tfds.features.ClassLabel(names=list(render.SHAPES)),
            "size": tfds.features.ClassLabel(names=list(render.SIZES)),
            "position": tfds.features.ClassLabel(names=list(render.POSITIONS)),
            "index": np.int64,
        }),
        supervised_keys=("image", "caption"),
        disable_shuffling=True,  # record k is example k; the pipeline shuffles globally
        homepage="https://github.com/glide-jax/glide-jax/blob/main/docs/data.md",
    )

  def split_count(self, split: str) -> int:
    override = self._counts_override.get(split)
    if override is not None:
      return int(override)
    return {"train": self.builder_config.train_examples,
            "validation": self.builder_config.validation_examples}[split]

  def _split_generators(self, dl_manager):
    del dl_manager  # procedural: nothing to download
    return {split: self._generate_examples(split) for split in ("train", "validation")}

  def _generate_examples(self, split: str):
    size = self.builder_config.image_size
    chunk = max(16, 2 ** 19 // (size * size))  # keep the render buffers small
    for ex in render.generate(render.SPLIT_SEEDS[split], 0, self.split_count(split), size, chunk):
      ex["image"] = encode_png(ex["image"])  # PIL is ~20x faster than TFDS's per-image TF encode
      yield ex["index"], ex


def encode_png(image: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> PNG bytes (lossless; fast compression: these images compress anyway)."""
  from PIL import Image

  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()
