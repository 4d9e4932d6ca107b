"""`init_from` for the clip stage: the released noised CLIP's two files (clip_image_enc.pt,
clip_text_enc.pt) start a run; the run's step-0 params are the files' tensors and its first loss is
the loss of the directly imported params."""
from __future__ import annotations

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_support as ts

from glide_jax.interop import clip_keys
from glide_jax.train import init_from, stages, timesteps, train
from glide_jax.train import state as state_lib
from glide_jax.train import step as step_lib

torch = pytest.importorskip("torch")


def released_layout(options: dict, seed: int) -> dict[str, dict[str, np.ndarray]]:
  """{tower: state_dict} with the reference's key names and PyTorch shapes, written out by hand from
  [G] clip/encoders.py (not derived from our mapping, so the test checks it)."""
  r = np.random.RandomState(seed)
  out = {}
  for tower in ("image", "text"):
    width = options[f"n_head_{tower}"] * options[f"n_head_state_{tower}"]
    sd = {}
    if tower == "image":
      p = options["patch_size"]
      sd["blocks.input.w_t"] = (options["n_timesteps"], width)
      sd["blocks.input.patch_proj"] = (width, 3, p, p)
      sd["blocks.input.w_pos"] = (1 + (options["image_size"] // p) ** 2, width)
      sd["blocks.input.ln.g"] = sd["blocks.input.ln.b"] = (width,)
    else:
      sd["blocks.input.w_voc"] = (options["n_vocab"], width)
      sd["blocks.input.w_pos"] = (options["max_text_len"], width)
    for i in range(options[f"n_xf_blocks_{tower}"]):
      a, m = f"blocks.block_{i}.f_attn.", f"blocks.block_{i}.f_mlp."
      sd.update({a + "ln.g": (width,), a + "ln.b": (width,), a + "f_q.w": (width, width), a + "f_q.b": (width,),
                 a + "f_k.w": (width, width), a + "f_v.w": (width, width), a + "f_v.b": (width,),
                 a + "f_c.w": (width, width), a + "f_c.b": (width,),
                 m + "ln.g": (width,), m + "ln.b": (width,), m + "f_1.w": (4 * width, width),
                 m + "f_1.b": (4 * width,), m + "f_2.w": (width, 4 * width), m + "f_2.b": (width,)})
    sd.update({"blocks.output.ln.g": (width,), "blocks.output.ln.b": (width,),
               "blocks.output.f.w": (options["n_embd"], width)})
    out[tower] = {k: (0.1 * r.standard_normal(s)).astype(np.float32) for k, s in sd.items()}
  return out


def ours_from_released(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The test's own reading of the key rules: '/'-joined path -> array in our layout."""
  out = {}
  for key, v in sd.items():
    parts = key.split(".")[1:]  # drop 'blocks'
    if parts == ["input", "patch_proj"]:
      out["input/patch_proj/kernel"] = v.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif parts[-1] in ("w_t", "w_voc", "w_pos"):
      out["/".join(parts)] = v
    elif parts[-2] == "ln":
      out["/".join(parts[:-1] + ["scale" if parts[-1] == "g" else "bias"])] = v
    elif parts[-1] == "w":
      out["/".join(parts[:-1] + ["kernel"])] = v.T  # Linear (out, in) -> (in, out)
    else:
      out["/".join(parts[:-1] + ["bias"])] = v
  return out


def flat(tree) -> dict[str, np.ndarray]:
  return {"/".join(k.key for k in p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def save_pt(sd: dict[str, np.ndarray], path: pathlib.Path) -> str:
  torch.save({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, str(path))  # plain tensors only
  return str(path)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  config = ts.tiny_config("clip")
  options = dict(config.model.options)
  towers = released_layout(options, seed=3)
  d = tmp_path_factory.mktemp("release")
  files = {t: save_pt(sd, d / f"{clip_keys.RELEASED_NAMES[t]}.pt") for t, sd in towers.items()}
  return options, towers, files, d


def first_loss(config, params) -> float:
  """The first step's loss of `params` on one device, with the step's own random draws."""
  stage = stages.make_stage(config)
  batch = {k: jnp.asarray(v) for k, v in next(ts.SyntheticIterator(config)).items() if k in stage.batch_keys}
  sampler = timesteps.make_sampler("uniform", stage.diffusion.num_timesteps)
  _, step_rng = jax.random.split(jax.random.key(int(config.seed)))
  st = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=None, ema={},
                            skipped=jnp.zeros((), jnp.int32), sampler=sampler.init())
  cfg = step_lib.StepConfig(caption_dropout=0.0, uses_text=False, num_timesteps=stage.diffusion.num_timesteps)
  b, k_model, _ = step_lib.prepare_batch(st, batch, step_rng, cfg, sampler, None)
  return float(jax.jit(stage.loss)(params, b, k_model)[0])


def test_clip_stage_starts_from_the_released_pair(released, tmp_path, tmp_path_factory):
  options, towers, files, _ = released
  ts.session_cache(tmp_path_factory)
  # text first: the towers are told apart by their keys, not the order. lr 0 keeps the step-0 params.
  config = ts.tiny_config("clip", f"--config.init_from={files['text']},{files['image']}",
                          "--config.total_steps=1", "--config.optimizer.lr=0", *ts.mesh_overrides(1, 8))
  result = train.train(config, str(tmp_path / "wd"), data_iterator=ts.SyntheticIterator(config),
                       tokenizer=ts.tokenizer(config), progress=False, compiler_options=ts.FAST)
  got = flat(jax.device_get(result["state"].params))
  want = {f"{t}/{p}": v for t, sd in towers.items() for p, v in ours_from_released(sd).items()}
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)

  direct = {t: clip_keys.import_tower_state_dict(sd, t, options) for t, sd in towers.items()}
  ref = first_loss(config, jax.tree.map(jnp.asarray, direct))
  assert abs(result["losses"][0] - ref) / abs(ref) < 1e-5, (result["losses"][0], ref)
  # and the loss tells these params from a fresh initialisation (so the equality above means something)
  fresh = nn.meta.unbox(jax.jit(stages.make_stage(config).init)(jax.random.key(0)))
  assert abs(first_loss(config, fresh) - ref) > 1e-3 * abs(ref)


def test_directory_bundle_and_two_tower_file_give_the_same_params(released, tmp_path):
  from glide_jax.commands import import_torch
  from glide_jax.interop import state_dicts

  options, towers, files, directory = released
  config = ts.tiny_config("clip", f"--config.init_from={files['image']},{files['text']}")
  stage = stages.make_stage(config)
  from_pair = flat(init_from.load_init_params(config, stage))
  for t in ("image", "text"):  # the import-torch bundle, one tower per call as the CLI does it
    import_torch.import_checkpoint(f"clip_{t}_enc", files[t], str(tmp_path / "bundle"), options)
  both = {f"{t}/{k}": v for t, sd in towers.items() for k, v in sd.items()}
  two_tower = state_dicts.save_state_dict(both, tmp_path / "both.safetensors")
  for src in (directory, tmp_path / "bundle", two_tower):
    config = ts.tiny_config("clip", f"--config.init_from={src}")
    got = flat(init_from.load_init_params(config, stage))
    assert sorted(got) == sorted(from_pair), src
    for k in got:
      np.testing.assert_array_equal(got[k], from_pair[k], err_msg=f"{src}: {k}")


def test_a_half_imported_bundle_is_refused(released, tmp_path):
  from glide_jax.commands import import_torch

  options, _, files, _ = released
  import_torch.import_checkpoint("clip_image_enc", files["image"], str(tmp_path / "b"), options)
  config = ts.tiny_config("clip", f"--config.init_from={tmp_path / 'b'}")
  with pytest.raises(ValueError, match=r"towers \['image'\]"):
    init_from.load_init_params(config, stages.make_stage(config))


def _load(src):
  config = ts.tiny_config("clip", f"--config.init_from={src}")
  return init_from.load_init_params(config, stages.make_stage(config))


def test_bad_inputs_are_named(released, tmp_path):
  _, towers, files, _ = released
  # a wrongly shaped key: the error names the file, the key and both shapes
  bad = dict(towers["text"])
  bad["blocks.block_0.f_mlp.f_1.w"] = np.zeros((7, 32), np.float32)
  bad_path = save_pt(bad, tmp_path / "text_bad.pt")
  with pytest.raises(clip_keys.StateDictError) as e:
    _load(f"{files['image']},{bad_path}")
  msg = str(e.value)
  assert "text_bad.pt" in msg and "blocks.block_0.f_mlp.f_1.w (7, 32) (expected (128, 32))" in msg
  # a missing key
  short = {k: v for k, v in towers["image"].items() if k != "blocks.output.f.w"}
  with pytest.raises(clip_keys.StateDictError, match=r"image_short\.pt.*missing keys.*blocks\.output\.f\.w"):
    _load(f"{save_pt(short, tmp_path / 'image_short.pt')},{files['text']}")
  with pytest.raises(ValueError, match="holds only the image tower"):
    _load(files["image"])
  with pytest.raises(ValueError, match="both hold the text tower"):
    _load(f"{files['text']},{files['text']}")
  with pytest.raises(FileNotFoundError, match="nothing.pt does not exist"):
    _load(f"{files['image']},{tmp_path / 'nothing.pt'}")
  with pytest.raises(FileNotFoundError, match="clip_text_enc.pt"):
    _load(tmp_path)  # a directory without the released names


class _Payload:
  """Unpickling this would create a directory: weights-only loading must refuse it instead."""

  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    import os
    return (os.makedirs, (self.target,))


def test_pickled_code_is_refused_not_run(released, tmp_path):
  _, towers, files, _ = released
  sd = {k: torch.from_numpy(v.copy()) for k, v in towers["text"].items()}
  sd["extra"] = _Payload(str(tmp_path / "ran"))
  torch.save(sd, str(tmp_path / "evil.pt"))
  with pytest.raises(ValueError, match="refused to load"):
    _load(f"{files['image']},{tmp_path / 'evil.pt'}")
  assert not (tmp_path / "ran").exists()
