"""Project layout guarantees."""

import os

from tests.helpers import ROOT


def test_kernels_is_this_projects_package_not_pypis():
  import kernels
  assert getattr(kernels, "IS_ELAS_JAX_KERNELS", False)
  assert os.path.dirname(os.path.abspath(kernels.__file__)) == os.path.join(ROOT, "kernels")


def test_package_dependencies_equal_requirements_txt():
  import tomllib

  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    reqs = [line.split("#")[0].strip() for line in f]
  assert project["dependencies"] == [r for r in reqs if r]
  assert project["requires-python"] == ">=3.11"
  assert set(project["scripts"]) == {"elas-train", "elas-eval", "elas-generate", "elas-export",
                                     "elas-lm-eval"}
  import ast
  for target in project["scripts"].values():  # every entry point exists (read, not imported:
    module, _, func = target.partition(":")  # the CLIs define absl flags at import)
    with open(os.path.join(ROOT, *module.split(".")) + ".py") as f:
      tree = ast.parse(f.read())
    assert func in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, target


def test_eval_extra_equals_requirements_eval_txt():
  import tomllib

  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    extras = tomllib.load(f)["project"]["optional-dependencies"]
  with open(os.path.join(ROOT, "requirements-eval.txt")) as f:
    reqs = [line.split("#")[0].strip() for line in f]
  assert extras["eval"] == [r for r in reqs if r]
  with open(os.path.join(ROOT, "requirements.txt")) as f:  # requirements.txt stays lean
    assert "lm-eval" not in f.read()
