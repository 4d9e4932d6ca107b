"""The `glide-jax` command: one entry point, one subcommand per job.

Each subcommand lives in `glide_jax/commands/<module>.py`, exposing `add_arguments(parser)` and
`run(args) -> int`; it is imported only when chosen, so `glide-jax --help` stays fast. Before a
subcommand runs, the CPU's XLA flags are applied (glide_jax/cpu_flags.py: only when the backend will
be the CPU, only flags the installed jaxlib knows).

A user's mistake (a wrong path, a bundle of the wrong kind, a misspelt config key or option:
glide_jax/errors.py says which exceptions count) is one line on stderr, `glide-jax <command>:
<message>`, and exit status 2; any other exception keeps its traceback. `glide-jax --debug <command>`
(or GLIDE_JAX_DEBUG=1) shows the traceback of user errors too.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from glide_jax import errors

# name -> (module under glide_jax.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "Train a GLIDE stage (base, upsample, inpaint, clip) from a config."),
    "sample": ("sample", "Sample images from prompts with a trained or imported model."),
    "export": ("export", "Write an inference bundle from a training workdir."),
    "eval": ("eval", "Evaluate samples: caption accuracy, CLIP score, FID, guidance sweeps."),
    "data": ("data", "Build datasets and train tokenizers."),
    "plan": ("plan", "Compile a config ahead of time for a TPU topology: memory, FLOPs, fit."),
    "import-torch": ("import_torch", "Convert a glide-text2im PyTorch checkpoint to glide-jax params."),
    "export-torch": ("export_torch", "Convert glide-jax params to a glide-text2im state_dict."),
    "parity": ("parity", "Check our models and diffusion against reference dumps (.npz)."),
    "app": ("app", "An interactive editor in the browser: generate, mask and inpaint, upsample."),
}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="glide-jax", description=__doc__.splitlines()[0],
                                   epilog="--debug (first, or GLIDE_JAX_DEBUG=1): the traceback of a "
                                          "user error, not only its one-line message")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name, (_, help_text) in COMMANDS.items():
    sub.add_parser(name, help=help_text, add_help=False)
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = argv[:1] == ["--debug"]
  argv = argv[1:] if debug else argv
  debug = debug or errors.debug_enabled()
  if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
    parser = build_parser()
    if argv and argv[0] not in ("-h", "--help"):
      parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
    parser.print_help()
    return 0 if argv else 2
  name, rest = argv[0], argv[1:]
  _quiet_library_logs()
  from glide_jax import cpu_flags
  cpu_flags.apply()  # before any backend exists; only on the CPU, only flags this jaxlib knows
  module_name, help_text = COMMANDS[name]
  module = importlib.import_module(f"glide_jax.commands.{module_name}")
  parser = argparse.ArgumentParser(prog=f"glide-jax {name}", description=help_text)
  module.add_arguments(parser)
  if parser.get_default("config_overrides") is not None:  # config_lib.add_config_flags was called
    from glide_jax import config_lib
    args = config_lib.parse_args(parser, rest)
  else:
    args = parser.parse_args(rest)
  action = getattr(args, "action", None) or getattr(args, "eval_command", None)  # data's and eval's
  label = f"glide-jax {name}" + (f" {action}" if isinstance(action, str) else "")
  try:
    return int(module.run(args) or 0)
  except SystemExit as e:
    # A command's `raise SystemExit("message")`: the same one line, with the command's name.
    if isinstance(e.code, str) and not debug:
      message = e.code if e.code.startswith("glide-jax") else f"{label}: {e.code}"
      print(message, file=sys.stderr)
      e.code = 2
    raise
  except Exception as e:  # noqa: BLE001 - user errors in one line, the rest re-raised
    if debug or not errors.is_user_error(e):
      raise
    print(f"{label}: {errors.one_line(e)}", file=sys.stderr)
    return 2


def _quiet_library_logs() -> None:
  """Orbax and TF log every checkpoint phase at INFO through absl; our own log says what matters."""
  import logging
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  logging.getLogger("absl").setLevel(logging.WARNING)


if __name__ == "__main__":
  sys.exit(main())
