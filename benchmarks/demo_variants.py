"""The demo's train step with model-option variants, alternated in one process.

  python -m benchmarks.run demo_variants                  # the demo against the variants below
  python -m benchmarks.run demo_variants --variant fast:attention_resolutions=8,channel_mult=1,2,2
  python -m benchmarks.run demo_variants --preset tiny --rounds 2 --fast-compile   # the harness (tests)

Each variant is configs/shapes.py (its batch, recipe and the trainer's program, state donated) with
some model options replaced, written `NAME:key=value,key=value` (a value may hold commas, e.g.
`channel_mult=1,2,2`: a piece without `=` continues the previous value). The first variant is the
baseline, always the config as it is. After one warm-up call each, the variants run in rounds,
their order reversed every other round, so load on a shared machine hits all of them alike; the
summary gives each median step and its ratio to the baseline's. Used to choose a faster demo model
(docs/experiments.md, "Toward a 20-minute demo").
"""
from __future__ import annotations

import argparse
import ast
import statistics
import sys
import time

from benchmarks import common

# Cheaper U-Nets for the demo: attention only at 8 px, plain (conv) down/upsampling instead of
# BigGAN-style res blocks, 64 instead of 128 channels at 8 px, one attention head.
DEFAULT_VARIANTS = (
    "attn8:attention_resolutions=8",
    "no_updown:resblock_updown=False",
    "mult122:channel_mult=1,2,2",
    "attn8_no_updown_mult122:attention_resolutions=8,resblock_updown=False,channel_mult=1,2,2",
    "no_updown_mult122_1head:resblock_updown=False,channel_mult=1,2,2,num_head_channels=-1,num_heads=1",
)


def _cast(name: str, like, text: str):
  """`text` as the type of the option's current value `like` (the config refuses a change of type)."""
  if isinstance(like, bool):
    if text.lower() not in ("true", "false"):
      raise ValueError(f"model option {name}: {text!r} is not True or False")
    return text.lower() == "true"
  if isinstance(like, (int, float)):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
      raise ValueError(f"model option {name}: {text!r} is not a number")  # noqa: TRY004 - a user's bad value
    return type(like)(value)
  return text


def parse_variant(spec: str) -> tuple[str, dict]:
  """'NAME:k=v,k=v' -> (NAME, {k: 'v'}); commas inside a value (channel_mult=1,2,2) are kept."""
  name, sep, body = spec.partition(":")
  if not name or not sep or not body:
    raise ValueError(f"variant {spec!r}: expected NAME:key=value[,key=value...]")
  pairs: list[list[str]] = []
  for piece in body.split(","):
    if "=" in piece:
      key, _, value = piece.partition("=")
      if not key:
        raise ValueError(f"variant {spec!r}: empty option name in {piece!r}")
      pairs.append([key, value])
    elif pairs:
      pairs[-1][1] += "," + piece
    else:
      raise ValueError(f"variant {spec!r}: {piece!r} is not key=value")
  return name, dict(pairs)


def _step(args, overrides: dict):
  """A zero-argument callable running one donated demo train step with `overrides` applied."""
  from benchmarks import train_step
  ns = argparse.Namespace(preset=args.preset if args.preset in ("tiny", "micro") else "shapes",
                          attention_impl=args.attention_impl, dtype=None, batch=args.batch)
  config = train_step.benchmark_config("shapes", ns)
  unknown = sorted(set(overrides) - set(config.model.options))
  if unknown:
    raise ValueError(f"unknown model options {unknown}; the demo model has {sorted(config.model.options)}")
  overrides = {k: _cast(k, config.model.options[k], v) for k, v in overrides.items()}
  with config.unlocked():
    config.model.options.update(overrides)
  run, compile_s, flops, meta = train_step.demo_step(config, args)
  return run, {"overrides": overrides, "compile_s": round(compile_s, 2),
               "gflop": flops and round(flops / 1e9, 3), **meta}


def measure(variants: list[tuple[str, dict]], args) -> dict:
  import jax
  runs, info = {}, {}
  for name, overrides in variants:
    fn, meta = _step(args, overrides)
    jax.block_until_ready(fn())  # warm-up
    runs[name], info[name] = fn, meta
  names = [n for n, _ in variants]
  times = {n: [] for n in names}
  for r in range(max(1, args.rounds)):
    for name in (names if r % 2 == 0 else names[::-1]):
      t0 = time.perf_counter()
      jax.block_until_ready(runs[name]())
      times[name].append(time.perf_counter() - t0)
  med = {n: statistics.median(v) for n, v in times.items()}
  base = names[0]
  for name in names:
    common.emit({"benchmark": "demo_variants", "variant": name, "median_s": round(med[name], 4),
                 "ratio_to_baseline": round(med[name] / med[base], 4),
                 "runs_s": [round(v, 4) for v in times[name]], **info[name]})
  return {"baseline": base, "median_s": {n: round(med[n], 4) for n in names},
          "ratio_to_baseline": {n: round(med[n] / med[base], 4) for n in names}}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="demo_variants", description=__doc__.splitlines()[0])
  common.add_common_args(p)
  p.add_argument("--variant", action="append", default=None,
                 help="NAME:key=value[,key=value...] (repeatable; default: the cheaper U-Nets listed in the module)")
  p.add_argument("--rounds", type=int, default=5, help="alternating rounds after the warm-up")
  p.add_argument("--batch", type=int, default=None, help="train batch (default: the config's)")
  args = p.parse_args(argv)
  variants = [("demo", {})] + [parse_variant(s) for s in (args.variant or DEFAULT_VARIANTS)]
  names = [n for n, _ in variants]
  if len(set(names)) != len(names):
    p.error(f"variant names must differ: {names}")
  common.enable_compile_cache()
  common.emit({"benchmark": "demo_variants", "machine": common.machine(), "preset": args.preset,
               "rounds": args.rounds})
  summary = measure(variants, args)
  common.emit({"benchmark": "demo_variants", "summary": True, **summary,
               "load_avg_1m": common.machine()["load_avg_1m"]})
  return 0


if __name__ == "__main__":
  sys.exit(main())
