"""Interoperability with the PyTorch reference (glide-text2im): checkpoints and reference dumps."""
