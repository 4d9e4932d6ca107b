"""Shared pieces of the training tests: tiny configs, a resumable synthetic iterator, the XLA cache.

(Not a test module; imported by tests/test_train*.py, test_checkpoint*.py, test_multihost*.py.)
"""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from glide_jax import config_lib
from glide_jax.models import layers

# Tiny U-Net: one level of 32 channels at 8 px, attention at 8 px, one text layer of width 32.
UNET_TINY = ["--config.model.options.channel_mult=1", "--config.model.options.image_size=8",
             "--config.model.options.attention_resolutions=8", "--config.model.options.text_ctx=8",
             "--config.data.tokenizer.text_ctx=8"]
CLIP_TINY = ["--config.model.options.image_size=8", "--config.model.options.max_text_len=8",
             "--config.model.options.n_xf_blocks_text=1", "--config.model.options.n_xf_blocks_image=1",
             "--config.data.tokenizer.text_ctx=8"]
# Compile fast on CPU (numerics are identical between runs that use the same options).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def enable_compilation_cache(path: str) -> None:
  """Identical programs compiled by several tests (or a subprocess) are compiled once."""
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def tiny_config(stage: str, *overrides: str, arg: str = ""):
  """configs/{stage}.py at variant=tiny (plus `arg`, e.g. 'upsample' for the upsampling inpainter)."""
  extra = CLIP_TINY if stage == "clip" else UNET_TINY
  if stage == "upsample" or "upsample" in arg:
    extra = extra + ["--config.data.low_res_size=4"]
  base = ["--config.log.every=1", "--config.checkpoint.every=2", "--config.checkpoint.keep=3",
          "--config.log.tensorboard=false", "--config.diffusion.steps=50"]
  spec = f"configs/{stage}.py:variant=tiny" + (f",{arg}" if arg else "")
  return config_lib.load_config(spec, base + extra + list(overrides))


class SyntheticIterator:
  """Host-local batches that are a pure function of (seed, step, process): resumable exactly.

  Images are smooth random blobs in [-1, 1]; captions are random token runs with a ragged mask.
  """

  def __init__(self, config, process_index: int = 0, process_count: int = 1, seed: int = 0):
    self.stage = config.stage
    o = config.model.options
    self.size = int(o.image_size)
    self.text_ctx = int(o.get("text_ctx", o.get("max_text_len", 8)))
    self.vocab = 30
    self.low = int(config.data.low_res_size or 0)
    self.global_batch = int(config.batch_size)
    self.local = self.global_batch // process_count
    self.process_index = process_index
    self.seed = seed
    self.step = 0

  def __iter__(self):
    return self

  def global_batch_at(self, step: int) -> dict[str, np.ndarray]:
    r = np.random.RandomState([self.seed, step])
    b, s, L = self.global_batch, self.size, self.text_ctx
    yy, xx = np.mgrid[0:s, 0:s] / s
    cx, cy, rad = r.uniform(0.2, 0.8, (3, b, 1, 1))
    colour = r.uniform(-1, 1, (b, 1, 1, 3))
    blob = ((xx[None] - cx) ** 2 + (yy[None] - cy) ** 2 < (rad * 0.5) ** 2)[..., None]
    image = np.where(blob, colour, -0.8).astype(np.float32)
    lengths = r.randint(1, L + 1, (b,))
    mask = np.arange(L)[None] < lengths[:, None]
    tokens = np.where(mask, r.randint(1, self.vocab, (b, L)), 0).astype(np.int32)
    out = {"image": image, "tokens": tokens, "mask": mask}
    if self.low:  # the upsamplers, inpainting one included
      f = s // self.low
      out["low_res"] = image.reshape(b, self.low, f, self.low, f, 3).mean(axis=(2, 4)).astype(np.float32)
    if self.stage == "inpaint":
      known = np.ones((b, s, s, 1), np.float32)
      for i in range(b):
        y0, x0 = r.randint(0, s // 2, 2)
        known[i, y0:y0 + s // 2, x0:x0 + s // 2] = 0.0
      out["inpaint_mask"] = known
    return out

  def __next__(self) -> dict[str, np.ndarray]:
    g = self.global_batch_at(self.step)
    self.step += 1
    lo = self.process_index * self.local
    return {k: v[lo:lo + self.local] for k, v in g.items()}

  def get_state(self) -> dict:
    return {"step": self.step, "seed": self.seed}

  def set_state(self, state) -> None:
    if int(state.get("seed", self.seed)) != self.seed:
      raise ValueError("seed mismatch")
    self.step = int(state["step"])


def tokenizer(config):
  from glide_jax.data.tokenizers import Tokenizer
  o = config.model.options
  return Tokenizer(int(o.get("text_ctx", o.get("max_text_len", 8))), 30, 0)


def mesh_overrides(data: int, fsdp: int) -> list[str]:
  return [f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}", "--config.mesh.replica=1",
          "--config.mesh.tensor=1"]


def session_cache(tmp_path_factory) -> str:
  """One XLA cache per pytest session (worker), shared by the training test modules."""
  base = tmp_path_factory.getbasetemp()
  if base.name.startswith("popen-gw"):  # pytest-xdist: share one cache between the workers
    base = base.parent
  path = base / "glide_jax_xla_cache"
  path.mkdir(parents=True, exist_ok=True)
  enable_compilation_cache(str(path))
  return str(path)


# SGD from the first step: unlike Adam its update changes when every gradient is scaled, so a sum
# where a mean belongs (over devices, hosts or microbatches) changes the losses and parameters.
SGD = ["--config.optimizer.name=sgd", "--config.optimizer.lr=0.05", "--config.optimizer.warmup_steps=0",
       "--config.optimizer.decay=constant", "--config.optimizer.grad_clip_norm=0",
       "--config.optimizer.weight_decay=0"]


def perturbed_params(config, seed: int = 0):
  """The stage's initial parameters (host numpy) with every all-zero leaf drawn at random (fan-in
  scaled kernels, biases of std 0.1): GLIDE zero-initialises output layers, and a model whose output
  is exactly zero makes its loss independent of the rest of the network."""
  import flax.linen as nn

  from glide_jax.train import stages

  stage = stages.make_stage(config)
  key = jax.random.key(seed)
  params = jax.device_get(nn.meta.unbox(jax.jit(stage.init).lower(key).compile(compiler_options=FAST)(key)))
  r = np.random.RandomState(seed)

  def perturb(x):
    x = np.asarray(x, np.float32)
    if np.any(x):
      return x
    scale = 1.0 / np.sqrt(np.prod(x.shape[:-1])) if x.ndim > 1 else 0.1
    return (scale * r.standard_normal(x.shape)).astype(np.float32)

  return jax.tree.map(perturb, params)


def perturbed_bundle(config, path, seed: int = 0) -> str:
  """`perturbed_params` saved as a bundle, for `--config.init_from`."""
  from glide_jax import bundle
  from glide_jax.diffusion import schedules
  from glide_jax.train import stages

  meta = {"model": {"kind": stages.make_stage(config).kind, "options": dict(config.model.options)},
          "diffusion": {"prediction": schedules.prediction_of(config.diffusion)}}
  return str(bundle.save_bundle(path, perturbed_params(config, seed), meta))


def logged_steps(workdir) -> dict[int, dict[str, float]]:
  """The per-step scalars of WORKDIR/train.log: {step: {name: value}} (values as printed, 6 digits).
  A step logged twice (two processes writing) is an error."""
  import os

  out: dict[int, dict[str, float]] = {}
  with open(os.path.join(workdir, "train.log")) as f:
    for line in f:
      words = line.split()
      if len(words) > 3 and words[2] == "step" and words[3].isdigit():
        step = int(words[3])
        if step in out:
          raise AssertionError(f"step {step} logged twice in {workdir}/train.log")
        out[step] = {k: float(v) for k, v in (w.split("=", 1) for w in words[4:] if "=" in w)}
  return out


def bundle_params(path):
  """A bundle's parameters (host numpy, nested as the model's)."""
  from glide_jax import bundle

  return bundle.load_bundle(path)[0]


class Toy(nn.Module):
  """A two-layer MLP with logical axis names: tests of the step and the loop, not of a model."""

  @nn.compact
  def __call__(self, x):
    return layers.Dense(4, names=("embed", "mlp"))(nn.tanh(layers.Dense(16, names=("embed", "mlp"))(x)))
