"""A real 2-process jax.distributed job (launch/local.py): each host feeds its rows, the global
batches are assembled on a 4-device mesh, and every global batch holds distinct examples covering
the epoch once, identical as seen from both hosts."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # multi-process jobs (docs/testing.md)

ROOT = pathlib.Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import json, os, sys
    import jax, numpy as np
    from glide_jax.parallel import multihost
    multihost.initialize()
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh
    from glide_jax.data import pipeline
    from glide_jax.parallel import sharding
    cfg = {"name": "glide_shapes/size32", "data_dir": sys.argv[1], "split": "train",
           "tokenizer": {"type": "words", "text_ctx": 8}}
    it = pipeline.make_train_iterator(cfg, "base", 8, 32, seed=4)  # process index/count from jax
    mesh = Mesh(np.array(jax.devices()).reshape(4), ("data",))
    steps = []
    for _ in range(2 * 32 // 8):  # two epochs of 32 examples
      host = next(it)
      g = sharding.host_local_to_global({k: host[k] for k in ("image", "tokens", "index")}, mesh)
      assert g["image"].shape == (8, 32, 32, 3) and g["tokens"].shape == (8, 8)
      index = multihost_utils.process_allgather(g["index"], tiled=True)
      image = multihost_utils.process_allgather(g["image"], tiled=True)
      steps.append({"index": np.asarray(index).tolist(), "pixel_sum": float(np.asarray(image).sum())})
    # One write of the whole line (gloo's log lines share the unbuffered stdout).
    sys.stdout.write("RESULT " + json.dumps({"process": jax.process_index(), "count": jax.process_count(),
                                             "local_batch": it.local_batch_size, "steps": steps}) + "\\n")
    sys.stdout.flush()
""")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from glide_jax.data import shapes
  d = str(tmp_path_factory.mktemp("tfds"))
  shapes.GlideShapes(config="size32", train_examples=32, validation_examples=8,
                     data_dir=d).download_and_prepare()
  return d


def test_two_hosts_feed_disjoint_rows_of_each_global_batch(data_dir, tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # local.py sets the device count per process
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  out = subprocess.run([sys.executable, str(ROOT / "launch" / "local.py"), "--processes", "2",
                        "--devices-per-process", "2", "--timeout", "360", "--", sys.executable, str(script),
                        data_dir], capture_output=True, text=True, env=env, timeout=420, check=False)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  results = [json.loads(line.split("RESULT ", 1)[1]) for line in out.stdout.splitlines() if "RESULT " in line]
  assert sorted(r["process"] for r in results) == [0, 1]
  assert all(r["count"] == 2 and r["local_batch"] == 4 for r in results)
  a, b = results
  assert a["steps"] == b["steps"]  # both hosts see the same global batches
  for epoch in range(2):
    seen = []
    for step in a["steps"][epoch * 4:(epoch + 1) * 4]:
      assert len(set(step["index"])) == 8  # no example twice in a global batch
      seen += step["index"]
    assert sorted(seen) == list(range(32))  # the epoch is covered once
