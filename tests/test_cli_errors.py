"""A user's mistake in any `glide-jax` subcommand (a wrong path, a bundle of the wrong kind, a
misspelt config key or option) is one line on stderr and a non-zero exit, not a traceback; a bug
keeps its traceback, and --debug / GLIDE_JAX_DEBUG=1 shows the traceback of a user error too."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from glide_jax import bundle, cli, errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"image_size": 8, "num_channels": 32, "channel_mult": "1,2", "attention_resolutions": "4",
        "num_res_blocks": 1, "xf_width": 32, "xf_layers": 1, "xf_heads": 2, "text_ctx": 8,
        "num_head_channels": 16, "n_vocab": 64}
WORDS = {"type": "words", "text_ctx": 8}
TINY_CONFIG = "configs/base.py:variant=tiny"
TINY_JSON = json.dumps(TINY, separators=(",", ":"))  # one word of a command line


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  """Bundles of each kind (their params are never read past the kind check), an images directory
  with its prompts.json, and a path that does not exist."""
  from PIL import Image

  root = tmp_path_factory.mktemp("cli_errors")
  dummy = {"w": np.zeros(1, np.float32)}
  base = bundle.save_bundle(root / "base", dummy, {"model": {"kind": "text2im", "options": TINY},
                                                   "tokenizer": WORDS})
  clip = bundle.save_bundle(root / "clip", dummy, {"model": {"kind": "noised_clip", "options": {}},
                                                   "tokenizer": WORDS})
  images = root / "images"
  images.mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "00000.png")
  (images / "prompts.json").write_text(json.dumps({"00000.png": "a red circle"}))
  return {"@BASE": str(base), "@CLIP": str(clip), "@IMAGES": str(images), "@NONE": str(root / "nonexistent"),
          "@OUT": str(root / "out")}


# (command line with placeholders, what the one line must say). Every subcommand of cli.COMMANDS
# has a wrong path and, where it reads one, a bundle or file of the wrong kind or a misspelt key.
CASES = [
    ("sample --bundle @NONE --prompt x --out @OUT", "neither a glide-jax bundle"),
    ("sample --bundle @CLIP --prompt x --out @OUT", "holds a 'noised_clip' model; `sample` needs one of"),
    ("sample --bundle @BASE --clip-bundle @BASE --clip-guidance-scale 2 --prompt x --out @OUT",
     "--clip-bundle: @BASE: bundle holds a 'text2im' model, not a noised CLIP"),
    (f"train --config {TINY_CONFIG} --workdir @OUT --config.model.options.num_chanels=8",
     "unknown config key 'model.options.num_chanels'; nearest valid keys: model.options.num_channels"),
    ("train --config configs/no_such_stage.py --workdir @OUT", "config file 'configs/no_such_stage.py' not found"),
    ("export --workdir @NONE --out @OUT", "@NONE is not a training workdir"),
    ("export --workdir @BASE --out @OUT", "@BASE is not a training workdir"),
    ("eval clip-score --images @NONE --clip-bundle @CLIP", "image directory @NONE does not exist"),
    ("eval clip-score --images @IMAGES --clip-bundle @BASE", "holds a 'text2im' model, not a noised CLIP"),
    ("eval sweep --bundle @CLIP --shapes-validation 2 --out @OUT", "holds a 'noised_clip' model"),
    ("eval fid --images @IMAGES --reference @IMAGES --inception-weights @NONE", "Inception weights not found"),
    ("data build --images @NONE --out @OUT", "image directory @NONE does not exist"),
    ("data build --webdataset @NONE/{0..1}.tar --out @OUT", "2 of 2 tar files do not exist"),
    ("data prepare --name no_such_dataset", "Dataset no_such_dataset not found"),
    (f"plan --config {TINY_CONFIG} --topology v5p:2x2x1 --config.optimiser.lr=1",
     "unknown config key 'optimiser.lr'; nearest valid keys: optimizer.lr"),
    ("import-torch --kind base --checkpoint @NONE --out @OUT", "checkpoint @NONE does not exist"),
    ("import-torch --kind base --checkpoint @BASE/params.safetensors --out @OUT --options " + TINY_JSON,
     "state_dict does not match a 'text2im' model: missing keys"),
    ("import-torch --kind base --checkpoint @NONE --out @OUT --options {\"num_chanels\":1}",
     "unknown model option(s) ['num_chanels']"),
    ("export-torch --bundle @NONE --out @OUT/x.safetensors", "@NONE is not a glide-jax bundle"),
    ("export-torch --bundle @CLIP --tower image --out @OUT/x.safetensors", "has no 'image' tower"),
    ("parity @NONE", "@NONE does not exist"),
    ("parity @BASE", "no .npz dumps in @BASE"),
    ("app --bundle @NONE", "--bundle @NONE: @NONE is neither a glide-jax bundle"),
    ("app --bundle @BASE --clip-bundle @BASE", "--clip-bundle @BASE: @BASE: bundle holds a 'text2im' model, not a noised CLIP"),
]


def _argv(line: str, paths: dict) -> list[str]:
  words = line.split()
  for key, value in paths.items():
    words = [w.replace(key, value) for w in words]
  return words


def _main(argv: list[str]) -> int:
  """cli.main's exit status, whether it returns it or raises SystemExit (argparse, `SystemExit(msg)`)."""
  try:
    return cli.main(argv)
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else 1


def test_every_subcommand_has_cases():
  assert {line.split()[0] for line, _ in CASES} == set(cli.COMMANDS)


@pytest.mark.parametrize("line, says", CASES, ids=[line.split(" --out")[0] for line, _ in CASES])
def test_a_user_mistake_is_one_line(paths, capsys, line, says):
  argv = _argv(line, paths)
  code = _main(argv)
  err = capsys.readouterr().err.strip()
  label = "glide-jax " + " ".join(argv[:2] if argv[0] in ("eval", "data") else argv[:1])
  assert code == 2, (code, err)
  assert len(err.splitlines()) == 1 and err.startswith(f"{label}: "), err
  for key, value in paths.items():
    says = says.replace(key, value)
  assert says in err, err


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
  from glide_jax.commands import parity

  def bug_in_a_library(args):
    return np.zeros(3).reshape(2)  # numpy's own ValueError

  def our_key_error(args):
    return {}["missing"]

  for run, error in ((bug_in_a_library, ValueError), (our_key_error, KeyError)):
    monkeypatch.setattr(parity, "run", run)
    with pytest.raises(error):
      cli.main(["parity", "x.npz"])
  assert capsys.readouterr().err == ""


def test_debug_shows_the_traceback_of_a_user_error(paths, monkeypatch):
  with pytest.raises(FileNotFoundError, match="neither a glide-jax bundle"):
    cli.main(["--debug", "sample", "--bundle", paths["@NONE"], "--prompt", "x", "--out", paths["@OUT"]])
  monkeypatch.setenv(errors.DEBUG_ENV, "1")
  with pytest.raises(FileNotFoundError, match="neither a glide-jax bundle"):
    cli.main(["sample", "--bundle", paths["@NONE"], "--prompt", "x", "--out", paths["@OUT"]])


def test_which_errors_are_a_users():
  def raise_(error):
    try:
      raise error
    except Exception as e:  # noqa: BLE001
      return e

  assert errors.is_user_error(raise_(errors.UserError("x")))
  assert errors.is_user_error(raise_(FileNotFoundError("x")))
  assert errors.is_user_error(raise_(ValueError("raised here, in a test: not glide_jax"))) is False
  try:
    from glide_jax.models import registry
    registry.create_model("text2im", {"num_chanels": 8})
  except ValueError as e:
    assert errors.is_user_error(e)
  try:
    np.zeros(3).reshape(2)
  except ValueError as e:
    assert not errors.is_user_error(e)
  assert not errors.is_user_error(raise_(TypeError("x")))


def _glide_jax(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "glide_jax.cli", *args], capture_output=True, text=True,
                        cwd=ROOT, timeout=300, env={**os.environ, **(env or {})})


def test_the_real_command_prints_one_line_and_exits_2(paths):
  """As a user runs it: the interpreter's own exit status and stderr (no pytest in between)."""
  for argv in (["sample", "--bundle", paths["@NONE"], "--prompt", "x", "--out", paths["@OUT"]],
               ["train", "--config", TINY_CONFIG, "--workdir", paths["@OUT"], "--config.optimizer.lrr=1"]):
    out = _glide_jax(*argv)
    err = [line for line in out.stderr.splitlines() if line.startswith("glide-jax")]
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(err) == 1, out.stderr[-3000:]
  debug = _glide_jax("sample", "--bundle", paths["@NONE"], "--prompt", "x", "--out", paths["@OUT"],
                     env={errors.DEBUG_ENV: "1"})
  assert debug.returncode == 1 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr
