"""`glide-jax train --config configs/<stage>.py[:arg] --workdir DIR [--config.key=value ...]`."""
from __future__ import annotations

import argparse
import logging

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
  """A config error or a workdir whose checkpoint has another config (ConfigError,
  checkpoint.ConfigMismatchError) reaches the CLI, which prints it in one line (glide_jax/errors.py)."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  config = config_lib.config_from_args(args)
  from glide_jax.parallel import multihost
  multihost.initialize(args.coordinator, args.num_processes, args.process_id)
  from glide_jax.train import train
  result = train.train(config, args.workdir, progress=not args.no_progress)
  if result["stopped"]:
    print(f"glide-jax train: stopped at step {result['step']} after a SIGTERM/preemption; checkpoint saved")
  return 0
