"""FID Inception-v3: key names and shapes, weight import and errors, numerical equality with PyTorch.

torchvision is not installable here, so the reference is a small PyTorch re-implementation of the
FID network written in this test (torchvision's module names, pytorch-fid's three patches) with
random weights; its `state_dict()` is what our importer reads.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import jax
import jax.numpy as jnp
import torch.nn as tnn
import torch.nn.functional as F

from glide_jax.eval import inception as inc
from glide_jax.models import layers

# --- an independent PyTorch reference -----------------------------------------------------------

class TConv(tnn.Module):
  def __init__(self, cin, cout, k, stride=1, padding=0):
    super().__init__()
    self.conv = tnn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False)
    self.bn = tnn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def _avg(x):
  return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class TA(tnn.Module):
  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = TConv(cin, 64, 1)
    self.branch5x5_1 = TConv(cin, 48, 1)
    self.branch5x5_2 = TConv(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = TConv(cin, 64, 1)
    self.branch3x3dbl_2 = TConv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = TConv(96, 96, 3, padding=1)
    self.branch_pool = TConv(cin, pool_features, 1)

  def forward(self, x):
    return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                      self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      self.branch_pool(_avg(x))], 1)


class TB(tnn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = TConv(cin, 384, 3, stride=2)
    self.branch3x3dbl_1 = TConv(cin, 64, 1)
    self.branch3x3dbl_2 = TConv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = TConv(96, 96, 3, stride=2)

  def forward(self, x):
    return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      F.max_pool2d(x, 3, 2)], 1)


class TC(tnn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = TConv(cin, 192, 1)
    self.branch7x7_1 = TConv(cin, c7, 1)
    self.branch7x7_2 = TConv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = TConv(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = TConv(cin, c7, 1)
    self.branch7x7dbl_2 = TConv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = TConv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = TConv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = TConv(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = TConv(cin, 192, 1)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for i in range(1, 6):
      bd = getattr(self, f"branch7x7dbl_{i}")(bd)
    return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg(x))], 1)


class TD(tnn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = TConv(cin, 192, 1)
    self.branch3x3_2 = TConv(192, 320, 3, stride=2)
    self.branch7x7x3_1 = TConv(cin, 192, 1)
    self.branch7x7x3_2 = TConv(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = TConv(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = TConv(192, 192, 3, stride=2)

  def forward(self, x):
    b7 = x
    for i in range(1, 5):
      b7 = getattr(self, f"branch7x7x3_{i}")(b7)
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)


class TE(tnn.Module):
  def __init__(self, cin, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = TConv(cin, 320, 1)
    self.branch3x3_1 = TConv(cin, 384, 1)
    self.branch3x3_2a = TConv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = TConv(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = TConv(cin, 448, 1)
    self.branch3x3dbl_2 = TConv(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = TConv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = TConv(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = TConv(cin, 192, 1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    pool = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg(x)
    return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pool)], 1)


class TNet(tnn.Module):
  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = TConv(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = TConv(32, 32, 3)
    self.Conv2d_2b_3x3 = TConv(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = TConv(64, 80, 1)
    self.Conv2d_4a_3x3 = TConv(80, 192, 3)
    self.Mixed_5b = TA(192, 32)
    self.Mixed_5c = TA(256, 64)
    self.Mixed_5d = TA(288, 64)
    self.Mixed_6a = TB(288)
    self.Mixed_6b = TC(768, 128)
    self.Mixed_6c = TC(768, 160)
    self.Mixed_6d = TC(768, 160)
    self.Mixed_6e = TC(768, 192)
    self.Mixed_7a = TD(768)
    self.Mixed_7b = TE(1280, max_pool=False)
    self.Mixed_7c = TE(2048, max_pool=True)
    self.fc = tnn.Linear(2048, 1008)

  def forward(self, x, resize=True):
    if resize:
      x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, 3, 2)
    x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    return x.mean(dim=(2, 3))


def _randomise(module: tnn.Module, seed: int) -> None:
  """Random weights and BatchNorm statistics, scaled so activations stay O(1) through the net."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, tnn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
      elif isinstance(m, tnn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
        m.bias.copy_(0.2 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
        m.running_var.copy_(0.5 + torch.rand(c, generator=g))
  module.eval()


def _block_params(tmodule: tnn.Module) -> dict:
  """A block's PyTorch state_dict -> our sub-tree, through the real importer's per-key mapping."""
  sd = {k: v.numpy() for k, v in tmodule.state_dict().items() if not k.endswith("num_batches_tracked")}
  out = {}
  for k, a in sd.items():
    module, kind, leaf = k.rsplit(".", 2)
    node = out.setdefault(module, {})
    node["kernel" if kind == "conv" else inc._BN_LEAVES[leaf]] = (
        np.transpose(a, (2, 3, 1, 0)) if kind == "conv" else a)
  return out


@pytest.mark.parametrize("name,tblock,fblock,cin", [
    ("A", lambda: TA(48, 32), lambda: inc.InceptionA(32), 48),
    ("B", lambda: TB(40), lambda: inc.InceptionB(), 40),
    ("C", lambda: TC(40, 24), lambda: inc.InceptionC(24), 40),
    ("D", lambda: TD(40), lambda: inc.InceptionD(), 40),
    ("E1", lambda: TE(40, False), lambda: inc.InceptionE("avg"), 40),
    ("E2", lambda: TE(40, True), lambda: inc.InceptionE("max"), 40),
])
def test_block_matches_pytorch(name, tblock, fblock, cin):
  tmod = tblock()
  _randomise(tmod, seed=len(name) + cin)
  x = np.random.default_rng(0).normal(size=(2, cin, 9, 11)).astype(np.float32)
  with torch.no_grad():
    want = tmod(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  got = fblock().apply({"params": _block_params(tmod)}, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


def test_resize_matches_pytorch_interpolate():
  x = np.random.default_rng(1).uniform(size=(2, 3, 37, 53)).astype(np.float32)
  for size in (299, 20):  # up- and down-sampling
    want = F.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear",
                         align_corners=False).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(layers.resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), size, size))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def reference_net():
  net = TNet()
  _randomise(net, seed=0)
  return net


def test_state_dict_names_and_shapes_match_reference(reference_net):
  sd = {k: tuple(v.shape) for k, v in reference_net.state_dict().items()
        if not k.endswith("num_batches_tracked")}
  assert inc.torch_state_dict_shapes() == sd
  # pool3 of the real graph: 2048 features, 1008 classes.
  assert sd["fc.weight"] == (1008, 2048)


def test_full_network_matches_pytorch_and_loads_from_file(reference_net, tmp_path):
  path = tmp_path / inc.WEIGHTS_FILENAME
  torch.save(reference_net.state_dict(), path)  # includes num_batches_tracked, as newer files do
  params = inc.load_fid_inception_weights(path)
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, size=(2, 80, 80, 3), dtype=np.uint8)  # 80 px: no resize, fast
  with torch.no_grad():
    want = reference_net(torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0),
                         resize=False).numpy()
  got = inc.make_feature_fn(params, resize=False)(images)
  assert got.shape == (2, inc.FEATURE_DIM)
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
  # The same weights through .safetensors and .npz conversions give the same tree.
  from safetensors.numpy import save_file
  flat = {k: v.numpy() for k, v in reference_net.state_dict().items()}
  save_file(flat, str(tmp_path / "w.safetensors"))
  np.savez(tmp_path / "w.npz", **flat)
  for other in ("w.safetensors", "w.npz"):
    p2 = inc.load_fid_inception_weights(tmp_path / other)
    jax.tree_util.tree_map(np.testing.assert_array_equal, p2, params)
  # Round trip back to PyTorch names.
  back = inc.state_dict_from_params(params)
  for k, v in back.items():
    np.testing.assert_array_equal(v, flat[k])


def test_import_errors_name_the_keys(reference_net, tmp_path):
  sd = {k: v.numpy() for k, v in reference_net.state_dict().items()}
  broken = dict(sd)
  del broken["Mixed_6c.branch7x7dbl_3.conv.weight"]
  broken["Mixed_9z.branch1x1.conv.weight"] = np.zeros((1,), np.float32)
  with pytest.raises(KeyError) as e:
    inc.params_from_state_dict(broken)
  assert "Mixed_6c.branch7x7dbl_3.conv.weight" in str(e.value)
  assert "Mixed_9z.branch1x1.conv.weight" in str(e.value)
  misshaped = dict(sd)
  misshaped["Mixed_5b.branch_pool.bn.running_var"] = np.ones((33,), np.float32)
  with pytest.raises(ValueError, match=r"Mixed_5b.branch_pool.bn.running_var: \(33,\) \(expected \(32,\)\)"):
    inc.params_from_state_dict(misshaped)
  with pytest.raises(FileNotFoundError, match="never downloads"):
    inc.load_fid_inception_weights(tmp_path / "absent.pth")
  (tmp_path / "w.h5").write_bytes(b"x")
  with pytest.raises(ValueError, match="unknown weights format"):
    inc.load_fid_inception_weights(tmp_path / "w.h5")
  # A pickle carrying an arbitrary object is refused by weights_only loading.
  torch.save({"a": object()}, tmp_path / "evil.pth")
  with pytest.raises(pickle.UnpicklingError):
    inc.load_fid_inception_weights(tmp_path / "evil.pth")


def test_compute_fid_against_reference_features(reference_net, tmp_path, monkeypatch):
  """compute_fid hands the Frechet distance the statistics of the PyTorch reference's features.

  The distance itself is tested in test_eval_frechet.py; a 2048-d sqrtm takes minutes on this
  shared CPU, so here it is replaced by a recorder.
  """
  from PIL import Image

  from glide_jax.eval import fid, frechet

  rng = np.random.default_rng(3)
  a = rng.integers(0, 256, size=(6, 80, 80, 3), dtype=np.uint8)
  b = np.clip(a.astype(np.int64) // 2 + rng.integers(0, 60, size=a.shape), 0, 255).astype(np.uint8)
  b = b[:4]
  ref_dir = tmp_path / "ref"
  ref_dir.mkdir()
  for i, im in enumerate(b):
    Image.fromarray(im).save(ref_dir / f"{i:03d}.png")
  params = inc.params_from_state_dict({k: v.numpy() for k, v in reference_net.state_dict().items()})
  seen = {}

  def recorder(mu1, s1, mu2, s2, eps=1e-6, singular=False):
    seen.update(mu1=mu1, s1=s1, mu2=mu2, s2=s2, singular=singular)
    return 42.0
  monkeypatch.setattr(frechet, "frechet_distance", recorder)
  out = fid.compute_fid(a, ref_dir, weights_path=None, batch_size=2, params=params, resize=False)

  def torch_feats(x):
    with torch.no_grad():
      return reference_net(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0),
                           resize=False).numpy().astype(np.float64)
  fa, fb = torch_feats(a), torch_feats(b)
  scale = np.abs(fa).max()
  np.testing.assert_allclose(seen["mu1"], fa.mean(0), atol=1e-3 * scale)
  np.testing.assert_allclose(seen["mu2"], fb.mean(0), atol=1e-3 * scale)
  np.testing.assert_allclose(seen["s1"], np.cov(fa, rowvar=False), atol=2e-3 * scale ** 2)
  np.testing.assert_allclose(seen["s2"], np.cov(fb, rowvar=False), atol=2e-3 * scale ** 2)
  assert seen["singular"]  # 6 and 4 samples of 2048-d features
  assert out["fid"] == 42.0
  assert (out["n_a"], out["n_b"], out["reference"]) == (6, 4, str(ref_dir))
  assert "6 samples vs 4 reference images" in fid.format_fid(out)
  # Precision/recall on the same features, against the reference's features directly.
  from glide_jax.eval.precision_recall import precision_recall
  out_pr = fid.compute_fid(a, ref_dir, weights_path=None, batch_size=2, params=params, resize=False,
                           precision_recall_k=2)
  want_pr = precision_recall(fb, fa, k=2)
  assert (out_pr["precision"], out_pr["recall"]) == (want_pr["precision"], want_pr["recall"])
  assert "k=2 nearest" in fid.format_fid(out_pr)
