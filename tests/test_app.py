"""The app's functions (glide_jax/app/core.py) without a browser, on tiny random bundles: every result
equals what its printed `glide-jax sample` command writes, inpainting keeps the known pixels' bytes,
the editor's paint becomes the mask counted by hand, and bad input is a message."""
import pathlib
import shlex

import numpy as np
import pytest
from app_support import make_bundles
from PIL import Image

from glide_jax import cli
from glide_jax.app import core
from glide_jax.diffusion import pipeline
from glide_jax.errors import UserError

NO_BAR = lambda *a, **k: None  # a progress hook, as the page passes one (the CLI's bar is one too)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
  return make_bundles(tmp_path_factory.mktemp("app_bundles"), 8)


@pytest.fixture(scope="module")
def models(bundles):
  return core.load_models(bundles["base"], bundles["upsample"], bundles["inpaint"], bundles["clip"])


def _cli_output(command: str, out: pathlib.Path, name: str) -> np.ndarray:
  argv = shlex.split(command)
  assert argv[:2] == ["glide-jax", "sample"] and argv[-2:] == ["--out", "DIR"]
  assert cli.main(argv[1:-1] + [str(out), "--no-progress"]) == 0
  return np.asarray(Image.open(out / name))


def test_generate_is_what_its_command_writes_and_compiles_once(models, tmp_path):
  store = core.Store(tmp_path / "s")
  steps = []
  results = core.generate(models, store, "a red circle", 3.0, "ancestral", "4", 7, 2,
                          progress=lambda p, **k: steps.append(p))
  assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]  # one report per denoising step
  assert [r.id for r in results] == [1, 2] and not np.array_equal(results[0].image, results[1].image)
  for r in results:
    png = np.asarray(Image.open(r.path))
    np.testing.assert_array_equal(png, r.image)
    meta = core.read_png_metadata(r.path)
    assert (meta["prompt"], meta["seed"], meta["sampler"], meta["steps"], meta["guidance_scale"]) == (
        "a red circle", 7, "ancestral", "4", 3.0)
    assert meta["command"] == r.command and meta["output"] == f"{r.index:06d}.png"
    assert Image.open(r.path).text["prompt"] == "a red circle"
    np.testing.assert_array_equal(_cli_output(r.command, tmp_path / f"cli{r.id}", meta["output"]), r.image)
  # a second click with other values of the traced inputs reuses the compiled sampler
  n_programs = len(pipeline._COMPILED)
  fns = list(pipeline._COMPILED.values())
  traces = [f._cache_size() for f in fns]
  again = core.generate(models, store, "a blue square", 5.0, "ancestral", "4", 8, 2, progress=NO_BAR)
  assert len(pipeline._COMPILED) == n_programs and [f._cache_size() for f in fns] == traces
  assert [r.id for r in again] == [3, 4] and len(store.results) == 4


def _painted(value: dict, rows: slice, cols: slice) -> dict:
  layer = np.zeros_like(value["background"])
  layer[rows, cols] = (255, 0, 255, 255)
  return dict(value, layers=[layer])


def test_editor_paint_becomes_the_mask_counted_by_hand():
  source = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  value = core.editor_value(source)
  assert value["background"].shape == (256, 256, 4)  # 32 screen pixels per model pixel
  np.testing.assert_array_equal(value["background"][32 * 3 + 5, 32 * 6 + 31, :3], source[3, 6])
  # one painted screen pixel inside model pixel (2, 5), a 2x40 stroke over pixels (6, 0) and (6, 1)
  layer = np.zeros_like(value["background"])
  layer[2 * 32 + 17, 5 * 32 + 3, 3] = 255
  layer[6 * 32 + 30:6 * 32 + 32, 10:50, 3] = 200
  erased = np.zeros_like(layer)
  erased[0:32, 0:32, :3] = 255  # colour without alpha: erased paint keeps nothing
  image, known, note = core.editor_inputs(dict(value, layers=[layer, erased]), 8, source)
  expected = np.ones((8, 8), bool)
  expected[2, 5] = expected[6, 0] = expected[6, 1] = False
  np.testing.assert_array_equal(known, expected)
  np.testing.assert_array_equal(image, source)
  assert note == ""
  # an uploaded image of another size is resized to the model's, and said so
  upload = np.random.default_rng(1).integers(0, 256, (40, 40, 4), dtype=np.uint8)
  image, known, note = core.editor_inputs({"background": upload, "layers": []}, 8, source)
  assert image.shape == (8, 8, 3) and known.all() and "resized" in note
  with pytest.raises(core.AppError, match="editor is empty"):
    core.editor_inputs({"background": None, "layers": []}, 8)
  with pytest.raises(core.AppError, match="mask layer is 10x10 px, the image 256x256"):
    core.editor_inputs(dict(value, layers=[np.zeros((10, 10, 4), np.uint8)]), 8, source)


def test_a_rectangle_becomes_exactly_its_model_pixels_in_the_mask():
  """The rectangle tool paints the screen pixels of a box of model pixels: read back by the editor's
  own rule it is that box (counted here by slicing), on top of brush paint, on a zoomed result, an
  upload of another size and one smaller than the model."""
  source = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  value = core.editor_value(source)
  painted = core.paint_rectangle(value, 8, 1, 2, 5, 7)  # left, top, right, bottom
  image, known, _ = core.editor_inputs(painted, 8, source)
  expected = np.ones((8, 8), bool)
  expected[2:7, 1:5] = False
  np.testing.assert_array_equal(known, expected)
  np.testing.assert_array_equal(image, source)  # the image is untouched: only the layer is painted
  np.testing.assert_array_equal(painted["composite"][2 * 32, 1 * 32], core.PAINT)  # shown as paint
  np.testing.assert_array_equal(painted["composite"][7 * 32, 1 * 32, :3], source[7, 1])
  np.testing.assert_array_equal(painted["composite"][2 * 32, 5 * 32, :3], source[2, 5])
  # over brush paint at model pixel (0, 7), which stays
  brushed = _painted(value, slice(0, 3), slice(7 * 32 + 4, 7 * 32 + 9))
  _, known, _ = core.editor_inputs(core.paint_rectangle(brushed, 8, 1, 2, 5, 7), 8, source)
  expected[0, 7] = False
  np.testing.assert_array_equal(known, expected)
  # an upload 100 wide and 70 high (resized to 8 px): still exactly the box
  upload = {"background": np.random.default_rng(1).integers(0, 256, (70, 100, 4), dtype=np.uint8), "layers": []}
  _, known, _ = core.editor_inputs(core.paint_rectangle(upload, 8, 0, 5, 3, 8), 8)
  expected = np.ones((8, 8), bool)
  expected[5:8, 0:3] = False
  np.testing.assert_array_equal(known, expected)
  # a 4 px upload for an 8 px model: one screen pixel is 2x2 model pixels, so the box grows to them
  small = {"background": np.zeros((4, 4, 3), np.uint8), "layers": []}
  _, known, _ = core.editor_inputs(core.paint_rectangle(small, 8, 2, 2, 3, 3), 8)
  expected = np.ones((8, 8), bool)
  expected[2:4, 2:4] = False
  np.testing.assert_array_equal(known, expected)
  for box, message in (((5, 2, 5, 7), "left 5, right 5: need 0 <= left < right <= 8"),
                       ((1, 2, 9, 7), "left 1, right 9"), ((1, -1, 5, 7), "top -1, bottom 7"),
                       ((1, 2.5, 5, 7), "top 2.5 is not a whole number"), (("a", 2, 5, 7), "left 'a'"),
                       ((1, 2, None, 7), "right None")):
    with pytest.raises(core.AppError, match=message):
      core.paint_rectangle(value, 8, *box)
  with pytest.raises(core.AppError, match="editor is empty"):
    core.paint_rectangle({"background": None, "layers": []}, 8, 1, 2, 5, 7)


def test_paste_known_writes_back_exactly_the_known_pixels():
  rng = np.random.default_rng(2)
  samples = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
  image = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
  known = np.zeros((4, 4), bool)
  known[0, :] = known[3, 3] = True
  out = core.paste_known(samples, image, known)
  for b in range(3):
    for y in range(4):
      for x in range(4):
        np.testing.assert_array_equal(out[b, y, x], image[y, x] if known[y, x] else samples[b, y, x])


def test_inpaint_keeps_the_known_bytes_matches_its_command_and_upsamples_as_the_cascade(models, tmp_path):
  store = core.Store(tmp_path / "s")
  source = core.generate(models, store, "a red circle", 3.0, "ancestral", "4", 3, 2, progress=NO_BAR)[1]
  value = _painted(core.editor_value(source.image), slice(0, 100), slice(120, 256))  # rows 0-3, cols 3-7
  results, note = core.inpaint(models, store, value, "a blue square", 3.0, "ancestral", "4", 5, 2, source=source,
                               progress=NO_BAR)
  known = np.ones((8, 8), bool)
  known[0:4, 3:8] = False
  assert note == "" and results[0].batch.settings["known_fraction"] == known.mean() and results[0].parent == source.id
  for r in results:
    np.testing.assert_array_equal(r.image[known], source.image[known])  # byte-identical
    assert not np.array_equal(r.image[~known], source.image[~known])
    assert np.asarray(Image.open(r.batch.mask_file)).tolist() == (known * 255).tolist()
    np.testing.assert_array_equal(_cli_output(r.command, tmp_path / f"cli{r.id}", f"{r.index:06d}.png"), r.image)
  # the result is edited again: its own bytes are the known pixels of the next edit
  again, _ = core.inpaint(models, store, _painted(core.editor_value(results[0].image), slice(200, 256), slice(0, 64)),
                          "a star", 3.0, "ancestral", "4", 6, 1, source=results[0], progress=NO_BAR)
  known2 = np.ones((8, 8), bool)
  known2[6:8, 0:2] = False
  np.testing.assert_array_equal(again[0].image[known2], results[0].image[known2])
  # upsampling an inpainted image: the inpainting cascade's upsampler stage, as its command runs it
  up = core.upsample(models, store, results[1], 0.997, "3", "ddim", progress=NO_BAR)
  assert up.image.shape == (16, 16, 3) and up.parent == results[1].id
  np.testing.assert_array_equal(_cli_output(up.command, tmp_path / "cli_up", "000001.png"), up.image)
  with pytest.raises(core.AppError, match="already an upsampled image"):
    core.upsample(models, store, up, 0.997, "3", "ddim")


def test_upsample_of_a_generated_image_is_the_cascade(models, tmp_path):
  store = core.Store(tmp_path / "s")
  picked = core.generate(models, store, "two red squares", 2.0, "ddim", "4", 11, 2, progress=NO_BAR)[1]
  up = core.upsample(models, store, picked, 0.9, "3", "ddim", progress=NO_BAR)
  meta = core.read_png_metadata(up.path)
  assert meta["upsample_temperature"] == 0.9 and meta["source"] == picked.id and meta["output"] == "000001.png"
  np.testing.assert_array_equal(_cli_output(up.command, tmp_path / "cli", "000001.png"), up.image)


def test_bad_input_is_a_message(models, tmp_path):
  store = core.Store(tmp_path / "s")
  for prompt in ("", "   ", None):
    with pytest.raises(core.AppError, match="prompt is empty"):
      core.generate(models, store, prompt, 3.0, "ancestral", "4", 0, 1)
  with pytest.raises(core.AppError, match="batch size must be 1 to 16, got 0"):
    core.generate(models, store, "x", 3.0, "ancestral", "4", 0, 0)
  with pytest.raises(core.AppError, match="steps: give a number"):
    core.generate(models, store, "x", 3.0, "ancestral", " ", 0, 1)
  with pytest.raises(core.AppError, match="seed 'abc' is not a whole number"):
    core.generate(models, store, "x", 3.0, "ancestral", "4", "abc", 1)
  image = np.zeros((8, 8, 3), np.uint8)
  with pytest.raises(core.AppError, match="keeps every pixel"):
    core.inpaint(models, store, core.editor_value(image), "x", 3.0, "ancestral", "4", 0, 1)
  with pytest.raises(core.AppError, match="covers the whole image"):
    core.inpaint(models, store, _painted(core.editor_value(image), slice(None), slice(None)), "x", 3.0,
                 "ancestral", "4", 0, 1)
  with pytest.raises(core.AppError, match="caption of the painted region is empty"):
    core.inpaint(models, store, _painted(core.editor_value(image), slice(0, 9), slice(0, 9)), "", 3.0,
                 "ancestral", "4", 0, 1)
  with pytest.raises(core.AppError, match="select an image first"):
    core.upsample(models, store, store.get(None), 0.997, "3", "ddim")
  assert store.results == []


def test_buttons_of_missing_or_wrong_bundles_are_disabled_with_the_reason(bundles, tmp_path):
  only_base = core.load_models(bundles["base"])
  assert "--inpaint-bundle" in only_base.reason("inpaint") and "--upsample-bundle" in only_base.reason("upsample")
  assert only_base.reason("generate") is None and "--clip-bundle" in only_base.reason("clip")
  with pytest.raises(core.AppError, match="no inpainting bundle"):
    core.inpaint(only_base, core.Store(tmp_path / "s"), {"background": np.zeros((8, 8, 4))}, "x", 3, "ancestral", "4", 0, 1)
  with pytest.raises(core.AppError, match="CLIP guidance|--clip-bundle"):
    core.generate(only_base, core.Store(tmp_path / "s"), "x", 3, "ancestral", "4", 0, 1, clip_scale=2.0)
  wrong = core.load_models(bundles["upsample"], upsample_bundle=bundles["base"], inpaint_bundle=bundles["base"])
  assert "holds an upsampler (upsample)" in wrong.reason("generate")
  assert "holds a text2im model, not an upsampler" in wrong.reason("upsample")
  assert "holds a text2im model, not a base inpainting one" in wrong.reason("inpaint")
  # an inpainting base bundle serves both Generate and Inpaint
  inpaint_base = core.load_models(bundles["inpaint"])
  assert inpaint_base.inpaint is inpaint_base.base and inpaint_base.reason("inpaint") is None
  with pytest.raises(UserError, match="--upsample-bundle .*nowhere: .*neither a glide-jax bundle"):
    core.load_models(bundles["base"], upsample_bundle=str(tmp_path / "nowhere"))


def test_png_metadata_round_trip(tmp_path):
  image = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
  meta = {"prompt": "a \"quoted\" prompt", "seed": 3, "guidance_scale": 2.5, "parent": None}
  path = core.write_png(tmp_path / "x.png", image, meta)
  assert core.read_png_metadata(path) == meta
  np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
  assert Image.open(path).text["seed"] == "3" and "parent" not in Image.open(path).text
  Image.fromarray(image).save(tmp_path / "plain.png")
  with pytest.raises(ValueError, match="no glide-jax metadata"):
    core.read_png_metadata(tmp_path / "plain.png")


def test_the_command_refuses_a_wrong_bundle_path_in_one_line(tmp_path, capsys):
  assert cli.main(["app", "--bundle", str(tmp_path / "none")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"glide-jax app: --bundle {tmp_path / 'none'}: ") and "neither" in err[0]



def test_inpaint_pastes_the_known_pixels_whatever_the_sampler_returns(models, tmp_path, monkeypatch):
  """A stand-in sampler that ignores the known region: the page still shows the source's bytes there
  (the shipped samplers happen to keep them already, so this is what guards the paste)."""
  from glide_jax import images, sampling

  noise = np.random.default_rng(4).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  monkeypatch.setattr(sampling, "cascade", lambda *a, **k: (noise, None))
  source = np.random.default_rng(5).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  value = _painted(core.editor_value(source), slice(0, 64), slice(0, 256))  # rows 0-1
  results, _ = core.inpaint(models, core.Store(tmp_path / "s"), value, "x", 3.0, "ancestral", "4", 0, 2)
  for i, r in enumerate(results):
    np.testing.assert_array_equal(r.image[2:], source[2:])
    np.testing.assert_array_equal(r.image[:2], images.to_uint8(noise[i])[:2])
    np.testing.assert_array_equal(r.batch.raw[i], images.to_uint8(noise[i]))
