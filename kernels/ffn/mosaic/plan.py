"""The Mosaic GPU FFN kernels' planner: tiles, the static plan of a call, shared memory.

Nothing here runs on a GPU: from a call's shapes, backward mode, tiles and
:class:`~elas_kernels.gpu.GpuSpec` it derives every kernel launch as a
:class:`KernelSpec` (grid, pipeline stages fitted to the GPU's shared memory,
scratch buffers, wgmma instructions, FLOPs, HBM bytes), which
``bodies.launch`` runs and the static performance report reads
(:func:`kernel_specs`). A kernel that cannot fit the GPU raises
``NotImplementedError`` here, before anything is traced.

Layouts (``vjp.py``'s module docstring has the whole picture):

* features in *steps* of ``block_f`` made of *sub-tiles* of ``sub_f = 8·P``;
  sub-tile column ``j·P + c`` holds feature ``8c + j`` (:attr:`Plan.perm`), so
  one wgmma gives 8 *planes* ``[:, jP:(j+1)P]`` with the same register layout
  and the two 2:4 groups of features ``8c .. 8c+7`` are planes 0-3 and 4-7;
* the compressed activation: ``vals [T, F/2]`` (per sub-tile 4 value planes)
  and ``meta [token tiles, sub-tiles · 64P/16, 16]`` (:func:`meta_TxG` converts
  to ``sparse24.compress_24``'s ``[T, F/8]`` bytes);
* split mode: tokens in :func:`split_order` (4 row planes per step).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from elas_kernels import common as cm
from elas_kernels import sparse24
from elas_kernels.ffn.mosaic import compat as mc
from elas_kernels.gpu import H200, GpuSpec

GROUP = 4
TOKENS = 64  # token rows of one wgmma tile (M)
PLANES = 8  # features per metadata byte: two 2:4 groups
RANK_ALIGN = 64  # ranks pad to multiples of 64: a 128-byte swizzle K group of bf16
SMEM_MARGIN = 4096  # barriers, alignment and Mosaic's 2 KiB cross-warp reduction scratch
GPU_DTYPES = (jnp.bfloat16, jnp.float16)


# --------------------------------------------------------------------------
# Tiles and the static plan of one call.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tile sizes (see the module docstring).

  ``block_t`` tokens per forward / ``dh`` program and per weight-gradient
  pipeline step (64, or 128: twice the registers; the interpreter's default,
  fewer steps to interpret); ``block_f`` features per pipeline step of the
  forward and ``dh`` kernels, ``block_f_dw`` per program of the weight-gradient
  kernels (their accumulator is ``[block_f_dw, block_k]``), both multiples of
  ``sub_f`` (8 planes of ``sub_f / 8``; one wgmma N); ``block_n`` / ``block_k``
  output columns per program (multiples of 64, at most 256); ``dw_split``
  programs sharing one weight-gradient token loop (partial sums added by TMA
  reduce-add); ``stages`` pipeline buffers (fewer where shared memory is short);
  ``materialize_relu``: ``ste``'s and the
  warm-up's backward read ``relu(y1)`` from the ``relu`` kernel and ``dw_in`` reads
  the ``dy1`` that ``dh`` wrote (None or True, the default), or (False) recompute
  ``y1`` in ``dh`` / ``dw_in`` / ``dw_out`` (no ``[T, F]`` temporaries; ranks up to
  256): :func:`recompute_source`; ``warp_specialized``: the forward and
  (from a stored activation) ``dh`` run as one TMA producer warpgroup and
  two consumer warpgroups of ``block_t`` tokens each, sharing every weight step,
  in column blocks of at most :data:`WS_MAX_BLOCK`, and the 2:4 phase's weight
  gradients warp-specialized too (:func:`dw_ws_specs`); ``sparse_mma``: in the 2:4
  phase the forward's ``y2s @ w_outᵀ`` and ``dh``'s ``dy1 @ w_in`` (from the compressed
  activation) run as Hopper's sparse wgmma (``sparse_mma.py``; 16-bit inputs, the
  weights' rows in :func:`sparse_rows` order), the warm-up on dense MMAs.
  """

  block_t: int = TOKENS
  block_f: int = 128
  block_f_dw: int = 64
  sub_f: int = 64
  block_n: int = 256
  block_k: int = 256
  dw_split: int | None = None  # weight-gradient token splits (None: by grid size)
  stages: int = 2
  materialize_relu: bool | None = None  # ste / warm-up backward: relu kernel (None: yes)
  warp_specialized: bool = False  # fwd, dh, dW as a producer + 2 consumer warpgroups (ranks <= 256)
  sparse_mma: bool = False  # 2:4 phase: y2s @ w_outᵀ and dh's dy1 @ w_in on sparse tensor cores

  def check(self) -> None:
    if self.block_t not in (TOKENS, 2 * TOKENS):
      raise ValueError(f"elas_ffn (mosaic): block_t={self.block_t} must be {TOKENS} or "
                       f"{2 * TOKENS} (one warpgroup's wgmma rows)")
    if self.sub_f not in (64, 128, 256):
      raise ValueError(f"elas_ffn (mosaic): sub_f={self.sub_f} must be 64, 128 or 256")
    for name in ("block_f", "block_f_dw"):
      v = getattr(self, name)
      if v % self.sub_f or v > 256:
        raise ValueError(f"elas_ffn (mosaic): {name}={v} must be a multiple of "
                         f"sub_f={self.sub_f} and at most 256")
    for name in ("block_n", "block_k"):
      v = getattr(self, name)
      if v % RANK_ALIGN or not 0 < v <= 256:
        raise ValueError(f"elas_ffn (mosaic): {name}={v} must be a multiple of 64, at most 256")
    if self.stages < 1:
      raise ValueError(f"elas_ffn (mosaic): stages={self.stages} must be >= 1")


def _rank_blocks(size: int, block: int) -> tuple[int, int]:
  """(padded size, block): fewest blocks of at most ``block``, each a multiple of 64."""
  size = cm.padded(size, RANK_ALIGN)
  n_blocks = -(-size // block)
  blk = cm.padded(-(-size // n_blocks), RANK_ALIGN)
  return blk * n_blocks, blk


class Plan:
  """Static facts of one call: padded sizes, tiles, feature permutation, split order."""

  def __init__(self, t: int, f: int, k: int, n: int, dtype, mode: str, tiles: Tiles,
               interpret: bool, gpu: GpuSpec = H200):
    self.t, self.f, self.k, self.n = t, f, k, n
    self.dtype, self.mode, self.tiles, self.interpret = jnp.dtype(dtype), mode, tiles, interpret
    self.gpu = gpu  # shared memory per block and SMs: the stages and grids planned
    self.bt, self.fs, self.ft = tiles.block_t, tiles.block_f, tiles.sub_f
    self.p = self.ft // PLANES
    self.meta_sub = self.bt * self.p // 16  # one sub-tile's [bt, P] metadata bytes, 16 a row
    self.rp = 4 if mode == "split" else 1  # row planes per weight-gradient step (split: token 2:4)
    self.f_main = f - f % 4  # the f % 4 tail forms no 2:4 group: dense, in XLA
    # the warp-specialized forward takes 2 token tiles per program
    self.t_pad = cm.padded(t, self.bt * max(self.rp, 2 if tiles.warp_specialized else 1))
    self.f_pad = cm.padded(self.f_main, math.lcm(tiles.block_f, tiles.block_f_dw))
    self.k_pad, self.kb = _rank_blocks(k, tiles.block_k)
    self.n_pad, self.nb = _rank_blocks(n, tiles.block_n)
    self.nt = self.t_pad // self.bt
    self.n_sub = self.f_pad // self.ft
    # Kernel feature order: sub-tile column j·P + c holds feature 8c + j of the sub-tile.
    q = np.arange(self.f_pad)
    s, j, c = q // self.ft, (q % self.ft) // self.p, q % self.p
    self.perm = s * self.ft + PLANES * c + j
    split = tiles.dw_split
    if split is not None:
      for steps in {self.nt, self.t_pad // (self.bt * self.rp)}:
        if steps % split:
          raise ValueError(f"elas_ffn (mosaic): dw_split={split} does not divide the {steps} "
                           f"token steps of a weight-gradient kernel ({t} tokens, block_t={self.bt})")
    self.order = self.tok_dense = None
    if mode == "split":
      self.order, self.tok_dense = split_order(t, self.t_pad, self.bt)

  @property
  def n_steps(self) -> int:
    """Feature steps of ``fs`` (the forward's and dh's, or a weight-gradient kernel's)."""
    return self.f_pad // self.fs

  @property
  def n_sub_step(self) -> int:
    return self.fs // self.ft

  def replace(self, **attrs) -> "Plan":
    c = object.__new__(Plan)
    c.__dict__.update(self.__dict__, **attrs)
    return c

  def for_dw(self) -> "Plan":
    return self.replace(fs=self.tiles.block_f_dw)

  def rows_in(self, x: jax.Array) -> jax.Array:
    """Pad the tokens and (split) put them in kernel order."""
    x = cm.pad_to(x, 0, self.t_pad)
    return x if self.order is None else x[self.order]

  def rows_out(self, x: jax.Array) -> jax.Array:
    if self.order is not None:
      x = x[np.argsort(self.order)]
    return x[: self.t]

  def features_in(self, x: jax.Array, axis: int, rows: np.ndarray | None = None) -> jax.Array:
    """Main features zero-padded to whole steps, in kernel order, along ``axis``
    (``rows``: those of the kernel order, e.g. :func:`sparse_rows`, in one gather)."""
    x = lax.slice_in_dim(x, 0, self.f_main, axis=axis)
    order = self.perm if rows is None else self.perm[rows]
    return jnp.take(cm.pad_to(x, axis, self.f_pad), order, axis=axis)

  def features_out(self, x: jax.Array, axis: int) -> jax.Array:
    x = jnp.take(x, np.argsort(self.perm), axis=axis)
    return lax.slice_in_dim(x, 0, self.f_main, axis=axis)


def split_order(t: int, t_pad: int, bt: int):
  """Kernel token order for split mode, and which rows keep all tokens.

  The reference groups tokens ``perm[4m .. 4m+3]`` (``perm`` =
  ``sparse24.split_token_order(t)``); the ``dw_out`` kernel takes 4 row
  planes of ``bt`` tokens per step and groups rows ``i, i + bt, i + 2bt,
  i + 3bt``, so sequence position ``4m + j`` goes to row ``b·4bt + j·bt + i``
  with ``m = b·bt + i``. The ``t % 4`` tokens of an incomplete group stay
  dense, as in the reference.
  """
  seq = np.concatenate([sparse24.split_token_order(t), np.arange(t, t_pad)])
  dense_seq = np.zeros(t_pad, np.int32)
  dense_seq[t - t % 4:] = 1
  pos = np.arange(t_pad)
  m, j = pos // 4, pos % 4
  row = (m // bt) * 4 * bt + j * bt + m % bt
  order = np.empty(t_pad, np.int64)
  order[row] = seq
  tok_dense = np.empty(t_pad, np.int32)
  tok_dense[row] = dense_seq
  return order, tok_dense



# --------------------------------------------------------------------------
# Kernel specs: grids, scratch, shared-memory budgets.
# --------------------------------------------------------------------------


def _nbytes(shape, dtype) -> int:
  return math.prod(shape) * jnp.dtype(dtype).itemsize


class Scratch:
  """Scratch buffers of one kernel by name, with their bytes; pipeline buffers are
  added to the budget with :meth:`pipelined` (``stages`` copies each)."""

  def __init__(self):
    self.buffers, self.pipeline_bytes, self.unions = {}, 0, []

  def add(self, name, shape, dtype, swizzle_minor=None):
    mg = mc.plgpu()
    tr = () if swizzle_minor is None else mc.swizzle_transforms(dtype, swizzle_minor)
    self.buffers[name] = mg.SMEM(tuple(shape), dtype, transforms=tr)
    return self

  def pipelined(self, *blocks):
    self.pipeline_bytes += sum(_nbytes(s, d) for s, d in blocks)
    return self

  def alias(self, *names: str):
    """Let buffers whose lifetimes are disjoint share shared memory (a ``plgpu.RefUnion``:
    the kernel still sees each under its own name, see ``bodies.launch``)."""
    self.unions.append(names)
    return self

  def bytes(self, stages: int) -> int:
    size = {n: _nbytes(b.shape, b.dtype) for n, b in self.buffers.items()}
    own = sum(v for n, v in size.items() if not any(n in u for u in self.unions))
    own += sum(max(size[n] for n in u) for u in self.unions)
    return own + stages * self.pipeline_bytes

  def build(self, n_barriers: int):
    mg = mc.plgpu()
    out = {n: b for n, b in self.buffers.items() if not any(n in u for u in self.unions)}
    out.update({UNION_SEP.join(u): mg.RefUnion(*(self.buffers[n] for n in u))
                for u in self.unions})
    return dict(out, bar=mg.Barrier(num_barriers=n_barriers))


UNION_SEP = "|"  # the scratch key of a RefUnion joins its members' names


def _fit_stages(what: str, scratch: Scratch, c: Plan, steps: int) -> int:
  """Most pipeline stages (<= ``tiles.stages`` and the step count) that fit shared memory;
  ``NotImplementedError`` when even one does not (interpret mode has no limit)."""
  want = max(1, min(c.tiles.stages, steps))
  if c.interpret:
    return want
  limit = c.gpu.smem_per_block
  for stages in range(want, 0, -1):
    if scratch.bytes(stages) <= limit - SMEM_MARGIN:
      return stages
  raise NotImplementedError(
      f"elas_ffn (mosaic) {what}: {scratch.bytes(1)} bytes of shared memory with one pipeline "
      f"stage exceed the {limit} a block of the {c.gpu.name} has (K={c.k_pad}, N={c.n_pad}, "
      f"block_f={c.fs}); use "
      + ("kernel=mosaic (warp_specialized=False: one warpgroup's buffers)"
         if c.tiles.warp_specialized else "kernel=triton or xla") + " for these ranks")


def _with_stages(c: Plan, stages: int) -> Plan:
  return c.replace(tiles=dataclasses.replace(c.tiles, stages=stages))


def _out_chunks(s: Scratch, c: Plan, acc_shape) -> Scratch:
  """The output staging of ``bodies.store_out``: double-buffered 64x64 fp32 chunks on a GPU."""
  return s.add("out_s", (2, *(acc_shape if c.interpret else (64, 64))), jnp.float32)


WS_CONSUMERS = 2  # consumer warpgroups of the warp-specialized forward (+ 1 producer)
# A consumer's [block_t, block] fp32 accumulator and its y1 / dy2 sub-tile within the 168
# registers a thread ptxas gives a 384-thread CTA (setmaxnreg is ignored, docs/kernels.md):
# the warp-specialized forward and dh cover output / dh column blocks of at most 128 (rank
# 256 in one block spilled 1552 bytes); the columns past them come from packed_mm.
WS_MAX_BLOCK = 128
WS_DH_SOURCES = ("compressed", "dense")  # dh warp-specialized from these relu(y1) sources


def _ws_tile_and_staging(s: Scratch, name: str, tile, dt, chunk) -> Scratch:
  """Each consumer's token tile ``name`` and its output staging ``out_s`` (double-buffered
  ``chunk``s) sharing bytes (a ``RefUnion``), both ``[consumers, copies, ...]`` with equal
  bytes per consumer, so consumer ``k``'s staging lies inside its own tile: with unequal
  ones (the staging halved to bf16 at rank 256, or 32 KiB fp32 over a 16 KiB tile at rank
  128) one consumer's epilogue wrote into the other's tile while that one still read it
  (tests/test_kernels_mosaic.py checks the byte ranges: the interpreter's race detector
  flags any cross-thread use of a union's members, disjoint or not). The tile is
  ``[name][k, 0]``; the staging's copies past the first two are unused."""
  e_tile, e_chunk = math.prod(tile), math.prod(chunk)
  per_consumer = math.lcm(e_tile, 2 * e_chunk)
  s.add(name, (WS_CONSUMERS, per_consumer // e_tile, *tile), dt, tile[-1])
  s.add("out_s", (WS_CONSUMERS, per_consumer // e_chunk, *chunk), dt)
  return s.alias(name, "out_s")


def fwd_block(c: Plan) -> int:
  """Output columns of the forward kernel's programs: ``block_n``'s blocks, at most
  :data:`WS_MAX_BLOCK` warp-specialized (a multiple of 64 all the same)."""
  return min(c.nb, WS_MAX_BLOCK) if c.tiles.warp_specialized else c.nb


def dh_block(c: Plan, source: str) -> int:
  """``dh``'s column block from ``source``: ``block_k``'s, at most :data:`WS_MAX_BLOCK`
  where ``dh`` is warp-specialized (from a source in :data:`WS_DH_SOURCES`)."""
  ws = c.tiles.warp_specialized and source in WS_DH_SOURCES
  return min(c.kb, WS_MAX_BLOCK) if ws else c.kb


def dense_forward_plan(c: Plan) -> Plan:
  """The plan of the dense warm-up's forward: ``c``, or without warp specialisation where
  the warp-specialized forward would split the output (its ``relu(y1)`` store beside a
  ``[64, 128]`` accumulator spills in 168 registers, 16 bytes at 130M; the single
  warpgroup covers up to 256 columns in one block, ``y1`` once)."""
  if c.tiles.warp_specialized and c.n_pad > fwd_block(c):
    return c.replace(tiles=dataclasses.replace(c.tiles, warp_specialized=False))
  return c


@dataclasses.dataclass
class KernelSpec:
  """One kernel launch as built for a call: what the static report reads.

  ``wgmma``: instruction shape -> count per program (``m64nNk16``, each
  ``2·64·N·16`` FLOPs; the sparse ``m64nNk32sp``, each executing as many: half its
  ``K`` is the zeros it skips); ``flops``: the launch's executed tensor-core FLOPs
  (recomputes included); ``hbm_bytes``: the HBM traffic it cannot avoid (activations and
  outputs once, weights once: they stay in the 50 MB L2); ``smem_bytes``: the
  scratch this module allocates (Mosaic adds barriers and 2 KiB for reductions).
  """

  name: str
  grid: tuple[int, ...]
  grid_names: tuple[str, ...]
  stages: int
  smem_bytes: int
  wgmma: dict[str, int]
  hbm_bytes: int
  out_shape: object = dataclasses.field(repr=False)
  scratch: object = dataclasses.field(repr=False)
  body: str = dataclasses.field(repr=False, default="")  # a kernel body of bodies.BODIES
  options: dict = dataclasses.field(repr=False, default_factory=dict)  # the body's options
  c: object = dataclasses.field(repr=False, default=None)  # the Plan it was built for
  warpgroups: int = 1  # per program; > 1: warp-specialized (the last one produces)

  @property
  def programs(self) -> int:
    return math.prod(self.grid)

  @property
  def flops(self) -> int:
    return self.programs * sum(2 * 64 * int(k.split("n")[1].split("k")[0]) * 16 * v
                               for k, v in self.wgmma.items())


def _mma(counts: dict[str, int], n: int, k: int, times: int = 1, sparse: bool = False) -> None:
  """Add the m64 wgmma instructions of one ``[64, k] x [k, n]`` product (``times`` of them;
  ``sparse``: the 2:4 ``A`` on sparse tensor cores, one ``m64nNk32`` per 32 of ``k``)."""
  key, depth = (f"m64n{n}k32sp", 32) if sparse else (f"m64n{n}k16", 16)
  counts[key] = counts.get(key, 0) + times * k // depth


def sparse_rows(c: "Plan") -> np.ndarray:
  """The weight rows (kernel feature order) the sparse wgmma reads as ``B``: each
  sub-tile's rows in ``sparse_mma.k_order``."""
  from elas_kernels.ffn.mosaic import sparse_mma

  order = sparse_mma.k_order(c.p)
  return (np.arange(c.n_sub)[:, None] * c.ft + order[None, :]).reshape(-1)


def _spec_of(name, c: Plan, s: Scratch, steps: int, grid, grid_names, out_shape, body: str,
             wgmma, hbm_bytes, warpgroups: int = 1, **options) -> KernelSpec:
  c = _with_stages(c, _fit_stages(name, s, c, steps))
  if warpgroups > 1 and c.tiles.stages < 2 and steps > 1:
    raise NotImplementedError(f"elas_ffn (mosaic) {name}: one pipeline stage fits shared memory; "
                              "a warp-specialized kernel needs two (use smaller block_f)")
  return KernelSpec(name=name, grid=grid, grid_names=grid_names, stages=c.tiles.stages,
                    smem_bytes=s.bytes(c.tiles.stages), wgmma=wgmma, hbm_bytes=int(hbm_bytes),
                    out_shape=out_shape, scratch=s.build(2), body=body, options=options, c=c,
                    warpgroups=warpgroups)


def fwd_spec(c: Plan, store: bool, first_block: bool = False,
             store_relu: bool = False, sparse: bool = False) -> KernelSpec:
  """Outputs: [out [T, N] (compute dtype), stats fp32 [3, T]] + [vals, meta] if ``store``.
  Warp-specialized (``tiles.warp_specialized``): every per-token buffer once per consumer
  warpgroup. ``first_block``: only the first ``block_n`` output columns are written; the
  others come from :func:`packed_mm_spec` (into the same buffer) on the stored activation
  (``y1`` computed once): the compressed one in the 2:4 phase, or (``store_relu``, the dense warm-up) ``relu(y1)``
  dense, a last output ``[T, F]`` in kernel feature order. ``sparse`` (the 2:4 phase of
  ``tiles.sparse_mma``): ``y2s @ w_outᵀ`` by sparse wgmma, ``w_outᵀ``'s rows in
  :func:`sparse_rows` order."""
  dt, it = c.dtype, c.dtype.itemsize
  ws = c.tiles.warp_specialized
  if ws:
    c = c.replace(nb=fwd_block(c))
  per = (WS_CONSUMERS,) if ws else ()  # a leading consumer axis on per-token buffers
  chunk = (c.bt, c.nb) if c.interpret else (64, 64)
  if ws:  # the output staged where h was: h is read by the last step's wgmma, before it
    s = _ws_tile_and_staging(Scratch(), "h_s", (c.bt, c.k_pad), dt, chunk)
  else:
    s = Scratch().add("h_s", (c.bt, c.k_pad), dt, c.k_pad).add("out_s", (2, *chunk), dt)
  s.add("stats_s", (*per, 3, c.bt), jnp.float32)
  s.pipelined(((c.fs, c.k_pad), dt), ((c.fs, c.nb), dt))
  if store:
    s.add("vals_s", (*per, 2, c.bt, c.fs // 2), dt, c.ft // 2)
    s.add("meta_s", (*per, 2, c.n_sub_step * c.meta_sub, 16), jnp.uint8)
  if store_relu:
    s.add("r_s", (*per, 2, c.bt, c.fs), dt, c.ft)
  if c.interpret:
    s.add("stage_s", (*per, c.bt, c.ft), dt, c.ft)
  n_cols = c.nb if first_block else c.n_pad  # written by this kernel
  out_shape = [jax.ShapeDtypeStruct((c.t_pad, c.n_pad), dt),
               jax.ShapeDtypeStruct((3, c.t_pad), jnp.float32)]
  if store:
    out_shape += [jax.ShapeDtypeStruct((c.t_pad, c.f_pad // 2), dt),
                  jax.ShapeDtypeStruct((c.nt, c.n_sub * c.meta_sub, 16), jnp.uint8)]
  if store_relu:
    out_shape.append(jax.ShapeDtypeStruct((c.t_pad, c.f_pad), dt))
  mma = {}
  _mma(mma, c.ft, c.k_pad, c.n_sub)
  _mma(mma, c.nb, c.ft, c.n_sub, sparse=sparse)
  hbm = (c.t_pad * c.k_pad * it + c.t_pad * n_cols * it + 12 * c.t_pad
         + c.f_pad * (c.k_pad + n_cols) * it
         + (c.t_pad * c.f_pad // 2 * it + c.t_pad * c.f_pad // 8 if store else 0)
         + (c.t_pad * c.f_pad * it if store_relu else 0))
  suffix = (("_first" if first_block else "") + ("_store" if store else "")
            + ("_relu" if store_relu else "") + ("_sp" if sparse else ""))
  n_blocks = 1 if first_block else c.n_pad // c.nb
  if ws:
    return _spec_of("elas_mgpu_fwd_ws" + suffix, c, s, c.n_steps,
                    (c.nt // WS_CONSUMERS, n_blocks), ("t", "n"), out_shape, "fwd_ws",
                    {k: WS_CONSUMERS * v for k, v in mma.items()}, hbm,
                    warpgroups=WS_CONSUMERS + 1, store=store, store_relu=store_relu,
                    sparse=sparse)
  if first_block:
    return _spec_of("elas_mgpu_fwd" + suffix, c, s, c.n_steps,
                    (c.nt, 1), ("t", "n"), out_shape, "fwd", mma, hbm, store=store,
                    store_relu=store_relu, sparse=sparse)
  return _spec_of("elas_mgpu_fwd" + ("_store" if store else "") + ("_sp" if sparse else ""), c,
                  s, c.n_steps, (c.nt, c.n_pad // c.nb), ("t", "n"), out_shape,
                  "fwd", mma, hbm, store=store, sparse=sparse)


def relu_spec(c: Plan) -> KernelSpec:
  """``relu(y1)`` dense ``[T, F]`` (kernel feature order) for the backward of ``ste`` and
  the warm-up: per program a token tile and ``n_steps / chunks`` feature steps, ``chunks``
  the least divisor of the step count that fills the GPU with one wave (60M: 3, 1.9
  waves instead of 0.65)."""
  dt, it = c.dtype, c.dtype.itemsize
  s = Scratch().add("h_s", (c.bt, c.k_pad), dt, c.k_pad).add("r_s", (2, c.bt, c.fs), dt, c.ft)
  s.pipelined(((c.fs, c.k_pad), dt))
  chunks = _feature_chunks(c, s, c.nt)
  mma = {}
  _mma(mma, c.ft, c.k_pad, c.n_sub)
  hbm = c.t_pad * c.k_pad * it * chunks + c.f_pad * c.k_pad * it + c.t_pad * c.f_pad * it
  return _spec_of("elas_mgpu_relu", c, s, c.n_steps // chunks, (c.nt, chunks), ("t", "f"),
                  jax.ShapeDtypeStruct((c.t_pad, c.f_pad), dt), "relu",
                  {k: v // chunks for k, v in mma.items()}, hbm, chunk_steps=c.n_steps // chunks)


def _feature_chunks(c: Plan, s: Scratch, token_programs: int) -> int:
  """The least divisor of the feature steps that, as programs per token block, fills the
  GPU with one wave (at the programs per SM that ``s`` leaves room for)."""
  per_sm = max(1, c.gpu.smem_per_block // (s.bytes(c.tiles.stages) + SMEM_MARGIN))
  return next(d for d in range(1, c.n_steps + 1) if c.n_steps % d == 0 and (
      token_programs * d >= c.gpu.sm_count * per_sm or d == c.n_steps))


def tokmask_spec(c: Plan) -> KernelSpec:
  """Split mode's ``dw_out`` operand: ``relu(y1)`` decompressed with the token-wise 2:4 of
  its square applied, dense ``[T, F]`` (a transient) in kernel feature order; one
  program per ``rp · block_t`` tokens and chunk of feature steps (as :func:`relu_spec`).
  The selection runs once per element here, not once per ``dw_out`` column block."""
  dt, it = c.dtype, c.dtype.itemsize
  sr = c.bt * c.rp
  # swizzled by half a sub-tile: the kernel stores one 2:4 group's 4 planes at a time
  s = Scratch().add("r_s", (2, sr, c.fs), dt, c.ft // 2).add("tokd_s", (sr,), jnp.int32)
  s.pipelined(((c.fs,), jnp.int32), *_src_blocks("compressed", c, sr))
  groups = c.t_pad // sr
  chunks = _feature_chunks(c, s, groups)
  hbm = (_src_bytes("compressed", c) + c.t_pad * c.f_pad * it + groups * c.f_pad * 4
         + chunks * c.t_pad * 4)
  return _spec_of("elas_mgpu_tokmask", c, s, c.n_steps // chunks, (groups, chunks), ("t", "f"),
                  jax.ShapeDtypeStruct((c.t_pad, c.f_pad), dt), "tokmask", {}, hbm,
                  chunk_steps=c.n_steps // chunks)


def _src_blocks(source: str, c: Plan, rows: int):
  if source in ("compressed", "dy1"):  # values and the forward's metadata
    return [((rows, c.fs // 2), c.dtype), ((rows // c.bt, c.n_sub_step * c.meta_sub, 16), jnp.uint8)]
  if source in ("dense", "dy1_dense"):
    return [((rows, c.fs), c.dtype)]
  return []


def _src_bytes(source: str, c: Plan) -> int:
  """HBM bytes of the backward's relu(y1) source: compressed (9/16 of dense), dense, or h."""
  it = c.dtype.itemsize
  packed = c.t_pad * c.f_pad // 2 * it + c.t_pad * c.f_pad // 8
  return {"compressed": packed, "dy1": packed,
          "dense": c.t_pad * c.f_pad * it, "dy1_dense": c.t_pad * c.f_pad * it,
          "recompute": c.t_pad * c.k_pad * it}[source]


def dh_spec(c: Plan, source: str) -> KernelSpec:
  """``dh``; from the compressed activation it also writes ``dy1``'s kept values (output 2,
  ``[T, F/2]`` in the forward's value layout) for ``dw_in``, and then covers only the first
  ``block_k`` columns when there are more (``dh`` ``[T, K]`` in the compute dtype, the rest
  left for :func:`packed_mm_spec`, which writes them into it from the stored ``dy1``:
  ``dy2`` formed once). From the ``relu`` kernel's
  dense activation (``dense``) the first ``block_k`` programs write ``dy1`` dense (output 2,
  ``[T, F]`` in kernel feature order) for ``dw_in`` and likewise covers only the first
  ``block_k`` columns: ``packed_mm_spec(c, "dy1_dense")`` makes the others."""
  dt, it = c.dtype, c.dtype.itemsize
  store = source in STORED_DY1
  dy1_cols = c.fs if source == "dense" else c.fs // 2  # a step's dy1 columns written
  # warp-specialized from a stored activation: compressed (2:4 phase) or relu(y1) dense
  ws = source in WS_DH_SOURCES and c.tiles.warp_specialized
  if ws:
    c = c.replace(kb=dh_block(c, source))
  per = (WS_CONSUMERS,) if ws else ()  # a leading consumer axis on per-token buffers
  chunk = (c.bt, c.kb) if c.interpret else (64, 64)
  if ws:  # dh staged where g was (g is read by the last step's wgmma, before it)
    s = _ws_tile_and_staging(Scratch(), "g_s", (c.bt, c.n_pad), dt, chunk)
  else:
    s = Scratch().add("g_s", (c.bt, c.n_pad), dt, c.n_pad).add("out_s", (2, *chunk), dt)
  s.pipelined(((c.fs, c.n_pad), dt), ((c.fs, c.kb), dt),
              *_src_blocks(source, c, c.bt * (WS_CONSUMERS if ws else 1)))
  if source == "recompute":
    s.add("h_s", (c.bt, c.k_pad), dt, c.k_pad).pipelined(((c.fs, c.k_pad), dt))
  if store:  # dy1's staging, double-buffered where two pipeline stages leave room for it
    s.add("dy1v_s", (*per, 2, c.bt, dy1_cols), dt, dy1_cols * c.ft // c.fs)
    if not c.interpret and s.bytes(2) > c.gpu.smem_per_block - SMEM_MARGIN:
      s.add("dy1v_s", (*per, 1, c.bt, dy1_cols), dt, dy1_cols * c.ft // c.fs)
  if c.interpret:
    s.add("stage_s", (*per, c.bt, c.ft), dt, c.ft)
  mma = {}
  _mma(mma, c.ft, c.n_pad, c.n_sub)
  if source == "recompute":
    _mma(mma, c.ft, c.k_pad, c.n_sub)
  sparse = sparse_source(c, source)
  _mma(mma, c.kb, c.ft, c.n_sub, sparse=sparse)
  k_cols = c.kb if store else c.k_pad  # written by this kernel
  dy1_bytes = c.t_pad * c.f_pad * dy1_cols // c.fs * it if store else 0
  hbm = (c.t_pad * c.n_pad * it + _src_bytes(source, c) + c.t_pad * k_cols * it
         + c.f_pad * (k_cols + c.n_pad) * it + dy1_bytes)
  out_shape = jax.ShapeDtypeStruct((c.t_pad, c.k_pad), dt)
  if store:
    out_shape = [out_shape, jax.ShapeDtypeStruct((c.t_pad, c.f_pad * dy1_cols // c.fs), dt)]
  k_blocks = k_cols // c.kb
  source_name = source + ("_sp" if sparse else "")
  if ws:
    return _spec_of(f"elas_mgpu_dh_ws_{source_name}", c, s, c.n_steps,
                    (c.nt // WS_CONSUMERS, k_blocks), ("t", "k"), out_shape, "dh_ws",
                    {k: WS_CONSUMERS * v for k, v in mma.items()}, hbm,
                    warpgroups=WS_CONSUMERS + 1, source=source, store_dy1=store)
  return _spec_of(f"elas_mgpu_dh_{source_name}", c, s, c.n_steps, (c.nt, k_blocks), ("t", "k"),
                  out_shape, "dh", mma, hbm, source=source, store_dy1=store)


def sparse_source(c: Plan, source: str) -> bool:
  """Whether a backward product whose 2:4 operand comes from ``source`` runs on sparse
  tensor cores: ``dh``'s ``dy1 @ w_in`` and ``packed_mm``'s stored ``y2`` / ``dy1`` from
  the compressed activation (the 2:4 phase of ``masked`` and ``split``; ``dy1`` carries
  the forward's mask) with ``tiles.sparse_mma``."""
  return c.tiles.sparse_mma and source == "compressed"


def packed_mm_spec(c: Plan, operand: str) -> KernelSpec:
  """``out[:, blocks 1..] = A @ W`` for a stored operand ``A``: ``y2`` (``A = v·v`` of the
  compressed activation, decompressed in registers, ``W = w_outᵀ``: the forward's output
  columns past the first ``block_n``), ``dy1`` (``A`` = ``dh``'s stored 2:4 ``dy1``,
  decompressed, ``W = w_in``: ``dh``'s columns past the first ``block_k``), and from
  the dense warm-up's dense operands ``y2_dense`` (the forward's stored ``relu(y1)``,
  squared in registers) and ``dy1_dense`` (``dh``'s dense ``dy1``, wgmma's operand as
  TMA left it). Written into the first kernel's ``[T, cols]`` output (the last argument,
  compute dtype) past its first ``block`` columns: no join in XLA. With
  ``tiles.sparse_mma`` the 2:4 operands go to sparse wgmma (``W`` in
  :func:`sparse_rows` order)."""
  dt, it = c.dtype, c.dtype.itemsize
  source = "dense" if operand.endswith("_dense") else "compressed"
  if operand.startswith("y2"):
    cols, first = c.n_pad, fwd_block(c)
  else:
    cols, first = c.k_pad, dh_block(c, source)
  rest = cols - first
  # Its own column block: the first block's (halved while it does not divide the rest), or
  # on a GPU halved (multiples of 64) until the grid has a program per SM. Not more: at 1B
  # 128-column blocks (256 x 2 programs, 3 per SM: 1.29 waves) model at 210 µs against 136
  # for 256 columns (256 programs, 2 per SM: 0.97 waves), the A operand decompressed once
  # per block.
  cb = first
  while rest % cb:
    cb //= 2
  while not c.interpret and c.nt * (rest // cb) < c.gpu.sm_count and cb % 128 == 0:
    cb //= 2
  s = Scratch().add("out_s", (2, *((c.bt, cb) if c.interpret else (64, 64))), dt)
  s.pipelined(((c.fs, cb), dt), *_src_blocks(source, c, c.bt))
  if c.interpret and operand != "dy1_dense":  # the register A operand's interpreted staging
    s.add("stage_s", (c.bt, c.ft), dt, c.ft)
  sparse = sparse_source(c, source)  # its 2:4 operand as stored
  mma = {}
  _mma(mma, cb, c.ft, c.n_sub, sparse=sparse)
  hbm = _src_bytes(source, c) + c.f_pad * rest * it + c.t_pad * rest * it
  kind = "dense" if source == "dense" else "packed"
  return _spec_of(f"elas_mgpu_{kind}_mm_{operand.removesuffix('_dense')}"
                  + ("_sp" if sparse else ""), c, s, c.n_steps,
                  (c.nt, rest // cb), ("t", "c"),
                  jax.ShapeDtypeStruct((c.t_pad, cols), dt), "packed_mm",
                  mma, hbm, operand=operand, block=cb, offset=first // cb, into=True,
                  sparse=sparse)


# dh writes dy1 from these activation sources, as dw_in's (and packed_mm's) source / operand
STORED_DY1 = {"compressed": "dy1", "dense": "dy1_dense"}


def splits_dy1(c: Plan, source: str) -> bool:
  """``dh`` (from a source in :data:`STORED_DY1`) covers its first column block
  (:func:`dh_block`) and :func:`packed_mm_spec` the others from the stored ``dy1``: more
  than one column block."""
  return c.k_pad > dh_block(c, source)


def splits_y2(c: Plan) -> bool:
  """The 2:4 forward as :func:`fwd_spec` (first block) + :func:`packed_mm_spec` (``y2``):
  more than one output block."""
  return c.n_pad > fwd_block(c)


def dwin_spec(c: Plan, source: str) -> KernelSpec:
  """``dw_in``; sources ``dy1`` / ``dy1_dense``: from the values ``dh`` wrote, compressed
  or dense (no ``dy2`` product here; a dense tile is wgmma's operand as TMA left it)."""
  c = c.for_dw()
  dt, it = c.dtype, c.dtype.itemsize
  from_dy1 = source in STORED_DY1.values()
  s = Scratch()
  if not from_dy1:
    s.add("woutT_s", (c.fs, c.n_pad), dt, c.n_pad)
  s = _out_chunks(s, c, (c.fs, c.kb))
  if source != "dy1_dense":
    s.add("dy1_s", (c.bt, c.fs), dt, c.ft)
  h_cols = c.k_pad if source == "recompute" else c.kb
  if not from_dy1:
    s.pipelined(((c.bt, c.n_pad), dt))
  s.pipelined(((c.bt, h_cols), dt), *_src_blocks(source, c, c.bt))
  if source == "recompute":
    s.add("win_s", (c.fs, c.k_pad), dt, c.k_pad)
  mma = {}
  c = _with_dw_split(c, c.nt, c.n_steps * (c.k_pad // c.kb))
  if not from_dy1:
    _mma(mma, c.ft, c.n_pad, c.dw_steps * c.n_sub_step)
  if source == "recompute":
    _mma(mma, c.ft, c.k_pad, c.dw_steps * c.n_sub_step)
  _mma(mma, c.kb, c.bt, c.dw_steps * c.fs // 64)  # [fs, bt] x [bt, kb]: fs/64 m64 rows per tile
  hbm = (c.t_pad * c.k_pad * it + _src_bytes(source, c) * (source != "recompute")
         + 2 * c.f_pad * c.k_pad * 4)  # the output zeroed, then written (splits add in L2)
  if not from_dy1:
    hbm += c.t_pad * c.n_pad * it + c.f_pad * (c.k_pad + c.n_pad) * it
  return _spec_of(f"elas_mgpu_dw_in_{source}", c, s, c.dw_steps,
                  (c.n_steps, c.k_pad // c.kb, c.dw_split), ("f", "k", "s"),
                  jax.ShapeDtypeStruct((c.f_pad, c.k_pad), jnp.float32),
                  "dw_in", mma, hbm, source=source, reduce_add=c.dw_split)


def dwout_spec(c: Plan, source: str, dw_mask: str) -> KernelSpec:
  """``dw_out``; ``dw_mask`` ``none`` or ``ste`` (split mode's token-wise 2:4 is
  :func:`tokmask_spec`'s, whose output this reads as a ``dense`` source)."""
  c = c.for_dw()
  dt, it = c.dtype, c.dtype.itemsize
  sr = c.bt
  s = _out_chunks(Scratch(), c, (c.nb, c.fs)).add("y2_s", (sr, c.fs), dt, c.ft)
  s.pipelined(((sr, c.nb), dt), *_src_blocks(source, c, sr))
  if source == "recompute":
    s.add("win_s", (c.fs, c.k_pad), dt, c.k_pad).pipelined(((sr, c.k_pad), dt))
  c = _with_dw_split(c, c.t_pad // sr, c.n_steps * (c.n_pad // c.nb))
  mma = {}
  if source == "recompute":
    _mma(mma, c.ft, c.k_pad, c.dw_steps * c.n_sub_step)
  _mma(mma, c.fs, sr, c.dw_steps * c.nb // 64)  # [nb, sr] x [sr, fs]
  hbm = (c.t_pad * c.n_pad * it + _src_bytes(source, c) + c.f_pad * c.k_pad * it
         + 2 * c.n_pad * c.f_pad * 4)  # the output zeroed, then written (splits add in L2)
  return _spec_of(f"elas_mgpu_dw_out_{source}_{dw_mask}", c, s, c.dw_steps,
                  (c.n_steps, c.n_pad // c.nb, c.dw_split), ("f", "n", "s"),
                  jax.ShapeDtypeStruct((c.n_pad, c.f_pad), jnp.float32),
                  "dw_out", mma, hbm, source=source, dw_mask=dw_mask, reduce_add=c.dw_split)


def serves_dw_ws(c: Plan, source: str) -> bool:
  """The weight gradients from ``source`` as warp-specialized kernels
  (:func:`dw_ws_specs`): the 2:4 phase's (the compressed activation, ``dh``'s stored
  ``dy1``), warp-specialized tiles, padded ranks of at most :data:`WS_DW_MAX_RANK` and,
  where one kernel pairs the two gradients, equal ones (one accumulator shape for both
  consumers; the LLaMA low-rank factors have ``K = N = r``)."""
  return (source == "compressed" and c.tiles.warp_specialized
          and max(c.k_pad, c.n_pad) <= WS_DW_MAX_RANK
          and (dw_ws_pairs_features(c) or c.k_pad == c.n_pad))


WS_DW_MAX_RANK = 256  # a consumer's [block_f_dw, rank] fp32 accumulator: 128 registers at 256


def dw_ws_pairs_features(c: Plan) -> bool:
  """How ``dw_ws`` pairs its two consumers. Above rank 128 by feature steps: a kernel per
  gradient whose consumers take two feature steps and share the ``[block_t, rank]`` tile
  of ``h`` (``dw_in``) or ``g`` (``dw_out``), which at rank 256 is 7x a step's other bytes
  and bounds the kernel by L2 (under the model, 2026-12-05: 130M 101 -> 72 µs, 350M
  133 -> 89 for both gradients). At rank 128 by gradients: one kernel, consumer 0
  ``dw_in``, consumer 1 ``dw_out`` of the same feature step, sharing the metadata; there
  the chain, not L2, bounds it, and at 60M its 33 feature steps x 4 splits are one wave
  where 17 pairs of steps are not (44 µs against 63)."""
  return max(c.k_pad, c.n_pad) > 128


def dw_ws_inputs(roles, act: str) -> list[tuple[str, int]]:
  """The pipelined inputs of a ``dw_ws`` program whose consumers have ``roles`` ((gradient,
  feature offset) each), as (array, feature offset), each once: ``h`` and ``dy1``'s
  kept values for ``in``, ``g`` and the activation for ``out``, the forward's metadata
  for both when the activation is compressed. A consumer's own list starts with its
  ``h`` / ``g``."""
  keys = []
  for grad, off in roles:
    if grad == "in":
      mine = [("h", 0), ("dy1", off), ("meta", off)]
    else:
      mine = [("g", 0), ("act", off)] + ([("meta", off)] if act == "compressed" else [])
    keys += [k for k in mine if k not in keys]
  return keys


def dw_ws_specs(c: Plan, act: str) -> list[KernelSpec]:
  """The 2:4 phase's ``dw_in`` and ``dw_out`` warp-specialized
  (:func:`dw_ws_pairs_features`): one kernel with a consumer per gradient, or a kernel
  per gradient with a consumer per feature step."""
  if dw_ws_pairs_features(c):
    return [dw_ws_spec(c, (("in", 0), ("in", 1)), act),
            dw_ws_spec(c, (("out", 0), ("out", 1)), act)]
  return [dw_ws_spec(c, (("in", 0), ("out", 0)), act)]


def dw_ws_columns(c: Plan) -> dict[str, int]:
  """Where each gradient starts in the ``[F, K + N]`` buffer of :func:`dw_ws_spec`."""
  return {"in": 0, "out": c.k_pad}


def dw_ws_spec(c: Plan, roles, act: str) -> KernelSpec:
  """Weight gradients of the 2:4 phase, warp-specialized (FlashAttention-3's dK / dV
  pattern): a producer warpgroup streams per token step :func:`dw_ws_inputs` (``h``,
  ``g``, ``dy1``'s kept values as ``dh`` wrote them, the forward's metadata, the
  activation ``act``: ``compressed``, the forward's values squared after decompression,
  or ``dense``, split mode's ``tokmask`` output, squared); consumer ``k`` of ``roles[k]
  = (grad, offset)`` holds the ``[block_f_dw, rank]`` fp32 accumulator of ``dw_in``
  (``dy1ᵀ h``) or ``dw_outᵀ`` (``y2ᵀ g``) at feature step ``width · program + offset``.
  The ``dw_split`` programs of a feature step add their partial sums by TMA reduce-add
  into one zeroed fp32 buffer ``[F, K + N]`` that all of :func:`dw_ws_specs`' kernels
  share (``dw_in`` and ``dw_outᵀ`` side by side, :func:`dw_ws_columns`: one XLA launch
  zeroes it; per-split slabs summed in XLA when interpreting:
  ``compat.copy_smem_to_gmem_add``)."""
  c = c.for_dw()
  dt, it = c.dtype, c.dtype.itemsize
  grads = [g for g, _ in roles]
  width = 1 + max(off for _, off in roles)  # feature steps per program
  r = c.k_pad if grads[0] == "in" else c.n_pad  # the accumulator's columns: h's or g's
  per = (WS_CONSUMERS,)
  inputs = dw_ws_inputs(roles, act)
  # each consumer's A tile, double-buffered: a step's wgmma runs while the consumer fills
  # the next; the output staged in [64, 32] chunks (64x64 ones would not leave two
  # stages at rank 256, paired by gradients)
  s = Scratch().add("a_s", (*per, 2, c.bt, c.fs), dt, c.ft)
  s.add("out_s", (*per, 2, *((c.fs, r) if c.interpret else (64, 32))), jnp.float32)
  blocks = {"h": ((c.bt, c.k_pad), dt), "g": ((c.bt, c.n_pad), dt),
            "dy1": _src_blocks("dy1", c, c.bt)[0], "meta": _src_blocks("dy1", c, c.bt)[1],
            "act": _src_blocks(act, c, c.bt)[0]}
  s.pipelined(*(blocks[name] for name, _ in inputs))
  programs = -(-c.n_steps // width)
  # one program per SM (registers): splits of the token loop for whole waves
  c = _with_dw_split(c, c.nt, programs, per_sm=1, whole_waves=True)
  mma = {}
  _mma(mma, r, c.bt, c.dw_steps * c.fs // 64 * WS_CONSUMERS)  # [fs, bt] x [bt, r] each
  hbm = 2 * len(set(grads)) * c.f_pad * r * 4  # the output zeroed, then written once
  # (the splits' reduce-adds meet in L2)
  for name, off in inputs:
    if off == 0:  # every element once (offsets > 0 are the other half of the features)
      hbm += (c.t_pad * r * it if name in ("h", "g")
              else c.t_pad * c.f_pad // 8 if name == "meta"
              else c.t_pad * c.f_pad * it // (1 if name == "act" and act == "dense" else 2))
  if width > 1:
    name = f"elas_mgpu_dw_ws_{grads[0]}" + (f"_{act}" if grads[0] == "out" else "")
  else:
    name = f"elas_mgpu_dw_ws_{act}"
  return _spec_of(name, c, s, c.dw_steps, (programs, c.dw_split), ("f", "s"),
                  jax.ShapeDtypeStruct((c.f_pad, c.k_pad + c.n_pad), jnp.float32), "dw_ws",
                  mma, hbm,
                  warpgroups=WS_CONSUMERS + 1, roles=tuple(roles), act=act,
                  reduce_add=c.dw_split)


def _with_dw_split(c: Plan, steps: int, programs: int, per_sm: int = 2,
                   whole_waves: bool = False) -> Plan:
  """Split a weight-gradient kernel's token loop over ``dw_split`` programs (partial sums
  added by TMA reduce-add): the feature x rank grid alone is ~33 programs at 60M shapes for 132
  SMs. Auto (``Tiles.dw_split=None``): the fewest splits, dividing ``steps``, that
  give ``per_sm`` programs per SM of the plan's GPU (one when interpreting)."""
  split = c.tiles.dw_split
  if split is None:
    split = 1
    if not c.interpret:
      while split < steps and (programs * split < per_sm * c.gpu.sm_count or steps % split):
        split += 1
      if whole_waves:  # up to 4x as many splits where the last wave fills the GPU better:
        # a program's time goes as 1 / split, the kernel's as its waves rounded up / split
        slots = per_sm * c.gpu.sm_count
        cost = lambda n: (-(-programs * n // slots) / n, n)
        split = min((n for n in range(split, 4 * split + 1) if steps % n == 0 and n <= steps),
                    key=cost)
  if steps % split:
    raise ValueError(f"elas_ffn (mosaic): dw_split={split} does not divide the {steps} token steps")
  return c.replace(dw_split=split, dw_steps=steps // split)


def recompute_source(c: Plan) -> str:
  """Where ``ste``'s and the dense warm-up's backward get ``relu(y1)``: ``dense`` (the
  default: written once by the ``relu`` kernel, and ``dh`` writes ``dy1`` dense for
  ``dw_in``: 7 products where the minimum is 6, two ``[T, F]`` temporaries in the
  backward) or ``recompute`` (``Tiles.materialize_relu=False``: ``y1`` formed again in
  ``dh``, ``dw_in`` and ``dw_out``, ``dy2`` in both of the first two: 10 products, nothing
  ``[T, F]``; ranks up to 256, where its kernels fit shared memory). The calibrated model
  puts ``dense`` ahead at every paper size (docs/kernels.md)."""
  return "recompute" if c.tiles.materialize_relu is False else "dense"


def meta_TxG(meta: jax.Array, c: Plan) -> jax.Array:
  """The kernels' metadata ``[token tiles, sub-tiles · bt·P/16, 16]`` -> ``[T, F/8]`` uint8
  (column = sub-tile·P + c: ``sparse24.compress_24``'s byte of groups 2g, 2g+1)."""
  m = meta.reshape(c.nt, c.n_sub, c.bt, c.p)
  return m.transpose(0, 2, 1, 3).reshape(c.t_pad, c.n_sub * c.p)


def vals_TxF2(vals: jax.Array, c: Plan) -> jax.Array:
  """The kernels' values ``[T, F/2]`` (per sub-tile 4 planes of ``P``) -> ``sparse24.compress_24``'s
  order (the 2 kept values of group ``g`` at ``2g, 2g + 1``)."""
  v = vals.reshape(c.t_pad, c.n_sub, 4, c.p)
  return v.transpose(0, 1, 3, 2).reshape(c.t_pad, c.n_sub * c.p * 4)


def default_tiles(k: int, n: int, *, interpret: bool) -> Tiles:
  """Tiles on a GPU: 64 features per step at every rank (shared memory: a step holds a
  ``[block_f, K]`` and a ``[block_f, block_n]`` weight tile per stage). At 60M 128 was
  modelled slower (338 vs 294 µs masked fwd+bwd, 2026-12-05): features padded to 2176
  (+5% FLOPs) and 34 x 8 weight-gradient programs, 1.03 waves of 2 per SM."""
  if interpret:  # few, large tiles: the interpreter's time goes by steps and kernel body size
    return Tiles(block_t=2 * TOKENS, block_f=256, block_f_dw=256, sub_f=256)
  # split's dw_out holds 4 row planes of y2: 64 output columns keep it within registers
  return Tiles(block_f=64, block_f_dw=64, sub_f=64)


def kernel_specs(t: int, f: int, k: int, n: int, *, mode: str = "masked", dtype=jnp.bfloat16,
                 train: bool = True, interpret: bool = False, gpu: GpuSpec = H200,
                 **tile_kw) -> dict[str, list[KernelSpec]]:
  """The kernels one call launches, by phase (``forward`` of the 2:4 phase, and
  ``dense warm-up forward`` where the warm-up runs another; with ``train`` the
  ``backward`` of the 2:4 phase and the ``dense warm-up`` backward), as built
  for ``gpu`` (default tiles unless given): grids, stages, shared memory,
  wgmma instructions per program, FLOPs and HBM bytes (the static report's input).
  ``NotImplementedError`` when a kernel does not fit the GPU's shared memory."""
  d = default_tiles(k, n, interpret=interpret)
  tiles = dataclasses.replace(d, **tile_kw)
  tiles.check()
  return all_specs(Plan(t, f, k, n, dtype, mode, tiles, interpret, gpu), train=train)


def all_specs(c: Plan, train: bool) -> dict[str, list[KernelSpec]]:
  """Every kernel of a call on plan ``c``, by phase (see :func:`kernel_specs`)."""
  mode = c.mode
  store = train and mode != "ste"
  sp = c.tiles.sparse_mma
  if splits_y2(c):  # 2:4 phase: y1 once, the other output blocks from the stored activation
    out = {"forward": [fwd_spec(c, store=True, first_block=True, sparse=sp),
                       packed_mm_spec(c, "y2")]}
    cd = dense_forward_plan(c)
    out["dense warm-up forward"] = (
        [fwd_spec(cd, store=store, first_block=True, store_relu=True),
         packed_mm_spec(cd, "y2_dense")] if splits_y2(cd) else [fwd_spec(cd, store=store)])
  elif sp:  # the warm-up keeps every y2: its own kernel on dense MMAs
    out = {"forward": [fwd_spec(c, store=store, sparse=True)],
           "dense warm-up forward": [fwd_spec(c, store=store)]}
  else:
    out = {"forward": [fwd_spec(c, store=store)]}
  if train:
    recompute = recompute_source(c)

    def bwd(source, dw_mask):
      first = [relu_spec(c)] if source == "dense" else []
      # dh writes dy1 (compressed or dense) from a stored activation, dw_in reads it
      dwin_source = STORED_DY1.get(source, source)
      rest = ([packed_mm_spec(c, dwin_source)] if source in STORED_DY1 and splits_dy1(c, source)
              else [])
      # split: the token-wise 2:4 applied once (tokmask), dw_out reads the result dense
      tok = [tokmask_spec(c)] if dw_mask == "tokens" else []
      if serves_dw_ws(c, source):  # each weight gradient warp-specialized
        return first + [dh_spec(c, source)] + rest + tok + [
            *dw_ws_specs(c, "dense" if tok else "compressed")]
      dwout = ([dwout_spec(c, "dense", "none")] if tok else [dwout_spec(c, source, dw_mask)])
      return first + [dh_spec(c, source)] + rest + [dwin_spec(c, dwin_source)] + tok + dwout

    out["backward"] = bwd(recompute if mode == "ste" else "compressed",
                          {"masked": "none", "ste": "ste", "split": "tokens"}[mode])
    out["dense warm-up"] = bwd(recompute, "none")
  return out
