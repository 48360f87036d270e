"""Multi-process (multi-host) start-up through ``jax.distributed.initialize``.

* ``--distributed``: auto-detect the cluster (SLURM, Open MPI, Kubernetes
  indexed jobs, ... as jax supports) and join it.
* ``--coordinator_address=host:port --num_processes=N --process_id=i``: join
  explicitly (e.g. several processes on one machine over 127.0.0.1).

On CPU, cross-process collectives use gloo. Must run before anything asks jax
for its devices.
"""

from __future__ import annotations

import jax
from absl import flags

_FLAGS = {}


def define_flags() -> None:
  _FLAGS["distributed"] = flags.DEFINE_bool(
      "distributed", False, "Join a multi-process job, auto-detecting SLURM / MPI / Kubernetes.")
  _FLAGS["coordinator_address"] = flags.DEFINE_string(
      "coordinator_address", None, "host:port of process 0 (explicit multi-process start-up).")
  _FLAGS["num_processes"] = flags.DEFINE_integer("num_processes", None, "Number of processes.")
  _FLAGS["process_id"] = flags.DEFINE_integer("process_id", None, "This process's index.")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  # CPU processes need a collectives backend to form one mesh; GPUs ignore this.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)


def initialize_from_flags() -> None:
  if not _FLAGS:
    return
  explicit = _FLAGS["coordinator_address"].value
  if explicit or _FLAGS["distributed"].value:
    initialize(explicit, _FLAGS["num_processes"].value, _FLAGS["process_id"].value)
