"""Wall time per guided sample of distilled students against their teacher, alternated in one process.

  python -m benchmarks.run students --teacher runs/shapes/bundle \
      --student 8=runs/shapes_distill/bundle8 --student 4=runs/shapes_distill/bundle4 --batch 1,50

For each batch size, each round samples once with every entry, in turn, so that machine drift hits
them alike: the teacher with the reference's guided sampler (ancestral, 100 steps, the CFG pair in
one doubled batch: 200 example-passes per image) and with DPM-Solver++ at 15 steps (30), and each
student with DDIM at its own step count on the trailing grid (one pass per step, w as an input).
Everything goes through `glide_jax.sampling.generate`, what `glide-jax sample` and `eval sweep` run.
Prints the median seconds per call and per sample, and each entry's ratio to the teacher's DPM++ 15
and to its ancestral 100. The first call of each entry (the compile) is not timed.
"""
from __future__ import annotations

import argparse
import sys
import time

from benchmarks import common

PROMPTS = ("a small red circle on the left", "a large blue square at the top",
           "a green triangle, small, in the center", "on the right: a large purple circle")


def parse_student(spec: str) -> tuple[int, str]:
  steps, sep, path = spec.partition("=")
  if not sep or not steps.isdigit():
    raise argparse.ArgumentTypeError(f"--student wants STEPS=BUNDLE, e.g. 4=runs/shapes_distill/bundle4; got {spec!r}")
  return int(steps), path


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="students", description=__doc__.splitlines()[0])
  p.add_argument("--teacher", required=True, help="the teacher's bundle")
  p.add_argument("--student", action="append", type=parse_student, default=[], metavar="STEPS=BUNDLE",
                 help="a distilled student and the DDIM step count to sample it with (repeatable)")
  p.add_argument("--batch", default="1,50", help="comma-separated batch sizes (prompts per call)")
  p.add_argument("--repeats", type=int, default=3, help="timed rounds per batch size")
  p.add_argument("--teacher-samplers", default="ancestral=100,dpm++=15",
                 help="the teacher's sampler=steps entries; ratios are to dpm++ and ancestral when present")
  p.add_argument("--guidance-scale", type=float, default=3.0)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)

  import jax
  import numpy as np

  from glide_jax import sampling
  cache = common.enable_compile_cache()
  common.emit({"benchmark": "students", "machine": common.machine(), "compile_cache": cache})
  entries = []  # (name, sampler model, sampler, respacing, passes per image)
  teacher = sampling.load_sampler_model(args.teacher)
  for item in filter(None, args.teacher_samplers.split(",")):
    name, _, steps = item.partition("=")
    entries.append((f"teacher {name} {steps}", teacher, sampling.canonical_sampler(name), steps, 2 * int(steps)))
  for steps, path in args.student:
    sm = sampling.load_sampler_model(path)
    if not getattr(sm.model, "guidance_embed", False):
      raise SystemExit(f"{path}: not a guidance-distilled student (no guidance_embed); it would sample the CFG pair")
    # trailingN: the grid students are distilled on (a phase-1 student has no count of its own)
    entries.append((f"student {steps}", sm, "ddim", f"trailing{steps}", steps))

  for batch in (int(b) for b in args.batch.split(",") if b.strip()):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    key = jax.random.PRNGKey(args.seed)

    def call(entry, prompts=prompts, key=key):
      _, sm, sampler, respacing, _ = entry
      t0 = time.perf_counter()
      out = sampling.generate(sm, prompts, key, guidance_scale=args.guidance_scale, sampler=sampler,
                              respacing=respacing)
      np.asarray(out)
      return time.perf_counter() - t0

    first = {e[0]: call(e) for e in entries}  # compiles
    times: dict[str, list[float]] = {e[0]: [] for e in entries}
    for _ in range(args.repeats):
      for e in entries:
        times[e[0]].append(call(e))
    median = {name: float(np.median(t)) for name, t in times.items()}
    refs = {s: n for n, _, s, *_ in reversed(entries) if n.startswith("teacher") and s in ("dpm++", "ancestral")}
    for name, _, sampler, respacing, passes in entries:
      record = {"benchmark": "students", "entry": name, "sampler": sampler, "steps": respacing,
                "example_passes_per_image": passes, "batch": batch, "median_s": round(median[name], 6),
                "s_per_sample": round(median[name] / batch, 6), "first_call_s": round(first[name], 3),
                "runs": args.repeats}
      for ref, ref_name in sorted(refs.items(), key=lambda kv: kv[0] != "dpm++"):
        record[f"ratio_to_teacher_{ref}"] = round(median[name] / median[ref_name], 4)
      common.emit(record)
  common.emit({"benchmark": "students", "summary": True, "load_avg_1m": common.machine()["load_avg_1m"]})
  return 0


if __name__ == "__main__":
  sys.exit(main())
