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
  assert set(project["scripts"]) == {"elas-train", "elas-eval"}
