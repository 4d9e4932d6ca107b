"""CLIP score of samples with a tiny random noised CLIP, against a direct computation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax.data.tokenizers import Tokenizer
from glide_jax.eval import clip_score as cs
from glide_jax.models import clip as clip_mod

TINY = {"image_size": 16, "patch_size": 4, "n_vocab": 40, "max_text_len": 12, "n_embd": 16, "n_timesteps": 1000,
            "n_head_text": 2, "n_head_state_text": 8, "n_xf_blocks_text": 1,
            "n_head_image": 2, "n_head_state_image": 8, "n_xf_blocks_image": 1}


class WordTokenizer(Tokenizer):
  """Word-level ids from a fixed list (1 = unknown, 0 = pad): enough for a contract test."""
  kind = "test_words"

  def __init__(self, words, text_ctx=16):
    super().__init__(text_ctx, 2 + len(words), 0)
    self.ids = {w: i + 2 for i, w in enumerate(words)}

  def encode_ids(self, texts):
    return [[self.ids.get(w, 1) for w in t.replace(",", " ").replace(":", " ").split()] for t in texts]


@pytest.fixture(scope="module")
def tiny_clip():
  model = clip_mod.create_clip_model(TINY, jnp.float32)
  from flax.linen import meta
  # Shapes by tracing, values drawn here: cheaper than compiling init, and no zero-initialised layers.
  shapes = meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)),
                                     jnp.zeros((1,), jnp.int32), jnp.zeros((1, 12), jnp.int32),
                                     jnp.ones((1,), jnp.int32))["params"])
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda s: (rng.normal(size=s.shape) / np.sqrt(s.shape[0] if len(s.shape) > 1 else 25)).astype(np.float32),
      shapes)
  words = ["a", "small", "large", "red", "yellow", "green", "cyan", "blue", "purple", "circle", "square", "triangle", "on", "the", "left", "right", "at", "top", "bottom", "in", "center"]
  return cs.ClipBundle(model, params, WordTokenizer(words), source="tiny-random")


def test_clip_score_matches_direct_computation(tiny_clip):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)  # resized to 16 inside
  captions = ["a small red circle on the left", "a blue square, large, at the top",
              "in the center: a large green triangle", "a small cyan circle at the bottom",
              "a purple triangle, small, on the right"]
  out = cs.clip_score_of_samples(tiny_clip, images, captions, batch_size=2)
  # Direct: the model's own encoders, numpy cosine, times exp(logit_scale) = 100.
  model, variables = tiny_clip.model, {"params": tiny_clip.params}
  x = jax.image.resize(jnp.asarray(images, jnp.float32) / 127.5 - 1, (5, 16, 16, 3), "bilinear")
  zi = np.asarray(jax.jit(lambda v, x: model.apply(v, x, jnp.zeros((5,), jnp.int32), method="encode_image"))(
      variables, x), np.float64)
  tokens, mask = tiny_clip.tokenizer.encode_batch(captions)
  zt = np.asarray(jax.jit(lambda v, t, n: model.apply(v, t, n, method="encode_text"))(
      variables, jnp.asarray(tokens[:, :12]), jnp.asarray(mask.sum(-1))), np.float64)
  cos = np.sum(zi * zt, -1) / np.linalg.norm(zi, axis=-1) / np.linalg.norm(zt, axis=-1)
  np.testing.assert_allclose(out["per_sample"], 100.0 * cos, rtol=1e-4, atol=1e-3)
  assert out["mean"] == pytest.approx(100.0 * cos.mean(), abs=1e-3)
  assert out["std"] == pytest.approx(100.0 * cos.std(), abs=1e-3)
  assert out["n"] == 5 and out["timestep"] == 0 and out["multiplier"] == pytest.approx(100.0)
  assert "100 x cosine" in out["scale"] and "100 x cosine" in cs.format_clip_score(out)
  # The (model, params) form with a tokenizer gives the same numbers.
  pair = cs.clip_score_of_samples((tiny_clip.model, tiny_clip.params), images, captions,
                                  tokenizer=tiny_clip.tokenizer, batch_size=2)
  np.testing.assert_allclose(pair["per_sample"], out["per_sample"], rtol=1e-6)
  # Also the library's own clip_score on the same encodings (a second route to the same number).
  np.testing.assert_allclose(np.asarray(clip_mod.clip_score(jnp.asarray(zt), jnp.asarray(zi))),
                             out["per_sample"], rtol=1e-4, atol=1e-3)


def test_clip_score_errors(tiny_clip):
  images = np.zeros((2, 16, 16, 3), np.uint8)
  with pytest.raises(ValueError, match="2 images but 1 captions"):
    cs.clip_score_of_samples(tiny_clip, images, ["a red circle"])
  long = " ".join(["red"] * 14)
  with pytest.raises(ValueError, match="tokenizer= given"):
    cs.clip_score_of_samples((tiny_clip.model, tiny_clip.params), images, ["a", "b"])
  with pytest.raises(ValueError, match="max_text_len=12"):
    cs.clip_score_of_samples(tiny_clip, images, [long, long])


@pytest.mark.parametrize("bundle_scanned", [False, True], ids=["per_layer_bundle", "scanned_bundle"])
def test_clip_bundles_load_in_the_layout_of_their_model(tiny_clip, tmp_path, bundle_scanned):
  """A bundle written per layer (as the exporters write) whose options say scan_layers, or the
  reverse: clip_score.load_clip_bundle and `sample --clip-bundle` convert the params to the model's
  layout and give the per-layer model's embeddings."""
  from glide_jax import bundle
  from glide_jax.commands import sample
  from glide_jax.models import layout

  stored = layout.to_layout(tiny_clip.params, bundle_scanned)
  words = sorted(tiny_clip.tokenizer.ids)
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(words) + "\n")
  path = bundle.save_bundle(tmp_path / "clip", {"params": stored}, {
      "model": {"kind": "noised_clip", "options": {**TINY, "scan_layers": not bundle_scanned}},
      "tokenizer": {"type": "words", "text_ctx": 12}}, tokenizer_files={"vocab": vocab})
  loaded = cs.load_clip_bundle(path)
  assert loaded.model.scan_layers == (not bundle_scanned)
  assert layout.is_scanned(loaded.params) == (not bundle_scanned)
  captions = ["a small red circle on the left", "a large blue square"]
  tokens, mask = loaded.tokenizer.encode_batch(captions)
  expected = tiny_clip.model.apply({"params": tiny_clip.params}, jnp.asarray(tokens),
                                   jnp.asarray(mask.sum(-1), jnp.int32), method="encode_text")
  model, params, z_text = sample._load_clip(str(path), captions)
  assert model.scan_layers == (not bundle_scanned) and layout.is_scanned(params) == (not bundle_scanned)
  np.testing.assert_allclose(np.asarray(z_text), np.asarray(expected), rtol=1e-5, atol=1e-6)
  images = np.random.default_rng(1).integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
  got = cs.clip_score_of_samples(loaded, images, captions)["per_sample"]
  want = cs.clip_score_of_samples(cs.ClipBundle(tiny_clip.model, tiny_clip.params, loaded.tokenizer),
                                  images, captions)["per_sample"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
