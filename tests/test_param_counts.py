"""Parameter counts of the released and the paper's full-size models, without allocating them."""
import numpy as np
import pytest

from glide_jax.models import registry

# docs/reference.md, section 2 (counted on the PyTorch reference models).
RELEASED = {"base": 385_030_726, "upsample": 398_361_286, "base-inpaint": 385_037_638,
            "upsample-inpaint": 398_368_198}
# Ours, documented in docs/models.md; the paper says "3.5B" and "1.5B" ([P] 4.1).
FULL = {"base-full": (3_554_414_086, 3.4e9, 3.6e9), "upsample-full": (1_540_932_998, 1.45e9, 1.6e9)}


def _counts(name):
  kind, options = registry.preset(name)
  flat = flatten_params_shapes(registry.param_shapes(kind, options))
  return kind, registry.resolve_options(kind, options), flat


def flatten_params_shapes(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    path = f"{prefix}/{k}" if prefix else k
    out.update(flatten_params_shapes(v, path) if isinstance(v, dict) else {path: int(np.prod(v.shape))})
  return out


def _text_formula(o):
  """Token + positional + padding embeddings, 12 w^2 + 13 w per block, final LN, transformer_proj."""
  w, c4 = o["xf_width"], 4 * o["num_channels"]
  return (o["n_vocab"] * w + 2 * o["text_ctx"] * w + o["xf_layers"] * (12 * w * w + 13 * w) + 2 * w
          + w * c4 + c4)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_counts(name):
  _, o, flat = _counts(name)
  assert sum(flat.values()) == RELEASED[name]
  text = sum(n for p, n in flat.items() if p.startswith(("text_encoder/", "transformer_proj/")))
  assert text == _text_formula(o) == 76_301_824 + 393_984


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_counts(name):
  _, o, flat = _counts(name)
  exact, low, high = FULL[name]
  total = sum(flat.values())
  assert low < total < high and total == exact
  text = sum(n for p, n in flat.items() if p.startswith(("text_encoder/", "transformer_proj/")))
  assert text == _text_formula(o)
  # every attention block reads the text through encoder_kv: xf_width -> 2C (+ bias)
  kv = sum(n for p, n in flat.items() if "/encoder_kv/" in p)
  attn_channels = [int(np.sqrt(n // 3)) for p, n in flat.items() if p.endswith("/qkv/kernel")]
  assert kv == sum(o["xf_width"] * 2 * c + 2 * c for c in attn_channels)


def test_presets_and_option_errors():
  assert registry.preset("base") == ("text2im", {})
  assert registry.preset("upsample-full")[1]["num_channels"] == 384
  with pytest.raises(ValueError, match="unknown preset"):
    registry.preset("base-huge")
  with pytest.raises(ValueError, match="unknown model option"):
    registry.create_model("text2im", {"num_chanels": 3})
  with pytest.raises(ValueError, match="contradicts"):
    registry.create_model("text2im", {"inpaint": True})
  with pytest.raises(ValueError, match="channel_mult"):
    registry.create_model("text2im", {"image_size": 48})
  assert registry.channel_mult_for(256, "") == (1, 1, 2, 2, 4, 4)
  assert registry.attention_ds_for(64, "32,16,8") == (2, 4, 8)
  assert registry.create_model("base-inpaint").kind == "inpaint"
