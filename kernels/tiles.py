"""Per-target tile tables: the kernels' default tiles when compiled for a GPU.

``kernels/tiles_<target>.json`` (written by ``python -m benchmarks.kernel_tiles
--target <target>``, a compile-time search; see docs/kernels.md) holds, per
shape class, the :class:`elas_kernels.common.Blocks` fields of every kernel:

    {"target": "h200", "tokens": 16384,
     "classes": {"r128": {"elas_ffn_fwd": {"block_t": 64, ...}, ...}, ...}}

A shape class is the padded rank ``max(K, N)`` (``r128``, ``r256``,
``r512``): registers and shared memory depend on it, not on the token count
or the width. Split mode's ``elas_ffn_dw_out`` needs 4 token row planes and
has its own entry (``elas_ffn_dw_out/split``). No table, class or entry:
:func:`lookup` returns nothing for it and the kernel falls back to
``common.default_blocks``.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))


def table_path(target: str) -> str:
  return os.path.join(HERE, f"tiles_{target.lower()}.json")


@functools.lru_cache(maxsize=None)
def load(target: str) -> dict:
  """The tile table of ``target`` ({} when there is none)."""
  path = table_path(target)
  if not os.path.exists(path):
    return {}
  with open(path) as fh:
    return json.load(fh)


def shape_class(k: int, n: int) -> str:
  """The class of padded ranks ``k`` (reduced by the first dot) and ``n`` (output)."""
  return f"r{max(k, n)}"


def lookup(target: str, kernels: Sequence[str], *, t: int, f: int, k: int, n: int,
           split: bool = False) -> dict:
  """Kernel name -> its ``elas_kernels.common.Blocks`` fields (a dict) from ``target``'s table for
  this shape (missing names left out)."""
  entry = load(target).get("classes", {}).get(shape_class(k, n), {})
  out = {}
  for name in kernels:
    fields = entry.get(f"{name}/split") if split else None
    fields = fields or entry.get(name)
    if fields:
      out[name] = dict(fields)
  return out
