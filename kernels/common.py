"""Shared pieces of the 2:4 kernels: the plane layout, block checks, in-register 2:4.

Plane layout. A Triton program cannot gather or interleave the lanes of a
register tile, so the kernels never regroup features in registers. Instead the
wrapper reorders the (small) weights so that feature ``8g + j`` lands in
*plane* ``j``, row ``g``:

    w_FxK  ->  w_8xGxK   (G = F / 8; plane j holds features j, 8 + j, 16 + j, ...)

One dot per plane then yields ``y_j [T, G]`` and the two 2:4 groups of every 8
consecutive features are planes 0-3 and 4-7: selection, compression and
decompression are element-wise across planes. The compressed activation is
stored the same way:

    vals_4xTxG  plane p holds ``compress_24`` values ``[:, 4g + p]``
    meta_TxG    uint8, identical to ``sparse24.compress_24``'s metadata

i.e. exactly the bytes of ``compress_24`` (9/16 of the dense bf16 activation),
only the values are stored plane-major. :func:`to_planes` / :func:`from_planes`
convert between the two.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from elas_kernels import tiles as tile_tables

PLANES = 8  # features per metadata byte: two 2:4 groups
GROUP = 4
MIN_DOT = 16  # Triton's MMAs need at least 16 along every dot dimension


# --------------------------------------------------------------------------
# Layout conversion (XLA, outside the kernels).
# --------------------------------------------------------------------------


def weight_planes(w_FxK: jax.Array) -> jax.Array:
  """``[F, K] -> [8, F/8, K]``: plane ``j`` row ``g`` is feature ``8g + j``."""
  f, k = w_FxK.shape
  return w_FxK.reshape(f // PLANES, PLANES, k).transpose(1, 0, 2)


def weight_unplanes(w_8xGxK: jax.Array) -> jax.Array:
  """Inverse of :func:`weight_planes`."""
  p, g, k = w_8xGxK.shape
  return w_8xGxK.transpose(1, 0, 2).reshape(g * p, k)


def out_weight_planes(w_NxF: jax.Array) -> jax.Array:
  """``[N, F] -> [8, N, F/8]`` for a weight that consumes the features."""
  n, f = w_NxF.shape
  return w_NxF.reshape(n, f // PLANES, PLANES).transpose(2, 0, 1)


def out_weight_unplanes(w_8xNxG: jax.Array) -> jax.Array:
  p, n, g = w_8xNxG.shape
  return w_8xNxG.transpose(1, 2, 0).reshape(n, g * p)


def to_planes(values_TxF2: jax.Array) -> jax.Array:
  """``compress_24`` values ``[T, F/2]`` -> kernel values ``[4, T, F/8]``."""
  t, f2 = values_TxF2.shape
  return values_TxF2.reshape(t, f2 // 4, 4).transpose(2, 0, 1)


def from_planes(vals_4xTxG: jax.Array) -> jax.Array:
  """Kernel values ``[4, T, F/8]`` -> ``compress_24`` values ``[T, F/2]``."""
  _, t, g = vals_4xTxG.shape
  return vals_4xTxG.transpose(1, 2, 0).reshape(t, 4 * g)


# --------------------------------------------------------------------------
# Blocks.
# --------------------------------------------------------------------------


def _pow2(n: int) -> bool:
  return n > 0 and pl.next_power_of_2(n) == n


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Tile sizes and Triton parameters of one kernel.

  ``block_t`` tokens x ``block_f`` features (``block_f / 8`` rows per plane)
  per program or loop step. ``block_k`` / ``block_n``: the tile of an output
  over the rank ``K`` (``dw_in``, ``dh``, ``dz``) or ``N`` (``dw_out``, the
  forward's output); ``block_r``: the chunk of a rank *reduction* (``h wᵀ``
  over ``K``, ``g w_out`` over ``N``), ``None`` = the whole rank at once;
  ``split_t``: token splits of a weight-gradient kernel (partial sums over
  token ranges in separate programs, added in XLA). ``num_warps`` /
  ``num_stages``: Triton's (``None``: the kernel's own default).
  """

  block_t: int
  block_f: int
  block_k: int = 64
  block_n: int = 64
  block_r: int | None = None
  split_t: int = 1
  num_warps: int | None = None
  num_stages: int | None = None

  def check(self, what: str, *, interpret: bool, split: bool = False) -> None:
    """Triton tiles must be powers of two, and its dots need >= 16 along every side."""
    for name, lo in (("block_t", 1), ("block_f", PLANES), ("block_k", 1), ("block_n", 1),
                     ("block_r", 1), ("split_t", 1)):
      v = getattr(self, name)
      if v is None:
        continue
      if not _pow2(v) or v < lo:
        raise ValueError(f"{what}: {name}={v} must be a power of two >= {lo}")
    if self.num_warps is not None and (not _pow2(self.num_warps) or self.num_warps > 16):
      raise ValueError(f"{what}: num_warps={self.num_warps} must be a power of two <= 16")
    if self.num_stages is not None and self.num_stages < 1:
      raise ValueError(f"{what}: num_stages={self.num_stages} must be >= 1")
    if split and self.block_t < 4:
      raise ValueError(f"{what} split mode: block_t={self.block_t} must be >= 4 (token groups)")
    if interpret:
      return
    # Compiled for a GPU: plane dots are (block_f / 8) wide, split-mode row planes block_t / 4.
    need = {"block_t": MIN_DOT * (4 if split else 1), "block_f": MIN_DOT * PLANES,
            "block_k": MIN_DOT, "block_n": MIN_DOT, "block_r": MIN_DOT}
    for name, lo in need.items():
      v = getattr(self, name)
      if v is not None and v < lo:
        raise ValueError(f"{what}: {name}={v} is too small for the GPU "
                         f"kernels (Triton dots need >= {MIN_DOT} per side): use >= {lo}")

  def params(self, interpret: bool, num_warps: int = 4, num_stages: int = 2):
    """Triton compiler parameters: this tile's, else the kernel's defaults given."""
    return compiler_params(interpret, self.num_warps or num_warps, self.num_stages or num_stages)

  def chunk(self, size: int) -> int:
    """The reduction chunk over a rank of ``size``: ``block_r``, at most the whole."""
    return size if self.block_r is None else min(self.block_r, size)

  def splits(self, n_tblocks: int) -> int:
    """Token splits actually used: the largest divisor of ``n_tblocks`` <= ``split_t``."""
    s = max(1, min(self.split_t, n_tblocks))
    while n_tblocks % s:
      s -= 1
    return s

  def as_dict(self) -> dict:
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class Tiles:
  """The :class:`Blocks` of every kernel of one op (hashable: a ``custom_vjp``
  static argument). Tokens and features are padded to the largest tile."""

  entries: tuple[tuple[str, Blocks], ...]

  @classmethod
  def uniform(cls, kernels: Sequence[str], blocks: Blocks) -> "Tiles":
    return cls(tuple((k, blocks) for k in kernels))

  def __getitem__(self, kernel: str) -> Blocks:
    for name, b in self.entries:
      if name == kernel:
        return b
    raise KeyError(f"no tiles for kernel {kernel!r}; have {[n for n, _ in self.entries]}")

  @property
  def t_multiple(self) -> int:
    return max(b.block_t for _, b in self.entries)

  @property
  def f_multiple(self) -> int:
    return max(b.block_f for _, b in self.entries)

  def as_dict(self) -> dict[str, dict]:
    return {name: b.as_dict() for name, b in self.entries}


def default_blocks(t: int, f: int, k: int, n: int, *, interpret: bool, split: bool = False
                   ) -> Blocks:
  """Tiles by shape, when neither the caller nor a target's tile table gives them.

  Interpret mode (CPU tests) uses small tiles so that several blocks and loop
  trips are exercised. GPU: 128 features (16 rows per plane: Triton dots need
  >= 16 per side) and as many tokens as keep the fp32 ``[block_t, max(K, N)]``
  accumulator at ~16K elements; the tuned per-target tables
  (``kernels/tiles.py``) replace these for compiled kernels. Tokens: never
  more than the (padded) problem.
  """
  widest = rank_size(max(k, n))
  if interpret:
    bt, bf, bk = 16, 32, 16
    bt = min(bt, max(4, pl.next_power_of_2(t)))
    bf = min(bf, max(PLANES, pl.next_power_of_2(f)))
    return Blocks(bt, bf, min(bk, widest), min(bk, widest))
  bt = max(4 * MIN_DOT if split else MIN_DOT, min(128, 16384 // widest))
  bf, bk = MIN_DOT * PLANES, 64
  # The forward's and dh's outputs span the whole rank (as before the tile tables).
  return Blocks(bt, bf, min(bk, widest), min(bk, widest))


def resolve_tiles(what: str, kernels: Sequence[str], t: int, f: int, k: int, n: int, *,
                  block_t: int | None, block_f: int | None, block_n: int | None = None,
                  interpret: bool | None, split: bool = False, target: str | None = None,
                  tiles=None, whole_out: dict[str, str] | None = None) -> tuple[Tiles, bool]:
  """The public wrappers' prologue: per-kernel tiles and the interpret switch.

  ``interpret`` defaults to False when a ``target`` is named, else to True
  off GPUs (``jax.default_backend()``). Tiles, first found: ``tiles`` (a
  mapping kernel name -> :class:`Blocks` or dict of its fields; unnamed
  kernels get the rest), explicit ``block_t``/``block_f``/``block_n`` (the
  same for every kernel, as before the tables), interpret-mode defaults,
  the tile table of ``target`` (default ``h200``) for this shape, and
  :func:`default_blocks`. All are checked (``what`` names the op).
  ``whole_out``: kernel -> the field (``block_n``/``block_k``) of its output
  tile over a rank, which the shared tiles leave at the whole rank (None).
  """
  if interpret is None:
    interpret = False if target is not None else jax.default_backend() != "gpu"
  interpret = bool(interpret)
  d = default_blocks(t, f, k, n, interpret=interpret, split=split)
  explicit = any(v is not None for v in (block_t, block_f, block_n))
  uniform = Blocks(block_t or d.block_t, block_f or d.block_f, d.block_k, block_n or d.block_n)
  table = {}
  if not interpret and not explicit:
    table = tile_tables.lookup(target or "h200", kernels, t=t, f=f, k=rank_size(k),
                               n=rank_size(n), split=split)
  given = dict(tiles or {})
  unknown = set(given) - set(kernels)
  if unknown:
    raise ValueError(f"{what}: tiles for unknown kernels {sorted(unknown)}; kernels: {list(kernels)}")
  entries = []
  for name in kernels:
    b = given.get(name, table.get(name))
    if b is None:
      b = uniform
      if name in (whole_out or {}):
        b = dataclasses.replace(b, **{whole_out[name]: None})
    if isinstance(b, dict):
      b = Blocks(**b)
    b.check(f"{what} ({name})" if given or table else what, interpret=interpret, split=split)
    entries.append((name, b))
  return Tiles(tuple(entries)), interpret


def rank_size(n: int) -> int:
  """Padded size of a rank (``K``/``N``) dimension: a power of two, at least 16."""
  return max(MIN_DOT, pl.next_power_of_2(n))


def pad_rank(x: jax.Array, axis: int) -> jax.Array:
  """Zero-pad a rank dimension to :func:`rank_size` (zeros add nothing to any dot)."""
  return pad_to(x, axis, rank_size(x.shape[axis]))


def padded(size: int, multiple: int) -> int:
  """``size`` rounded up to a multiple (the length :func:`pad_to` gives)."""
  return pl.cdiv(size, multiple) * multiple


def pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  """Zero-pad ``axis`` up to a multiple (zeros flow through every kernel exactly)."""
  extra = padded(x.shape[axis], multiple) - x.shape[axis]
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def check_divides(size: int, block: int, what: str, name: str) -> None:
  """Pallas grids that do not cover the array give silent garbage: refuse them."""
  if size % block:
    raise ValueError(f"{what}: {name}={size} is not a multiple of the block size {block}; "
                     "pad the input (the public wrappers do) or choose another block")


def compiler_params(interpret: bool, num_warps: int = 4, num_stages: int = 2):
  """Triton lowering parameters (Pallas' default GPU lowering may be Mosaic GPU)."""
  if interpret:
    return None
  from jax.experimental.pallas import triton as pltriton

  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# --------------------------------------------------------------------------
# In-register 2:4 on planes (element-wise; used inside and outside kernels).
# --------------------------------------------------------------------------


def keep_24(a: list[jax.Array]) -> list[jax.Array]:
  """Keep-masks of the 2 largest of 4 planes; ties go to the lower plane.

  Same rule as ``sparse24.mask_24`` with ``a`` already magnitudes.
  """
  keep = []
  for i in range(GROUP):
    beats = jnp.zeros(a[i].shape, jnp.int32)
    for j in range(GROUP):
      if j == i:
        continue
      win = (a[j] > a[i]) | (a[j] == a[i]) if j < i else a[j] > a[i]
      beats = beats + win.astype(jnp.int32)
    keep.append(beats < 2)
  return keep


def compress_group(x: list[jax.Array], keep: list[jax.Array]):
  """Values ``(v0, v1)`` at the first and last kept plane and the 4-bit index pair."""
  k0, k1, k2, k3 = keep
  v0 = jnp.where(k0, x[0], jnp.where(k1, x[1], x[2]))
  v1 = jnp.where(k3, x[3], jnp.where(k2, x[2], x[1]))
  i0 = jnp.where(k0, 0, jnp.where(k1, 1, 2)).astype(jnp.int32)
  i1 = jnp.where(k3, 3, jnp.where(k2, 2, 1)).astype(jnp.int32)
  return v0, v1, i0 | (i1 << 2)


def pack_meta(nib_a: jax.Array, nib_b: jax.Array) -> jax.Array:
  """Two groups' nibbles -> one uint8 (group 2g low, group 2g+1 high)."""
  return (nib_a | (nib_b << 4)).astype(jnp.uint8)


def unpack_meta(meta: jax.Array) -> tuple[jax.Array, jax.Array]:
  """uint8 metadata -> int32 nibbles of the low and high group."""
  m = meta.astype(jnp.int32)
  return m & 0xF, (m >> 4) & 0xF


def decompress_group(v0: jax.Array, v1: jax.Array, nib: jax.Array) -> list[jax.Array]:
  """The 4 dense planes of one group (zeros at dropped positions)."""
  i0 = nib & 0x3
  i1 = nib >> 2
  zero = jnp.zeros((), v0.dtype)
  return [jnp.where(i0 == j, v0, jnp.where(i1 == j, v1, zero)) for j in range(GROUP)]


def gather_group(x: list[jax.Array], nib: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The values of a group's 4 planes at its kept indices ``i0 < i1`` (its nibble): the
  inverse of :func:`decompress_group` (``i0`` is 0-2, ``i1`` is 1-3)."""
  i0, i1 = nib & 0x3, nib >> 2
  return (jnp.where(i0 == 0, x[0], jnp.where(i0 == 1, x[1], x[2])),
          jnp.where(i1 == 3, x[3], jnp.where(i1 == 2, x[2], x[1])))


def kept_planes(nib: jax.Array) -> list[jax.Array]:
  """Keep-masks of the 4 planes of one group from its nibble."""
  i0 = nib & 0x3
  i1 = nib >> 2
  return [(i0 == j) | (i1 == j) for j in range(GROUP)]


def keep_planes(y_8: Sequence[jax.Array]) -> list[jax.Array]:
  """Keep-masks of the 8 planes of a feature block: 2:4 within planes 0-3 and 4-7."""
  return keep_24(list(y_8[:4])) + keep_24(list(y_8[4:]))


def compress_planes(x_8: Sequence[jax.Array], keep_8: Sequence[jax.Array]
                    ) -> tuple[list[jax.Array], jax.Array]:
  """The 4 value planes (``vals_4xTxG`` order) and the uint8 metadata of 8 planes."""
  a0, a1, nib_a = compress_group(list(x_8[:4]), list(keep_8[:4]))
  b0, b1, nib_b = compress_group(list(x_8[4:]), list(keep_8[4:]))
  return [a0, a1, b0, b1], pack_meta(nib_a, nib_b)


def decompress_planes(vals_ref, meta_ref, rows, gs) -> list[jax.Array]:
  """The 8 dense planes of the tile ``[rows, gs]`` of a compressed activation
  (``vals_4xTxG``, ``meta_TxG`` refs); zeros at the dropped positions."""
  nib_a, nib_b = unpack_meta(meta_ref[rows, gs])
  v = [vals_ref[p, rows, gs] for p in range(4)]
  return decompress_group(v[0], v[1], nib_a) + decompress_group(v[2], v[3], nib_b)


def plane_products(lhs: Callable, rhs: Callable, size: int, chunk: int, dot: Callable,
                   shape: tuple[int, int] | None = None) -> list[jax.Array]:
  """The 8 plane dots ``dot(lhs(ks), rhs(j, ks))`` (fp32) reduced over a rank of ``size``
  (``shape``: of one plane's result, needed when chunked).

  ``chunk == size``: one dot per plane with ``ks = None`` (``lhs``/``rhs``
  load the whole rank). Else a loop over ``size / chunk`` chunks ``ks``
  (``pl.ds``) accumulating the 8 planes in fp32: only one chunk of the
  operands is live (and staged in shared memory) at a time.
  """
  if chunk >= size:
    a = lhs(None)
    return [dot(a, rhs(j, None)) for j in range(PLANES)]

  def body(c, accs):
    ks = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
    a = lhs(ks)
    return tuple(acc + dot(a, rhs(j, ks)) for j, acc in enumerate(accs))

  zeros = tuple(jnp.zeros(shape, jnp.float32) for _ in range(PLANES))
  return list(jax.lax.fori_loop(0, size // chunk, body, zeros))


def relu_planes(x: jax.Array | None, w_ref, gs, dtype, *, x_ref=None, rows=None,
                chunk: int | None = None) -> list[jax.Array]:
  """``relu(x @ wᵀ)`` for the 8 planes of the feature rows ``gs`` of a planed
  ``w_8xGxK`` ref, rounded to ``dtype`` before the ReLU (as the XLA op rounds y1).

  With ``chunk`` below ``K`` the rank is reduced in chunks loaded from
  ``x_ref[rows, ks]`` (``x`` may then be None)."""
  k = w_ref.shape[-1]
  chunk = k if chunk is None else min(chunk, k)
  if chunk >= k:
    x = x if x is not None else x_ref[rows, :]
    return [jnp.maximum(dot_nt(x, w_ref[j, gs, :]).astype(dtype), 0) for j in range(PLANES)]
  y = plane_products(lambda ks: x_ref[rows, ks], lambda j, ks: w_ref[j, gs, ks], k, chunk, dot_nt,
                     (rows.size, gs.size))
  return [jnp.maximum(v.astype(dtype), 0) for v in y]


def accumulate_planes_over_tokens(
    dw_ref, *, block_t: int, n_tblocks: int,
    products: Callable[[jax.Array], list[list[tuple[jax.Array, jax.Array]]]],
    first_block=0, transposed: bool = False) -> None:
  """The weight-gradient loop: ``dw_ref[j] = Σ_token blocks Σ_terms aᵀ b`` for the 8 planes.

  ``products(t0)`` gives, for the token block starting at row ``t0``, a list
  of terms, each a list over the 8 planes of ``(a, b)`` with ``a`` ``[rows, M]``
  and ``b`` ``[rows, N]`` (``dw_ref`` is ``[8, M, N]``); the terms are added in
  order, in fp32 registers, and stored once. ``first_block``: the token block
  the loop starts at (a token split's share: blocks ``first_block ..
  first_block + n_tblocks - 1``).

  ``transposed``: accumulate ``(bᵀ a)`` ``[N, M]`` and store its transpose, so
  ``a`` is the dot's right operand in its natural ``[K, N]`` orientation and
  only ``b`` is transposed. Triton (3.x, sm_90) aborts the process ("LLVM
  Fatal Error ... Dimensions must match") on a transposed left operand that
  was selected by a mask computed from a dot's result (``relu2_sparsify``'s
  dw: the 2:4 choice of the recomputed ``y1`` picks the cotangent); the
  other orientation compiles.
  """
  m, n = dw_ref.shape[1:]

  def body(ti, acc):
    out = list(acc)
    for term in products(pl.multiple_of((first_block + ti) * block_t, block_t)):
      out = [out[j] + (dot_tn(term[j][1], term[j][0]) if transposed else dot_tn(*term[j]))
             for j in range(PLANES)]
    return tuple(out)

  zeros = tuple(jnp.zeros((n, m) if transposed else (m, n), jnp.float32) for _ in range(PLANES))
  acc = jax.lax.fori_loop(0, n_tblocks, body, zeros)
  for j in range(PLANES):
    dw_ref[j] = acc[j].T if transposed else acc[j]


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a @ bᵀ`` accumulated in fp32."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a @ b`` accumulated in fp32."""
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
  """``aᵀ @ b`` accumulated in fp32."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
