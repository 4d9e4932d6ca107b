"""Every test runs on an 8-device CPU platform; the flag must be set before jax is imported."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import glide_jax  # noqa: E402,F401  (the XLA CPU flags, as every entry point sets them)
import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
REFERENCE_DIR = SHARED / "fixtures" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> pathlib.Path:
  if not REFERENCE_DIR.is_dir():
    pytest.skip(f"reference dumps not found at {REFERENCE_DIR}")
  return REFERENCE_DIR
