"""Test-session settings.

A persistent XLA compilation cache shared by the test processes (in-process
tests and the train.py subprocesses they start), so each distinct program is
compiled once per machine rather than once per process. Set before jax is
imported anywhere.
"""

import os
import sys
import tempfile

_CACHE = os.path.join(tempfile.gettempdir(), f"elas-jax-test-xla-cache-py{sys.version_info[0]}{sys.version_info[1]}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
