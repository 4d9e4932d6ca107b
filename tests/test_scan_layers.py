"""`scan_layers` (blocks under nn.scan, params stacked on a 'layers' axis), the layout conversion
between that and the per-layer tree, and the remat policies by name.

The parity of the scanned models with the reference dumps is in tests/test_unet.py and
tests/test_clip.py (parametrized over scan_layers); here: the conversions are bit-exact, a scanned
model computes what the per-layer one does, every loader accepts either layout, and the scanned
program is smaller.
"""
import contextlib
import io
import re

import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
import train_support as ts
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from glide_jax import bundle
from glide_jax.interop import clip_keys
from glide_jax.interop import glide_text2im as g
from glide_jax.models import clip, layout, registry, remat
from glide_jax.models.text_encoder import TextEncoder
from glide_jax.parallel import sharding

CTX, WIDTH, HEADS, VOCAB = 8, 32, 4, 30
# One resolution level, two text layers: the U-Net part compiles fast, the stack has 2 entries.
UNET = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1", attention_resolutions="8",
            num_head_channels=16, dropout=0.0, text_ctx=4, xf_width=32, xf_layers=2, xf_heads=2, n_vocab=40)
CLIP = dict(n_embd=24, n_head=2, n_head_state=16, n_xf_blocks=4, image_size=16, patch_size=4,
            max_text_len=12, n_vocab=50, n_timesteps=1000)


def _tokens():
  tokens = (jnp.arange(2 * CTX).reshape(2, CTX) * 7) % VOCAB
  return tokens, jnp.arange(CTX)[None] < jnp.array([[3], [CTX]])


def _encoder(layers=3, scan=False, policy="none"):
  return TextEncoder(n_vocab=VOCAB, text_ctx=CTX, width=WIDTH, layers=layers, heads=HEADS,
                     remat_policy=policy, scan_layers=scan)


def _random(abstract, seed=0):
  """Random float32 numpy values for an (unboxed) abstract tree: every path matters."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), abstract)


def _abstract(model, *args):
  return jax.eval_shape(model.init, jax.random.key(0), *args)["params"]


def _clip_args(model):
  s, length = model.image_size, model.max_text_len
  return (jnp.zeros((1, s, s, 3)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, length), jnp.int32),
          jnp.ones((1,), jnp.int32))


def _equal_trees(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


# ------------------------------------------------------------------------------------ the layout

# (name, per-layer model, scanned model, init args, where the stacks sit)
def _models():
  tokens, mask = _tokens()
  unet_args = tuple(registry.create_model("text2im", UNET).dummy_inputs(1, UNET["image_size"]).values())
  return {
      "text_encoder": (_encoder(), _encoder(scan=True), (tokens, mask), [((), "resblocks", 3)]),
      "unet": (registry.create_model("text2im", UNET), registry.create_model("text2im", {**UNET, "scan_layers": True}),
               unet_args, [(("text_encoder",), "resblocks", 2)]),
      "clip": (clip.create_clip_model(CLIP), clip.create_clip_model({**CLIP, "scan_layers": True}), None,
               [(("image",), "block", 4), (("text",), "block", 4)]),
  }


@pytest.mark.parametrize("name", ["text_encoder", "unet", "clip"])
def test_round_trip_is_bit_exact_and_stacks_in_layer_order(name):
  per_layer_model, scanned_model, args, stacks = _models()[name]
  args = args if args is not None else _clip_args(per_layer_model)
  boxed = _abstract(scanned_model, *args)
  per_layer = _random(nn.meta.unbox(_abstract(per_layer_model, *args)))
  scanned = layout.to_scanned(per_layer)
  # the converted tree is exactly the tree the scanned model builds
  assert jax.tree_util.tree_structure(scanned) == jax.tree_util.tree_structure(nn.meta.unbox(boxed))
  assert [np.shape(a) for a in jax.tree.leaves(scanned)] == [a.shape for a in jax.tree.leaves(nn.meta.unbox(boxed))]
  assert layout.is_scanned(per_layer) is False and layout.is_scanned(scanned) is True
  for where, block, n in stacks:
    node, sub = per_layer, scanned
    for key in where:
      node, sub = node[key], sub[key]
    assert block in sub and not any(k.startswith(f"{block}_") for k in sub)
    for i in range(n):  # layer i is row i of every stacked leaf
      _equal_trees(jax.tree.map(lambda a, i=i: a[i], sub[block]), node[f"{block}_{i}"])
  # the stacked axis carries the logical name 'layers'
  stacked = boxed
  for key in stacks[0][0]:
    stacked = stacked[key]
  for leaf in jax.tree.leaves(stacked[stacks[0][1]], is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    assert leaf.names[0] == "layers" and leaf.value.shape[0] == stacks[0][2]
  back = layout.to_per_layer(scanned)
  _equal_trees(back, per_layer)
  # conversions are idempotent, and to_layout goes either way
  _equal_trees(layout.to_scanned(scanned), scanned)
  _equal_trees(layout.to_layout(scanned, False), per_layer)
  _equal_trees(layout.to_layout(per_layer, True), scanned)


def test_zero_and_one_layer():
  tokens, mask = _tokens()
  for scan in (False, True):
    params = nn.meta.unbox(_abstract(_encoder(layers=0, scan=scan), tokens, mask))
    assert not any(k.startswith("resblocks") for k in params)
  assert layout.is_scanned(_random(nn.meta.unbox(_abstract(_encoder(layers=0), tokens, mask)))) is None
  one = _random(nn.meta.unbox(_abstract(_encoder(layers=1), tokens, mask)))
  stacked = layout.to_scanned(one)
  assert stacked["resblocks"]["attn"]["c_qkv"]["kernel"].shape == (1, WIDTH, 3 * WIDTH)
  out = [jax.jit(lambda p, m=m: m.apply({"params": p}, tokens, mask))(p)
         for m, p in ((_encoder(layers=1), one), (_encoder(layers=1, scan=True), stacked))]
  np.testing.assert_allclose(np.asarray(out[1]), np.asarray(out[0]), rtol=1e-5, atol=1e-6)
  zero = _random(nn.meta.unbox(_abstract(_encoder(layers=0), tokens, mask)))
  out = [jax.jit(lambda p, m=m: m.apply({"params": p}, tokens, mask))(zero)
         for m in (_encoder(layers=0), _encoder(layers=0, scan=True))]
  np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(out[0]))


def test_scanned_init_draws_each_layer_separately():
  tokens, mask = _tokens()
  params = nn.meta.unbox(jax.jit(_encoder(scan=True).init)(jax.random.key(0), tokens, mask)["params"])
  kernel = np.asarray(params["resblocks"]["mlp"]["c_fc"]["kernel"])
  assert kernel.shape[0] == 3 and not np.array_equal(kernel[0], kernel[1]) and not np.array_equal(kernel[1], kernel[2])
  np.testing.assert_array_equal(np.asarray(params["resblocks"]["ln_1"]["scale"]), 1.0)


def test_mixed_or_gapped_layouts_are_refused():
  tokens, mask = _tokens()
  per_layer = _random(nn.meta.unbox(_abstract(_encoder(), tokens, mask)))
  scanned = layout.to_scanned(per_layer)
  with pytest.raises(ValueError, match="mixed"):
    layout.to_scanned({**scanned, "resblocks_0": per_layer["resblocks_0"]})
  with pytest.raises(ValueError, match="mix"):
    layout.is_scanned({**scanned, "resblocks_0": per_layer["resblocks_0"]})
  gapped = {k: v for k, v in per_layer.items() if k != "resblocks_1"}
  with pytest.raises(ValueError, match="numbered"):
    layout.to_scanned(gapped)
  misshapen = {**per_layer, "resblocks_2": {**per_layer["resblocks_2"], "ln_1": {"scale": np.ones(3), "bias": np.ones(3)}}}
  with pytest.raises(ValueError, match="resblocks_2"):
    layout.to_scanned(misshapen)


# ------------------------------------------------------------------------ scanned == per layer

def test_scanned_text_encoder_computes_the_per_layer_one_values_and_gradients():
  tokens, mask = _tokens()
  per_layer = _random(nn.meta.unbox(_abstract(_encoder(), tokens, mask)))
  scanned = layout.to_scanned(per_layer)

  def value_and_grad(model, params):
    f = lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, tokens, mask)))
    return jax.jit(lambda p: (model.apply({"params": p}, tokens, mask), jax.grad(f)(p)))(params)

  out0, grad0 = value_and_grad(_encoder(), per_layer)
  # remat inside the scan body ('full' and an alias) changes neither the values nor the gradients
  for policy in ("none", "full", "dots"):
    out1, grad1 = value_and_grad(_encoder(scan=True, policy=policy), scanned)
    assert _rel(out1, out0) < 1e-5, policy
    grad1 = layout.to_per_layer(grad1)
    for a, b in zip(jax.tree.leaves(grad1), jax.tree.leaves(grad0), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_scanned_unet_and_clip_compute_the_per_layer_ones():
  models = _models()
  per_layer_model, scanned_model, args, _ = models["unet"]
  params = _random(nn.meta.unbox(_abstract(per_layer_model, *args)), seed=1)
  kw = per_layer_model.dummy_inputs(2, UNET["image_size"])
  rng = np.random.default_rng(0)
  kw.update(x=jnp.asarray(rng.standard_normal(kw["x"].shape), jnp.float32), timesteps=jnp.array([5, 700]),
            tokens=jnp.asarray(rng.integers(0, UNET["n_vocab"], (2, UNET["text_ctx"])), jnp.int32),
            mask=jnp.arange(UNET["text_ctx"])[None] < jnp.array([[2], [4]]))
  out = [jax.jit(lambda p, m=m: m.apply({"params": p}, **kw))(p)
         for m, p in ((per_layer_model, params), (scanned_model, layout.to_scanned(params)))]
  assert _rel(out[1], out[0]) < 1e-5

  per_layer_model, scanned_model, _, _ = models["clip"]
  params = _random(nn.meta.unbox(_abstract(per_layer_model, *_clip_args(per_layer_model))), seed=2)
  image = jax.random.uniform(jax.random.key(5), (2, 16, 16, 3), minval=-1, maxval=1)
  t, tokens, lens = jnp.array([3, 700]), jax.random.randint(jax.random.key(6), (2, 12), 0, 50), jnp.array([4, 12])
  out = [jax.jit(lambda p, m=m: m.apply({"params": p}, image, t, tokens, lens))(p)
         for m, p in ((per_layer_model, params), (scanned_model, layout.to_scanned(params)))]
  for a, b in zip(out[1], out[0], strict=True):
    assert _rel(a, b) < 1e-5


def test_sharding_constraints_apply_inside_the_scan():
  model = clip.create_clip_model({**CLIP, "scan_layers": True})
  boxed = _abstract(model, *_clip_args(model))
  params = layout.to_scanned(_random(nn.meta.unbox(_abstract(clip.create_clip_model(CLIP), *_clip_args(model)))))
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 2, 1, 4), ("replica", "data", "fsdp", "tensor"))
  rules = sharding.DEFAULT_RULES
  shardings = sharding.tree_shardings(boxed, mesh, rules, log_fallbacks=False)
  sharded = jax.device_put(params, shardings)
  # the stacked axis stays whole (DEFAULT_RULES: 'layers' -> None), the rest follows the names
  assert sharded["text"]["block"]["f_mlp"]["f_1"]["kernel"].sharding.spec == P(None, None, "tensor")
  tokens = jax.random.randint(jax.random.key(7), (4, 12), 0, 50)
  lens = jnp.array([2, 5, 12, 7])
  image = jax.random.uniform(jax.random.key(8), (4, 16, 16, 3), minval=-1, maxval=1)
  t = jnp.array([0, 1, 500, 999])
  both = lambda p, image, tokens: model.apply({"params": p}, image, t, tokens, lens)
  expected = jax.jit(both)(params, image, tokens)
  batch = NamedSharding(mesh, P("data"))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    lowered = jax.jit(both).lower(sharded, jax.device_put(image, batch), jax.device_put(tokens, batch))
    got = jax.jit(both)(sharded, jax.device_put(image, batch), jax.device_put(tokens, batch))
  # Each tower: one constraint on its embedding output, and the block's three (attention and MLP
  # activations over 'tensor', the block output) once, in the scan body, not once per layer.
  constraints = [line for line in lowered.as_text().splitlines() if "sharding_constraint" in line]
  assert len(constraints) == 2 * (1 + 3), constraints
  assert sum('{"tensor"}' in line for line in constraints) == 2 * 2, constraints
  for a, b in zip(got, expected, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_scanned_program_is_smaller():
  tokens, mask = _tokens()
  sizes = {}
  for scan in (False, True):
    model = _encoder(layers=8, scan=scan)
    params = nn.meta.unbox(_abstract(model, tokens, mask))
    text = jax.jit(lambda p, m=model: m.apply({"params": p}, tokens, mask)).lower(params).as_text()
    sizes[scan] = (len(text.splitlines()), text.count("dot_general"))
  (lines_u, dots_u), (lines_s, dots_s) = sizes[False], sizes[True]
  assert dots_s > 0 and dots_u == 8 * dots_s, sizes  # one block's matmuls instead of eight blocks
  assert lines_s < lines_u / 3, sizes


# ---------------------------------------------------------------------------------------- remat

def test_remat_policy_names():
  assert remat.POLICY_NAMES[:2] == ("none", "full")
  for name in ("dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable", "everything_saveable",
               "checkpoint_dots", "dots", "dots_no_batch", "save_nothing"):
    assert name in remat.POLICY_NAMES
  assert not {"save_only_these_names", "offload_dot_with_no_batch_dims", "save_from_both_policies"} & set(remat.POLICY_NAMES)
  assert remat.checkpoint_policy("dots") is jax.checkpoint_policies.dots_saveable
  assert remat.checkpoint_policy("dots_no_batch") is jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  assert remat.checkpoint_policy("save_nothing") is jax.checkpoint_policies.nothing_saveable
  assert remat.checkpoint_policy("full") is None
  assert remat.remat(TextEncoder, "none") is TextEncoder
  with pytest.raises(ValueError, match="unknown remat_policy 'sometimes'.*'dots_no_batch'"):
    remat.remat(TextEncoder, "sometimes")
  with pytest.raises(ValueError, match="unknown remat_policy 'sometimes'"):
    tokens, mask = _tokens()
    jax.eval_shape(_encoder(scan=True, policy="sometimes").init, jax.random.key(0), tokens, mask)


_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "i32": 4, "bool": 1, "u32": 4, "i8": 1, "u8": 1}


def _saved_residual_bytes(model, params, tokens, mask) -> int:
  """Bytes the backward pass keeps from the forward (jax's own report), the params excluded."""
  loss = lambda p: jnp.sum(model.apply({"params": p}, tokens, mask) ** 2)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(loss, params)
  total = 0
  for line in out.getvalue().splitlines():
    m = re.match(r"(\w+)\[([\d,]*)\]", line.strip())
    if m and "from the argument" not in line:
      total += _DTYPE_BYTES[m.group(1)] * int(np.prod([int(d) for d in m.group(2).split(",") if d]))
  return total


@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_trade_saved_activations(scan):
  tokens, mask = _tokens()
  params = _random(nn.meta.unbox(_abstract(_encoder(scan=scan), tokens, mask)))
  saved = {p: _saved_residual_bytes(_encoder(scan=scan, policy=p), params, tokens, mask)
           for p in ("none", "dots", "full", "everything_saveable")}
  # full remat keeps only the block inputs, dots the matmul outputs as well, none everything
  assert saved["full"] < saved["dots"] < saved["none"], saved
  assert saved["everything_saveable"] >= saved["dots"], saved


# --------------------------------------------------------------------------- loaders, either layout

@pytest.fixture(scope="module")
def base_dump(reference_dir):
  with np.load(reference_dir / "text2im_base.npz") as z:
    data = {k: z[k] for k in z.files}
  import json
  options = json.loads(str(data["config"]))["options"]
  return {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}, options


def test_glide_text2im_import_and_export_in_both_layouts(base_dump):
  sd, options = base_dump
  per_layer = g.import_state_dict(sd, "text2im", options)
  scanned = g.import_state_dict(sd, "text2im", {**options, "scan_layers": True})
  assert layout.is_scanned(per_layer) is False and layout.is_scanned(scanned) is True
  assert scanned["text_encoder"]["resblocks"]["ln_1"]["scale"].shape == (options["xf_layers"], options["xf_width"])
  _equal_trees(layout.to_per_layer(scanned), per_layer)
  for params, opts in ((scanned, {**options, "scan_layers": True}), (scanned, options), (per_layer, options)):
    out = g.export_state_dict(params, "text2im", opts)
    assert sorted(out) == sorted(sd)
    for k in sd:
      np.testing.assert_array_equal(out[k], sd[k].astype(np.float32))


def test_noised_clip_import_and_export_in_both_layouts(reference_dir):
  with np.load(reference_dir / "noised_clip.npz") as z:
    data = dict(z)
  options = clip_keys.load_dump_config(data)["options"]
  sd = {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}
  scan_opts = {**options, "scan_layers": True}
  per_layer = clip_keys.import_clip_state_dict(sd, options)
  scanned = clip_keys.import_clip_state_dict(sd, scan_opts)
  assert "block" in scanned["image"] and "block" in scanned["text"] and "block_0" not in scanned["text"]
  _equal_trees(layout.to_per_layer(scanned), per_layer)
  for params, opts in ((scanned, scan_opts), (scanned, options), (per_layer, scan_opts)):
    out = clip_keys.export_clip_state_dict(params, opts)
    assert sorted(out) == sorted(sd)
    for k, v in sd.items():
      np.testing.assert_array_equal(out[k], v)
  tower_sd = {k[len("text/"):]: v for k, v in sd.items() if k.startswith("text/")}
  tower = clip_keys.import_tower_state_dict(tower_sd, "text", scan_opts)
  _equal_trees(tower, scanned["text"])
  out = clip_keys.export_tower_state_dict(tower, "text", scan_opts)
  assert sorted(out) == sorted(tower_sd)


class _NoTokenizer:
  """Stands in for a tokenizer: load_sampler_model takes an object as it is."""


@pytest.mark.parametrize("saved_scanned", [False, True])
def test_bundle_of_either_layout_loads_into_a_model_of_either_layout(tmp_path, saved_scanned):
  from glide_jax import sampling

  per_layer_model, _, args, _ = _models()["unet"]
  params = _random(nn.meta.unbox(_abstract(per_layer_model, *args)), seed=3)
  saved = layout.to_scanned(params) if saved_scanned else params
  path = bundle.save_bundle(tmp_path / "b", saved, {"model": {"kind": "text2im",
                                                             "options": {**UNET, "scan_layers": saved_scanned}}})
  tokens, mask = _tokens()
  tokens, mask = tokens[:, :UNET["text_ctx"]] % UNET["n_vocab"], mask[:, :UNET["text_ctx"]]
  outs = []
  for scan in (None, False, True):
    sm = sampling.load_sampler_model(path, tokenizer=_NoTokenizer(), scan_layers=scan)
    want = saved_scanned if scan is None else scan
    assert sm.model.scan_layers is want and layout.is_scanned(sm.params) is want
    outs.append(jax.jit(lambda p, m=sm.model: m.apply({"params": p}, tokens, mask, method="encode_text"))(sm.params))
  for out in outs[1:]:
    for key in ("xf_proj", "xf_out"):
      assert _rel(out[key], outs[0][key]) < 1e-5, key


@pytest.mark.parametrize("stage", ["base", "clip"])
@pytest.mark.parametrize("source_scanned", [False, True])
def test_init_from_a_bundle_of_the_other_layout(tmp_path, stage, source_scanned):
  from glide_jax.train import init_from, stages

  blocks = ("--config.model.options.xf_layers=2",) if stage == "base" else ()
  source = ts.tiny_config(stage, *blocks, f"--config.model.options.scan_layers={source_scanned}")
  src_stage = stages.make_stage(source)
  params = _random(nn.meta.unbox(jax.eval_shape(src_stage.init, jax.random.key(0))), seed=4)
  path = bundle.save_bundle(tmp_path / "b", params, {"model": {"kind": src_stage.kind,
                                                              "options": dict(source.model.options)}})
  config = ts.tiny_config(stage, *blocks, f"--config.model.options.scan_layers={not source_scanned}",
                          f"--config.init_from={path}")
  target = stages.make_stage(config)
  loaded = init_from.load_init_params(config, target)
  want = nn.meta.unbox(jax.eval_shape(target.init, jax.random.key(0)))
  assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(want)
  assert layout.is_scanned(loaded) is (not source_scanned)
  _equal_trees(layout.to_layout(loaded, source_scanned), params)
