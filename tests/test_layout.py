"""Project layout guarantees: the kernels' import name, the package metadata, the entry
points, and an import graph without cycles in which the kernels stand alone."""

import ast
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT

# Import name -> folder: the kernels live in kernels/ and are imported as elas_kernels.
PACKAGES = {"elas_jax": "elas_jax", "elas_kernels": "kernels"}


_STANDIN = r"""
import json, site, sys
site.addsitedir(sys.argv[1])  # where pip puts an installed package: after the repository root
import kernels, elas_kernels.ffn, elas_jax.model
print(json.dumps({"kernels": kernels.__file__, "standin": getattr(kernels, "STANDIN", False),
                  "elas_kernels": elas_kernels.ffn.__file__}))
"""


def test_nothing_of_ours_is_importable_as_kernels(tmp_path):
  # Hugging Face's `kernels` (which transformers imports) must win over our folder when a
  # program runs from the repository root: kernels/ is no package of its own (no
  # __init__.py; at most a namespace portion, which any installed package overrides) and
  # is installed as elas_kernels, never as kernels.
  assert not os.path.exists(os.path.join(ROOT, "kernels", "__init__.py"))
  import tomllib

  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    setup = tomllib.load(f)["tool"]["setuptools"]
  assert setup["package-dir"] == {"elas_kernels": "kernels"}
  assert not [p for p in setup["packages"] if p == "kernels" or p.startswith("kernels.")]
  standin = tmp_path / "site" / "kernels"
  standin.mkdir(parents=True)
  (standin / "__init__.py").write_text("STANDIN = True\n")
  p = subprocess.run([sys.executable, "-c", _STANDIN, str(tmp_path / "site")], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr[-2000:]
  import json

  got = json.loads(p.stdout.strip().splitlines()[-1])
  assert got["standin"] and got["kernels"] == str(standin / "__init__.py")
  assert got["elas_kernels"] == os.path.join(ROOT, "kernels", "ffn", "__init__.py")


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
  # Every package directory is listed for installation, under its import name.
  listed = set(pyproject["tool"]["setuptools"]["packages"])
  found = set()
  for name, folder in PACKAGES.items():
    found.add(name)
    for d, _, files in os.walk(os.path.join(ROOT, folder)):
      if "__init__.py" in files:
        rel = os.path.relpath(d, os.path.join(ROOT, folder))
        found.add(name if rel == "." else name + "." + rel.replace(os.sep, "."))
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


def _module_name(root: str, name: str, folder: str, path: str) -> str:
  rel = os.path.relpath(path, os.path.join(root, folder))[: -len(".py")].split(os.sep)
  return ".".join([name] + (rel[:-1] if rel[-1] == "__init__" else rel))


def _imports(tree: ast.AST):
  """Every import statement of a module, at any depth: imports inside functions run
  too, and those under ``if TYPE_CHECKING:`` tie the modules as much for a reader."""
  for node in ast.walk(tree):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      yield node


def import_graph(root: str, packages: dict[str, str]) -> dict[str, set[str]]:
  """``module -> modules it imports`` among ``packages`` (import name -> folder under
  ``root``), from the AST.

  ``from a import b`` imports ``a.b`` when that is a module, else ``a``. (Importing
  ``a.b`` also runs ``a/__init__.py`` first, but a package being initialised may
  import its submodules: that is no cycle, so no edge goes to the packages above.)
  """
  paths = {}
  for name, folder in packages.items():
    for d, _, files in os.walk(os.path.join(root, folder)):
      for f in files:
        if f.endswith(".py"):
          paths[_module_name(root, name, folder, os.path.join(d, f))] = os.path.join(d, f)
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
  assert "elas_kernels.sparse24" in graph["elas_kernels.ffn.xla"]
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def imports_across(graph: dict[str, set[str]], src: str, dst: str) -> list[tuple[str, str]]:
  """The edges from modules of package ``src`` to modules of package ``dst``."""
  inside = lambda m, p: m == p or m.startswith(p + ".")
  return sorted((a, b) for a, bs in graph.items() if inside(a, src) for b in bs if inside(b, dst))


def test_the_kernels_never_import_elas_jax():
  # kernels/ is a leaf: jax, numpy and itself; target facts reach it as arguments.
  graph = import_graph(ROOT, PACKAGES)
  assert imports_across(graph, "elas_jax", "elas_kernels")  # the other way round is fine
  assert imports_across(graph, "elas_kernels", "elas_jax") == []


def _write(root, files: dict[str, str]) -> None:
  for rel, text in files.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(text)


def test_import_rule_checker_on_a_planted_import(tmp_path):
  # A function-level import from the leaf package back into the app is found.
  files = {"app/__init__.py": "", "app/m.py": "from lib import k\n", "lib/k.py": "x = 1\n",
           "lib/sub/__init__.py": "", "lib/sub/j.py": "def f():\n  from app import m\n"}
  _write(str(tmp_path / "planted"), files)
  graph = import_graph(str(tmp_path / "planted"), {"app": "app", "lib": "lib"})
  assert imports_across(graph, "app", "lib") == [("app.m", "lib.k")]
  assert imports_across(graph, "lib", "app") == [("lib.sub.j", "app.m")]
  _write(str(tmp_path / "clean"), {**files, "lib/sub/j.py": "def f():\n  from lib import k\n"})
  assert imports_across(import_graph(str(tmp_path / "clean"), {"app": "app", "lib": "lib"}),
                        "lib", "app") == []


@pytest.mark.parametrize("files,cycle", [
    # a function-level import closes the loop (the shape of the old sharding <-> model cycle)
    ({"p/__init__.py": "", "p/a.py": "from p import b\n",
      "p/b.py": "def f():\n  from p.a import x\n"}, ["p.a", "p.b", "p.a"]),
    # relative imports, and a cycle through a package __init__
    ({"p/__init__.py": "from .sub import c\n", "p/sub/__init__.py": "", "p/sub/c.py": "import p.d\n",
      "p/d.py": "x = 1\n"}, None),
    ({"p/__init__.py": "from .sub import c\n", "p/sub/__init__.py": "", "p/sub/c.py": "from ..d import y\n",
      "p/d.py": "import p\n"}, ["p", "p.sub.c", "p.d", "p"]),
    # imports only for type checkers count too (a reader follows them)
    ({"p/__init__.py": "", "p/a.py": "from p import b\n",
      "p/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  from p import a\n"},
     ["p.a", "p.b", "p.a"]),
])
def test_cycle_finder_on_planted_packages(tmp_path, files, cycle):
  _write(str(tmp_path), files)
  assert find_cycle(import_graph(str(tmp_path), {"p": "p"})) == cycle


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
