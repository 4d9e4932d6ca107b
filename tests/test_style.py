"""docs/STYLE.md asks for a ruff-clean tree: the package, configs, launchers, benchmarks and tests pass
`ruff check` under the repository's ruff.toml, with the ruff that setup.py's `test` extra pins."""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_tree_is_ruff_clean():
  pytest.importorskip("ruff", reason="ruff comes with the test extra (launch/test.sh installs it)")
  pinned = re.search(r'"ruff==([^"]+)"', (ROOT / "setup.py").read_text())
  assert pinned, "setup.py's test extra pins ruff"
  version = subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True, text=True,
                           check=True).stdout.split()[-1]
  run = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, (f"ruff {version} (setup.py pins {pinned.group(1)}):\n"
                               + run.stdout[-6000:] + run.stderr[-2000:])
