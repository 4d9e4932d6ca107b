"""The second demo stage at plumbing size, python-level (what `QUICK=1 launch/demo_upsample.sh` and
`launch/demo_inpaint.sh` do, minus the subprocesses): tiny prepared glide_shapes data, two training
steps of each runlocal config, export, then sampling. Checks the output shapes, that the inpainting
fine-tune starts from the base weights with zero new channels, and that inpainting returns the
known pixels unchanged (within 8-bit rounding) while generating the hole."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import train_support as ts

import glide_jax.data.shapes
from glide_jax import bundle, config_lib, images, sampling
from glide_jax.commands import export as export_cmd
from glide_jax.data import pipeline as data_pipeline
from glide_jax.train import init_from, stages, train

pytestmark = pytest.mark.slow  # demo-size trainings (docs/testing.md)

N = 2  # validation images sampled per test
# A smaller base (and so inpaint) network than the demo's, to compile fast; init_from only needs
# the two to agree. The upsampler's runlocal variant is already small.
SMALL_BASE = ["--config.model.options.channel_mult=1,2", "--config.model.options.attention_resolutions=16",
              "--config.model.options.xf_width=64", "--config.model.options.xf_layers=1",
              "--config.model.options.xf_heads=2"]


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
  ts.session_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  for size in (32, 256):
    glide_jax.data.shapes.GlideShapes(config=f"size{size}", train_examples=32, validation_examples=N,
                                      data_dir=path).download_and_prepare()
  return path


def _train_and_export(spec: str, workdir, data_dir: str, *overrides: str):
  config = config_lib.load_config(spec, [f"--config.data.data_dir={data_dir}", "--config.total_steps=2",
                                         *overrides])
  result = train.train(config, str(workdir), progress=False, compiler_options=ts.FAST)
  assert result["step"] == 2 and all(np.isfinite(result["losses"]))
  return config, export_cmd.export(str(workdir), str(workdir / "bundle"))


@pytest.fixture(scope="module")
def base_bundle(tmp_path_factory, data_dir):
  """Stands in for launch/demo.sh's bundle (QUICK=1 trains the same runlocal config)."""
  _, path = _train_and_export("configs/shapes.py:runlocal", tmp_path_factory.mktemp("base"), data_dir,
                              *SMALL_BASE)
  return path


def _captions(batch) -> list[str]:
  return [c.decode() if isinstance(c, bytes) else str(c) for c in batch["caption"]]


def test_configs_fit_the_demo():
  from configs import shapes
  up = config_lib.load_config("configs/shapes_upsample.py", [])
  assert (up.stage, up.model.kind) == ("upsample", "upsample")
  assert up.data.low_res_size == shapes.MODEL["image_size"] and up.model.options.image_size == 64
  assert (up.diffusion.upsample_residual, up.diffusion.prediction) == ("bicubic", "x0")
  inp = config_lib.load_config("configs/shapes_inpaint.py", [])
  assert (inp.stage, inp.model.kind, inp.data.masks.kind) == ("inpaint", "inpaint", "random")
  assert inp.init_from == "runs/shapes/bundle"
  assert dict(inp.model.options) == shapes.MODEL  # init_from needs the base demo's architecture
  for c in (up, inp):  # GroupNorm(32) needs channel counts that are multiples of 32
    mult = [int(m) for m in str(c.model.options.channel_mult).split(",")]
    assert all(c.model.options.num_channels * m % 32 == 0 for m in mult)


def test_inpaint_fine_tune_from_the_base_bundle(tmp_path, data_dir, base_bundle):
  spec = f"configs/shapes_inpaint.py:runlocal,init_from={base_bundle}"
  # Initialisation: the base weights, with zeros for the 4 new input channels (image*mask, mask).
  config = config_lib.load_config(spec, [f"--config.data.data_dir={data_dir}", *SMALL_BASE])
  init = bundle.flatten_params(init_from.load_init_params(config, stages.make_stage(config)))
  base = bundle.flatten_params(bundle.load_bundle(base_bundle)[0])
  key = "input_blocks_0_0/kernel"
  assert np.shape(base[key])[2] == 3 and np.shape(init[key])[2] == 7
  np.testing.assert_array_equal(init[key][:, :, :3], base[key])
  assert not np.any(init[key][:, :, 3:])
  assert init.keys() == base.keys()
  for name in base:
    if name != key:
      np.testing.assert_array_equal(init[name], base[name], err_msg=name)

  config, path = _train_and_export(spec, tmp_path / "inpaint", data_dir, *SMALL_BASE)
  sm = sampling.load_sampler_model(path)
  assert sm.kind == "inpaint" and sm.image_size == 32
  batch = next(data_pipeline.make_eval_iterator(config.data, "inpaint", N, sm.image_size))
  image, known = batch["image"], batch["inpaint_mask"]
  assert image.shape == (N, 32, 32, 3) and known.shape == (N, 32, 32, 1)
  assert 0 < known.mean() < 1
  out = sampling.generate(sm, _captions(batch), jax.random.PRNGKey(0), inpaint_image=image,
                          inpaint_mask=known, guidance_scale=3.0)
  assert out.shape == (N, 32, 32, 3) and np.all(np.isfinite(out))
  diff = np.abs(images.to_uint8(out).astype(int) - images.to_uint8(image).astype(int))
  keep = np.broadcast_to(known > 0.5, diff.shape)
  assert diff[keep].max() <= 1, "known pixels changed"
  assert diff[~keep].max() > 1, "the hole was not generated"


def test_init_from_refuses_a_different_prediction_target(data_dir, base_bundle):
  # The base demo predicts v; fine-tuning it as an epsilon model would start from nonsense.
  config = config_lib.load_config(f"configs/shapes_inpaint.py:runlocal,init_from={base_bundle}",
                                  [f"--config.data.data_dir={data_dir}", *SMALL_BASE,
                                   "--config.diffusion.prediction=epsilon"])
  with pytest.raises(ValueError, match=r"predicts 'v'.*diffusion.prediction='epsilon'"):
    init_from.load_init_params(config, stages.make_stage(config))


def test_upsampler_trains_and_upsamples_validation_low_res(tmp_path, data_dir):
  # (The 32 -> 64 cascade with the base bundle is `glide-jax sample --upsample`, tested in
  # tests/test_sample_cli.py and run by QUICK=1 launch/demo_upsample.sh.)
  config, path = _train_and_export("configs/shapes_upsample.py:runlocal", tmp_path / "up", data_dir)
  up = sampling.load_sampler_model(path)
  assert up.kind == "upsample" and up.image_size == 64
  assert up.diffusion_settings["upsample_residual"] == "bicubic"  # recorded in the bundle
  batch = next(data_pipeline.make_eval_iterator(config.data, "upsample", N, up.image_size))
  assert batch["image"].shape == (N, 64, 64, 3) and batch["low_res"].shape == (N, 32, 32, 3)
  captions = _captions(batch)
  big = sampling.generate(up, captions, jax.random.PRNGKey(0), low_res=batch["low_res"])
  assert big.shape == (N, 64, 64, 3) and np.all(np.isfinite(big)) and np.abs(big).max() <= 1
  images.write_grid(tmp_path / "grid.png", np.concatenate([batch["image"], big]), ncols=N)
  from PIL import Image
  with Image.open(tmp_path / "grid.png") as grid:  # two rows of N 64 px images, 2 px apart
    assert grid.size == (N * 66 + 2, 2 * 66 + 2)
