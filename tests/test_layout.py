"""Project layout guarantees: our ``kernels`` package, the package metadata, the entry
points, and an import graph without cycles."""

import ast
import os
import re

import pytest

from tests.helpers import ROOT

PACKAGES = ("elas_jax", "kernels")


def test_kernels_is_this_projects_package_not_pypis():
  import kernels
  assert getattr(kernels, "IS_ELAS_JAX_KERNELS", False)
  assert os.path.dirname(os.path.abspath(kernels.__file__)) == os.path.join(ROOT, "kernels")


def _functions(module: str) -> set[str]:
  """Top-level function names of a module, read from its source (not imported: the
  command-line modules define absl flags at import)."""
  path = os.path.join(ROOT, *module.split("."))
  path = path + ".py" if os.path.isfile(path + ".py") else os.path.join(path, "__init__.py")
  with open(path) as f:
    return {n.name for n in ast.parse(f.read()).body if isinstance(n, ast.FunctionDef)}


def test_package_dependencies_equal_requirements_txt():
  import tomllib

  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    pyproject = tomllib.load(f)
  project = pyproject["project"]
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    reqs = [line.split("#")[0].strip() for line in f]
  assert project["dependencies"] == [r for r in reqs if r]
  assert project["requires-python"] == ">=3.11"
  assert set(project["scripts"]) == {"elas-train", "elas-eval", "elas-generate", "elas-export",
                                     "elas-summary", "elas-prepare", "elas-lm-eval", "elas-aot"}
  for target in project["scripts"].values():  # every entry point exists
    module, _, func = target.partition(":")
    assert module.startswith("elas_jax.cli."), target  # the programs live together
    assert func in _functions(module), target
  # Every package directory is listed for installation.
  listed = set(pyproject["tool"]["setuptools"]["packages"])
  found = {os.path.relpath(d, ROOT).replace(os.sep, ".") for top in PACKAGES
           for d, _, files in os.walk(os.path.join(ROOT, top)) if "__init__.py" in files}
  assert listed == found


def test_readme_python_m_commands_exist():
  # `python -m elas_jax.<x>` in the README: a module that runs its program.
  with open(os.path.join(ROOT, "README.md")) as f:
    modules = set(re.findall(r"python -m (elas_jax[\w.]*)", f.read()))
  assert {"elas_jax.evaluate", "elas_jax.generate", "elas_jax.export", "elas_jax.summary"} <= modules
  for module in modules:
    path = os.path.join(ROOT, *module.split(".")) + ".py"
    with open(path) as f:
      source = f.read()
    assert 'if __name__ == "__main__":' in source, module


# ------------------------------------------------------------- import graph


def _module_name(root: str, path: str) -> str:
  rel = os.path.relpath(path, root)[: -len(".py")].split(os.sep)
  return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _is_type_checking(node: ast.AST) -> bool:
  test = getattr(node, "test", None)
  return isinstance(node, ast.If) and (
      (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
      or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST):
  """Every import statement of a module, at any depth (imports inside functions run
  too), except under ``if TYPE_CHECKING:``."""
  stack = [tree]
  while stack:
    node = stack.pop()
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      yield node
    for child in ast.iter_child_nodes(node):
      if not _is_type_checking(child):
        stack.append(child)


def import_graph(root: str, packages: tuple[str, ...]) -> dict[str, set[str]]:
  """``module -> modules it imports`` among ``packages`` under ``root``, from the AST.

  ``from a import b`` imports ``a.b`` when that is a module, else ``a``. (Importing
  ``a.b`` also runs ``a/__init__.py`` first, but a package being initialised may
  import its submodules: that is no cycle, so no edge goes to the packages above.)
  """
  paths = {}
  for top in packages:
    for d, _, files in os.walk(os.path.join(root, top)):
      for f in files:
        if f.endswith(".py"):
          paths[_module_name(root, os.path.join(d, f))] = os.path.join(d, f)
  graph: dict[str, set[str]] = {m: set() for m in paths}
  for mod, path in paths.items():
    is_pkg = path.endswith("__init__.py")
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    for node in _imports(tree):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      else:
        base = node.module or ""
        if node.level:  # relative: from the package holding this module
          parts = mod.split(".")[: len(mod.split(".")) - node.level + (1 if is_pkg else 0)]
          base = ".".join(parts + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names]
      graph[mod].update(t for t in targets if t in paths and t != mod)
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle (``[a, b, ..., a]``), or None."""
  state: dict[str, int] = {}  # 1 = on the current path, 2 = done
  path: list[str] = []

  def visit(m: str) -> list[str] | None:
    state[m] = 1
    path.append(m)
    for n in sorted(graph[m]):
      if state.get(n) == 1:
        return path[path.index(n):] + [n]
      if n not in state:
        found = visit(n)
        if found:
          return found
    path.pop()
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def test_no_import_cycle():
  graph = import_graph(ROOT, PACKAGES)
  assert len(graph) > 30 and "elas_jax.ops.ffn" in graph["elas_jax.model"]
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _write(root, files: dict[str, str]) -> None:
  for rel, text in files.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(text)


@pytest.mark.parametrize("files,cycle", [
    # a function-level import closes the loop (the shape of the old sharding <-> model cycle)
    ({"p/__init__.py": "", "p/a.py": "from p import b\n",
      "p/b.py": "def f():\n  from p.a import x\n"}, ["p.a", "p.b", "p.a"]),
    # relative imports, and a cycle through a package __init__
    ({"p/__init__.py": "from .sub import c\n", "p/sub/__init__.py": "", "p/sub/c.py": "import p.d\n",
      "p/d.py": "x = 1\n"}, None),
    ({"p/__init__.py": "from .sub import c\n", "p/sub/__init__.py": "", "p/sub/c.py": "from ..d import y\n",
      "p/d.py": "import p\n"}, ["p", "p.sub.c", "p.d", "p"]),
    # imports only for type checkers do not run
    ({"p/__init__.py": "", "p/a.py": "from p import b\n",
      "p/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  from p import a\n"}, None),
])
def test_cycle_finder_on_planted_packages(tmp_path, files, cycle):
  _write(str(tmp_path), files)
  assert find_cycle(import_graph(str(tmp_path), ("p",))) == cycle


@pytest.mark.parametrize("extra,heavy", [("eval", "lm-eval"), ("wandb", "wandb")])
def test_extras_equal_their_requirements_files(extra, heavy):
  import tomllib

  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    extras = tomllib.load(f)["project"]["optional-dependencies"]
  with open(os.path.join(ROOT, f"requirements-{extra}.txt")) as f:
    reqs = [line.split("#")[0].strip() for line in f]
  assert extras[extra] == [r for r in reqs if r]
  with open(os.path.join(ROOT, "requirements.txt")) as f:  # requirements.txt stays lean
    assert heavy not in f.read()
