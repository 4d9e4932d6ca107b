"""The package's imports follow the layers drawn in docs/architecture.md.

Every module's imports of `glide_jax` are read with `ast` (module-level and function-level ones
alike, relative ones resolved). A module may import a module of a lower layer, or of its own group;
two groups of one layer are independent of each other. No import may name a module that does not
exist, and the module graph has no cycle. `KNOWN_VIOLATIONS` lists, each with its reason, the imports
that break the rule today and are waiting for a fix in files another change owns; the test fails as
well when a listed import is gone, so the list only shrinks with the code.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "glide_jax"

# Bottom to top. Each layer is a tuple of groups; a group is a module or a package (every module
# below it). Keep in step with the diagram in docs/architecture.md.
LAYERS: tuple[tuple[str, ...], ...] = (
    # foundation: imports nothing of ours
    ("glide_jax", "glide_jax.errors", "glide_jax.hardware", "glide_jax.cpu_flags",
     "glide_jax.compile_cache", "glide_jax.config_lib", "glide_jax.constants", "glide_jax.settings"),
    # the numerical core: networks, and diffusion as pure functions of arrays
    ("glide_jax.models", "glide_jax.diffusion"),
    # data in and out of the core: datasets and tokenizers, device meshes, bundles, image files
    ("glide_jax.data", "glide_jax.parallel", "glide_jax.bundle", "glide_jax.images"),
    # formats and sampling for a user: PyTorch interop, bundle -> samples
    ("glide_jax.interop", "glide_jax.sampling"),
    # training; evaluation of samples
    ("glide_jax.train", "glide_jax.eval"),
    # ahead-of-time compilation of the train program; the browser app over sampling and eval
    ("glide_jax.plan", "glide_jax.app"),
    # the `glide-jax` subcommands, then the entry point
    ("glide_jax.commands",),
    ("glide_jax.cli",),
)

# (importer, imported) -> why it is still here. Each is waiting for a change to a file that another
# piece of work owns at the moment; remove the entry with the fix.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {
}

# Sets of modules that import each other (sorted, as `_cycles` gives them) -> why still there; the
# same rules as KNOWN_VIOLATIONS.
KNOWN_CYCLES: dict[tuple[str, ...], str] = {
}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
  """The glide_jax modules `name` imports anywhere in its file (`from pkg import mod` names mod)."""
  is_package = path.name == "__init__.py"
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        package = name.split(".") if is_package else name.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
      for alias in node.names:
        full = f"{base}.{alias.name}"
        found.add(full if full in modules else base)
  return {m for m in found if m.split(".")[0] == "glide_jax" and m != name}


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(name, path, modules) for name, path in modules.items()}


def _group(module: str) -> tuple[int, str]:
  """(layer index, group) of a module: the longest group name that is it or a package above it."""
  best = None
  for rank, groups in enumerate(LAYERS):
    for group in groups:
      # the package itself is only its __init__; every other group takes the modules below it
      inside = module == group or (group != "glide_jax" and module.startswith(group + "."))
      if inside and (best is None or len(group) > len(best[1])):
        best = (rank, group)
  if best is None:
    raise AssertionError(f"{module} is in no layer of tests/test_layering.py LAYERS; place it there "
                         "and in docs/architecture.md")
  return best


def _violations(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
  out = set()
  for importer, deps in graph.items():
    rank, group = _group(importer)
    for dep in deps:
      dep_rank, dep_group = _group(dep)
      if dep_group != group and dep_rank >= rank:
        out.add((importer, dep))
  return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Every strongly connected set of two or more modules (Tarjan), each sorted."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in graph:
        continue
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_every_module_has_a_layer():
  for name in _modules():
    _group(name)


def test_imports_name_existing_modules():
  graph = _graph()
  missing = sorted(f"{m} imports {d}" for m, deps in graph.items() for d in deps if d not in graph)
  assert not missing, "imports of modules that do not exist:\n" + "\n".join(missing)


def test_no_import_from_a_lower_layer_to_a_higher_one():
  found = _violations(_graph())
  new = sorted(found - set(KNOWN_VIOLATIONS))
  fixed = sorted(set(KNOWN_VIOLATIONS) - found)
  lines = [f"{a} imports {b} (layer {_group(a)[0]} -> {_group(b)[0]})" for a, b in new]
  assert not new, "imports against the layers of docs/architecture.md:\n" + "\n".join(lines)
  assert not fixed, f"KNOWN_VIOLATIONS lists imports that are gone; remove them: {fixed}"


def test_no_import_cycles():
  found = {tuple(c) for c in _cycles(_graph())}
  new = sorted(found - set(KNOWN_CYCLES))
  assert not new, "modules that import each other: " + "; ".join(" <-> ".join(c) for c in new)
  fixed = sorted(set(KNOWN_CYCLES) - found)
  assert not fixed, f"KNOWN_CYCLES lists cycles that are gone; remove them: {fixed}"


def test_docs_table_is_the_layers_checked_here():
  """The table in docs/architecture.md names the same groups, layer by layer, as LAYERS."""
  import re

  table = {}
  for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
    m = re.match(r"\| (\d+) [^|]+\| ([^|]+) \|", line)
    if m:
      names = re.findall(r"`([\w/.]+)`", m.group(2))
      table[int(m.group(1))] = {"glide_jax." + n.removesuffix("/").removesuffix(".py").replace("/", ".")
                                for n in names}
  want = {rank: set(groups) - {"glide_jax"} for rank, groups in enumerate(LAYERS)}
  assert table == want


def test_checker_sees_function_level_relative_and_upward_imports(tmp_path, monkeypatch):
  # The reader itself, on a made-up package: a function-level relative import from the core up to
  # the CLI is found as a violation, and two modules importing each other as a cycle.
  root = tmp_path / "glide_jax"
  (root / "diffusion").mkdir(parents=True)
  (root / "__init__.py").write_text("")
  (root / "diffusion" / "__init__.py").write_text("")
  (root / "diffusion" / "a.py").write_text("def f():\n  from .. import cli\n  from . import b\n")
  (root / "diffusion" / "b.py").write_text("from glide_jax.diffusion import a\n")
  (root / "cli.py").write_text("import os\n")
  monkeypatch.setitem(globals(), "ROOT", tmp_path)
  monkeypatch.setitem(globals(), "PACKAGE", root)
  graph = _graph()
  assert graph["glide_jax.diffusion.a"] == {"glide_jax.cli", "glide_jax.diffusion.b"}
  assert _violations(graph) == {("glide_jax.diffusion.a", "glide_jax.cli")}
  assert _cycles(graph) == [["glide_jax.diffusion.a", "glide_jax.diffusion.b"]]
