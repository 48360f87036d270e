"""A graceful stop that all processes of a job agree on.

SIGTERM (what schedulers send before pre-empting a job) and SIGINT (Ctrl-C)
ask the run to finish its step, checkpoint it and exit 0. On a multi-process
job the signal may reach one process only, or each at a different step; a
process that stopped alone would enter the collective checkpoint while the
others run the next step's collectives, and the job would hang. So the
processes agree: each step, every process contributes the signal it has
received (0 for none) to a max over all devices of the mesh (one int per
device, a tiny jitted all-reduce), and all of them read that maximum at the
same step and stop together.

The all-reduce dispatched after step ``s`` is read after step ``s + 1`` is
dispatched: by then it has long finished, so reading it does not make the host
wait for the step in flight, and every process still reads the same value at
the same step. A signal therefore stops a multi-process job one step later than
a single process, which checks its own flag without any collective.
"""

from __future__ import annotations

import signal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested:
  """SIGTERM / SIGINT handlers for the lifetime of a run, and the agreed stop.

  Use as a context manager around the training loop and call :meth:`agreed`
  once per step, on every process, at the same point of the loop.
  """

  def __init__(self, mesh: jax.sharding.Mesh):
    self.received: str | None = None  # the signal this process received
    self._old = {}
    self._pending = None  # the all-reduce of the previous step, not read yet
    self._multi = jax.process_count() > 1
    if self._multi:
      me = jax.process_index()
      self._n_local = sum(d.process_index == me for d in mesh.devices.flat)
      self._per_device = NamedSharding(mesh, P(tuple(mesh.axis_names)))
      self._max = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))

  def __enter__(self) -> "StopRequested":
    for sig in SIGNALS:
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: signals stay with the caller
        pass
    return self

  def _handle(self, signum, frame) -> None:
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc) -> None:
    for sig, handler in self._old.items():
      signal.signal(sig, handler)

  def agreed(self) -> str | None:
    """The signal name once every process should stop after the current step, else None."""
    if not self._multi:
      return self.received
    code = int(signal.Signals[self.received]) if self.received else 0
    local = np.full([self._n_local], code, np.int32)
    reduced = self._max(jax.make_array_from_process_local_data(self._per_device, local))
    previous, self._pending = self._pending, reduced
    if previous is None:
      return None
    code = int(np.asarray(previous.addressable_data(0)))
    return signal.Signals(code).name if code else None
