"""`glide-jax parity`: exit 0 on a reference dump, non-zero on a tampered copy or a broken file."""
import shutil

import numpy as np

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
