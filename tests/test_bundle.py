import json
import pathlib

import numpy as np
import pytest

from glide_jax import bundle


def test_round_trip_and_tokenizer_files(tmp_path):
  params = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": np.ones(4, np.float32)}
  tok = tmp_path / "tok.model"
  tok.write_bytes(b"abc")
  out = bundle.save_bundle(tmp_path / "b", params, {"model": {"kind": "text2im", "options": {"x": 1}},
                                                   "tokenizer": {"type": "sentencepiece"}},
                           tokenizer_files={"tok.model": tok})
  loaded, meta = bundle.load_bundle(out)
  np.testing.assert_array_equal(loaded["a"]["kernel"], params["a"]["kernel"])
  np.testing.assert_array_equal(loaded["b"], params["b"])
  assert meta["model"]["options"] == {"x": 1}
  assert pathlib.Path(meta["tokenizer"]["files"]["tok.model"]).read_bytes() == b"abc"
  # Overwriting leaves exactly one complete bundle and no temporaries.
  bundle.save_bundle(out, {"b": np.zeros(2, np.float32)}, {"model": {"kind": "text2im"}})
  assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "tok.model"]
  assert json.loads((out / "meta.json").read_text())["format"] == bundle.FORMAT


def test_failed_write_leaves_nothing(tmp_path):
  with pytest.raises(TypeError):
    bundle.save_bundle(tmp_path / "b", {"w": np.ones(2)}, {"model": {"kind": "x"}, "bad": object()})
  assert list(tmp_path.iterdir()) == []


def test_not_a_bundle(tmp_path):
  with pytest.raises(FileNotFoundError, match="meta.json"):
    bundle.load_bundle(tmp_path)
