"""layers.attention (the CPU default's einsum and jax.nn.dot_product_attention) against a float64
einsum-softmax, the 'xla' path against the reference dumps, and the `attention_impl` model option."""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax.models import layers, registry

TINY = {"image_size": 16, "num_channels": 32, "channel_mult": "1,2", "num_res_blocks": 1,
        "attention_resolutions": "8", "num_head_channels": 16, "xf_width": 32, "xf_layers": 1,
        "xf_heads": 2, "text_ctx": 8, "dropout": 0.0}


def _reference(q, k, v, mask=None):
  """GLIDE's QKVAttention by hand in float64 from the (possibly bf16-rounded) inputs; the softmax
  weights rounded to v's dtype before weights.v, as the reference does."""
  q, k, v64 = (np.asarray(t, np.float64) for t in (q, k, v))
  scale = q.shape[-1] ** -0.25
  logits = np.einsum("bqhd,bkhd->bhqk", q * scale, k * scale)
  if mask is not None:
    logits = np.where(np.asarray(mask), logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True)
  w = np.asarray(jnp.asarray(w, jnp.float32).astype(v.dtype), np.float64)
  return np.einsum("bhqk,bkhd->bqhd", w, v64)


def _inputs(dtype, seed=0, b=2, lq=24, lk=31, h=3, d=64, spread=3.0):
  # spread 3: logits of std ~9, where a bf16 softmax (spacing 0.125 at 30) would be visibly wrong.
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal(s) * spread, jnp.float32).astype(dtype)
             for s in ((b, lq, h, d), (b, lk, h, d), (b, lk, h, d)))
  return q, k, v


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


IMPLS = [None, "xla"]  # None on the CPU: our einsum; 'xla': jax.nn.dot_product_attention


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_kind", ["none", "causal", "padding"])
def test_float32_matches_the_einsum_softmax(mask_kind, impl):
  q, k, v = _inputs(jnp.float32)
  lq, lk = q.shape[1], k.shape[1]
  mask = {"none": None,
          "causal": jnp.tril(jnp.ones((lq, lk), bool), k=lk - lq)[None, None],
          "padding": (jnp.arange(lk)[None, :] < jnp.array([[lk], [11]]))[:, None, None, :]}[mask_kind]
  got = jax.jit(lambda q, k, v: layers.attention(q, k, v, mask=mask, implementation=impl))(q, k, v)
  assert got.dtype == jnp.float32 and got.shape == q.shape
  assert _rel(got, _reference(q, k, v, mask)) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_logits_and_softmax_in_float32(impl):
  q, k, v = _inputs(jnp.bfloat16)
  mask = (jnp.arange(k.shape[1]) < 20)[None, None, None, :]
  got = jax.jit(lambda q, k, v: layers.attention(q, k, v, mask=mask, implementation=impl))(q, k, v)
  assert got.dtype == jnp.bfloat16
  # Only the output's bf16 rounding (2**-8 relative) and the bf16 weights remain.
  assert _rel(got, _reference(q, k, v, mask)) < 1e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_match_the_einsum_softmax(impl):
  q, k, v = _inputs(jnp.float32, seed=1, spread=1.0)
  probe = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)

  def by_hand(q, k, v):
    s = q.shape[-1] ** -0.25
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q * s, k * s), axis=-1)
    return jnp.sum(jnp.einsum("bhqk,bkhd->bqhd", w, v) * probe)

  ours = jax.jit(jax.grad(lambda *a: jnp.sum(layers.attention(*a, implementation=impl) * probe),
                          argnums=(0, 1, 2)))(q, k, v)
  theirs = jax.jit(jax.grad(by_hand, argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(ours, theirs):
    assert _rel(a, np.asarray(b, np.float64)) < 1e-5


def test_cudnn_off_a_gpu_falls_back_to_the_default_with_a_warning():
  assert jax.default_backend() != "gpu"
  q, k, v = _inputs(jnp.bfloat16)
  with pytest.warns(RuntimeWarning, match="attention_impl='cudnn' needs a GPU"):
    got = layers.attention(q, k, v, implementation="cudnn")
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(layers.attention(q, k, v), np.float32))
  with pytest.raises(ValueError, match="choose from"):
    layers.attention(q, k, v, implementation="splash")


def test_flash_off_a_tpu_falls_back_to_the_default_with_a_warning():
  q, k, v = _inputs(jnp.float32)
  with pytest.warns(RuntimeWarning, match="attention_impl='flash' needs a TPU"):
    got = layers.attention(q, k, v, implementation="flash")
  np.testing.assert_array_equal(np.asarray(got), np.asarray(layers.attention(q, k, v)))


def _on_tpu_interpreted():
  """Traces as for a TPU (layers.target_platform) and runs Pallas's TPU kernels in its interpreter,
  so the flash path's real kernel code runs on this CPU."""
  import contextlib

  from jax.experimental.pallas import tpu as pltpu
  stack = contextlib.ExitStack()
  stack.enter_context(layers.target_platform("tpu"))
  stack.enter_context(pltpu.force_tpu_interpret_mode())
  return stack


# (lq, lk): both padded (queries to their block, keys to 128 with segment ids); keys already 128;
# the U-Net's 8 px attention with text keys (64 image + 24 text tokens).
FLASH_SHAPES = [(24, 31), (64, 128), (64, 88), (136, 140)]


@pytest.mark.parametrize("lq,lk", FLASH_SHAPES)
def test_flash_matches_the_einsum_softmax(lq, lk):
  q, k, v = _inputs(jnp.float32, lq=lq, lk=lk, h=2, d=32)
  with _on_tpu_interpreted():
    got = layers.attention(q, k, v, implementation="flash")
  assert got.dtype == jnp.float32 and got.shape == q.shape
  assert _rel(got, _reference(q, k, v)) < 1e-5


def test_flash_bfloat16():
  q, k, v = _inputs(jnp.bfloat16, h=2, d=32)
  with _on_tpu_interpreted():
    got = layers.attention(q, k, v, implementation="flash")
  assert got.dtype == jnp.bfloat16
  assert _rel(got, _reference(q, k, v)) < 1e-2


@pytest.mark.parametrize("lq,lk", FLASH_SHAPES[:2])
def test_flash_gradients_match_the_einsum_softmax(lq, lk):
  q, k, v = _inputs(jnp.float32, seed=1, spread=1.0, lq=lq, lk=lk, h=2, d=32)
  probe = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)

  def loss(impl):
    return lambda *a: jnp.sum(layers.attention(*a, implementation=impl) * probe)

  with _on_tpu_interpreted():
    ours = jax.grad(loss("flash"), argnums=(0, 1, 2))(q, k, v)
  theirs = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(ours, theirs):
    assert _rel(a, np.asarray(b, np.float64)) < 1e-5


def test_flash_runs_per_batch_shard_under_a_mesh():
  """Under a mesh the kernel runs inside shard_map over the batch axes; same result as unsharded."""
  import flax.linen as nn
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  devices = np.array(jax.devices()[:4]).reshape(2, 2)
  mesh = jax.sharding.Mesh(devices, ("data", "fsdp"))
  q, k, v = _inputs(jnp.float32, b=8, lq=24, lk=40, h=2, d=32)
  with _on_tpu_interpreted():
    whole = layers.attention(q, k, v, implementation="flash")
    with jax.set_mesh(mesh), nn.logical_axis_rules((("batch", ("data", "fsdp")),)):
      sharded = [jax.device_put(a, NamedSharding(mesh, P(("data", "fsdp")))) for a in (q, k, v)]
      lowered = jax.jit(lambda *a: layers.attention(*a, implementation="flash")).lower(*sharded)
      assert "shard_map" in lowered.as_text() or "manual" in lowered.as_text()
      got = lowered.compile()(*sharded)
  np.testing.assert_allclose(np.asarray(got), np.asarray(whole), rtol=1e-6, atol=1e-6)


def test_flash_with_a_mask_is_xlas_attention():
  q, k, v = _inputs(jnp.float32)
  mask = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool), k=k.shape[1] - q.shape[1])[None, None]
  with _on_tpu_interpreted():
    got = layers.attention(q, k, v, mask=mask, implementation="flash")
  np.testing.assert_array_equal(np.asarray(got), np.asarray(layers.attention(q, k, v, mask=mask,
                                                                             implementation="xla")))


@pytest.mark.parametrize("impl", ["xla", "flash"])
@pytest.mark.parametrize("dump", ["text2im_base.npz", "noised_clip.npz"])
def test_xla_and_flash_paths_match_the_reference_dumps(reference_dir, monkeypatch, dump, impl):
  """The dump parity (tests/test_unet.py, test_clip.py) runs the CPU default; this runs every
  attention of the U-Net, the text encoder and the noised CLIP through jax.nn.dot_product_attention
  ('xla'), or through the TPU flash kernel in Pallas's interpreter (CLIP's masked text tower: XLA's)."""
  import contextlib

  from glide_jax.interop.glide_text2im import check_dump
  real = layers.attention
  monkeypatch.setattr(layers, "attention", lambda q, k, v, *, mask=None, implementation=None:
                      real(q, k, v, mask=mask, implementation=implementation or impl))
  with _on_tpu_interpreted() if impl == "flash" else contextlib.nullcontext():
    errors = check_dump(reference_dir / dump)
  assert errors and max(errors.values()) < 1e-5, errors  # the parity tolerance is 1e-4


def _recording(monkeypatch):
  """Replaces layers.attention by a recorder of (Lq, Lk, masked, implementation) per traced call."""
  seen = []
  real = layers.attention

  def recording(q, k, v, *, mask=None, implementation=None):
    seen.append((q.shape[1], k.shape[1], mask is not None, implementation))
    return real(q, k, v, mask=mask, implementation=implementation)

  monkeypatch.setattr(layers, "attention", recording)
  return seen


def _trace(fn, *args, **kwargs):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # cudnn on the CPU: the default, as tested above
    jax.eval_shape(fn, *args, **kwargs)  # traces the forward once


@pytest.mark.parametrize("scan_layers", [False, True], ids=["per_layer", "scanned"])
def test_attention_impl_option_reaches_every_unet_and_text_encoder_attention(monkeypatch, scan_layers):
  seen = _recording(monkeypatch)
  for impl in (None, "xla", "cudnn", "flash"):
    model = registry.create_model("text2im", {**TINY, "xf_layers": 2, "attention_impl": impl,
                                              "scan_layers": scan_layers})
    _trace(model.init, jax.random.key(0), **model.dummy_inputs(2, 16))
    unet = [c for c in seen if c[1] > c[0]]  # the U-Net's: text keys prepended to the image's
    text = [c for c in seen if c[:2] == (TINY["text_ctx"],) * 2]  # the text encoder's self-attention
    assert len(unet) == 4 and text and len(unet) + len(text) == len(seen), seen  # 4 attention blocks
    assert {c[3] for c in seen} == {impl}, (impl, seen)
    seen.clear()
  assert registry.create_model("text2im", {**TINY, "attention_impl": ""}).attention_impl is None
  with pytest.raises(ValueError, match="unknown attention_impl"):
    registry.create_model("text2im", {**TINY, "attention_impl": "splash"})


@pytest.mark.parametrize("scan_layers", [False, True], ids=["per_layer", "scanned"])
def test_attention_impl_option_reaches_both_clip_towers(monkeypatch, scan_layers):
  from glide_jax.models import clip
  seen = _recording(monkeypatch)
  options = dict(n_embd=24, n_head=2, n_head_state=16, n_xf_blocks=2, image_size=16, patch_size=4,
                 max_text_len=12, n_vocab=50, scan_layers=scan_layers)
  for impl in (None, "xla", "cudnn", "flash"):
    model = clip.create_clip_model({**options, "attention_impl": impl})
    _trace(model.init, jax.random.key(0), jnp.zeros((2, 16, 16, 3)), jnp.zeros((2,), jnp.int32),
           jnp.zeros((2, 12), jnp.int32), jnp.ones((2,), jnp.int32))
    image = [c for c in seen if c[:3] == (17, 17, False)]  # the class token and 4x4 patches, no mask
    text = [c for c in seen if c[:3] == (12, 12, True)]  # causal
    assert image and text and len(image) + len(text) == len(seen), seen
    assert {c[3] for c in seen} == {impl}, (impl, seen)
    seen.clear()
  assert clip.resolve_clip_options({"attention_impl": ""})["attention_impl"] is None
  with pytest.raises(ValueError, match="unknown attention_impl"):
    clip.create_clip_model({**options, "attention_impl": "splash"})


@pytest.mark.parametrize("spec", ["configs/base.py:variant=tiny", "configs/clip.py:variant=tiny"])
def test_attention_impl_is_a_config_option(spec):
  from glide_jax import config_lib
  assert config_lib.load_config(spec).model.options.attention_impl is None
  config = config_lib.load_config(spec, ["--config.model.options.attention_impl=cudnn"])
  assert config.model.options.attention_impl == "cudnn"
  model = registry.create_model(config.model.kind, dict(config.model.options))
  assert model.attention_impl == "cudnn"
