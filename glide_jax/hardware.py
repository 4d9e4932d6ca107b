"""Per-chip peak FLOP/s, HBM size and HBM bandwidth of the accelerators we plan for and report MFU on.

  from glide_jax import hardware
  hardware.chip_for("TPU v5 lite").hbm_bytes           # by jax's Device.device_kind, or "v5e"
  hardware.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16")   # 989.4e12; None for an unknown kind

Every figure is a public spec sheet's dense (no sparsity) peak for one chip. TPUs publish no
float32 matmul rate: XLA runs a float32 matmul there as bf16 passes (one at the default precision).
"""
from __future__ import annotations

import dataclasses
from typing import Any

GiB = 1 << 30
MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str                      # short name: 'v5e', 'h100', ...
  device_kinds: tuple[str, ...]  # jax `Device.device_kind` strings of this chip
  bf16_flops: float              # dense bf16 (= fp16) matmul FLOP/s per chip
  tf32_flops: float | None       # dense TF32 tensor-core FLOP/s (None: no TF32, the TPUs)
  fp32_flops: float | None       # full float32 FLOP/s (None: not published)
  hbm_bytes: int                 # HBM per chip
  hbm_bandwidth: float           # HBM bytes/s per chip
  source: str                    # the spec sheet the figures come from

  @property
  def peak_flops(self) -> float:
    """Dense bf16 FLOP/s: the field `plan` reads."""
    return self.bf16_flops


CHIPS: dict[str, Chip] = {c.name: c for c in (
    # cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM2, 1,200 GB/s.
    Chip("v4", ("TPU v4",), 275e12, None, None, 32 * GiB, 1.2e12, "https://cloud.google.com/tpu/docs/v4"),
    # cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GiB HBM2, 819 GB/s.
    Chip("v5e", ("TPU v5 lite", "TPU v5e"), 197e12, None, None, 16 * GiB, 8.19e11,
         "https://cloud.google.com/tpu/docs/v5e"),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM2e, 2,765 GB/s.
    Chip("v5p", ("TPU v5p", "TPU v5"), 459e12, None, None, 95 * GiB, 2.765e12,
         "https://cloud.google.com/tpu/docs/v5p"),
    # cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GiB HBM, 1,640 GB/s.
    Chip("v6e", ("TPU v6 lite", "TPU v6e"), 918e12, None, None, 32 * GiB, 1.64e12,
         "https://cloud.google.com/tpu/docs/v6e"),
    # NVIDIA A100 datasheet, SXM 80GB: bf16 312, TF32 156, FP32 19.5 TFLOP/s (dense); 2,039 GB/s;
    # 80 GB HBM2e (nvidia-smi total 81,920 MiB).
    Chip("a100", ("NVIDIA A100-SXM4-80GB",), 312e12, 156e12, 19.5e12, 81920 * MiB, 2.039e12,
         "https://www.nvidia.com/en-us/data-center/a100/"),
    # NVIDIA H100 datasheet, SXM: bf16 989.4, TF32 494.7 (half the sheet's with-sparsity 1,979 and
    # 989), FP32 67 TFLOP/s; 3.35 TB/s; 80 GB HBM3 (nvidia-smi total 81,559 MiB).
    Chip("h100", ("NVIDIA H100 80GB HBM3",), 989.4e12, 494.7e12, 67e12, 81559 * MiB, 3.35e12,
         "https://www.nvidia.com/en-us/data-center/h100/"),
    # NVIDIA H200 datasheet, SXM: the H100 SXM's compute (bf16 989.4, TF32 494.7, FP32 67 TFLOP/s);
    # 4.8 TB/s; 141 GB HBM3e (nvidia-smi total 143,771 MiB).
    Chip("h200", ("NVIDIA H200",), 989.4e12, 494.7e12, 67e12, 143771 * MiB, 4.8e12,
         "https://www.nvidia.com/en-us/data-center/h200/"),
)}

_BY_KIND = {" ".join(kind.lower().split()): c for c in CHIPS.values() for kind in c.device_kinds}
_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "bfloat16", "fp16": "bfloat16",
           "float32": "float32", "fp32": "float32", "f32": "float32", "tf32": "tf32",
           "tensorfloat32": "tf32"}
# jax_default_matmul_precision / lax.Precision names -> 'default' | 'high' | 'highest'
_PRECISIONS = {"default": "default", "fastest": "default", "bfloat16": "default",
               "high": "high", "tensorfloat32": "high", "bfloat16_3x": "high",
               "highest": "highest", "float32": "highest"}


def chip_for(device_kind: str) -> Chip | None:
  """The chip of a jax `device_kind` ('TPU v5 lite', 'NVIDIA H200') or short name ('v5e'); None if unknown.

  Kinds match whole (case and spacing aside), so 'NVIDIA H100 PCIe' or 'NVIDIA H200 NVL', other
  chips with other peaks, are unknown rather than taken for the SXM parts."""
  key = " ".join(str(device_kind).lower().split())
  return CHIPS.get(key) or _BY_KIND.get(key)


def peak_flops(device_kind: str, dtype: Any = "bfloat16", precision: Any = None) -> float | None:
  """Peak dense matmul FLOP/s of one chip for `dtype`; None when the chip or the rate is unknown.

  bfloat16 / float16: the bf16 peak. 'tf32': the TF32 tensor-core peak. float32 at `precision`
  (None = 'default', or 'high' / 'highest' as `jax.default_matmul_precision` / `lax.Precision`):
  on a GPU the TF32 peak at default and high (XLA uses TF32 there) and the FP32 peak at highest;
  on a TPU the bf16 peak at default (one bf16 pass), None at high and highest (unpublished)."""
  chip = chip_for(device_kind)
  if chip is None:
    return None
  name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None) or str(dtype)
  kind = _DTYPES.get(str(name).lower())
  if kind is None:
    raise ValueError(f"peak_flops: unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
  if kind == "bfloat16":
    return chip.bf16_flops
  if kind == "tf32":
    return chip.tf32_flops
  level = _PRECISIONS.get(str(getattr(precision, "name", precision) or "default").lower())
  if level is None:
    raise ValueError(f"peak_flops: unknown precision {precision!r}; use one of {sorted(_PRECISIONS)}")
  if chip.tf32_flops is None:  # a TPU
    return chip.bf16_flops if level == "default" else None
  return chip.fp32_flops if level == "highest" else chip.tf32_flops


def compiled_cost(compiled: Any) -> dict[str, float]:
  """XLA's cost analysis of a compiled executable: {'flops': ..., 'bytes accessed': ...} per device
  (a while loop's body counted once); {} where the backend reports none. Used by the trainer's
  MFU, `glide-jax plan` and the benchmarks, so all three count the same way."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends and jaxlib versions raise instead of returning None
    return {}
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return {k: float(v) for k, v in (cost or {}).items() if isinstance(v, (int, float))}


def compiled_flops(compiled: Any) -> float | None:
  """The FLOPs per device of one call of `compiled`, or None when unknown (or zero)."""
  return compiled_cost(compiled).get("flops") or None
