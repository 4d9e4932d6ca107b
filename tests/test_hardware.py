"""The peak FLOP/s table (glide_jax/hardware.py): lookups by jax device_kind, dtypes, precisions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax import hardware
from glide_jax.train import logging as train_logging

# jax device_kind strings -> (chip, dense bf16 FLOP/s per chip)
KINDS = {
    "TPU v4": ("v4", 275e12),
    "TPU v5 lite": ("v5e", 197e12),
    "TPU v5e": ("v5e", 197e12),
    "TPU v5p": ("v5p", 459e12),
    "TPU v5": ("v5p", 459e12),  # v5p's kind in older jax releases
    "TPU v6 lite": ("v6e", 918e12),
    "NVIDIA A100-SXM4-80GB": ("a100", 312e12),
    "NVIDIA H100 80GB HBM3": ("h100", 989.4e12),
    "NVIDIA H200": ("h200", 989.4e12),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_lookup_by_device_kind(kind):
  name, bf16 = KINDS[kind]
  chip = hardware.chip_for(kind)
  assert chip is not None and chip.name == name
  assert hardware.chip_for(kind.upper()) is chip and hardware.chip_for(f" {kind} ") is chip
  assert hardware.peak_flops(kind) == bf16 == chip.peak_flops
  assert hardware.peak_flops(kind, jnp.bfloat16) == hardware.peak_flops(kind, "float16") == bf16
  assert train_logging.peak_flops(kind) == bf16  # the trainer's import


@pytest.mark.parametrize("kind", ["cpu", "", "TPU v3", "TPU v7", "NVIDIA H100 PCIe", "NVIDIA H200 NVL",
                                  "NVIDIA A100-SXM4-40GB", "NVIDIA A100 80GB PCIe", "Tesla V100-SXM2-16GB"])
def test_unknown_kind_is_none(kind):
  assert hardware.chip_for(kind) is None
  assert hardware.peak_flops(kind) is None
  assert hardware.peak_flops(kind, "float32", "highest") is None


def test_float32_follows_the_matmul_precision():
  h100 = "NVIDIA H100 80GB HBM3"
  assert hardware.peak_flops(h100, np.float32) == hardware.peak_flops(h100, "tf32") == 494.7e12  # default: TF32
  assert hardware.peak_flops(h100, jnp.float32, "high") == 494.7e12
  assert hardware.peak_flops(h100, "float32", "highest") == 67e12
  assert hardware.peak_flops(h100, "float32", jax.lax.Precision.HIGHEST) == 67e12
  assert hardware.peak_flops("NVIDIA A100-SXM4-80GB", "float32", "float32") == 19.5e12  # jax config name
  assert hardware.peak_flops("TPU v5p", "float32") == 459e12  # one bf16 pass at default
  assert hardware.peak_flops("TPU v5p", "float32", "highest") is None  # unpublished
  assert hardware.peak_flops("TPU v5p", "tf32") is None
  with pytest.raises(ValueError, match="unknown dtype"):
    hardware.peak_flops("TPU v4", "int8")
  with pytest.raises(ValueError, match="unknown precision"):
    hardware.peak_flops("TPU v4", "float32", "fast")


def test_every_chip_is_complete_and_sourced():
  gib = 1 << 30
  for name, chip in hardware.CHIPS.items():
    assert chip.name == name and hardware.chip_for(name) is chip
    assert chip.source.startswith("https://") and chip.device_kinds
    assert 100e12 < chip.bf16_flops < 1e15
    assert 16 * gib <= chip.hbm_bytes <= 141 * gib and 5e11 < chip.hbm_bandwidth < 5e12
    if chip.tf32_flops is not None:  # NVIDIA: bf16 = 2 x TF32 > FP32
      assert chip.bf16_flops == pytest.approx(2 * chip.tf32_flops) and chip.fp32_flops < chip.tf32_flops
  assert hardware.chip_for("v5e").hbm_bytes == 16 * gib
  assert hardware.chip_for("NVIDIA H200").hbm_bandwidth == 4.8e12
