"""A persistent XLA compilation cache, so a second process with the same programs skips compiling.

  from glide_jax import compile_cache
  compile_cache.enable()          # $GLIDE_JAX_COMPILE_CACHE, else ~/.cache/glide_jax/xla

Set GLIDE_JAX_COMPILE_CACHE=off to disable (e.g. to measure cold compile times).
"""
from __future__ import annotations

import os
import pathlib

DEFAULT_DIR = pathlib.Path.home() / ".cache" / "glide_jax" / "xla"


def enable(directory: str | os.PathLike | None = None, min_compile_seconds: float = 1.0) -> str | None:
  """Points JAX's persistent cache at `directory`; returns it, or None when disabled.

  Only programs that took at least `min_compile_seconds` to compile are stored (small ones are
  cheaper to recompile than to read back)."""
  import jax

  env = os.environ.get("GLIDE_JAX_COMPILE_CACHE", "")
  if env.lower() in ("off", "0", "none", "false"):
    return None
  path = pathlib.Path(directory or env or DEFAULT_DIR).expanduser()
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return str(path)
