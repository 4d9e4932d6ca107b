"""The benchmark harness runs end to end on tiny configs and prints parseable JSON lines with the
required fields. No timing assertions: speed is measured by running the benchmarks, not here."""
from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import common

FAST = ["--preset", "tiny", "--repeats", "1", "--no-reference"]


@pytest.fixture(autouse=True)
def _no_persistent_cache(monkeypatch):
  monkeypatch.setenv("GLIDE_JAX_COMPILE_CACHE", "off")  # keep tests hermetic


def _lines(capsys) -> list[dict]:
  out = capsys.readouterr().out
  rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  assert rows, out
  return rows


def _header_ok(row: dict) -> None:
  m = row["machine"]
  for key in ("cpu", "cores", "load_avg_1m", "jax", "backend", "device"):
    assert key in m
  assert "reference" in row


def test_forward(capsys):
  from benchmarks import forward
  assert forward.main(FAST + ["--fast-compile"]) == 0
  rows = _lines(capsys)
  _header_ok(rows[0])
  assert rows[0]["config"]["batch"] == 2 and rows[0]["config"]["dtype"] == "float32"
  ours = [r for r in rows if r.get("side") == "ours"]
  assert ours[0]["shapes"]["out"] == [2, 16, 16, 6]
  for r in ours:
    assert r["median_s"] > 0 and r["runs"] == 1
  summary = rows[-1]
  assert summary["summary"] and summary["ours_s"] > 0 and "ratio" not in summary


def test_train_step(capsys):
  from benchmarks import train_step
  assert train_step.main(FAST + ["--fast-compile", "--stages", "base"]) == 0
  rows = _lines(capsys)
  _header_ok(rows[0])
  ours = next(r for r in rows if r.get("side") == "ours")
  assert ours["config"]["batch"] == 4 and ours["shapes"]["image"] == [4, 16, 16, 3]
  assert np.isfinite(ours["loss"]) and ours["compile_s"] > 0 and ours["median_s"] > 0
  assert rows[-1]["summary"] and rows[-1]["config"]["stage"] == "base"
  # Progress as each step ends, in order, for a run a time limit cuts off (the device check).
  phases = [r for r in rows if "phase" in r]
  assert [r["phase"] for r in phases] == ["params", "state", "lowered", "compiled", "timed"]
  assert all(r["stage"] == "base" and r["dtype"] == "float32" for r in phases)
  elapsed = [r["elapsed_s"] for r in phases]
  assert elapsed == sorted(elapsed) and elapsed[0] >= 0
  compiled = phases[3]
  assert compiled["compile_s"] == rows[-1]["compile_s"]
  assert compiled["elapsed_s"] - phases[1]["elapsed_s"] >= compiled["compile_s"]  # lowering and compiling
  assert phases[0]["params"] == ours["config"]["params"]

  # The device check's reading of these lines, whole and cut off after the compile.
  from benchmarks import device_check
  whole = device_check._benchmark_result("train_step", rows)
  assert whole["status"] == "ok" and list(whole["phases"]) == ["params", "state", "lowered", "compiled", "timed"]
  cut = rows[:rows.index(compiled) + 1]
  late = device_check._benchmark_result("train_step", cut, timed_out=True)
  assert late["status"] == "timed_out" and late["reached"] == "compiled"
  assert late["phases"]["compiled"] == compiled["elapsed_s"] and "timed" not in late["phases"]
  early = device_check._benchmark_result("train_step", rows[:1], timed_out=True)
  assert early == {"status": "timed_out", "reached": None}
  assert device_check._benchmark_result("train_step", cut)["status"] == "failed"  # ended without a summary


def test_sample_speed(capsys):
  from benchmarks import sample
  assert sample.main(FAST + ["--samplers", "dpm++", "--steps", "dpm++=2", "--no-upsample"]) == 0
  rows = _lines(capsys)
  _header_ok(rows[0])
  summaries = [r for r in rows if r.get("summary")]
  assert [r["sampler"] for r in summaries] == ["dpm++"]
  for r in summaries:
    assert r["ours_s"] > 0 and "compile_s" in r


def test_sample_shapes_accuracy_on_a_tiny_random_bundle(tmp_path, capsys):
  from benchmarks import sample
  from glide_jax import bundle

  options = dict(common.TINY_OPTIONS["text2im"], n_vocab=64)
  params = common.random_params("text2im", options)
  meta = {"model": {"kind": "text2im", "options": options}, "dtype": "float32",
          "diffusion": {"steps": 1000, "noise_schedule": "squaredcos_cap_v2"},
          "tokenizer": {"type": "words", "text_ctx": options["text_ctx"]}}
  bundle.save_bundle(tmp_path / "b", params, meta, {})
  assert sample.main(["--bundle", str(tmp_path / "b"), "--shapes-accuracy", "2", "--batch", "2",
                      "--samplers", "ancestral", "ddim", "--steps", "ancestral=2,ddim=2"]) == 0
  rows = _lines(capsys)
  per = [r for r in rows if r.get("mode") == "shapes_accuracy" and "accuracy" in r]
  assert [r["sampler"] for r in per] == ["ancestral", "ddim"]
  for r in per:
    assert r["accuracy"]["n"] == 2 and 0.0 <= r["accuracy"]["all"] <= 1.0 and r["seconds_per_batch"] > 0
  assert set(rows[-1]["accuracy_all"]) == {"ancestral", "ddim"}


def test_students_times_teacher_and_students_alternated(tmp_path, capsys):
  """benchmarks/students.py on a tiny random teacher and a student of its shape (guidance_embed): every
  entry timed, the passes per image as the samplers do them, ratios to the teacher's samplers; a
  bundle without guidance_embed is refused as a student."""
  from benchmarks import students
  from glide_jax import bundle

  def tiny(path, **extra):
    options = dict(common.TINY_OPTIONS["text2im"], n_vocab=64, **extra)
    meta = {"model": {"kind": "text2im", "options": options}, "dtype": "float32",
            "diffusion": {"steps": 1000, "noise_schedule": "squaredcos_cap_v2", "prediction": "v"},
            "tokenizer": {"type": "words", "text_ctx": options["text_ctx"]}}
    bundle.save_bundle(path, common.random_params("text2im", options), meta, {})
    return str(path)
  teacher, student = tiny(tmp_path / "t"), tiny(tmp_path / "s", guidance_embed=True)
  assert students.main(["--teacher", teacher, "--student", f"2={student}", "--batch", "2", "--repeats", "1",
                        "--teacher-samplers", "ancestral=3,dpm++=2"]) == 0
  rows = [r for r in _lines(capsys) if "entry" in r]
  assert [(r["entry"], r["example_passes_per_image"]) for r in rows] == [
      ("teacher ancestral 3", 6), ("teacher dpm++ 2", 4), ("student 2", 2)]
  assert rows[1]["ratio_to_teacher_dpm++"] == 1.0 and rows[0]["ratio_to_teacher_ancestral"] == 1.0
  assert all(r["median_s"] > 0 and r["s_per_sample"] == pytest.approx(r["median_s"] / 2, rel=1e-3) for r in rows)
  with pytest.raises(SystemExit, match="not a guidance-distilled student"):
    students.main(["--teacher", teacher, "--student", f"2={teacher}", "--batch", "1", "--repeats", "1"])


def test_clip_guidance(capsys):
  from benchmarks import clip_guidance
  assert clip_guidance.main(FAST + ["--fast-compile"]) == 0
  rows = _lines(capsys)
  _header_ok(rows[0])
  assert rows[-1]["summary"] and rows[-1]["ours_s"] > 0 and rows[-1]["config"]["clip_params"] > 0


def test_run_discovers_the_benchmarks():
  from benchmarks import run
  assert {"forward", "train_step", "sample", "clip_guidance"} <= set(run.available())


def test_reference_detection_can_be_disabled():
  assert common.reference_status(disabled=True) == (False, "disabled by --no-reference")


def test_forward_against_the_reference_when_installed(capsys):
  pytest.importorskip("glide_text2im")
  pytest.importorskip("torch")
  from benchmarks import forward
  assert forward.main(["--preset", "tiny", "--repeats", "1", "--fast-compile"]) == 0
  summary = _lines(capsys)[-1]
  assert summary["ratio"] > 0 and summary["reference_s"] > 0
  assert summary["max_rel_err"] < 1e-3  # identical weights give the same outputs


def test_time_fn_reports_the_warmup_compile_and_nothing_once_compiled():
  import jax
  import jax.numpy as jnp
  # A function no other test compiles (the constant), so its first call must compile.
  f = jax.jit(lambda x: jnp.sin(x) * 1.2345678 + jnp.cos(x).sum())
  x = jnp.ones((64, 64))
  first = common.time_fn(lambda: f(x), repeats=1)
  assert first["warmup_compile_s"] > 0
  again = common.time_fn(lambda: f(x), repeats=1)
  assert again["warmup_compile_s"] == 0


def _numpy_conv3x3(x, kernel):
  """Direct 3x3 'SAME' convolution in float64 by summing the nine shifted products."""
  n, h, w, _ = x.shape
  xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((n, h, w, kernel.shape[-1]))
  for i in range(3):
    for j in range(3):
      out += xp[:, i:i + h, j:j + w] @ kernel[i, j].astype(np.float64)
  return out


def test_winograd_conv_matches_a_direct_convolution_and_its_gradient():
  import jax
  import jax.numpy as jnp

  from benchmarks import conv_algorithms as ca
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 6, 8, 5)).astype(np.float32)
  kernel = rng.standard_normal((3, 3, 5, 7)).astype(np.float32)
  want = _numpy_conv3x3(x, kernel)
  got = np.asarray(ca.winograd_conv3x3(jnp.asarray(x), jnp.asarray(kernel)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # d/dx sum(y * r) = the convolution's transpose applied to r: compare with XLA's direct one.
  r = jnp.asarray(rng.standard_normal(want.shape).astype(np.float32))
  grads = [jax.grad(lambda a, k, f=f: jnp.sum(f(a, k) * r), argnums=(0, 1))(jnp.asarray(x), jnp.asarray(kernel))
           for f in (ca.winograd_conv3x3, ca.direct_conv3x3)]
  for a, b in zip(*grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="even H, W"):
    ca.winograd_conv3x3(jnp.zeros((1, 5, 4, 2)), jnp.zeros((3, 3, 2, 2)))


def test_conv_algorithms_prints_both_algorithms(capsys):
  from benchmarks import conv_algorithms
  assert conv_algorithms.main(["--shapes", "1x8x4x4", "--repeats", "1"]) == 0
  rows = _lines(capsys)
  assert "cpu" in rows[0]["machine"]
  row = rows[1]
  assert row["shape"] == [1, 8, 4, 4] and row["winograd_max_rel_err"] < 1e-5
  assert row["direct_fwd_s"] > 0 and row["winograd_fwd_bwd_s"] > 0
  with pytest.raises(ValueError, match="BATCHxSIZE"):
    conv_algorithms.main(["--shapes", "2x8x4"])


def test_attention(capsys):
  from benchmarks import attention
  assert attention.main(["--batch", "1", "--repeats", "1"]) == 0
  rows = _lines(capsys)
  _header_ok(rows[0])
  timed = rows[1:]
  assert {(r["shape"], r["side"]) for r in timed} == {(s, side) for s in attention.SHAPES
                                                      for side in ("default", "xla", "before")}
  assert all(r["median_s"] > 0 and r["runs"] == 1 for r in timed)


# Imports the device machine cannot satisfy (benchmarks/device_check.py): refused in every process
# of the check, the parity pytest and the benchmark children included.
_DEVICE_LACKS = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class _Refuse(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ModuleNotFoundError(f"No module named {{name!r}} (not on the device machine)", name=name)
sys.meta_path.insert(0, _Refuse())
"""


@pytest.mark.slow  # a dozen processes, each compiling (minutes)
def test_device_check_on_the_cpu_without_tensorflow(tmp_path):
  """`bash benchmarks/device_check.sh --cpu`, as CI runs it, with what the device machine lacks
  (`DEVICE_LACKS`: TensorFlow, TFDS, tensorboardX, ftfy, matplotlib, ...) unimportable: every section
  passes and writes finite figures."""
  import os
  import pathlib
  import subprocess
  import sys

  root = pathlib.Path(__file__).resolve().parent.parent
  (tmp_path / "site").mkdir()
  from benchmarks import device_check
  (tmp_path / "site" / "sitecustomize.py").write_text(_DEVICE_LACKS.format(blocked=device_check.DEVICE_LACKS))
  out = tmp_path / "out"
  env = dict(os.environ, OUT=str(out), PYTHON=sys.executable,
             PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
  env.pop("XLA_FLAGS", None)  # conftest's 8 host devices are not what the check runs on
  run = subprocess.run(["bash", "benchmarks/device_check.sh", "--cpu"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=900, check=False)
  log = (out / "device_check.log").read_text() if (out / "device_check.log").exists() else ""
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + log[-4000:]
  report = json.loads((out / "device_check.json").read_text())
  assert report["mode"] == "cpu" and report["ok"] is True and report["machine"]["backend"] == "cpu"
  sections = ("parity", "forward", "train_step", "sample", "shapes_train_step", "parity_dumps")
  assert {k: report[k]["status"] for k in sections} == dict.fromkeys(sections, "ok")
  assert report["parity"]["passed"] >= 1 and report["parity"]["failures"] == report["parity"]["errors"] == 0
  assert report["parity"]["matmul_precision"] == "highest"
  for name in ("forward", "train_step"):
    for dtype in ("bfloat16", "float32"):
      row = report[name][dtype]
      assert row["status"] == "ok" and row["dtype"] == dtype, row
      for key in ("median_s", "compile_s", "gflop", "tflops_per_s"):
        assert np.isfinite(row[key]) and row[key] > 0, (name, dtype, key, row)
      assert row["mfu"] is None  # no peak is known for a CPU
  assert report["forward"]["bfloat16"]["batch"] == 2 and report["train_step"]["float32"]["batch"] == 4
  assert np.isfinite(report["train_step"]["bfloat16"]["loss"])
  sample = report["sample"]
  assert sample["sampler"] == "dpm++" and sample["steps"] == "15" and np.isfinite(sample["wall_s"]) and sample["wall_s"] > 0
  shapes = report["shapes_train_step"]
  assert np.isfinite(shapes["steps_per_s"]) and shapes["steps_per_s"] > 0 and np.isfinite(shapes["loss"])
  dumps = report["parity_dumps"]
  assert dumps["above_tolerance"] == {} and 0 <= dumps["max_error"]["diffusion.npz"] < 1e-5
  assert report["attention_cudnn"]["status"] == "skipped"  # GPU only
  assert "not on the device machine" not in log  # nothing reached for what the device lacks


def test_device_check_parity_tests_exist():
  """The device runs PARITY_TESTS by name: a renamed or removed test must fail here, not there."""
  import subprocess
  import sys

  from benchmarks import device_check
  out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                        *device_check.PARITY_TESTS], capture_output=True, text=True, check=False,
                       cwd=device_check.ROOT, timeout=300)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
  collected = [line for line in out.stdout.splitlines() if "::" in line]
  for test in device_check.PARITY_TESTS:
    assert any(line.startswith(test) for line in collected), test


def test_device_check_keeps_what_a_timed_out_section_printed(tmp_path):
  """A section cut off by its share keeps the lines it printed before the kill: the figures of the
  benchmarks it finished and the phases of the one it was in."""
  import os
  import sys

  from benchmarks import device_check
  code = "import json, time; print(json.dumps({'phase': 'compiled'}), flush=True); time.sleep(60)"
  with open(tmp_path / "log", "w") as log:
    stdout, rc, timed_out = device_check._run([sys.executable, "-c", code], dict(os.environ), 5, log)
  assert timed_out and rc is None
  assert device_check._json_lines(stdout) == [{"phase": "compiled"}]
  assert '{"phase": "compiled"}' in (tmp_path / "log").read_text()


def test_device_check_counts_a_cut_off_parity_run_from_pytests_lines(tmp_path):
  """pytest writes its junit report at the end; a parity run killed by its share is counted from
  the lines `pytest -v` printed test by test (a real run here: a pass, a failure, a skip, an error)."""
  import subprocess
  import sys

  from benchmarks import device_check
  (tmp_path / "test_four.py").write_text(
      "import pytest\n"
      "@pytest.fixture\ndef broken():\n  raise RuntimeError('setup')\n"
      "def test_a():\n  pass\n"
      "def test_b():\n  assert 1 == 2\n"
      "@pytest.mark.parametrize('x', [1])\ndef test_c(x):\n  pytest.skip('no')\n"
      "def test_d(broken):\n  pass\n")
  run = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "test_four.py"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
  whole = device_check.pytest_progress(run.stdout)
  assert {k: whole[k] for k in ("tests", "passed", "failures", "errors", "skipped")} == \
      {"tests": 4, "passed": 1, "failures": 1, "errors": 1, "skipped": 1}, run.stdout
  assert [f["test"] for f in whole["failing"]] == ["test_four.py::test_b", "test_four.py::test_d"]
  lines = run.stdout.splitlines()
  cut = "\n".join(lines[:next(i for i, line in enumerate(lines) if "::test_b " in line) + 1])
  part = device_check.pytest_progress(cut)
  assert (part["tests"], part["passed"], part["failures"], part["last"]) == (2, 1, 1, "test_four.py::test_b")
  assert device_check.pytest_progress("") == {"tests": 0, "passed": 0, "failures": 0, "errors": 0, "skipped": 0,
                                              "failing": [], "last": None}


def test_device_check_records_what_nvidia_smi_says(tmp_path, monkeypatch):
  """The machine section names the GPU's driver, memory and clocks from nvidia-smi (a stand-in
  script here, printing one line per GPU in nvidia-smi's CSV form); without nvidia-smi, None."""
  from benchmarks import device_check
  monkeypatch.setenv("PATH", str(tmp_path))
  assert device_check.nvidia_smi() is None
  fake = tmp_path / "nvidia-smi"
  fake.write_text("#!/bin/sh\n"
                  "case \"$1\" in --query-gpu=name,driver_version,memory.total,*) ;; *) exit 3 ;; esac\n"
                  "echo 'NVIDIA H200, 580.159.04, 143771 MiB, 1980 MHz, 700.00 W, 5'\n"
                  "echo 'NVIDIA H200, 580.159.04, 143771 MiB, 1980 MHz, 700.00 W, 5'\n")
  fake.chmod(0o755)
  rows = device_check.nvidia_smi()
  assert len(rows) == 2 and rows[0] == {"name": "NVIDIA H200", "driver_version": "580.159.04",
                                        "memory.total": "143771 MiB", "clocks.max.sm": "1980 MHz",
                                        "power.limit": "700.00 W", "pcie.link.gen.current": "5"}
  fake.write_text("#!/bin/sh\nexit 9\n")
  assert "CalledProcessError" in device_check.nvidia_smi()[0]["error"]


@pytest.mark.parametrize("probe,expected", [
    ({"backend": "gpu", "platform": "gpu", "platform_version": "cuda 13000"}, "cuda,cpu"),
    ({"backend": "gpu", "platform": "gpu", "platform_version": "rocm 6.3"}, "rocm,cpu"),
    ({"backend": "tpu", "platform": "tpu", "platform_version": "TFRT TPU v5e"}, "tpu,cpu")])
def test_device_check_parity_names_the_device_then_the_cpu(probe, expected):
  """On an H200 the parity tests ran with JAX_PLATFORMS=cuda alone and the interpreted Pallas flash
  kernel failed for want of a CPU device for its host callbacks: the device comes first (the
  default backend), the CPU after it."""
  from benchmarks import device_check
  assert device_check.parity_platforms(probe) == expected


def test_device_check_cap_overrides_one_section_and_refuses_unknown_ones(tmp_path, capsys):
  """The H200 run's train step outlasted its 150 s share; `--cap train_step=300` gives it more
  without touching the other sections, and a misspelt section is refused before anything runs."""
  from benchmarks import device_check
  base = device_check.plan(cpu=False)
  capped = device_check.with_caps(base, ["train_step=300"])
  assert [s.name for s in capped] == [s.name for s in base]
  for old, new in zip(base, capped):
    assert new.cap_s == (300.0 if old.name == "train_step" else old.cap_s)
    assert new.specs == old.specs
  for bad, word in (("train_stp=300", "train_stp"), ("train_step", "SECTION=SECONDS"),
                    ("train_step=soon", "soon"), ("train_step=0", "positive")):
    with pytest.raises(ValueError, match=word):
      device_check.with_caps(base, [bad])
  with pytest.raises(SystemExit):
    device_check.main(["--cpu", "--out", str(tmp_path), "--cap", "train_stp=300"])
  assert "train_stp" in capsys.readouterr().err
  assert not (tmp_path / "device_check.json").exists()


def test_device_check_narrows_the_parity_tests_and_refuses_unknown_names(tmp_path, capsys):
  """A rerun that confirms a fix runs only the parity tests named (by part of their id); a pattern
  matching none, or a misspelt `--only` section, is refused before anything runs."""
  from benchmarks import device_check
  base = device_check.plan(cpu=False)
  narrowed = device_check.with_parity_tests(base, ["test_diffusion.py", "flash"])
  parity = next(s for s in narrowed if s.name == "parity")
  assert parity.specs == [("pytest", ["tests/test_diffusion.py::test_parity_every_array_float64",
                                      "tests/test_diffusion.py::test_parity_every_array_float32",
                                      "tests/test_attention.py::test_xla_and_flash_paths_match_the_reference_dumps"])]
  assert [s for s in narrowed if s.name != "parity"] == [s for s in base if s.name != "parity"]
  cpu = device_check.with_parity_tests(device_check.plan(cpu=True), ["test_diffusion.py", "flash"])
  assert next(s for s in cpu if s.name == "parity").specs == parity.specs  # the same command tried here first
  assert device_check.with_parity_tests(base, []) == base
  with pytest.raises(ValueError, match="'flsah' matches none"):
    device_check.with_parity_tests(base, ["flash", "flsah"])
  for argv, word in ((["--parity-tests", "flsah"], "flsah"), (["--only", "parity", "train_stpe"], "train_stpe")):
    with pytest.raises(SystemExit):
      device_check.main(["--cpu", "--out", str(tmp_path), *argv])
    assert word in capsys.readouterr().err
  assert not (tmp_path / "device_check.json").exists()


def test_dtype_benchmark_alternates_two_different_programs(capsys):
  """Both dtypes run the same number of alternated rounds, and their programs differ (a dtype that
  failed to reach the model would time float32 twice and report a ratio of about 1)."""
  from benchmarks import dtype
  assert dtype.main(["--preset", "tiny", "--rounds", "2", "--fast-compile"]) == 0
  records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
  per = [r for r in records if "dtype" in r and "median_s" in r]
  assert sorted((r["what"], r["dtype"]) for r in per) == sorted(
      (w, d) for w in dtype.WHAT for d in dtype.DTYPES)
  for what in dtype.WHAT:
    f32, bf16 = (next(r for r in per if r["what"] == what and r["dtype"] == d) for d in dtype.DTYPES)
    assert len(f32["runs_s"]) == len(bf16["runs_s"]) == 2
    assert f32["program_fingerprint"] != bf16["program_fingerprint"], what
  summary = records[-1]
  assert summary["summary"] and {r["what"] for r in summary["results"]} == set(dtype.WHAT)
  for r in summary["results"]:
    assert r["bf16_over_f32"] == pytest.approx(r["bfloat16_s"] / r["float32_s"], rel=1e-2)


def test_demo_variants_parses_values_with_commas_and_refuses_bad_specs():
  from benchmarks import demo_variants as dv
  assert dv.parse_variant("v:attention_resolutions=8,channel_mult=1,2,2,resblock_updown=False,num_heads=-1") == (
      "v", {"attention_resolutions": "8", "channel_mult": "1,2,2", "resblock_updown": "False", "num_heads": "-1"})
  assert dv._cast("resblock_updown", True, "False") is False and dv._cast("num_heads", 1, "-1") == -1
  with pytest.raises(ValueError, match="num_heads"):
    dv._cast("num_heads", 1, "many")
  for bad in ("nocolon", "v:", "v:1,2", ":a=1", "v:=3"):
    with pytest.raises(ValueError):
      dv.parse_variant(bad)


def test_demo_variants_alternates_different_programs_against_the_demo(capsys):
  """The baseline is the config as is and every variant a different program (an override that did
  not reach the model would time the baseline twice); each runs every round; ratios are to the
  baseline's median."""
  from benchmarks import demo_variants as dv
  assert dv.main(["--preset", "tiny", "--rounds", "2", "--fast-compile", "--batch", "2",
                  "--variant", "attn16:attention_resolutions=16"]) == 0
  records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
  per = {r["variant"]: r for r in records if "variant" in r}
  assert set(per) == {"demo", "attn16"}
  assert per["demo"]["overrides"] == {} and per["attn16"]["overrides"] == {"attention_resolutions": "16"}
  assert per["demo"]["program_fingerprint"] != per["attn16"]["program_fingerprint"]
  assert all(len(r["runs_s"]) == 2 for r in per.values())
  summary = records[-1]
  assert summary["summary"] and summary["ratio_to_baseline"]["demo"] == 1.0
  assert summary["ratio_to_baseline"]["attn16"] == pytest.approx(
      per["attn16"]["median_s"] / per["demo"]["median_s"], rel=1e-2)
  with pytest.raises(ValueError, match="unknown model options"):
    dv.main(["--preset", "tiny", "--rounds", "1", "--fast-compile", "--variant", "x:attention_resolution=8"])
