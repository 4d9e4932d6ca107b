"""GLIDE's text transformer: a numpy re-implementation, and the reference's quirks (docs/pitfalls.md, 4 and 5)."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax.models import registry
from glide_jax.models.text_encoder import TextEncoder

CTX, WIDTH, HEADS, VOCAB = 8, 32, 4, 30


@functools.cache
def _encoder():
  """One encoder, random params and ONE jitted forward shared by the tests (compiles are slow)."""
  enc = TextEncoder(n_vocab=VOCAB, text_ctx=CTX, width=WIDTH, layers=2, heads=HEADS)
  tokens = jnp.zeros((1, CTX), jnp.int32)
  params = nn.meta.unbox(jax.jit(enc.init)(jax.random.key(0), tokens, tokens > 0)["params"])
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda p: jnp.asarray(p + 0.3 * rng.standard_normal(p.shape), jnp.float32), params)
  return enc, params, jax.jit(lambda p, t, m: enc.apply({"params": p}, t, m))


def _layer_norm(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def _numpy_encoder(params, tokens, mask, final_ln=True):
  """Written from docs/reference.md, section 1, with plain numpy, float64."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  x = p["token_embedding"]["embedding"][tokens] + p["positional_embedding"][None]
  x = np.where(mask[..., None], x, p["padding_embedding"][None])
  b, n, w = x.shape
  ch = w // HEADS
  for i in range(2):
    blk = p[f"resblocks_{i}"]
    h = _layer_norm(x, blk["ln_1"])
    qkv = h @ blk["attn"]["c_qkv"]["kernel"] + blk["attn"]["c_qkv"]["bias"]
    qkv = qkv.reshape(b, n, HEADS, 3 * ch)
    q, k, v = qkv[..., :ch], qkv[..., ch:2 * ch], qkv[..., 2 * ch:]
    logits = np.einsum("bthc,bshc->bhts", q, k) / math.sqrt(ch)
    att = np.exp(logits - logits.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    a = np.einsum("bhts,bshc->bthc", att, v).reshape(b, n, w)
    x = x + a @ blk["attn"]["c_proj"]["kernel"] + blk["attn"]["c_proj"]["bias"]
    h = _layer_norm(x, blk["ln_2"])
    h = h @ blk["mlp"]["c_fc"]["kernel"] + blk["mlp"]["c_fc"]["bias"]
    h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
    x = x + h @ blk["mlp"]["c_proj"]["kernel"] + blk["mlp"]["c_proj"]["bias"]
  return _layer_norm(x, p["final_ln"]) if final_ln else x


def test_matches_numpy_reimplementation():
  _, params, run = _encoder()
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, VOCAB, (3, CTX))
  mask = np.arange(CTX)[None] < np.array([[2], [CTX], [0]])
  got = np.asarray(run(params, jnp.asarray(tokens), jnp.asarray(mask)))
  want = _numpy_encoder(params, tokens, mask)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_empty_prompt_is_finite_and_attends_to_padding():
  _, params, run = _encoder()
  tokens = jnp.full((2, CTX), VOCAB - 1, jnp.int32)
  empty = jnp.zeros((2, CTX), bool)
  out = np.asarray(run(params, tokens, empty))
  assert np.all(np.isfinite(out))
  # With the whole sequence padded, the token ids do not matter at all.
  other = np.asarray(run(params, jnp.zeros_like(tokens), empty))
  np.testing.assert_array_equal(out, other)


def test_padding_replaces_the_whole_vector_and_is_not_masked():
  _, params, run = _encoder()
  rng = np.random.default_rng(2)
  tokens = jnp.asarray(rng.integers(0, VOCAB, (1, CTX)), jnp.int32)
  mask = jnp.arange(CTX)[None] < 3
  base = np.asarray(run(params, tokens, mask))
  # token ids at padded positions are ignored (token + position replaced by padding_embedding[i])
  changed = tokens.at[0, 5].set((int(tokens[0, 5]) + 1) % VOCAB)
  np.testing.assert_array_equal(base, np.asarray(run(params, changed, mask)))
  # ...but the padding vectors are attended to: changing one moves the real positions too (no mask)
  p2 = jax.tree_util.tree_map(lambda a: a, params)
  p2["padding_embedding"] = params["padding_embedding"].at[6].add(jnp.linspace(-1.0, 1.0, WIDTH))  # not constant: LN removes that
  moved = np.asarray(run(p2, tokens, mask))
  assert np.max(np.abs(moved[0, :3] - base[0, :3])) > 1e-3


def test_pooled_vector_is_the_last_position_not_the_last_real_token():
  options = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
                 text_ctx=CTX, xf_width=WIDTH, xf_layers=1, xf_heads=HEADS, n_vocab=VOCAB)
  model = registry.create_model("text2im", options)
  inputs = model.dummy_inputs(1, 16)
  params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), **inputs)["params"])
  rng = np.random.default_rng(3)
  params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.3, jnp.float32), params)
  tokens = jnp.asarray(rng.integers(0, VOCAB, (1, CTX)), jnp.int32)
  mask = jnp.arange(CTX)[None] < 3
  cond = jax.jit(lambda p, t, m: model.apply({"params": p}, t, m, method="encode_text"))(params, tokens, mask)
  proj = params["transformer_proj"]
  xf_out = np.asarray(cond["xf_out"])
  want = xf_out[:, -1] @ np.asarray(proj["kernel"]) + np.asarray(proj["bias"])
  np.testing.assert_allclose(np.asarray(cond["xf_proj"]), want, rtol=1e-5, atol=1e-5)
  not_this = xf_out[:, 2] @ np.asarray(proj["kernel"]) + np.asarray(proj["bias"])
  assert np.max(np.abs(not_this - want)) > 1e-2


def test_bad_inputs_are_refused():
  enc, params, _ = _encoder()
  with pytest.raises(ValueError, match="tokens must be"):
    enc.apply({"params": params}, jnp.zeros((1, CTX + 1), jnp.int32), jnp.ones((1, CTX + 1), bool))
  with pytest.raises(ValueError, match="mask"):
    enc.apply({"params": params}, jnp.zeros((1, CTX), jnp.int32), None)


def test_token_init_std_sets_only_the_token_embedding_init():
  """CLIP's 0.02 by default; the text2im option reaches it through the registry; nothing else moves."""
  tokens = jnp.zeros((1, CTX), jnp.int32)

  def init(std):
    enc = TextEncoder(n_vocab=500, text_ctx=CTX, width=WIDTH, layers=1, heads=HEADS, token_init_std=std)
    return nn.meta.unbox(enc.init(jax.random.key(0), tokens, tokens > 0)["params"])

  small, big = init(0.02), init(1.0)
  assert np.std(small["token_embedding"]["embedding"]) == pytest.approx(0.02, rel=0.05)
  assert np.std(big["token_embedding"]["embedding"]) == pytest.approx(1.0, rel=0.05)
  np.testing.assert_array_equal(small["positional_embedding"], big["positional_embedding"])
  assert registry.resolve_options("text2im", {})["xf_token_init_std"] == 0.02
  model = registry.create_model("text2im", {"image_size": 32, "num_channels": 32, "channel_mult": "1,2",
                                            "num_res_blocks": 1, "attention_resolutions": "16", "text_ctx": CTX,
                                            "xf_width": WIDTH, "xf_layers": 1, "xf_heads": HEADS,
                                            "n_vocab": 500, "xf_token_init_std": 1.0})
  assert model.xf_token_init_std == 1.0
