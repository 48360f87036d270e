"""Shared test helpers."""

import os

from elas_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path: str, variant: str):
  """A config from ``configs/`` (path relative to the repository root)."""
  return config_lib.load(f"{os.path.join(ROOT, path)}:{variant}")
