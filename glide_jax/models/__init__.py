"""Flax models: GLIDE's text transformer and ADM U-Net (`unet.py`), the noised CLIP (`clip.py`),
shared named layers (`layers.py`) and `registry.create_model` / `registry.PRESETS`.

Submodules are imported on use (`from glide_jax.models import registry`), keeping this package light.
"""
