"""Guidance sweep end to end on a tiny random model, the table/plot writer, grids, and the CLI."""
from __future__ import annotations

import csv
import json
import math
import pathlib

import numpy as np
import pytest
from PIL import Image

from glide_jax.eval import attributes as A
from glide_jax.eval import plots, sweep


def _rows():
  return [{"guidance_scale": s, "n": 10, "acc_all": a, "acc_colour": min(1, a + 0.2), "acc_shape": a,
               "acc_size": min(1, a + 0.1), "acc_position": a, "unreadable": 0, "clip_score_mean": c,
               "clip_score_std": 2.0, "samples_dir": f"scale_{s:g}"}
          for s, a, c in ((1.0, 0.1, 20.0), (3.0, 0.4, 25.5), (2.0, 0.3, 23.0))]


def test_table_and_plot_writer(tmp_path):
  rows = _rows()
  csv_path, json_path = sweep.write_table(rows, tmp_path, settings={"bundle": "b"})
  back = sweep.read_table(csv_path)
  assert [r["guidance_scale"] for r in back] == [1.0, 3.0, 2.0]
  for got, want in zip(back, rows):
    for k in sweep.COLUMNS:
      assert got[k] == pytest.approx(want[k]) if isinstance(want[k], float) else got[k] == want[k]
  doc = json.loads(json_path.read_text())
  assert doc["settings"] == {"bundle": "b"} and "100 x cosine" in doc["metrics"]["clip_score_*"]
  assert doc["chance_accuracy"]["all"] == pytest.approx(1 / 180)
  png = plots.plot_sweep(rows, tmp_path / "sweep.png", title="t")
  with Image.open(png) as im:
    assert im.size[0] > 1000 and im.size[1] > 300  # three panels side by side
    assert np.asarray(im.convert("L")).std() > 5  # something is drawn
  # Only accuracy: one panel; nothing measured: a clear error.
  only_acc = [{k: v for k, v in r.items() if not k.startswith("clip")} for r in rows]
  with Image.open(plots.plot_sweep(only_acc, tmp_path / "acc.png")) as im:
    assert im.size[0] < 700
  with pytest.raises(ValueError, match="nothing to plot"):
    plots.plot_sweep([{"guidance_scale": 1.0, "n": 3}], tmp_path / "none.png")


def test_image_grid_layout():
  images = np.stack([np.full((4, 5, 3), 10 * i, np.uint8) for i in range(1, 6)])
  grid = plots.image_grid(images, ncols=3, pad=1)
  assert grid.shape == (2 * 5 + 1, 3 * 6 + 1, 3)
  assert (grid[1:5, 1:6] == 10).all() and (grid[6:10, 7:12] == 50).all()  # image 4 at row 1, col 1
  assert (grid[6:10, 13:18] == 255).all()  # the empty sixth cell stays padding
  with pytest.raises(ValueError, match="uint8"):
    plots.image_grid(images.astype(np.float32))
  framed = plots.image_grid(images[:2], ncols=2, pad=1, frames=[True, False])
  assert tuple(framed[0, 0]) == plots.GOOD and tuple(framed[0, 6]) == plots.BAD
  assert (framed[1:5, 1:6] == 10).all()
  with pytest.raises(ValueError, match="3 frames for 2 images"):
    plots.image_grid(images[:2], frames=[True] * 3)


def _read_events(logdir):
  """Parses TFRecord event files (length, crc, payload, crc) with tensorboardX's Event proto."""
  import struct

  from tensorboardX.proto import event_pb2

  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      yield event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4


def test_tensorboard_logging(tmp_path):
  tb = plots.TensorBoard(tmp_path / "tb")
  tb.scalars(1, {"acc_all": 0.5, "skip": float("nan")}, prefix="sweep/")
  tb.image("grid", np.zeros((8, 8, 3), np.uint8), 1)
  tb.close()
  scalars, images = {}, []
  for event in _read_events(tmp_path / "tb"):
    for v in event.summary.value:
      if v.HasField("image"):
        images.append(v.tag)
      else:
        scalars[v.tag] = v.simple_value
  assert scalars == {"sweep/acc_all": 0.5} and images == ["grid"]
  plots.TensorBoard(None).scalars(0, {"a": 1.0})  # no logdir: a no-op


def test_run_sweep_table_and_statistics_match_hand_counts(tmp_path):
  """run_sweep's table, intervals, confusion and paired comparison against counts made by hand from
  how the samples were drawn (not the sweep's own functions run again)."""
  from glide_jax.data import render

  prompts, expected = sweep.shapes_validation_prompts(12)
  a = render.sample_attributes(render.SPLIT_SEEDS["validation"], 0, 12)
  # Scale 1: sample 0 in the wrong colour, 1 the wrong shape, 2 the wrong size, 3 at the wrong
  # position, 4 wrong in colour and shape, 5 a blank canvas; 6-11 as asked. Scale 4: all as asked.
  drawn = {k: v.copy() for k, v in a.items()}
  drawn["colour"][[0, 4]] = (a["colour"][[0, 4]] + 1) % len(A.COLOURS)
  drawn["shape"][[1, 4]] = (a["shape"][[1, 4]] + 1) % len(A.SHAPES)
  drawn["size"][2] = 1 - a["size"][2]
  drawn["position"][3] = (a["position"][3] + 1) % len(A.POSITIONS)
  at_1 = render.render(drawn, 32)
  at_1[5] = 200  # grey only: no shape to read
  at_4 = render.render(a, 32)

  rows = sweep.run_sweep(lambda ps, scale, **_: at_4 if scale == 4 else at_1, prompts, [1.0, 4.0], tmp_path,
                         attributes=expected, log=lambda s: None)
  hand = {"all": 6 / 12, "colour": 9 / 12, "shape": 9 / 12, "size": 10 / 12, "position": 10 / 12}
  for a_name, value in hand.items():
    assert rows[0][f"acc_{a_name}"] == pytest.approx(value), a_name
    assert rows[1][f"acc_{a_name}"] == 1.0
  assert (rows[0]["unreadable"], rows[1]["unreadable"]) == (1, 0)
  assert [r["acc_all"] for r in sweep.read_table(tmp_path / "sweep.csv")] == pytest.approx([0.5, 1.0])
  doc = json.loads((tmp_path / "sweep.json").read_text())
  # 95 % Wilson intervals of 6/12, 9/12 and 12/12, worked out by hand from the closed form.
  first, second = doc["rows"]
  assert first["ci95"]["all"] == pytest.approx([0.2538, 0.7462], abs=1e-4)
  assert first["ci95"]["colour"] == pytest.approx([0.4677, 0.9111], abs=1e-4)
  assert second["ci95"]["all"] == pytest.approx([0.7575, 1.0], abs=1e-4)
  # Size at scale 1: sample 2 read as the other size, sample 5 in the unreadable column.
  size = np.asarray(first["confusion"]["size"])
  asked = np.bincount(a["size"], minlength=2)
  assert size.shape == (2, 3) and size[:, 2].sum() == 1 and size[a["size"][2], 1 - a["size"][2]] == 1
  assert size[a["size"][5], 2] == 1 and np.trace(size[:, :2]) == 10 and (size.sum(1) == asked).all()
  # Scale 4 against scale 1: the six prompts wrong at 1 are right at 4, none the other way round.
  (p,) = doc["paired"]
  assert (p["scale"], p["baseline_scale"]) == (4.0, 1.0)
  assert (p["all"]["only_scale"], p["all"]["only_baseline"]) == (6, 0)
  assert (p["colour"]["only_scale"], p["colour"]["only_baseline"]) == (3, 0)
  assert p["all"]["diff"] == pytest.approx(0.5)
  assert (tmp_path / "sweep.png").is_file() and (tmp_path / "grids" / "scale_1.png").is_file()
  # Rescoring the directory reproduces the table and statistics without touching the samples.
  stamp = (tmp_path / "scale_1" / "00000.png").stat().st_mtime_ns
  again = sweep.rescore(tmp_path, log=lambda s: None)
  assert [r["acc_all"] for r in again] == [r["acc_all"] for r in rows]
  assert json.loads((tmp_path / "sweep.json").read_text())["paired"] == doc["paired"]
  assert (tmp_path / "scale_1" / "00000.png").stat().st_mtime_ns == stamp
  with pytest.raises(FileNotFoundError, match="no prompts.txt"):
    sweep.rescore(tmp_path / "grids")


def test_compare_sweeps_pairs_prompts_and_counts_by_hand(tmp_path, capsys):
  """`eval compare`: a second sweep against a baseline, per shared scale, prompt by prompt, counted
  by hand from how the samples were drawn; a shorter sweep on the baseline's first n prompts; a
  sweep of other prompts refused."""
  from glide_jax import cli
  from glide_jax.data import render

  prompts, expected = sweep.shapes_validation_prompts(10)
  a = render.sample_attributes(render.SPLIT_SEEDS["validation"], 0, 10)
  right = render.render(a, 32)
  drawn = {k: v.copy() for k, v in a.items()}
  drawn["shape"][[0, 1, 2]] = (a["shape"][[0, 1, 2]] + 1) % len(A.SHAPES)  # the student gets 0-2 wrong
  drawn["colour"][0] = (a["colour"][0] + 1) % len(A.COLOURS)
  wrong = render.render(drawn, 32)
  teacher_at_1 = right.copy()
  teacher_at_1[7] = wrong[0]  # the teacher at scale 1 gets prompt 7 wrong (a different caption's image)
  quiet = lambda s: None
  sweep.run_sweep(lambda ps, s, **_: teacher_at_1 if s == 1 else right, prompts, [1.0, 3.0], tmp_path / "teacher",
                  attributes=expected, log=quiet)
  sweep.run_sweep(lambda ps, s, **_: wrong, prompts, [1.0, 3.0, 5.0], tmp_path / "student", attributes=expected,
                  log=quiet)
  sweep.run_sweep(lambda ps, s, **_: right[:4], prompts[:4], [3.0], tmp_path / "short",
                  attributes=A.parse_captions(prompts[:4]), log=quiet)

  out = sweep.compare_sweeps(tmp_path / "teacher", [tmp_path / "student", tmp_path / "short"], log=quiet)
  by = {(pathlib.Path(c["sweep"]).name, c["scale"]): c for c in out["comparisons"]}
  assert sorted(by) == [("short", 3.0), ("student", 1.0), ("student", 3.0)]  # no scale 5 in the teacher
  at3 = by[("student", 3.0)]
  assert at3["n"] == 10
  assert (at3["shape"]["only_baseline"], at3["shape"]["only_sweep"]) == (3, 0)
  assert (at3["colour"]["only_baseline"], at3["colour"]["only_sweep"]) == (1, 0)
  assert at3["all"]["diff"] == pytest.approx(-0.3) and at3["all"]["baseline"] == 1.0
  assert at3["size"]["diff"] == 0 and at3["position"]["diff"] == 0
  at1 = by[("student", 1.0)]  # prompt 7 wrong only in the teacher, 0-2 only in the student
  assert (at1["all"]["only_baseline"], at1["all"]["only_sweep"]) == (3, 1)
  assert at1["all"]["diff"] == pytest.approx(-0.2)
  short = by[("short", 3.0)]
  assert short["n"] == 4 and short["all"]["diff"] == 0 and short["all"]["sweep"] == 1.0

  # The CLI writes the same comparisons; a sweep of other prompts is refused by name.
  assert cli.main(["eval", "compare", str(tmp_path / "teacher"), str(tmp_path / "student"),
                   "--out", str(tmp_path / "cmp.json")]) == 0
  doc = json.loads((tmp_path / "cmp.json").read_text())
  assert [c["all"]["diff"] for c in doc["comparisons"]] == pytest.approx([-0.2, -0.3])
  assert "shape 70.0 vs 100.0 %" in capsys.readouterr().out
  other_prompts, _ = sweep.shapes_validation_prompts(12)
  sweep.run_sweep(lambda ps, s, **_: render.render(render.sample_attributes(render.SPLIT_SEEDS["validation"], 0, 12), 32)[2:],
                  other_prompts[2:], [3.0], tmp_path / "other", attributes=A.parse_captions(other_prompts[2:]),
                  log=quiet)
  with pytest.raises(SystemExit, match="sampled different prompts .*line 1"):
    cli.main(["eval", "compare", str(tmp_path / "teacher"), str(tmp_path / "other")])


# --- end to end through the CLI, with a tiny random text2im bundle and a tiny noised CLIP -----

@pytest.fixture(scope="module")
def tiny_bundles(tmp_path_factory):
  import jax
  import jax.numpy as jnp
  from flax.linen import meta as flax_meta

  from glide_jax import bundle
  from glide_jax.data import tokenizers
  from glide_jax.models import registry

  root = tmp_path_factory.mktemp("bundles")
  captions, _ = sweep.shapes_validation_prompts(300)
  sp = tokenizers.train_sentencepiece(captions, 48, root / "sp.model")
  tok = tokenizers.SentencePieceTokenizer(sp, text_ctx=16)
  options = {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
                 "attention_resolutions": "16", "dropout": 0.0, "text_ctx": 16, "xf_width": 32, "xf_layers": 1,
                 "xf_heads": 2, "n_vocab": tok.vocab_size}
  model = registry.create_model("text2im", options)
  rng = np.random.default_rng(0)

  def random_params(module, *args, **kwargs):
    # Shapes by tracing only (compiling a U-Net init costs a minute here), then random values:
    # fresh init zeroes the output conv, which would make every guidance scale sample the same.
    shapes = flax_meta.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *args, **kwargs)["params"])

    def draw(path, s):
      if jax.tree_util.keystr(path).endswith("'scale']"):
        return (1 + 0.1 * rng.normal(size=s.shape)).astype(np.float32)
      fan_in = max(int(np.prod(s.shape[:-1])), 1) if len(s.shape) > 1 else 25
      return (rng.normal(size=s.shape) / math.sqrt(fan_in)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw, shapes)

  params = random_params(model, **model.dummy_inputs(1, 32))
  tok_meta = {"type": "sentencepiece", "text_ctx": 16}
  base = bundle.save_bundle(root / "base", params, {
      "model": {"kind": "text2im", "options": options},
      "diffusion": {"steps": 1000, "noise_schedule": "squaredcos_cap_v2", "timestep_respacing": "4",
                    "sampler": "ddim"},
      "tokenizer": tok_meta, "dtype": "float32"}, tokenizer_files={"model": sp})
  from glide_jax.models import clip as clip_mod
  clip_options = {"image_size": 16, "patch_size": 4, "n_vocab": tok.vocab_size, "max_text_len": 16, "n_embd": 16,
                      "n_head_text": 2, "n_head_state_text": 8, "n_xf_blocks_text": 1,
                      "n_head_image": 2, "n_head_state_image": 8, "n_xf_blocks_image": 1}
  cmodel = clip_mod.create_clip_model(clip_options)
  cparams = random_params(cmodel, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,), jnp.int32),
                          jnp.zeros((1, 16), jnp.int32), jnp.ones((1,), jnp.int32))
  clip = bundle.save_bundle(root / "clip", cparams, {
      "model": {"kind": "noised_clip", "options": clip_options}, "tokenizer": tok_meta,
      "dtype": "float32"}, tokenizer_files={"model": sp})
  return base, clip


def test_sweep_cli_end_to_end(tiny_bundles, tmp_path):
  from glide_jax import cli
  from glide_jax.eval import clip_score

  base, clip = tiny_bundles
  out = tmp_path / "sweep"
  rc = cli.main(["eval", "sweep", "--bundle", str(base), "--clip-bundle", str(clip), "--scales", "2,4",
                 "--shapes-validation", "6", "--batch-size", "6", "--out", str(out),
                 "--tensorboard", str(tmp_path / "tb")])
  assert rc == 0
  for name in ("sweep.csv", "sweep.json", "sweep.png", "prompts.txt", "grids/scale_2.png", "scale_4/00005.png"):
    assert (out / name).is_file(), name
  assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
  rows = sweep.read_table(out / "sweep.csv")
  assert [r["guidance_scale"] for r in rows] == [2.0, 4.0] and all(r["n"] == 6 for r in rows)
  settings = json.loads((out / "sweep.json").read_text())["settings"]
  assert settings["sampler"] == "ddim" and settings["timestep_respacing"] == "4"
  # A random model's samples cannot be counted by hand (the hand-counted test above checks the
  # counting); here the table must describe the PNGs it wrote under each scale's directory.
  prompts = (out / "prompts.txt").read_text().splitlines()
  expected = A.parse_captions(prompts)
  bundle_clip = clip_score.load_clip_bundle(clip)
  pixels = {}
  for r in rows:
    images = np.stack([np.asarray(Image.open(out / r["samples_dir"] / f"{i:05d}.png")) for i in range(6)])
    pixels[r["guidance_scale"]] = images
    acc = A.caption_accuracy(images, expected)
    for a in ("all",) + A.ATTRIBUTES:
      assert r[f"acc_{a}"] == pytest.approx(acc[a])
    cs = clip_score.clip_score_of_samples(bundle_clip, images, prompts)
    assert r["clip_score_mean"] == pytest.approx(cs["mean"], abs=1e-3)
    # The accuracy command reads the same directory to the same numbers.
    jpath = tmp_path / f"acc_{r['guidance_scale']:g}.json"
    assert cli.main(["eval", "accuracy", "--images", str(out / r["samples_dir"]), "--prompts",
                     str(out / "prompts.txt"), "--out", str(jpath)]) == 0
    assert json.loads(jpath.read_text())["all"] == pytest.approx(acc["all"])
  assert pixels[2.0].shape == (6, 32, 32, 3)
  assert not np.array_equal(pixels[2.0], pixels[4.0])  # the scale reached the sampler
  # --rescore rebuilds the table and the paired comparison (4 against 2) from the saved samples.
  before = (out / "sweep.csv").read_text()
  assert cli.main(["eval", "sweep", "--rescore", str(out), "--clip-bundle", str(clip)]) == 0
  assert (out / "sweep.csv").read_text() == before
  (p,) = json.loads((out / "sweep.json").read_text())["paired"]
  assert (p["scale"], p["baseline_scale"]) == (4.0, 2.0)
  with pytest.raises(SystemExit, match="drop --bundle and --out"):
    cli.main(["eval", "sweep", "--rescore", str(out), "--bundle", str(base)])
  with pytest.raises(SystemExit, match="needs --bundle and --out"):
    cli.main(["eval", "sweep", "--shapes-validation", "4"])


def test_a_stopped_sweep_resumes_to_the_samples_of_an_uninterrupted_one(tiny_bundles, tmp_path, monkeypatch):
  from glide_jax import cli, sampling

  base, _ = tiny_bundles
  args = ["eval", "sweep", "--bundle", str(base), "--scales", "3", "--shapes-validation", "6", "--batch-size", "2"]
  full = tmp_path / "full"
  assert cli.main(args + ["--out", str(full)]) == 0

  real, calls = sampling.generate, []

  def counted(sm, batch, key, **kwargs):
    calls.append(len(calls))
    if stop_at is not None and len(calls) == stop_at:
      raise KeyboardInterrupt  # the user stops the sweep while its third batch samples
    return real(sm, batch, key, **kwargs)

  monkeypatch.setattr(sampling, "generate", counted)
  part = tmp_path / "part"
  stop_at = 3
  with pytest.raises(KeyboardInterrupt):
    cli.main(args + ["--out", str(part)])
  assert sorted(p.name for p in (part / "scale_3").glob("*.png")) == [f"{i:05d}.png" for i in range(4)]
  assert not (part / "sweep.csv").exists()
  calls.clear()
  stop_at = None
  assert cli.main(args + ["--out", str(part)]) == 0
  assert len(calls) == 1  # only the batch that had not been written
  for i in range(6):
    np.testing.assert_array_equal(np.asarray(Image.open(part / "scale_3" / f"{i:05d}.png")),
                                  np.asarray(Image.open(full / "scale_3" / f"{i:05d}.png")), err_msg=str(i))
  assert sweep.read_table(part / "sweep.csv") == sweep.read_table(full / "sweep.csv")
  # Samples of another sampler setting are not mixed into the directory.
  with pytest.raises(SystemExit, match="timestep_respacing: '4' there, '2' now"):
    cli.main(args + ["--out", str(part), "--steps", "2"])
  (part / "scale_3" / ".sweep_settings.json").unlink()
  with pytest.raises(SystemExit, match="samples of an unknown run"):
    cli.main(args + ["--out", str(part)])


def test_accuracy_cli_attribute_files(tmp_path):
  from glide_jax import cli
  from glide_jax.commands import eval as eval_cmd
  from glide_jax.data import render

  a = render.sample_attributes(render.SPLIT_SEEDS["validation"], 0, 8)
  images = render.render(a, 32)
  sweep.save_images(tmp_path / "imgs", images)
  with open(tmp_path / "attrs.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(A.ATTRIBUTES)
    for i in range(8):  # names in some rows, indices in others
      w.writerow([A.COLOURS[a["colour"][i]] if i % 2 else a["colour"][i], a["shape"][i], a["size"][i],
                  A.POSITIONS[a["position"][i]]])
  assert cli.main(["eval", "accuracy", "--images", str(tmp_path / "imgs"), "--attributes",
                   str(tmp_path / "attrs.csv"), "--out", str(tmp_path / "r.json")]) == 0
  r = json.loads((tmp_path / "r.json").read_text())
  assert r["all"] == 1.0 and r["n"] == 8
  (tmp_path / "bad.json").write_text(json.dumps({"colour": [9], "shape": [0], "size": [0], "position": [0]}))
  with pytest.raises(ValueError, match="colour=9 out of range"):
    eval_cmd.read_attributes_file(tmp_path / "bad.json")
  (tmp_path / "p.txt").write_text("a small red circle on the left\n")
  with pytest.raises(SystemExit, match="8 images"):
    cli.main(["eval", "accuracy", "--images", str(tmp_path / "imgs"), "--prompts", str(tmp_path / "p.txt")])
  with pytest.raises(SystemExit, match="no prompts.json"):
    cli.main(["eval", "accuracy", "--images", str(tmp_path / "imgs")])


def test_accuracy_cli_on_a_sample_command_directory(tmp_path, capsys):
  """`glide-jax sample` writes 000000.png ..., grid.png and prompts.json {file: prompt}."""
  from glide_jax import cli
  from glide_jax.data import render

  a = render.sample_attributes(render.SPLIT_SEEDS["validation"], 100, 5)
  images = render.render(a, 64)
  captions = [render.caption(*(a[k][i] for k in ("colour", "shape", "size", "position", "template")))
              for i in range(5)]
  captions[0] = A.make_caption((a["colour"][0] + 1) % 6, a["shape"][0], a["size"][0], a["position"][0])
  for i, im in enumerate(images):
    Image.fromarray(im).save(tmp_path / f"{i:06d}.png")
  Image.fromarray(plots.image_grid(images)).save(tmp_path / "grid.png")
  (tmp_path / "prompts.json").write_text(json.dumps({f"{i:06d}.png": c for i, c in enumerate(captions)}))
  assert cli.main(["eval", "accuracy", "--images", str(tmp_path), "--out", str(tmp_path / "r.json"),
                   "--grid", str(tmp_path / "g.png"), "--tensorboard", str(tmp_path / "tb"), "--step", "7"]) == 0
  r = json.loads((tmp_path / "r.json").read_text())
  assert r["n"] == 5 and r["colour"] == pytest.approx(0.8) and r["shape"] == 1.0 and r["all"] == pytest.approx(0.8)
  # The one wrong caption shows up in the colour confusion matrix: asked (c + 1) % 6, read c.
  c0 = int(a["colour"][0])
  conf = np.asarray(r["confusion"]["colour"])
  assert conf.shape == (6, 7) and conf.sum() == 5 and conf[(c0 + 1) % 6, c0] == 1
  assert np.trace(conf[:, :6]) == 4
  assert r["recall_by_value"]["shape"] == {s: (1.0 if s in {A.SHAPES[i] for i in a["shape"]} else None)
                                           for s in A.SHAPES}
  assert "over 5 samples" in capsys.readouterr().out
  # The grid (cells 64 px + 2 px frames, scale 1): sample 0 framed red, sample 1 green.
  grid = np.asarray(Image.open(tmp_path / "g.png"))
  assert tuple(grid[0, 0]) == plots.BAD and tuple(grid[0, 66 + 1]) == plots.GOOD
  scalars = {v.tag: (e.step, v.simple_value) for e in _read_events(tmp_path / "tb") for v in e.summary.value}
  assert scalars["accuracy/all"] == (7, pytest.approx(0.8)) and scalars["accuracy/colour"][1] == pytest.approx(0.8)
