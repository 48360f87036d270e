"""``elas-lm-eval``: lm-evaluation-harness's command line, with ELAS-JAX checkpoints as a model.

    elas-lm-eval --model elas_jax --model_args workdir=runs/tiny-elas,batch_size=32 \\
        --tasks lambada_openai,hellaswag [--include_path my_tasks/] [--output_path out/] [--log_samples]
    python -m elas_jax.lm_eval ...                  # the same

lm-eval's own CLI loads only its built-in model table, so this registers the
``elas_jax`` model (:mod:`elas_jax.downstream`) and hands every argument to
``lm_eval.__main__.cli_evaluate``: all of lm-eval's flags work. Two
conveniences: ``--model`` defaults to ``elas_jax``, and ``mesh=d,f,t`` inside
``--model_args`` (whose commas lm-eval would split) is passed on as
``mesh=[d,f,t]``. Errors in the model arguments or the checkpoint end with one
``error: ...`` line.
"""

from __future__ import annotations

import re
import sys

from elas_jax.cli import common as cli
from elas_jax.errors import UserError

_MESH = re.compile(r"(^|,)mesh=(-?\d+),(-?\d+),(-?\d+)(?=,|$)")


def _bracket_mesh(model_args: str) -> str:
  return _MESH.sub(r"\1mesh=[\2,\3,\4]", model_args)


def rewrite_args(args: list[str]) -> list[str]:
  """lm-eval arguments with the two conveniences above applied."""
  out, in_model_args = [], False
  for a in args:
    if a.startswith("--model_args=") or a.startswith("-a="):
      key, _, value = a.partition("=")
      a, in_model_args = f"{key}={_bracket_mesh(value)}", False
    elif in_model_args and not a.startswith("-"):
      a = _bracket_mesh(a)
    else:
      in_model_args = a in ("--model_args", "-a")
    out.append(a)
  first = out[0] if out else ""
  has_model = any(a == "--model" or a.startswith("--model=") for a in out)
  if first not in ("ls", "validate", "-h", "--help") and out and not has_model:
    at = 1 if first == "run" else 0
    out[at:at] = ["--model", "elas_jax"]
  return out


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  try:
    from elas_jax import downstream
  except ImportError as e:
    cli.fail(str(e))
  downstream.register()
  from lm_eval.__main__ import cli_evaluate

  sys.argv = argv[:1] + rewrite_args(argv[1:])
  try:
    cli_evaluate()
  except UserError as e:
    cli.fail(str(e))


def run() -> None:
  """Console-script entry point (``elas-lm-eval``)."""
  main()


if __name__ == "__main__":
  run()
