"""The one training program: the trainer, `glide-jax plan` and the train-step benchmark run the same
step, shown by equal fingerprints (sha256 of the lowered StableHLO) for every stage on the 8-device
CPU platform; and the program's per-stage pieces (caption dropout, empty caption, diffusion)."""
import argparse
import importlib.util
import json

import jax
import numpy as np
import pytest
import train_support as ts

from glide_jax import config_lib
from glide_jax.commands import plan as plan_cmd
from glide_jax.constants import STAGES
from glide_jax.train import program as program_lib
from glide_jax.train import train as train_lib

MESH = ts.mesh_overrides(2, 4)


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
  ts.session_cache(tmp_path_factory)


def _config(stage: str, *extra: str):
  return ts.tiny_config(stage, *MESH, "--config.total_steps=1", "--config.batch_size=8", *extra)


def _plan_json(stage: str, capsys, *extra: str) -> dict:
  """`glide-jax plan --topology cpu` in this process (the 8 local CPU devices); its final JSON."""
  parser = argparse.ArgumentParser()
  plan_cmd.add_arguments(parser)
  over = ts.UNET_TINY if stage != "clip" else ts.CLIP_TINY
  if stage == "upsample":
    over = over + ["--config.data.low_res_size=4"]
  base = ["--config.log.every=1", "--config.checkpoint.every=2", "--config.checkpoint.keep=3",
          "--config.log.tensorboard=false", "--config.diffusion.steps=50"]
  args = config_lib.parse_args(parser, ["--config", f"configs/{stage}.py:variant=tiny", "--topology", "cpu",
                                        "--batch", "8", "--no-sampler", "--no-search", *base, *over, *MESH,
                                        "--config.total_steps=1", *extra])
  capsys.readouterr()
  plan_cmd.run(args)
  out = capsys.readouterr().out.strip().splitlines()
  return json.loads(out[-1])


# A gpt2 tokenizer without its files: the plan must find the empty caption the trainer's tokenizer
# gives (pad = n_vocab - 1 everywhere), not zeros.
GPT2 = ("--config.data.tokenizer.type=gpt2", "--config.data.tokenizer.path=")


@pytest.mark.parametrize("stage", STAGES)
def test_plan_fingerprint_equals_the_trainers(stage, tmp_path, capsys):
  extra = GPT2 if stage != "clip" else ()
  config = _config(stage, *extra)
  tokenizer = ts.tokenizer(config)
  if stage != "clip":
    from glide_jax.data.tokenizers import Tokenizer
    n_vocab = int(config.model.options.n_vocab)
    tokenizer = Tokenizer(int(config.data.tokenizer.text_ctx), n_vocab, n_vocab - 1)  # GPT-2's pad rule
  result = train_lib.train(config, str(tmp_path / "w"), data_iterator=ts.SyntheticIterator(config),
                           tokenizer=tokenizer, progress=False, compiler_options=ts.FAST)
  log = (tmp_path / "w" / "train.log").read_text()
  assert f"program_fingerprint {result['program_fingerprint']}" in log
  planned = _plan_json(stage, capsys, *extra)
  assert planned["fits"] is True
  assert planned["program_fingerprint"] == result["program_fingerprint"]
  # The benchmark builds the same program for the same config and devices.
  from benchmarks import train_step as bench
  program = bench.build_program(config, jax.devices())
  assert program.fingerprint(program.lower()) == result["program_fingerprint"]


def test_fingerprint_tells_programs_apart(capsys):
  """A different batch, caption-dropout rate, mesh or empty caption is a different program."""
  base = program_lib.build(_config("base"))
  fp = base.fingerprint(base.lower())
  assert fp == base.fingerprint(program_lib.build(_config("base")).lower())
  others = [
      program_lib.build(_config("base", "--config.batch_size=16")),
      program_lib.build(_config("base", "--config.data.caption_dropout=0.5")),
      program_lib.build(ts.tiny_config("base", *ts.mesh_overrides(8, 1), "--config.batch_size=8")),
      program_lib.build(_config("base"), tokenizer=_PadTokenizer(8, pad=3)),
  ]
  for other in others:
    assert other.fingerprint(other.lower()) != fp


class _PadTokenizer:
  def __init__(self, ctx: int, pad: int):
    self.ctx, self.pad = ctx, pad

  def empty(self, n):
    return np.full((n, self.ctx), self.pad, np.int32), np.zeros((n, self.ctx), bool)


def test_per_stage_caption_dropout_and_empty_caption():
  assert program_lib.build(_config("base")).step_config.caption_dropout == pytest.approx(0.2)
  assert program_lib.build(_config("inpaint")).step_config.caption_dropout == pytest.approx(0.2)
  assert program_lib.build(_config("upsample")).step_config.caption_dropout == 0.0  # the configs' own
  clip = program_lib.build(_config("clip", "--config.data.caption_dropout=0.3"))
  assert clip.step_config.caption_dropout == 0.0 and clip.empty_caption is None
  # gpt2 without its vocabulary files: the empty caption is still the tokenizer's (pad = n_vocab - 1)
  cfg = _config("base", "--config.data.tokenizer.type=gpt2", "--config.data.tokenizer.path=")
  tokens, mask = program_lib.empty_caption(cfg)
  n_vocab = int(cfg.model.options.n_vocab)
  assert tokens.tolist() == [n_vocab - 1] * 8 and not mask.any()
  # the words tokenizer (the tiny configs') pads with 0, as its `empty` says
  tokens, mask = program_lib.empty_caption(_config("base"))
  assert tokens.tolist() == [0] * 8 and not mask.any()


def test_the_stage_diffusion_sets_the_timestep_sampler():
  """The timestep sampler draws from the stage's own diffusion, not `config.diffusion.steps` alone."""
  program = program_lib.build(_config("base", "--config.diffusion.schedule_sampler=loss-second-moment"))
  assert program.step_config.num_timesteps == program.stage.diffusion.num_timesteps == 50
  history = jax.tree.leaves(program.abstract_state.sampler)
  assert any(50 in leaf.shape for leaf in history)


def test_bad_batch_is_refused_with_its_numbers():
  with pytest.raises(program_lib.ProgramError, match="batch_size=12 .* 8 batch shards"):
    program_lib.build(_config("base", "--config.batch_size=12"))
  program = program_lib.build(_config("base"))
  host = ts.SyntheticIterator(_config("base")).global_batch_at(0)
  with pytest.raises(program_lib.ProgramError, match=r"\['image'\] has shape"):
    program.put_batch(dict(host, image=host["image"][:, :4]))
  with pytest.raises(program_lib.ProgramError, match="no 'mask'"):
    program.put_batch({k: v for k, v in host.items() if k != "mask"})


def test_config_round_trip_keeps_the_program():
  """A config saved as JSON (the workdir's config.json) rebuilds the same program."""
  config = _config("inpaint")
  again = config_lib.config_from_json(config_lib.config_to_json(config))
  a, b = program_lib.build(config), program_lib.build(again)
  assert a.fingerprint(a.lower()) == b.fingerprint(b.lower())


def test_a_tpu_plan_leaves_the_environment_as_it_was(capsys):
  """The compile-only TPU variables go back after a plan: a later `train` in the same process
  (the tests' workers) must not take TPU_WORKER_HOSTNAMES for a TPU pod."""
  import os
  before = {k: os.environ.get(k) for k in plan_cmd._TPU_COMPILE_ONLY_ENV}
  parser = argparse.ArgumentParser()
  plan_cmd.add_arguments(parser)
  args = config_lib.parse_args(parser, ["--config", "configs/base.py:variant=tiny", "--topology", "v5p:2x2x1",
                                        "--config.no_such_key=1"])
  assert plan_cmd.run(args) == 2  # refused before anything compiles
  assert {k: os.environ.get(k) for k in plan_cmd._TPU_COMPILE_ONLY_ENV} == before
  # a GPU plan sets the CUDA plugin's skip of the driver check, and only that, for its own time
  before = {k: os.environ.get(k) for k in (*plan_cmd._TPU_COMPILE_ONLY_ENV, *plan_cmd._GPU_COMPILE_ONLY_ENV)}
  args = config_lib.parse_args(parser, ["--config", "configs/base.py:variant=tiny", "--topology", "h100:8",
                                        "--config.no_such_key=1"])
  assert plan_cmd.run(args) == 2
  assert {k: os.environ.get(k) for k in before} == before


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the tpu extra) is not installed")
def test_a_program_for_tpu_devices_is_traced_with_the_tpus_attention(monkeypatch):
  """Lowered on this CPU host for TPU devices (what `glide-jax plan` compiles), the step holds the
  attention a TPU runs (`jax.nn.dot_product_attention`), not the CPU's einsum; for the CPU
  devices, the einsum. The choice follows the mesh's devices, not `jax.default_backend()`."""
  from glide_jax import plan
  from glide_jax.models import layers

  calls = []
  einsum, fused = layers._einsum_attention, jax.nn.dot_product_attention
  monkeypatch.setattr(layers, "_einsum_attention", lambda *a: calls.append("einsum") or einsum(*a))
  monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **k: calls.append("fused") or fused(*a, **k))
  for k, v in plan_cmd._TPU_COMPILE_ONLY_ENV.items():
    monkeypatch.setenv(k, v)
  config = ts.tiny_config("base", "--config.mesh.data=4", "--config.mesh.fsdp=1", "--config.batch_size=8",
                          "--config.total_steps=1")
  tpu = program_lib.build(config, devices=plan.topology_devices("v5p:2x2x1"))
  assert tpu.platform == "tpu"
  calls.clear()  # the abstract state's eval_shape traced `init`; what counts is the step
  tpu.lower()
  assert calls and set(calls) == {"fused"}, calls
  cpu = program_lib.build(config, devices=jax.devices()[:4])
  assert cpu.platform == "cpu"
  calls.clear()
  cpu.lower()
  assert calls and set(calls) == {"einsum"}, calls


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the tpu extra) is not installed")
def test_attention_impl_flash_puts_pallas_kernels_in_a_tpu_plan(monkeypatch):
  """`attention_impl=flash` lowered for TPU devices holds Pallas TPU calls (one per attention, forward
  and backward), each per batch shard; the default program holds none."""
  from glide_jax import plan

  for k, v in plan_cmd._TPU_COMPILE_ONLY_ENV.items():
    monkeypatch.setenv(k, v)
  devices = plan.topology_devices("v5p:2x2x1")
  counts = {}
  for impl in ("", "flash"):
    config = ts.tiny_config("base", "--config.mesh.data=4", "--config.mesh.fsdp=1", "--config.batch_size=8",
                            "--config.total_steps=1", f"--config.model.options.attention_impl={impl}")
    text = program_lib.build(config, devices=devices).lower().as_text()
    counts[impl] = text.count("tpu_custom_call")
  assert counts[""] == 0 and counts["flash"] > 0, counts
