"""Datasets, tokenizers and the input pipeline (docs/data.md).

Importing this package registers the TFDS builders `glide_shapes` and `image_folder`, so
`tfds.load("glide_shapes/size64", split="validation")` works after `import glide_jax.data`.
TensorFlow itself is imported only when a builder prepares or a pipeline is built.
"""
from glide_jax.data import image_folder as image_folder
from glide_jax.data import shapes as shapes
