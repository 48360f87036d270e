"""On-demand ``jax.profiler`` traces of a range of training steps.

``train.profile_steps = "a:b"`` traces the steps with 0-based index
``a <= step < b`` (the index the schedule and the LORO counter use; the
metrics record of step index ``i`` is logged as ``step = i + 1``) into
``<workdir>/profile``, for TensorBoard's profile plugin or Perfetto.
``""`` turns profiling off. The trainer calls :meth:`StepProfiler.maybe_start`
before a step and :meth:`StepProfiler.maybe_stop` after it.

No jax import at module level: :mod:`elas_jax.config_lib` validates the field
with :func:`parse_profile_steps`.
"""

from __future__ import annotations

import os
from typing import Any

from elas_jax.errors import ConfigError


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
  """``"a:b"`` -> ``(a, b)`` with ``0 <= a < b``; ``""`` -> None (off).

  Raises :class:`ConfigError` naming ``config.train.profile_steps`` otherwise.
  """
  if not isinstance(spec, str):
    raise ConfigError(f"config.train.profile_steps = {spec!r}: must be a string \"a:b\" or \"\"")
  if not spec.strip():
    return None
  first, sep, last = spec.strip().partition(":")
  try:
    if not sep:
      raise ValueError
    a, b = int(first), int(last)
  except ValueError:
    raise ConfigError(f"config.train.profile_steps = {spec!r}: expected \"a:b\" with integers "
                      "a < b (steps a <= step < b, 0-based), or \"\" for off") from None
  if a < 0 or b <= a:
    raise ConfigError(f"config.train.profile_steps = {spec!r}: needs 0 <= a < b")
  return a, b


class StepProfiler:
  """Starts a trace before step ``a`` and stops it after step ``b - 1``.

  A run resumed inside the range starts at its first step there. Call
  :meth:`close` when the loop ends early, so a trace still open is written.
  """

  def __init__(self, spec: str, workdir: str):
    self.window = parse_profile_steps(spec)
    self.log_dir = os.path.join(workdir, "profile")
    self.active = False

  def maybe_start(self, step: int) -> bool:
    """Before step ``step`` (0-based) runs: start tracing if it is in the range."""
    if self.window is None or self.active:
      return False
    a, b = self.window
    if a <= step < b:
      import jax
      jax.profiler.start_trace(self.log_dir)
      self.active = True
      return True
    return False

  def maybe_stop(self, step: int, outputs: Any = None) -> bool:
    """After step ``step`` ran: stop once it is the range's last step.

    ``outputs`` (the step's results) are waited for first, so the trace
    holds the device work and not just its dispatch.
    """
    if not self.active or step + 1 < self.window[1]:
      return False
    self.close(outputs)
    return True

  def close(self, outputs: Any = None) -> None:
    """Stops a trace in progress (no-op otherwise)."""
    if not self.active:
      return
    import jax
    if outputs is not None:
      jax.block_until_ready(outputs)
    jax.profiler.stop_trace()
    self.active = False
