"""glide-text2im checkpoints <-> glide-jax params: by name, exact, with clear errors (docs/pitfalls.md, 6, 11 and 20)."""
import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax import bundle
from glide_jax.interop import glide_text2im as g
from glide_jax.interop import state_dicts
from glide_jax.models import registry

TINY = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1", attention_resolutions="8", num_head_channels=16,
            dropout=0.0, text_ctx=4, xf_width=32, xf_layers=1, xf_heads=2, n_vocab=40)


@pytest.fixture(scope="module")
def base_dump(reference_dir):
  with np.load(reference_dir / "text2im_base.npz") as z:
    data = {k: z[k] for k in z.files}
  config = json.loads(str(data["config"]))
  sd = {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}
  return sd, config["kind"], config["options"]


def test_export_refuses_a_model_with_our_input_pos_emb(base_dump):
  sd, kind, options = base_dump
  params = dict(g.import_state_dict(sd, kind, options))
  size, ch = int(options.get("image_size", 64)), int(options["num_channels"])
  params["input_pos_emb"] = np.zeros((size, size, ch), np.float32)
  with pytest.raises(ValueError, match="input_pos_emb"):
    g.export_state_dict(params, kind, {**options, "input_pos_emb": True})


def test_export_is_the_exact_inverse_of_import(base_dump):
  sd, kind, options = base_dump
  params = g.import_state_dict(sd, kind, options)
  back = g.export_state_dict(params, kind, options)
  assert set(back) == set(sd)
  for k in sd:
    assert back[k].dtype == np.float32 and back[k].shape == sd[k].shape
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  again = g.import_state_dict(back, kind, options)
  flat_a, flat_b = bundle.flatten_params(params), bundle.flatten_params(again)
  assert set(flat_a) == set(flat_b)
  for k in flat_a:
    np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=k)


def test_layouts_follow_the_conversion_rules(base_dump):
  sd, kind, options = base_dump
  params = g.import_state_dict(sd, kind, options)
  np.testing.assert_array_equal(params["input_blocks_0_0"]["kernel"], sd["input_blocks.0.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["middle_block_1"]["qkv"]["kernel"], sd["middle_block.1.qkv.weight"][:, :, 0].T)
  np.testing.assert_array_equal(params["time_embed_2"]["kernel"], sd["time_embed.2.weight"].T)
  np.testing.assert_array_equal(params["out_0"]["scale"], sd["out.0.weight"])
  np.testing.assert_array_equal(params["text_encoder"]["resblocks_1"]["ln_2"]["scale"],
                                sd["transformer.resblocks.1.ln_2.weight"])
  np.testing.assert_array_equal(params["text_encoder"]["token_embedding"]["embedding"], sd["token_embedding.weight"])


def test_mapping_is_by_name_not_position(base_dump):
  sd, kind, options = base_dump
  shuffled = dict(reversed(list(sd.items())))
  a = bundle.flatten_params(g.import_state_dict(sd, kind, options))
  b = bundle.flatten_params(g.import_state_dict(shuffled, kind, options))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_missing_unexpected_and_misshapen_keys_are_named(base_dump):
  sd, kind, options = base_dump
  missing = {k: v for k, v in sd.items() if k != "middle_block.1.encoder_kv.bias"}
  with pytest.raises(KeyError, match=r"missing keys \['middle_block.1.encoder_kv.bias'\]"):
    g.import_state_dict(missing, kind, options)
  with pytest.raises(KeyError, match=r"unexpected keys \['transformer.resblocks.9.ln_1.weight'\]"):
    g.import_state_dict({**sd, "transformer.resblocks.9.ln_1.weight": np.ones(64, np.float32)}, kind, options)
  bad = dict(sd, **{"out.2.weight": np.zeros((6, 32, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"out.2.weight: got \(6, 32, 1, 1\), expected \(6, 32, 3, 3\)"):
    g.import_state_dict(bad, kind, options)
  # an inpaint checkpoint loaded as text2im: the grown input conv is named
  grown = dict(sd, **{"input_blocks.0.0.weight": np.zeros((32, 7, 3, 3), np.float32)})
  with pytest.raises(ValueError, match="input_blocks.0.0.weight"):
    g.import_state_dict(grown, kind, options)


def test_load_and_save_every_format(tmp_path, base_dump):
  sd, _, _ = base_dump
  small = {k: sd[k] for k in list(sd)[:5]}
  for name in ("sd.safetensors", "sd.pt"):
    if name.endswith(".pt"):
      pytest.importorskip("torch")
    path = state_dicts.save_state_dict(small, tmp_path / name)
    loaded = state_dicts.load_state_dict(path)
    assert set(loaded) == set(small)
    for k, v in small.items():
      np.testing.assert_array_equal(loaded[k], v)
  np.savez(tmp_path / "dump.npz", **{f"param/{k}": v for k, v in small.items()}, config=np.array("{}"))
  assert set(state_dicts.load_state_dict(tmp_path / "dump.npz")) == set(small)
  with pytest.raises(FileNotFoundError):
    state_dicts.load_state_dict(tmp_path / "absent.pt")
  (tmp_path / "x.bin2").write_bytes(b"")
  with pytest.raises(ValueError, match="unknown checkpoint format"):
    state_dicts.load_state_dict(tmp_path / "x.bin2")


class Payload:
  """A custom class: weights-only loading must refuse to construct it."""
  ran = False

  def __reduce__(self):
    return (Payload._construct, ())

  @staticmethod
  def _construct():
    Payload.ran = True
    return "constructed"


def test_pickled_objects_are_refused_never_unpickled(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "evil.pt"
  torch.save({"weight": torch.zeros(2), "extra": Payload()}, str(path))
  with open(path, "rb") as f:
    assert f.read(2) == b"PK"  # a real torch zip file holding a pickle
  Payload.ran = False
  with pytest.raises(ValueError, match="refused to load"):
    state_dicts.load_state_dict(path)
  assert not Payload.ran
  # a plain pickle is refused as well
  plain = tmp_path / "plain.pt"
  plain.write_bytes(pickle.dumps({"weight": Payload()}))
  with pytest.raises(ValueError, match="refused to load"):
    state_dicts.load_state_dict(plain)
  assert not Payload.ran


def _init(kind, options):
  """Random params of the right shapes (drawn in numpy: no init compile)."""
  model = registry.create_model(kind, options)
  inputs = model.dummy_inputs(2, options["image_size"])
  rng = np.random.default_rng(0)
  flat = {p: (0.3 * rng.standard_normal(s) + (p.endswith("/scale"))).astype(np.float32)
          for p, s in g.expected_shapes(kind, options).items()}
  return model, bundle.unflatten_params(flat), inputs


@pytest.mark.parametrize("base_kind,kind", [("text2im", "inpaint"), ("upsample", "upsample_inpaint")])
def test_inpaint_params_from_base(base_kind, kind):
  base_model, params, inputs = _init(base_kind, TINY)
  grown = g.inpaint_params_from_base(params)
  old = np.asarray(params["input_blocks_0_0"]["kernel"])
  new = np.asarray(grown["input_blocks_0_0"]["kernel"])
  assert new.shape[2] == old.shape[2] + 4
  np.testing.assert_array_equal(new[:, :, 3:7], 0)  # [image*mask (3), mask (1)] start at zero
  np.testing.assert_array_equal(new[:, :, :3], old[:, :, :3])
  np.testing.assert_array_equal(new[:, :, 7:], old[:, :, 3:])  # the upsampler's low-res channels
  # the grown params fit an inpaint model exactly, and with a zero image and mask it is the base model
  g.export_state_dict(grown, kind, TINY)
  model = registry.create_model(kind, TINY)
  rng = np.random.default_rng(1)
  inputs = dict(inputs, x=jnp.asarray(rng.standard_normal(inputs["x"].shape), jnp.float32),
                tokens=jnp.asarray(rng.integers(0, 40, inputs["tokens"].shape), jnp.int32),
                timesteps=jnp.array([3, 500]))
  if "low_res" in inputs:
    inputs["low_res"] = jnp.asarray(rng.standard_normal(inputs["low_res"].shape), jnp.float32)
  base_inputs = {k: v for k, v in inputs.items() if not k.startswith("inpaint")}
  zero = dict(base_inputs, inpaint_image=jnp.zeros_like(inputs["x"]), inpaint_mask=jnp.zeros_like(inputs["x"][..., :1]))
  want = jax.jit(lambda p, kw: base_model.apply({"params": p}, **kw))(params, base_inputs)
  got = jax.jit(lambda p, kw: model.apply({"params": p}, **kw))(grown, zero)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # and the new channels are really read once they are trained (non-zero)
  trained = bundle.unflatten_params(bundle.flatten_params(grown))
  trained["input_blocks_0_0"]["kernel"] = new + 0.1
  image = dict(zero, inpaint_image=jnp.ones_like(inputs["x"]), inpaint_mask=jnp.ones_like(inputs["x"][..., :1]))
  moved = jax.jit(lambda p, kw: model.apply({"params": p}, **kw))(trained, image)
  assert np.max(np.abs(np.asarray(moved) - np.asarray(want))) > 1e-3


def test_import_export_commands_round_trip(tmp_path, base_dump, capsys):
  from glide_jax import cli

  sd, _, options = base_dump
  ckpt = state_dicts.save_state_dict(sd, tmp_path / "base.safetensors")
  out = tmp_path / "bundle"
  rc = cli.main(["import-torch", "--kind", "base", "--checkpoint", str(ckpt), "--out", str(out),
                 "--options", json.dumps(options)])
  assert rc == 0
  _, meta = bundle.load_bundle(out)
  assert meta["model"] == {"kind": "text2im", "options": options}
  assert meta["diffusion"]["noise_schedule"] == "squaredcos_cap_v2" and meta["diffusion"]["timestep_respacing"] == "100"
  assert meta["tokenizer"] == {"type": "gpt2_bpe"}
  assert cli.main(["export-torch", "--bundle", str(out), "--out", str(tmp_path / "back.safetensors")]) == 0
  back = state_dicts.load_state_dict(tmp_path / "back.safetensors")
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  assert cli.main(["import-torch", "--kind", "base", "--checkpoint", str(ckpt), "--out", str(out),
                   "--options", '{"num_chanels": 32}']) == 2
  assert "unknown model option(s) ['num_chanels']" in capsys.readouterr().err


def test_import_clip_towers_into_one_bundle(tmp_path, reference_dir):
  pytest.importorskip("glide_jax.interop.clip_keys")
  from glide_jax import cli

  with np.load(reference_dir / "noised_clip.npz") as z:
    data = {k: z[k] for k in z.files}
  options = json.loads(str(data["config"]))["options"]
  for tower, kind in (("image", "clip_image_enc"), ("text", "clip_text_enc")):
    sd = {k[len(f"param/{tower}/"):]: v for k, v in data.items() if k.startswith(f"param/{tower}/")}
    ckpt = state_dicts.save_state_dict(sd, tmp_path / f"{kind}.safetensors")
    assert cli.main(["import-torch", "--kind", kind, "--checkpoint", str(ckpt), "--out", str(tmp_path / "clip"),
                     "--options", json.dumps(options)]) == 0
  params, meta = bundle.load_bundle(tmp_path / "clip")
  assert meta["model"]["kind"] == "noised_clip" and sorted(params) == ["image", "text"]
  assert cli.main(["export-torch", "--bundle", str(tmp_path / "clip"), "--tower", "image",
                   "--out", str(tmp_path / "img.safetensors")]) == 0
  back = state_dicts.load_state_dict(tmp_path / "img.safetensors")
  want = {k[len("param/image/"):]: v for k, v in data.items() if k.startswith("param/image/")}
  assert set(back) == set(want)
  for k, v in want.items():
    np.testing.assert_array_equal(back[k], v)
  # both towers at once, keys prefixed 'image/' and 'text/' as in the reference dump
  assert cli.main(["export-torch", "--bundle", str(tmp_path / "clip"), "--out", str(tmp_path / "both.safetensors")]) == 0
  both = state_dicts.load_state_dict(tmp_path / "both.safetensors")
  assert set(both) == {k[len("param/"):] for k in data if k.startswith("param/")}
