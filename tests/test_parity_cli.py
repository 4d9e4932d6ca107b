"""`glide-jax parity`: exit 0 on a reference dump, non-zero on a tampered copy or a broken file."""
import shutil

import jax
import numpy as np
import pytest

from glide_jax import cli


def test_parity_cli_exit_codes(reference_dir, tmp_path, capsys):
  dump = reference_dir / "text2im_upsample.npz"
  assert cli.main(["parity", str(dump)]) == 0
  out = capsys.readouterr().out
  assert "ok" in out and "FAIL" not in out and "out" in out

  with np.load(dump) as z:
    data = {k: z[k] for k in z.files}
  data["output/out"] = data["output/out"].copy()
  data["output/out"][0, 3, 5, 7] += 0.01 * np.abs(data["output/out"]).max()  # one value, 1% of the range
  tampered = tmp_path / "tampered.npz"
  np.savez(tampered, **data)
  assert cli.main(["parity", str(tampered)]) == 1
  assert "FAIL" in capsys.readouterr().out

  broken = tmp_path / "broken.npz"
  shutil.copyfile(dump, broken)
  broken.write_bytes(broken.read_bytes()[:1000])
  assert cli.main(["parity", str(broken)]) == 2


def test_parity_cli_delegates_clip_and_diffusion_dumps(reference_dir, capsys):
  """The noised CLIP dump goes to clip_keys.check_clip_dump, the diffusion dump to
  diffusion.parity.check_diffusion_dump, checked against 1e-5."""
  assert cli.main(["parity", str(reference_dir / "noised_clip.npz"), str(reference_dir / "diffusion.npz")]) == 0
  out = capsys.readouterr().out
  assert "diffusion.npz (tolerance 1e-05)" in out and "noised_clip.npz (tolerance 0.0001)" in out
  for name in ("guidance_grad", "image_emb", "text_emb", "betas/linear", "respace/fast27"):
    assert name in out


@pytest.mark.parametrize("dtype, precision", [("float32", "highest"), ("bfloat16", None)])
def test_parity_cli_forces_highest_matmul_precision_for_float32(reference_dir, monkeypatch, capsys, dtype,
                                                                precision):
  """No TF32 (GPU) or one-pass bf16 (TPU) float32 matmuls in a float32 check; the setting does not leak."""
  from glide_jax.interop import glide_text2im
  seen = []
  monkeypatch.setattr(glide_text2im, "check_dump",
                      lambda path, dtype=None: seen.append(jax.config.jax_default_matmul_precision) or {"out": 0.0})
  before = jax.config.jax_default_matmul_precision
  assert cli.main(["parity", str(reference_dir / "text2im_upsample.npz"), "--dtype", dtype]) == 0
  assert seen == [precision]
  assert jax.config.jax_default_matmul_precision == before
  assert ("precision='highest'" in capsys.readouterr().out) == (precision == "highest")
