"""The input pipeline: a TFDS split -> host-local numpy batches -> global jax.Arrays.

Order and resume. The examples of epoch e are visited in the order of a stateless permutation of
[0, N) keyed by (seed, e) (`tf.random.experimental.index_shuffle`, nothing materialised). Global
step s covers positions [s*G, (s+1)*G) of its epoch (G = global batch, s counted from the start of
training, epoch = s // (N // G); the last N mod G positions of an epoch are skipped); process p
takes rows [p*G/P, (p+1)*G/P) of it. So the hosts read disjoint examples, no example appears twice
in a global batch, and an epoch is covered once. The whole pipeline state is the next step number:
`get_state()` / `set_state()` resume exactly. Random augmentation (crops, caption choice, masks,
low-res blur/noise) is keyed by (seed, epoch, example index), so a resumed run sees the same pixels.

Reading. Examples are fetched by index from the prepared TFDS files (`RecordSource`: a byte-offset
index over TFRecord shards, or ArrayRecord's own random access), a local batch at a time, then
decoded, resized, cropped and augmented in parallel tf.data maps (AUTOTUNE, deterministic order),
tokenised a batch at a time, and prefetched; the train program (`Program.put_batch`) makes global
jax.Arrays of them for the train step.

Batch keys (docs/architecture.md "Batches"): image [B, H, W, 3] float32 in [-1, 1]; tokens [B, L]
int32; mask [B, L] bool; low_res [B, h, w, 3] (when data.low_res_size > 0, and for the upsample
stage); inpaint_mask [B, H, W, 1] float32, 1 = known (inpaint); colour/shape/size/position int32
[B] when the dataset has them; index int32 [B] (the example's record number in the split).
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from glide_jax import settings
from glide_jax.constants import STAGES
from glide_jax.data import formats
from glide_jax.data import tokenizers as tokenizers_lib

log = logging.getLogger(__name__)

ATTRIBUTE_KEYS = ("colour", "shape", "size", "position")
_INFINITE_STEPS = 2 ** 62


# ----------------------------------------------------------------------------- config access

# The `data` section's keys and defaults (configs/common.py declares the same; a test checks).
# Read through `data_section`, so a misspelt key is refused by name instead of taking a default.
DATA_DEFAULTS = {
    "name": "glide_shapes/size32", "data_dir": "", "split": "train", "image_key": "image",
    "caption_key": "caption", "tokenizer": None, "caption_dropout": 0.2, "low_res_size": 0,
    "low_res_blur": 0.0, "low_res_noise": 0.0, "random_crop": True, "masks": None,
    "num_threads": 0, "prepare_timeout": 3600.0}


def data_section(data_cfg: Any):
  """The config's `data` (ConfigDict, dict or None) as attributes over DATA_DEFAULTS."""
  return settings.section(data_cfg, DATA_DEFAULTS, "data")


# ----------------------------------------------------------------------------- datasets

# How long a process waits for another to prepare a procedural dataset (data.prepare_timeout).
DEFAULT_PREPARE_TIMEOUT = DATA_DEFAULTS["prepare_timeout"]


def load_builder(data_cfg: Any):
  """The TFDS builder named by data.name; glide_shapes (procedural) is prepared on first use, once.

  In a multi-process run (or two runs sharing a data dir) one process prepares, under a file lock
  next to the dataset's directory, while the others wait up to data.prepare_timeout seconds
  (`prepare_once`). Other datasets must be prepared beforehand: a clear error names the command.
  """
  import tensorflow_datasets as tfds

  import glide_jax.data  # noqa: F401  (registers glide_shapes and image_folder)

  data_cfg = data_section(data_cfg)
  name = str(data_cfg.name)
  data_dir = data_cfg.data_dir or None
  if data_dir:
    data_dir = os.path.expanduser(data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"data.name={name!r} is not a registered TFDS dataset: {e}") from None
  if not builder.is_prepared():
    if name.split("/")[0] == "glide_shapes":
      timeout = float(data_cfg.prepare_timeout)
      builder = prepare_once(name, data_dir, builder, timeout)
    elif name.split("/")[0] == "image_folder":
      raise FileNotFoundError(f"no image_folder dataset in {builder.data_dir}; build it with "
                              "`glide-jax data build --images DIR --out DATA_DIR` and set data.data_dir")
    else:
      raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared in {builder.data_dir}; "
                              f"prepare it first (`tfds build {name}`) or fix data.data_dir")
  return builder


def _process_index() -> int:
  """This process's index once jax.distributed runs (multihost.initialize), else 0."""
  import jax
  return jax.process_index() if jax.distributed.is_initialized() else 0


def prepare_once(name: str, data_dir: str | None, builder, timeout: float):
  """Prepares `builder` unless another process is doing so; returns a builder of the prepared data.

  A local or network file system (NFS, Lustre with flock): whoever takes the lock
  `<dir>/.<version>.prepare.lock` first prepares (TFDS writes a temporary directory and renames
  it), the others block on the lock and then read the result; so on a data dir local to each host,
  each host prepares its own copy once. A bucket (gs://...) or a file system without flock: process
  0 prepares and the others poll for the finished dataset. Either wait ends after `timeout` seconds
  with an error naming the directory and the command that prepares it.
  """
  import time

  import filelock
  import tensorflow_datasets as tfds

  from glide_jax import errors

  target = os.fspath(builder.data_dir)
  root = data_dir or os.fspath(builder.data_dir_root)
  command = _prepare_command(name, root)

  def prepare(b):
    log.info("process %d: preparing %s in %s (procedural, offline)", _process_index(), name, target)
    b.download_and_prepare(file_format=DEFAULT_FILE_FORMAT)
    return b

  def too_long(what: str, hint: str = "") -> errors.UserError:
    return errors.UserError(f"waited {timeout:g} s (data.prepare_timeout) for {what} to prepare {name} in "
                            f"{target}; prepare it before the run with `{command}`, or raise "
                            f"data.prepare_timeout{hint}")

  parent, version = os.path.split(target.rstrip("/"))
  lock_path = os.path.join(parent, f".{version}.prepare.lock")
  if "://" not in target:
    os.makedirs(parent, exist_ok=True)
    lock = filelock.FileLock(lock_path)
    try:
      try:
        lock.acquire(timeout=0)
      except filelock.Timeout:
        log.info("process %d: waiting for %s to be prepared in %s by another process (lock %s, up to %.0f s)",
                 _process_index(), name, target, lock.lock_file, timeout)
        try:
          lock.acquire(timeout=timeout)
        except filelock.Timeout:
          raise too_long(f"the process holding {lock_path}", " (a file system that only emulates locks "
                         "may have left the file behind a crashed process: then remove it)") from None
    except (NotImplementedError, OSError) as e:  # no flock here (Lustre -o noflock, some FUSE mounts)
      log.info("no file lock in %s (%s): process 0 prepares %s", parent, e, name)
    else:
      try:
        fresh = tfds.builder(name, data_dir=data_dir)  # another process may have prepared it meanwhile
        return fresh if fresh.is_prepared() else prepare(fresh)
      finally:
        lock.release()
  if _process_index() == 0:
    return prepare(builder)
  log.info("process %d: waiting for %s to be prepared in %s by process 0 (up to %.0f s)", _process_index(),
           name, target, timeout)
  deadline = time.monotonic() + timeout
  while True:
    fresh = tfds.builder(name, data_dir=data_dir)
    if fresh.is_prepared():
      return fresh
    if time.monotonic() > deadline:
      raise too_long("process 0")
    time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))


def _prepare_command(name: str, data_dir: str) -> str:
  """The `glide-jax data prepare` command line that prepares data.name `name` in `data_dir`."""
  import tensorflow_datasets as tfds

  dataset, kwargs = tfds.core.naming.parse_builder_name_kwargs(name)
  parts = [f"glide-jax data prepare --name {dataset.name}/{kwargs.get('config', 'size32')}"]
  for key in ("train_examples", "validation_examples"):
    if key in kwargs:
      parts.append(f"--{key.replace('_', '-')} {kwargs[key]}")
  return " ".join(parts + [f"--data-dir {data_dir}"])


# The formats RecordSource reads and the one preparation writes (docs in formats.py).
FILE_FORMATS, DEFAULT_FILE_FORMAT = formats.FILE_FORMATS, formats.DEFAULT_FILE_FORMAT


class RecordSource:
  """Random access to the serialized examples of one prepared TFDS split (local or gfile paths).

  The format is the one the dataset's stored dataset_info names (`builder.info.file_format`), so
  TFRecord datasets prepared before ArrayRecord became the default keep working. ArrayRecord: no
  work at construction (a reader opens per shard and thread on first use, `_open_array_record`);
  a read is one C++ call per shard touched, with no Python thread pool (ArrayRecordDataSource
  waits on Python futures inside the tf.data numpy_function, which deadlocked when an iterator was
  deleted while such a read was in flight: the deleting thread holds the GIL the futures need).
  TFRecord: a byte-offset index built by
  reading every record header (`_index_tfrecord`): 0.7-2 s per million records from the page
  cache here (benchmarks/data_open.py), far more over gs://.
  """

  def __init__(self, builder, split: str):
    import tensorflow_datasets as tfds

    try:
      instructions = builder.info.splits[split].file_instructions
    except (KeyError, ValueError) as e:
      raise ValueError(f"{builder.name}: no split {split!r} (have {list(builder.info.splits)}): {e}") from None
    self.split = split
    self._format = builder.info.file_format or tfds.core.FileFormat.TFRECORD
    self.file_format = self._format.value
    if not instructions:
      raise ValueError(f"{builder.name}: split {split!r} selects no examples")
    self._local = threading.local()
    if self._format == tfds.core.FileFormat.ARRAY_RECORD:
      # Record k of the split: shard i = searchsorted(ends, k, 'right'), position skip_i + k - start_i.
      self._files = [ins.filename for ins in instructions]
      self._skips = np.asarray([ins.skip for ins in instructions], np.int64)
      takes = np.asarray([ins.take for ins in instructions], np.int64)
      self._ends = np.cumsum(takes)
      self._starts = self._ends - takes
      self.num_examples = int(self._ends[-1])
      self._array_record = True
      return
    self._array_record = False
    if self._format != tfds.core.FileFormat.TFRECORD:
      raise ValueError(f"{builder.name}: file format {self._format.value} is not supported "
                       f"(supported: {', '.join(FILE_FORMATS)})")
    self._files: list[str] = []
    offsets, lengths, file_ids = [], [], []
    for fid, ins in enumerate(instructions):
      off, ln = _index_tfrecord(ins.filename)
      take = len(off) - ins.skip if ins.take in (-1, None) else ins.take
      offsets.append(off[ins.skip:ins.skip + take])
      lengths.append(ln[ins.skip:ins.skip + take])
      file_ids.append(np.full(take, fid, np.int32))
      self._files.append(ins.filename)
    self._offsets = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)
    self._lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    self._file_ids = np.concatenate(file_ids) if file_ids else np.zeros(0, np.int32)
    self.num_examples = len(self._offsets)

  def _array_reader(self, fid: int):
    readers = getattr(self._local, "readers", None)
    if readers is None:
      readers = self._local.readers = {}
    if fid not in readers:
      readers[fid] = _open_array_record(self._files[fid])
    return readers[fid]

  def _handle(self, fid: int):
    handles = getattr(self._local, "handles", None)
    if handles is None:
      handles = self._local.handles = {}
    if fid not in handles:
      path = self._files[fid]
      if "://" in path:
        import tensorflow as tf
        handles[fid] = tf.io.gfile.GFile(path, "rb")
      else:
        handles[fid] = open(path, "rb")  # noqa: SIM115  (kept open for random reads)
    return handles[fid]

  def read(self, indices: np.ndarray) -> np.ndarray:
    """indices: int [n] -> serialized examples, object array [n] of bytes."""
    indices = np.asarray(indices, np.int64)
    out = np.empty(len(indices), dtype=object)
    if self._array_record:
      if len(indices) and (indices.min() < 0 or indices.max() >= self.num_examples):
        raise IndexError(f"record index out of range [0, {self.num_examples}) in split {self.split!r}")
      shard = np.searchsorted(self._ends, indices, side="right")
      for fid in np.unique(shard):
        rows = np.nonzero(shard == fid)[0]
        positions = self._skips[fid] + indices[rows] - self._starts[fid]
        for row, record in zip(rows, self._array_reader(int(fid)).read(positions.tolist())):
          out[row] = record
      return out
    order = np.lexsort((self._offsets[indices], self._file_ids[indices]))  # read sequentially
    for j in order:
      i = indices[j]
      f = self._handle(int(self._file_ids[i]))
      f.seek(int(self._offsets[i]))
      out[j] = f.read(int(self._lengths[i]))
    return out


def _open_array_record(path: str):
  """A random-access ArrayRecord reader (the options TFDS's and grain's data sources use)."""
  from array_record.python import array_record_module

  return array_record_module.ArrayRecordReader(path, options="readahead_buffer_size:0",
                                               file_reader_buffer_size=32768)


def _index_tfrecord(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Byte offset and length of every record's payload in a TFRecord file.

  Format: uint64 length, uint32 crc(length), payload, uint32 crc(payload).
  """
  if "://" in path:
    import tensorflow as tf
    f = tf.io.gfile.GFile(path, "rb")
  else:
    f = open(path, "rb")  # noqa: SIM115  (closed by the `with` below)
  offsets, lengths = [], []
  with f:
    pos = 0
    while True:
      header = f.read(8)
      if not header:
        break
      if len(header) < 8:
        raise ValueError(f"{path}: truncated TFRecord header at byte {pos}")
      n = int.from_bytes(header, "little")
      offsets.append(pos + 12)
      lengths.append(n)
      pos += 12 + n + 4
      f.seek(pos)
  return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)


# ----------------------------------------------------------------------------- preprocessing

def _get_path(example: Mapping, key: str):
  value = example
  for part in key.split("/"):
    if part not in value:
      raise KeyError(f"feature {key!r} not found; the example has {sorted(example)}")
    value = value[part]
  return value


def _decoders(features, keep: set[str]):
  """Skips decoding unused image-like features (e.g. a second image); the rest is cheap to decode.

  (SkipDecoding only applies to leaf features, not to nested dicts or sequences of dicts.)
  """
  import tensorflow_datasets as tfds

  expensive = (tfds.features.Image, tfds.features.Video, tfds.features.Audio)
  return {name: tfds.decode.SkipDecoding() for name, feature in features.items()
          if name not in keep and isinstance(feature, expensive)}


def resize_and_crop(image, size: int, seed, random_crop: bool):
  """uint8/float image [h, w, c] -> float32 [size, size, 3] in [0, 255].

  Scales the short side to `size` with an antialiased filter (only if it differs), then crops
  (random position if random_crop, else the centre). No flips: captions say left and right.
  """
  import tensorflow as tf

  image = tf.convert_to_tensor(image)
  channels = image.shape[-1]
  if channels == 1:
    image = tf.image.grayscale_to_rgb(image)
  elif channels == 4:
    image = image[..., :3]
  image = tf.cast(image, tf.float32)
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  scale = size / tf.minimum(h, w)
  new_h = tf.maximum(size, tf.cast(tf.round(h * scale), tf.int32))
  new_w = tf.maximum(size, tf.cast(tf.round(w * scale), tf.int32))
  image = tf.cond(
      tf.logical_and(tf.equal(shape[0], new_h), tf.equal(shape[1], new_w)),
      lambda: image,
      lambda: tf.image.resize(image, [new_h, new_w], method="bicubic", antialias=True))
  if random_crop:
    off = tf.random.stateless_uniform([2], seed=seed, minval=0, maxval=2 ** 30, dtype=tf.int32)
    top = off[0] % (new_h - size + 1)
    left = off[1] % (new_w - size + 1)
  else:
    top, left = (new_h - size) // 2, (new_w - size) // 2
  image = image[top:top + size, left:left + size, :]
  image = tf.ensure_shape(image, [size, size, 3])
  return tf.clip_by_value(image, 0.0, 255.0)


def make_low_res(images, seeds, low_res_size: int, blur_sigma: float = 0.0, noise_std: float = 0.0):
  """Area-downsampled low-res inputs in [-1, 1], rounded to 8 bits like a sampled 64 px image.

  images: [B, H, W, 3] float32 in [-1, 1]; seeds: int64 [B, 2] (one per example). Optional
  augmentation: a Gaussian blur with sigma uniform in [0, blur_sigma] low-res pixels, and Gaussian
  noise with std uniform in [0, noise_std] ([-1, 1] units). Returns [B, l, l, 3] float32.
  """
  import tensorflow as tf

  low = tf.image.resize((images + 1.0) * 127.5, [low_res_size, low_res_size], method="area")
  low = tf.round(low)  # the sampler rounds the 64 px sample to 8 bits before upsampling
  if blur_sigma <= 0 and noise_std <= 0:
    return tf.clip_by_value(low / 127.5 - 1.0, -1.0, 1.0)

  def draws(seed):
    s = tf.random.experimental.stateless_split(seed, 3)
    return (tf.random.stateless_uniform([], s[0], 0.0, max(blur_sigma, 1e-6)) + 1e-3,
            tf.random.stateless_uniform([], s[1], 0.0, max(noise_std, 1e-6)),
            tf.random.stateless_normal([low_res_size, low_res_size, 3], s[2]))

  sigma, std, noise = tf.map_fn(
      draws, tf.cast(seeds, tf.int64),
      fn_output_signature=(tf.float32, tf.float32, tf.TensorSpec([low_res_size, low_res_size, 3], tf.float32)))
  if blur_sigma > 0:
    # Per-example separable Gaussian: examples x channels folded into the depthwise channels.
    radius = int(np.ceil(3 * blur_sigma))
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    k = tf.exp(-0.5 * (x[None, :] / sigma[:, None]) ** 2)
    k = k / tf.reduce_sum(k, -1, keepdims=True)  # [B, K]
    k = tf.repeat(k, 3, axis=0)  # [B*3, K], example-major like the folded channels
    n = tf.shape(low)[0]
    folded = tf.reshape(tf.transpose(low, [1, 2, 0, 3]), [1, low_res_size, low_res_size, -1])
    folded = tf.pad(folded, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    kx = tf.transpose(k)[None, :, :, None]  # [1, K, B*3, 1]
    ky = tf.transpose(k)[:, None, :, None]  # [K, 1, B*3, 1]
    folded = tf.nn.depthwise_conv2d(folded, kx, [1, 1, 1, 1], "VALID")
    folded = tf.nn.depthwise_conv2d(folded, ky, [1, 1, 1, 1], "VALID")
    low = tf.transpose(tf.reshape(folded, [low_res_size, low_res_size, n, 3]), [2, 0, 1, 3])
  low = low / 127.5 - 1.0
  if noise_std > 0:
    low = low + std[:, None, None, None] * noise
  return tf.clip_by_value(low, -1.0, 1.0)


def _pick_caption(captions, seed, random_choice: bool):
  """A scalar string from a string or a 1-D list of strings (one chosen per example)."""
  import tensorflow as tf

  if captions.shape.rank == 0:
    return captions
  n = tf.shape(captions)[0]
  if random_choice:
    i = tf.random.stateless_uniform([], seed, 0, tf.maximum(n, 1), dtype=tf.int32)
  else:
    i = 0
  return tf.cond(n > 0, lambda: captions[tf.minimum(i, n - 1)], lambda: tf.constant(""))


class _Spec:
  """Everything the per-example function needs, fixed at pipeline construction."""

  def __init__(self, data_cfg, stage, image_size, train, seed, features):
    if stage not in STAGES:
      raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    self.stage = stage
    self.image_size = int(image_size)
    self.train = train
    self.seed = int(seed)
    data_cfg = data_section(data_cfg)
    self.image_key = str(data_cfg.image_key)
    self.caption_key = str(data_cfg.caption_key)
    self.random_crop = bool(data_cfg.random_crop) and train
    # Low-res conditioning whenever data.low_res_size > 0 (upsample, and upsample-inpaint).
    self.low_res_size = int(data_cfg.low_res_size)
    if stage == "upsample" and self.low_res_size <= 0:
      self.low_res_size = self.image_size // 4
    self.low_res_blur = float(data_cfg.low_res_blur) if train else 0.0
    self.low_res_noise = float(data_cfg.low_res_noise) if train else 0.0
    from glide_jax.data import masks
    self.masks = masks.MaskConfig.from_config(dict(data_cfg.masks or {}))
    top = {k.split("/")[0] for k in (self.image_key, self.caption_key)}
    names = set(features.keys())
    for key in top:
      if key not in names:
        raise KeyError(f"data.image_key/caption_key: feature {key!r} is not in the dataset "
                       f"(features: {sorted(names)})")
    self.attributes = [k for k in ATTRIBUTE_KEYS if k in names]
    self.keep = top | set(self.attributes)
    if stage == "inpaint" and self.masks.kind == "none":
      raise ValueError("the inpaint stage needs data.masks.kind = 'random'")
    if self.low_res_size and self.low_res_size >= self.image_size:
      raise ValueError(f"data.low_res_size={self.low_res_size} must be below image_size={self.image_size}")


def _example_fn(spec: _Spec, features):
  """(serialized, index, epoch) -> dict of per-example tensors (caption still a string)."""
  import tensorflow as tf

  decoders = _decoders(features, spec.keep)

  def fn(serialized, index, epoch):
    ex = features.deserialize_example(serialized, decoders=decoders)
    # Augmentation seed: a pure function of (seed, epoch, example index).
    seed = tf.stack([tf.cast(spec.seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64),
                     tf.cast(index, tf.int64)])
    seeds = tf.random.experimental.stateless_split(seed, 4)
    image = resize_and_crop(_get_path(ex, spec.image_key), spec.image_size, seeds[0], spec.random_crop)
    out = {"image": image / 127.5 - 1.0,
           "caption": _pick_caption(_get_path(ex, spec.caption_key), seeds[1], spec.train),
           "index": tf.cast(index, tf.int32),
           "_seed": seeds[2]}  # for the batched low-res and mask draws
    for key in spec.attributes:
      out[key] = tf.cast(ex[key], tf.int32)
    return out

  return fn


def _batch_fn(spec: _Spec):
  """Batched, per-example-seeded extras: low_res (upsample) and inpaint_mask (inpaint)."""
  from glide_jax.data import masks

  def fn(batch):
    batch = dict(batch)
    seeds = batch.pop("_seed")
    if spec.low_res_size > 0:
      batch["low_res"] = make_low_res(batch["image"], seeds, spec.low_res_size, spec.low_res_blur,
                                      spec.low_res_noise)
    if spec.stage == "inpaint":
      batch["inpaint_mask"] = masks.random_masks(seeds, spec.image_size, spec.masks)
    return batch

  return fn


def _tokenize_fn(tokenizer: tokenizers_lib.Tokenizer):
  import tensorflow as tf

  L = tokenizer.text_ctx

  def encode(captions):
    tokens, mask = tokenizer.encode_batch([c.decode("utf-8", "replace") for c in captions])
    return tokens, mask

  def fn(batch):
    tokens, mask = tf.numpy_function(encode, [batch["caption"]], (tf.int32, tf.bool), stateful=False)
    batch = dict(batch)
    batch["tokens"] = tf.ensure_shape(tokens, [None, L])
    batch["mask"] = tf.ensure_shape(mask, [None, L])
    return batch

  return fn


def _set_options(ds, data_cfg):
  import tensorflow as tf

  options = tf.data.Options()
  options.deterministic = True
  threads = int(data_section(data_cfg).num_threads)
  if threads > 0:
    options.threading.private_threadpool_size = int(threads)
  options.autotune.enabled = True
  return ds.with_options(options)


# ----------------------------------------------------------------------------- iterators

def _processes(process_index, process_count):
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
  return int(process_index), int(process_count)


class TrainIterator:
  """Infinite iterator of host-local batches (numpy dicts) with exact `get_state`/`set_state`.

  The state is {"step": next global step, "seed", "num_examples", "global_batch_size"}; restoring
  it into an iterator built with another seed, dataset size or batch size is an error.
  """

  def __init__(self, source: RecordSource, features, spec: _Spec, tokenizer, global_batch_size: int,
               process_index: int, process_count: int, data_cfg, keep_captions: bool = False):
    if global_batch_size % process_count:
      raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} processes")
    self.source, self.features, self.spec, self.tokenizer = source, features, spec, tokenizer
    self.global_batch_size = int(global_batch_size)
    self.local_batch_size = self.global_batch_size // process_count
    self.process_index, self.process_count = process_index, process_count
    self.num_examples = source.num_examples
    self.steps_per_epoch = self.num_examples // self.global_batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f"split {source.split!r} has {self.num_examples} examples, fewer than one "
                       f"global batch of {self.global_batch_size}")
    self.data_cfg = data_cfg
    self.keep_captions = keep_captions
    self._step = 0
    self._it = None

  # The dataset for steps start_step, start_step + 1, ... of this process.
  def dataset(self, start_step: int):
    import tensorflow as tf

    G, B, p = self.global_batch_size, self.local_batch_size, self.process_index
    spe, n, seed = self.steps_per_epoch, self.num_examples, self.spec.seed

    def indices(step):
      epoch = step // spe
      pos = (step % spe) * G + p * B + tf.range(B, dtype=tf.int64)
      idx = tf.random.experimental.index_shuffle(
          pos, seed=tf.stack([tf.constant(seed, tf.int64), epoch]), max_index=tf.constant(n - 1, tf.int64))
      return idx, tf.fill([B], epoch)

    def read(idx, epoch):
      serialized = tf.numpy_function(self.source.read, [idx], tf.string, stateful=False)
      return tf.ensure_shape(serialized, [B]), idx, epoch

    ds = tf.data.Dataset.range(start_step, _INFINITE_STEPS)
    ds = ds.map(indices).map(read, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.unbatch()
    ds = ds.map(_example_fn(self.spec, self.features), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(B, drop_remainder=True)
    ds = ds.map(_batch_fn(self.spec), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(_tokenize_fn(self.tokenizer), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return _set_options(ds, self.data_cfg)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._it = iter(self.dataset(self._step).as_numpy_iterator())
    batch = next(self._it)
    self._step += 1
    if not self.keep_captions:
      batch.pop("caption", None)
    return batch

  @property
  def epoch(self) -> int:
    return self._step // self.steps_per_epoch

  def get_state(self) -> dict[str, int]:
    return {"step": self._step, "seed": self.spec.seed, "num_examples": self.num_examples,
            "global_batch_size": self.global_batch_size}

  def set_state(self, state: Mapping[str, Any]) -> None:
    for key in ("seed", "num_examples", "global_batch_size"):
      mine = self.get_state()[key]
      if key in state and int(state[key]) != mine:
        raise ValueError(f"data iterator state has {key}={state[key]}, this pipeline has {mine}")
    self._step = int(state["step"])
    self._it = None  # rebuilt lazily from the restored step


def _make(data_cfg, stage, image_size, tokenizer, seed, split, train):
  builder = load_builder(data_cfg)
  source = RecordSource(builder, split)
  features = builder.info.features
  spec = _Spec(data_cfg, stage, image_size, train, seed, features)
  if tokenizer is None or isinstance(tokenizer, Mapping) or hasattr(tokenizer, "to_dict"):
    tokenizer = tokenizer_from_config(data_cfg if tokenizer is None else {"tokenizer": tokenizer})
  return source, features, spec, tokenizer


def tokenizer_from_config(data_cfg) -> tokenizers_lib.Tokenizer:
  """data.tokenizer {type, path | files, text_ctx} -> a Tokenizer."""
  tokenizer = data_section(data_cfg).tokenizer
  tok = tokenizer.to_dict() if hasattr(tokenizer, "to_dict") else dict(tokenizer or {})
  if not tok or not tok.get("type"):
    raise ValueError("data.tokenizer needs a type ('sentencepiece' or 'gpt2_bpe') and a path")
  return tokenizers_lib.load_tokenizer(tok)


def make_train_iterator(data_cfg: Any, stage: str, global_batch_size: int, image_size: int,
                        tokenizer: Any = None, seed: int = 0, process_index: int | None = None,
                        process_count: int | None = None, keep_captions: bool = False) -> TrainIterator:
  """The trainer's input: an infinite iterator of this host's batches, resumable exactly.

  data_cfg: the config's `data` (dict or ConfigDict): name, data_dir, split, image_key,
  caption_key, tokenizer, low_res_size, low_res_blur, low_res_noise, masks, random_crop,
  num_threads. stage: 'base' | 'upsample' | 'inpaint' | 'clip'. tokenizer: a Tokenizer, a
  tokenizer spec dict, or None (built from data.tokenizer). Each batch has
  global_batch_size / process_count rows.
  """
  data_cfg = data_section(data_cfg)
  split = str(data_cfg.split)
  source, features, spec, tokenizer = _make(data_cfg, stage, image_size, tokenizer, seed, split, True)
  pi, pc = _processes(process_index, process_count)
  return TrainIterator(source, features, spec, tokenizer, global_batch_size, pi, pc, data_cfg,
                       keep_captions)


def make_eval_iterator(data_cfg: Any, stage: str, global_batch_size: int, image_size: int,
                       tokenizer: Any = None, split: str = "validation", seed: int = 0,
                       num_examples: int | None = None, process_index: int | None = None,
                       process_count: int | None = None,
                       keep_captions: bool = True) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the first `num_examples` (default all) of a split, in order, centre crops.

  Global batch s is examples [s*G, (s+1)*G); process p gets rows [p*G/P, (p+1)*G/P). A final
  partial global batch is dropped (so every batch has the same shape).
  """
  import tensorflow as tf

  data_cfg = data_section(data_cfg)
  source, features, spec, tokenizer = _make(data_cfg, stage, image_size, tokenizer, seed, split, False)
  pi, pc = _processes(process_index, process_count)
  if global_batch_size % pc:
    raise ValueError(f"global batch {global_batch_size} is not divisible by {pc} processes")
  B = global_batch_size // pc
  n = source.num_examples if num_examples is None else min(num_examples, source.num_examples)
  steps = n // global_batch_size
  idx = (np.arange(steps, dtype=np.int64)[:, None] * global_batch_size + pi * B
         + np.arange(B, dtype=np.int64)[None, :])
  ds = tf.data.Dataset.from_tensor_slices(idx)

  def read(i):
    serialized = tf.numpy_function(source.read, [i], tf.string, stateful=False)
    return tf.ensure_shape(serialized, [B]), i, tf.zeros([B], tf.int64)

  ds = ds.map(read).unbatch()
  ds = ds.map(_example_fn(spec, features), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(B, drop_remainder=True).map(_batch_fn(spec)).map(_tokenize_fn(tokenizer))
  ds = ds.prefetch(tf.data.AUTOTUNE)
  for batch in _set_options(ds, data_cfg).as_numpy_iterator():
    if not keep_captions:
      batch.pop("caption", None)
    yield batch
