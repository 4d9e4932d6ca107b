"""WebDataset tar shards -> the `image_folder` dataset (`glide-jax data build --webdataset`).

Input: img2dataset-style shards named by a brace pattern (`DIR/{00000..00099}.tar`, expanded with
`braceexpand`, the expansion webdataset itself uses), read with the standard library's `tarfile`.
Members are grouped into samples by key, the member's path up to the first dot of its base name
(`sub/000000012.jpg` -> key `sub/000000012`, extension `jpg`), as webdataset groups them. A sample
takes its image from the first member whose extension is an image_folder image extension and its
caption from `KEY.txt`, or else from the `caption_field` of `KEY.json`.

Output: the `image_folder` dataset (its features, its image decoding and encoding, its caption
rules, its split: the stable hash of the sample key), written as ArrayRecord in TFDS's layout under
`OUT/image_folder/1.0.0/`: input tar i of n becomes `image_folder-{train,validation}.array_record-
0000i-of-0000n` (no file when that split gets no example from the tar; TFDS skips zero-length
shards), so output names never depend on which machine converted which tar.

Resume and parts. Each input tar is one task (worker processes); its records go to a temporary
file under `webdataset/tmp/`, which is renamed to the final shard name when the tar is complete,
then its done marker `webdataset/done/0000i.json` (counts, bytes, skips) is written atomically: the
marker is what makes a shard finished. A rerun skips marked shards and redoes the rest. Part i of
n (`--shard-index i --num-shards n`) takes the tars whose position in the expansion is i mod n.
Whichever run finds every tar marked writes `features.json` and then `dataset_info.json` (the
split's shard lengths from the markers), which is what makes TFDS see the dataset as prepared; a
`--finalize` run does only that step. `webdataset/plan.json` (the expanded input list and the
conversion settings) is written by the first run and must match in every later run or part.
"""
from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import pathlib
import re
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

from glide_jax.data import image_folder

DATASET = "image_folder"
SPLITS = ("train", "validation")
FILE_SUFFIX = "array_record"
SKIP_REASONS = image_folder.SKIP_REASONS + (
    "missing_image",  # a key with members but no image member
    "caption_json_invalid",  # KEY.json (no KEY.txt) is not valid JSON
    "caption_field_missing",  # KEY.json has no caption field, or it is null or not a string
    "duplicate_key",  # a key seen before in the same tar (the later sample is skipped)
)
STATE_DIR = "webdataset"
PLAN_NAME = "plan.json"
MAX_EXAMPLE_KEYS = 100  # skipped keys kept per reason in a marker and in the report
_KEY_RE = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")  # webdataset's base_plus_ext rule
_FEATURES: dict[str, Any] = {}


def expand_pattern(pattern: str, must_exist: bool = True) -> list[str]:
  """The tar paths a brace pattern names, in order; every one must exist (unless must_exist=False:
  --finalize, which reads only the done markers, may run where the tars are not)."""
  from braceexpand import UnbalancedBracesError, braceexpand

  if not pattern:
    raise ValueError("--webdataset needs a pattern, e.g. DIR/{00000..00099}.tar")
  try:
    paths = [os.path.expanduser(p) for p in braceexpand(pattern)]
  except UnbalancedBracesError:
    raise ValueError(f"--webdataset {pattern!r}: unbalanced braces") from None
  seen: set[str] = set()
  dups = [p for p in paths if p in seen or seen.add(p)]
  if dups:
    raise ValueError(f"--webdataset {pattern!r} names {dups[0]} more than once")
  if must_exist and len(paths) == 1 and os.path.isdir(paths[0]):
    raise IsADirectoryError(f"--webdataset {pattern!r} is a directory; name the tars, e.g. "
                            f"'{pattern.rstrip('/')}/{{00000..00099}}.tar'")
  missing = [p for p in paths if must_exist and not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f"--webdataset {pattern!r}: {len(missing)} of {len(paths)} tar files do "
                            f"not exist, first {missing[0]}")
  return paths


def part_indices(num_inputs: int, shard_index: int, num_shards: int) -> list[int]:
  """The input positions part `shard_index` of `num_shards` converts: those equal to it mod n."""
  if num_shards < 1 or not 0 <= shard_index < num_shards:
    raise ValueError(f"--shard-index {shard_index} --num-shards {num_shards}: need 0 <= index < shards")
  return list(range(shard_index, num_inputs, num_shards))


def split_key(name: str) -> tuple[str, str] | None:
  """A member name -> (sample key, extension), or None for names webdataset ignores."""
  m = _KEY_RE.match(name)
  return (m.group(1), m.group(2)) if m else None


def iter_samples(path: str) -> Iterator[tuple[str, dict[str, bytes] | None]]:
  """(key, {extension: bytes}) per sample in tar order; None for a repeated key.

  Members are read in one sequential pass (`tarfile` stream mode, so gzip works too); a sample is a
  run of consecutive members with one key, as webdataset reads them.
  """
  seen: set[str] = set()
  key, members, dup = None, {}, False
  with tarfile.open(path, mode="r|*") as tar:
    for info in tar:
      if not info.isfile():
        continue
      parts = split_key(info.name)
      if parts is None:
        continue
      k, ext = parts
      if k != key:
        if key is not None:
          yield key, None if dup else members
        key, members, dup = k, {}, k in seen
        seen.add(k)
      data = tar.extractfile(info).read()
      if ext in members:  # the same file twice in one sample
        dup = True
      members[ext] = data
  if key is not None:
    yield key, None if dup else members


def sample_caption(members: dict[str, bytes], caption_field: str) -> tuple[str | None, str | None]:
  """(caption, None) or (None, skip reason): KEY.txt, else KEY.json[caption_field]."""
  if "txt" in members:
    return image_folder._decode_caption(members["txt"])  # image_folder's caption rules
  if "json" not in members:
    return None, "missing_caption"
  try:
    text = members["json"].decode("utf-8")
  except UnicodeDecodeError:
    return None, "caption_not_utf8"
  try:
    record = json.loads(text)
  except json.JSONDecodeError:
    return None, "caption_json_invalid"
  value = record.get(caption_field) if isinstance(record, dict) else None
  if not isinstance(value, str):
    return None, "caption_field_missing"
  return image_folder._decode_caption(value.encode("utf-8"))


def sample_image(members: dict[str, bytes], min_size: int, max_size: int):
  """(uint8 [H, W, 3], None) or (None, skip reason), decoded as image_folder decodes files."""
  lower = {ext.lower(): ext for ext in members}
  ext = next((e[1:] for e in image_folder.IMAGE_EXTENSIONS if e[1:] in lower), None)
  if ext is None:
    return None, "missing_image"
  return image_folder.load_image(members[lower[ext]], min_size, max_size)


def _builder(out: str, image_format: str):
  return image_folder.ImageFolder(data_dir=out, image_format=image_format, file_format=FILE_SUFFIX)


def _features(out: str, image_format: str):
  """The image_folder builder (for its PNG/JPEG encoder), its features and their tf.Example
  serializer (TFDS's own, as the builder's writer uses them)."""
  from tensorflow_datasets.core import example_serializer

  if image_format not in _FEATURES:
    builder = _builder(out, image_format)
    features = builder.info.features
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    _FEATURES[image_format] = (builder, features, serializer)
  return _FEATURES[image_format]


def serialize(features, serializer, example: dict[str, Any]) -> bytes:
  """TFDS's encode and tf.Example of an example, serialized with the feature map sorted by name:
  the bytes TFDS writes up to the order of the map, which protobuf otherwise leaves to the process
  (so a tar converted on another machine or in a rerun gives identical files)."""
  proto = serializer.get_tf_example(features.encode_example(example))
  return proto.SerializeToString(deterministic=True)


def shard_path(version_dir: str, split: str, index: int, num_inputs: int) -> str:
  """TFDS's name for output shard `index` of `num_inputs` of a split."""
  from tensorflow_datasets.core import naming

  template = naming.ShardedFileTemplate(data_dir=version_dir, dataset_name=DATASET, split=split,
                                        filetype_suffix=FILE_SUFFIX)
  return os.fspath(template.sharded_filepath(shard_index=index, num_shards=num_inputs))


def _write_json_atomic(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _marker_path(state: str, index: int) -> str:
  return os.path.join(state, "done", f"{index:05d}.json")


def convert_shard(task: dict[str, Any]) -> dict[str, Any]:
  """Converts one input tar into its output shards and writes its done marker; returns the marker."""
  from array_record.python import array_record_module

  s = task["settings"]
  index, path, version_dir, state = task["index"], task["input"], task["version_dir"], task["state"]
  builder, features, serializer = _features(task["out"], s["image_format"])
  finals = {sp: shard_path(version_dir, sp, index, task["num_inputs"]) for sp in SPLITS}
  tmp_dir = os.path.join(state, "tmp")
  for final in finals.values():  # left by a run interrupted before this tar's marker was written
    if os.path.exists(final):
      os.remove(final)
    for stale in os.listdir(tmp_dir):
      if stale.startswith(os.path.basename(final) + "."):
        os.remove(os.path.join(tmp_dir, stale))
  tmps = {sp: os.path.join(tmp_dir, f"{os.path.basename(f)}.{uuid.uuid4().hex}") for sp, f in finals.items()}
  writers: dict[str, Any] = {}
  examples = dict.fromkeys(SPLITS, 0)
  skipped: dict[str, list[str]] = {r: [] for r in SKIP_REASONS}
  counts = dict.fromkeys(SKIP_REASONS, 0)
  samples, complete = 0, False
  name = os.path.basename(path)
  try:
    for key, members in iter_samples(path):
      samples += 1
      problem, caption, image = None, None, None
      if members is None:
        problem = "duplicate_key"
      else:
        caption, problem = sample_caption(members, s["caption_field"])
        if problem is None:
          image, problem = sample_image(members, s["min_size"], s["max_size"])
      if problem is not None:
        counts[problem] += 1
        if len(skipped[problem]) < MAX_EXAMPLE_KEYS:
          skipped[problem].append(f"{name}:{key}")
        continue
      split = image_folder.split_of(key, s["val_fraction"])
      if split not in writers:
        writers[split] = array_record_module.ArrayRecordWriter(tmps[split], "group_size:1")
      record = serialize(features, serializer,  # image_folder's PNG/JPEG encoder:
                         {"image": builder._encode(image), "caption": caption, "file": key})
      writers[split].write(record)
      examples[split] += 1
    for w in writers.values():
      w.close()
    complete = True
  finally:
    if not complete:  # an error or an interruption: drop what this tar wrote
      for w in writers.values():
        try:
          w.close()
        except Exception:  # noqa: BLE001,S110  (the original error is the one to see)
          pass
      for tmp in tmps.values():
        if os.path.exists(tmp):
          os.remove(tmp)
  num_bytes = {}
  for sp in writers:
    num_bytes[sp] = os.path.getsize(tmps[sp])
    os.replace(tmps[sp], finals[sp])
  marker = {
      "index": index, "input": path, "input_bytes": os.path.getsize(path), "samples": samples,
      "kept": sum(examples.values()), "examples": examples, "num_bytes": num_bytes,
      "skipped_counts": counts, "skipped": skipped,
  }
  _write_json_atomic(_marker_path(state, index), marker)
  return marker


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _check_plan(state: str, plan: dict[str, Any], out: str, check_settings: bool = True) -> None:
  """Writes plan.json if absent (atomically: a concurrent part cannot slip in a different one),
  else refuses a run whose inputs or (check_settings) options differ from it."""
  path = os.path.join(state, PLAN_NAME)
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  with open(tmp, "w") as f:
    json.dump(plan, f, indent=2, sort_keys=True)
  try:
    os.link(tmp, path)
  except FileExistsError:
    pass
  finally:
    os.remove(tmp)
  have = _read_json(path)
  if have["inputs"] != plan["inputs"]:
    diff = next((i for i, (a, b) in enumerate(zip(have["inputs"], plan["inputs"])) if a != b), None)
    where = (f"input {diff} is {plan['inputs'][diff]}, was {have['inputs'][diff]}" if diff is not None
             else f"{len(plan['inputs'])} tars, was {len(have['inputs'])}")
    raise ValueError(f"{out} holds a WebDataset conversion of other tars ({where}); give every part "
                     "the same pattern, or use another --out")
  for k, v in plan["settings"].items():
    if check_settings and have["settings"].get(k) != v:
      raise ValueError(f"{out} holds a WebDataset conversion with {k}={have['settings'].get(k)!r}, "
                       f"not {v!r}; give every part the same options, or use another --out")


def _summary(markers: list[dict[str, Any]], max_keys: int) -> dict[str, Any]:
  skipped_counts = {r: sum(m["skipped_counts"].get(r, 0) for m in markers) for r in SKIP_REASONS}
  skipped: dict[str, list[str]] = {r: [] for r in SKIP_REASONS}
  for m in markers:
    for r in SKIP_REASONS:
      skipped[r].extend(m["skipped"].get(r, [])[:max_keys - len(skipped[r])])
  return {
      "input_shards": len(markers), "samples": sum(m["samples"] for m in markers),
      "kept": sum(m["kept"] for m in markers),
      "examples": {sp: sum(m["examples"][sp] for m in markers) for sp in SPLITS},
      "skipped_counts": skipped_counts, "skipped": skipped,
  }


def finalize(out: str | os.PathLike) -> dict[str, Any] | None:
  """Writes the dataset info once every input tar has its marker; returns the build report, or
  None while some are missing. Idempotent (parts finishing together write the same files)."""
  from tensorflow_datasets.core import naming
  from tensorflow_datasets.core import splits as splits_lib

  out = os.fspath(pathlib.Path(out).expanduser())
  builder = _builder(out, "png")
  version_dir = builder.data_dir
  state = os.path.join(version_dir, STATE_DIR)
  plan_path = os.path.join(state, PLAN_NAME)
  if not os.path.isfile(plan_path):
    raise FileNotFoundError(f"{out} holds no WebDataset conversion ({plan_path} missing); run "
                            "`glide-jax data build --webdataset PATTERN --out OUT` first")
  plan = _read_json(plan_path)
  n = len(plan["inputs"])
  if any(not os.path.isfile(_marker_path(state, i)) for i in range(n)):
    return None
  markers = [_read_json(_marker_path(state, i)) for i in range(n)]
  report = _summary(markers, MAX_EXAMPLE_KEYS)
  report.update(source="webdataset", pattern=plan["pattern"], dataset_dir=version_dir,
                file_format=FILE_SUFFIX, **plan["settings"])
  if not report["kept"]:
    raise ValueError(f"no usable captioned images in the {n} tars of {plan['pattern']}: "
                     f"{report['samples']} samples skipped {report['skipped_counts']}")
  infos = []
  for sp in SPLITS:
    lengths = [m["examples"][sp] for m in markers]
    if sum(lengths):
      template = naming.ShardedFileTemplate(data_dir=version_dir, dataset_name=DATASET, split=sp,
                                            filetype_suffix=FILE_SUFFIX)
      infos.append(splits_lib.SplitInfo(name=sp, shard_lengths=lengths, filename_template=template,
                                        num_bytes=sum(m["num_bytes"].get(sp, 0) for m in markers)))
  builder = _builder(out, plan["settings"]["image_format"])
  builder.info.set_splits(splits_lib.SplitDict(infos))
  with tempfile.TemporaryDirectory(dir=state) as tmp:
    builder.info.write_to_directory(tmp)
    _write_json_atomic(os.path.join(version_dir, image_folder.REPORT_NAME), report)
    names = sorted(os.listdir(tmp), key=lambda f: f == "dataset_info.json")  # the info file last
    for name in names:
      os.replace(os.path.join(tmp, name), os.path.join(version_dir, name))
  return report


def build_webdataset(pattern: str, out: str | os.PathLike, *, caption_field: str = "caption",
                     min_size: int = 64, max_size: int = 512, val_fraction: float = 0.05,
                     image_format: str = "png", workers: int = 4, shard_index: int = 0,
                     num_shards: int = 1, finalize_only: bool = False, progress: bool = False) -> dict[str, Any]:
  """Converts this part's unfinished tars and finalizes when all are done; returns the part's report
  (`part`) and, once the dataset is complete, the build report (`dataset`, else None)."""
  paths = expand_pattern(pattern, must_exist=not finalize_only)
  indices = part_indices(len(paths), shard_index, num_shards)
  if finalize_only:  # every part's tars, none converted
    indices, shard_index, num_shards = list(range(len(paths))), 0, 1
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"--val-fraction {val_fraction}: need 0 <= fraction < 1")
  out = os.fspath(pathlib.Path(out).expanduser())
  settings = {"caption_field": caption_field, "min_size": int(min_size), "max_size": int(max_size),
              "val_fraction": float(val_fraction), "image_format": image_format}
  builder = _builder(out, image_format)
  version_dir = builder.data_dir
  state = os.path.join(version_dir, STATE_DIR)
  if builder.is_prepared() and not os.path.isfile(os.path.join(state, PLAN_NAME)):
    raise FileExistsError(f"{version_dir} already holds an image_folder dataset not converted from "
                          "WebDataset tars; use another --out")
  if not finalize_only:
    for sub in ("done", "tmp"):
      os.makedirs(os.path.join(state, sub), exist_ok=True)
  elif not os.path.isfile(os.path.join(state, PLAN_NAME)):
    raise FileNotFoundError(f"{out} holds no WebDataset conversion to finalize "
                            f"({os.path.join(state, PLAN_NAME)} is missing)")
  _check_plan(state, {"pattern": pattern, "inputs": paths, "settings": settings}, out,
              check_settings=not finalize_only)

  todo, reused = [], []
  for i in indices:
    mp = _marker_path(state, i)
    if os.path.isfile(mp):
      if not finalize_only and _read_json(mp)["input_bytes"] != os.path.getsize(paths[i]):
        raise ValueError(f"{paths[i]} changed since it was converted into {out} (its size differs); "
                         "use another --out")
      reused.append(i)
    else:
      todo.append(i)
  failures: dict[int, str] = {}
  if not finalize_only and todo:
    tasks = [{"index": i, "input": paths[i], "num_inputs": len(paths), "out": out,
              "version_dir": version_dir, "state": state, "settings": settings} for i in todo]
    _run_tasks(tasks, workers, failures, progress)
  markers = [_read_json(_marker_path(state, i)) for i in indices if os.path.isfile(_marker_path(state, i))]
  part = _summary(markers, MAX_EXAMPLE_KEYS)
  part.update(shard_index=shard_index, num_shards=num_shards, shards=len(indices),
              converted=[] if finalize_only else [i for i in todo if i not in failures], reused=reused,
              failed={paths[i]: msg for i, msg in failures.items()}, finalize_only=finalize_only)
  if not finalize_only:  # the part's manifest: its tars' counts
    _write_json_atomic(os.path.join(state, f"part-{shard_index:05d}-of-{num_shards:05d}.json"), part)
  if failures:
    first = min(failures)
    raise ValueError(f"{len(failures)} of {len(indices)} input tars failed, first {paths[first]}: "
                     f"{failures[first]}; fix them and rerun (finished tars are kept)")
  dataset = finalize(out)
  pending = [p for i, p in enumerate(paths) if not os.path.isfile(_marker_path(state, i))]
  return {"part": part, "dataset": dataset, "pending": pending, "dataset_dir": version_dir}


def _run_tasks(tasks: list[dict[str, Any]], workers: int, failures: dict[int, str], progress: bool) -> None:
  """Runs convert_shard per task: in this process for workers <= 1, else in spawned processes
  (fresh interpreters: forking a process that runs TensorFlow or JAX threads can deadlock)."""
  from tqdm import tqdm

  bar = tqdm(total=len(tasks), desc="tars", unit="tar", disable=not progress)
  if workers <= 1:
    for t in tasks:
      try:
        convert_shard(t)
      except (OSError, tarfile.TarError, EOFError, ValueError) as e:
        failures[t["index"]] = f"{type(e).__name__}: {e}"
      bar.update()
    bar.close()
    return
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx) as pool:
    futures = {pool.submit(convert_shard, t): t for t in tasks}
    for fut in concurrent.futures.as_completed(futures):
      try:
        fut.result()
      except (OSError, tarfile.TarError, EOFError, ValueError) as e:
        failures[futures[fut]["index"]] = f"{type(e).__name__}: {e}"
      except concurrent.futures.process.BrokenProcessPool:
        raise ValueError(f"a worker process died while converting {futures[fut]['input']} (killed, or "
                         "out of memory?); rerun the same command to resume (finished tars are kept)") from None
      bar.update()
  bar.close()


def format_report(result: dict[str, Any], max_keys: int = 10) -> str:
  """The printed summary: this part's counts and skips, then the dataset's state."""
  part = result["part"]
  ex = part["examples"]
  head = ("webdataset --finalize: {shards} tars, {done} converted"
          if part.get("finalize_only") else
          "webdataset part {i} of {n}: {shards} tars ({now} converted now, {done} already done)")
  lines = [head.format(i=part["shard_index"], n=part["num_shards"], shards=part["shards"],
                       now=len(part["converted"]), done=len(part["reused"]))
           + f"; {part['kept']} of {part['samples']} samples kept (train {ex['train']}, "
             f"validation {ex['validation']})"]
  for reason in SKIP_REASONS:
    n = part["skipped_counts"][reason]
    if n:
      keys = part["skipped"][reason][:max_keys]
      lines.append(f"  skipped {n} {reason}: {', '.join(keys)}{' ...' if n > len(keys) else ''}")
  ds = result["dataset"]
  if ds is None:
    lines.append(f"{len(result['pending'])} tars of other parts not converted yet (first "
                 f"{result['pending'][0]}); the part that finishes last writes the dataset info, or "
                 "run the same command with --finalize once all are done")
  else:
    lines.append(f"dataset complete: {ds['kept']} of {ds['samples']} samples from {ds['input_shards']} "
                 f"tars (train {ds['examples']['train']}, validation {ds['examples']['validation']}) "
                 f"in {result['dataset_dir']}; report: "
                 f"{os.path.join(result['dataset_dir'], image_folder.REPORT_NAME)}")
  return "\n".join(lines)
