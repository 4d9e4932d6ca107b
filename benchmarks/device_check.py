"""The device check: parity on the accelerator and how well it is used, in one JSON file.

  bash benchmarks/device_check.sh                  # on a GPU/TPU machine: within 8 minutes
  bash benchmarks/device_check.sh --cpu            # the same at small sizes on the CPU (CI)
  python -m benchmarks.device_check --cpu --out /tmp/dc
  bash benchmarks/device_check.sh --only parity train_step --parity-tests flash --cap train_step=240

Sections, each in its own process under a share of one time budget (a section that runs out of
time is recorded as timed out and the next one starts; the JSON is rewritten after each):
  parity             the parity tests (pytest) with jax_default_matmul_precision='highest'
                     (`glide-jax parity`'s check of every dump when pytest is not installed)
  forward            the released base's CFG-pair forward (batch 2, 64 px), bf16 and float32
  train_step         its train step at batch 4 (configs/base.py:variant=released), bf16 and float32
  sample             a 64 px classifier-free-guided sample, DPM++ at 15 steps (bf16)
  shapes_train_step  the shapes demo's train step (configs/shapes.py: batch 32, float32)
  parity_dumps       max|ours - ref| / max|ref| of every output of every reference dump ('highest')
  attention_cudnn    GPU only: the bf16 forward with attention_impl='cudnn'
Timings come from the benchmarks themselves (benchmarks/forward.py, train_step.py, sample.py):
median wall time after a warm-up call; TFLOP/s is XLA's FLOP count of the program over that time
and MFU that over the chip's dense peak (glide_jax.hardware) for the compute dtype at the default
matmul precision (float32 on a GPU: TF32). --cpu runs the same sections with an 8 px model
(benchmarks/common.py MICRO_OPTIONS), XLA's fast compile, one timed run and one parity test.

The driver itself never initialises a JAX backend (a GPU process preallocates most of the memory);
only its children do.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The parity tests: every reference dump, float32 and bf16, the attention paths against a float64
# einsum-softmax and the dumps, the text encoder against numpy, the diffusion arithmetic.
PARITY_TESTS = (
    "tests/test_unet.py::test_matches_reference_dump",
    "tests/test_unet.py::test_bfloat16_compute_within_stated_tolerance",
    "tests/test_clip.py::test_parity_with_reference_dump",
    "tests/test_clip.py::test_bfloat16_compute_close_to_reference",
    "tests/test_text_encoder.py::test_matches_numpy_reimplementation",
    "tests/test_diffusion.py::test_parity_every_array_float64",
    "tests/test_diffusion.py::test_parity_every_array_float32",
    "tests/test_attention.py::test_float32_matches_the_einsum_softmax",
    "tests/test_attention.py::test_bfloat16_logits_and_softmax_in_float32",
    "tests/test_attention.py::test_gradients_match_the_einsum_softmax",
    "tests/test_attention.py::test_xla_and_flash_paths_match_the_reference_dumps",
)
# --cpu: the suite runs them all on the CPU anyway; these show the section works.
PARITY_TESTS_CPU = ("tests/test_diffusion.py::test_parity_every_array_float32",)
DUMPS = ("text2im_base.npz", "text2im_upsample.npz", "text2im_inpaint.npz", "text2im_upsample_inpaint.npz",
         "noised_clip.npz", "diffusion.npz")
DUMPS_CPU = ("diffusion.npz",)
DTYPES = ("bfloat16", "float32")
# Import names of setup.py's requirements that the accelerator machine lacks (it has jax, flax,
# optax, orbax-checkpoint, chex, numpy, scipy, pillow, tqdm, sentencepiece, tokenizers, safetensors,
# absl-py, PyYAML and pytest; ml_collections travels as a wheel): no process of the check may need
# them. tests/test_benchmarks.py and tests/test_imports.py refuse them.
DEVICE_LACKS = ("tensorflow", "tensorflow_datasets", "array_record", "importlib_resources", "ftfy", "braceexpand",
                "filelock", "tensorboardX", "matplotlib")


@dataclasses.dataclass
class Section:
  name: str
  cap_s: float                              # the most this section may take
  specs: list[tuple[str, list[str]]]        # (benchmark or child task, argv), run in one process
  gpu_only: bool = False


def plan(cpu: bool) -> list[Section]:
  """The sections in the order they run (the most telling first)."""
  if cpu:
    fast = ["--preset", "micro", "--repeats", "1", "--no-reference", "--fast-compile"]
    return [
        Section("parity", 240, [("pytest", list(PARITY_TESTS_CPU))]),
        Section("forward", 120, [("forward", fast + ["--full-only", "--dtype", d]) for d in DTYPES]),
        Section("train_step", 240, [("train_step", fast + ["--stages", "base", "--dtype", d]) for d in DTYPES]),
        Section("sample", 120, [("sample", ["--preset", "micro", "--repeats", "1", "--no-reference", "--samplers",
                                            "dpm++", "--steps", "dpm++=15", "--no-upsample", "--reference-steps", "0",
                                            "--dtype", "bfloat16"])]),
        Section("shapes_train_step", 180, [("train_step", fast + ["--stages", "shapes", "--batch", "4"])]),
        Section("parity_dumps", 120, [("parity_dumps", list(DUMPS_CPU))]),
        Section("attention_cudnn", 60, [("forward", fast + ["--full-only", "--dtype", "bfloat16",
                                                            "--attention-impl", "cudnn"])], gpu_only=True),
    ]
  common = ["--preset", "released", "--no-reference"]
  return [
      Section("parity", 150, [("pytest", list(PARITY_TESTS))]),
      Section("forward", 90, [("forward", common + ["--full-only", "--repeats", "10", "--dtype", d]) for d in DTYPES]),
      Section("train_step", 150, [("train_step", common + ["--stages", "base", "--batch", "4", "--repeats", "5",
                                                           "--dtype", d]) for d in DTYPES]),
      Section("sample", 90, [("sample", common + ["--samplers", "dpm++", "--steps", "dpm++=15", "--no-upsample",
                                                  "--reference-steps", "0", "--repeats", "2", "--dtype", "bfloat16"])]),
      Section("shapes_train_step", 60, [("train_step", ["--no-reference", "--stages", "shapes", "--repeats", "10"])]),
      Section("parity_dumps", 60, [("parity_dumps", list(DUMPS))]),
      Section("attention_cudnn", 45, [("forward", common + ["--full-only", "--repeats", "10", "--dtype", "bfloat16",
                                                            "--attention-impl", "cudnn"])], gpu_only=True),
  ]


# ----------------------------------------------------------------------------- child processes
def _child(specs: list[tuple[str, list[str]]]) -> int:
  """Runs each spec in this process, a marker line before each and an error line if one raises."""
  from glide_jax import cpu_flags
  cpu_flags.apply()
  import importlib
  for i, (name, argv) in enumerate(specs):
    print(json.dumps({"device_check_spec": i}), flush=True)
    try:
      if name == "parity_dumps":
        _parity_dumps(argv)
      else:
        importlib.import_module(f"benchmarks.{name}").main(argv)
    except Exception as e:  # noqa: BLE001 - report it and run the next spec
      print(json.dumps({"device_check_error": i, "error": f"{type(e).__name__}: {e}"[:2000]}), flush=True)
  return 0


def _parity_dumps(dumps: list[str]) -> None:
  """`glide-jax parity`'s check of each dump, float32 at 'highest', one JSON line per dump."""
  import jax

  from glide_jax.commands import parity
  from glide_jax.interop.glide_text2im import check_dump
  folder = ROOT / "tests" / "fixtures" / "reference"
  with jax.default_matmul_precision("highest"):
    for name in dumps:
      path = folder / name
      try:
        tol = parity.DIFFUSION_TOLERANCE if parity._is_diffusion_dump(path) else parity.MODEL_TOLERANCE
        errors = check_dump(path)
      except Exception as e:  # noqa: BLE001 - report this dump, check the next
        print(json.dumps({"dump": name, "error": f"{type(e).__name__}: {e}"[:2000]}), flush=True)
        continue
      above = {k: v for k, v in errors.items() if not (math.isfinite(v) and v <= tol)}
      row = {"dump": name, "tolerance": tol, "max_error": max(errors.values(), default=0.0), "above": above}
      if len(errors) <= 16:  # the models' few outputs; the diffusion dump has ~80 arrays
        row["errors"] = errors
      print(json.dumps(row), flush=True)


def nvidia_smi() -> list[dict[str, str]] | None:
  """Each GPU's name, driver, memory and clocks as `nvidia-smi` reports them (None without it): what
  jax does not say about the machine a figure came from."""
  import shutil
  fields = ("name", "driver_version", "memory.total", "clocks.max.sm", "power.limit", "pcie.link.gen.current")
  exe = shutil.which("nvidia-smi")
  if exe is None:
    return None
  try:
    out = subprocess.run([exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
  except (OSError, subprocess.SubprocessError) as e:
    return [{"error": f"{type(e).__name__}: {e}"[:300]}]
  return [dict(zip(fields, (v.strip() for v in line.split(",")), strict=False)) for line in out.splitlines()
          if line.strip()]


def _probe() -> dict[str, Any]:
  """Run in a child: the backend and chip, and the peaks MFU is taken against."""
  import jax

  from glide_jax import hardware
  device = jax.devices()[0]
  version = str(getattr(getattr(device, "client", None), "platform_version", ""))
  kind = device.device_kind
  peaks = {"bfloat16": hardware.peak_flops(kind, "bfloat16"), "float32": hardware.peak_flops(kind, "float32"),
           "float32_highest": hardware.peak_flops(kind, "float32", "highest")}
  chip = hardware.chip_for(kind)
  return {"backend": jax.default_backend(), "platform": device.platform, "platform_version": version,
          "device_kind": kind, "chip": chip and chip.name, "num_devices": len(jax.devices()),
          "jax": jax.__version__, "python": sys.version.split()[0], "nvidia_smi": nvidia_smi(),
          "peak_tflops_per_s": {k: v and v / 1e12 for k, v in peaks.items()}}


# ----------------------------------------------------------------------------- the driver
def _run(cmd: list[str], env: dict, timeout: float, log) -> tuple[str, int | None, bool]:
  """(stdout, return code or None, timed out); stderr goes to the log."""
  log.write(f"\n$ {' '.join(cmd)}\n")
  log.flush()
  try:
    out = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True, timeout=timeout,
                         check=False)
    stdout, rc, timed_out = out.stdout, out.returncode, False
  except subprocess.TimeoutExpired as e:
    stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    rc, timed_out = None, True
  log.write(stdout)
  log.flush()
  return stdout, rc, timed_out


def _json_lines(text: str) -> list[dict]:
  rows = []
  for line in text.splitlines():
    if line.startswith("{"):
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  return rows


def _by_spec(rows: list[dict]) -> list[list[dict]]:
  groups: list[list[dict]] = []
  for row in rows:
    if "device_check_spec" in row:
      groups.append([])
    elif groups:
      groups[-1].append(row)
  return groups


_KEEP = ("params", "batch", "image_size", "dtype", "attention_impl", "median_s", "steps_per_s", "compile_s",
         "loss", "gflop", "tflops_per_s", "peak_tflops_per_s", "mfu")


def _benchmark_result(name: str, group: list[dict], timed_out: bool = False) -> dict[str, Any]:
  """The figures of one benchmark run from its JSON lines; `phases` (seconds since it started at the
  end of each step it reports, benchmarks/common.py Phases) says where a cut-off run had got to."""
  errors = [r["error"] for r in group if "device_check_error" in r]
  summary = next((r for r in reversed(group) if r.get("summary")), None)
  phases = {r["phase"]: r["elapsed_s"] for r in group if "phase" in r}
  if summary is None:
    if timed_out and not errors:
      out = {"status": "timed_out", "reached": next(reversed(phases), None)}
    else:
      out = {"status": "failed", "error": errors[0] if errors else "no summary line"}
    return {**out, "phases": phases} if phases else out
  ours = next((r for r in group if r.get("side") == "ours"), {})
  config = summary.get("config") or {}
  flat = {**config, **ours, **summary, "median_s": summary.get("ours_s")}
  if name == "sample":
    flat.update(sampler=summary.get("sampler"), steps=summary.get("steps"), image_size=ours.get("image_size"),
                batch=ours.get("batch"), dtype=ours.get("dtype"), wall_s=summary.get("ours_s"))
    keep = ("sampler", "steps", "image_size", "batch", "dtype", "wall_s", "compile_s")
  else:
    keep = _KEEP
  out = {k: flat.get(k) for k in keep if k in flat}
  if phases:
    out["phases"] = phases
  out["status"] = "failed" if errors else "ok"
  if errors:
    out["error"] = errors[0]
  return out


def _junit(path: pathlib.Path) -> dict[str, Any]:
  import xml.etree.ElementTree as ET
  if not path.is_file():
    return {}
  root = ET.parse(path).getroot()
  suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
  counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
  failing = []
  for case in root.iter("testcase"):
    for bad in list(case.findall("failure")) + list(case.findall("error")):
      failing.append({"test": f"{case.get('classname')}::{case.get('name')}",
                      "message": (bad.get("message") or "")[:500]})
  counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
  return {**counts, "failing": failing}


def run_section(section: Section, env: dict, timeout: float, out_dir: pathlib.Path, log,
                probe: dict) -> dict[str, Any]:
  py = sys.executable
  t0 = time.perf_counter()
  kind, argv = section.specs[0]
  if kind == "pytest":
    return {**_parity(argv, env, timeout, out_dir, log, probe), "seconds": round(time.perf_counter() - t0, 1)}
  stdout, rc, timed_out = _run([py, "-m", "benchmarks.device_check", "--child", json.dumps(section.specs)],
                               env, timeout, log)
  groups = _by_spec(_json_lines(stdout))
  result: dict[str, Any] = {}
  if kind == "parity_dumps":
    rows = [r for g in groups for r in g if "dump" in r and "error" not in r]
    errors = [r["error"] for g in groups for r in g if "device_check_error" in r]
    errors += [f"{r['dump']}: {r['error']}" for g in groups for r in g if "dump" in r and "error" in r]
    above = {r["dump"]: r["above"] for r in rows if r["above"]}
    result = {"matmul_precision": "highest", "max_error": {r["dump"]: r["max_error"] for r in rows},
              "tolerance": {r["dump"]: r["tolerance"] for r in rows}, "above_tolerance": above,
              "errors": {r["dump"]: r["errors"] for r in rows if "errors" in r}}
    ok = not errors and not above and len(rows) == len(argv)
    if errors:
      result["error"] = errors
  else:
    statuses = []
    for i, (name, spec_argv) in enumerate(section.specs):
      key = spec_argv[spec_argv.index("--dtype") + 1] if "--dtype" in spec_argv and len(section.specs) > 1 else None
      res = _benchmark_result(name, groups[i], timed_out) if i < len(groups) else {"status": "not run"}
      statuses.append(res["status"])
      if key:
        result[key] = res
      else:
        result.update(res)
    result.pop("status", None)
    ok = all(s == "ok" for s in statuses)
  status = "timed_out" if timed_out else ("ok" if ok and rc == 0 else "failed")
  return {"status": status, "seconds": round(time.perf_counter() - t0, 1), **result}


def parity_platforms(probe: dict) -> str:
  """JAX_PLATFORMS for the parity tests on the probed accelerator: the device first (it is the
  default backend), then the CPU, which the flash-attention test's interpreted Pallas kernel needs
  for its host callbacks (on an H200 with the device alone it failed: 'io_callback failed to find
  a local CPU device')."""
  version = str(probe.get("platform_version", "")).lower()
  device = ("cuda" if "cuda" in version else "rocm" if "rocm" in version
            else probe.get("platform") or probe["backend"])
  return f"{device},cpu"


def _parity(tests: list[str], env: dict, timeout: float, out_dir: pathlib.Path, log, probe: dict) -> dict:
  env = dict(env, JAX_DEFAULT_MATMUL_PRECISION="highest")
  if probe.get("backend") != "cpu":
    # tests/conftest.py defaults to the CPU (JAX_PLATFORMS=cpu, no CUDA devices): name the device.
    env["JAX_PLATFORMS"] = parity_platforms(probe)
    env.setdefault("CUDA_VISIBLE_DEVICES", "0")
    if not env["CUDA_VISIBLE_DEVICES"]:
      env["CUDA_VISIBLE_DEVICES"] = "0"
  has_pytest = subprocess.run([sys.executable, "-c", "import pytest"], cwd=ROOT, env=env,
                              capture_output=True, check=False).returncode == 0
  if not has_pytest:  # the same dumps through `glide-jax parity`
    stdout, rc, timed_out = _run([sys.executable, "-m", "glide_jax.cli", "parity", "tests/fixtures/reference"],
                                 env, timeout, log)
    last = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    status = "timed_out" if timed_out else ("ok" if rc == 0 else "failed")
    return {"status": status, "runner": "glide-jax parity", "matmul_precision": "highest", "summary": last}
  xml = out_dir / "parity_junit.xml"
  xml.unlink(missing_ok=True)
  cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", f"--junitxml={xml}", *tests]
  stdout, rc, timed_out = _run(cmd, env, timeout, log)
  counts = _junit(xml)
  if not counts:  # killed before pytest wrote its report: what its per-test lines said
    counts = {**pytest_progress(stdout), "incomplete": True}
  status = "timed_out" if timed_out else ("ok" if rc == 0 and counts.get("passed", 0) > 0 else "failed")
  return {"status": status, "runner": "pytest", "matmul_precision": "highest", "selected": tests,
          "jax_platforms": env.get("JAX_PLATFORMS"), **counts}


_OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def pytest_progress(stdout: str) -> dict[str, Any]:
  """The outcomes `pytest -v` printed test by test, in the junit report's terms: all a parity run
  cut off by its share leaves (pytest writes the report at the end)."""
  outcomes = [m.groups() for m in map(_OUTCOME.match, stdout.splitlines()) if m]
  count = {k: sum(1 for _, o in outcomes if o in v) for k, v in
           (("passed", ("PASSED", "XPASS")), ("failures", ("FAILED",)), ("errors", ("ERROR",)),
            ("skipped", ("SKIPPED", "XFAIL")))}
  return {"tests": len(outcomes), **count,
          "failing": [{"test": t, "message": o} for t, o in outcomes if o in ("FAILED", "ERROR")],
          "last": outcomes[-1][0] if outcomes else None}


def with_caps(sections: list[Section], caps: list[str]) -> list[Section]:
  """The plan with `NAME=SECONDS` overrides of section caps (e.g. a slow first compile on a new device:
  `--cap train_step=300`); an unknown section or a bad number is refused by name."""
  by_name = {s.name: s for s in sections}
  out = dict(by_name)
  for item in caps:
    name, sep, value = item.partition("=")
    if not sep or name not in by_name:
      raise ValueError(f"--cap {item!r}: expected SECTION=SECONDS with SECTION one of {', '.join(by_name)}")
    try:
      seconds = float(value)
    except ValueError:
      raise ValueError(f"--cap {item!r}: {value!r} is not a number of seconds") from None
    if not seconds > 0:
      raise ValueError(f"--cap {item!r}: the seconds must be positive")
    out[name] = dataclasses.replace(by_name[name], cap_s=seconds)
  return [out[s.name] for s in sections]


def with_parity_tests(sections: list[Section], patterns: list[str]) -> list[Section]:
  """The plan with the parity section running the tests of PARITY_TESTS whose id contains one of
  `patterns` (a rerun that only has to confirm a fix: `--parity-tests test_diffusion flash`; with
  --cpu the same tests, so the command can be tried here first); a pattern that matches none of
  them is refused by name."""
  if not patterns:
    return sections
  tests = list(PARITY_TESTS)
  out = []
  for section in sections:
    if section.name == "parity":
      for pattern in patterns:
        if not any(pattern in t for t in tests):
          raise ValueError(f"--parity-tests {pattern!r} matches none of the parity tests: {', '.join(tests)}")
      section = dataclasses.replace(section, specs=[("pytest", [t for t in tests if any(q in t for q in patterns)])])
    out.append(section)
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="device_check", description=__doc__.splitlines()[0])
  p.add_argument("--cpu", action="store_true", help="small sizes on the CPU (CI); otherwise the default backend")
  p.add_argument("--out", default=None, help="output folder (default $OUT, else runs/device_check)")
  p.add_argument("--budget-s", type=float, default=None,
                 help="the whole check's time (default 450 s; --cpu 900 s); each section gets its share")
  p.add_argument("--only", nargs="+", default=None, help="run only these sections")
  p.add_argument("--cap", action="append", default=[], metavar="SECTION=SECONDS",
                 help="the most one section may take (repeatable; defaults in plan())")
  p.add_argument("--parity-tests", nargs="+", default=[], metavar="PATTERN",
                 help="run only the parity tests whose id contains one of these")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child is not None:
    return _child([tuple(s) for s in json.loads(args.child)])

  try:
    sections = with_parity_tests(with_caps(plan(args.cpu), args.cap), args.parity_tests)
  except ValueError as e:
    p.error(str(e))
  unknown = sorted(set(args.only or ()) - {s.name for s in sections})
  if unknown:
    p.error(f"--only {' '.join(unknown)}: no such section (the sections: {', '.join(s.name for s in sections)})")
  start = time.perf_counter()
  budget = args.budget_s or (900.0 if args.cpu else 450.0)
  out_dir = pathlib.Path(args.out or os.environ.get("OUT") or ROOT / "runs" / "device_check")
  out_dir.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p_ for p_ in env.get("PYTHONPATH", "").split(os.pathsep) if p_])
  env.setdefault("GLIDE_JAX_COMPILE_CACHE", "off")  # compile times as a fresh machine sees them
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if args.cpu:
    env["JAX_PLATFORMS"] = "cpu"
  report: dict[str, Any] = {"mode": "cpu" if args.cpu else "device", "budget_s": budget}
  path = out_dir / "device_check.json"

  def write():
    report["total_s"] = round(time.perf_counter() - start, 1)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(path)

  with open(out_dir / "device_check.log", "w") as log:
    probe_code = "import json, benchmarks.device_check as d; print(json.dumps(d._probe()))"
    stdout, rc, _ = _run([sys.executable, "-c", probe_code], env, 120, log)
    rows = _json_lines(stdout)
    if rc != 0 or not rows:
      report["machine"] = {"error": "the probe failed; see device_check.log"}
      write()
      print(f"device_check: no backend ({out_dir / 'device_check.log'})", file=sys.stderr)
      return 1
    probe = report["machine"] = rows[-1]
    write()
    gpu = probe["backend"] == "gpu"
    for section in sections:
      if args.only and section.name not in args.only:
        continue
      if section.gpu_only and not gpu:
        report[section.name] = {"status": "skipped", "why": "needs a GPU"}
        continue
      left = budget - (time.perf_counter() - start)
      if left < 15:
        report[section.name] = {"status": "not_run", "why": f"no time left in the {budget:.0f} s budget"}
        write()
        continue
      print(f"device_check: {section.name} (up to {min(section.cap_s, left):.0f} s)", file=sys.stderr, flush=True)
      report[section.name] = run_section(section, env, min(section.cap_s, left), out_dir, log, probe)
      write()
  statuses = {k: v["status"] for k, v in report.items() if isinstance(v, dict) and "status" in v}
  report["ok"] = all(s in ("ok", "skipped") for s in statuses.values()) and bool(statuses)
  write()
  print(json.dumps({"device_check": str(path), "ok": report["ok"], "sections": statuses,
                    "total_s": report["total_s"]}))
  return 0 if report["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
