"""Guidance sweeps: sample the same prompts at several classifier-free guidance scales and measure
caption accuracy (glide_shapes attribute reader) and CLIP score at each, as a table and a plot.

Every scale uses the same prompts and the same noise (one PRNG key): rows differ only by the scale.
Layout of the output directory:
  prompts.txt                   the prompts, one per line (row i = image i of every scale)
  scale_<s>/00000.png ...       the samples (only they: the directory feeds `glide-jax eval accuracy`)
  grids/scale_<s>.png           the first 64 samples of each scale, framed green (caption read back
                                right) or red (wrong) when the prompts are glide_shapes captions
  sweep.csv, sweep.json         one row per scale (json adds the run's settings, metric definitions,
                                95 % intervals of each accuracy, confusion matrices and per-value
                                recall, and the paired comparison of every scale with the first,
                                `stats.paired_comparison`)
  sweep.png                     accuracy and CLIP score vs scale, and accuracy vs CLIP score

`rescore` rebuilds the table, statistics and plot from such a directory's samples, without sampling;
`compare_sweeps` pairs other sweeps' samples with a baseline sweep's, prompt by prompt (e.g. a
distilled student against its teacher on the same captions).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import pathlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from glide_jax.eval import attributes as attrs_lib
from glide_jax.eval import plots, stats

# prompts, guidance scale -> uint8 images [N, H, W, 3]
# generate(prompts, guidance_scale, sample_dir=None) -> uint8 [N, S, S, 3]. With sample_dir the
# generator may write each batch's PNGs there as it goes and resume from those already written.
GenerateFn = Callable[..., np.ndarray]

COLUMNS = ("guidance_scale", "n", "acc_all", "acc_colour", "acc_shape", "acc_size", "acc_position",
           "unreadable", "clip_score_mean", "clip_score_std", "samples_dir")

METRIC_DEFINITIONS = {
    "acc_*": "fraction of samples whose attributes, read back from pixels by the glide_shapes "
             "attribute reader (glide_jax/eval/attributes.py), equal the prompt's; acc_all = all four",
    "clip_score_*": "mean / std over samples of exp(logit_scale) x cos(z_text, z_image) = 100 x cosine, "
                    "with the given noised CLIP evaluated at t=0",
    "n": "samples per guidance scale",
    "ci95": "95 % Wilson score interval of each accuracy (sampling uncertainty over the n prompts)",
    "confusion": "per attribute, rows = value the prompt asked for, columns = value read back (last "
                 "column: unreadable); recall_by_value = its diagonal over the row sums",
    "paired": "each scale against the first on the same prompts and noise: difference in points, its "
              "95 % interval (Agresti-Min) and the exact McNemar two-sided p-value",
}

def scale_dirname(scale: float) -> str:
  return f"scale_{scale:g}"


def read_prompts(path: str | os.PathLike) -> list[str]:
  """One prompt per line (blank lines skipped), or a .json list, or the {file name: prompt}
  `prompts.json` that `glide-jax sample` writes (ordered by file name)."""
  path = pathlib.Path(path)
  if path.suffix.lower() == ".json":
    data = json.loads(path.read_text())
    if isinstance(data, dict):
      return [str(data[k]) for k in sorted(data)]
    if isinstance(data, list):
      return [str(x) for x in data]
    raise ValueError(f"{path}: expected a JSON list of prompts or a {{file: prompt}} object")
  lines = path.read_text().splitlines()
  prompts = [line.strip() for line in lines if line.strip()]
  if not prompts:
    raise ValueError(f"{path}: no prompts")
  return prompts


def shapes_validation_prompts(n: int) -> tuple[list[str], dict[str, np.ndarray]]:
  """The first n captions of glide_shapes' validation split and their attributes (no TFDS needed)."""
  from glide_jax.data import render

  a = render.sample_attributes(render.SPLIT_SEEDS["validation"], 0, n)
  captions = [render.caption(a["colour"][i], a["shape"][i], a["size"][i], a["position"][i],
                             a["template"][i]) for i in range(n)]
  return captions, {k: np.asarray(a[k], np.int64) for k in attrs_lib.ATTRIBUTES}


def save_images(directory: str | os.PathLike, images: np.ndarray, start: int = 0) -> pathlib.Path:
  """images[i] -> directory/{start + i:05d}.png, each written whole or not at all (temporary file,
  then rename), so an interrupted sweep never leaves a truncated sample behind."""
  from PIL import Image

  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  for i, im in enumerate(images):
    path = directory / f"{start + i:05d}.png"
    tmp = path.with_name(path.name + ".partial")
    Image.fromarray(np.asarray(im, np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)
  return directory


_CLAIM = ".sweep_settings.json"


class SampleDirError(ValueError):
  """A scale directory holds samples that are not this sweep's."""


def _prompts_digest(prompts: Sequence[str]) -> str:
  return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def _claim_sample_dir(directory: str | os.PathLike, settings: Mapping[str, Any]) -> None:
  """Records what a scale directory's samples are; refuses to mix them with another run's."""
  directory = pathlib.Path(directory)
  claim = directory / _CLAIM
  wanted = json.loads(json.dumps(dict(settings)))
  if claim.is_file():
    have = json.loads(claim.read_text())
    differ = sorted(k for k in set(have) | set(wanted) if have.get(k) != wanted.get(k))
    if differ:
      raise SampleDirError(f"{directory} holds samples of another sweep (differs in "
                       + ", ".join(f"{k}: {have.get(k)!r} there, {wanted.get(k)!r} now" for k in differ)
                       + "); give another --out or remove it")
    return
  if directory.is_dir() and any(directory.glob("*.png")):
    raise SampleDirError(f"{directory} holds samples of an unknown run (no {_CLAIM}); give another --out "
                     "or remove it")
  directory.mkdir(parents=True, exist_ok=True)
  tmp = claim.with_name(claim.name + ".partial")
  tmp.write_text(json.dumps(wanted, indent=2, sort_keys=True))
  os.replace(tmp, claim)


def _read_batch(directory: str | os.PathLike, start: int, n: int) -> np.ndarray | None:
  """The PNGs start..start+n-1 of a directory as uint8 [n, S, S, 3], or None if any is missing."""
  from PIL import Image

  paths = [pathlib.Path(directory) / f"{start + i:05d}.png" for i in range(n)]
  if not all(p.is_file() for p in paths):
    return None
  images = []
  for p in paths:
    with Image.open(p) as im:
      images.append(np.asarray(im.convert("RGB"), np.uint8))
  return np.stack(images)


def make_generator(bundle_path: str | os.PathLike, sampler: str | None = None,
                   respacing: str | None = None, batch_size: int = 16, seed: int = 0,
                   tokenizer: Any = None, dtype: str = "float32") -> tuple[GenerateFn, dict[str, Any]]:
  """A base (text2im) bundle or workdir -> generate(prompts, guidance_scale, sample_dir=None) ->
  uint8 [N, S, S, 3].

  Sampling goes through `glide_jax.sampling.generate` (what `glide-jax sample` runs):
  classifier-free guidance on one doubled batch, the text encoded once per batch, one compilation
  per (batch shape, sampler). Batch b of every scale uses the key fold_in(PRNGKey(seed), b), so
  all scales see the same noise.
  """
  import jax

  from glide_jax import sampling

  sm = sampling.load_sampler_model(bundle_path, tokenizer=tokenizer, dtype=sampling.compute_dtype(dtype))
  if sm.kind != "text2im":
    raise ValueError(f"{bundle_path}: a guidance sweep needs a base text2im bundle, this one is {sm.kind!r}")
  sampler = sampling.canonical_sampler(sampler or sm.diffusion_settings.get("sampler") or "ancestral")
  if respacing is None:  # the bundle's respacing; a sweep never defaults to all 1000 steps
    respacing = str(sm.diffusion_settings.get("timestep_respacing") or "100")
  diffusion = sampling.make_diffusion(sm, respacing)
  root = jax.random.PRNGKey(seed)

  settings = {"bundle": str(bundle_path), "sampler": sampler,
              "timestep_respacing": diffusion.timestep_respacing or str(diffusion.num_timesteps),
              "sampling_steps": int(diffusion.num_timesteps),
              "diffusion_steps": int(diffusion.original_num_steps), "image_size": int(sm.image_size),
              "seed": seed, "batch_size": batch_size}

  # What the samples depend on (the CLI adds bookkeeping to `settings` later).
  sample_settings = {**settings, "dtype": dtype}

  def generate(prompts: Sequence[str], guidance_scale: float,
               sample_dir: str | os.PathLike | None = None) -> np.ndarray:
    """With sample_dir, each batch's PNGs are written there as soon as it is sampled and a batch
    whose PNGs are all there already is read back, not sampled: a stopped sweep resumes where it
    stopped, with the same keys, so its samples are those of an uninterrupted run."""
    from tqdm import tqdm

    if sample_dir is not None:
      _claim_sample_dir(sample_dir, {**sample_settings, "guidance_scale": float(guidance_scale),
                                     "prompts_sha256": _prompts_digest(prompts)})
    starts = range(0, len(prompts), batch_size)
    out, resumed = [], 0
    for b, lo in enumerate(tqdm(starts, desc=f"scale {guidance_scale:g}", unit="batch", leave=False)):
      batch = list(prompts[lo:lo + batch_size])
      n = len(batch)
      if sample_dir is not None:
        done = _read_batch(sample_dir, lo, n)
        if done is not None:
          out.append(done)
          resumed += n
          continue
      batch += [batch[-1]] * (batch_size - n)  # fixed batch shape: one compilation
      x = sampling.generate(sm, batch, jax.random.fold_in(root, b), guidance_scale=float(guidance_scale),
                            sampler=sampler, respacing=respacing)
      images = np.clip(np.round((np.asarray(x[:n], np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
      if sample_dir is not None:
        save_images(sample_dir, images, start=lo)
      out.append(images)
    if resumed:
      print(f"scale {guidance_scale:g}: {resumed} of {len(prompts)} samples were already in {sample_dir}",
            file=sys.stderr)
    return np.concatenate(out)

  return generate, settings


def run_sweep(generate: GenerateFn, prompts: Sequence[str], scales: Sequence[float],
              out_dir: str | os.PathLike, attributes: Mapping[str, np.ndarray] | None = None,
              clip: Any = None, tensorboard: str | os.PathLike | None = None,
              settings: Mapping[str, Any] | None = None, log: Callable[[str], None] = print,
              write_samples: bool = True) -> list[dict[str, Any]]:
  """Samples `prompts` at each guidance scale and writes the table, plot and sample grids.

  attributes: {attribute: int [N]} of the prompts (caption accuracy is skipped without them);
  clip: a `clip_score.ClipBundle` or bundle path (CLIP score is skipped without one);
  write_samples=False leaves out_dir's prompts and sample PNGs alone (`rescore`).
  Returns the rows (also in out_dir/sweep.csv and sweep.json).
  """
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  if write_samples:
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
  correct_by_scale = []
  if clip is not None and not hasattr(clip, "model"):
    from glide_jax.eval.clip_score import load_clip_bundle
    clip = load_clip_bundle(clip)
  tb = plots.TensorBoard(tensorboard)
  rows = []
  for step, scale in enumerate(scales):
    sdir = out / scale_dirname(scale)
    images = generate(prompts, float(scale), sample_dir=sdir) if write_samples else generate(prompts, float(scale))
    if len(images) != len(prompts):
      raise RuntimeError(f"generator returned {len(images)} images for {len(prompts)} prompts")
    if write_samples:
      save_images(sdir, images)
    row: dict[str, Any] = {c: None for c in COLUMNS}
    row.update(guidance_scale=float(scale), n=len(images), samples_dir=str(sdir.relative_to(out)))
    frames = None
    if attributes is not None:
      acc = attrs_lib.caption_accuracy(images, attributes, return_per_sample=True)
      frames = acc["per_sample"][:64]
      row.update({f"acc_{k}": acc[k] for k in ("all",) + attrs_lib.ATTRIBUTES}, unreadable=acc["unreadable"])
      row["ci95"] = stats.wilson_intervals(acc["correct"])
      row["confusion"] = {a: m.tolist() for a, m in acc["confusion"].items()}
      row["recall_by_value"] = attrs_lib.recall_by_value(acc["confusion"])
      correct_by_scale.append(acc["correct"])
    # Green frame: all four attributes read back as the prompt asked; red: not.
    grid = plots.save_grid(out / "grids" / f"{scale_dirname(scale)}.png", images[:64],
                           scale=max(1, 128 // images.shape[1]), frames=frames)
    if clip is not None:
      from glide_jax.eval.clip_score import clip_score_of_samples
      cs = clip_score_of_samples(clip, images, prompts)
      row.update(clip_score_mean=cs["mean"], clip_score_std=cs["std"])
    rows.append(row)
    log(_row_summary(row))
    if row.get("recall_by_value"):
      log("  recall by value: " + attrs_lib.format_recall(row["recall_by_value"]))
    tb.scalars(round(scale * 1000), {k: v for k, v in row.items() if k.startswith(("acc_", "clip_"))},
               prefix="sweep/")
    from PIL import Image
    with Image.open(grid) as im:
      tb.image(f"samples/{scale_dirname(scale)}", np.asarray(im.convert("RGB")), step)
  paired = paired_comparisons(rows, correct_by_scale) if correct_by_scale else []
  for p in paired:
    log(_paired_summary(p))
  write_table(rows, out, settings=settings, paired=paired)
  if attributes is not None or clip is not None:
    plots.plot_sweep(rows, out / "sweep.png", title=_title(settings))
    tb.png("sweep/plot", out / "sweep.png", 0)
  tb.close()
  return rows


def paired_comparisons(rows: Sequence[Mapping[str, Any]],
                       correct_by_scale: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, Any]]:
  """Every scale after the first against the first, per attribute and all four (same prompts and
  noise at every scale, so the samples pair up)."""
  base_scale, base = rows[0]["guidance_scale"], correct_by_scale[0]
  out = []
  for row, correct in zip(rows[1:], correct_by_scale[1:]):
    entry: dict[str, Any] = {"scale": row["guidance_scale"], "baseline_scale": base_scale}
    for k in ("all",) + attrs_lib.ATTRIBUTES:
      c = stats.paired_comparison(base[k], correct[k])
      entry[k] = {"diff": c["diff"], "ci95": c["ci"], "only_baseline": c["only_a"],
                  "only_scale": c["only_b"], "p_value": c["p_value"]}
    out.append(entry)
  return out


def _paired_summary(p: Mapping[str, Any]) -> str:
  parts = [f"{k} {stats.format_points(p[k]['diff'])} points ({stats.format_points(p[k]['ci95'][0])} to "
           f"{stats.format_points(p[k]['ci95'][1])}, p={p[k]['p_value']:.2g})"
           for k in attrs_lib.ATTRIBUTES + ("all",)]
  return f"scale {p['scale']:g} vs {p['baseline_scale']:g} (paired, 95 % interval, McNemar): " + "; ".join(parts)


def rescore(sweep_dir: str | os.PathLike, clip: Any = None, tensorboard: str | os.PathLike | None = None,
            log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Re-reads a sweep directory's prompts.txt and scale_<s>/ samples and rewrites its table,
  statistics, plot and grids, without sampling (e.g. after the reader or the statistics changed)."""
  out = pathlib.Path(sweep_dir)
  if not (out / "prompts.txt").is_file():
    raise FileNotFoundError(f"{out}: no prompts.txt; not a sweep directory")
  prompts = read_prompts(out / "prompts.txt")
  scales = list(_sweep_scales(out))
  if not scales:
    raise FileNotFoundError(f"{out}: no scale_<s>/ sample directories")
  settings = {}
  if (out / "sweep.json").is_file():  # keep the scale order and the settings of the original run
    doc = json.loads((out / "sweep.json").read_text())
    settings = doc.get("settings", {})
    order = [r["guidance_scale"] for r in doc.get("rows", [])]
    scales.sort(key=lambda s: order.index(s) if s in order else len(order) + s)
  else:
    scales.sort()
  try:
    expected = attrs_lib.parse_captions(prompts)
  except ValueError:
    expected = None
  if expected is None and clip is None:
    raise ValueError(f"{out}: the prompts are not glide_shapes captions and no CLIP was given: nothing to measure")

  def load(ps, scale):
    from glide_jax.eval.fid import load_samples
    images, _ = load_samples(out / scale_dirname(scale))
    if len(images) != len(ps):
      raise ValueError(f"{out / scale_dirname(scale)}: {len(images)} samples for {len(ps)} prompts")
    return images

  return run_sweep(load, prompts, scales, out, attributes=expected, clip=clip, tensorboard=tensorboard,
                   settings=settings, log=log, write_samples=False)


def _title(settings: Mapping[str, Any] | None) -> str:
  if not settings:
    return "guidance sweep"
  return (f"guidance sweep: {pathlib.Path(str(settings.get('bundle', ''))).name} "
          f"({settings.get('sampler', '?')}, {settings.get('timestep_respacing', '?')} steps)")


def _row_summary(row: Mapping[str, Any]) -> str:
  parts = [f"scale {row['guidance_scale']:g}: n={row['n']}"]
  if row.get("acc_all") is not None:
    parts.append(f"accuracy all={row['acc_all']:.3f} (colour {row['acc_colour']:.3f}, shape "
                 f"{row['acc_shape']:.3f}, size {row['acc_size']:.3f}, position {row['acc_position']:.3f})")
  if row.get("clip_score_mean") is not None:
    parts.append(f"CLIP score {row['clip_score_mean']:.2f} +- {row['clip_score_std']:.2f} (100 x cosine)")
  return "; ".join(parts)


def write_table(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike,
                settings: Mapping[str, Any] | None = None,
                paired: Sequence[Mapping[str, Any]] = ()) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes out_dir/sweep.csv (one row per scale, COLUMNS; empty = not measured) and sweep.json
  (the rows with their 'ci95' intervals, and the paired comparisons)."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  csv_path, json_path = out / "sweep.csv", out / "sweep.json"
  with open(csv_path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS)
    w.writeheader()
    for r in rows:
      w.writerow({c: ("" if r.get(c) is None else r[c]) for c in COLUMNS})
  extra = ("ci95", "recall_by_value", "confusion")
  doc = {"rows": [{**{c: r.get(c) for c in COLUMNS}, **{k: r[k] for k in extra if r.get(k)}} for r in rows],
         "paired": list(paired), "settings": dict(settings or {}),
         "metrics": METRIC_DEFINITIONS, "chance_accuracy": attrs_lib.chance_accuracy()}
  json_path.write_text(json.dumps(doc, indent=2, default=_json_default))
  return csv_path, json_path


def read_table(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads sweep.csv back (numbers as floats/ints, empty cells as None)."""
  rows = []
  with open(path, newline="") as f:
    for r in csv.DictReader(f):
      row: dict[str, Any] = {}
      for k, v in r.items():
        if v == "":
          row[k] = None
        elif k in ("n", "unreadable"):
          row[k] = int(v)
        elif k == "samples_dir":
          row[k] = v
        else:
          row[k] = float(v)
      rows.append(row)
  return rows


def _json_default(o):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  raise TypeError(f"cannot write {type(o).__name__} to JSON")


def _sweep_scales(out: pathlib.Path) -> dict[float, pathlib.Path]:
  """A sweep directory's scale_<s>/ sample directories by scale (other names skipped)."""
  found = {}
  for d in out.glob("scale_*"):
    try:
      found[float(d.name[len("scale_"):])] = d
    except ValueError:
      continue
  return found


def _sweep_label(out: pathlib.Path) -> str:
  settings = {}
  if (out / "sweep.json").is_file():
    settings = json.loads((out / "sweep.json").read_text()).get("settings", {})
  if settings.get("sampler"):
    return f"{out.name} ({settings['sampler']} {settings.get('sampling_steps', '?')})"
  return out.name


def compare_sweeps(baseline: str | os.PathLike, others: Sequence[str | os.PathLike],
                   log: Callable[[str], None] = print) -> dict[str, Any]:
  """Caption accuracy of each sweep in `others` against the `baseline` sweep, paired prompt by prompt
  at every guidance scale both sampled (`stats.paired_comparison`: difference, 95 % interval, McNemar).

  The sweeps must have sampled the same prompts in the same order; a sweep of fewer prompts is
  compared on those (the first n of the other's), and the n is reported. Returns
  {'baseline', 'comparisons': [{'sweep', 'label', 'scale', 'n', <attribute or 'all'>: {...}}]}.
  """
  base = pathlib.Path(baseline)
  result: dict[str, Any] = {"baseline": str(base), "baseline_label": _sweep_label(base), "comparisons": []}
  cache: dict[tuple[str, float, int], dict[str, np.ndarray]] = {}

  def correct(out: pathlib.Path, scale: float, prompts: list[str]) -> dict[str, np.ndarray]:
    key = (str(out), scale, len(prompts))
    if key not in cache:
      from glide_jax.eval.fid import load_samples
      images, _ = load_samples(_sweep_scales(out)[scale])
      if len(images) < len(prompts):
        raise ValueError(f"{out / scale_dirname(scale)}: {len(images)} samples for {len(prompts)} prompts")
      acc = attrs_lib.caption_accuracy(images[:len(prompts)], attrs_lib.parse_captions(prompts),
                                       return_per_sample=True)
      cache[key] = acc["correct"]
    return cache[key]

  def prompts_of(out: pathlib.Path) -> list[str]:
    if not (out / "prompts.txt").is_file():
      raise FileNotFoundError(f"{out}: no prompts.txt; not a sweep directory (glide-jax eval sweep --out)")
    return read_prompts(out / "prompts.txt")

  base_prompts = prompts_of(base)
  for other in map(pathlib.Path, others):
    other_prompts = prompts_of(other)
    n = min(len(base_prompts), len(other_prompts))
    if base_prompts[:n] != other_prompts[:n]:
      i = next(i for i in range(n) if base_prompts[i] != other_prompts[i])
      raise ValueError(f"{other} and {base} sampled different prompts (first at line {i + 1}: "
                       f"{other_prompts[i]!r} against {base_prompts[i]!r}); pairs need the same prompts")
    shared = sorted(set(_sweep_scales(base)) & set(_sweep_scales(other)))
    if not shared:
      raise ValueError(f"{other} and {base} share no guidance scale (scale_<s>/ directories)")
    for scale in shared:
      a, b = correct(base, scale, base_prompts[:n]), correct(other, scale, base_prompts[:n])
      entry: dict[str, Any] = {"sweep": str(other), "label": _sweep_label(other), "scale": scale, "n": n}
      for k in ("all",) + attrs_lib.ATTRIBUTES:
        c = stats.paired_comparison(a[k], b[k])
        entry[k] = {"baseline": c["acc_a"], "sweep": c["acc_b"], "diff": c["diff"], "ci95": c["ci"],
                    "only_baseline": c["only_a"], "only_sweep": c["only_b"], "p_value": c["p_value"]}
      result["comparisons"].append(entry)
      log(f"{entry['label']} vs {result['baseline_label']}, scale {scale:g}, n={n}: " + "; ".join(
          f"{k} {100 * entry[k]['sweep']:.1f} vs {100 * entry[k]['baseline']:.1f} % "
          f"({stats.format_points(entry[k]['diff'])}, {stats.format_points(entry[k]['ci95'][0])} to "
          f"{stats.format_points(entry[k]['ci95'][1])}, p={entry[k]['p_value']:.2g})"
          for k in attrs_lib.ATTRIBUTES + ("all",)))
  return result
