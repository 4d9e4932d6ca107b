"""Noised CLIP: parity with the PyTorch reference dump, key mapping, score, loss, mask, sizes, bf16."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax.interop import clip_keys
from glide_jax.models import clip
from glide_jax.models.layers import __doc__ as LAYERS_DOC

# A tiny model: both towers 2 blocks, 32 wide, 2 heads of 16; 16 px images, 4 px patches.
TINY = dict(n_embd=24, n_head=2, n_head_state=16, n_xf_blocks=2, image_size=16, patch_size=4,
            max_text_len=12, n_vocab=50, n_timesteps=1000)


@pytest.fixture(scope="module")
def dump(reference_dir):
  with np.load(reference_dir / "noised_clip.npz") as f:
    return dict(f)


def _dump_state_dict(dump):
  return {k[len("param/"):]: v for k, v in dump.items() if k.startswith("param/")}


@pytest.fixture(scope="module")
def tiny():
  model = clip.create_clip_model(TINY)
  s, length = TINY["image_size"], TINY["max_text_len"]
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, s, s, 3)), jnp.zeros((1,), jnp.int32),
                                  jnp.zeros((1, length), jnp.int32), jnp.ones((1,), jnp.int32))
  return model, nn.meta.unbox(variables["params"]), variables["params"]


@pytest.mark.parametrize("scan_layers", [False, True], ids=["per_layer", "scanned"])
def test_parity_with_reference_dump(dump, scan_layers):
  errors = clip_keys.check_clip_dump(dump, options={"scan_layers": scan_layers})
  assert set(errors) == {"text_emb", "image_emb", "guidance_grad"}
  for name, err in errors.items():
    assert err < 1e-4, (name, err)


def test_bfloat16_compute_close_to_reference(dump):
  # Stated tolerance for bfloat16 compute (float32 params, norms and softmax): embeddings within 2e-2,
  # the guidance gradient within 5e-2 (measured: ~4e-3 and ~1.4e-2 on this dump).
  errors = clip_keys.check_clip_dump(dump, dtype=jnp.bfloat16)
  assert errors["text_emb"] < 2e-2 and errors["image_emb"] < 2e-2, errors
  assert errors["guidance_grad"] < 5e-2, errors
  # And it is really computing in bfloat16 (not silently float32).
  assert errors["image_emb"] > 1e-5, errors


def test_dump_options_resolve_to_the_dumped_shapes(dump):
  options = clip_keys.load_dump_config(dump)["options"]
  shapes = clip_keys.expected_shapes(options)
  sd = _dump_state_dict(dump)
  assert shapes["image"][("input", "patch_proj", "kernel")] == (4, 4, 3, 32)
  assert sd["image/blocks.input.patch_proj"].shape == (32, 3, 4, 4)
  assert shapes["text"][("block_1", "f_mlp", "f_1", "kernel")] == sd["text/blocks.block_1.f_mlp.f_1.w"].shape[::-1]
  assert sum(len(v) for v in shapes.values()) == len(sd)


def test_round_trip_is_bit_exact(tiny, dump):
  _, params, _ = tiny
  sd = clip_keys.export_clip_state_dict(params, TINY)
  assert "image/blocks.input.patch_proj" in sd and sd["image/blocks.input.patch_proj"].shape == (32, 3, 4, 4)
  assert sd["text/blocks.block_0.f_attn.f_q.w"].shape == (32, 32)
  assert sd["image/blocks.output.f.w"].shape == (24, 32)  # (out, in)
  back = clip_keys.import_clip_state_dict(sd, TINY)
  flat_a = jax.tree_util.tree_leaves_with_path(params)
  flat_b = dict(jax.tree_util.tree_leaves_with_path(back))
  assert len(flat_a) == len(flat_b)
  for path, a in flat_a:
    b = flat_b[path]
    assert b.dtype == np.float32 and np.array_equal(np.asarray(a), b), path
  # And the other way round, starting from the reference's own state_dict.
  ref = _dump_state_dict(dump)
  options = clip_keys.load_dump_config(dump)["options"]
  again = clip_keys.export_clip_state_dict(clip_keys.import_clip_state_dict(ref, options), options)
  assert set(again) == set(ref)
  for k, v in ref.items():
    assert again[k].shape == v.shape and np.array_equal(again[k], v), k


def test_transposes_are_the_right_ones(dump):
  ref = _dump_state_dict(dump)
  options = clip_keys.load_dump_config(dump)["options"]
  params = clip_keys.import_clip_state_dict(ref, options)
  w = ref["image/blocks.block_0.f_attn.f_q.w"]
  np.testing.assert_array_equal(params["image"]["block_0"]["f_attn"]["f_q"]["kernel"][3, 5], w[5, 3])
  conv = ref["image/blocks.input.patch_proj"]  # (O, I, kh, kw)
  np.testing.assert_array_equal(params["image"]["input"]["patch_proj"]["kernel"][1, 2, 0, 7], conv[7, 0, 1, 2])
  np.testing.assert_array_equal(params["text"]["input"]["w_voc"], ref["text/blocks.input.w_voc"])
  np.testing.assert_array_equal(params["text"]["output"]["ln"]["scale"], ref["text/blocks.output.ln.g"])


def test_missing_extra_and_misshapen_keys_are_named(dump):
  ref = _dump_state_dict(dump)
  options = clip_keys.load_dump_config(dump)["options"]

  missing = dict(ref)
  del missing["image/blocks.block_1.f_attn.f_k.w"]
  with pytest.raises(clip_keys.StateDictError, match=r"missing keys \(1\): image/blocks\.block_1\.f_attn\.f_k\.w"):
    clip_keys.import_clip_state_dict(missing, options)

  extra = dict(ref, **{"text/blocks.block_0.f_attn.f_k.b": np.zeros(32, np.float32),
                       "logit_scale": np.zeros((), np.float32)})
  with pytest.raises(clip_keys.StateDictError) as info:
    clip_keys.import_clip_state_dict(extra, options)
  assert "text/blocks.block_0.f_attn.f_k.b" in str(info.value) and "logit_scale" in str(info.value)
  assert "missing" not in str(info.value)

  wrong = dict(ref, **{"text/blocks.input.w_pos": np.zeros((77, 32), np.float32)})
  with pytest.raises(clip_keys.StateDictError, match=r"text/blocks\.input\.w_pos \(77, 32\) \(expected \(16, 32\)\)"):
    clip_keys.import_clip_state_dict(wrong, options)

  # A released-style single tower file: the text tower's keys do not fit the image tower.
  text_only = {k[len("text/"):]: v for k, v in ref.items() if k.startswith("text/")}
  with pytest.raises(clip_keys.StateDictError) as info:
    clip_keys.import_tower_state_dict(text_only, "image", options)
  msg = str(info.value)
  assert "blocks.input.w_voc" in msg and "blocks.input.w_t" in msg and "blocks.input.patch_proj" in msg


def test_single_tower_import_matches_two_tower_import(dump):
  ref = _dump_state_dict(dump)
  options = clip_keys.load_dump_config(dump)["options"]
  both = clip_keys.import_clip_state_dict(ref, options)
  for tower in ("image", "text"):
    released = {k[len(tower) + 1:]: v for k, v in ref.items() if k.startswith(tower + "/")}
    one = clip_keys.import_tower_state_dict(released, tower, options)
    jax.tree_util.tree_map(np.testing.assert_array_equal, one, both[tower])
    out = clip_keys.export_tower_state_dict(one, tower, options)
    assert set(out) == set(released)
    for k, v in released.items():
      np.testing.assert_array_equal(out[k], v)


def test_export_refuses_a_foreign_tree(tiny):
  _, params, _ = tiny
  broken = jax.tree_util.tree_map(lambda x: x, params)
  broken["text"]["block_0"]["f_attn"]["f_k"]["bias"] = np.zeros(32, np.float32)
  with pytest.raises(clip_keys.StateDictError, match=r"text/block_0/f_attn/f_k/bias"):
    clip_keys.export_clip_state_dict(broken, TINY)


def test_clip_score_is_100_times_cosine():
  z_text = jnp.array([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0]])
  z_image = jnp.array([[4.0, 3.0, 0.0], [0.0, 5.0, 0.0], [0.0, -7.0, 0.0], [2.0, 2.0, 2.0]])
  score = clip.clip_score(z_text, z_image)
  np.testing.assert_allclose(np.asarray(score), [96.0, 0.0, -100.0, 100.0], rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(np.asarray(clip.clip_score(z_text, z_image, 0.0)), [0.96, 0.0, -1.0, 1.0], atol=1e-6)
  np.testing.assert_allclose(np.asarray(clip.normalise(jnp.array([[0.0, 0.0]]))), [[0.0, 0.0]])


def _numpy_contrastive_loss(zi, zt, logit_scale):
  zi = zi / (np.sqrt((zi ** 2).sum(-1, keepdims=True)) + 1e-12)
  zt = zt / (np.sqrt((zt ** 2).sum(-1, keepdims=True)) + 1e-12)
  n = zi.shape[0]
  total_i = total_t = 0.0
  for i in range(n):
    row = [math.exp(logit_scale) * float(np.dot(zi[i], zt[j])) for j in range(n)]
    col = [math.exp(logit_scale) * float(np.dot(zi[j], zt[i])) for j in range(n)]
    total_i += -row[i] + math.log(sum(math.exp(r) for r in row))
    total_t += -col[i] + math.log(sum(math.exp(c) for c in col))
  return (total_i + total_t) / (2 * n)


def test_contrastive_loss_matches_numpy():
  rng = np.random.default_rng(0)
  zi = rng.normal(size=(6, 5))
  zt = zi + 0.7 * rng.normal(size=(6, 5))
  for scale in (0.0, math.log(10.0), 1.3):
    got = float(clip.contrastive_loss(jnp.asarray(zi, jnp.float32), jnp.asarray(zt, jnp.float32), scale))
    assert abs(got - _numpy_contrastive_loss(zi, zt, scale)) < 1e-5
  # With orthonormal matches at scale log(100) the loss is close to zero; shuffled, it is large.
  eye = np.eye(4)
  assert float(clip.contrastive_loss(jnp.asarray(eye), jnp.asarray(eye), math.log(100.0))) < 1e-10
  assert float(clip.contrastive_loss(jnp.asarray(eye), jnp.asarray(eye[::-1]), math.log(100.0))) > 50


def _jitted(model, method):
  return jax.jit(lambda params, *args: model.apply({"params": params}, *args, method=method))


def test_text_tower_is_causal(tiny):
  model, params, _ = tiny
  encode = _jitted(model, clip.NoisedCLIP.encode_text)
  tokens = jnp.array([[1, 7, 8, 9, 2, 0, 0, 0, 0, 0, 0, 0]] * 2, jnp.int32)
  later = tokens.at[:, 5].set(33).at[:, 9].set(4)
  lens = jnp.array([3, 5])
  a = encode(params, tokens, lens)
  b = encode(params, later, lens)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # ... while a change at or before the pooled position does change it.
  earlier = tokens.at[:, 2].set(33)
  c = encode(params, earlier, lens)
  assert np.all(np.abs(np.asarray(c) - np.asarray(a)).max(-1) > 1e-4)
  # And the pooled position is really text_len - 1: features at 5 differ from those at 3.
  assert np.abs(np.asarray(a[0] - a[1])).max() > 1e-4
  # A causal tower gives the same features on a shorter context.
  d = encode(params, tokens[:, :6], lens)
  np.testing.assert_allclose(np.asarray(d), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_image_tower_uses_the_timestep(tiny):
  model, params, _ = tiny
  image = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  encode = _jitted(model, clip.NoisedCLIP.encode_image)
  z0 = encode(params, image, jnp.array([0, 0]))
  z1 = encode(params, image, jnp.array([0, 999]))
  np.testing.assert_array_equal(np.asarray(z0[0]), np.asarray(z1[0]))
  assert np.abs(np.asarray(z0[1] - z1[1])).max() > 1e-4


def test_guidance_grad_is_the_gradient_of_the_score(tiny):
  # Against a central finite difference of the score along a random direction.
  model, params, _ = tiny
  image = jax.random.uniform(jax.random.key(2), (2, 16, 16, 3), minval=-1, maxval=1)
  t = jnp.array([10, 500])
  z_text = jax.random.normal(jax.random.key(3), (2, TINY["n_embd"]))
  grad = jax.jit(lambda p, x: clip.guidance_grad(model, p, x, t, z_text))(params, image)
  assert grad.shape == image.shape
  direction = jax.random.normal(jax.random.key(4), image.shape)

  encode = _jitted(model, clip.NoisedCLIP.encode_image)

  def total(x):
    return float(jnp.sum(clip.clip_score(z_text, encode(params, x, t))))

  eps = 1e-2
  fd = (total(image + eps * direction) - total(image - eps * direction)) / (2 * eps)
  assert abs(float(jnp.sum(grad * direction)) - fd) < 2e-2 * max(1.0, abs(fd)), (float(jnp.sum(grad * direction)), fd)


def _closed_form_tower_params(width, blocks, n_embd, *, vocab=None, ctx=None, timesteps=None, n_patch=None, patch=None):
  block = (4 * width * width + 3 * width + 2 * width) + (8 * width * width + 5 * width + 2 * width)
  if vocab is not None:
    inputs = vocab * width + ctx * width
  else:
    inputs = timesteps * width + 3 * patch * patch * width + (1 + n_patch ** 2) * width + 2 * width
  return inputs + blocks * block + 2 * width + width * n_embd


@pytest.mark.parametrize("preset", ["clip", "clip-full"])
def test_parameter_counts(preset):
  options = clip.CLIP_PRESETS[preset]
  model = clip.create_clip_model(options)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1,), jnp.int32),
                            jnp.zeros((1, 77), jnp.int32), jnp.ones((1,), jnp.int32))["params"]
  image, text = clip.count_params(abstract["image"]), clip.count_params(abstract["text"])
  o = clip.resolve_clip_options(options)
  wi, wt = o["n_head_image"] * o["n_head_state_image"], o["n_head_text"] * o["n_head_state_text"]
  assert image == _closed_form_tower_params(wi, o["n_xf_blocks_image"], o["n_embd"], timesteps=1000, n_patch=16, patch=4)
  assert text == _closed_form_tower_params(wt, o["n_xf_blocks_text"], o["n_embd"], vocab=65536, ctx=77)
  if preset == "clip":  # docs/reference.md, section 3, counted on the PyTorch model
    assert (image, text) == (86_443_776, 71_679_488)
  else:  # the figures stated in docs/clip.md
    assert (image, text) == (304_411_648, 136_027_392)


def test_every_parameter_carries_vocabulary_names(tiny):
  _, _, boxed = tiny
  vocab = {line.split("'")[1] for line in LAYERS_DOC.splitlines() if line.strip().startswith("'")}
  assert {"embed", "mlp", "qkv", "vocab", "length", "timesteps", "norm", "kernel", "conv_in", "conv_out"} <= vocab
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), type(leaf)
    assert len(leaf.names) == leaf.value.ndim
    assert all(n is None or n in vocab for n in leaf.names), leaf.names
    assert any(n is not None for n in leaf.names), leaf.names


def test_options_shared_and_per_tower_names_agree():
  shared = clip.create_clip_model(dict(n_head=2, n_head_state=16, n_xf_blocks=3, n_timestep=10))
  per_tower = clip.create_clip_model(dict(n_head_text=2, n_head_image=2, n_head_state_text=16,
                                          n_head_state_image=16, n_xf_blocks_text=3, n_xf_blocks_image=3,
                                          n_timesteps=10))
  assert shared == per_tower and shared.text_width == 32 and shared.n_timestep == 10
  released = clip.create_clip_model({})
  assert (released.image_width, released.text_width, released.n_embd) == (768, 512, 512)
  assert math.isclose(released.logit_scale, math.log(100.0))
  with pytest.raises(ValueError, match="n_heads_text"):
    clip.create_clip_model({"n_heads_text": 8})
  with pytest.raises(ValueError, match="patch_size"):
    clip.create_clip_model({"image_size": 30, "patch_size": 4})


def test_bad_inputs_are_refused(tiny):
  model, params, _ = tiny
  with pytest.raises(ValueError, match="NHWC"):
    model.apply({"params": params}, jnp.zeros((1, 3, 16, 16)), jnp.zeros((1,), jnp.int32),
                method=clip.NoisedCLIP.encode_image)
  with pytest.raises(ValueError, match="max_text_len=12"):
    model.apply({"params": params}, jnp.zeros((1, 13), jnp.int32), jnp.ones((1,), jnp.int32),
                method=clip.NoisedCLIP.encode_text)


def test_remat_gives_the_same_gradient(tiny):
  model, params, _ = tiny
  remat_model = clip.create_clip_model(TINY, remat_policy="nothing_saveable")
  image = jax.random.uniform(jax.random.key(5), (2, 16, 16, 3), minval=-1, maxval=1)
  t = jnp.array([3, 700])
  z_text = jax.random.normal(jax.random.key(6), (2, TINY["n_embd"]))
  grads = [jax.jit(lambda p, x, m=m: clip.guidance_grad(m, p, x, t, z_text))(params, image)
           for m in (model, remat_model)]
  np.testing.assert_allclose(np.asarray(grads[1]), np.asarray(grads[0]), rtol=1e-5, atol=1e-6)


def test_sharded_by_logical_names_matches_one_device(tiny):
  from jax.sharding import Mesh, NamedSharding

  model, params, boxed = tiny
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"))
  rules = (("batch", "data"), ("qkv", "tensor"), ("mlp", "tensor"), ("timesteps", "tensor"),
           ("embed", None), ("act_length", None), ("act_embed", None))
  # Our own name -> mesh-axis lookup (flax's refuses the conv kernel's repeated 'kernel' name).
  table = dict(rules)

  def sharding_of(leaf):
    return NamedSharding(mesh, jax.sharding.PartitionSpec(*[table.get(n) for n in leaf.names]))

  specs = jax.tree_util.tree_map(sharding_of, boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  sharded = jax.device_put(params, specs)
  assert sharded["text"]["block_0"]["f_mlp"]["f_1"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
  tokens = jax.random.randint(jax.random.key(7), (4, 12), 0, 50)
  lens = jnp.array([2, 5, 12, 7])
  image = jax.random.uniform(jax.random.key(8), (4, 16, 16, 3), minval=-1, maxval=1)
  t = jnp.array([0, 1, 500, 999])

  def both(p, image, tokens):
    return model.apply({"params": p}, image, t, tokens, lens)

  expected = jax.jit(both)(params, image, tokens)
  batch = NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    got = jax.jit(both)(sharded, jax.device_put(image, batch), jax.device_put(tokens, batch))
  for a, b in zip(got, expected, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
