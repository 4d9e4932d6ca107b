"""The U-Net's option variants that the reference dumps do not cover (conv resampling, additive
embedding, heads by count, num_heads_upsample, no text padding, no final LN), checked against a
second, independent implementation: a PyTorch functional forward written from the reference's
semantics that reads the reference state_dict keys directly. That second implementation is itself
checked against the reference dumps first, so both sides are tied to the truth.
"""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from glide_jax.interop import glide_text2im as g
from glide_jax.models import registry

# ------------------------------------------------------------------ the PyTorch functional reference


def _gn(x, sd, p, swish):
  y = F.group_norm(x.float(), 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-5)
  return F.silu(y) if swish else y


def _conv(x, sd, p, stride=1):
  w = sd[p + ".weight"]
  return F.conv2d(x, w, sd[p + ".bias"], stride=stride, padding=w.shape[-1] // 2)


def _lin(x, sd, p):
  return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])


def _conv1d(x, sd, p):
  return F.conv1d(x, sd[p + ".weight"], sd[p + ".bias"])


def _res(x, emb, sd, p, ss, up=False, down=False):
  h = _gn(x, sd, p + ".in_layers.0", True)
  if up:
    h, x = F.interpolate(h, scale_factor=2, mode="nearest"), F.interpolate(x, scale_factor=2, mode="nearest")
  if down:
    h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
  h = _conv(h, sd, p + ".in_layers.2")
  e = _lin(F.silu(emb), sd, p + ".emb_layers.1")[:, :, None, None]
  if ss:
    scale, shift = e.chunk(2, dim=1)
    h = F.silu(_gn(h, sd, p + ".out_layers.0", False) * (1 + scale) + shift)
  else:
    h = _gn(h + e, sd, p + ".out_layers.0", True)
  h = _conv(h, sd, p + ".out_layers.3")
  skip = _conv(x, sd, p + ".skip_connection") if p + ".skip_connection.weight" in sd else x
  return skip + h


def _attn(x, xf, sd, p, heads):
  b, c, hh, ww = x.shape
  ch = c // heads
  qkv = _conv1d(_gn(x, sd, p + ".norm", False).reshape(b, c, -1), sd, p + ".qkv")
  q, k, v = qkv.reshape(b * heads, 3 * ch, -1).split(ch, dim=1)
  ek, ev = _conv1d(xf, sd, p + ".encoder_kv").reshape(b * heads, 2 * ch, -1).split(ch, dim=1)
  k, v = torch.cat([ek, k], -1), torch.cat([ev, v], -1)
  s = ch ** -0.25
  w = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s), dim=-1)
  a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
  return x + _conv1d(a, sd, p + ".proj_out").reshape(b, c, hh, ww)


def _text(tokens, mask, sd, o):
  w, heads = o["xf_width"], o["xf_heads"]
  x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][None]
  if o["xf_padding"]:
    x = torch.where(mask[..., None], x, sd["padding_embedding"][None])
  b, length, _ = x.shape
  for i in range(o["xf_layers"]):
    p = f"transformer.resblocks.{i}"
    h = F.layer_norm(x, (w,), sd[p + ".ln_1.weight"], sd[p + ".ln_1.bias"])
    q, k, v = _lin(h, sd, p + ".attn.c_qkv").view(b, length, heads, -1).split(w // heads, dim=-1)
    s = (w // heads) ** -0.25
    att = torch.softmax(torch.einsum("bthc,bshc->bhts", q * s, k * s), dim=-1)
    x = x + _lin(torch.einsum("bhts,bshc->bthc", att, v).reshape(b, length, w), sd, p + ".attn.c_proj")
    h = F.layer_norm(x, (w,), sd[p + ".ln_2.weight"], sd[p + ".ln_2.bias"])
    x = x + _lin(F.gelu(_lin(h, sd, p + ".mlp.c_fc")), sd, p + ".mlp.c_proj")
  if o["xf_final_ln"]:
    x = F.layer_norm(x, (w,), sd["final_ln.weight"], sd["final_ln.bias"])
  return x


def torch_forward(sd, kind, o, x, t, tokens, mask, low_res=None, image=None, imask=None):
  """NCHW forward of the whole model from a state_dict; o = resolved glide-text2im options."""
  sd = {k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in sd.items()}
  x, tokens, mask = torch.as_tensor(x), torch.as_tensor(tokens).long(), torch.as_tensor(mask).bool()
  xf = _text(tokens, mask, sd, o)
  xf_proj = _lin(xf[:, -1], sd, "transformer_proj")
  xf = xf.permute(0, 2, 1)
  mc = o["num_channels"]
  half = mc // 2
  args = torch.as_tensor(t).float()[:, None] * torch.exp(-math.log(10000) * torch.arange(half) / half)[None]
  temb = torch.cat([torch.cos(args), torch.sin(args)], -1)
  emb = _lin(F.silu(_lin(temb, sd, "time_embed.0")), sd, "time_embed.2") + xf_proj
  parts = [x]
  if kind in ("inpaint", "upsample_inpaint"):
    parts += [torch.as_tensor(image) * torch.as_tensor(imask), torch.as_tensor(imask)]
  if kind in ("upsample", "upsample_inpaint"):
    parts.append(F.interpolate(torch.as_tensor(low_res), x.shape[2:], mode="bilinear", align_corners=False))
  h = _conv(torch.cat(parts, 1), sd, "input_blocks.0.0")
  mult = registry.channel_mult_for(o["image_size"], o["channel_mult"])
  nrb, ss = o["num_res_blocks"], o["use_scale_shift_norm"]

  def heads(c, n):
    return n if o["num_head_channels"] == -1 else c // o["num_head_channels"]

  n_up = o["num_heads_upsample"] if o["num_heads_upsample"] != -1 else o["num_heads"]

  def block(h, p, n_heads, resample):
    j = 0
    while any(k.startswith(f"{p}.{j}.") for k in sd):
      q = f"{p}.{j}"
      if q + ".qkv.weight" in sd:
        h = _attn(h, xf, sd, q, heads(h.shape[1], n_heads))
      elif q + ".op.weight" in sd:
        h = _conv(h, sd, q + ".op", stride=2)
      elif q + ".conv.weight" in sd:
        h = _conv(F.interpolate(h, scale_factor=2, mode="nearest"), sd, q + ".conv")
      else:
        last = not any(k.startswith(f"{p}.{j + 1}.") for k in sd)
        h = _res(h, emb, sd, q, ss, up=resample == "up" and last and j > 0, down=resample == "down")
      j += 1
    return h

  hs = [h]
  i = 1
  for level in range(len(mult)):
    for _ in range(nrb):
      h = block(h, f"input_blocks.{i}", o["num_heads"], None)
      hs.append(h)
      i += 1
    if level != len(mult) - 1:
      h = block(h, f"input_blocks.{i}", o["num_heads"], "down")
      hs.append(h)
      i += 1
  h = block(h, "middle_block", o["num_heads"], None)
  i = 0
  for level in reversed(range(len(mult))):
    for r in range(nrb + 1):
      up = "up" if level and r == nrb else None
      h = block(torch.cat([h, hs.pop()], 1), f"output_blocks.{i}", n_up, up)
      i += 1
  return _conv(_gn(h, sd, "out.0", True), sd, "out.2").numpy()


# ------------------------------------------------------------------------------------------ tests

def _dump(reference_dir, name):
  with np.load(reference_dir / f"text2im_{name}.npz") as z:
    return {k: z[k] for k in z.files}


@pytest.mark.parametrize("name", ["base", "upsample_inpaint"])
def test_torch_reference_matches_dumps(reference_dir, name):
  data = _dump(reference_dir, name)
  config = json.loads(str(data["config"]))
  o = registry.resolve_options(config["kind"], config["options"])
  sd = {k[6:]: v for k, v in data.items() if k.startswith("param/")}
  out = torch_forward(sd, config["kind"], o, data["input/x"], data["input/timesteps"], data["input/tokens"],
                      data["input/mask"], data.get("input/low_res"), data.get("input/inpaint_image"),
                      data.get("input/inpaint_mask"))
  ref = data["output/out"]
  assert np.max(np.abs(out - ref)) / np.max(np.abs(ref)) < 1e-4


def _random_params(kind, options, seed):
  """Every parameter random (no zero-initialised layer hides a wrong path)."""
  rng = np.random.default_rng(seed)
  params = {}
  for path, shape in g.expected_shapes(kind, options).items():
    leaf = path.rsplit("/", 1)[-1]
    if leaf == "scale":
      v = 1 + 0.2 * rng.standard_normal(shape)
    elif leaf == "bias":
      v = 0.2 * rng.standard_normal(shape)
    elif leaf == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      v = rng.standard_normal(shape) / math.sqrt(fan_in)
    else:  # embeddings
      v = 0.5 * rng.standard_normal(shape)
    params[path] = v.astype(np.float32)
  from glide_jax.bundle import unflatten_params
  return unflatten_params(params)


TINY = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8,16",
            dropout=0.0, text_ctx=8, xf_width=32, xf_layers=1, xf_heads=2, n_vocab=50)
VARIANTS = [
    # conv resampling, additive embedding, heads by count with a different count in the decoder,
    # no padding embedding, no final LN
    ("text2im", dict(TINY, resblock_updown=False, use_scale_shift_norm=False, num_head_channels=-1,
                     num_heads=2, num_heads_upsample=4, xf_padding=False, xf_final_ln=False)),
    ("upsample", dict(TINY, resblock_updown=False, num_head_channels=8, num_res_blocks=2)),
    ("inpaint", dict(TINY, use_scale_shift_norm=False, num_head_channels=-1, num_heads=4, xf_heads=4)),
]


@pytest.mark.parametrize("kind,options", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_variant_matches_torch_reference(kind, options):
  o = registry.resolve_options(kind, options)
  params = _random_params(kind, options, seed=len(kind))
  sd = g.export_state_dict(params, kind, options)
  rng = np.random.default_rng(0)
  b, s = 2, options["image_size"]
  x = rng.standard_normal((b, 3, s, s)).astype(np.float32)
  t = np.array([3, 917])
  tokens = rng.integers(0, options["n_vocab"], (b, options["text_ctx"]))
  mask = np.arange(options["text_ctx"])[None] < np.array([[3], [0]])  # one short, one empty prompt
  low_res = rng.standard_normal((b, 3, s // 4, s // 4)).astype(np.float32)
  image = rng.standard_normal((b, 3, s, s)).astype(np.float32)
  imask = (rng.random((b, 1, s, s)) > 0.5).astype(np.float32)
  ref = torch_forward(sd, kind, o, x, t, tokens, mask, low_res, image, imask)

  model = registry.create_model(kind, options)
  nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
  kw = dict(tokens=jnp.asarray(tokens, jnp.int32), mask=jnp.asarray(mask))
  if "upsample" in kind:
    kw["low_res"] = nhwc(low_res)
  if "inpaint" in kind:
    kw.update(inpaint_image=nhwc(image), inpaint_mask=nhwc(imask))
  out = jax.jit(lambda p, x, t, kw: model.apply({"params": p}, x, t, **kw))(params, nhwc(x), jnp.asarray(t), kw)
  out = np.asarray(out).transpose(0, 3, 1, 2)
  assert np.max(np.abs(out - ref)) / np.max(np.abs(ref)) < 1e-4


def test_variant_param_keys_follow_the_reference_names():
  """Conv resampling creates `op` (down) and `conv` (up) convs; additive embedding halves emb_layers."""
  kind, options = VARIANTS[0]
  keys = {g.torch_key(p): s for p, s in g.expected_shapes(kind, options).items()}
  assert keys["input_blocks.2.0.op.weight"] == (3, 3, 32, 32)  # our HWIO
  assert g.torch_shape("input_blocks_2_0/op/kernel", (3, 3, 32, 64)) == (64, 32, 3, 3)
  assert "output_blocks.1.2.conv.weight" in keys
  assert keys["input_blocks.1.0.emb_layers.1.weight"] == (128, 32)  # (E, C_out): no scale-shift
  assert "padding_embedding" not in keys and "final_ln.weight" not in keys
