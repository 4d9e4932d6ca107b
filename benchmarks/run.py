"""`python -m benchmarks.run NAME [ARGS...]`: runs benchmarks/NAME.py's `main(argv)`.

  python -m benchmarks.run sampler_overhead --steps 3,8
"""
from __future__ import annotations

import importlib
import pathlib
import sys

from glide_jax import cpu_flags


def available() -> list[str]:
  here = pathlib.Path(__file__).parent
  return sorted(p.stem for p in here.glob("*.py") if p.stem not in ("__init__", "run"))


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(f"usage: python -m benchmarks.run NAME [ARGS...]; NAME is one of {', '.join(available())}")
    return 0 if argv else 2
  name = argv[0]
  if name not in available():
    print(f"unknown benchmark {name!r}; choose from {', '.join(available())}", file=sys.stderr)
    return 2
  cpu_flags.apply()  # before any backend exists, as the `glide-jax` command does
  module = importlib.import_module(f"benchmarks.{name}")
  return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
  sys.exit(main())
