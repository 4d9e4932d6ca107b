"""Datasets, tokenizers and the input pipeline (docs/data.md).

Importing this package registers the TFDS builders `glide_shapes` and `image_folder`, so
`tfds.data_source("glide_shapes/size64", split="validation")` works after `import glide_jax.data`
(prepared data is ArrayRecord by default; `tfds.load` reads TFRecord ones only).
TensorFlow itself is imported only when a builder prepares or a pipeline is built. Without TFDS
installed (an accelerator machine with jax alone) nothing is registered and the rest, the
tokenizers among it, imports as usual.
"""
try:
  import tensorflow_datasets as _tfds  # noqa: F401
except ModuleNotFoundError as e:
  if e.name != "tensorflow_datasets":  # TFDS is there but broken: say so
    raise
else:
  from glide_jax.data import image_folder as image_folder
  from glide_jax.data import shapes as shapes
