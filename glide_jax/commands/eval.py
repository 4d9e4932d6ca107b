"""`glide-jax eval accuracy|clip-score|fid|sweep`: evaluate samples.

  accuracy    caption accuracy of glide_shapes samples (attribute reader), per attribute and all four
  clip-score  CLIP score (100 x cosine) of samples and their prompts under a noised CLIP at t=0
  fid         FID (FID Inception-v3, weights from a file you provide) vs a reference image set
  sweep       sample at several guidance scales; table, plot and grids of accuracy / CLIP score, with
              95 % intervals and each scale compared with the first on the same prompts (McNemar);
              --rescore DIR rebuilds them from a sweep's saved samples without sampling
  compare     caption accuracy of sweeps against a baseline sweep on the same prompts, paired
              prompt by prompt at every shared scale (difference, 95 % interval, McNemar)

Images are read from a directory in file-name order; prompts files hold one caption per line in
the same order. Every metric is printed with what it is (sample count, reference set, scale) and
can be written to JSON with --out.
"""
from __future__ import annotations

import argparse
import csv
import json
import pathlib
import sys
from typing import Any

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.description = __doc__
  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  sub = parser.add_subparsers(dest="eval_command", metavar="METRIC", required=True)

  images_help = ("directory of samples (PNG), in file-name order; a `glide-jax sample` output "
                 "directory (with its prompts.json) brings its own prompts")
  p = sub.add_parser("accuracy", help="caption accuracy of glide_shapes samples")
  p.add_argument("--images", required=True, help=images_help)
  g = p.add_mutually_exclusive_group()
  g.add_argument("--attributes", help="expected attributes: .json ({attr: [...]} or [{attr: ...}]) or "
                                      ".csv with columns colour,shape,size,position (indices or names)")
  g.add_argument("--prompts", help="the prompts in glide_shapes caption templates: one per line, or .json")
  p.add_argument("--grid", help="write a PNG grid of the first 256 samples, framed green (read back "
                                "right) or red (wrong)")
  p.add_argument("--out", help="write the result as JSON here")
  _add_tensorboard(p)

  p = sub.add_parser("clip-score", help="CLIP score of samples under a noised CLIP at t=0")
  p.add_argument("--images", required=True, help=images_help)
  p.add_argument("--prompts", help="one prompt per line (or .json), image order")
  p.add_argument("--clip-bundle", required=True, help="noised CLIP bundle (glide-jax export / import-torch)")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--out")
  _add_tensorboard(p)

  p = sub.add_parser("fid", help="FID against a reference set (FID Inception-v3 pool3)")
  p.add_argument("--images", required=True, help="directory of samples")
  p.add_argument("--reference", required=True,
                 help="directory of reference images, or an .npz of statistics from --save-stats")
  p.add_argument("--reference-name", help="name to report for the reference set (default: its path)")
  p.add_argument("--inception-weights", required=True,
                 help="pt_inception-2015-12-05-6726825d.pth (pytorch-fid's FID weights) or a "
                      ".safetensors/.npz conversion; never downloaded")
  p.add_argument("--batch-size", type=int, default=50)
  p.add_argument("--precision-recall", type=int, metavar="K", default=0,
                 help="also improved precision/recall with K nearest neighbours (needs reference images)")
  p.add_argument("--save-stats", help="also write the --images set's statistics to this .npz "
                                      "(reuse it later as --reference)")
  p.add_argument("--out")
  _add_tensorboard(p)

  p = sub.add_parser("sweep", help="guidance sweep: accuracy / CLIP score vs guidance scale")
  p.add_argument("--bundle", help="base (text2im) bundle to sample (not with --rescore)")
  p.add_argument("--clip-bundle", help="noised CLIP bundle for CLIP scores (optional)")
  p.add_argument("--scales", default="1,2,3,5",
                 help="comma-separated guidance scales; the first is the baseline the others are compared with")
  g = p.add_mutually_exclusive_group(required=True)
  g.add_argument("--prompts", help="prompts file (glide_shapes captions give accuracy too)")
  g.add_argument("--shapes-validation", type=int, metavar="N",
                 help="use the first N captions of glide_shapes' validation split")
  g.add_argument("--rescore", metavar="DIR",
                 help="re-read an earlier sweep's output directory (prompts.txt, scale_*/) and rewrite "
                      "its table, statistics, plot and grids; no sampling")
  p.add_argument("--out", help="output directory (required unless --rescore); samples are written batch by "
                               "batch, and the same command run again resumes a stopped sweep from them")
  p.add_argument("--sampler", default=None, help="ancestral | ddim | plms | dpm++ (default: the bundle's)")
  p.add_argument("--steps", default=None, help="timestep respacing, e.g. 50 or ddim25 (default: the bundle's, else 100)")
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                 help="compute dtype of the model (parameters stay as stored; norms and softmax in float32)")
  p.add_argument("--tensorboard", help="also log scalars, grids and the plot to this TensorBoard dir")


  p = sub.add_parser("compare", help="sweeps against a baseline sweep, paired prompt by prompt")
  p.add_argument("baseline", help="the baseline's `eval sweep --out` directory")
  p.add_argument("sweeps", nargs="+", help="the other sweeps' directories (same prompts; a sweep of "
                                           "fewer prompts is compared on its first n)")
  p.add_argument("--out", help="write the comparisons as JSON here")


def _add_tensorboard(p: argparse.ArgumentParser) -> None:
  p.add_argument("--tensorboard", help="also log the result as TensorBoard scalars in this directory")
  p.add_argument("--step", type=int, default=0, help="TensorBoard step (e.g. the training step of the samples)")


def _log_tensorboard(args, values: dict[str, float]) -> None:
  if getattr(args, "tensorboard", None):
    from glide_jax.eval import plots
    tb = plots.TensorBoard(args.tensorboard)
    tb.scalars(args.step, values)
    tb.close()


def _write_json(path: str | None, result: dict[str, Any]) -> None:
  if path:
    clean = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in result.items()}
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(path).write_text(json.dumps(clean, indent=2))


def read_attributes_file(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """.json or .csv of expected attributes -> {attribute: int64 [N]}; names or indices accepted."""
  from glide_jax.eval import attributes as A

  path = pathlib.Path(path)
  names = {"colour": A.COLOURS, "shape": A.SHAPES, "size": A.SIZES, "position": A.POSITIONS}
  if path.suffix.lower() == ".json":
    data = json.loads(path.read_text())
    if isinstance(data, list):
      rows = data
    elif isinstance(data, dict):
      lengths = {len(v) for v in data.values()}
      if len(lengths) != 1:
        raise ValueError(f"{path}: attribute lists differ in length {sorted(lengths)}")
      rows = [dict(zip(data, vals)) for vals in zip(*data.values())]
    else:
      raise ValueError(f"{path}: expected a JSON list of rows or a dict of lists")
  elif path.suffix.lower() == ".csv":
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f))
  else:
    raise ValueError(f"{path}: attributes file must be .json or .csv")
  out: dict[str, list[int]] = {a: [] for a in A.ATTRIBUTES}
  for i, row in enumerate(rows):
    for a in A.ATTRIBUTES:
      if a not in row:
        raise KeyError(f"{path}: row {i} has no {a!r} (has {sorted(row)})")
      v = row[a]
      if isinstance(v, str) and not v.strip().lstrip("-").isdigit():
        if v.strip() not in names[a]:
          raise ValueError(f"{path}: row {i}: {a}={v!r} is not one of {names[a]}")
        v = names[a].index(v.strip())
      v = int(v)
      if not 0 <= v < A.NUM_CLASSES[a]:
        raise ValueError(f"{path}: row {i}: {a}={v} out of range 0..{A.NUM_CLASSES[a] - 1}")
      out[a].append(v)
  return {a: np.asarray(v, np.int64) for a, v in out.items()}


def _images_and_prompts(args) -> tuple[np.ndarray, list[str] | None]:
  from glide_jax.eval.fid import load_samples
  from glide_jax.eval.sweep import read_prompts

  images, prompts = load_samples(args.images)
  if getattr(args, "prompts", None):
    prompts = read_prompts(args.prompts)
  if prompts is not None and len(prompts) != len(images):
    raise SystemExit(f"{args.images} has {len(images)} images but {args.prompts or 'its prompts.json'} "
                     f"has {len(prompts)} prompts")
  return images, prompts


def _accuracy(args) -> int:
  from glide_jax.eval import attributes as A
  from glide_jax.eval import stats

  images, prompts = _images_and_prompts(args)
  if args.attributes:
    expected = read_attributes_file(args.attributes)
    if len(expected["colour"]) != len(images):
      raise SystemExit(f"{args.images} has {len(images)} images but {args.attributes} "
                       f"describes {len(expected['colour'])}")
  elif prompts is not None:
    expected = A.parse_captions(prompts)
  else:
    raise SystemExit(f"{args.images} has no prompts.json: pass --prompts or --attributes")
  acc = A.caption_accuracy(images, expected, return_per_sample=True)
  per_sample = acc.pop("per_sample")
  ci = stats.wilson_intervals(acc.pop("correct"))
  confusion = acc.pop("confusion")
  recall = A.recall_by_value(confusion)
  chance = A.chance_accuracy()
  if args.grid:
    from glide_jax.eval import plots
    plots.save_grid(args.grid, images[:256], scale=max(1, 96 // images.shape[1]), frames=per_sample[:256])
    print(f"wrote {args.grid} (green: all four attributes read back right; red: not)")
  _log_tensorboard(args, {f"accuracy/{k}": v for k, v in acc.items() if k in ("all",) + A.ATTRIBUTES})
  def fmt(k):
    return f"{acc[k]:.4f} [{ci[k][0]:.3f}, {ci[k][1]:.3f}]"
  print(f"caption accuracy over {acc['n']} samples (glide_shapes attribute reader; [95 % Wilson "
        f"interval]): all four {fmt('all')} (chance {chance['all']:.4f}); "
        + ", ".join(f"{a} {fmt(a)}" for a in A.ATTRIBUTES)
        + f"; unreadable {acc['unreadable']}")
  print("recall by value: " + A.format_recall(recall))
  _write_json(args.out, {**acc, "ci95": ci, "recall_by_value": recall,
                         "confusion": {a: m.tolist() for a, m in confusion.items()},
                         "metric": "caption accuracy (glide_shapes attribute reader)",
                         "images": str(args.images), "chance": chance})
  return 0


def _clip_score(args) -> int:
  from glide_jax.eval.clip_score import clip_score_of_samples, format_clip_score

  images, prompts = _images_and_prompts(args)
  if prompts is None:
    raise SystemExit(f"{args.images} has no prompts.json: pass --prompts")
  result = clip_score_of_samples(args.clip_bundle, images, prompts, batch_size=args.batch_size)
  print(format_clip_score(result))
  _log_tensorboard(args, {"clip_score/mean": result["mean"], "clip_score/std": result["std"]})
  _write_json(args.out, {**result, "images": str(args.images)})
  return 0


def _fid(args) -> int:
  from glide_jax.eval import fid, frechet, inception

  params = inception.load_fid_inception_weights(args.inception_weights)
  images, _ = fid.load_samples(args.images)
  result = fid.compute_fid(images, args.reference, args.inception_weights, batch_size=args.batch_size,
                           reference=args.reference_name, params=params,
                           precision_recall_k=args.precision_recall or None)
  print(fid.format_fid(result))
  _log_tensorboard(args, {f"fid/{k}": result[k] for k in ("fid", "precision", "recall") if k in result})
  if args.save_stats:
    mu, sigma, n = fid.inception_statistics(images, inception.make_feature_fn(params), args.batch_size)
    frechet.save_statistics(args.save_stats, mu, sigma, n, str(args.images))
    print(f"wrote statistics of {n} images of {args.images} to {args.save_stats}")
  _write_json(args.out, {**result, "images": str(args.images)})
  return 0


def _sweep(args) -> int:
  from glide_jax.eval import attributes as A
  from glide_jax.eval import sweep

  if args.rescore:
    if args.bundle or args.out:
      raise SystemExit("--rescore reads and rewrites its own directory: drop --bundle and --out")
    sweep.rescore(args.rescore, clip=args.clip_bundle, tensorboard=args.tensorboard)
    print(f"rewrote {args.rescore}/sweep.csv, sweep.json, sweep.png and grids")
    return 0
  if not args.bundle or not args.out:
    raise SystemExit("glide-jax eval sweep needs --bundle and --out (or --rescore DIR)")
  try:
    scales = [float(s) for s in args.scales.split(",") if s.strip()]
  except ValueError:
    raise SystemExit(f"--scales must be comma-separated numbers, got {args.scales!r}") from None
  if not scales:
    raise SystemExit("--scales is empty")
  if args.shapes_validation:
    prompts, expected = sweep.shapes_validation_prompts(args.shapes_validation)
  else:
    prompts = sweep.read_prompts(args.prompts)
    try:
      expected = A.parse_captions(prompts)
    except ValueError as e:
      print(f"prompts are not all glide_shapes captions ({e}); caption accuracy is skipped", file=sys.stderr)
      expected = None
  if expected is None and not args.clip_bundle:
    raise SystemExit("nothing to measure: the prompts are not glide_shapes captions and no --clip-bundle given")
  generate, settings = sweep.make_generator(args.bundle, sampler=args.sampler, respacing=args.steps,
                                            batch_size=args.batch_size, seed=args.seed, dtype=args.dtype)
  settings["prompts"] = args.prompts or f"glide_shapes validation[:{args.shapes_validation}]"
  settings["clip_bundle"] = args.clip_bundle
  try:
    sweep.run_sweep(generate, prompts, scales, args.out, attributes=expected, clip=args.clip_bundle,
                    tensorboard=args.tensorboard, settings=settings)
  except sweep.SampleDirError as e:
    raise SystemExit(f"glide-jax eval sweep: {e}") from None
  print(f"wrote {args.out}/sweep.csv, sweep.json" + (", sweep.png" if expected is not None or args.clip_bundle else ""))
  return 0


def _compare(args) -> int:
  from glide_jax.eval import sweep
  try:
    result = sweep.compare_sweeps(args.baseline, args.sweeps)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"glide-jax eval compare: {e}") from None
  _write_json(args.out, result)
  return 0


def run(args: argparse.Namespace) -> int:
  return {"accuracy": _accuracy, "clip-score": _clip_score, "fid": _fid, "sweep": _sweep,
          "compare": _compare}[args.eval_command](args)
