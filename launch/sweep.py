#!/usr/bin/env python
r"""Expand a config's `sweep(add, arg)` into one training command per run.

  python launch/sweep.py configs/base.py:variant=small --target local --workdir-root /tmp/sweeps
  python launch/sweep.py configs/base.py:variant=full --target tpu-vm --tpu my-v5p --zone us-east5-a
  python launch/sweep.py configs/base.py:variant=full --target gke --image gcr.io/p/glide-jax:1 \
      --tpu-type v5p --topology 4x4x4 --dry-run

Every run gets its own workdir `<workdir-root>/<sweep>/<run>` and run name. The commands are
printed (one line per run, ready for a shell); with `--target local` they are then run in turn
unless `--dry-run` is given. For `tpu-vm` and `gke` the printed lines are what to execute:
`launch/tpu_vm.sh run ...` for each run, or `python launch/gke.py ... | kubectl apply -f -`.
Arguments after `--` are appended to every training command.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from glide_jax import config_lib  # noqa: E402

TARGETS = ("local", "tpu-vm", "gke")


def sweep_name(spec: str) -> str:
  """'configs/base.py:variant=small' -> 'base-variant=small'."""
  path, arg = config_lib.split_spec(spec)
  stem = os.path.splitext(os.path.basename(path))[0]
  return safe_name(stem + (f"-{arg}" if arg else ""))


def safe_name(text: str) -> str:
  """A name usable as a directory: letters, digits and . _ = - only."""
  return re.sub(r"[^A-Za-z0-9._=-]+", "-", text).strip("-") or "run"


def k8s_name(text: str, limit: int = 40) -> str:
  """A Kubernetes object name (RFC 1035 label: lower case, digits, '-', starts with a letter).

  JobSet derives pod host names from it, hence the short limit.
  """
  name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
  if not name or not name[0].isalpha():
    name = "r-" + name
  return name[:limit].rstrip("-")


def expand(spec: str, target: str, workdir_root: str, program: str = "glide-jax train",
           extra: list[str] | None = None, **target_args: str) -> list[dict]:
  """The runs of `spec`'s sweep: [{name, workdir, overrides, command (list), line (str)}]."""
  if target not in TARGETS:
    raise ValueError(f"unknown target {target!r}; choose from {TARGETS}")
  runs = config_lib.expand_sweep(spec)
  sweep = sweep_name(spec)
  names = [safe_name(r["name"]) for r in runs]
  if len(set(names)) != len(names):
    raise ValueError(f"sweep {spec!r} gives duplicate run names: {names}")
  out = []
  for run, name in zip(runs, names):
    workdir = f"{workdir_root.rstrip('/')}/{sweep}/{name}"
    train = shlex.split(program) + ["--config", spec, "--workdir", workdir]
    train += config_lib.make_override_args(run["overrides"]) + list(extra or [])
    if target == "local":
      command = train
    elif target == "tpu-vm":
      command = ["bash", "launch/tpu_vm.sh", "run"]
      for flag in ("tpu", "zone", "project"):
        if target_args.get(flag):
          command += [f"--{flag}", target_args[flag]]
      command += ["--run-name", f"{sweep}-{name}", "--"] + train
    else:  # gke: a JobSet manifest piped into kubectl
      command = ["python", "launch/gke.py", "--name", k8s_name(f"{sweep}-{name}")]
      for flag in ("image", "tpu_type", "topology", "num_slices"):
        if target_args.get(flag):
          command += [f"--{flag.replace('_', '-')}", str(target_args[flag])]
      command += ["--"] + train
    line = shlex.join(command) + (" | kubectl apply -f -" if target == "gke" else "")
    out.append({"name": name, "workdir": workdir, "overrides": run["overrides"], "command": command,
                "line": line})
  return out


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  extra: list[str] = []
  if "--" in argv:
    split = argv.index("--")
    argv, extra = argv[:split], argv[split + 1:]
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("spec", help="config file and arg, e.g. configs/base.py:variant=small")
  parser.add_argument("--target", choices=TARGETS, default="local")
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  parser.add_argument("--workdir-root", default=os.environ.get("GLIDE_WORKDIR_ROOT", "/tmp/glide_sweeps"),
                      help="runs go to <root>/<sweep>/<run> (a gs:// path for TPU targets)")
  parser.add_argument("--program", default="glide-jax train", help="the training command")
  parser.add_argument("--only", action="append", default=[], help="run only these run names")
  parser.add_argument("--keep-going", action="store_true", help="local: run the rest after a failure")
  parser.add_argument("--tpu", help="tpu-vm: the TPU VM name")
  parser.add_argument("--zone", help="tpu-vm: the zone")
  parser.add_argument("--project", help="tpu-vm: the GCP project")
  parser.add_argument("--image", help="gke: the container image")
  parser.add_argument("--tpu-type", help="gke: v4 | v5e | v5p | v6e")
  parser.add_argument("--topology", help="gke: slice topology, e.g. 4x4x4")
  parser.add_argument("--num-slices", help="gke: number of slices")
  args = parser.parse_args(argv)
  try:
    runs = expand(args.spec, args.target, args.workdir_root, args.program, extra, tpu=args.tpu,
                  zone=args.zone, project=args.project, image=args.image, tpu_type=args.tpu_type,
                  topology=args.topology, num_slices=args.num_slices)
  except (config_lib.ConfigError, ValueError) as e:
    print(f"sweep.py: {e}", file=sys.stderr)
    return 2
  if args.only:
    unknown = sorted(set(args.only) - {r["name"] for r in runs})
    if unknown:
      print(f"sweep.py: --only names {unknown} are not runs of this sweep: "
            f"{[r['name'] for r in runs]}", file=sys.stderr)
      return 2
    runs = [r for r in runs if r["name"] in args.only]
  print(f"# sweep {sweep_name(args.spec)}: {len(runs)} runs, target {args.target}")
  for r in runs:
    print(f"# run {r['name']}  workdir {r['workdir']}")
    print(r["line"])
  sys.stdout.flush()
  if args.dry_run or args.target != "local":
    return 0
  failed = []
  for r in runs:
    print(f"# starting {r['name']}", flush=True)
    code = subprocess.call(r["command"])
    if code != 0:
      failed.append((r["name"], code))
      print(f"# run {r['name']} failed with exit code {code}", file=sys.stderr, flush=True)
      if not args.keep_going:
        break
  if failed:
    print(f"# failed runs: {failed}", file=sys.stderr)
    return 1
  print(f"# all {len(runs)} runs finished")
  return 0


if __name__ == "__main__":
  sys.exit(main())
