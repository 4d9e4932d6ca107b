"""XLA CPU flags that make our convolutions fast, set by the entry points before JAX creates a backend.

Measured on the 2-core dev machine (docs/performance.md): jaxlib 0.10's default routes convolutions
through YNNPACK fusions, which run the demo's 64-128-channel convolutions (and their weight
gradients) at 35-90 GFLOP/s; oneDNN's convolution is about 1.4x faster on the whole train step.
Elementwise fusions are NOT given to YNNPACK: with them it fuses each convolution with the bias add
that follows and runs the pair at about half oneDNN's speed (the released base's train step took
33.5 s instead of 26.6 s). Reduction and dot fusions stay with YNNPACK.

`import glide_jax` changes nothing; `apply()` is called by the `glide-jax` command, `python -m
benchmarks.run`, the demo scripts and the tests. It adds the flags only when
  - the backend will be the CPU (`cpu_backend_expected`: decided from JAX_PLATFORMS and the
    installed plugins and device nodes, without initialising a backend), and
  - the installed jaxlib knows each flag (`known_flags`: XLA aborts the process on an unknown flag
    in XLA_FLAGS, so an unknown one is dropped with a warning instead).

  GLIDE_JAX_CPU_FLAGS=0      keep XLA's defaults
  GLIDE_JAX_FLAG_CACHE=F     where the names missing from a jaxlib are remembered ('off': nowhere;
                             default ~/.cache/glide_jax/xla_flags_missing.json)
A flag already present in XLA_FLAGS is left as the user set it.
"""
from __future__ import annotations

import functools
import glob
import importlib.util
import json
import mmap
import os
import pathlib
import warnings

FLAGS = (
    "--xla_cpu_experimental_ynn_fusion_type=dot,reduce",
    "--xla_cpu_experimental_onednn_fusion_type=individual_convolution",
)
_GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13",
                "jax_rocm7_plugin", "jax_rocm60_plugin", "jax_plugins.xla_rocm7", "jax_plugins.xla_rocm60")
_GPU_DEVICE_NODES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")
_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips (jax/_src/hardware_utils.py reads the same files)


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):  # a missing parent package ("jax_plugins")
    return False


def _gpu_node_present() -> bool:
  return any(os.path.exists(d) for d in _GPU_DEVICE_NODES)


def _tpu_chip_present() -> bool:
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      if pathlib.Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR:
        return True
    except OSError:
      continue
  return False


def cpu_backend_expected(environ: dict | None = None) -> bool:
  """Whether JAX's default backend will be the CPU, decided without initialising one.

  JAX_PLATFORMS set: its first entry is 'cpu'. Unset: no GPU plugin with a visible GPU device node
  (CUDA_VISIBLE_DEVICES='' or '-1' hides them), and no libtpu with a TPU chip on the PCI bus. A
  libtpu or CUDA plugin installed on a machine without the chip falls back to the CPU, as JAX does."""
  env = os.environ if environ is None else environ
  platforms = env.get("JAX_PLATFORMS", "") or env.get("JAX_PLATFORM_NAME", "")
  if platforms.strip():
    return platforms.split(",")[0].strip().lower() == "cpu"
  gpus_hidden = env.get("CUDA_VISIBLE_DEVICES") in ("", "-1")
  if not gpus_hidden and _gpu_node_present() and any(_installed(m) for m in _GPU_PLUGINS):
    return False
  return not (_installed("libtpu") and _tpu_chip_present())


def _jaxlib_libraries() -> list[pathlib.Path]:
  """jaxlib's large shared libraries (libjax_common.so in 0.10; _jax.so / xla_extension.so before)."""
  spec = importlib.util.find_spec("jaxlib")
  if spec is None or not spec.submodule_search_locations:
    return []
  root = pathlib.Path(next(iter(spec.submodule_search_locations)))
  libs = [p for p in root.glob("*.so*") if p.is_file() and p.stat().st_size > 10 << 20]
  return sorted(libs, key=lambda p: -p.stat().st_size)


def _name_in(mm: mmap.mmap, name: bytes) -> bool:
  """`name` as a whole C string's tail in the library (not a prefix of a longer flag name)."""
  start = mm.find(name)
  while start >= 0:
    end = start + len(name)
    if end >= len(mm) or mm[end:end + 1] == b"\0":
      return True
    start = mm.find(name, start + 1)
  return False


def _missing_cache_path() -> pathlib.Path | None:
  where = os.environ.get("GLIDE_JAX_FLAG_CACHE", "")
  if where.lower() in ("off", "0", "none", "false"):
    return None
  return pathlib.Path(where or pathlib.Path.home() / ".cache" / "glide_jax" / "xla_flags_missing.json")


def _library_key(libraries: tuple[str, ...]) -> str:
  return "|".join(f"{p}:{os.stat(p).st_size}:{os.stat(p).st_mtime_ns}" for p in libraries)


@functools.cache
def _known(names: tuple[str, ...], libraries: tuple[str, ...]) -> frozenset[str]:
  """The names found in the libraries. A name found is found early; one missing costs a full scan
  (0.1 s with the library in the page cache, seconds without), so missing names are remembered on
  disk per library file (path, size, mtime: a new jaxlib is scanned afresh)."""
  cache_path, key = _missing_cache_path(), _library_key(libraries)
  cache: dict = {}
  if cache_path is not None:
    try:
      cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
      cache = {}
  known_missing = set(cache.get(key, []))
  found: set[str] = set()
  todo = [n for n in names if n not in known_missing]
  for lib in libraries:
    with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
      found.update(n for n in todo if n not in found and _name_in(mm, n.encode()))
    if len(found) == len(todo):
      break
  missing = set(todo) - found
  if missing and cache_path is not None:
    try:
      cache_path.parent.mkdir(parents=True, exist_ok=True)
      cache[key] = sorted(known_missing | missing)
      cache_path.write_text(json.dumps(cache, indent=1))
    except OSError:
      pass
  return frozenset(found)


def known_flags(flags, libraries: list[pathlib.Path] | None = None) -> list[str]:
  """The flags whose names the installed jaxlib defines (a byte search of its shared library).

  XLA registers each flag by its name string, so a name absent from every jaxlib library is one XLA
  would abort on. Costs a few milliseconds when the names are present (they sit in the first 20 MB
  of jaxlib 0.10's 350 MB library); a missing name is scanned for once per jaxlib
  (GLIDE_JAX_FLAG_CACHE: the file that remembers it, or 'off')."""
  libs = _jaxlib_libraries() if libraries is None else libraries
  names = tuple(f.lstrip("-").split("=")[0] for f in flags)
  known = _known(names, tuple(str(p) for p in libs)) if libs else frozenset()
  return [f for f, n in zip(flags, names) if n in known]


def apply(environ: dict | None = None, flags=FLAGS) -> list[str]:
  """Adds `flags` to XLA_FLAGS when the backend will be the CPU; returns the flags added.

  Skipped when disabled (GLIDE_JAX_CPU_FLAGS=0) or on another backend; a flag already present is
  left as the user set it; one the installed jaxlib does not know is dropped with a warning. Has no
  effect on a backend that already exists, so call it before the first JAX computation."""
  env = os.environ if environ is None else environ
  if env.get("GLIDE_JAX_CPU_FLAGS", "1").lower() in ("0", "off", "false", "no"):
    return []
  if not cpu_backend_expected(env):
    return []
  current = env.get("XLA_FLAGS", "")
  wanted = [f for f in flags if f.split("=")[0] not in current]
  if not wanted:
    return []
  added = known_flags(wanted)
  dropped = [f for f in wanted if f not in added]
  if dropped:
    warnings.warn(f"glide_jax.cpu_flags: the installed jaxlib does not know {dropped}; not setting them "
                  f"(XLA would abort). Convolutions may be slower on the CPU.", RuntimeWarning, stacklevel=2)
  if added:
    env["XLA_FLAGS"] = " ".join([current, *added]).strip()
  return added
