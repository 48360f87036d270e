"""The ELAS FFN core in Pallas Mosaic GPU (Hopper: TMA, wgmma): the op and its VJP.

The ``mosaic`` implementation of :mod:`elas_kernels.ffn.base`'s contract (same
arguments, results and gradients as the ``xla`` and ``triton`` ones):

    out_TxN = sparsify_24(relu(h_TxK @ w_inᵀ)²) @ w_outᵀ       w_in [F, K], w_out [N, F]

with ``h`` the rank-r code of a low-rank FFN (``K``, ``N`` are ranks). The
plain-jnp reference the tests compare with is ``base.reference``. This module
pads and permutes the operands, launches the kernels (``plan.py`` plans them,
``bodies.py`` holds their bodies) and wires forward and backward into a
``jax.custom_vjp``.

Feature layout. Every program works on 64-token tiles (one warpgroup, wgmma
``M = 64``) and walks the features in *steps* of ``block_f`` (one TMA tile of
each weight per step), each made of *sub-tiles* of ``sub_f = 8·P`` features
(one wgmma ``N = sub_f >= 64``). The wrapper reorders the small weights (XLA,
outside the kernels) so that sub-tile column ``j·P + c`` is feature ``8c + j``
of the sub-tile: one wgmma gives ``y1 [64, 8P]`` whose column slices
``[:, jP:(j+1)P]`` are 8 *planes* with the same register layout, and the two
2:4 groups of features ``8c .. 8c+7`` are planes 0-3 and 4-7 at one position.
Selection, compression and decompression are element-wise across planes (no
shuffles), and the selected ``y2s`` tile, planes side by side, is the register
A operand of ``y2s @ w_outᵀ`` as FlashAttention-3 uses its P tile.

Compressed activation (what ``masked`` / ``split`` keep for backward, 9/16 of
the dense bytes): ``vals [T, F/2]`` (per sub-tile 4 value planes: first and
second kept value of group a, then of group b; ``relu(y1)`` at the kept
positions, so backward rebuilds ``y2s = v·v`` exactly) and ``meta`` uint8, one
byte per position (group a's index pair ``i0 | i1 << 2`` in the low nibble,
b's in the high: ``sparse24.compress_24``'s byte), stored as
``[token tiles, sub-tiles · 64P/16, 16]``: each (token tile, sub-tile)'s
``[64, P]`` bytes as rows of 16, so every TMA row is 16 bytes and a kernel
can fetch any run of sub-tiles (``meta_TxG`` converts).

Kernels (each a ``plgpu.kernel``; tiles in shared memory by TMA, the weight /
activation streams through ``plgpu.emit_pipeline`` with ``stages`` buffers,
fp32 accumulation in wgmma accumulators):

- forward, per 64 tokens x ``block_n`` outputs: per sub-tile ``y1`` by wgmma,
  ReLU², 2:4 select + compress, ``acc += y2s @ w_outᵀ`` with ``y2s`` in
  registers; per-row statistics. ``y1`` and the dense ``y2`` never reach HBM.
- ``dh``, per 64 tokens x ``block_k`` columns: ``dy2 = g @ w_out`` by wgmma,
  ``relu(y1)`` decompressed (``masked``, ``split``) or read from the ``relu``
  kernel's dense output (``ste``, dense warm-up), ``dy1 = dy2 · 2 relu(y1)`` in
  registers as the A operand of ``dh += dy1 @ w_in``. The first ``block_k``
  programs also write ``dy1``: its kept values in the forward's value layout
  (the metadata is the forward's) from the compressed activation, all of it
  from the dense one; ``dw_in`` reads it instead of forming ``dy2`` again.
- ``dw_in`` per feature step x ``block_k``, ``dw_out`` per feature step x
  ``block_n``, looping over tokens: ``dy1`` (as ``dh`` wrote it, or formed from
  ``g @ w_out`` where the activation is recomputed) / the activation ``w_out``'s
  gradient sees are written to shared memory and read transposed by wgmma
  (``dw_in += dy1ᵀ h``, ``dw_out += gᵀ y2``); the token loop is split over
  ``dw_split`` programs so the grid fills the GPU.
- ``relu`` (``ste`` and the dense warm-up): ``relu(y1)`` written once, dense, for
  the backward kernels (``materialize_relu=False``: recomputed in each instead,
  ranks up to 256). ``tokmask`` (``split``): the token-wise 2:4 of ``dw_out``
  applied once to the decompressed ``relu(y1)``, written dense for ``dw_out``.

Shapes that don't divide: tokens, features and ranks are zero-padded (zeros
flow through exactly) and the ``F % 4`` tail is dense in XLA, as in the
Triton wrapper. Ranks above 256 are split over programs (``block_n`` /
``block_k`` <= 256: a wgmma's N and the register budget). In the 2:4 phase
nothing is formed twice: the forward kernel covers the first output block and
stores the compressed activation, and ``packed_mm`` (the stored operand
decompressed into the register A operand of one wgmma per sub-tile) makes the
other blocks from it, squaring the values (``y2s``); ``dh`` likewise covers
its first column block and ``packed_mm`` makes the others from the stored
``dy1``. The dense warm-up (``lax.cond`` on ``sparse_on``) likewise, from
``relu(y1)`` stored dense by its first block and ``dh``'s dense ``dy1``.

GPU: bf16 or fp16 inputs (wgmma's register A operand is 16-bit). fp32 runs in
the interpreter only (``interpret=True``); compiled it raises
``NotImplementedError`` so a dispatcher can fall back. Needs jax >= 0.11
(``compat.py`` lists the API differences it covers).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from elas_kernels import common as cm
from elas_kernels import sparse24
from elas_kernels.ffn import base
from elas_kernels.ffn.mosaic import bodies, plan
from elas_kernels.ffn.mosaic import compat as mc
from elas_kernels.gpu import H200, GpuSpec

reference = base.reference  # the op's plain-jnp definition, which the tests compare with


# --------------------------------------------------------------------------
# Kernel launches.
# --------------------------------------------------------------------------


def _fwd_call(flag, h, win, woutT, c: plan.Plan, store: bool, first_block: bool = False,
              store_relu: bool = False, sparse: bool = False):
  return bodies.launch(plan.fwd_spec(c, store, first_block, store_relu, sparse), flag, h, win,
                       woutT)


def _packed_mm_call(src, w, operand: str, c: plan.Plan, first):
  """``first`` (the forward's / ``dh``'s output, its first column block written) with the
  columns past it from a stored operand (``src``: 2:4 values and metadata for ``y2`` /
  ``dy1``, the dense ``relu(y1)`` / ``dy1`` for ``y2_dense`` / ``dy1_dense``)."""
  return bodies.launch(plan.packed_mm_spec(c, operand), *src, w, first)


def _relu_call(h, win, c: plan.Plan):
  return bodies.launch(plan.relu_spec(c), h, win)


def _dh_call(g, h, woutT, win, src, source: str, c: plan.Plan):
  args = [g, woutT, win] + ([h, win] if source == "recompute" else []) + list(src)
  return bodies.launch(plan.dh_spec(c, source), *args)


def _dwin_call(g, h, woutT, win, src, source: str, c: plan.Plan):
  if source in plan.STORED_DY1.values():  # src: dy1 as dh wrote it (+ the forward's metadata)
    args = [h] + list(src)
  else:
    args = [g, h, woutT] + ([win] if source == "recompute" else []) + list(src)
  return bodies.launch(plan.dwin_spec(c, source), *args)


def _dwout_call(g, h, win, src, source: str, dw_mask: str, c: plan.Plan):
  args = [g] + ([h, win] if source == "recompute" else []) + list(src)
  return bodies.launch(plan.dwout_spec(c, source, dw_mask), *args)


def _dw_ws_call(h, g, dy1, meta, act_values, act: str, c: plan.Plan):
  """``(dw_in, dw_outᵀ)`` of the 2:4 phase from the warp-specialized kernel(s) of
  :func:`plan.dw_ws_specs` (kernel feature order): ``dy1``'s kept values and the
  forward's metadata, the activation ``act_values`` (``act``: compressed values, or
  split's dense ``tokmask`` output)."""
  arrays = {"h": h, "g": g, "dy1": dy1, "meta": meta, "act": act_values}
  specs = plan.dw_ws_specs(c, act)
  buf = specs[0].out_shape  # [F, K + N]: both gradients side by side, zeroed once
  dw = mc.reduce_add_zeros(buf.shape, buf.dtype, specs[0].options["reduce_add"], c.interpret)
  for spec in specs:
    roles = spec.options["roles"]
    bodies.launch(spec, *(arrays[name] for name, _ in plan.dw_ws_inputs(roles, act)),
                  add_into=dw)
  dw = mc.reduce_add_total(dw, c.interpret)
  out0 = plan.dw_ws_columns(c)["out"]
  return dw[:, :out0], dw[:, out0:]


def _tokmask_call(dense_f, tok_dense, vals, meta, c: plan.Plan):
  """Split mode: relu(y1) with the token-wise 2:4 applied, dense (``dw_out``'s operand)."""
  return bodies.launch(plan.tokmask_spec(c), dense_f, tok_dense, vals, meta)


# --------------------------------------------------------------------------
# custom_vjp op.
# --------------------------------------------------------------------------


def _prep_weights(w_in, w_out, c: plan.Plan, sparse: bool = False):
  """Kernel operands of the weights, ``w_in [F, K]`` and ``w_outᵀ [F, N]`` (padded, in
  kernel feature order) as columns of one array ``[F, K + N]``: one XLA launch (gathers
  and transpose fused) prepares both, and the kernels read a step transposed where they
  need the other orientation (two orientations of two weights were four launches).
  ``sparse`` (``tiles.sparse_mma``): two more views in the same launch, ``w_in`` and
  ``w_outᵀ`` with their rows in ``plan.sparse_rows`` order (the sparse wgmma's ``B``:
  ``dh``'s and the forward's), both in forward and backward so that XLA prepares the
  array once per training step (modelled glue at 1B: 146 µs fwd+bwd, against 159 with a
  view each and 142 for ``mosaic``)."""
  # each gathered, then joined: XLA fuses it all (joined first, the transpose was its own)
  parts = [cm.pad_to(c.features_in(w_in, 0), 1, c.k_pad),
           cm.pad_to(c.features_in(w_out.T, 0), 1, c.n_pad)]
  if sparse:
    rows = plan.sparse_rows(c)
    parts += [cm.pad_to(c.features_in(w_in, 0, rows), 1, c.k_pad),
              cm.pad_to(c.features_in(w_out.T, 0, rows), 1, c.n_pad)]
  w = jnp.concatenate(parts, axis=1)
  views = (bodies.Cols(w, 0, c.k_pad), bodies.Cols(w, c.k_pad, c.n_pad))
  if sparse:
    kn = c.k_pad + c.n_pad
    views += (bodies.Cols(w, kn, c.k_pad), bodies.Cols(w, kn + c.k_pad, c.n_pad))
  return views


def _pad_cols(x, size):
  return cm.pad_to(x, 1, size)


def _forward(mode, plan_args, h, w_in, w_out, sparse_on, store=False):
  """Output, statistics and what backward needs; ``store``: write the compressed activation."""
  c = plan.Plan(*plan_args)
  hk = _pad_cols(c.rows_in(h), c.k_pad)
  sp = c.tiles.sparse_mma  # the 2:4 phase's y2s @ w_outᵀ on sparse tensor cores
  win, woutT, *sparse_view = _prep_weights(w_in, w_out, c, sp)
  woutT_sp = sparse_view[1] if sp else woutT
  flag = jnp.asarray(sparse_on, jnp.int32).reshape(1)
  if plan.splits_y2(c):
    # Several output blocks: y1 is computed once (first block) and the other blocks come
    # from the stored activation: compressed in the 2:4 phase, relu(y1) dense in the
    # warm-up (its y2 is not 2:4; a temporary: the compressed one stays the residual).
    def sparse():
      out0, stats_rows, vals, meta = _fwd_call(flag, hk, win, woutT_sp, c, True, first_block=True,
                                               sparse=sp)
      out = _packed_mm_call((vals, meta), woutT_sp, "y2", c, out0)
      return (out, stats_rows) + ((vals, meta) if store else ())

    def dense():
      cd = plan.dense_forward_plan(c)
      if not plan.splits_y2(cd):  # one block: the flag keeps every y2
        return tuple(_fwd_call(flag, hk, win, woutT, cd, store))
      out0, stats_rows, *stored, r = _fwd_call(flag, hk, win, woutT, cd, store,
                                               first_block=True, store_relu=True)
      return (_packed_mm_call((r,), woutT, "y2_dense", cd, out0), stats_rows, *stored)

    outs = jax.lax.cond(jnp.asarray(sparse_on, bool), sparse, dense)
  elif sp:  # one kernel per phase: the warm-up keeps every y2, on dense MMAs
    outs = jax.lax.cond(jnp.asarray(sparse_on, bool),
                        lambda: tuple(_fwd_call(flag, hk, win, woutT_sp, c, store, sparse=True)),
                        lambda: tuple(_fwd_call(flag, hk, win, woutT, c, store)))
  else:
    outs = _fwd_call(flag, hk, win, woutT, c, store)
  out_k, stats_rows = outs[:2]
  vals, meta = outs[2:4] if store else (None, None)
  out, stats, r_tail = base.finish_forward(c.rows_out(out_k)[:, :c.n], c.rows_out(stats_rows.T),
                                           h, w_in, w_out, c.f_pad)
  return out, stats, (vals, meta, r_tail)


def _nnz_per_feature(vals: jax.Array, meta: jax.Array, c: plan.Plan) -> jax.Array:
  """Split mode: per-feature non-zeros of ``y2s`` (original order, main features),
  counted in XLA from the compressed activation (reads it once more)."""
  n_sub = c.f_pad // c.ft
  v = vals.reshape(c.t_pad, n_sub, 4, c.p)
  nz = (v * v != 0).astype(jnp.int32)  # y2s = v·v in the compute dtype, as the reference counts
  m = plan.meta_TxG(meta, c).reshape(c.t_pad, n_sub, c.p).astype(jnp.int32)
  counts = []
  for grp in range(2):
    nib = (m >> (4 * grp)) & 0xF
    pos = (nib & 3, nib >> 2)  # in-group index of the first and second kept value
    cnt = sum(jnp.sum(nz[:, :, 2 * grp + w, :, None]
                      * (pos[w][..., None] == jnp.arange(4)), axis=0) for w in range(2))
    counts.append(cnt)  # [n_sub, P, 4]
  nnz = jnp.concatenate(counts, axis=-1).reshape(-1)  # feature s·FT + 8c + 4·grp + idx
  return nnz[: c.f_main]


def _fwd_rule(mode, dense_fraction, plan_args, h, w_in, w_out, sparse_on):
  # ste recomputes relu(y1) in backward: it stores (and keeps) nothing f-wide.
  out, stats, (vals, meta, r_tail) = _forward(mode, plan_args, h, w_in, w_out, sparse_on,
                                              store=mode != "ste")
  # Named so that a remat policy saving base.SAVED_24_NAME keeps them (remat = lowrank).
  vals, meta, r_tail = (None if x is None else checkpoint_name(x, base.SAVED_24_NAME)
                        for x in (vals, meta, r_tail))
  return (out, stats), (h, w_in, w_out, sparse_on, vals, meta, r_tail)


def _bwd_rule(mode, dense_fraction, plan_args, res, cot):
  h, w_in, w_out, sparse_on, vals, meta, r_tail = res
  c = plan.Plan(*plan_args)
  g_out = cot[0].astype(h.dtype)
  k, n = c.k, c.n
  hk = _pad_cols(c.rows_in(h), c.k_pad)
  gk = _pad_cols(c.rows_in(g_out), c.n_pad)
  win, woutT, *sparse_view = _prep_weights(w_in, w_out, c, c.tiles.sparse_mma)
  no_dense_f = jnp.zeros((c.f_pad,), jnp.int32)
  no_tok_dense = jnp.zeros((c.t_pad,), jnp.int32)

  # Split mode: the dense_fraction features with the most non-zeros keep all
  # tokens, and the rows of an incomplete token group too.
  dense_f, tok_dense, dense_all = no_dense_f, no_tok_dense, None
  if mode == "split":
    nnz_f = _nnz_per_feature(vals, meta, c)
    if r_tail is not None:
      nnz_f = jnp.concatenate([nnz_f, jnp.sum(r_tail * r_tail != 0, axis=0, dtype=jnp.int32)])
    dense_all = sparse24.densest_features(nnz_f, dense_fraction)
    dense_f = c.features_in(dense_all.astype(jnp.int32), 0)
    tok_dense = jnp.asarray(c.tok_dense)

  def grads(source, dw_mask, dense_f, tok_dense):
    src = (vals, meta) if source == "compressed" else ()
    if source == "dense":
      src = (_relu_call(hk, win, c),)
    dh_win = sparse_view[0] if plan.sparse_source(c, source) else win  # its rows as dh reads them
    dh = _dh_call(gk, hk, woutT, dh_win, src, source, c)
    stored = plan.STORED_DY1.get(source)
    if stored:  # dh also wrote dy1 (2:4 or dense): dw_in forms no dy2, nor do dh's other blocks
      dh, dy1 = dh
      dy1_src = (dy1, meta) if source == "compressed" else (dy1,)
      if plan.splits_dy1(c, source):
        dh = _packed_mm_call(dy1_src, dh_win, stored, c, dh)
    # split: the token-wise 2:4 applied once, read back dense by dw_out
    r_tok = _tokmask_call(dense_f, tok_dense, vals, meta, c) if dw_mask == "tokens" else None
    if plan.serves_dw_ws(c, source):  # warp-specialized, a consumer per gradient or step
      act = "compressed" if r_tok is None else "dense"
      dwin, dwoutT = _dw_ws_call(hk, gk, dy1, meta, vals if r_tok is None else r_tok, act, c)
      return dh, dwin, dwoutT.T
    if stored:
      dwin = _dwin_call(gk, hk, woutT, win, dy1_src, stored, c)
    else:
      dwin = _dwin_call(gk, hk, woutT, win, src, source, c)
    if r_tok is not None:
      dwout = _dwout_call(gk, hk, win, (r_tok,), "dense", "none", c)
    else:
      dwout = _dwout_call(gk, hk, win, src, source, dw_mask, c)
    return dh, dwin, dwout

  recompute = plan.recompute_source(c)
  sparse_source = recompute if mode == "ste" else "compressed"
  sparse_grads = functools.partial(grads, sparse_source,
                                   {"masked": "none", "ste": "ste", "split": "tokens"}[mode],
                                   dense_f, tok_dense)
  # dense warm-up: the exact gradient of the dense FFN, recomputed from h
  dense_grads = functools.partial(grads, recompute, "none", no_dense_f, no_tok_dense)
  dh, dwin_k, dwout_k = jax.lax.cond(sparse_on, sparse_grads, dense_grads)
  d_h = c.rows_out(dh)[:, :k]
  d_w_in = c.features_out(dwin_k, 0)[:, :k]
  d_w_out = c.features_out(dwout_k, 1)[:n]
  if r_tail is not None:  # the dense tail, in XLA
    dh_tail, dwin_tail, dwout_tail = base.tail_grads(g_out, h, w_in, w_out, c.f_main, r_tail, mode,
                                                     dense_all, sparse_on)
    d_h = d_h + dh_tail
    d_w_in = jnp.concatenate([d_w_in, dwin_tail], axis=0)
    d_w_out = jnp.concatenate([d_w_out, dwout_tail], axis=1)
  return d_h.astype(h.dtype), d_w_in.astype(w_in.dtype), d_w_out.astype(w_out.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ffn_core(mode, dense_fraction, plan_args, h, w_in, w_out, sparse_on):
  out, stats, _ = _forward(mode, plan_args, h, w_in, w_out, sparse_on)
  return out, stats


_ffn_core.defvjp(_fwd_rule, _bwd_rule)


class MosaicFfn(base.FfnCore):
  """The FFN core as Pallas Mosaic GPU kernels (Hopper; interpreted on CPU; jax >= 0.11).

  Args:
    interpret, gpu: as :class:`~elas_kernels.ffn.base.FfnCore`; the kernels are
      planned for ``gpu``'s shared memory and SMs (default the H200's) and need a
      Hopper GPU (sm_90) when compiled.
    **tiles: fields of :class:`~elas_kernels.ffn.mosaic.plan.Tiles` (``block_t``,
      ``block_f``, ``block_f_dw``, ``sub_f``, ``block_n``, ``block_k``,
      ``dw_split``, ``stages``, ``materialize_relu``,
      ``warp_specialized``); None or
      missing: by rank (:func:`~elas_kernels.ffn.mosaic.plan.default_tiles`).

  Cannot serve (``NotImplementedError``, with the reason): jax < 0.11, a GPU
  that is not Hopper, fp32 compiled (wgmma's register A operand is 16-bit),
  ranks whose tiles exceed the GPU's shared memory.
  """

  name = "mosaic"

  def __init__(self, *, interpret: bool | None = None, gpu: GpuSpec | None = None, **tiles):
    super().__init__(interpret=interpret, gpu=gpu)
    fields = {f.name for f in dataclasses.fields(plan.Tiles)}
    unknown = sorted(set(tiles) - fields)
    if unknown:
      raise ValueError(f"{self.what}: unknown tile option(s) {unknown}; expected some of "
                       f"{sorted(fields)}")
    self.tile_options = {k: v for k, v in tiles.items() if v is not None}

  def plan_args(self, call: base.Call) -> tuple:
    """The static arguments of the op (hashable), tiles checked."""
    tiles = dataclasses.replace(plan.default_tiles(call.k, call.n, interpret=self.interpret),
                                **{**self.default_options(call), **self.tile_options})
    tiles.check()
    return (call.t, call.f, call.k, call.n, call.dtype, call.mode, tiles, self.interpret,
            self.gpu or H200)

  def default_options(self, call: base.Call) -> dict:
    """Tile options of this implementation for ``call`` unless given (none here)."""
    return {}

  def check_servable(self, call):
    mc.require()
    gpu = self.gpu or H200
    if not self.interpret:
      if not gpu.is_hopper:
        raise NotImplementedError(
            f"{self.what}: the Mosaic GPU kernels need a Hopper GPU (sm_90); the {gpu.name} is "
            f"sm_{''.join(map(str, gpu.compute_capability))}")
      if call.dtype not in [jnp.dtype(d) for d in plan.GPU_DTYPES]:
        raise NotImplementedError(
            f"{self.what}: {call.dtype.name} inputs on a GPU: wgmma's register A operand "
            "(the y2s / dy1 tiles) must be 16-bit (bf16, f16); use kernel=triton or xla")
    # Bad tiles (ValueError) and kernels beyond shared memory (NotImplementedError) fail
    # here, forward and backward, before anything is traced.
    plan.all_specs(plan.Plan(*self.plan_args(call)), train=True)

  def _core(self, call, h_TxK, w_in_FxK, w_out_NxF, sparse_on):
    return _ffn_core(call.mode, call.dense_fraction, self.plan_args(call), h_TxK, w_in_FxK,
                     w_out_NxF, sparse_on)

  def saved_activation(self, h, w_in_FxK, w_out_NxF, *, mode="masked"):
    call = base.check_args(self.what, h, w_in_FxK, w_out_NxF, mode, 0.05)
    self.check_servable(call)
    if mode == "ste":
      raise NotImplementedError(f"{self.what}: mode 'ste' keeps no compressed activation")
    args = self.plan_args(call)
    _, _, (vals, meta, _) = _forward(mode, args, h.reshape(call.t, call.k), w_in_FxK, w_out_NxF,
                                     jnp.asarray(True), store=True)
    c = plan.Plan(*args)
    groups = call.f_main // 4
    return (c.rows_out(plan.vals_TxF2(vals, c))[:, : 2 * groups],
            c.rows_out(plan.meta_TxG(meta, c))[:, : -(-groups // 2)])


class MosaicWsFfn(MosaicFfn):
  """:class:`MosaicFfn` with warp-specialized kernels (``Tiles.warp_specialized``): per
  program a TMA producer warpgroup and two consumer warpgroups of ``block_t`` tokens
  sharing every weight step (64-feature steps on a GPU, the default: two pipeline stages
  of the shared steps fit beside the two consumers' buffers): the forward, ``dh`` (from
  the compressed activation in the 2:4 phase, from ``relu(y1)`` dense in ``ste`` and the
  warm-up) and, in the 2:4 phase, ``dw_in`` and ``dw_out`` in one kernel with a consumer
  each. The forward and ``dh`` cover column blocks of at most 128 (a consumer's
  ``[64, 128]`` fp32 accumulator within the 168 registers a thread ptxas gives:
  ``setmaxnreg`` is ignored in Mosaic's build); at rank 256 the other 128 columns come
  from ``packed_mm`` on the stored operand, so ``y1`` and ``dy2`` are still formed once.
  The dense phases' weight-gradient kernels and, where the output splits, the warm-up's
  forward are :class:`MosaicFfn`'s. Ranks up to 256 (``NotImplementedError`` above: at
  rank 512 two consumers' ``[64, 512]`` ``h`` / ``g`` tiles and the weight steps exceed
  shared memory). Unverified on a GPU (as :class:`MosaicFfn`); ``auto`` tries it first
  on Hopper."""

  name = "mosaic_ws"

  def __init__(self, *, interpret: bool | None = None, gpu: GpuSpec | None = None, **tiles):
    tiles.setdefault("warp_specialized", True)
    super().__init__(interpret=interpret, gpu=gpu, **tiles)


class MosaicSparseFfn(MosaicFfn):
  """:class:`MosaicFfn` with the 2:4 phase's products whose left operand is 2:4 along the
  contraction on Hopper's sparse tensor cores (``Tiles.sparse_mma``; ``sparse_mma.py``):
  the forward's ``y2s @ w_outᵀ`` and ``dh``'s ``dy1 @ w_in`` (``dy1`` carries the
  forward's mask), by ``wgmma.mma_async.sp`` in inline PTX. The warm-up, ``ste``'s
  backward, the weight gradients and the output / ``dh`` blocks ``packed_mm`` makes stay
  on dense MMAs. Warp-specialized where :class:`MosaicWsFfn` serves (ranks <= 256), else
  :class:`MosaicFfn`'s kernels. bf16 / fp16 on a GPU (fp32 in the interpreter only).

  **Unverified on hardware**: the metadata's register layout is read from the PTX ISA's
  text and CUTLASS (the ISA draws it in a figure); until ``tests/test_sparse_mma.py``'s
  and ``tests/test_ffn_core.py``'s ``gpu`` tests have passed on an H100 / H200, ``auto``
  does not pick it."""

  name = "mosaic_sparse"

  def __init__(self, *, interpret: bool | None = None, gpu: GpuSpec | None = None, **tiles):
    tiles.setdefault("sparse_mma", True)
    super().__init__(interpret=interpret, gpu=gpu, **tiles)

  def default_options(self, call: base.Call) -> dict:
    # warp-specialized as mosaic_ws where it serves (ranks up to 256)
    rank = max(cm.padded(call.k, plan.RANK_ALIGN), cm.padded(call.n, plan.RANK_ALIGN))
    return {"warp_specialized": rank <= plan.WS_DW_MAX_RANK}
