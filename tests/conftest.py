"""Every test runs on an 8-device CPU platform; the flag must be set before jax is imported."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from glide_jax import cpu_flags  # noqa: E402

cpu_flags.apply()  # the XLA CPU flags, as every entry point sets them

import pathlib  # noqa: E402

import pytest  # noqa: E402

# The reference dumps live in the repository, so every clone runs the parity tests.
REFERENCE_DIR = pathlib.Path(__file__).resolve().parent / "fixtures" / "reference"
REFERENCE_FILES = ("diffusion.npz", "noised_clip.npz", "text2im_base.npz", "text2im_inpaint.npz",
                   "text2im_upsample.npz", "text2im_upsample_inpaint.npz")


@pytest.fixture(scope="session")
def reference_dir() -> pathlib.Path:
  """The in-repo reference dumps; missing ones are an error, never a skip."""
  missing = [n for n in REFERENCE_FILES if not (REFERENCE_DIR / n).is_file()]
  if missing:
    raise FileNotFoundError(f"reference dumps missing from {REFERENCE_DIR}: {missing}")
  return REFERENCE_DIR
