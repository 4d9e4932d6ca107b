"""The input pipeline: batch contract, 2-process epoch coverage, exact resume, global arrays, masks."""
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from glide_jax.data import pipeline, render, tokenizers

N_TRAIN = 96
TOK = {"type": "words", "text_ctx": 12}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from glide_jax.data import shapes
  d = str(tmp_path_factory.mktemp("tfds"))
  shapes.GlideShapes(config="size32", train_examples=N_TRAIN, validation_examples=24,
                     data_dir=d).download_and_prepare()
  return d


def cfg(data_dir, **kw):
  c = {"name": "glide_shapes/size32", "data_dir": data_dir, "split": "train", "tokenizer": TOK}
  c.update(kw)
  return c


def take(it, n):
  return [next(it) for _ in range(n)]


def test_base_batch_contract(data_dir):
  it = pipeline.make_train_iterator(cfg(data_dir), "base", 8, 32, seed=3, process_index=0,
                                    process_count=1, keep_captions=True)
  b = next(it)
  assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
  assert b["tokens"].shape == (8, 12) and b["tokens"].dtype == np.int32 and b["mask"].dtype == bool
  for key in ("colour", "shape", "size", "position"):
    assert b[key].shape == (8,) and b[key].dtype == np.int32
  # Against the renderer: pixels (no resize at 32 px: exact), attributes and tokens per index.
  seed = render.SPLIT_SEEDS["train"]
  for row, i in enumerate(b["index"]):
    ex = next(render.generate(seed, int(i), 1, 32))
    np.testing.assert_allclose(b["image"][row], ex["image"] / 127.5 - 1.0, atol=1e-6)
    assert b["caption"][row].decode() == ex["caption"]
    assert [int(b[k][row]) for k in ("colour", "shape", "size", "position")] == \
        [ex["colour"], ex["shape"], ex["size"], ex["position"]]
  tok = tokenizers.load_tokenizer(TOK)
  want_tokens, want_mask = tok.encode_batch([c.decode() for c in b["caption"]])
  np.testing.assert_array_equal(b["tokens"], want_tokens)
  np.testing.assert_array_equal(b["mask"], want_mask)
  # No horizontal flip: an example whose shape is on the left stays on the left.
  left = [r for r in range(8) if b["position"][r] == 0]
  for r in left:
    img = b["image"][r]
    spread = img.max(-1) - img.min(-1)
    assert spread[:, :16].sum() > 5 * spread[:, 16:].sum()


def test_two_processes_cover_each_epoch_once(data_dir):
  G = 16
  its = [pipeline.make_train_iterator(cfg(data_dir), "base", G, 32, seed=5, process_index=p,
                                      process_count=2) for p in range(2)]
  steps_per_epoch = N_TRAIN // G
  epochs = []
  for _ in range(2):
    seen = []
    for _ in range(steps_per_epoch):
      parts = [next(it)["index"] for it in its]
      assert all(len(p) == G // 2 for p in parts)
      global_batch = np.concatenate(parts)
      assert len(set(global_batch.tolist())) == G  # no example twice in a global batch
      assert not set(parts[0]) & set(parts[1])  # hosts disjoint
      seen.extend(global_batch.tolist())
    assert sorted(seen) == list(range(N_TRAIN))  # complete, each once
    epochs.append(seen)
  assert epochs[0] != epochs[1]  # reshuffled per epoch
  # The two hosts computed the same permutation: host 0 alone with process_count=1 sees the same order.
  single = pipeline.make_train_iterator(cfg(data_dir), "base", G, 32, seed=5, process_index=0, process_count=1)
  assert np.concatenate([next(single)["index"] for _ in range(steps_per_epoch)]).tolist() == epochs[0]


def test_exact_resume_and_state_checks(data_dir):
  c = cfg(data_dir, masks={"kind": "random", "min_known": 0.3, "max_known": 0.9})
  make = lambda seed=1: pipeline.make_train_iterator(c, "inpaint", 8, 32, seed=seed, process_index=0,
                                                     process_count=1)
  it = make()
  first = take(it, 3)
  state = it.get_state()
  assert state["step"] == 3
  rest = take(it, 14)  # crosses into the next epoch (12 steps per epoch)
  resumed = make()
  resumed.set_state(state)
  again = take(resumed, 14)
  for a, b in zip(rest, again):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert resumed.get_state()["step"] == 17 and resumed.epoch == 1
  other = take(make(seed=2), 3)
  assert any(not np.array_equal(a["index"], b["index"]) for a, b in zip(first, other))
  bad = make(seed=2)
  with pytest.raises(ValueError, match="seed"):
    bad.set_state(state)


def test_upsample_low_res_is_area_downsampled(data_dir):
  it = pipeline.make_train_iterator(cfg(data_dir, low_res_size=8), "upsample", 4, 32, seed=0,
                                    process_index=0, process_count=1)
  b = next(it)
  assert b["low_res"].shape == (4, 8, 8, 3)
  pixels = (b["image"] + 1) * 127.5
  want = np.round(pixels.reshape(4, 8, 4, 8, 4, 3).mean(axis=(2, 4))) / 127.5 - 1
  np.testing.assert_allclose(b["low_res"], want, atol=1e-5)
  aug = pipeline.make_train_iterator(cfg(data_dir, low_res_size=8, low_res_blur=1.0, low_res_noise=0.1),
                                     "upsample", 4, 32, seed=0, process_index=0, process_count=1)
  b2 = next(aug)
  np.testing.assert_array_equal(b2["image"], b["image"])
  diff = np.abs(b2["low_res"] - b["low_res"]).mean()
  assert 0.005 < diff < 0.3 and np.abs(b2["low_res"]).max() <= 1


def test_resize_and_centre_crop_keeps_left_and_right():
  img = np.zeros((40, 80, 3), np.uint8)
  img[:, :40] = (255, 0, 0)
  img[:, 40:] = (0, 0, 255)
  out = pipeline.resize_and_crop(tf.constant(img), 16, tf.constant([0, 0], tf.int64), False).numpy()
  assert out.shape == (16, 16, 3)
  assert out[:, :7, 0].min() > 250 and out[:, 9:, 2].min() > 250  # red stays left, blue right
  grey = pipeline.resize_and_crop(tf.constant(img[..., :1]), 16, tf.constant([0, 0], tf.int64), True)
  assert grey.shape == (16, 16, 3)


def test_masks_area_kinds_determinism():
  from glide_jax.data import masks
  seeds = tf.stack([tf.zeros(120, tf.int64), tf.range(120, dtype=tf.int64)], -1)
  for kind_cfg in ({"rect_prob": 1.0, "ellipse_prob": 0.0}, {"rect_prob": 0.0, "ellipse_prob": 1.0},
                   {"rect_prob": 0.0, "ellipse_prob": 0.0}):
    c = masks.MaskConfig.from_config({"min_known": 0.6, "max_known": 0.8, **kind_cfg})
    draw = tf.function(lambda s, c=c: masks.random_masks(s, 64, c))  # graph mode, as in tf.data
    m = draw(seeds).numpy()
    assert m.shape == (120, 64, 64, 1) and set(np.unique(m)) <= {0.0, 1.0}
    hole = 1 - m.mean(axis=(1, 2, 3))
    assert hole.min() > 0.05 and hole.max() < 0.55  # target 0.2 .. 0.4
    assert 0.2 < np.median(hole) < 0.4, (kind_cfg, np.median(hole))
    np.testing.assert_array_equal(m, draw(seeds).numpy())
  m = masks.random_masks(seeds[:2], 32, masks.MaskConfig()).numpy()
  assert not np.array_equal(m[0], m[1])
  with pytest.raises(ValueError, match="unknown data.masks keys"):
    masks.MaskConfig.from_config({"colour": 1})


def test_global_batch_on_mesh_and_state(data_dir):
  """The trainer's path (program.put_batch -> sharding.host_local_to_global): host rows become a
  global array sharded over the batch axes; the iterator's state resumes at the next batch."""
  import jax
  from jax.sharding import Mesh

  from glide_jax.parallel import sharding as shard_lib
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
  it = pipeline.make_train_iterator(cfg(data_dir), "base", 8, 32, seed=9, process_index=0, process_count=1)
  ref = pipeline.make_train_iterator(cfg(data_dir), "base", 8, 32, seed=9, process_index=0, process_count=1)
  host = next(it)
  g = shard_lib.host_local_to_global({k: host[k] for k in ("image", "tokens", "index")}, mesh)
  h = next(ref)
  assert isinstance(g["image"], jax.Array) and g["image"].shape == (8, 32, 32, 3)
  assert len(g["image"].addressable_shards) == 8 and g["image"].addressable_shards[0].data.shape == (1, 32, 32, 3)
  np.testing.assert_array_equal(np.asarray(g["tokens"]), h["tokens"])
  np.testing.assert_array_equal(np.asarray(g["image"]), h["image"])
  state = it.get_state()
  assert state["step"] == 1
  nxt = next(it)
  ref.set_state(state)
  np.testing.assert_array_equal(nxt["index"], next(ref)["index"])


def test_eval_iterator_and_errors(data_dir):
  c = cfg(data_dir)
  batches = list(pipeline.make_eval_iterator(c, "base", 8, 16, split="validation", process_index=1,
                                             process_count=2))
  assert [b["index"].tolist() for b in batches] == [[4, 5, 6, 7], [12, 13, 14, 15], [20, 21, 22, 23]]
  assert batches[0]["image"].shape == (4, 16, 16, 3)  # resized 32 -> 16 with antialiasing
  # The noised CLIP stage reads the same image-text pairs.
  clip = next(pipeline.make_eval_iterator(c, "clip", 8, 16, split="validation", process_index=1,
                                          process_count=2))
  assert sorted(clip) == sorted(batches[0])
  for key in clip:
    np.testing.assert_array_equal(clip[key], batches[0][key])
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.make_train_iterator(c, "base", 9, 32, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="fewer than one global batch"):
    pipeline.make_train_iterator(c, "base", 128, 32, process_index=0, process_count=1)
  with pytest.raises(KeyError, match="nope"):
    pipeline.make_train_iterator(cfg(data_dir, caption_key="nope"), "base", 8, 32, process_index=0,
                                 process_count=1)
  with pytest.raises(ValueError, match="not a registered TFDS dataset"):
    pipeline.make_train_iterator(cfg(data_dir, name="no_such_dataset_xyz"), "base", 8, 32,
                                 process_index=0, process_count=1)
  with pytest.raises(FileNotFoundError, match="glide-jax data build"):
    pipeline.make_train_iterator(cfg(data_dir, name="image_folder"), "base", 8, 32,
                                 process_index=0, process_count=1)


def test_sliced_split_reads_the_right_records(data_dir):
  """Split slicing becomes skip/take over the shard: record k of 'train[40:72]' is example 40 + k."""
  c = cfg(data_dir, split="train[40:72]")
  it = pipeline.make_train_iterator(c, "base", 8, 32, seed=0, process_index=0, process_count=1,
                                    keep_captions=True)
  assert it.num_examples == 32
  seed = render.SPLIT_SEEDS["train"]
  seen = []
  for _ in range(4):
    b = next(it)
    for row, k in enumerate(b["index"]):
      ex = next(render.generate(seed, 40 + int(k), 1, 32))
      assert b["caption"][row].decode() == ex["caption"]
      np.testing.assert_allclose(b["image"][row], ex["image"] / 127.5 - 1.0, atol=1e-6)
      seen.append(int(k))
  assert sorted(seen) == list(range(32))


def test_any_tfds_dataset_with_nested_caption_list(tmp_path):
  """A coco_captions-like dataset: image + captions/text (a list); mapped by data.image_key/caption_key."""
  import tensorflow_datasets as tfds

  class TinyCocoLike(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "picture": tfds.features.Image(shape=(None, None, 3)),
          "captions": tfds.features.Sequence({"text": tfds.features.Text(), "id": np.int64}),
          "objects": tfds.features.Sequence({"label": tfds.features.ClassLabel(num_classes=3)}),
      }), disable_shuffling=True)  # record k is example k

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(8):
        img = np.full((20 + i, 30, 3), 10 * i, np.uint8)
        caps = [{"text": f"caption {i} {j}", "id": 10 * i + j} for j in range(i % 3 + 1)]
        yield i, {"picture": img, "captions": caps, "objects": [{"label": 1}]}

  TinyCocoLike(data_dir=str(tmp_path)).download_and_prepare()
  c = {"name": "tiny_coco_like", "data_dir": str(tmp_path), "split": "train", "image_key": "picture",
       "caption_key": "captions/text", "tokenizer": TOK}
  it = pipeline.make_train_iterator(c, "base", 8, 16, seed=0, process_index=0, process_count=1,
                                    keep_captions=True)
  chosen = {}
  for _ in range(4):  # one caption of the example's list, chosen per epoch
    b = next(it)
    assert b["image"].shape == (8, 16, 16, 3)
    for row, i in enumerate(b["index"]):
      cap = b["caption"][row].decode()
      assert cap.startswith(f"caption {i} ") and int(cap.split()[-1]) <= int(i) % 3
      chosen.setdefault(int(i), set()).add(cap)
      np.testing.assert_allclose(b["image"][row], 10 * int(i) / 127.5 - 1, atol=1e-4)
  assert len(chosen[2] | chosen[5]) >= 3  # the examples with three captions do not always get the first
  ev = next(pipeline.make_eval_iterator(c, "base", 8, 16, split="train", process_index=0, process_count=1))
  assert [x.decode() for x in ev["caption"]] == [f"caption {i} 0" for i in range(8)]  # eval: the first


def test_array_record_datasets_read_the_same(tmp_path):
  from glide_jax.data import shapes
  shapes.GlideShapes(config="size32", train_examples=24, validation_examples=8, data_dir=str(tmp_path),
                     file_format="array_record").download_and_prepare()
  it = pipeline.make_train_iterator(cfg(str(tmp_path)), "base", 8, 32, seed=0, process_index=0,
                                    process_count=1)
  seen = []
  for _ in range(3):
    b = next(it)
    for row, i in enumerate(b["index"]):
      ex = next(render.generate(render.SPLIT_SEEDS["train"], int(i), 1, 32))
      np.testing.assert_allclose(b["image"][row], ex["image"] / 127.5 - 1.0, atol=1e-6)
      seen.append(int(i))
  assert sorted(seen) == list(range(24))
