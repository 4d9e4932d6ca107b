"""`glide-jax sample` end to end on tiny random-weight bundles with a sentencepiece tokenizer made here."""
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from glide_jax import bundle, cli, images, sampling
from glide_jax.data import tokenizers
from glide_jax.diffusion import pipeline as pipeline_core
from glide_jax.models import registry

TINY = {"num_channels": 32, "channel_mult": "1,2", "attention_resolutions": "4", "num_res_blocks": 1, "xf_width": 32,
            "xf_layers": 1, "xf_heads": 2, "text_ctx": 8, "num_head_channels": 16, "dropout": 0.0}
CAPTIONS = ["a red circle", "a blue square", "a small green triangle", "a big yellow circle on the left",
            "two red squares", "a purple star at the top"] * 5
NO_BAR = lambda done: None


def _random_params(kind: str, options: dict, seed: int):
  """Random weights of the right shapes without compiling an init (the reference zero-initialises
  output layers; random ones make the samples depend on every weight)."""
  shapes = registry.param_shapes(kind, options)
  leaves, _tree = jax.tree_util.tree_flatten_with_path(shapes)
  rng = np.random.default_rng(seed)
  out = []
  for path, s in leaves:
    name = jax.tree_util.keystr(path)
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
    value = rng.normal(size=s.shape) / np.sqrt(fan_in) if len(s.shape) > 1 else 0.05 * rng.normal(size=s.shape)
    if "scale" in name:
      value = 1.0 + value
    out.append(value.astype(np.float32))
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), out)


def _make_bundle(root: pathlib.Path, name: str, kind: str, image_size: int, sp_model: str, diffusion: dict):
  options = dict(TINY, image_size=image_size, n_vocab=64)
  meta = {"model": {"kind": kind, "options": options}, "diffusion": diffusion,
              "tokenizer": {"type": "sentencepiece", "text_ctx": 8}, "dtype": "float32"}
  return bundle.save_bundle(root / name, _random_params(kind, options, len(name)), meta,
                            tokenizer_files={"model": sp_model})


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
  root = tmp_path_factory.mktemp("bundles")
  sp = tokenizers.train_sentencepiece(CAPTIONS, 40, root / "sp.model")
  base = _make_bundle(root, "base", "text2im", 8, sp, {"steps": 1000, "noise_schedule": "squaredcos_cap_v2",
                                                            "timestep_respacing": "100", "sampler": "ddpm", "guidance_scale": 3.0})
  up = _make_bundle(root, "upsample", "upsample", 16, sp, {"steps": 1000, "noise_schedule": "linear",
                                                               "timestep_respacing": "fast27", "sampler": "ddim",
                                                               "upsample_temp": 0.997})
  up_inpaint = _make_bundle(root, "upsample_inpaint", "upsample_inpaint", 16, sp,
                            {"steps": 1000, "noise_schedule": "linear", "timestep_respacing": "fast27",
                             "sampler": "ddpm", "upsample_temp": 0.997})
  clip_bundle = _make_clip_bundle(root, sp)
  inpaint = _make_bundle(root, "inpaint", "inpaint", 8, sp, {"steps": 1000, "noise_schedule": "squaredcos_cap_v2",
                                                                 "timestep_respacing": "100", "sampler": "ddpm"})
  # a training workdir whose exported bundle is WORKDIR/bundle
  work = root / "work"
  (work / "checkpoints").mkdir(parents=True)
  bundle.save_bundle(work / "bundle", *bundle.load_bundle(base)[:1], meta=_meta_of(base),
                     tokenizer_files={"model": sp})
  return {"base": base, "up": up, "inpaint": inpaint, "up_inpaint": up_inpaint, "clip": clip_bundle, "work": work,
          "sp": sp}


CLIP_TINY = {"image_size": 8, "patch_size": 4, "n_vocab": 64, "max_text_len": 8, "n_embd": 16, "n_head": 2,
             "n_head_state": 8, "n_xf_blocks": 1}


def _make_clip_bundle(root: pathlib.Path, sp_model: str):
  from glide_jax.models import clip

  model = clip.create_clip_model(CLIP_TINY)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32),
                                             jnp.zeros((1, 8), jnp.int32), jnp.ones((1,), jnp.int32)))
  shapes = nn.meta.unbox(shapes["params"])
  rng = np.random.default_rng(5)
  params = jax.tree_util.tree_map(lambda s: (rng.normal(size=s.shape) * 0.3).astype(np.float32), shapes)
  meta = {"model": {"kind": "noised_clip", "options": CLIP_TINY}, "diffusion": {},
          "tokenizer": {"type": "sentencepiece", "text_ctx": 8}, "dtype": "float32"}
  return bundle.save_bundle(root / "clip", params, meta, tokenizer_files={"model": sp_model})


def _meta_of(path):
  meta = json.loads((pathlib.Path(path) / "meta.json").read_text())
  meta.pop("format"), meta.pop("version")
  meta["tokenizer"].pop("files")
  return meta


def _read(out, n):
  return [np.asarray(Image.open(out / f"{i:06d}.png")) for i in range(n)]


def test_sample_writes_pngs_in_prompt_order_and_is_reproducible(bundles, tmp_path):
  prompt_file = tmp_path / "prompts.txt"
  prompt_file.write_text("a blue square\n\na small green triangle\nTwo red squares\n")
  common = ["--prompt", "a red circle", "--prompt-file", str(prompt_file), "--steps", "4",
            "--batch-size", "2", "--seed", "7", "--guidance-scale", "3"]
  assert cli.main(["sample", "--bundle", str(bundles["base"]), "--out", str(tmp_path / "a"), *common]) == 0
  # --workdir resolves WORKDIR/bundle (the same weights): identical images for the same seed
  assert cli.main(["sample", "--workdir", str(bundles["work"]), "--out", str(tmp_path / "b"), *common,
                   "--no-progress"]) == 0
  a, b = _read(tmp_path / "a", 4), _read(tmp_path / "b", 4)
  for x, y in zip(a, b):
    assert x.shape == (8, 8, 3) and x.dtype == np.uint8
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[0], a[1])
  assert (tmp_path / "a" / "grid.png").is_file() and not (tmp_path / "a" / "000004.png").exists()
  order = json.loads((tmp_path / "a" / "prompts.json").read_text())
  assert order == {"000000.png": "a red circle", "000001.png": "a blue square", "000002.png": "a small green triangle",
                   "000003.png": "Two red squares"}

  # the command's images are the sampling module's: batch i uses fold_in(PRNGKey(seed), i)
  sm = sampling.load_sampler_model(bundles["base"])
  second, _ = sampling.cascade(sm, ["a small green triangle", "Two red squares"],
                               jax.random.fold_in(jax.random.PRNGKey(7), 1),
                               base_kwargs={"guidance_scale": 3.0, "respacing": "4", "progress": NO_BAR})
  np.testing.assert_array_equal(images.to_uint8(second), np.stack(a[2:]))


def test_cfg_scale_one_equals_the_conditional_model(bundles):
  sm = sampling.load_sampler_model(bundles["base"])
  key = jax.random.PRNGKey(3)
  prompts = ["a red circle", "a blue square"]
  plain = sampling.generate(sm, prompts, key, guidance_scale=1.0, respacing="4", progress=NO_BAR)
  # the CFG path (doubled batch) at scale 1 + 1e-7 must agree with the plain conditional path
  guided = sampling.generate(sm, prompts, key, guidance_scale=1.0 + 1e-7, respacing="4", progress=NO_BAR)
  np.testing.assert_allclose(guided, plain, atol=1e-4)
  strong = sampling.generate(sm, prompts, key, guidance_scale=8.0, respacing="4", progress=NO_BAR)
  assert np.abs(strong - plain).max() > 1e-3


def test_cascade_and_inpainting_from_the_command(bundles, tmp_path):
  img = np.zeros((16, 16, 3), np.uint8)
  img[:, :, 0] = 200
  Image.fromarray(img).save(tmp_path / "img.png")
  mask = np.zeros((16, 16), np.uint8)
  mask[:8] = 255  # top half known
  Image.fromarray(mask).save(tmp_path / "mask.png")
  out = tmp_path / "up"
  assert cli.main(["sample", "--bundle", str(bundles["base"]), "--upsample", str(bundles["up"]),
                   "--prompt", "a red circle", "--steps", "3", "--upsample-steps", "3", "--sampler", "dpm++",
                   "--out", str(out), "--no-progress"]) == 0
  assert np.asarray(Image.open(out / "000000.png")).shape == (16, 16, 3)
  assert np.asarray(Image.open(out / "base" / "000000.png")).shape == (8, 8, 3)

  out = tmp_path / "inpaint"
  assert cli.main(["sample", "--bundle", str(bundles["inpaint"]), "--upsample", str(bundles["up_inpaint"]),
                   "--prompt", "a red circle", "--steps", "4", "--upsample-steps", "3",
                   "--inpaint-image", str(tmp_path / "img.png"), "--inpaint-mask", str(tmp_path / "mask.png"),
                   "--guidance-scale", "5", "--out", str(out), "--no-progress"]) == 0
  for res, size in ((np.asarray(Image.open(out / "base" / "000000.png")).astype(int), 8),
                    (np.asarray(Image.open(out / "000000.png")).astype(int), 16)):
    known = images.to_uint8(images.resize_images(images.from_uint8(img)[None], size))[0].astype(int)
    half = size // 2
    np.testing.assert_allclose(res[:half], known[:half], atol=1)  # the known rows come back as given
    assert np.abs(res[half:] - known[half:]).max() > 10


def test_clip_guided_sampling_raises_the_clip_score_with_the_scale(bundles, tmp_path):
  # The noised CLIP's score (t = 0) of each sample for its own caption rises with the CLIP guidance
  # scale from the unguided sample (no CFG, as with CLIP guidance); a dropped CLIP model (CFG
  # instead) or a flipped gradient would not do that.
  from glide_jax.eval import clip_score

  prompts = ["a red circle", "a blue square", "a small green triangle", "two red squares"]
  clip = clip_score.load_clip_bundle(bundles["clip"])
  scores = []
  for scale in (0, 2, 30):
    out = tmp_path / f"clip{scale}"
    args = ["sample", "--bundle", str(bundles["base"]), "--steps", "4", "--seed", "2", "--batch-size", "4",
            "--out", str(out), "--no-progress", "--guidance-scale", "1"]
    for p in prompts:
      args += ["--prompt", p]
    if scale:
      args += ["--clip-bundle", str(bundles["clip"]), "--clip-guidance-scale", str(scale)]
    assert cli.main(args) == 0
    scores.append(clip_score.clip_score_of_samples(clip, np.stack(_read(out, 4)), prompts)["per_sample"])
  assert np.all(scores[1] > scores[0]) and np.all(scores[2] > scores[1]), scores
  with pytest.raises(SystemExit, match="clip-bundle"):
    cli.main(["sample", "--bundle", str(bundles["base"]), "--prompt", "x", "--out", str(tmp_path),
              "--clip-guidance-scale", "2"])


def test_bad_inputs_are_refused(bundles, tmp_path, capsys):
  with pytest.raises(SystemExit, match="exactly one"):
    cli.main(["sample", "--prompt", "x", "--out", str(tmp_path)])
  with pytest.raises(SystemExit, match="no prompts"):
    cli.main(["sample", "--bundle", str(bundles["base"]), "--out", str(tmp_path)])
  # A workdir with no exported bundle: one line naming `glide-jax export` (cli.py, glide_jax/errors.py).
  assert cli.main(["sample", "--workdir", str(tmp_path), "--prompt", "x", "--out", str(tmp_path)]) == 2
  assert "export" in capsys.readouterr().err
  with pytest.raises(SystemExit, match="upsampler"):
    cli.main(["sample", "--bundle", str(bundles["up"]), "--prompt", "x", "--out", str(tmp_path)])
  sm = sampling.load_sampler_model(bundles["inpaint"])
  with pytest.warns(UserWarning, match="inverted"):
    sampling.generate(sm, ["x"], jax.random.PRNGKey(0), respacing="4", inpaint_image=np.zeros((1, 8, 8, 3)),
                      inpaint_mask=np.ones((1, 8, 8, 1)), guidance_scale=5.0, progress=NO_BAR)


def test_compiled_sampler_is_not_shared_across_prediction_targets(bundles):
  # An epsilon and a v bundle of one architecture: each must sample with its own parameterisation,
  # whichever was compiled first (the compile cache once ignored `prediction`).
  eps = sampling.load_sampler_model(bundles["base"])
  v = sampling.load_sampler_model(bundles["base"])
  v.diffusion_settings = dict(v.diffusion_settings, prediction="v")
  key, kw = jax.random.PRNGKey(4), {"guidance_scale": 3.0, "respacing": "4", "progress": NO_BAR}
  pipeline_core._COMPILED.clear()
  v_alone = sampling.generate(v, ["a red circle"], key, **kw)
  pipeline_core._COMPILED.clear()
  eps_first = sampling.generate(eps, ["a red circle"], key, **kw)
  v_second = sampling.generate(v, ["a red circle"], key, **kw)
  assert np.abs(v_alone - eps_first).max() > 0.1
  np.testing.assert_array_equal(v_second, v_alone)


def test_inpainting_cascade_stages_keep_the_same_region(bundles, tmp_path, monkeypatch):
  # As GLIDE's inpainting notebook: the mask is defined at the base's size and nearest-upsampled for
  # the upsampler, and each stage's image is read from the file at its size. The mask's edge (row 17,
  # column 23 of 40) is not on the 8 px grid, where keeping every other pixel of a 16 px mask disagrees.
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "img.png")
  mask = np.zeros((40, 40), np.uint8)
  mask[:17, :23] = 255
  Image.fromarray(mask).save(tmp_path / "mask.png")
  calls = []
  generate = sampling.generate

  def recording(sm, prompts, key, **kw):
    out = generate(sm, prompts, key, **kw)
    calls.append((kw["inpaint_image"], kw["inpaint_mask"], out))
    return out

  monkeypatch.setattr(sampling, "generate", recording)
  assert cli.main(["sample", "--bundle", str(bundles["inpaint"]), "--upsample", str(bundles["up_inpaint"]),
                   "--prompt", "a red circle", "--steps", "4", "--upsample-steps", "3", "--guidance-scale", "5",
                   "--inpaint-image", str(tmp_path / "img.png"), "--inpaint-mask", str(tmp_path / "mask.png"),
                   "--out", str(tmp_path / "out"), "--no-progress"]) == 0
  (base_image, base_mask, small), (up_image, up_mask, big) = calls
  # at 8 px PIL's nearest samples rows/columns 2, 7, 12, ...: 3 rows and 5 columns known
  expected = np.zeros((1, 8, 8, 1), np.float32)
  expected[:, :3, :5] = 1
  np.testing.assert_array_equal(base_mask, expected)
  np.testing.assert_array_equal(up_mask, expected.repeat(2, 1).repeat(2, 2))
  np.testing.assert_array_equal(base_image, images.load_image(tmp_path / "img.png", 8)[None])
  np.testing.assert_array_equal(up_image, images.load_image(tmp_path / "img.png", 16)[None])
  for image, known, out in ((base_image, base_mask, small), (up_image, up_mask, big)):
    keep = np.broadcast_to(known > 0.5, out.shape)
    diff = np.abs(images.to_uint8(out).astype(int) - images.to_uint8(image).astype(int))
    assert diff[keep].max() <= 1 and diff[~keep].max() > 10


def test_dtype_option_computes_the_model_in_bfloat16(bundles, tmp_path):
  """`--dtype bfloat16` samples with the model computing in bf16: the images equal the sampling
  module's with a bf16 model, differ from the float32 command's, and stay near them."""
  common = ["--bundle", str(bundles["base"]), "--prompt", "a red circle", "--prompt", "a blue square",
            "--steps", "4", "--batch-size", "2", "--seed", "3", "--guidance-scale", "3", "--no-progress"]
  assert cli.main(["sample", *common, "--out", str(tmp_path / "f32")]) == 0
  assert cli.main(["sample", *common, "--dtype", "bfloat16", "--out", str(tmp_path / "bf16")]) == 0
  f32, bf16 = np.stack(_read(tmp_path / "f32", 2)), np.stack(_read(tmp_path / "bf16", 2))
  sm = sampling.load_sampler_model(bundles["base"], dtype=jnp.bfloat16)
  assert sm.model.dtype == jnp.bfloat16
  x, _ = sampling.cascade(sm, ["a red circle", "a blue square"], jax.random.fold_in(jax.random.PRNGKey(3), 0),
                          base_kwargs={"guidance_scale": 3.0, "respacing": "4", "progress": NO_BAR})
  np.testing.assert_array_equal(images.to_uint8(x), bf16)
  diff = np.abs(f32.astype(np.int32) - bf16.astype(np.int32))
  assert diff.max() > 0 and diff.mean() < 8.0
