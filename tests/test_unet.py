"""The U-Net against the reference dumps, and its pieces against closed forms and PyTorch."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax.bundle import unflatten_params
from glide_jax.interop import glide_text2im as g
from glide_jax.models import layers, registry, unet

DUMPS = ["base", "upsample", "inpaint", "upsample_inpaint"]
BF16_TOLERANCE = 5e-2  # max|bf16 - ref| / max|ref| on a dump; measured 2.0e-2 (base), 2.3e-2 (upsample_inpaint)


def _load(reference_dir, name):
  with np.load(reference_dir / f"text2im_{name}.npz") as z:
    return {k: z[k] for k in z.files}


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("scan_layers", [False, True], ids=["per_layer", "scanned"])
@pytest.mark.parametrize("name", DUMPS)
def test_matches_reference_dump(reference_dir, name, scan_layers):
  data = _load(reference_dir, name)
  ours = g.run_model_dump(data, options={"scan_layers": scan_layers})
  expected = {"out"} | ({"xf_proj", "xf_out"} if name == "base" else set())
  assert expected <= {k[len("output/"):] for k in data if k.startswith("output/")}
  for key in expected:
    assert _rel(ours[key], data[f"output/{key}"]) < 1e-4, key


def test_bfloat16_compute_within_stated_tolerance(reference_dir):
  data = _load(reference_dir, "base")
  ours = g.run_model_dump(data, dtype=jnp.bfloat16)
  for key in ("out", "xf_proj", "xf_out"):
    err = _rel(ours[key], data[f"output/{key}"])
    assert err < BF16_TOLERANCE, (key, err)
  assert _rel(ours["out"], data["output/out"]) > 1e-4  # it really computed in bfloat16


# One resolution level keeps compiles short; dropout 0.5 is inert unless train=True.
SMALL = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1", attention_resolutions="8", num_head_channels=16,
             dropout=0.5, text_ctx=4, xf_width=32, xf_layers=1, xf_heads=2, n_vocab=40)


def _random_params(kind, options, seed=0):
  """Random values everywhere (fresh init zeroes the output convs, hiding every other path)."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, shape in g.expected_shapes(kind, options).items():
    noise = rng.standard_normal(shape)
    if path.endswith("/scale"):
      flat[path] = 1 + 0.2 * noise
    else:
      flat[path] = noise / math.sqrt(int(np.prod(shape[:-1])) if len(shape) > 1 else 25)
  return unflatten_params({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})


class Tiny:
  """A model, random params, inputs and ONE jitted forward (compiles are the slow part on CPU)."""

  def __init__(self, kind="text2im", **over):
    self.model = registry.create_model(kind, SMALL, **over)
    self.params = _random_params(kind, {**SMALL, **over})
    self.inputs = self.model.dummy_inputs(2, SMALL["image_size"])
    rng = np.random.default_rng(0)
    self.inputs.update(x=jnp.asarray(rng.standard_normal(self.inputs["x"].shape), jnp.float32),
                       timesteps=jnp.array([5, 700]),
                       tokens=jnp.asarray(rng.integers(0, SMALL["n_vocab"], (2, SMALL["text_ctx"])), jnp.int32),
                       mask=jnp.arange(SMALL["text_ctx"])[None] < jnp.array([[2], [4]]))
    self._fwd = jax.jit(lambda p, kw, rngs, train: self.model.apply({"params": p}, **kw, train=train, rngs=rngs),
                        static_argnums=3)

  def __call__(self, params=None, train=False, rngs=None, **kw):
    return self._fwd(self.params if params is None else params, kw or self.inputs, rngs, train)


@pytest.fixture(scope="module")
def tiny():
  return Tiny()


def test_fresh_init_zeroes_the_output_convs(tiny):
  params = nn.meta.unbox(jax.jit(tiny.model.init)(jax.random.key(1), **tiny.inputs)["params"])
  assert float(jnp.max(jnp.abs(tiny(params)))) == 0.0
  assert not np.any(np.asarray(params["input_blocks_1_0"]["out_layers_3"]["kernel"]))
  assert not np.any(np.asarray(params["input_blocks_1_1"]["proj_out"]["kernel"]))
  assert np.any(np.asarray(params["input_blocks_1_0"]["in_layers_2"]["kernel"]))
  # and the random params used below fit the initialised tree exactly
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(tiny.params)


def test_text_cond_skips_the_transformer_and_gives_the_same_output(tiny):
  inputs = tiny.inputs
  encode = jax.jit(lambda p, t, m: tiny.model.apply({"params": p}, t, m, method="encode_text"))
  cond = encode(tiny.params, inputs["tokens"], inputs["mask"])
  assert cond["xf_proj"].shape == (2, 4 * SMALL["num_channels"])
  assert cond["xf_out"].shape == (2, SMALL["text_ctx"], SMALL["xf_width"])
  a = tiny()
  kw = {k: w for k, w in inputs.items() if k not in ("tokens", "mask")}
  b = tiny(**kw, text_cond=cond)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  c = tiny(**kw, text_cond={**cond, "xf_out": cond["xf_out"] * 0.5})  # the text really matters
  assert _rel(c, a) > 1e-3


def test_dropout_only_in_training_and_only_from_the_dropout_rng(tiny):
  eval_out = tiny()
  np.testing.assert_array_equal(np.asarray(eval_out), np.asarray(tiny(train=False)))
  t1 = tiny(train=True, rngs={"dropout": jax.random.key(1)})
  t1b = tiny(train=True, rngs={"dropout": jax.random.key(1)})
  t2 = tiny(train=True, rngs={"dropout": jax.random.key(2)})
  np.testing.assert_array_equal(np.asarray(t1), np.asarray(t1b))
  assert _rel(t1, eval_out) > 1e-3 and _rel(t1, t2) > 1e-3
  with pytest.raises(Exception, match="dropout"):
    tiny.model.apply({"params": tiny.params}, **tiny.inputs, train=True)


def test_remat_policies_give_the_same_values_and_gradients(tiny):
  def grads(policy):
    m = registry.create_model("text2im", SMALL, remat_policy=policy)
    return jax.jit(jax.value_and_grad(lambda p: jnp.mean(m.apply({"params": p}, **tiny.inputs) ** 2)))(tiny.params)

  l0, g0 = grads("none")
  for policy in ("full", "dots_saveable"):
    l1, g1 = grads(policy)
    np.testing.assert_allclose(float(l0), float(l1), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="remat_policy"):
    jax.eval_shape(registry.create_model("text2im", SMALL, remat_policy="sometimes").init, jax.random.key(0),
                   **tiny.inputs)


def test_inpaint_defaults_are_zero_image_and_mask():
  t = Tiny("inpaint")
  zeros = dict(t.inputs, inpaint_image=jnp.zeros_like(t.inputs["x"]),
               inpaint_mask=jnp.zeros_like(t.inputs["x"][..., :1]))
  none = {k: w for k, w in t.inputs.items() if not k.startswith("inpaint")}
  np.testing.assert_array_equal(np.asarray(t(**zeros)), np.asarray(t(**none)))


def test_input_pos_emb_is_an_addition_after_the_input_conv(tiny):
  """Closed form: a per-channel constant embedding equals that constant added to the input conv's
  bias, and a zero embedding is the reference network; a varying one changes the output."""
  model = registry.create_model("text2im", SMALL, input_pos_emb=True)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), **tiny.inputs)["params"]))
  size, ch = SMALL["image_size"], SMALL["num_channels"]
  assert shapes["input_pos_emb"].shape == (size, size, ch)
  assert set(shapes) - set(tiny.params) == {"input_pos_emb"}
  fwd = jax.jit(lambda p: model.apply({"params": p}, **tiny.inputs))
  ref = tiny()
  zero = fwd({**tiny.params, "input_pos_emb": jnp.zeros((size, size, ch))})
  np.testing.assert_allclose(np.asarray(zero), np.asarray(ref), rtol=1e-6, atol=1e-6)
  c = jnp.linspace(-0.5, 0.5, ch)
  const = fwd({**tiny.params, "input_pos_emb": jnp.broadcast_to(c, (size, size, ch))})
  conv = tiny.params["input_blocks_0_0"]
  moved = tiny({**tiny.params, "input_blocks_0_0": {**conv, "bias": conv["bias"] + c}})
  np.testing.assert_allclose(np.asarray(const), np.asarray(moved), rtol=1e-5, atol=1e-5)
  varying = jax.random.normal(jax.random.key(3), (size, size, ch))
  assert _rel(fwd({**tiny.params, "input_pos_emb": varying}), ref) > 1e-3


def test_input_pos_emb_starts_as_a_2d_sin_cos_code():
  size, ch = 12, 16
  e = np.asarray(unet.sincos_2d_init(jax.random.key(0), (size, size, ch)))
  n = ch // 4
  col = (np.arange(size) + 0.5) / size
  # The lowest frequency is one half-period across the canvas: cos falls monotonically from left
  # to right (and sin is symmetric), constant along the other axis; the y block is the transpose.
  np.testing.assert_allclose(e[0, :, n], np.cos(np.pi * col), atol=1e-6)
  np.testing.assert_allclose(e[:, 0, 3 * n], np.cos(np.pi * col), atol=1e-6)
  np.testing.assert_allclose(e[:, 3, 0], np.full(size, np.sin(np.pi * col[3])), atol=1e-6)
  np.testing.assert_allclose(e[..., 2 * n:], np.transpose(e[..., :2 * n], (1, 0, 2)), atol=1e-6)
  # the highest frequency is the Nyquist rate: half a period per pixel pair
  np.testing.assert_allclose(e[0, :, 2 * n - 1], np.cos(np.pi * col * size / 2), atol=1e-5)
  codes = e.reshape(-1, ch)
  dist = np.sum((codes[:, None] - codes[None]) ** 2, -1) + np.eye(size * size) * 1e9
  assert dist.min() > 0.1  # every pixel gets its own code
  with pytest.raises(ValueError, match="divisible by 4"):
    unet.sincos_2d_init(None, (4, 4, 6))


def test_every_parameter_has_logical_axis_names():
  vocabulary = {"vocab", "embed", "mlp", "qkv", "kv", "length", "conv_in", "conv_out", "kernel", "norm",
                "time_embed", "timesteps", None}
  model = registry.create_model("upsample_inpaint", SMALL, input_pos_emb=True)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), **model.dummy_inputs(1, 8)))["params"]
  specs = nn.get_partition_spec(boxed)
  shapes = nn.meta.unbox(boxed)
  for spec, shape in zip(jax.tree_util.tree_leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)),
                         jax.tree_util.tree_leaves(shapes)):
    assert isinstance(spec, jax.sharding.PartitionSpec) and len(spec) == len(shape.shape), (spec, shape)
    assert set(spec) <= vocabulary, spec


# ------------------------------------------------------------------------------- pieces vs truth

def test_timestep_embedding_is_cos_first():
  t = np.array([0, 1, 17, 999])
  for dim in (8, 9):
    half = dim // 2
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    want = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], -1)
    got = np.asarray(unet.timestep_embedding(jnp.asarray(t), dim))
    np.testing.assert_allclose(got[:, : 2 * half], want, rtol=1e-5, atol=2e-4)
    if dim % 2:
      assert np.all(got[:, -1] == 0)


@pytest.mark.parametrize("src,dst", [((8, 8), (32, 32)), ((4, 4), (16, 16)), ((5, 7), (13, 9)), ((6, 6), (6, 6)),
                                     ((9, 10), (4, 3))])
def test_bilinear_upsampling_matches_torch(src, dst):
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).standard_normal((2, 3) + src).astype(np.float32)
  want = torch.nn.functional.interpolate(torch.from_numpy(x), dst, mode="bilinear", align_corners=False).numpy()
  got = np.asarray(layers.resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), *dst)).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_nearest_upsample_and_average_pool_match_torch():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(1).standard_normal((2, 4, 6, 8)).astype(np.float32)
  up = torch.nn.functional.interpolate(torch.from_numpy(x), scale_factor=2, mode="nearest").numpy()
  down = torch.nn.functional.avg_pool2d(torch.from_numpy(x), 2).numpy()
  nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(np.asarray(unet.upsample_nearest(nhwc)).transpose(0, 3, 1, 2), up)
  np.testing.assert_allclose(np.asarray(unet.avg_pool2(nhwc)).transpose(0, 3, 1, 2), down, rtol=1e-6, atol=1e-7)


def test_layout_of_the_released_models():
  """docs/reference.md, section 2: base 22 attention blocks at 32/16/8 px with 6/9/12 heads; upsampler 16."""
  for kind, n_attn, n_in in (("text2im", 22, 16), ("upsample", 16, 18)):
    m = registry.create_model(kind)
    lay = m.layout()
    blocks = lay["input_blocks"] + lay["middle_block"] + lay["output_blocks"]
    attn = [layer for b in blocks for layer in b if layer.type == "attn"]
    assert len(attn) == n_attn and len(lay["input_blocks"]) == n_in
    assert len(lay["output_blocks"]) == n_in
    if kind == "text2im":
      assert sorted({a.heads for a in attn}) == [6, 9, 12]
