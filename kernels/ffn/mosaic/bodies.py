"""The Mosaic GPU FFN kernels' bodies: what one program of each kernel does.

Each body is a ``plgpu.kernel`` body over one warpgroup (128 threads): tiles
in shared memory by TMA, the weight / activation streams through
``plgpu.emit_pipeline``, fp32 accumulation in wgmma accumulators, the
ReLU² / 2:4 / compress / statistics work element-wise across the 8 feature
planes in registers (``plan.py`` has the layouts). :func:`launch` runs a
:class:`~elas_kernels.ffn.mosaic.plan.KernelSpec` (grid, scratch, options) on
its body; ``compat.py`` holds the few places where jax versions and the CPU
interpreter differ.

- ``fwd``, per 64 tokens x ``block_n`` outputs: per sub-tile ``y1`` by wgmma,
  ReLU², 2:4 select + compress, ``acc += y2s @ w_outᵀ`` with ``y2s`` in
  registers; per-row statistics. ``y1`` and the dense ``y2`` never reach HBM.
- ``relu``: ``relu(y1)`` written once, dense, for the backward kernels of
  ``ste`` and the dense warm-up (unless ``materialize_relu=False``).
- ``tokmask``: split mode's token-wise 2:4 across 4 row planes, applied once
  to the decompressed ``relu(y1)`` and written dense for ``dw_out``.
- ``dh``, per 64 tokens x ``block_k`` columns: ``dy2 = g @ w_out`` by wgmma,
  ``relu(y1)`` decompressed, read or recomputed, ``dy1 = dy2 · 2 relu(y1)`` in
  registers as the A operand of ``dh += dy1 @ w_in``; from a stored activation
  it also writes ``dy1`` (its kept values in the forward's layout, or dense).
- ``packed_mm``: the output / ``dh`` columns past the first block from a
  stored operand (``y2`` or ``dy1``, 2:4 or dense), when ranks exceed a block.
- ``dw_in`` / ``dw_out``, per feature step x rank block, looping over token
  tiles: ``dy1`` (as ``dh`` wrote it, or formed again where the activation is
  recomputed) / the activation ``w_out``'s gradient sees go through shared
  memory and are read transposed by wgmma.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from elas_kernels import common as cm
from elas_kernels.ffn.mosaic import compat as mc
from elas_kernels.ffn.mosaic import plan
from elas_kernels.ffn.mosaic import sparse_mma


# --------------------------------------------------------------------------
# In-register pieces (element-wise across planes).
# --------------------------------------------------------------------------


def _keep_24(a: list[jax.Array]) -> list[jax.Array]:
  """Keep-masks of the 2 largest of 4 same-shape arrays; ties go to the lower index
  (``sparse24.mask_24``'s rule). ``i`` is kept iff it beats at least 2 of the
  other 3 (``i`` beats ``j`` iff ``a_i >= a_j`` for ``i < j``, ``a_i > a_j`` for ``i > j``):
  a majority of comparisons, no counting (fewer live registers than ranks by sums) and
  no boolean ``not`` (Mosaic GPU lowers it through a 2-bit register conversion)."""
  keep = []
  for i in range(plan.GROUP):
    w = [(a[i] >= a[j]) if i < j else (a[i] > a[j]) for j in range(plan.GROUP) if j != i]
    keep.append((w[0] & w[1]) | (w[2] & (w[0] | w[1])))
  return keep


def _count(b: jax.Array, dtype=jnp.int32) -> jax.Array:
  """1 where ``b``, else 0, by a select: Mosaic GPU cannot convert a 2-element
  register vector of bools (2 bits) to a wider type."""
  return jnp.where(b, jnp.ones((), dtype), jnp.zeros((), dtype))


def _planes(x: jax.Array, p: int) -> list[jax.Array]:
  """The 8 plane slices ``[:, jp:(j+1)p]`` of a sub-tile (register views)."""
  return [x[:, j * p:(j + 1) * p] for j in range(plan.PLANES)]


def _relu(y1: jax.Array, dtype) -> jax.Array:
  """``relu(y1)`` rounded to the compute dtype first, as the XLA op rounds ``y1``."""
  return jnp.maximum(y1.astype(dtype), jnp.zeros((), dtype))


def _wgmma_k(acc, a_ref, bt_ref, chunk: int = 128) -> None:
  """``acc += a @ btᵀ`` for shared-memory ``a [M, K]``, ``bt [N, K]`` (a weight tile as
  its F-major array holds it, read transposed by wgmma: the kernels take each weight in
  one orientation, so XLA prepares it in one launch), issued ``chunk`` of K at a time in
  a loop: one unrolled wgmma per 16 of K for the whole rank keeps every operand
  descriptor live (measured: 400 bytes of spills at K = 512)."""
  mg = mc.plgpu()
  k = a_ref.shape[1]
  if k <= chunk:
    mg.wgmma(acc, a_ref, bt_ref.T)
    return

  def body(i, carry):
    ks = pl.ds(pl.multiple_of(i * chunk, chunk), chunk)
    mg.wgmma(acc, a_ref.at[:, ks], bt_ref.at[:, ks].T)
    return carry

  lax.fori_loop(0, k // chunk, body, 0)


def _dot_acc(shape, fn):
  """Run ``fn(acc_ref)`` (issuing wgmmas into a fresh fp32 accumulator) and read it."""
  mg = mc.plgpu()

  def scope(acc_ref):
    fn(acc_ref)
    return acc_ref[...]

  return pl.run_scoped(scope, mg.ACC(shape, jnp.float32))


def _copy_in(src, dst, barrier):
  """TMA one block into shared memory and wait for it."""
  mg = mc.plgpu()
  mg.copy_gmem_to_smem(src, dst, barrier)
  mg.barrier_wait(barrier)


def store_out(acc: jax.Array, out_ref, out_s, row0, col0, add=None) -> None:
  """Write an fp32 ``[M, C]`` register tile to ``out_ref[row0:, col0:]`` in chunks
  through a double-buffered shared-memory tile ``out_s [2, cm, cc]`` (64x64 on a
  GPU, to spare shared memory; the whole tile when interpreting: fewer copies), in
  ``out_s``'s dtype (the compute dtype for outputs the op returns: no cast in XLA).
  ``add = (split, interpret)``: add it into ``out_ref[rows, cols]`` by TMA
  reduce-add instead (``compat.copy_smem_to_gmem_add``: split ``split``'s slab when
  interpreting)."""
  mg = mc.plgpu()
  m, c = acc.shape
  cm, cc = out_s.shape[1:]
  chunk = 0
  for mi in range(m // cm):
    for ci in range(c // cc):
      slot = chunk % 2
      mg.wait_smem_to_gmem(1, wait_read_only=True)  # the copy that last used this slot
      out_s[slot] = acc[mi * cm:(mi + 1) * cm, ci * cc:(ci + 1) * cc].astype(out_s.dtype)
      mg.commit_smem()
      idx = (pl.ds(row0 + mi * cm, cm), pl.ds(col0 + ci * cc, cc))
      if add is None:
        mg.copy_smem_to_gmem(out_s.at[slot], out_ref.at[idx])
      else:
        split, interpret = add
        mc.copy_smem_to_gmem_add(out_s.at[slot], out_ref, idx, split, interpret)
      chunk += 1



# --------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------


def _in_flight(stages: int, steps: int) -> tuple[int, int]:
  """(pipeline stages, steps a slot's release is delayed): one step late, so that a step's
  wgmma may still read its slots while the next step works, where two stages run."""
  stages = min(stages, steps)
  return stages, 1 if stages > 1 else 0


def _spec(shape, index_map, dtype, swizzle_minor=None, delay_release: int = 0):
  """A pipelined input: a shared-memory block TMA fills, swizzled for wgmma;
  ``delay_release``: its slot is refilled that many steps later (a wgmma reading it may
  still run while the next step works)."""
  mg = mc.plgpu()
  if swizzle_minor is None:
    return mg.BlockSpec(shape, index_map, delay_release=delay_release)
  return mg.BlockSpec(shape, index_map, transforms=mc.swizzle_transforms(dtype, swizzle_minor),
                      delay_release=delay_release)


def _fwd_step(c: plan.Plan, store: bool, dense, h_s, acc, vals_s, meta_s, stage_s, store_refs,
              tile, first_nb, relu_out=None, sparse: bool = False):
  """One feature step of the forward for token tile ``tile`` (``c.bt`` tokens, one
  warpgroup's): ``y1`` by wgmma, ReLU², the 2:4 selection, statistics, (``store``) the
  compressed activation written by TMA to ``store_refs`` (vals, meta), (``relu_out``:
  a staging buffer and its destination) ``relu(y1)`` dense, and
  ``acc += y2s @ w_outᵀ`` (``sparse``: the 2:4 phase only, on sparse tensor cores from
  the kept values' squares and their indices, ``w_outᵀ`` in ``plan.sparse_rows`` order).
  Returns ``step(idx, win_s, woutT_s, carry)``."""
  mg = mc.plgpu()
  dt, bt, fs, ft, p = c.dtype, c.bt, c.fs, c.ft, c.p
  rows = pl.ds(tile * bt, bt)
  zero = jnp.zeros((), dt)

  def step(idx, win_s, woutT_s, carry):
    (fi,) = idx
    zeros, total, kept = carry
    slot = lax.rem(fi, 2)
    if store or relu_out:
      mg.wait_smem_to_gmem(1, wait_read_only=True)  # the copies that last used this slot
    for s in range(fs // ft):
      y1 = _dot_acc((bt, ft), lambda a: _wgmma_k(a, h_s, win_s.at[pl.ds(s * ft, ft)]))
      r = _planes(_relu(y1, dt), p)
      y2 = [x * x for x in r]
      keep = _keep_24(y2[:4]) + _keep_24(y2[4:])
      # Statistics: zeros and mass of y2, mass kept by 2:4 (from the 4 compressed value
      # planes, half the work of selecting the dropped 8); dropped = total - kept per row.
      a0, a1, nib_a = cm.compress_group(r[:4], keep[:4])
      b0, b1, nib_b = cm.compress_group(r[4:], keep[4:])
      if store:
        vals_s.at[slot][:, s * ft // 2:(s + 1) * ft // 2] = jnp.concatenate([a0, a1, b0, b1], axis=1)
        mc.store_as(meta_s.at[slot, pl.ds(s * c.meta_sub, c.meta_sub)],
                    cm.pack_meta(nib_a, nib_b), c.interpret)
      if relu_out:
        relu_out[0].at[slot][:, s * ft:(s + 1) * ft] = jnp.concatenate(r, axis=1)
      sq = [v * v for v in (a0, a1, b0, b1)]  # y2 at the kept positions
      kept += jnp.sum(sum(v.astype(jnp.float32) for v in sq), axis=1)
      def y2_stats(zeros, total):  # per-row zeros and mass of the dense y2 planes
        return (zeros + jnp.sum(sum(_count(x == zero, jnp.float32) for x in y2), axis=1),
                total + jnp.sum(sum(x.astype(jnp.float32) for x in y2), axis=1))

      if sparse:
        # the dense y2 planes' statistics first: they die before the operands are packed
        zeros, total = y2_stats(zeros, total)
        sparse_mma.sparse_wgmma(acc, dict(a0=sq[0], a1=sq[1], b0=sq[2], b1=sq[3], nib_a=nib_a,
                                          nib_b=nib_b),
                                woutT_s.at[pl.ds(s * ft, ft)], stage_s, c.interpret)
        continue
      y2s = [jnp.where(keep[j] | dense, y2[j], zero) for j in range(plan.PLANES)]
      mc.wgmma_a(acc, jnp.concatenate(y2s, axis=1), woutT_s.at[pl.ds(s * ft, ft)], stage_s,
                 c.interpret)
      zeros, total = y2_stats(zeros, total)
    if store or relu_out:
      mg.commit_smem()

      @pl.when(first_nb)
      def _():
        if store:
          mg.copy_smem_to_gmem(vals_s.at[slot],
                               store_refs[0].at[rows, pl.ds(fi * (fs // 2), fs // 2)],
                               commit_group=False)
          mrows = c.n_sub_step * c.meta_sub
          mg.copy_smem_to_gmem(meta_s.at[slot], store_refs[1].at[tile, pl.ds(fi * mrows, mrows)],
                               commit_group=False)
        if relu_out:
          mg.copy_smem_to_gmem(relu_out[0].at[slot], relu_out[1].at[rows, pl.ds(fi * fs, fs)],
                               commit_group=False)
        mg.commit_smem_to_gmem_group()
    mg.wgmma_wait(0)  # the w_out slot is refilled after this step
    return zeros, total, kept

  return step


def _fwd_epilogue(c: plan.Plan, acc, carry, out_ref, out_s, stats_ref, stats_s, tile, nb, first_nb):
  """Write one warpgroup's output block and (first n-block) its per-row statistics."""
  mg = mc.plgpu()
  zeros, total, kept = carry
  stats = (zeros, total, total - kept)
  store_out(acc, out_ref, out_s, tile * c.bt, nb * c.nb)

  @pl.when(first_nb)
  def _():
    for i in range(3):
      stats_s[i] = stats[i]
    mg.commit_smem()
    mg.copy_smem_to_gmem(stats_s, stats_ref.at[:, pl.ds(tile * c.bt, c.bt)])

  mg.wait_smem_to_gmem(0)


def _fwd_in_specs(c: plan.Plan, nb):
  return [_spec((c.fs, c.k_pad), lambda f: (f, 0), c.dtype, c.k_pad),
          _spec((c.fs, c.nb), lambda f: (f, nb), c.dtype, c.nb)]


def _fwd_kernel(flag_ref, h_ref, win_ref, woutT_ref, out_ref, stats_ref, *store_refs,
                pl_: plan.Plan, store: bool, store_relu: bool = False, sparse: bool = False,
                **scr):
  """``out[rows, n-block] = Σ_steps y2s @ w_outᵀ``; per-row statistics and (``store``)
  the compressed activation come from the first n-block's programs, and
  (``store_relu``, the last output) ``relu(y1)`` dense for :func:`_packed_mm_kernel`."""
  mg = mc.plgpu()
  c = pl_
  ti, nb = lax.axis_index("t"), lax.axis_index("n")
  rows = pl.ds(ti * c.bt, c.bt)
  first_nb = nb == 0
  dense = flag_ref[0] == 0  # the dense warm-up: keep everything
  _copy_in(h_ref.at[rows], scr["h_s"], scr["bar"].at[0])

  def run(acc_ref):
    step = _fwd_step(c, store, dense, scr["h_s"], acc_ref, scr.get("vals_s"), scr.get("meta_s"),
                     scr.get("stage_s"), store_refs, ti, first_nb,
                     (scr["r_s"], store_refs[-1]) if store_relu else None, sparse)
    z = mc.zeros((c.bt,), jnp.float32, mg.Layout.WGMMA.reduce(1))
    carry = mg.emit_pipeline(
        step, grid=(c.n_steps,), max_concurrent_steps=min(c.tiles.stages, c.n_steps),
        in_specs=_fwd_in_specs(c, nb), init_carry=(z, z, z))(win_ref, woutT_ref)
    return acc_ref[...], carry

  acc, carry = pl.run_scoped(run, mg.ACC((c.bt, c.nb), jnp.float32))
  _fwd_epilogue(c, acc, carry, out_ref, scr["out_s"], stats_ref, scr["stats_s"], ti, nb, first_nb)


def _fwd_ws_kernel(flag_ref, h_ref, win_ref, woutT_ref, out_ref, stats_ref, *store_refs,
                   pl_: plan.Plan, store: bool, store_relu: bool = False, sparse: bool = False,
                   **scr):
  """The forward warp-specialized: warpgroup 2 streams the weight steps by TMA
  (``memory_registers=40``), warpgroups 0 and 1 each run :func:`_fwd_step` on their
  own ``block_t`` tokens of the program's ``2 · block_t``, reading the same weight
  step from shared memory (one L2 fetch per 128 tokens instead of per 64); a slot is
  refilled once both consumers released it. Outputs as :func:`_fwd_kernel`'s (the grid's
  ``n`` axis of length 1 where the plan covers only the first output block)."""
  mg = mc.plgpu()
  c = pl_
  ti, nb = lax.axis_index("t"), lax.axis_index("n")
  wg = lax.axis_index("wg")
  tile = ti * plan.WS_CONSUMERS + wg  # this consumer's token tile
  rows = pl.ds(tile * c.bt, c.bt)
  first_nb = nb == 0
  dense = flag_ref[0] == 0
  mine = {k: scr[k].at[wg] for k in ("out_s", "stats_s", "vals_s", "meta_s", "stage_s",
                                     "r_s") if k in scr}
  mine["h_s"] = scr["h_s"].at[wg, 0]  # its tile (plan._ws_tile_and_staging)
  acc_box = []

  def step(idx, win_s, woutT_s, carry):
    body = _fwd_step(c, store, dense, mine["h_s"], acc_box[0], mine.get("vals_s"),
                     mine.get("meta_s"), mine.get("stage_s"), store_refs, tile, first_nb,
                     (mine["r_s"], store_refs[-1]) if store_relu else None, sparse)
    return body(idx, win_s, woutT_s, carry)

  def compute_context(eval_pipeline):
    _copy_in(h_ref.at[rows], mine["h_s"], scr["bar"].at[wg])

    def run(acc_ref):
      acc_box.append(acc_ref)
      z = mc.zeros((c.bt,), jnp.float32, mg.Layout.WGMMA.reduce(1))
      carry = eval_pipeline((z, z, z))
      return acc_ref[...], carry

    acc, carry = pl.run_scoped(run, mg.ACC((c.bt, c.nb), jnp.float32))
    _fwd_epilogue(c, acc, carry, out_ref, mine["out_s"], stats_ref, mine["stats_s"], tile, nb,
                  first_nb)

  mg.emit_pipeline_warp_specialized(
      step, grid=(c.n_steps,), memory_registers=40, wg_axis="wg",
      num_compute_wgs=plan.WS_CONSUMERS, max_concurrent_steps=min(c.tiles.stages, c.n_steps),
      compute_context=compute_context, in_specs=_fwd_in_specs(c, nb))(win_ref, woutT_ref)


def _relu_kernel(h_ref, win_ref, r_ref, *, pl_: plan.Plan, chunk_steps: int, **scr):
  """``relu(y1)`` of 64 tokens and ``chunk_steps`` feature steps (chunk ``f`` of the features),
  written in kernel feature order."""
  mg = mc.plgpu()
  c = pl_
  bt, fs, ft = c.bt, c.fs, c.ft
  ti, f0 = lax.axis_index("t"), lax.axis_index("f") * chunk_steps
  rows = pl.ds(ti * bt, bt)
  _copy_in(h_ref.at[rows], scr["h_s"], scr["bar"].at[0])

  def step(idx, win_s):
    (fi,) = idx
    slot = lax.rem(fi, 2)
    mg.wait_smem_to_gmem(1, wait_read_only=True)
    for s in range(fs // ft):
      y1 = _dot_acc((bt, ft), lambda acc: _wgmma_k(acc, scr["h_s"], win_s.at[pl.ds(s * ft, ft)]))
      scr["r_s"].at[slot][:, s * ft:(s + 1) * ft] = _relu(y1, c.dtype)
    mg.commit_smem()
    mg.copy_smem_to_gmem(scr["r_s"].at[slot], r_ref.at[rows, pl.ds((f0 + fi) * fs, fs)])

  mg.emit_pipeline(step, grid=(chunk_steps,),
                   max_concurrent_steps=min(c.tiles.stages, chunk_steps),
                   in_specs=[_spec((fs, c.k_pad), lambda f: (f0 + f, 0), c.dtype, c.k_pad)])(win_ref)
  mg.wait_smem_to_gmem(0)


def _tokmask_kernel(densef_ref, tokd_ref, vals_ref, meta_ref, r_ref, *, pl_: plan.Plan,
                    chunk_steps: int, **scr):
  """Split mode's ``dw_out`` operand: ``relu(y1)`` of one step of ``rp · block_t`` tokens
  (row planes ``q`` of ``block_t``) decompressed from the forward's activation, with the
  token-wise 2:4 of its square across the row planes applied (ties to the lower plane;
  the dense features and the rows of an incomplete token group keep all), for
  ``chunk_steps`` feature steps (chunk ``f``); written dense in kernel feature order."""
  mg = mc.plgpu()
  c = pl_
  bt, fs, ft, p, rp = c.bt, c.fs, c.ft, c.p, c.rp
  ti, f0 = lax.axis_index("t"), lax.axis_index("f") * chunk_steps
  rows = pl.ds(ti * bt * rp, bt * rp)
  _copy_in(tokd_ref.at[rows], scr["tokd_s"], scr["bar"].at[0])
  tok_dense = [mc.load(scr["tokd_s"].at[pl.ds(q * bt, bt)], mg.Layout.WGMMA.reduce(1)) != 0
               for q in range(rp)]
  src = _Relu("compressed", c)
  zero = jnp.zeros((), c.dtype)

  def step(idx, densef_s, *packed):
    (fi,) = idx
    slot = lax.rem(fi, 2)
    mg.wait_smem_to_gmem(1, wait_read_only=True)  # the copy that last used this slot
    half = plan.PLANES // 2
    for s in range(fs // ft):
      for g in range(2):  # one 2:4 group's 4 planes at a time: half the registers live
        r = [src.planes_and_nibbles(packed, q, s, groups=(g,))[0] for q in range(rp)]
        for i in range(half):
          j = g * half + i
          dense_f = mc.load(densef_s.at[pl.ds(s * ft + j * p, p)],
                            mg.Layout.WGMMA.reduce(0)) != 0
          keep = _keep_24([r[q][i] * r[q][i] for q in range(rp)])  # along tokens, on y2
          for q in range(rp):
            keep_qi = (keep[q] | lax.broadcast_in_dim(dense_f, (bt, p), [1])
                       | lax.broadcast_in_dim(tok_dense[q], (bt, p), [0]))
            r[q][i] = jnp.where(keep_qi, r[q][i], zero)
        c0 = s * ft + g * half * p
        for q in range(rp):
          scr["r_s"].at[slot][q * bt:(q + 1) * bt, c0:c0 + half * p] = jnp.concatenate(r[q], axis=1)
    mg.commit_smem()
    mg.copy_smem_to_gmem(scr["r_s"].at[slot], r_ref.at[rows, pl.ds((f0 + fi) * fs, fs)])

  specs = [_spec((fs,), lambda f: (f0 + f,), jnp.int32)]
  specs += src.specs(lambda f: ti, lambda f: f0 + f, bt * rp)
  mg.emit_pipeline(step, grid=(chunk_steps,), in_specs=specs,
                   max_concurrent_steps=min(c.tiles.stages, chunk_steps))(densef_ref, vals_ref,
                                                                          meta_ref)
  mg.wait_smem_to_gmem(0)


class _Relu:
  """Where a backward kernel's ``relu(y1)`` planes come from: ``compressed`` (the
  forward's vals + meta), ``recompute`` (wgmma of ``h`` and ``w_in``'s step) or ``dense``
  (the ``relu`` kernel's output); ``dy1`` (``dw_in``'s, and ``packed_mm``'s operands
  alike): another operand in the forward's compressed layout, read as ``compressed``;
  ``dy1_dense`` (``dw_in``'s): ``dy1`` as ``dh`` wrote it from a ``dense`` source, read as
  ``dense``."""

  def __init__(self, source: str, c: plan.Plan):
    self.source, self.c = source, c
    # dw_in's "dy1": the planes of dy1 that dh wrote compressed, in the forward's layout
    self.packed = source in ("compressed", "dy1")
    self.dense = source in ("dense", "dy1_dense")

  def packed_values(self, refs, q: int, s: int):
    """A packed source's 4 value planes (first and second kept value of group a, then of
    b) and its metadata nibbles (groups a, b), as stored."""
    c = self.c
    ft, p, rows = c.ft, c.p, pl.ds(q * c.bt, c.bt)
    vals_s, meta_s = refs
    vals = mc.load(vals_s.at[rows, pl.ds(s * ft // 2, ft // 2)])
    meta = mc.load_as(meta_s.at[q, pl.ds(s * c.meta_sub, c.meta_sub)], (c.bt, p), c.interpret)
    return [vals[:, i * p:(i + 1) * p] for i in range(4)], cm.unpack_meta(meta)

  def planes_and_nibbles(self, refs, q: int, s: int, groups=(0, 1)):
    """A packed source's dense planes of ``groups`` (4 each: group a's planes 0-3, b's
    4-7) and its metadata nibbles (groups a, b)."""
    v, nibs = self.packed_values(refs, q, s)
    return sum((cm.decompress_group(v[2 * g], v[2 * g + 1], nibs[g]) for g in groups), []), nibs

  def specs(self, rows_idx, fi_of, step_rows: int, delay_release: int = 0):
    """Pipelined inputs for ``step_rows`` tokens at token-block ``rows_idx(step)``."""
    c = self.c
    late = delay_release
    if self.packed:
      rp = step_rows // c.bt
      return [_spec((step_rows, c.fs // 2), lambda *i: (rows_idx(*i), fi_of(*i)), c.dtype,
                    c.ft // 2, late),
              _spec((rp, c.n_sub_step * c.meta_sub, 16),
                    lambda *i: (rows_idx(*i), fi_of(*i), 0), jnp.uint8, None, late)]
    if self.dense:
      return [_spec((step_rows, c.fs), lambda *i: (rows_idx(*i), fi_of(*i)), c.dtype, c.ft,
                    late)]
    return []  # recompute: h and w_in are passed separately

  def planes(self, refs, q: int, s: int, h_rows=None, win_s=None) -> list[jax.Array]:
    """The 8 ``relu(y1)`` planes of row plane ``q``, sub-tile ``s`` of a step, loaded (or
    recomputed) just for it: a step's other tiles stay in shared memory, not registers."""
    if self.packed:
      return self.planes_and_nibbles(refs, q, s)[0]
    c = self.c
    ft, p, rows = c.ft, c.p, pl.ds(q * c.bt, c.bt)
    if self.dense:
      return _planes(mc.load(refs[0].at[rows, pl.ds(s * ft, ft)]), p)
    y1 = _dot_acc((c.bt, ft), lambda acc: _wgmma_k(acc, h_rows, win_s.at[pl.ds(s * ft, ft)]))
    return _planes(_relu(y1, c.dtype), p)


def _dy1_list(dy2: jax.Array, r: list[jax.Array], c: plan.Plan) -> list[jax.Array]:
  """The 8 planes of ``dy1 = dy2 · 2 relu(y1)`` (zero where 2:4 dropped, when ``r`` is
  decompressed), rounded to the compute dtype as the XLA op rounds it."""
  d = _planes(dy2, c.p)
  return [(d[j] * (2 * r[j]).astype(jnp.float32)).astype(c.dtype) for j in range(plan.PLANES)]


def _dy1_planes(dy2: jax.Array, r: list[jax.Array], c: plan.Plan) -> jax.Array:
  """:func:`_dy1_list`, planes side by side (a wgmma operand)."""
  return jnp.concatenate(_dy1_list(dy2, r, c), axis=1)


def _dh_step(c: plan.Plan, relu: _Relu, store_dy1: bool, g_s, h_s, acc, dy1v_s, stage_s, dy1_ref,
             tile, q: int, first_kb):
  """One feature step of ``dh`` for token tile ``tile`` (one warpgroup's ``c.bt`` tokens,
  row plane ``q`` of a pipelined packed block): ``dy2 = g @ w_out`` by wgmma,
  ``relu(y1)`` decompressed or recomputed, ``acc += dy1 @ w_in`` with ``dy1`` in
  registers; ``store_dy1``: ``dy1``'s kept values (a packed source; all of it from a dense
  one) staged in ``dy1v_s`` and written by TMA (programs of ``first_kb``). From the
  compressed activation with ``tiles.sparse_mma`` (``plan.sparse_source``) ``dh += dy1 @ w_in``
  runs on sparse tensor cores (``w_in``'s rows in ``plan.sparse_rows`` order). Returns
  ``step(idx, woutT_s, win_s, *rest)``."""
  mg = mc.plgpu()
  bt, fs, ft = c.bt, c.fs, c.ft
  sparse = plan.sparse_source(c, relu.source)
  rows = pl.ds(tile * bt, bt)

  def step(idx, woutT_s, win_s, *rest):
    (fi,) = idx
    slots = dy1v_s.shape[0] if store_dy1 else 1
    slot = lax.rem(fi, slots)
    win_k_s = rest[0] if relu.source == "recompute" else None  # the whole rank's w_in step
    src = rest if relu.source != "recompute" else ()
    if store_dy1:  # the copy that last used this slot
      mg.wait_smem_to_gmem(slots - 1, wait_read_only=True)
    cols = ft // 2 if relu.packed else ft  # dy1 columns a sub-tile stores
    for s in range(fs // ft):
      # relu(y1) first: a recomputed y1's accumulator is free again before dy2's is taken
      if sparse:  # the stored values as they are: only dy1's kept values are formed
        v, nibs = relu.packed_values(src, q, s)
      elif relu.packed:
        r, nibs = relu.planes_and_nibbles(src, q, s)
      else:
        r = relu.planes(src, q, s, h_s, win_k_s)
      dy2 = _dot_acc((bt, ft), lambda a: _wgmma_k(a, g_s, woutT_s.at[pl.ds(s * ft, ft)]))
      kept = None
      if sparse:  # dy2 at the kept positions times 2 relu(y1), rounded as _dy1_list rounds
        d = _planes(dy2, c.p)
        dk = cm.gather_group(d[:4], nibs[0]) + cm.gather_group(d[4:], nibs[1])
        kept = [(x * (2 * y).astype(jnp.float32)).astype(c.dtype) for x, y in zip(dk, v)]
      else:
        dy1 = _dy1_list(dy2, r, c)
        if relu.packed and store_dy1:
          kept = cm.gather_group(dy1[:4], nibs[0]) + cm.gather_group(dy1[4:], nibs[1])
      if store_dy1:
        dy1v_s.at[slot][:, s * cols:(s + 1) * cols] = jnp.concatenate(
            kept if relu.packed else dy1, axis=1)
      if sparse:  # dy1 carries the forward's mask: its kept values and the forward's indices
        sparse_mma.sparse_wgmma(acc, dict(a0=kept[0], a1=kept[1], b0=kept[2], b1=kept[3],
                                          nib_a=nibs[0], nib_b=nibs[1]),
                                win_s.at[pl.ds(s * ft, ft)], stage_s, c.interpret)
      else:
        mc.wgmma_a(acc, jnp.concatenate(dy1, axis=1), win_s.at[pl.ds(s * ft, ft)], stage_s,
                   c.interpret)
    if store_dy1:
      mg.commit_smem()

      @pl.when(first_kb)
      def _():
        step_cols = cols * (fs // ft)
        mg.copy_smem_to_gmem(dy1v_s.at[slot], dy1_ref.at[rows, pl.ds(fi * step_cols, step_cols)])
    mg.wgmma_wait(0)  # the w_in slot is refilled after this step

  return step


def _dh_in_specs(c: plan.Plan, relu: _Relu, kb, tile_block, rows_per_step: int):
  """The pipelined inputs of ``dh``: ``w_outᵀ``, ``w_in``'s block (and recomputing, all of
  ``w_in``'s rank) steps, the activation source's block ``tile_block`` of
  ``rows_per_step`` tokens."""
  specs = [_spec((c.fs, c.n_pad), lambda f: (f, 0), c.dtype, c.n_pad),
           _spec((c.fs, c.kb), lambda f: (f, kb), c.dtype, c.kb)]
  if relu.source == "recompute":
    specs.append(_spec((c.fs, c.k_pad), lambda f: (f, 0), c.dtype, c.k_pad))
  return specs + relu.specs(lambda f: tile_block, lambda f: f, rows_per_step)


def _dh_refs(refs, relu: _Relu, store_dy1: bool):
  """(h, w_in (recomputing), source refs, dh, dy1) from a ``dh`` kernel's trailing refs."""
  n_out = 2 if store_dy1 else 1
  ins, outs = refs[:-n_out], refs[-n_out:]
  dy1_ref = outs[1] if store_dy1 else None
  if relu.source == "recompute":
    return ins[0], ins[1], (), outs[0], dy1_ref
  return None, None, tuple(ins), outs[0], dy1_ref


def _dh_kernel(g_ref, woutT_ref, win_ref, *refs, pl_: plan.Plan, relu: _Relu, store_dy1: bool,
               **scr):
  """``dh[rows, k-block] = Σ_steps dy1 @ w_in``; ``store_dy1``: the first k-block's programs
  also write ``dy1`` (from a packed source its kept values in the forward's compressed
  layout, whose metadata is the forward's; from a dense one all of it), which ``dw_in``
  reads instead of forming ``dy1`` again."""
  mg = mc.plgpu()
  c = pl_
  h_ref, win_k_ref, src_refs, dh_ref, dy1_ref = _dh_refs(refs, relu, store_dy1)
  ti, kb = lax.axis_index("t"), lax.axis_index("k")
  rows = pl.ds(ti * c.bt, c.bt)
  _copy_in(g_ref.at[rows], scr["g_s"], scr["bar"].at[0])
  if h_ref is not None:
    _copy_in(h_ref.at[rows], scr["h_s"], scr["bar"].at[1])

  def run(acc_ref):
    step = _dh_step(c, relu, store_dy1, scr["g_s"], scr.get("h_s"), acc_ref, scr.get("dy1v_s"),
                    scr.get("stage_s"), dy1_ref, ti, 0, kb == 0)
    args = [woutT_ref, win_ref] + ([win_k_ref] if win_k_ref is not None else []) + list(src_refs)
    mg.emit_pipeline(step, grid=(c.n_steps,), in_specs=_dh_in_specs(c, relu, kb, ti, c.bt),
                     max_concurrent_steps=min(c.tiles.stages, c.n_steps))(*args)
    return acc_ref[...]

  acc = pl.run_scoped(run, mg.ACC((c.bt, c.kb), jnp.float32))
  store_out(acc, dh_ref, scr["out_s"], ti * c.bt, kb * c.kb)
  mg.wait_smem_to_gmem(0)


def _dh_ws_kernel(g_ref, woutT_ref, win_ref, *refs, pl_: plan.Plan, relu: _Relu, store_dy1: bool,
                  **scr):
  """``dh`` warp-specialized (from the compressed activation or the ``relu`` kernel's dense
  ``relu(y1)``): warpgroup 2 streams the
  weight steps and both consumers' activation blocks by TMA, warpgroups 0 and 1 each
  run :func:`_dh_step` on their own ``block_t`` tokens (row plane ``wg`` of the step's
  ``2 · block_t``-token block), sharing every weight step."""
  mg = mc.plgpu()
  c = pl_
  _, _, src_refs, dh_ref, dy1_ref = _dh_refs(refs, relu, store_dy1)
  ti, kb = lax.axis_index("t"), lax.axis_index("k")
  wg = lax.axis_index("wg")
  tile = ti * plan.WS_CONSUMERS + wg
  rows = pl.ds(tile * c.bt, c.bt)
  mine = {k: scr[k].at[wg] for k in ("out_s", "dy1v_s", "stage_s") if k in scr}
  mine["g_s"] = scr["g_s"].at[wg, 0]  # its tile (plan._ws_tile_and_staging)
  acc_box = []

  def step(idx, *ins):  # ins end with the pipeline's carry (unused: () here)
    body = _dh_step(c, relu, store_dy1, mine["g_s"], None, acc_box[0], mine.get("dy1v_s"),
                    mine.get("stage_s"), dy1_ref, tile, wg, kb == 0)
    body(idx, *ins[:-1])
    return ins[-1]

  def compute_context(eval_pipeline):
    _copy_in(g_ref.at[rows], mine["g_s"], scr["bar"].at[wg])

    def run(acc_ref):
      acc_box.append(acc_ref)
      eval_pipeline(())
      return acc_ref[...]

    acc = pl.run_scoped(run, mg.ACC((c.bt, c.kb), jnp.float32))
    store_out(acc, dh_ref, mine["out_s"], tile * c.bt, kb * c.kb)
    mg.wait_smem_to_gmem(0)

  mg.emit_pipeline_warp_specialized(
      step, grid=(c.n_steps,), memory_registers=40, wg_axis="wg",
      num_compute_wgs=plan.WS_CONSUMERS, max_concurrent_steps=min(c.tiles.stages, c.n_steps),
      compute_context=compute_context,
      in_specs=_dh_in_specs(c, relu, kb, ti, plan.WS_CONSUMERS * c.bt))(woutT_ref, win_ref,
                                                                          *src_refs)


def _dwin_kernel(*refs, pl_: plan.Plan, relu: _Relu, **scr):
  """``dw_in[f-step, k-block] = Σ_token tiles dy1ᵀ h`` (rows in kernel feature order);
  ``dy1`` read as ``dh`` wrote it (source ``dy1``) or formed from ``g @ w_out`` and
  ``relu(y1)`` (the other sources)."""
  mg = mc.plgpu()
  c = pl_
  bt, fs, ft = c.bt, c.fs, c.ft
  refs = list(refs)
  dwin_ref = refs.pop()  # the reduce-add buffer: the token splits add into it
  from_dy1 = relu.source in plan.STORED_DY1.values()
  recompute = relu.source == "recompute"
  g_ref = woutT_ref = win_ref = None
  if from_dy1:
    h_ref = refs.pop(0)
  else:
    g_ref, h_ref, woutT_ref = refs.pop(0), refs.pop(0), refs.pop(0)
  if recompute:
    win_ref = refs.pop(0)
  src_refs = refs
  fi, kb, si = lax.axis_index("f"), lax.axis_index("k"), lax.axis_index("s")
  t0 = si * c.dw_steps  # this program's share of the token tiles (split-K over tokens)
  if woutT_ref is not None:
    _copy_in(woutT_ref.at[pl.ds(fi * fs, fs)], scr["woutT_s"], scr["bar"].at[0])
  if win_ref is not None:
    _copy_in(win_ref.at[pl.ds(fi * fs, fs)], scr["win_s"], scr["bar"].at[1])

  def step(idx, *ins):
    ins = list(ins)
    g_s = None if from_dy1 else ins.pop(0)
    h_s = ins.pop(0)
    src = ins
    h_k = h_s.at[:, pl.ds(kb * c.kb, c.kb)] if recompute else h_s
    if relu.source == "dy1_dense":  # dh's dense dy1, as TMA left it, is wgmma's operand
      mg.wgmma(scr["acc"], src[0].T, h_k)
      mg.wgmma_wait(0)
      return
    for s in range(fs // ft):
      r = relu.planes(src, 0, s, h_s, scr.get("win_s"))  # before dy2, as in dh
      if from_dy1:  # the planes are dy1's
        scr["dy1_s"][:, s * ft:(s + 1) * ft] = jnp.concatenate(r, axis=1)
        continue
      dy2 = _dot_acc((bt, ft), lambda acc: _wgmma_k(acc, g_s, scr["woutT_s"].at[pl.ds(s * ft, ft)]))
      scr["dy1_s"][:, s * ft:(s + 1) * ft] = _dy1_planes(dy2, r, c)
    mg.commit_smem()  # dy1 in shared memory before wgmma reads it
    mg.wgmma(scr["acc"], scr["dy1_s"].T, h_k)
    mg.wgmma_wait(0)

  def run(acc_ref):
    scr["acc"] = acc_ref
    h_spec = (_spec((bt, c.k_pad), lambda t: (t0 + t, 0), c.dtype, c.k_pad) if recompute
              else _spec((bt, c.kb), lambda t: (t0 + t, kb), c.dtype, c.kb))
    specs, args = [h_spec], [h_ref]
    if not from_dy1:
      specs.insert(0, _spec((bt, c.n_pad), lambda t: (t0 + t, 0), c.dtype, c.n_pad))
      args.insert(0, g_ref)
    specs += relu.specs(lambda t: t0 + t, lambda t: fi, bt)
    mg.emit_pipeline(step, grid=(c.dw_steps,), in_specs=specs,
                     max_concurrent_steps=min(c.tiles.stages, c.dw_steps))(*args, *src_refs)
    return acc_ref[...]

  acc = pl.run_scoped(run, mg.ACC((fs, c.kb), jnp.float32))
  store_out(acc, dwin_ref, scr["out_s"], fi * fs, kb * c.kb, add=(si, c.interpret))
  mg.wait_smem_to_gmem(0)


def _dwout_kernel(g_ref, *refs, pl_: plan.Plan, relu: _Relu, dw_mask: str, **scr):
  """``dw_out[n-block, f-step] = Σ_token steps gᵀ y2``; ``y2`` as the backward mode
  defines it: ``none`` (as rebuilt or read) or ``ste`` (2:4 of the recomputed ``y2``).
  Split mode's token-wise 2:4 is applied before, by :func:`_tokmask_kernel`."""
  mg = mc.plgpu()
  c = pl_
  bt, fs, ft = c.bt, c.fs, c.ft
  refs = list(refs)
  dwout_ref = refs.pop()  # the reduce-add buffer: the token splits add into it
  h_ref = win_ref = None
  if relu.source == "recompute":
    h_ref, win_ref = refs.pop(0), refs.pop(0)
  src_refs = refs
  fi, nb, si = lax.axis_index("f"), lax.axis_index("n"), lax.axis_index("s")
  t0 = si * c.dw_steps  # this program's share of the token steps (split-K over tokens)
  if win_ref is not None:
    _copy_in(win_ref.at[pl.ds(fi * fs, fs)], scr["win_s"], scr["bar"].at[0])
  zero = jnp.zeros((), c.dtype)

  def step(idx, g_s, *rest):
    h_s = rest[0] if h_ref is not None else None
    src = rest[1:] if h_ref is not None else rest
    for s in range(fs // ft):
      y2 = [x * x for x in relu.planes(src, 0, s, h_s, scr.get("win_s"))]
      if dw_mask == "ste":  # straight-through: w_out sees the 2:4 forward activation
        keep = _keep_24(y2[:4]) + _keep_24(y2[4:])
        y2 = [jnp.where(keep[j], y2[j], zero) for j in range(plan.PLANES)]
      scr["y2_s"][:, s * ft:(s + 1) * ft] = jnp.concatenate(y2, axis=1)
    mg.commit_smem()
    mg.wgmma(scr["acc"], g_s.T, scr["y2_s"])
    mg.wgmma_wait(0)

  def run(acc_ref):
    scr["acc"] = acc_ref
    specs = [_spec((bt, c.nb), lambda t: (t0 + t, nb), c.dtype, c.nb)]
    args = [g_ref]
    if h_ref is not None:
      specs.append(_spec((bt, c.k_pad), lambda t: (t0 + t, 0), c.dtype, c.k_pad))
      args.append(h_ref)
    specs += relu.specs(lambda t: t0 + t, lambda t: fi, bt)
    args += src_refs
    mg.emit_pipeline(step, grid=(c.dw_steps,), in_specs=specs,
                     max_concurrent_steps=min(c.tiles.stages, c.dw_steps))(*args)
    return acc_ref[...]

  acc = pl.run_scoped(run, mg.ACC((c.nb, fs), jnp.float32))
  store_out(acc, dwout_ref, scr["out_s"], nb * c.nb, fi * fs, add=(si, c.interpret))
  mg.wait_smem_to_gmem(0)



def _dw_ws_kernel(*refs, pl_: plan.Plan, roles, act: str, **scr):
  """The 2:4 phase's weight gradients, warp-specialized (:func:`plan.dw_ws_spec`): per
  token step warpgroup 2 streams the program's inputs (:func:`plan.dw_ws_inputs`, each
  once however many consumers read it); consumer ``k`` of role ``(grad, offset)``
  forms the A tile of its feature step in shared memory, ``dy1``'s kept values
  decompressed (``in``) or the activation squared (``out``: ``y2`` as the forward rounds
  it), and accumulates ``dy1ᵀ h`` / ``y2ᵀ g`` in its registers. A step's wgmma stays in
  flight while the consumer fills the next tile (tiles double-buffered, the inputs' slots
  released one step late, ``wgmma_wait(1)``). A consumer whose feature step is past the
  last (paired by features, an odd step count) reads the last step again and stores
  nothing."""
  mg = mc.plgpu()
  c = pl_
  bt, fs, ft = c.bt, c.fs, c.ft
  *in_refs, out_ref = refs  # out: the reduce-add buffer (compat.reduce_add_zeros)
  pi, si = lax.axis_index("f"), lax.axis_index("s")
  wg = lax.axis_index("wg")
  t0 = si * c.dw_steps  # this program's share of the token steps (split-K over tokens)
  width = 1 + max(off for _, off in roles)  # feature steps per program
  step_of = lambda off: width * pi + off  # the feature step of a consumer's offset
  inputs = plan.dw_ws_inputs(roles, act)
  r = in_refs[inputs.index(plan.dw_ws_inputs(roles[:1], act)[0])].shape[1]
  a_s = scr["a_s"]
  acc_box = []
  stages, late = _in_flight(c.tiles.stages, c.dw_steps)

  def step(idx, *ins):  # ins end with the pipeline's carry (unused: ())
    slot = lax.rem(idx[0], 2)  # the tile the previous step's wgmma may still read is the other
    for k, (grad, off) in enumerate(roles):

      @pl.when(wg == k)
      def _():
        x_key, *src_keys = plan.dw_ws_inputs([(grad, off)], act)
        src = _Relu("dy1" if grad == "in" else act, c)
        mine = [ins[inputs.index(key)] for key in src_keys]
        for s in range(fs // ft):
          planes = src.planes(mine, 0, s)
          if grad == "out":
            planes = [x * x for x in planes]
          a_s[k, slot, :, s * ft:(s + 1) * ft] = jnp.concatenate(planes, axis=1)
        mg.commit_smem()  # the tile in shared memory before wgmma reads it
        mg.wgmma(acc_box[0], a_s.at[k, slot].T, ins[inputs.index(x_key)])

    # the previous step's wgmma done: its tile and (released after this step) its input
    # slots are free; this step's stays in flight (a one-stage pipeline: wait for it)
    mg.wgmma_wait(late)
    return ins[-1]

  def compute_context(eval_pipeline):
    def run(acc_ref):
      acc_box.append(acc_ref)
      eval_pipeline(())
      mg.wgmma_wait(0)
      return acc_ref[...]

    acc = pl.run_scoped(run, mg.ACC((fs, r), jnp.float32))
    for k, (grad, off) in enumerate(roles):
      f = step_of(off)

      @pl.when((wg == k) & (f < c.n_steps))
      def _():
        col0 = plan.dw_ws_columns(c)[grad]
        store_out(acc, out_ref, scr["out_s"].at[k], f * fs, col0, add=(si, c.interpret))
        mg.wait_smem_to_gmem(0)

  def block(key):  # the pipelined block of one input, at this program's feature step
    name, off = key
    f = step_of(off)
    if c.n_steps % width:  # the last program's second step is past the end: the last again
      f = jnp.minimum(f, c.n_steps - 1)
    if name in ("h", "g"):
      return _spec((bt, r), lambda t: (t0 + t, 0), c.dtype, r, late)
    source = {"dy1": "dy1", "meta": "dy1", "act": act}[name]
    return _Relu(source, c).specs(lambda t: t0 + t, lambda t: f, bt, late)[name == "meta"]

  mg.emit_pipeline_warp_specialized(
      step, grid=(c.dw_steps,), memory_registers=40, wg_axis="wg",
      num_compute_wgs=plan.WS_CONSUMERS, max_concurrent_steps=stages,
      compute_context=compute_context, in_specs=[block(k) for k in inputs])(*in_refs)


def _packed_mm_kernel(*refs, pl_: plan.Plan, operand: str, block: int, offset: int,
                      sparse: bool = False, **scr):
  """``out[rows, block c + offset] = A @ W[:, block c + offset]`` (blocks of ``block``
  columns; the first ``offset`` are the first kernel's, already in ``out``: the buffer it
  wrote, passed in as a mutable ref) with ``A`` a stored operand (refs: its source refs,
  ``W``, ``out``): from a 2:4 one (values + the forward's metadata) decompressed
  into the register A operand, ``y2`` squaring the kept ``relu(y1)`` values (the
  forward's ``y2s``, as its kernel rounds it), ``dy1`` taking them as they are; from a
  dense one ``y2_dense`` squaring ``relu(y1)`` in registers (the warm-up's ``y2``) and
  ``dy1_dense``'s tile read by wgmma from shared memory as TMA left it. With two or more
  pipeline stages a step's wgmma stays in flight while the next step's operand is formed
  (slots released a step late, ``wgmma_wait(1)``). ``sparse``: a 2:4 operand's kept
  values and the forward's indices straight into sparse wgmmas (``W``'s rows in
  ``plan.sparse_rows`` order), nothing decompressed."""
  mg = mc.plgpu()
  c = pl_
  bt, fs, ft = c.bt, c.fs, c.ft
  cb = block
  *src_refs, w_ref, out_ref = refs
  ti, ci = lax.axis_index("t"), lax.axis_index("c")
  src = _Relu("dense" if operand.endswith("_dense") else "compressed", c)
  stages, late = _in_flight(c.tiles.stages, c.n_steps)

  def step(idx, w_s, *a_refs):
    if operand == "dy1_dense":
      mg.wgmma(scr["acc"], a_refs[0], w_s)
    elif sparse:
      for s in range(fs // ft):
        v, nibs = src.packed_values(a_refs, 0, s)
        if operand == "y2":
          v = [x * x for x in v]
        sparse_mma.sparse_wgmma(scr["acc"], dict(a0=v[0], a1=v[1], b0=v[2], b1=v[3],
                                                 nib_a=nibs[0], nib_b=nibs[1]),
                                w_s.at[pl.ds(s * ft, ft)], scr.get("stage_s"), c.interpret)
    else:
      for s in range(fs // ft):
        a = src.planes(a_refs, 0, s)
        if operand.startswith("y2"):
          a = [x * x for x in a]
        mc.wgmma_a(scr["acc"], jnp.concatenate(a, axis=1), w_s.at[pl.ds(s * ft, ft)],
                   scr.get("stage_s"), c.interpret)
    # the previous step's wgmma done (its slots are refilled after this step); this
    # step's runs on while the next one forms its operand
    mg.wgmma_wait(late)

  def run(acc_ref):
    scr["acc"] = acc_ref
    specs = [_spec((fs, cb), lambda f: (f, ci + offset), c.dtype, cb, late)]
    specs += src.specs(lambda f: ti, lambda f: f, bt, late)
    mg.emit_pipeline(step, grid=(c.n_steps,), in_specs=specs,
                     max_concurrent_steps=stages)(w_ref, *src_refs)
    mg.wgmma_wait(0)
    return acc_ref[...]

  acc = pl.run_scoped(run, mg.ACC((bt, cb), jnp.float32))
  store_out(acc, out_ref, scr["out_s"], ti * bt, (ci + offset) * cb)
  mg.wait_smem_to_gmem(0)


def _named(fn, name: str):
  """Give a kernel body a name (Mosaic GPU names the compiled kernel after it)."""

  @functools.wraps(fn)
  def body(*args, **kwargs):
    return fn(*args, **kwargs)

  body.__name__ = body.__qualname__ = name
  return body


def _unions_named(fn):
  """Hand a body the members of each ``plgpu.RefUnion`` scratch (``Scratch.alias``) under
  their own names."""

  @functools.wraps(fn)
  def body(*args, **kwargs):
    for key in [k for k in kwargs if plan.UNION_SEP in k]:
      kwargs.update(zip(key.split(plan.UNION_SEP), kwargs.pop(key)))
    return fn(*args, **kwargs)

  return body


BODIES = {"fwd": _fwd_kernel, "fwd_ws": _fwd_ws_kernel, "relu": _relu_kernel,
          "tokmask": _tokmask_kernel, "dh": _dh_kernel,
          "dh_ws": _dh_ws_kernel, "dw_in": _dwin_kernel, "dw_out": _dwout_kernel,
          "dw_ws": _dw_ws_kernel,
          "packed_mm": _packed_mm_kernel}


@dataclasses.dataclass(frozen=True)
class Cols:
  """Columns ``start : start + size`` of a 2-D ``array`` as a kernel operand: the kernel
  gets the whole array and reads a view of its ref (one XLA launch prepares several
  operands side by side; slicing them apart in XLA would copy each)."""

  array: jax.Array
  start: int
  size: int


def _with_views(fn, views: dict[int, tuple[int, int]]):
  """``fn`` with its operand refs at ``views``' positions narrowed to their columns."""

  @functools.wraps(fn)
  def body(*refs, **kwargs):
    refs = list(refs)
    for i, (start, size) in views.items():
      refs[i] = refs[i].at[:, pl.ds(start, size)]
    return fn(*refs, **kwargs)

  return body


def launch(spec: plan.KernelSpec, *args, add_into=None):
  """Run the kernel ``spec`` describes on ``args`` (its operands, in the body's order;
  a :class:`Cols` passes columns of an array). A kernel adding into a reduce-add buffer
  (``spec.options["reduce_add"]``) adds into ``add_into`` (from ``compat.reduce_add_zeros``;
  returns nothing: several kernels can share it) or into a zeroed buffer of its own
  (returns the sum)."""
  options = dict(spec.options)
  if "source" in options:  # where the backward kernel's relu(y1) planes come from
    options["relu"] = _Relu(options.pop("source"), spec.c)
  splits = options.pop("reduce_add", None)  # programs adding into one output by TMA
  into = options.pop("into", False)  # writes columns of the last argument's array
  views = {i: (a.start, a.size) for i, a in enumerate(args) if isinstance(a, Cols)}
  args = [a.array if isinstance(a, Cols) else a for a in args]
  body = functools.partial(_unions_named(BODIES[spec.body]), pl_=spec.c, **options)
  if views:
    body = _with_views(body, views)
  threads = dict(num_threads=spec.warpgroups, thread_name="wg") if spec.warpgroups > 1 else {}
  call = functools.partial(
      mc.kernel(_named(body, spec.name), out_shape=() if splits or into else spec.out_shape,
                scratch=spec.scratch, grid=spec.grid, grid_names=spec.grid_names,
                interpret=spec.c.interpret, **threads), *args[:-1] if into else args)
  if into:
    # The buffer as a mutable ref: XLA aliases it to the kernel's result (no copy, no
    # join of column blocks, when nothing else reads the first kernel's output).
    out = jax.new_ref(args[-1])
    call(out)
    return out[...]
  if not splits:
    return call()
  if add_into is not None:
    call(add_into)
    return None
  out = mc.reduce_add_zeros(spec.out_shape.shape, spec.out_shape.dtype, splits, spec.c.interpret)
  call(out)
  return mc.reduce_add_total(out, spec.c.interpret)

