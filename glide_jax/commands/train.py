"""`glide-jax train --config configs/<stage>.py[:arg] --workdir DIR [--config.key=value ...]`."""
from __future__ import annotations

import argparse
import logging
import sys

from glide_jax import config_lib


def add_arguments(parser: argparse.ArgumentParser) -> None:
  config_lib.add_config_flags(parser)
  parser.add_argument("--workdir", required=True, help="checkpoints, logs, TensorBoard and samples go here; "
                      "an existing workdir is resumed from its latest checkpoint")
  parser.add_argument("--coordinator", default=None,
                      help="multi-process runs off TPU: host:port of process 0 (or GLIDE_JAX_COORDINATOR)")
  parser.add_argument("--num-processes", type=int, default=None)
  parser.add_argument("--process-id", type=int, default=None)
  parser.add_argument("--no-progress", action="store_true", help="no tqdm bar (batch jobs)")


def run(args: argparse.Namespace) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  try:
    config = config_lib.config_from_args(args)
  except config_lib.ConfigError as e:
    print(f"glide-jax train: {e}", file=sys.stderr)
    return 2
  from glide_jax.parallel import multihost
  multihost.initialize(args.coordinator, args.num_processes, args.process_id)
  from glide_jax.train import checkpoint, train
  try:
    result = train.train(config, args.workdir, progress=not args.no_progress)
  except checkpoint.ConfigMismatchError as e:
    print(f"glide-jax train: {e}", file=sys.stderr)
    return 2
  if result["stopped"]:
    print(f"glide-jax train: stopped at step {result['step']} after a SIGTERM/preemption; checkpoint saved")
  return 0
