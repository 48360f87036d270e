"""Test-session settings, set before jax is imported anywhere.

* A persistent XLA compilation cache shared by the test processes (in-process
  tests and the train.py subprocesses they start), so each distinct program is
  compiled once per machine rather than once per process.
* The CPU backend's LLVM passes off (``--xla_backend_optimization_level=0``):
  compiling is most of the suite's time (tiny models, many distinct programs).
  The suite passes either way; cold caches, 2 cores: test_scan, test_train,
  test_generate and test_remat 217 -> 160 s, the whole suite on Python 3.12
  670 s (it was 920 s with a partly warm cache).
  Subprocesses get it through :func:`tests.helpers.xla_flags`. Not where the
  CUDA plugin is installed: the GPU compile gate must see the register use
  and spills of the code XLA really emits for the H200.
"""

import importlib.util
import os
import sys
import tempfile

_CACHE = os.path.join(tempfile.gettempdir(), f"elas-jax-test-xla-cache-py{sys.version_info[0]}{sys.version_info[1]}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

_OPT = "--xla_backend_optimization_level"
if _OPT not in os.environ.get("XLA_FLAGS", "") and importlib.util.find_spec("jax_cuda12_plugin") is None:
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_OPT}=0".strip()
