"""Every stage config and variant builds; its model initialises under jax.eval_shape at the sizes
the GLIDE reference gives; overrides are typed; unknown keys and options are refused."""
import json
import math

import jax
import jax.numpy as jnp
import pytest

from glide_jax import config_lib
from glide_jax.constants import STAGES

VARIANTS = ("released", "full", "small", "tiny")
SCHEMA = {
    "stage", "seed", "total_steps", "batch_size", "microbatches", "model", "diffusion", "data",
    "optimizer", "ema", "mesh", "rules", "checkpoint", "log", "sampling", "init_from"}
SECTIONS = {
    "model": {"kind", "options", "dtype", "remat_policy"},
    "diffusion": {"steps", "noise_schedule", "schedule_sampler"},
    "data": {"name", "data_dir", "split", "image_key", "caption_key", "tokenizer", "caption_dropout",
             "low_res_size", "masks", "prepare_timeout", "low_res_blur", "low_res_noise", "random_crop",
             "num_threads"},
    "optimizer": {"lr", "b1", "b2", "eps", "weight_decay", "grad_clip_norm", "warmup_steps", "decay",
                  "decay_steps", "final_lr_frac", "name"},
    "ema": {"rates", "warmup"},
    "checkpoint": {"every", "keep", "async"},
    "log": {"every", "sample_every", "sample_prompts", "sample_seed", "tensorboard"},
    "sampling": {"sampler", "steps", "guidance_scale"},
}
SPECS = [f"configs/{s}.py:variant={v}" for s in STAGES for v in VARIANTS] + [
    "configs/inpaint.py:variant=released,upsample", "configs/inpaint.py:variant=tiny,upsample",
    "configs/shapes.py", "configs/shapes.py:runlocal"]


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def abstract_param_count(config) -> int | tuple[int, int]:
  """Parameters of the config's model, built through the registry and initialised abstractly."""
  import flax.linen as nn

  from glide_jax.models import registry

  dtype = jnp.dtype(config.model.dtype)
  model = registry.create_model(config.model.kind, dict(config.model.options), dtype=dtype,
                                remat_policy=config.model.remat_policy)
  o = config.model.options
  if config.model.kind == "noised_clip":
    s = o.image_size
    init = lambda: model.init(jax.random.key(0), jnp.zeros((1, s, s, 3)), jnp.zeros((1,), jnp.int32),
                              jnp.zeros((1, o.max_text_len), jnp.int32), jnp.ones((1,), jnp.int32))
    params = nn.meta.unbox(jax.eval_shape(init)["params"])
    return _count(params["image"]), _count(params["text"])
  inputs = model.dummy_inputs(1, o.image_size)
  params = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), **inputs))["params"])
  return _count(params)


@pytest.mark.parametrize("spec", SPECS)
def test_config_builds_with_the_schema(spec):
  c = config_lib.load_config(spec)
  assert SCHEMA <= set(c.keys()), SCHEMA - set(c.keys())
  for section, keys in SECTIONS.items():
    assert keys <= set(c[section].keys()), (section, keys - set(c[section].keys()))
  assert {"replica", "data", "fsdp", "tensor"} <= set(c.mesh.keys())
  assert {"type", "path", "text_ctx"} <= set(c.data.tokenizer.keys())
  assert c.stage in STAGES
  # the tokenizer context is the model's
  ctx = c.model.options.get("text_ctx", c.model.options.get("max_text_len"))
  assert c.data.tokenizer.text_ctx == ctx
  # every logical axis name of glide_jax/models/layers.py has a rule
  names = {name for name, _ in c.rules}
  assert {"batch", "vocab", "embed", "mlp", "qkv", "kv", "length", "conv_in", "conv_out", "kernel", "norm",
          "time_embed", "timesteps"} <= names
  # a config survives the JSON round trip that checkpoints use
  again = config_lib.config_from_json(config_lib.config_to_json(c))
  assert config_lib.diff_configs(c, again) == []
  assert again.rules == c.rules and isinstance(again.ema.rates, tuple)


@pytest.mark.parametrize("spec", SPECS)
def test_trainer_accepts_the_config(spec):
  """The training code builds its stage, optimizer and timestep sampler from every config."""
  from glide_jax.train import optim, stages, timesteps
  c = config_lib.load_config(spec)
  stage = stages.make_stage(c)
  assert stage.name == c.stage
  _, schedule = optim.make_optimizer(c.optimizer)
  assert float(schedule(c.optimizer.warmup_steps)) == pytest.approx(c.optimizer.lr)
  timesteps.make_sampler(c.diffusion.schedule_sampler, c.diffusion.steps)
  if c.stage != "clip":
    assert c.sampling.sampler in ("ancestral", "ddim", "plms", "dpm++")


# released sizes: docs/reference.md, sections 2 and 3 (counted on glide-text2im); full: [P] 4.1.
EXPECTED_PARAMS = {
    "configs/base.py:variant=released": 385_030_726,
    "configs/upsample.py:variant=released": 398_361_286,
    "configs/inpaint.py:variant=released": 385_037_638,
    "configs/inpaint.py:variant=released,upsample": 398_368_198,
    "configs/clip.py:variant=released": (86_443_776, 71_679_488),
}


@pytest.mark.parametrize("spec", SPECS)
def test_model_initialises_under_eval_shape(spec):
  c = config_lib.load_config(spec)
  n = abstract_param_count(c)
  if spec in EXPECTED_PARAMS:
    assert n == EXPECTED_PARAMS[spec]
  elif spec.endswith("base.py:variant=full"):
    assert 3.3e9 < n < 3.7e9, n      # "3.5B" [P] §4.1
  elif spec.endswith("upsample.py:variant=full"):
    assert 1.4e9 < n < 1.6e9, n      # "1.5B" [P] §4.1
  elif "variant=tiny" in spec:
    assert n < 2_000_000 if isinstance(n, int) else sum(n) < 2_000_000
  elif spec.startswith("configs/shapes.py"):
    assert 2_000_000 < n < 30_000_000, n  # the CPU demo: a few million (3,585,958 in its docstring)


def test_hyper_parameters_follow_the_sources():
  base = config_lib.load_config("configs/base.py:variant=released")
  up = config_lib.load_config("configs/upsample.py:variant=released")
  full_up = config_lib.load_config("configs/upsample.py:variant=full")
  clip = config_lib.load_config("configs/clip.py:variant=full")
  # [ADM] Table 11 / 13 and App. I; [P] §4.1, §4.2, §6
  assert (base.optimizer.lr, base.batch_size, base.model.options.dropout) == (3e-4, 2048, 0.1)
  assert (up.optimizer.lr, up.batch_size, up.model.options.dropout) == (1e-4, 256, 0.0)
  assert full_up.batch_size == 512
  assert (base.optimizer.b1, base.optimizer.b2, base.ema.rates) == (0.9, 0.999, (0.9999,))
  assert base.data.caption_dropout == 0.2 and up.data.caption_dropout == 0.0
  assert base.diffusion.noise_schedule == "squaredcos_cap_v2" and up.diffusion.noise_schedule == "linear"
  assert clip.optimizer.weight_decay == 0.0125 and clip.batch_size == 32_768


def test_overrides_are_typed():
  c = config_lib.load_config("configs/base.py:variant=tiny", [
      "--config.batch_size=16", "--config.optimizer.lr=2e-3", "--config.ema.rates=0.9,0.99",
      "--config.ema.warmup=false", "--config.model.options.channel_mult=1,2,2",
      "--config.data.name=glide_shapes/size64", "--config.mesh.fsdp=2"])
  assert c.batch_size == 16 and isinstance(c.batch_size, int)
  assert c.optimizer.lr == 2e-3 and c.ema.rates == (0.9, 0.99) and c.ema.warmup is False
  assert c.model.options.channel_mult == "1,2,2"  # a string field stays a string
  assert c.data.name == "glide_shapes/size64" and c.mesh.fsdp == 2
  with pytest.raises(config_lib.ConfigError, match="batch_size.*int"):
    config_lib.load_config("configs/base.py:variant=tiny", ["--config.batch_size=many"])
  with pytest.raises(config_lib.ConfigError, match="bool"):
    config_lib.load_config("configs/base.py:variant=tiny", ["--config.ema.warmup=maybe"])


def test_unknown_keys_and_options_are_refused():
  with pytest.raises(config_lib.ConfigError, match=r"'optimizer.lrr'.*optimizer.lr"):
    config_lib.load_config("configs/base.py:variant=tiny", ["--config.optimizer.lrr=1"])
  with pytest.raises(config_lib.ConfigError, match=r"'model.options.num_chanels'.*num_channels"):
    config_lib.load_config("configs/base.py:variant=tiny", ["--config.model.options.num_chanels=8"])
  with pytest.raises(config_lib.ConfigError, match="'nonsense'"):
    config_lib.load_config("configs/base.py:variant=tiny", ["--config.nonsense=1"])
  with pytest.raises(config_lib.ConfigError, match="group"):
    config_lib.load_config("configs/base.py:variant=tiny", ["--config.optimizer=1"])
  with pytest.raises(config_lib.ConfigError, match="varient.*did you mean variant"):
    config_lib.load_config("configs/base.py:varient=tiny")
  with pytest.raises(config_lib.ConfigError, match="huge"):
    config_lib.load_config("configs/base.py:variant=huge")
  with pytest.raises(config_lib.ConfigError, match="not found"):
    config_lib.load_config("configs/nope.py")
  # the loaded config is locked: code cannot add a key by accident either
  c = config_lib.load_config("configs/base.py:variant=tiny")
  with pytest.raises(AttributeError):
    c.optimizer.lrr = 1.0


def test_overrides_go_through_config_flags():
  c = config_lib.load_config("configs/base.py:variant=tiny", [
      "--config.model.options.attention_impl=cudnn", "--config.ema.rates=(0.5, 0.25)",
      "--config.log.sample_prompts=('a b', 'c, d')", "--config.batch_size=3", "--config.batch_size=5"])
  assert c.model.options.attention_impl == "cudnn"  # a None default takes the text
  assert c.ema.rates == (0.5, 0.25) and c.log.sample_prompts == ("a b", "c, d")
  assert c.batch_size == 5 and c.is_locked  # the last of repeated overrides wins
  # a None field opens the config to new attributes inside config_flags; a misspelt key is still refused
  with pytest.raises(config_lib.ConfigError, match=r"'model.options.attention_implx'.*attention_impl"):
    config_lib.load_config("configs/base.py:variant=tiny", ["--config.model.options.attention_impl=cudnn",
                                                            "--config.model.options.attention_implx=1"])
  # what a sweep writes on the command line comes back as the value it started from
  values = {"ema.rates": (0.9, 0.99), "log.sample_prompts": ("a b", "c, d"), "ema.warmup": False,
            "batch_size": 7, "optimizer.lr": 1e-4, "data.name": "glide_shapes/size64"}
  back = config_lib.load_config("configs/base.py:variant=tiny", config_lib.make_override_args(values))
  assert {k: back[k.split(".")[0]][k.split(".")[1]] if "." in k else back[k] for k in values} == values


def test_diff_configs_names_the_differing_keys():
  a = config_lib.load_config("configs/base.py:variant=tiny")
  b = config_lib.load_config("configs/base.py:variant=tiny", ["--config.model.options.num_channels=64",
                                                              "--config.log.every=3"])
  assert config_lib.diff_configs(a, b) == ["log.every", "model.options.num_channels"]
  assert config_lib.diff_configs(a, b, ignore=("log",)) == ["model.options.num_channels"]
  assert config_lib.describe_diff(a, b, ["log.every"]) == ["log.every: 10 != 3"]
  plain = json.loads(config_lib.config_to_json(a))
  assert plain["rules"][0] == ["batch", ["replica", "data", "fsdp"]]


def test_command_line_flags():
  import argparse
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir")
  config_lib.add_config_flags(parser)
  args = config_lib.parse_args(parser, ["--config", "configs/base.py:variant=tiny", "--config.batch_size=4",
                                        "--workdir", "/tmp/x", "--config.optimizer.lr", "0.5"])
  assert args.workdir == "/tmp/x"
  assert args.config_overrides == ["--config.batch_size=4", "--config.optimizer.lr=0.5"]
  c = config_lib.config_from_args(args)
  assert (c.batch_size, c.optimizer.lr) == (4, 0.5)
  rest, overrides = config_lib.parse_overrides(["a", "--config.x=1", "--", "--config.y=2"])
  assert rest == ["a", "--", "--config.y=2"] and overrides == ["--config.x=1"]


def test_parse_arg_types():
  ns = config_lib.parse_arg("variant=tiny,runlocal,steps=30", variant="released", runlocal=False, steps=0)
  assert (ns.variant, ns.runlocal, ns.steps) == ("tiny", True, 30)
  with pytest.raises(config_lib.ConfigError, match="needs a value"):
    config_lib.parse_arg("variant", variant="released")


@pytest.mark.parametrize("section", ["optimizer", "mesh", "data"])
def test_library_defaults_are_the_configs_declared_keys_and_values(section):
  """optim.DEFAULTS / mesh.DEFAULTS (what the library reads) and configs/common.py (what a config
  may set) declare the same keys; optimizer defaults agree in value too (mesh.data is -1 there)."""
  from glide_jax.data import pipeline
  from glide_jax.parallel import mesh as mesh_lib
  from glide_jax.train import optim
  defaults = {"optimizer": optim.DEFAULTS, "mesh": mesh_lib.DEFAULTS, "data": pipeline.DATA_DEFAULTS}[section]
  from configs import common
  declared = common.skeleton("base")[section].to_dict()
  assert set(declared) == set(defaults)
  if section == "optimizer":
    assert {k: declared[k] for k in defaults} == defaults


def test_a_misspelt_key_in_a_section_given_to_the_library_is_refused():
  from glide_jax.parallel import mesh as mesh_lib
  from glide_jax.train import optim
  with pytest.raises(KeyError, match=r"optimizer\.warmup_step\b.*optimizer takes .*warmup_steps"):
    optim.make_optimizer({"lr": 1e-3, "warmup_step": 10})
  with pytest.raises(KeyError, match=r"mesh\.fsdb"):
    mesh_lib.resolve_axis_sizes({"data": -1, "fsdb": 2}, 8)
  # None takes the default, as the configs' `None = unset` convention has it
  assert mesh_lib.resolve_axis_sizes({"data": -1, "fsdp": None}, 8) == {"replica": 1, "data": 8, "fsdp": 1, "tensor": 1}


def test_a_field_named_by_a_python_keyword_takes_an_override():
  """`checkpoint.async` is a keyword, which config_flags cannot address; it is still overridable."""
  base = config_lib.load_config("configs/base.py:variant=tiny")
  assert base.checkpoint["async"] is True
  config = config_lib.load_config("configs/base.py:variant=tiny",
                                  ["--config.checkpoint.async=false", "--config.checkpoint.every=7"])
  assert config.checkpoint["async"] is False and config.checkpoint.every == 7
  with pytest.raises(config_lib.ConfigError, match=r"--config\.checkpoint\.async: expected a bool"):
    config_lib.load_config("configs/base.py:variant=tiny", ["--config.checkpoint.async=maybe"])
