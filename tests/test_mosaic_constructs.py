"""One small probe kernel per Mosaic GPU construct of the warp-specialized ELAS kernels.

The FlashAttention-3-style kernels (a producer warpgroup and two consumer
warpgroups in ping-pong, pipelines of >= 2 stages, persistent grids, clusters
with TMA multicast) are built from the constructs below. Each probe is one
program for both paths (its builder takes ``interpret``):

- run in jax's Mosaic GPU interpreter on CPU, with its race detector on,
  against a plain-jnp reference on random inputs (tiny shapes);
- compiled deviceless for the H200 (marker ``gpu_compile``, needs
  ``jax[cuda12]``): compiled, no register spill, and the PTX holding what the
  construct is for.

Where the interpreter refuses a construct (a register A operand of ``wgmma``,
TMA reduce-add), the refusal is asserted with its text, so that a jax upgrade
that lifts it is noticed, and the shim in ``elas_kernels.ffn.mosaic.compat``
that keeps the two paths one program is tested instead. docs/kernels.md has
the table of findings. Integer-valued inputs where the result is compared
exactly: every product and sum is then exact in fp32 whatever the order.
Skipped where Mosaic GPU is unavailable (jax < 0.11).

    pytest -q tests/test_mosaic_constructs.py                       # interpreter, CPU
    JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 \\
      pytest -q -m gpu_compile tests/test_mosaic_constructs.py       # venv with jax[cuda12]
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.experimental import pallas as pl

from elas_kernels import common as cm
from elas_kernels import sparse24
from elas_kernels.ffn.mosaic import bodies
from elas_kernels.ffn.mosaic import compat as mc

REASON = mc.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"Mosaic GPU unavailable: {REASON}")

BF16, F32 = jnp.bfloat16, jnp.float32
BT = 64  # tokens per consumer warpgroup: wgmma's M


def _mg():
  return mc.plgpu()


def _warpgroup():
  """Lowering semantics set explicitly (the default since jax 0.11 is Warpgroup)."""
  mg = _mg()
  return mg.CompilerParams(lowering_semantics=mg.LoweringSemantics.Warpgroup)


def _ints(seed: int, shape, lo: int = -3, hi: int = 4, dtype=BF16) -> jax.Array:
  """Random small integers: exact in bf16, and every dot of them exact in fp32."""
  return jax.random.randint(jax.random.key(seed), shape, lo, hi).astype(dtype)


def _mm(a, b) -> jax.Array:
  return jnp.dot(a.astype(F32), b.astype(F32), precision="highest")


def _interpret_fails(fn, *args) -> str:
  """Run ``fn`` expecting the interpreter to fail; the error text. The interpreter
  keeps the failed kernel's state: reset it for the next kernel (its docs say so)."""
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc

  try:
    with pytest.raises(jax.errors.JaxRuntimeError) as e:
      jax.block_until_ready(fn(*args))
  finally:
    ipc.reset_gpu_interpret_mode_state()
  return str(e.value)


# --------------------------------------------------------------------------
# 1-3, 7: producer warpgroup + 2 consumer warpgroups through
# emit_pipeline_warp_specialized, optional ping-pong and 2-CTA cluster.
# --------------------------------------------------------------------------

WS = dict(T=256, R=64, F=384, FT=128)  # 2 CTAs of 2 consumer tiles, 3 feature steps


def ws_stats(interpret: bool, *, pingpong: bool = False, cluster: bool = False,
             races: bool = True, bug: str | None = None, shape=WS):
  """The first half of the ELAS forward, warp-specialized: per 64 tokens (one
  consumer warpgroup) and feature step, ``y1 = h @ w_inᵀ[:, step]`` (wgmma) and
  the pipeline's carry ``(Σ relu(y1)², max y1)`` per row, written as ``stats [2, T]``
  through shared memory and TMA. Warpgroup 2 is the producer (TMA of the weight
  steps, ``memory_registers=40``: ``set_max_registers`` in the PTX); both consumers
  read each weight step. ``pingpong``: the consumers take turns issuing their wgmma
  (``plgpu.Barrier`` ``turn``). ``cluster``: 2 CTAs share each step by TMA multicast.
  ``bug``: ``"no_turn_wait"`` (consumer 1 never waits for its turn), ``"no_commit"``
  (no ``commit_smem()`` before the TMA store of the statistics)."""
  mg = _mg()
  t, r, f, ft = shape["T"], shape["R"], shape["F"], shape["FT"]
  n_steps = f // ft

  def body(h_g, w_g, stats_g):
    scoped = dict(h_s=mc.smem((2, BT, r), BF16), bar=mg.Barrier(num_barriers=2),
                  turn=mg.Barrier(num_arrivals=1, num_barriers=2),
                  stats_s=mg.SMEM((2, 2, BT), F32))

    @functools.partial(pl.run_scoped, collective_axes="wg", **scoped)
    def _(h_s, bar, turn, stats_s):
      wg = lax.axis_index("wg")
      cta = lax.axis_index("m") * 2 + lax.axis_index("cluster") if cluster else lax.axis_index("m")
      rows = pl.ds(cta * 2 * BT + wg * BT, BT)

      def compute_context(eval_pipeline):
        bodies._copy_in(h_g.at[rows], h_s.at[wg], bar.at[wg])
        z = mc.zeros((BT,), F32, mg.Layout.WGMMA.reduce(1))
        total, mx = eval_pipeline((z, z - jnp.inf))
        stats_s[wg, 0] = total
        stats_s[wg, 1] = mx
        if bug != "no_commit":
          mg.commit_smem()
        mg.copy_smem_to_gmem(stats_s.at[wg], stats_g.at[:, rows])
        mg.wait_smem_to_gmem(0)

      def step(idx, w_s, carry):
        (fi,) = idx
        total, mx = carry
        if pingpong:  # wait for this consumer's turn; consumer 0 starts
          waits = jnp.logical_or(wg == 1, fi > 0)
          if bug == "no_turn_wait":  # consumer 1 never waits
            waits = jnp.logical_and(waits, wg == 0)

          @pl.when(waits)
          def _():
            mg.barrier_wait(turn.at[wg])

        def issue(acc):
          mg.wgmma(acc, h_s.at[wg], w_s)
          if pingpong:  # the other consumer's turn (consumer 1 skips its last: phases balance)
            mg.barrier_arrive(turn.at[1 - wg], predicate=jnp.logical_or(wg == 0, fi < n_steps - 1))
          return acc[...]

        y1 = pl.run_scoped(issue, mg.ACC((BT, ft), F32))
        relu = jnp.maximum(y1, 0.0)
        return total + jnp.sum(relu * relu, axis=1), jnp.maximum(mx, jnp.max(y1, axis=1))

      mg.emit_pipeline_warp_specialized(
          step, grid=(n_steps,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
          max_concurrent_steps=2, compute_context=compute_context,
          in_specs=[mg.BlockSpec((r, ft), lambda fi: (0, fi),
                                 transforms=mc.swizzle_transforms(BF16, ft),
                                 collective_axes=("cluster",) if cluster else ())],
      )(w_g)

  ctas = t // (2 * BT)
  return mc.kernel(body, out_shape=jax.ShapeDtypeStruct((2, t), F32), scratch=(),
                   grid=(ctas // 2,) if cluster else (ctas,), grid_names=("m",),
                   num_threads=3, thread_name="wg",
                   cluster=(2,) if cluster else (), cluster_names=("cluster",) if cluster else (),
                   compiler_params=_warpgroup(), interpret=interpret, detect_races=races)


def ws_inputs(shape=WS):
  return _ints(0, (shape["T"], shape["R"])), _ints(1, (shape["R"], shape["F"]))


def ws_reference(h, w):
  y1 = _mm(h, w)
  relu = jnp.maximum(y1, 0.0)
  return jnp.stack([jnp.sum(relu * relu, axis=1), jnp.max(y1, axis=1)])


def _check_stats(got, want):
  # sums of up to 384 exact squares: only the order of the fp32 additions differs
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


@pytest.mark.parametrize("pingpong", [False, True], ids=["no_pingpong", "pingpong"])
def test_warp_specialized_pipeline_with_ping_pong(pingpong):
  # (1) num_threads=3 + emit_pipeline_warp_specialized(num_compute_wgs=2, compute_context)
  # with a carry, (2) set_max_registers (memory_registers), (3) the consumers' ping-pong:
  # correct under the race detector.
  h, w = ws_inputs()
  got = ws_stats(True, pingpong=pingpong)(h, w)
  _check_stats(got, ws_reference(h, w))


def test_a_missing_ping_pong_wait_is_caught():
  # (3) Consumer 1 never waits for its turn: the turn barrier completes a phase nobody
  # observed, which the interpreter refuses (with or without its race detector).
  h, w = ws_inputs()
  err = _interpret_fails(ws_stats(True, pingpong=True, bug="no_turn_wait"), h, w)
  assert "ValueError: Barrier completed phase 1, but no threads observed phase 0" in err, err


def test_race_detector_catches_a_missing_commit_smem_in_the_warp_specialized_kernel():
  # (3) The race detector is a real synchronization checker: without commit_smem() the
  # TMA engine may read the statistics before the consumers' stores are visible to it.
  h, w = ws_inputs()
  err = _interpret_fails(ws_stats(True, pingpong=True, bug="no_commit"), h, w)
  assert "RACE DETECTED" in err, err


def test_cluster_of_two_ctas_shares_the_weight_steps():
  # (7) 2-CTA clusters, the weight steps multicast (BlockSpec collective_axes=("cluster",)).
  # The interpreter copies the whole block into each CTA (multicast partitioning is not
  # simulated), but runs the cluster barriers; 4 CTAs = 2 clusters.
  shape = dict(WS, T=512)
  h, w = ws_inputs(shape)
  got = ws_stats(True, pingpong=True, cluster=True, shape=shape)(h, w)
  _check_stats(got, ws_reference(h, w))


# --------------------------------------------------------------------------
# 2: set_max_registers in a hand-written producer / consumer kernel.
# --------------------------------------------------------------------------

HW = dict(M=256, N=64, K=256, TK=64)  # 2 CTAs, 4 k-steps through a 2-slot ring


def hand_ws_matmul(interpret: bool, *, setmax: bool = True, races: bool = True,
                   bug: str | None = None):
  """``out = a @ b`` (bf16) by a producer warpgroup filling a 2-slot ring by TMA
  (``full`` / ``empty`` mbarriers) and 2 consumer warpgroups of 64 rows each, with
  ``set_max_registers(40 / 232)`` in the branches (``setmax``).
  ``bug="no_empty_wait"``: the producer refills a slot without waiting for the consumers."""
  mg = _mg()
  m, n, k, tk = HW["M"], HW["N"], HW["K"], HW["TK"]
  k_steps, stages = k // tk, 2

  def body(a_g, b_g, o_g, a_s, b_s, o_s, full, empty):
    wg, mi = lax.axis_index("wg"), lax.axis_index("m")

    @pl.when(wg == 2)
    def _producer():
      if setmax:
        mg.set_max_registers(40, action="decrease")

      @pl.loop(0, k_steps)
      def _(ki):
        slot = lax.rem(ki, stages)
        if bug != "no_empty_wait":
          @pl.when(ki >= stages)
          def _():
            mg.barrier_wait(empty.at[slot])
        mg.copy_gmem_to_smem(a_g.at[pl.ds(mi * 2 * BT, 2 * BT), pl.ds(ki * tk, tk)], a_s.at[slot],
                             full.at[slot])
        mg.copy_gmem_to_smem(b_g.at[pl.ds(ki * tk, tk)], b_s.at[slot], full.at[slot])

      # observe the consumers' last releases: every barrier completion must be waited for
      for j in range(stages if bug != "no_empty_wait" else k_steps):
        mg.barrier_wait(empty.at[(k_steps - 1 - j) % stages])

    @pl.when(wg < 2)
    def _consumer():
      if setmax:
        mg.set_max_registers(232, action="increase")

      def run(acc):
        @pl.loop(0, k_steps)
        def _(ki):
          slot = lax.rem(ki, stages)
          mg.barrier_wait(full.at[slot])
          mg.wgmma(acc, a_s.at[slot, pl.ds(wg * BT, BT)], b_s.at[slot])
          mg.wgmma_wait(0)
          mg.barrier_arrive(empty.at[slot])
        return acc[...]

      out = pl.run_scoped(run, mg.ACC((BT, n), F32))
      o_s.at[wg][...] = out.astype(BF16)
      mg.commit_smem()
      mg.copy_smem_to_gmem(o_s.at[wg], o_g.at[pl.ds(mi * 2 * BT + wg * BT, BT)])
      mg.wait_smem_to_gmem(0)

  scratch = [mc.smem((stages, 2 * BT, tk), BF16), mc.smem((stages, tk, n), BF16),
             mc.smem((2, BT, n), BF16), mg.Barrier(num_arrivals=2, num_barriers=stages),
             mg.Barrier(num_arrivals=2, num_barriers=stages)]
  return mc.kernel(body, out_shape=jax.ShapeDtypeStruct((m, n), BF16), scratch=scratch,
                   grid=(m // (2 * BT),), grid_names=("m",), num_threads=3, thread_name="wg",
                   compiler_params=_warpgroup(), interpret=interpret, detect_races=races)


def hw_inputs():
  return _ints(2, (HW["M"], HW["K"])), _ints(3, (HW["K"], HW["N"]))


def test_set_max_registers_in_a_hand_written_producer_consumer_kernel():
  # (2) set_max_registers runs (a no-op in the interpreter) in a 3-warpgroup kernel with
  # its own full / empty mbarrier ring; exact (integer inputs: exact fp32 sums, rounded to
  # bf16 alike).
  a, b = hw_inputs()
  np.testing.assert_array_equal(np.asarray(hand_ws_matmul(True)(a, b), np.float32),
                                np.asarray(_mm(a, b).astype(BF16), np.float32))


def test_race_detector_catches_a_producer_that_does_not_wait_for_the_consumers():
  a, b = hw_inputs()
  err = _interpret_fails(hand_ws_matmul(True, bug="no_empty_wait"), a, b)
  assert "RACE DETECTED" in err, err


def test_default_lowering_semantics_is_warpgroup():
  # The existing kernels pass no compiler_params: they lower with this default (jax 0.11.2
  # and 0.12.0.1). If it changes, set the semantics explicitly where it matters.
  mg = _mg()
  assert mg.CompilerParams().lowering_semantics == mg.LoweringSemantics.Warpgroup


# --------------------------------------------------------------------------
# 4: wgmma with the A operand in registers (compat.wgmma_a), wgmma_wait(1).
# --------------------------------------------------------------------------

RA = dict(T=128, R=64, F=256, FT=128)  # 2 programs, 2 feature steps of 2 sub-tiles


def _y2(y1):
  r = jnp.maximum(y1, 0.0)
  return (r * r).astype(BF16)


def reg_a(interpret: bool, *, raw: bool = False, races: bool = True):
  """``out = Σ_steps relu(h @ w_inᵀ[:, step])² @ w_outᵀ[step]``, one warpgroup per 64
  tokens, each feature step as 2 sub-tiles: both ``y1`` wgmmas issued, then
  ``wgmma_wait(1)`` (all but the newest group done) before the first is read; the
  squared tile is the A operand of the second product, in registers
  (``compat.wgmma_a``; staged through shared memory when interpreting). ``raw``:
  ``plgpu.wgmma`` with the register operand directly, as the GPU takes it."""
  mg = _mg()
  t, r, f, ft = RA["T"], RA["R"], RA["F"], RA["FT"]
  sub = ft // 2

  def body(h_g, win_g, wout_g, o_g, h_s, o_s, bar, *stage):
    stage_s = stage[0] if stage else None
    rows = pl.ds(lax.axis_index("t") * BT, BT)
    bodies._copy_in(h_g.at[rows], h_s, bar.at[0])

    def second(acc_out, y1, woutT_s, j):
      if raw:
        mg.wgmma(acc_out, _y2(y1), woutT_s)
      else:
        mc.wgmma_a(acc_out, _y2(y1), woutT_s, None if stage_s is None else stage_s.at[j], interpret)

    def run(acc_out):
      def step(idx, winT_s, woutT_s):
        def both(a0, a1):
          mg.wgmma(a0, h_s, winT_s.at[:, pl.ds(0, sub)])
          mg.wgmma(a1, h_s, winT_s.at[:, pl.ds(sub, sub)])
          mg.wgmma_wait(1)  # a0's group is done; a1's may still run
          second(acc_out, mg.wgmma_accumulator_load(a0, wait_n=None), woutT_s.at[pl.ds(0, sub)], 0)
          mg.wgmma_wait(1)  # a1's group is done; the product just issued may still run
          second(acc_out, mg.wgmma_accumulator_load(a1, wait_n=None), woutT_s.at[pl.ds(sub, sub)], 1)
        pl.run_scoped(both, mg.ACC((BT, sub), F32), mg.ACC((BT, sub), F32))
        mg.wgmma_wait(0)  # the weight slots are refilled after this step

      mg.emit_pipeline(
          step, grid=(f // ft,), max_concurrent_steps=2,
          in_specs=[mg.BlockSpec((r, ft), lambda fi: (0, fi),
                                 transforms=mc.swizzle_transforms(BF16, ft)),
                    mg.BlockSpec((ft, r), lambda fi: (fi, 0),
                                 transforms=mc.swizzle_transforms(BF16, r))],
      )(win_g, wout_g)
      return acc_out[...]

    out = pl.run_scoped(run, mg.ACC((BT, r), F32))
    o_s[...] = out.astype(BF16)
    mg.commit_smem()
    mg.copy_smem_to_gmem(o_s, o_g.at[rows])
    mg.wait_smem_to_gmem(0)

  scratch = [mc.smem((BT, r), BF16), mc.smem((BT, r), BF16), mg.Barrier(num_barriers=1)]
  if interpret and not raw:  # the shim's staging tiles exist only when interpreting
    scratch.append(mc.smem((2, BT, sub), BF16))
  return mc.kernel(body, out_shape=jax.ShapeDtypeStruct((t, r), BF16), scratch=scratch,
                   grid=(t // BT,), grid_names=("t",), compiler_params=_warpgroup(),
                   interpret=interpret, detect_races=races)


def ra_inputs():
  # small integers (w_in 90% zeros): y1 and relu(y1)² exact in fp32, rounded to bf16 alike by
  # kernel and reference (an explicit fp32 -> bf16 cast), every later sum exact
  h = _ints(4, (RA["T"], RA["R"]), -1, 2)
  sparse = jax.random.uniform(jax.random.key(6), (RA["R"], RA["F"])) < 0.1
  win = _ints(5, (RA["R"], RA["F"]), -1, 2) * sparse
  wout = _ints(7, (RA["F"], RA["R"]), -1, 2)
  return h, win.astype(BF16), wout


def ra_reference(h, win, wout):
  return _mm(_y2(_mm(h, win)), wout).astype(BF16)


def test_interpreter_refuses_a_register_a_operand():
  # The refusal compat.wgmma_a works around (jax 0.11.2 and 0.12.0.1): the interpreter takes
  # the A operand for a shared-memory buffer key. When this fails, the shim can go.
  err = _interpret_fails(reg_a(True, raw=True), *ra_inputs())
  assert re.search(r"ValueError: Expected shape \(6,\) but got \(64, 64\)", err), err


def test_register_a_operand_through_the_shim_and_wgmma_wait_1():
  # (4) compat.wgmma_a (staged through shared memory when interpreting) and wgmma_wait(1)
  # with the second sub-tile's wgmma still in flight; exact.
  args = ra_inputs()
  got = reg_a(True)(*args)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(ra_reference(*args), np.float32))


# --------------------------------------------------------------------------
# 5: the element-wise 2:4 work on a wgmma accumulator sliced into 8 planes.
# --------------------------------------------------------------------------

PL = dict(T=128, R=64, SUB=64)  # one sub-tile of 64 features: 8 planes of P = 8


def planes24(interpret: bool, *, races: bool = True, meta16: bool = True):
  """``y1 = h @ w_inᵀ`` (wgmma, fp32 [64, 64]) sliced into its 8 column planes
  (``bodies._planes``); ReLU², 2:4 keep by comparisons (``bodies._keep_24``),
  compression (``common.compress_group`` / ``pack_meta``) and the per-row count of
  zeros and sum of ``y2``, as the forward kernel does them. Out: ``vals [T, 32]``
  (value planes a0 a1 b0 b1), ``meta`` in 16-byte rows (``compat.store_as``; not
  ``meta16``: 8-byte rows into the first half of ``meta [T, 16]``, as a feature
  step of 64 would store them), ``stats [2, T]``."""
  mg = _mg()
  t, r, sub = PL["T"], PL["R"], PL["SUB"]
  p = sub // 8
  meta_rows = BT * p // 16

  def body(h_g, win_g, vals_g, meta_g, stats_g, h_s, win_s, vals_s, meta_s, stats_s, bar):
    ti = lax.axis_index("t")
    rows = pl.ds(ti * BT, BT)
    mg.copy_gmem_to_smem(win_g, win_s, bar.at[1])
    bodies._copy_in(h_g.at[rows], h_s, bar.at[0])
    mg.barrier_wait(bar.at[1])
    y1 = bodies._dot_acc((BT, sub), lambda acc: mg.wgmma(acc, h_s, win_s))
    rp = bodies._planes(bodies._relu(y1, BF16), p)
    y2 = [x * x for x in rp]
    keep = bodies._keep_24(y2[:4]) + bodies._keep_24(y2[4:])
    a0, a1, nib_a = cm.compress_group(rp[:4], keep[:4])
    b0, b1, nib_b = cm.compress_group(rp[4:], keep[4:])
    vals_s[...] = jnp.concatenate([a0, a1, b0, b1], axis=1)
    if meta16:
      mc.store_as(meta_s, cm.pack_meta(nib_a, nib_b), interpret)
    else:
      meta_s[...] = cm.pack_meta(nib_a, nib_b)
    zero = jnp.zeros((), BF16)
    stats_s[0] = jnp.sum(sum(bodies._count(x == zero, F32) for x in y2), axis=1)
    stats_s[1] = jnp.sum(sum(x.astype(F32) for x in y2), axis=1)
    mg.commit_smem()
    mg.copy_smem_to_gmem(vals_s, vals_g.at[rows])
    mg.copy_smem_to_gmem(meta_s, meta_g.at[ti] if meta16 else meta_g.at[rows, pl.ds(0, p)])
    mg.copy_smem_to_gmem(stats_s, stats_g.at[:, rows])
    mg.wait_smem_to_gmem(0)

  out = (jax.ShapeDtypeStruct((t, sub // 2), BF16),
         jax.ShapeDtypeStruct((t // BT, meta_rows, 16) if meta16 else (t, 2 * p), jnp.uint8),
         jax.ShapeDtypeStruct((2, t), F32))
  scratch = [mc.smem((BT, r), BF16), mc.smem((r, sub), BF16), mc.smem((BT, sub // 2), BF16),
             mg.SMEM((meta_rows, 16) if meta16 else (BT, p), jnp.uint8), mg.SMEM((2, BT), F32),
             mg.Barrier(num_barriers=2)]
  return mc.kernel(body, out_shape=out, scratch=scratch, grid=(t // BT,), grid_names=("t",),
                   compiler_params=_warpgroup(), interpret=interpret, detect_races=races)


def pl_inputs():
  # w_in nonzero in 16 of its 64 rows: |y1| <= 16, so relu(y1)² <= 256 is exact in bf16 (the
  # interpreter keeps bf16 products in fp32, a GPU rounds them: exact values are the same in
  # both); many ties, which both sides break to the lower index
  h = _ints(8, (PL["T"], PL["R"]), -1, 2)
  win = _ints(9, (PL["R"], PL["SUB"]), -1, 2) * (jnp.arange(PL["R"]) < 16)[:, None]
  return h, win.astype(BF16)


def pl_reference(h, win):
  """The same from sparse24's rules, in feature order: sub-tile column ``j·P + c`` is
  feature ``8c + j``."""
  p = PL["SUB"] // 8
  y1 = _mm(h, win)
  y1_f = y1.reshape(-1, 8, p).transpose(0, 2, 1).reshape(y1.shape)  # feature order
  r = jnp.maximum(y1_f.astype(BF16), jnp.zeros((), BF16))
  y2 = r * r
  vals, meta = sparse24.compress_masked(r, sparse24.mask_24(y2))
  vals_planes = vals.reshape(-1, p, 4).transpose(0, 2, 1).reshape(vals.shape)  # a0 a1 b0 b1
  stats = jnp.stack([jnp.sum(y2 == 0, axis=1).astype(F32), jnp.sum(y2.astype(F32), axis=1)])
  return vals_planes, meta, stats


def test_2to4_selection_and_compression_on_accumulator_planes():
  # (5) the forward's element-wise 2:4 work on a wgmma accumulator (its helpers from
  # bodies.py / common.py), against sparse24's numpy-order rules: bytes equal.
  h, win = pl_inputs()
  vals, meta, stats = planes24(True)(h, win)
  want_vals, want_meta, want_stats = pl_reference(h, win)
  np.testing.assert_array_equal(np.asarray(vals, np.float32), np.asarray(want_vals, np.float32))
  np.testing.assert_array_equal(np.asarray(meta).reshape(want_meta.shape), np.asarray(want_meta))
  np.testing.assert_array_equal(np.asarray(stats), np.asarray(want_stats))


# --------------------------------------------------------------------------
# 6: persistent grid (nd_loop) over tiles in planar_snake order.
# --------------------------------------------------------------------------

SN = dict(M=192, N=128, K=64, TN=64, G=4)  # 3 x 2 = 6 tiles over 4 programs


def snake_matmul(interpret: bool, *, races: bool = True):
  """``out = a @ b`` over 64 x 64 tiles by a persistent grid of 4 programs
  (``plgpu.nd_loop(collective_axes="g")``, 6 tiles: uneven), each tile's (m, n) from
  ``plgpu.planar_snake``; registers -> shared memory -> TMA per tile, the buffer
  reused once the previous tile's store has read it."""
  mg = _mg()
  m, n, k, tn, g = SN["M"], SN["N"], SN["K"], SN["TN"], SN["G"]
  m_tiles, n_tiles = m // BT, n // tn

  def body(a_g, b_g, o_g, a_s, b_s, o_s, bar):
    @mg.nd_loop((m_tiles * n_tiles,), collective_axes="g")
    def _(info):
      (lin,) = info.index
      mi, ni = mg.planar_snake(lin, (m_tiles, n_tiles), 1, 2)
      mg.copy_gmem_to_smem(a_g.at[pl.ds(mi * BT, BT)], a_s, bar.at[0])
      mg.copy_gmem_to_smem(b_g.at[:, pl.ds(ni * tn, tn)], b_s, bar.at[0])
      mg.barrier_wait(bar.at[0])
      out = bodies._dot_acc((BT, tn), lambda acc: mg.wgmma(acc, a_s, b_s))
      mg.wait_smem_to_gmem(0, wait_read_only=True)  # o_s is free again
      o_s[...] = out.astype(BF16)
      mg.commit_smem()
      mg.copy_smem_to_gmem(o_s, o_g.at[pl.ds(mi * BT, BT), pl.ds(ni * tn, tn)])
    mg.wait_smem_to_gmem(0)

  scratch = [mc.smem((BT, k), BF16), mc.smem((k, tn), BF16), mc.smem((BT, tn), BF16),
             mg.Barrier(num_arrivals=2, num_barriers=1)]
  return mc.kernel(body, out_shape=jax.ShapeDtypeStruct((m, n), BF16), scratch=scratch,
                   grid=(g,), grid_names=("g",), compiler_params=_warpgroup(),
                   interpret=interpret, detect_races=races)


def test_persistent_grid_in_planar_snake_order():
  # (6) every tile written once and right by 4 programs looping over 6 tiles
  a, b = _ints(10, (SN["M"], SN["K"])), _ints(11, (SN["K"], SN["N"]))
  np.testing.assert_array_equal(np.asarray(snake_matmul(True)(a, b), np.float32),
                                np.asarray(_mm(a, b).astype(BF16), np.float32))


# --------------------------------------------------------------------------
# 8: TMA reduce-add of split-K partial sums, and its shim.
# --------------------------------------------------------------------------

RD = dict(M=128, N=64, K=256, S=2, TK=64)  # 2 row tiles x 2 splits of 2 k-steps


def split_k(interpret: bool, *, raw: bool = False, races: bool = True):
  """``out = a @ b`` (fp32) with K split over ``S`` programs per row tile, each adding
  its partial sum into ``out`` by TMA reduce-add (``compat.copy_smem_to_gmem_add``:
  per-split slabs summed in XLA when interpreting). ``raw``:
  ``copy_smem_to_gmem(reduction_op="add")`` directly, as the GPU takes it."""
  mg = _mg()
  m, n, k, splits, tk = RD["M"], RD["N"], RD["K"], RD["S"], RD["TK"]
  k_steps = k // splits // tk
  slabs = interpret and not raw

  def body(a_g, b_g, o_g, o_s):
    mi, si = lax.axis_index("m"), lax.axis_index("s")
    rows = pl.ds(mi * BT, BT)

    def run(acc):
      def step(idx, a_s, b_s):
        mg.wgmma(acc, a_s, b_s)
        mg.wgmma_wait(0)
      mg.emit_pipeline(
          step, grid=(k_steps,), max_concurrent_steps=2,
          in_specs=[mg.BlockSpec((BT, tk), lambda ki: (mi, si * k_steps + ki),
                                 transforms=mc.swizzle_transforms(BF16, tk)),
                    mg.BlockSpec((tk, n), lambda ki: (si * k_steps + ki, 0),
                                 transforms=mc.swizzle_transforms(BF16, n))])(a_g, b_g)
      return acc[...]

    o_s[...] = pl.run_scoped(run, mg.ACC((BT, n), F32))
    mg.commit_smem()
    if raw:
      mg.copy_smem_to_gmem(o_s, o_g.at[rows], reduction_op="add")
    else:
      mc.copy_smem_to_gmem_add(o_s, o_g, (rows,), si, slabs)
    mg.wait_smem_to_gmem(0)

  def f(a, b):
    out = mc.reduce_add_zeros((m, n), F32, splits, slabs)
    mc.kernel(body, out_shape=(), scratch=[mc.smem((BT, n), F32)], grid=(m // BT, splits),
              grid_names=("m", "s"), compiler_params=_warpgroup(), interpret=interpret,
              detect_races=races)(a, b, out)
    return mc.reduce_add_total(out, slabs)
  return f


def rd_inputs():
  return _ints(12, (RD["M"], RD["K"])), _ints(13, (RD["K"], RD["N"]))


def test_interpreter_refuses_tma_reduce_add():
  # The refusal compat.copy_smem_to_gmem_add works around (jax 0.12.0.1). When this
  # fails, the slabs can go.
  err = _interpret_fails(split_k(True, raw=True), *rd_inputs())
  assert "NotImplementedError: reduction_op not supported" in err, err


def test_split_k_partial_sums_through_the_reduce_add_shim():
  # (8) the shim's per-split slabs summed with jnp: exact (integer inputs)
  a, b = rd_inputs()
  np.testing.assert_array_equal(np.asarray(split_k(True)(a, b)), np.asarray(_mm(a, b)))


# --------------------------------------------------------------------------
# 9: registers -> shared memory -> TMA store, with commit_smem().
# --------------------------------------------------------------------------

ST = dict(T=128, R=64, N=64)


def store_tile(interpret: bool, *, races: bool = True, bug: str | None = None):
  """``out = bf16(h @ w)`` per 64 tokens: the accumulator through registers into a
  swizzled shared-memory tile, ``commit_smem()`` (the proxy fence), TMA store.
  ``bug``: ``"no_commit"`` (no fence), ``"overwrite"`` (the tile rewritten before
  ``wait_smem_to_gmem``: the TMA engine may still be reading it), ``"subslice"``
  (stored in two column halves, finer than the swizzled tile's tiling)."""
  mg = _mg()
  t, r, n = ST["T"], ST["R"], ST["N"]

  def body(h_g, w_g, o_g, h_s, w_s, o_s, bar):
    rows = pl.ds(lax.axis_index("t") * BT, BT)
    mg.copy_gmem_to_smem(h_g.at[rows], h_s, bar.at[0])
    mg.copy_gmem_to_smem(w_g, w_s, bar.at[0])
    mg.barrier_wait(bar.at[0])
    y = bodies._dot_acc((BT, n), lambda acc: mg.wgmma(acc, h_s, w_s)).astype(BF16)
    if bug == "subslice":  # two 32-column halves of the 64-column (128-byte swizzled) tile
      o_s[:, :32] = y[:, :32]
      o_s[:, 32:] = y[:, 32:]
    else:
      o_s[...] = y
    if bug != "no_commit":
      mg.commit_smem()
    mg.copy_smem_to_gmem(o_s, o_g.at[rows])
    if bug == "overwrite":
      o_s[...] = jnp.zeros_like(y)
    mg.wait_smem_to_gmem(0)

  scratch = [mc.smem((BT, r), BF16), mc.smem((r, n), BF16), mc.smem((BT, n), BF16),
             mg.Barrier(num_arrivals=2, num_barriers=1)]
  return mc.kernel(body, out_shape=jax.ShapeDtypeStruct((t, n), BF16), scratch=scratch,
                   grid=(t // BT,), grid_names=("t",), compiler_params=_warpgroup(),
                   interpret=interpret, detect_races=races)


def st_inputs():
  return _ints(14, (ST["T"], ST["R"])), _ints(15, (ST["R"], ST["N"]))


def test_registers_to_shared_memory_to_tma_store():
  h, w = st_inputs()
  np.testing.assert_array_equal(np.asarray(store_tile(True)(h, w), np.float32),
                                np.asarray(_mm(h, w).astype(BF16), np.float32))


@pytest.mark.parametrize("bug", ["no_commit", "overwrite"])
def test_race_detector_catches_a_broken_tma_store(bug):
  err = _interpret_fails(store_tile(True, bug=bug), *st_inputs())
  assert "RACE DETECTED" in err, err


# --------------------------------------------------------------------------
# 10: shared memory reused across lifetimes (plgpu.RefUnion): the output staged where
# its input was, as the warp-specialized forward and dh stage theirs (plan.Scratch.alias).
# --------------------------------------------------------------------------


def union_store(interpret: bool, *, races: bool = True, bug: str | None = None,
                union: bool = True):
  """``out = bf16(h @ w)`` per 64 tokens with the output tile in a ``RefUnion`` with
  ``h``'s: written once the product (which read ``h``) is done, then stored by TMA.
  ``bug``: ``"reread"`` (``h`` read again, through its member, after the output was
  written through the other: the union's contract broken). ``union=False``: the same
  kernel with the two tiles apart (the baseline of the compiled test)."""
  mg = _mg()
  t, r, n = ST["T"], ST["R"], ST["N"]

  def body(h_g, w_g, o_g, *scr):
    if union:
      (h_s, o_s), w_s, bar = scr
    else:
      h_s, o_s, w_s, bar = scr
    rows = pl.ds(lax.axis_index("t") * BT, BT)
    mg.copy_gmem_to_smem(h_g.at[rows], h_s, bar.at[0])
    mg.copy_gmem_to_smem(w_g, w_s, bar.at[0])
    mg.barrier_wait(bar.at[0])
    y = bodies._dot_acc((BT, n), lambda acc: mg.wgmma(acc, h_s, w_s))  # waits for it
    o_s[...] = y.astype(BF16)
    if bug == "reread":  # h's tile read after the output overwrote it (r == n here)
      o_s[...] = mc.load(h_s)
    mg.commit_smem()
    mg.copy_smem_to_gmem(o_s, o_g.at[rows])
    mg.wait_smem_to_gmem(0)

  tiles = [mc.smem((BT, r), BF16), mc.smem((BT, n), BF16)]
  scratch = ([mg.RefUnion(*tiles)] if union else tiles) + [
      mc.smem((r, n), BF16), mg.Barrier(num_arrivals=2, num_barriers=1)]
  return mc.kernel(body, out_shape=jax.ShapeDtypeStruct((t, n), BF16), scratch=scratch,
                   grid=(t // BT,), grid_names=("t",), compiler_params=_warpgroup(),
                   interpret=interpret, detect_races=races)


def test_output_staged_where_its_input_was():
  h, w = st_inputs()
  np.testing.assert_array_equal(np.asarray(union_store(True)(h, w), np.float32),
                                np.asarray(_mm(h, w).astype(BF16), np.float32))


def test_race_detector_catches_a_broken_ref_union():
  err = _interpret_fails(union_store(True, bug="reread"), *st_inputs())
  # the detector's RefUnion check: a member read after the other member overwrote it
  assert "which was last written through alias group" in err, err


# --------------------------------------------------------------------------
# The same probes compiled deviceless for the H200 (marker gpu_compile).
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def h200():
  from tests.helpers import require_deviceless

  require_deviceless()


def _shapes(args) -> list[jax.ShapeDtypeStruct]:
  return [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]


@dataclasses.dataclass
class Compiled:
  """One Mosaic GPU kernel as Mosaic built it: ``ptxas -v`` resources, PTX, ptxas log."""
  registers: int
  spill_bytes: int
  smem_bytes: int
  ptx: str
  ptxas: str


def _compile(fn, *args) -> Compiled:
  """``fn(*args)`` compiled for the H200 (``targets.compile_for_target``); its one
  Mosaic kernel from Mosaic's dump (written only when this process builds the kernel
  the first time: every probe here is a distinct kernel)."""
  from elas_jax import targets
  from elas_jax.targets.compile import mosaic_resources

  report = targets.compile_for_target(fn, *_shapes(args), target="h200", keep_dump=True)
  try:
    assert report.compiled, report.reason
    dump = os.path.join(report.dump_dir, "mosaic_gpu")
    text = {ext: "".join(pathlib.Path(f).read_text(errors="replace")
                         for f in sorted(glob.glob(os.path.join(dump, f"*.{ext}"))))
            for ext in ("ptx", "ptxas")}
    resources = mosaic_resources(dump)
  finally:
    shutil.rmtree(report.dump_dir, ignore_errors=True)
  assert text["ptx"], "no PTX dumped: Mosaic reused a kernel this process compiled before"
  (r,) = resources.values()
  return Compiled(r["registers"], r["spill_bytes"], r["smem_bytes"], text["ptx"], text["ptxas"])


def _refusal(fn, *args) -> str:
  """The compiler's reason for refusing ``fn(*args)`` for the H200."""
  from elas_jax import targets

  report = targets.compile_for_target(fn, *_shapes(args), target="h200")
  assert not report.compiled, "compiled, expected a refusal"
  return report.reason


def _matches(pattern: str, text: str) -> int:
  return len(re.findall(pattern, text))


TMA_LOAD = r"cp\.async\.bulk\.tensor\.\dd\.shared::(?:cta|cluster)\.global"
TMA_STORE = r"cp\.async\.bulk\.tensor\.\dd\.global\.shared::cta"
WGMMA_REG_A = r"wgmma\.mma_async[^;]*\}\s*,\s*\{"  # {accumulator}, {A registers}, B descriptor


@pytest.mark.gpu_compile
@pytest.mark.parametrize("variant", ["pingpong", "cluster"])
def test_compiled_warp_specialized_pipeline(h200, variant):
  k = _compile(ws_stats(False, pingpong=True, cluster=variant == "cluster"),
               *ws_inputs(dict(WS, T=512)))
  assert k.spill_bytes == 0, k
  assert _matches(r"setmaxnreg\.dec\.sync\.aligned\.u32 40;", k.ptx) == 1  # memory_registers=40
  assert _matches(r"setmaxnreg\.inc\.sync\.aligned\.u32 \d+;", k.ptx) == 1  # the consumers'
  assert _matches(r"wgmma\.mma_async", k.ptx) and _matches(TMA_LOAD, k.ptx)
  assert _matches(r"mbarrier\.try_wait", k.ptx)  # pipeline, ping-pong and TMA barriers
  multicast = _matches(r"cp\.async\.bulk\.tensor[^;]*multicast::cluster", k.ptx)
  if variant == "cluster":
    assert multicast and _matches(r"barrier\.cluster\.wait", k.ptx), k.ptx[:2000]
  else:
    assert multicast == 0


@pytest.mark.gpu_compile
def test_ptxas_ignores_set_max_registers_in_mosaics_build(h200):
  # Today's finding (jax[cuda12] 0.12.0.1): the PTX carries setmaxnreg, but ptxas, compiling
  # Mosaic's module relocatably, drops it (C7504) and allocates the same registers for every
  # warpgroup: a 384-thread CTA caps them all at 168. When this fails, setmaxnreg works:
  # revisit the consumers' register budget (docs/kernels.md).
  a, b = hw_inputs()
  with_ = _compile(hand_ws_matmul(False, setmax=True), a, b)
  without = _compile(hand_ws_matmul(False, setmax=False), a, b)
  assert "setmaxnreg.dec.sync.aligned.u32 40;" in with_.ptx
  assert "setmaxnreg.inc.sync.aligned.u32 232;" in with_.ptx
  assert "setmaxnreg" not in without.ptx
  assert "(C7504) Potential Performance Loss: 'setmaxnreg' ignored" in with_.ptxas, with_.ptxas
  assert "C7504" not in without.ptxas
  assert with_.registers == without.registers and with_.spill_bytes == without.spill_bytes == 0


@pytest.mark.gpu_compile
def test_compiled_register_a_operand_and_wgmma_wait_1(h200):
  # compat.wgmma_a passes registers when compiling: the A operand of the second product is
  # a register list in the PTX, and the reads wait for all but the newest group.
  k = _compile(reg_a(False), *ra_inputs())
  assert k.spill_bytes == 0, k
  assert _matches(WGMMA_REG_A, k.ptx) > 0
  assert _matches(r"wgmma\.wait_group\.sync\.aligned 1;", k.ptx) == 2


@pytest.mark.gpu_compile
def test_compiled_2to4_planes(h200):
  k = _compile(planes24(False), *pl_inputs())
  assert k.spill_bytes == 0, k
  assert _matches(r"wgmma\.mma_async", k.ptx)
  # vals by TMA (tensor), meta's 16-byte rows by a plain bulk copy or TMA
  assert _matches(r"cp\.async\.bulk\.(?:tensor\.\dd\.)?global\.shared::cta", k.ptx) == 3


@pytest.mark.gpu_compile
def test_compiled_ref_union_shares_shared_memory(h200):
  # One allocation for the two members: the union probe takes the 8 KiB of one [64, 64]
  # bf16 tile less than the same kernel with separate tiles.
  union = _compile(union_store(False), *st_inputs())
  separate = _compile(union_store(False, union=False), *st_inputs())
  assert union.spill_bytes == 0 and _matches(TMA_STORE, union.ptx) == 1
  assert separate.smem_bytes - union.smem_bytes == BT * ST["N"] * 2, (union, separate)


@pytest.mark.gpu_compile
def test_compiled_persistent_snake_grid(h200):
  k = _compile(snake_matmul(False), _ints(10, (SN["M"], SN["K"])), _ints(11, (SN["K"], SN["N"])))
  assert k.spill_bytes == 0, k
  assert _matches(TMA_STORE, k.ptx) and _matches(r"fence\.proxy\.async", k.ptx)


@pytest.mark.gpu_compile
def test_compiled_tma_reduce_add(h200):
  # The compiled path of compat.copy_smem_to_gmem_add: TMA reduce-add into one buffer.
  k = _compile(split_k(False), *rd_inputs())
  assert k.spill_bytes == 0, k
  assert _matches(r"cp\.reduce\.async\.bulk\.tensor[^;]*\.add", k.ptx) == 1
  assert _matches(TMA_STORE, k.ptx) == 0


@pytest.mark.gpu_compile
@pytest.mark.parametrize("commit", [True, False], ids=["commit", "no_commit"])
def test_compiled_tma_store_and_its_fence(h200, commit):
  # With commit_smem() the store is fenced (fence.proxy.async). Without it the compiler
  # accepts the program silently: the race detector (above) is what catches it.
  k = _compile(store_tile(False, bug=None if commit else "no_commit"), *st_inputs())
  assert k.spill_bytes == 0, k
  assert _matches(TMA_STORE, k.ptx) == 1
  assert (_matches(r"fence\.proxy\.async", k.ptx) > 0) == commit


@pytest.mark.gpu_compile
@pytest.mark.parametrize("case", ["smem", "tma_row", "subslice"])
def test_the_compiler_refuses_what_the_interpreter_runs(h200, case):
  # The interpreter accepts, and computes right, programs the compiler refuses: CPU tests
  # need the compile gate beside them. Shared memory above the H200's 227 KiB (2 stages of
  # 256 x 256 weights), TMA rows under 16 bytes (8 bytes of 2:4 metadata per row), and a
  # store finer than a swizzled tile's tiling.
  if case == "smem":
    shape = dict(T=256, R=256, F=512, FT=256)
    fn, args = (lambda i: ws_stats(i, shape=shape)), ws_inputs(shape)
    reason = r"exceeds available shared memory: smem_bytes=\d+ > max_smem_bytes=232448"
  elif case == "tma_row":
    fn, args = (lambda i: planes24(i, meta16=False)), pl_inputs()
    reason = r"bits copied along the last dimension to be divisible by 128, but got 64"
  else:
    fn, args = (lambda i: store_tile(i, bug="subslice")), st_inputs()
    reason = r"slice start \(0\) and slice size \(32\) to be divisible by the tile size \(64\)"
  got = fn(True)(*args)
  if case == "smem":
    _check_stats(got, ws_reference(*args))
  elif case == "tma_row":
    np.testing.assert_array_equal(np.asarray(got[1])[:, :8], np.asarray(pl_reference(*args)[1]))
  else:
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(_mm(*args).astype(BF16), np.float32))
  refused = _refusal(fn(False), *args)
  assert re.search(reason, refused), refused
