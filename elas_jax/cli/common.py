"""Command-line plumbing shared by the programs of :mod:`elas_jax.cli`.

``--config path[:variant]`` is an ml_collections config file with
``--config.<field>=value`` overrides. User errors (unknown variant or field,
bad value, a config that cannot work) end with one ``error: ...`` line and
exit status 2, not a traceback, before anything is compiled.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from elas_jax import config_lib
from elas_jax.errors import UserError  # re-exported

# The embedded default: configs/tiny.py of the current directory, else of the
# checkout this package runs from (an editable install's `elas-train`).
DEFAULT_CONFIG = "configs/tiny.py"
if not os.path.isfile(DEFAULT_CONFIG):
  _checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  _here = os.path.join(_checkout, DEFAULT_CONFIG)
  DEFAULT_CONFIG = _here if os.path.isfile(_here) else DEFAULT_CONFIG


def define_config_flag(default: str = DEFAULT_CONFIG):
  return config_flags.DEFINE_config_file(
      "config", default, "Config file, optionally with a variant: configs/llama_60m.py:elas.",
      lock_config=True)


def fail(message: str, status: int = 2):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def _unknown_override(argv: list[str], cfg) -> str | None:
  """The first ``--config.a.b=v`` override naming a field ``cfg`` lacks."""
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0]
    node = cfg
    for part in path.split("."):
      if not hasattr(node, "keys") or part not in node:
        return path
      node = node[part]
  return None


def _config_spec(argv: list[str]) -> str | None:
  spec = None  # the last --config wins, as in absl
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
  return spec


def _parse(argv: list[str]) -> list[str]:
  # Load the config file ourselves first: config_flags defers load errors and
  # wraps them in tracebacks; this way the user sees the cause in one line.
  spec = _config_spec(argv) or (DEFAULT_CONFIG if "config" in flags.FLAGS else None)
  base = None
  if spec is not None:
    try:
      base = config_lib.load(spec)
    except config_lib.ConfigError as e:
      fail(str(e))
    except Exception as e:  # a config file that itself fails to import or run
      fail(f"config file {spec.partition(':')[0]!r} failed to load: {type(e).__name__}: {e}")
  try:
    return flags.FLAGS(argv)
  except config_lib.ConfigError as e:
    fail(str(e))
  except flags.Error as e:
    cause = e.__cause__ or e.__context__
    if isinstance(cause, config_lib.ConfigError):
      fail(str(cause))
    fail(str(e).splitlines()[0])
  except (AttributeError, KeyError) as e:
    path = _unknown_override(argv, base) if base is not None else None
    if path is not None:
      fail(f"config.{path}: no such config field (check the spelling; see the config file)")
    fail(f"bad config override: {e}")
  return []  # unreachable


def run(main: Callable[[list[str]], None]) -> None:
  """``absl.app.run`` with one-line errors for bad configs and :class:`UserError`."""

  def wrapped(argv):
    logging.set_verbosity(logging.WARNING)  # keep jax's backend probing off the console
    try:
      if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
        config_lib.validate(flags.FLAGS["config"].value)
      main(argv)
    except UserError as e:
      fail(str(e))

  app.run(wrapped, flags_parser=_parse)
