"""XLA CPU flags that make our convolutions fast, set before JAX creates its CPU backend.

Measured on the 2-core dev machine (docs/performance.md): jaxlib 0.10's default routes convolutions
through YNNPACK fusions, which run the demo's 64-128-channel convolutions (and their weight
gradients) at 35-90 GFLOP/s; oneDNN's convolution is about 1.4x faster on the whole train step.
Elementwise fusions are NOT given to YNNPACK: with them it fuses each convolution with the bias add
that follows and runs the pair at about half oneDNN's speed (the released base's train step took
33.5 s instead of 26.6 s). Reduction and dot fusions stay with YNNPACK. CPU backend only.

  GLIDE_JAX_CPU_FLAGS=0      keep XLA's defaults
A flag already present in XLA_FLAGS is left as the user set it.
"""
from __future__ import annotations

import os

FLAGS = (
    "--xla_cpu_experimental_ynn_fusion_type=dot,reduce",
    "--xla_cpu_experimental_onednn_fusion_type=individual_convolution",
)
# The flags appeared in the jaxlib 0.10 series; an older XLA aborts on unknown flags.
MIN_JAXLIB = (0, 10)


def _jaxlib_version() -> tuple[int, ...]:
  from importlib import metadata
  try:
    parts = metadata.version("jaxlib").split(".")[:2]
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)
  except metadata.PackageNotFoundError:
    return (0,)


def apply(environ: dict | None = None) -> list[str]:
  """Adds FLAGS to XLA_FLAGS (unless disabled or already set); returns the flags added.

  Has no effect on a backend that already exists, so it runs on `import glide_jax`."""
  env = os.environ if environ is None else environ
  if env.get("GLIDE_JAX_CPU_FLAGS", "1").lower() in ("0", "off", "false", "no"):
    return []
  if _jaxlib_version() < MIN_JAXLIB:
    return []
  current = env.get("XLA_FLAGS", "")
  added = [f for f in FLAGS if f.split("=")[0] not in current]
  if added:
    env["XLA_FLAGS"] = " ".join([current, *added]).strip()
  return added
