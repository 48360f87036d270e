"""Project layout guarantees."""

import os

from tests.helpers import ROOT


def test_kernels_is_this_projects_package_not_pypis():
  import kernels
  assert getattr(kernels, "IS_ELAS_JAX_KERNELS", False)
  assert os.path.dirname(os.path.abspath(kernels.__file__)) == os.path.join(ROOT, "kernels")
