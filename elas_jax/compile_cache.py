"""The persistent XLA compilation cache of a training run (``train.compile_cache``).

On by default: jax writes every compiled program that took at least
``jax_persistent_cache_min_compile_time_secs`` (jax's default 1 s) to
``<workdir>/xla_cache``, and a restarted run (after a pre-emption, a crash, or
a change that keeps the programs) loads it instead of compiling again. The
workdir, not a per-user directory, because multi-host runs share it (jax
writes entries from process 0 only, so the other hosts hit only a shared
directory) and because the entries belong to the run: deleting the run deletes
them. An explicit setting wins: ``JAX_COMPILATION_CACHE_DIR`` (or
``jax_compilation_cache_dir`` set in the process), as do jax's other
``JAX_PERSISTENT_CACHE_*`` / ``JAX_COMPILATION_CACHE_MAX_SIZE`` variables.
``train.compile_cache = False`` turns the persistent cache off, including one
set by those variables.

Effective when set before the process's first compilation (jax opens its cache
once); :func:`elas_jax.trainer.train_and_evaluate` sets it first thing.
"""

from __future__ import annotations

import os

import jax

CACHE_SUBDIR = "xla_cache"
HIT_EVENT = "/jax/compilation_cache/cache_hits"  # jax.monitoring event of a persistent-cache hit

_hits = 0
_listening = False


def _count(event: str, **kwargs) -> None:
  global _hits
  if event == HIT_EVENT:
    _hits += 1


def hits() -> int:
  """Persistent-cache hits in this process since :func:`configure` first ran."""
  return _hits


def configure(enabled: bool, workdir: str) -> str | None:
  """Sets up jax's persistent compilation cache for a run in ``workdir``.

  Returns the directory in use (the user's own setting if there is one, else
  ``<workdir>/xla_cache``), or None when ``enabled`` is False (the cache is then
  off for this process).
  """
  global _listening
  if not _listening:  # counts hits for the trainer's "compiled in ... (cache hit)" line
    jax.monitoring.register_event_listener(_count)
    _listening = True
  if not enabled:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  current = jax.config.jax_compilation_cache_dir
  if current:  # the user's choice (JAX_COMPILATION_CACHE_DIR or jax.config)
    return current
  path = os.path.join(os.path.abspath(workdir), CACHE_SUBDIR)
  jax.config.update("jax_compilation_cache_dir", path)
  return path
