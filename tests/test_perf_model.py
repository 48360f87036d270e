"""The static kernel model (``elas_kernels.perf_model``): its reading of PTX against
hand-counted programs, its time against hand-worked cases, and (``gpu_compile``) its
reading of real compiled kernels against the work they are known to do."""

import dataclasses
import math

import pytest

from elas_kernels import perf_model as pm
from elas_kernels.gpu import H200

# One warpgroup, one loop of 8 steps: 2 wgmma m64n64k16 (bf16), a wait for all of them,
# 3 SIMT instructions and an ex2; TMA bytes announced by every thread (64 each).
# Mosaic's layout: the inline assembly's braces, a wgmma spanning lines, directives.
SERIAL = """
.visible .entry k(
)
.maxntid 128, 1, 1
{
	.reg .b32 	%r<20>;
$L__func_begin0:
	mov.b32 	%r1, 0;
	mov.b32 	%r9, 64;
$L__BB0_1:
	.loc	1 0 6
	// begin inline asm
	mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%r2], %r9;
	// end inline asm
	// begin inline asm
	{ .reg .pred p; setp.ne.b32 p, 1, 0; wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r3,%r4,
	%r5,%r6}, %rd1, %rd2, p, 1, 1, 0, 1; }
	// end inline asm
	{
	.reg .pred p;
	setp.ne.b32 p, 1, 0;
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16
	{%r3,%r4,%r5,%r6}, %rd1, %rd2, p, 1, 1, 0, 1;
	}
	wgmma.commit_group.sync.aligned;
	wgmma.wait_group.sync.aligned 0;
	max.f32 	%r7, %r3, 0f00000000;
	mul.f32 	%r8, %r7, %r7;
	ex2.approx.f32 	%r10, %r8;
	add.s32 	%r1, %r1, 1;
	setp.ne.b32 	%p1, %r1, 8;
	@%p1 bra 	$L__BB0_1;
	ret;
$L__func_end0:
}
"""
MMA_FLOPS = 2 * 64 * 64 * 16


def test_reads_a_serial_loop():
  p = pm.profile_ptx(SERIAL)
  assert p.threads == 128 and p.consumers == 1 and p.producers == 0
  assert p.loops[0][1] == 8
  c = p.consumer
  assert c.wgmma_flops == 8 * 2 * MMA_FLOPS
  assert c.wgmma_cycles == 8 * 2 * 32  # n/2 cycles per m64nNk16 at 4096 FLOP/cycle
  assert c.waits == 8 and not c.overlapped
  assert c.mufu == 8
  # per step: expect_tx, commit, wait, max, mul, add, setp, bra = 8; outside: 2 mov, ret
  assert c.simt == 8 * 8 + 3
  assert c.tma_bytes == 8 * 64 * 128  # each of the warpgroup's 128 threads announces 64 bytes


# A 64-bit counter stepping by 128 up to 512 (4 trips), read through a cvt (the 1B kernels'
# inner loop), nested in an 8-trip loop.
NESTED = """
.entry k(
)
.maxntid 128, 1, 1
{
	mov.b32 	%r1, 0;
$L__BB0_1:
	mov.b64 	%rd5, 0;
$L__BB0_2:
	wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r3}, %rd1, %rd2, p, 1, 1, 0, 1;
	add.s64 	%rd5, %rd5, 128;
	cvt.u32.u64 	%r30, %rd5;
	setp.ne.b32 	%p2, %r30, 512;
	@%p2 bra 	$L__BB0_2;
	add.s32 	%r1, %r1, 1;
	setp.eq.b32 	%p1, %r1, 8;
	@!%p1 bra 	$L__BB0_1;
	ret;
}
"""


def test_reads_nested_loops_and_strided_counters():
  p = pm.profile_ptx(NESTED)
  assert sorted(t for _, t in p.loops) == [4, 8]
  assert p.consumer.wgmma_flops == 8 * 4 * 2 * 64 * 128 * 16


def test_finds_the_main_loop_with_its_nested_trips():
  # NESTED: both loops hold the one wgmma; the smaller (the inner one) is the main loop
  inner = pm.ptx_main_loop(NESTED)
  assert (inner.nested_trips, inner.wgmma) == ((), 1)
  # label, wgmma, add, cvt, setp, bra
  assert inner.statements == 6
  # a second wgmma in the outer loop's own code: the outer loop is the main one, its trip
  # is its own 6 statements (label, mov, wgmma, add, setp, bra) and 4 of the inner loop's
  two = NESTED.replace("\tadd.s32 \t%r1", "\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16"
                       " {%r3}, %rd1, %rd2, p, 1, 1, 0, 1;\n\tadd.s32 \t%r1")
  outer = pm.ptx_main_loop(two)
  assert (outer.nested_trips, outer.wgmma) == ((4,), 2)
  assert outer.statements == 6 + 4 * 6
  assert pm.ptx_main_loop(SERIAL.replace("wgmma.mma_async", "mma.sync")) is None


# A 2-trip loop as LLVM rewrites it (rank 256 = 2 chunks of 128 at 130M): a flag, true
# before the loop, copied at the top and cleared in the body; the branch tests the copy.
# And a producer loop that counts down by 2 and leaves from its middle.
FLAGS = """
.entry k(
)
.maxntid 128, 1, 1
{
	mov.pred 	%p272, -1;
	mov.b32 	%r465, 30;
$L__BB0_2:
	mov.pred 	%p2, %p272;
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r3}, %rd1, %rd2, p, 1, 1, 0, 1;
	mov.pred 	%p272, 0;
	@%p2 bra 	$L__BB0_2;
$L__BB0_3:
	setp.eq.b32 	%p270, %r465, 0;
	@%p270 bra 	$L__BB0_4;
	wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r3}, %rd1, %rd2, p, 1, 1, 0, 1;
	add.s32 	%r465, %r465, -2;
	bra.uni 	$L__BB0_3;
$L__BB0_4:
	ret;
}
"""


def test_reads_flag_loops_and_down_counters_leaving_mid_body():
  p = pm.profile_ptx(FLAGS)
  assert sorted(t for _, t in p.loops) == [2, 15]
  assert p.consumer.wgmma_flops == 2 * 2 * 64 * 64 * 16 + 15 * 2 * 64 * 128 * 16


# Warp-specialized: warpgroup 2 produces (setmaxnreg.dec), the others consume; the
# persistent work loop is bounded by a register (runtime_trips); the producer's loop
# runs from 4 by 2 to 20 (8 trips) with two loads per trip.
SPECIALIZED = """
.entry k(
)
.maxntid 384, 1, 1
{
	mov.b32 	%r9, 128;
	bra.uni 	$L__BB0_1;
$L__BB0_7:
	st.shared.b32 	[%r1], %r2;
$L__BB0_8:
	add.s32 	%r50, %r50, 1;
	setp.ne.b32 	%p17, %r50, %r3;
	@!%p17 bra 	$L__BB0_9;
$L__BB0_1:
	setp.ne.b32 	%p11, %r53, 2;
	@%p11 bra 	$L__BB0_5;
	setmaxnreg.dec.sync.aligned.u32 40;
	mov.b32 	%r60, 4;
$L__BB0_3:
	mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%r1], %r9;
	@%p13 cp.async.bulk.tensor.4d.shared::cta.global.mbarrier::complete_tx::bytes [%r1], [%rd1, {%r2,%r2,%r2,%r2} ], [%r1];
	mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%r1], %r9;
	@%p13 cp.async.bulk.tensor.4d.shared::cta.global.mbarrier::complete_tx::bytes [%r1], [%rd1, {%r2,%r2,%r2,%r2} ], [%r1];
	add.s32 	%r60, %r60, 2;
	setp.ne.b32 	%p16, %r60, 20;
	@%p16 bra 	$L__BB0_3;
	bra.uni 	$L__BB0_8;
$L__BB0_5:
	setmaxnreg.inc.sync.aligned.u32 232;
	mov.b32 	%r70, 0;
$L__BB0_6:
	wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%r3}, %rd1, %rd2, p, 1, 1, 0, 1;
	wgmma.commit_group.sync.aligned;
	wgmma.wait_group.sync.aligned 1;
	add.s32 	%r70, %r70, 1;
	setp.ne.b32 	%p12, %r70, 16;
	@%p12 bra 	$L__BB0_6;
	bra.uni 	$L__BB0_7;
$L__BB0_9:
	ret;
}
"""


def test_reads_warp_specialized_roles():
  p = pm.profile_ptx(SPECIALIZED, runtime_trips=3)
  assert (p.consumers, p.producers) == (2, 1)
  assert sorted((t is None, t) for _, t in p.loops)[:2] == [(False, 8), (False, 16)]
  c, q = p.consumer, p.producer
  assert c.wgmma_flops == 3 * 16 * 2 * 64 * 128 * 16  # the work loop's 3 trips x 16 steps
  assert c.overlapped and c.waits == 0  # wait_group 1: a wgmma stays in flight
  assert q.wgmma_flops == 0 and c.tma_bytes == 0
  assert q.tma_bytes == 3 * 8 * 2 * 128 * 128  # 3 x 8 trips x 2 loads x 128 threads x 128 B
  # the consumer's code: setmaxnreg, mov, 16 x (commit, wait, add, setp, bra), bra, st.shared
  # per work item; the shared latch and head (add, setp, bra, setp, bra) run in both roles
  assert c.simt == 3 * (2 + 16 * 5 + 2 + 5) + 3  # + mov, bra.uni before the loop, ret
  assert q.simt == 3 * (2 + 8 * 7 + 1 + 5) + 3


# Two consumers doing different work, as Mosaic emits a branch on lax.axis_index("wg"):
# the warpgroup index is %tid.x >> 7 broadcast by shfl.sync.idx; consumer 0 runs 2 wgmma
# m64n64k16 and 3 SIMT instructions per trip, consumer 1 one wgmma and 7 SIMT; 4 trips.
BRANCHED = """
.entry k(
)
.maxntid 384, 1, 1
{
	mov.u32 	%r1, %tid.x;
	shr.u32 	%r5, %r1, 7;
	shfl.sync.idx.b32 	%r6, %r5, 0, 31, -1;
	setp.ne.b32 	%p10, %r6, 2;
	@%p10 bra 	$L__BB0_4;
	setmaxnreg.dec.sync.aligned.u32 40;
	bra.uni 	$L__BB0_11;
$L__BB0_4:
	setmaxnreg.inc.sync.aligned.u32 232;
	mov.b32 	%r70, 0;
$L__BB0_5:
	setp.ne.b32 	%p11, %r6, 0;
	@%p11 bra 	$L__BB0_7;
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r3}, %rd1, %rd2, p, 1, 1, 0, 1;
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r3}, %rd1, %rd2, p, 1, 1, 0, 1;
	add.f32 	%r7, %r3, %r3;
	add.f32 	%r7, %r3, %r3;
	add.f32 	%r7, %r3, %r3;
$L__BB0_7:
	setp.ne.b32 	%p76, %r6, 1;
	@%p76 bra 	$L__BB0_9;
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r3}, %rd1, %rd2, p, 1, 1, 0, 1;
	mul.f32 	%r8, %r3, %r3;
	mul.f32 	%r8, %r3, %r3;
	mul.f32 	%r8, %r3, %r3;
	mul.f32 	%r8, %r3, %r3;
	mul.f32 	%r8, %r3, %r3;
	mul.f32 	%r8, %r3, %r3;
	mul.f32 	%r8, %r3, %r3;
$L__BB0_9:
	wgmma.wait_group.sync.aligned 0;
	add.s32 	%r70, %r70, 1;
	setp.ne.b32 	%p12, %r70, 4;
	@%p12 bra 	$L__BB0_5;
$L__BB0_11:
	ret;
}
"""


def test_reads_consumers_that_branch_on_their_index():
  p = pm.profile_ptx(BRANCHED)
  assert (p.consumers, p.producers) == (2, 1)
  c0, c1 = p.consumer_roles
  assert c0.wgmma_flops == 4 * 2 * MMA_FLOPS and c1.wgmma_flops == 4 * MMA_FLOPS
  # shared per trip: setp, bra (twice: each consumer tests both indices), wait, add, setp,
  # bra; once: the 5 statements before the role split, setmaxnreg, mov and ret
  shared = 4 * 8 + 8
  assert c0.simt == shared + 4 * 3 and c1.simt == shared + 4 * 7
  assert p.consumer.wgmma_flops == (c0.wgmma_flops + c1.wgmma_flops) / 2  # what the SM's tensor cores see
  assert p.wgmma_flops == 4 * 3 * MMA_FLOPS
  prm = pm.Params(tc_efficiency=1.0, wait_latency=0, cpi=1, mufu_cycles=1, overhead_s=0,
                  l2_bytes_per_s=1e30, hbm_bytes_per_s=1e30, ordered_chain=False)
  e = pm.estimate(p, programs=H200.sm_count, programs_per_sm=1, hbm_bytes=0, params=prm)
  # the closed form: one consumer's wgmma + SIMT in series (its own, not both bodies)
  chains = [r.wgmma_cycles + r.simt for r in (c0, c1)]
  assert math.isclose(e.terms_s["chain"] * pm.clock_hz(H200), max(chains), rel_tol=1e-12)
  prm = dataclasses.replace(prm, ordered_chain=True)
  e = pm.estimate(p, programs=H200.sm_count, programs_per_sm=1, hbm_bytes=0, params=prm)
  # in program order: one consumer's chain, its own code in order (not the two bodies together). Per trip,
  # consumer 0: setp, bra, 2 wgmma (64 cycles) under which its 3 adds and the other
  # guard's setp, bra run, the wait for them, add, setp, bra: 2 + 64 + 1 + 3 = 70;
  # consumer 1: 2 guards' setp, bra, 1 wgmma (32) under its 7 muls, wait, add, setp, bra:
  # 4 + 32 + 1 + 3 = 40; once, 8 (5 before the split, setmaxnreg, mov, ret).
  assert math.isclose(e.terms_s["chain"] * pm.clock_hz(H200), 8 + 4 * 70, rel_tol=1e-12)
  assert math.isclose(pm.chain_cycles(c1.program, prm), 8 + 4 * 40, rel_tol=1e-12)
  # the SIMT after the wgmma not overlapped (were it all serial: 8 + 4 * (64 + 13))
  assert 8 + 4 * 70 < c0.wgmma_cycles + c0.simt


def test_chain_plays_waits_in_program_order():
  prm = pm.Params(tc_efficiency=0.5, wait_latency=10, cpi=2, mufu_cycles=3, overhead_s=0,
                  ordered_chain=True)
  # SERIAL: its 3 SIMT instructions and ex2 follow the wait: only the commit runs under the
  # wgmma, so the chain is the totals in series (the closed form) less 8 commits
  c = pm.profile_ptx(SERIAL).consumer
  serial = c.wgmma_cycles / 0.5 + c.simt * 2 + c.mufu * 3 + c.waits * 10
  assert math.isclose(pm.chain_cycles(c.program, prm), serial - 8 * 2, rel_tol=1e-12)
  # by hand: 100 cycles of wgmma (200 at half efficiency), then 30 instructions (60
  # cycles) under it, then the wait: 200 + 10 (the wait's latency) + 2 (the wait itself,
  # an instruction); twice in a loop
  step = (("mma", 100.0), ("commit",), ("simt", 30, 0), ("wait", 0), ("simt", 1, 0))
  assert pm.chain_cycles((("loop", 2, step),), prm) == 2 * (200 + 10 + 2)
  # more SIMT than wgmma: the SIMT bounds it (120 + 2 instructions, 10 latency)
  step = (("mma", 50.0), ("commit",), ("simt", 60, 0), ("wait", 0), ("simt", 1, 0))
  assert pm.chain_cycles((("loop", 2, step),), prm) == 2 * (120 + 10 + 2)
  # wait_group 1 keeps the newest group in flight: each step's 200-cycle wgmma runs under
  # the next step's 50 SIMT cycles (1 loop of 4): the tensor cores bound it, and the
  # kernel's end waits for the last one
  step = (("simt", 25, 0), ("mma", 100.0), ("commit",), ("wait", 1))
  assert pm.chain_cycles((("loop", 4, step),), prm) == 50 + 4 * 200
  # a wait only for groups older than the newest n: the newer one keeps running
  prog = (("mma", 100.0), ("commit",), ("mma", 100.0), ("commit",), ("wait", 1))
  assert pm.chain_cycles(prog, prm) == 400  # the end waits for the second (200 + 200)
  assert pm.chain_cycles(prog + (("simt", 50, 0),), prm) == 400  # 100 cycles under it


# nvdisasm's listing with control codes (wait mask : read : write : yield : stall), as
# Mosaic dumps it (.sass_ctrl): a main loop of 2 HGMMA, 4 other instructions and a nested
# 2-instruction loop; a try-wait retry block after the code that branches back into it.
SASS = """
.text.k:
   -:-:1:Y:01        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_3:
   -:-:-:Y:02        /*0010*/                   PRMT R2, R3, 0x5410, R4 ;
.L_x_4:
   -:-:-:Y:01        /*0020*/                   UIADD3 UR4, UR4, 0x1, URZ ;
   -:-:-:Y:05        /*0030*/               @P2 BRA `(.L_x_4) ;
   -:-:-:Y:01        /*0040*/                   HGMMA.64x64x16.F32.BF16 R88, gdesc[UR16], R88 ;
   -:-:-:Y:04        /*0050*/                   HGMMA.64x64x16.F32.BF16 R88, gdesc[UR16], R88 ;
   -:-:-:-:03        /*0060*/                   FADD R5, R5, R6 ;
 3&2:-:-:Y:05        /*0070*/              @!P1 BRA `(.L_x_1) ;
.L_x_5:
   -:-:-:Y:06        /*0080*/                   SEL R7, R7, RZ, P0 ;
   -:-:-:Y:05        /*0090*/               @P3 BRA `(.L_x_3) ;
   -:-:-:Y:05        /*00a0*/                   EXIT ;
.L_x_1:
   -:-:3:Y:02        /*00b0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR15], R2 ;
   -:-:-:Y:05        /*00c0*/              @!P1 BRA `(.L_x_1) ;
   -:-:-:Y:05        /*00d0*/                   BRA `(.L_x_3) ;
"""


def test_reads_the_sass_main_loop():
  loops = pm.sass_loops(SASS)
  # the main loop, its nested loop, the retry block's self-loop and its branch back to the
  # main loop's head (a span around the main loop, with its HGMMA: not the main loop)
  assert len(loops) == 4 and sorted(x.hgmma for x in loops) == [0, 0, 2, 2]
  main = pm.sass_main_loop(SASS)
  # .L_x_3 to its branch: PRMT, UIADD3, BRA, 2 HGMMA, FADD, BRA, SEL, BRA
  assert (main.instructions, main.hgmma) == (9, 2)
  assert main.stall_cycles == 2 + 1 + 5 + 1 + 4 + 3 + 5 + 6 + 5
  assert main.inner == ((2, 6),)  # UIADD3 and its branch
  assert pm.sass_main_loop("no code") is None


def _profile(**consumer) -> pm.Profile:
  return pm.Profile(threads=128, consumers=1, producers=0, consumer=pm.Role(**consumer),
                    producer=pm.Role(), loops=(), wgmma_shapes=())


def test_estimate_serial_chain_by_hand():
  prm = pm.Params(tc_efficiency=0.5, wait_latency=100, cpi=2, mufu_cycles=8, overhead_s=1e-6,
                  l2_bytes_per_s=1e30, hbm_bytes_per_s=1e30)
  p = _profile(wgmma_cycles=1000, simt=300, mufu=10, waits=4)
  e = pm.estimate(p, programs=H200.sm_count, programs_per_sm=1, hbm_bytes=0, params=prm)
  cycles = 1000 / 0.5 + 300 * 2 + 10 * 8 + 4 * 100  # one warpgroup: MMA, SIMT, waits in series
  assert e.bound == "chain"
  assert math.isclose(e.time_s, cycles / pm.clock_hz(H200) + 1e-6, rel_tol=1e-12)
  # overlapped (a wgmma in flight while the warpgroup works): the larger of the two
  e2 = pm.estimate(_profile(wgmma_cycles=1000, simt=300, mufu=10, waits=4, overlapped=True),
                   programs=H200.sm_count, programs_per_sm=1, hbm_bytes=0, params=prm)
  assert math.isclose(e2.time_s, (2000 + 400) / pm.clock_hz(H200) + 1e-6, rel_tol=1e-12)


def test_estimate_waves_and_bandwidth_by_hand():
  prm = pm.Params(tc_efficiency=1.0, wait_latency=0, cpi=1, mufu_cycles=1, overhead_s=0,
                  l2_bytes_per_s=1e30, hbm_bytes_per_s=1e12)
  p = _profile(wgmma_cycles=1000, simt=10)
  clock = pm.clock_hz(H200)
  # 2.5 waves of 2 resident programs: 2 full waves bound by the shared tensor cores
  # (2 x 1000 cycles, more than one program's chain of 1010), then 66 programs on 132
  # SMs (1 each): 1010 cycles of one program's chain
  n = int(2.5 * 2 * H200.sm_count)
  e = pm.estimate(p, programs=n, programs_per_sm=2, hbm_bytes=0, params=prm)
  assert math.isclose(e.waves, 2.5)
  assert math.isclose(e.time_s, (2 * 2000 + 1010) / clock, rel_tol=1e-12)
  # HBM bound: 1 GB at 1 TB/s
  e = pm.estimate(p, programs=1, programs_per_sm=1, hbm_bytes=1e9, params=prm)
  assert e.bound == "hbm" and math.isclose(e.time_s, 1e-3)


def test_estimate_warp_specialized_overlaps_consumers():
  prm = pm.Params(tc_efficiency=1.0, wait_latency=0, cpi=1, mufu_cycles=1, overhead_s=0,
                  l2_bytes_per_s=1e30, hbm_bytes_per_s=1e30)
  ws = pm.Profile(threads=384, consumers=2, producers=1,
                  consumer=pm.Role(wgmma_cycles=1000, simt=600), producer=pm.Role(simt=50),
                  loops=(), wgmma_shapes=())
  e = pm.estimate(ws, programs=H200.sm_count, programs_per_sm=1, hbm_bytes=0, params=prm)
  # the tensor cores serve both consumers (2000); one consumer's chain is 1600; issue
  # slots 2 x 600 + 50: tensor-bound, where one warpgroup alone would run 2 x 1600
  assert e.bound == "tensor" and math.isclose(e.time_s, 2000 / pm.clock_hz(H200), rel_tol=1e-12)


@pytest.mark.gpu_compile
def test_reads_jax_hopper_matmul_and_attention_compiled_for_h200():
  """Compiled deviceless: the FLOPs and TMA bytes read from the PTX equal the work of the
  problem (2·M·N·K; each CTA tile's A and B slabs once per k-step; 4·B·H·S²·D)."""
  from tests.helpers import require_deviceless

  require_deviceless()
  from benchmarks import calibrate_model as cm
  from elas_jax import targets

  target = targets.get("h200")
  m, n, k = 1024, 2048, 1024
  point = cm.matmul_point("mm", m, n, k, 1.0, "-", target)
  assert point.candidates, "no configuration of jax's Hopper matmul compiled"
  for text, prof, programs, pps, hbm in point.candidates:
    tm, tn = (int(x) for x in text.split()[1].split("x")[:2])
    cta_m, cta_n = (2 * tm, tn) if "wg M" in text else (tm, 2 * tn)
    tiles = (m // cta_m) * (n // cta_n)
    trips = math.ceil(tiles / programs)
    assert math.isclose(prof.wgmma_flops / trips * tiles, 2 * m * n * k), text
    per_tile = (k // 64) * (cta_m + cta_n) * 64 * 2  # f16 A [cta_m, 64] + B [64, cta_n]
    assert math.isclose(prof.producer.tma_bytes / trips, per_tile), text
    assert (prof.consumers, prof.producers) == (2, 1)
  att = cm.attention_point("att", 2, 4, 1024, 128, 1.0, "-", target)
  assert att.candidates  # attention_point checks 4·B·H·S²·D itself; a misread raises


@pytest.mark.gpu_compile
@pytest.mark.parametrize("closed", [False, True])
def test_calibration_runs_and_reports_every_point(tmp_path, closed):
  """``benchmarks.calibrate_model --quick``: each published point compiled, predicted
  with the fit and left out of it; the fit's error is the one it reports (the chain played
  in program order and, ``--closed_chain``, the closed form)."""
  import json
  import subprocess
  import sys

  from tests.helpers import ROOT, require_deviceless

  require_deviceless()
  p = subprocess.run([sys.executable, "-m", "benchmarks.calibrate_model", "--quick", "--out", str(tmp_path)]
                     + ["--closed_chain"] * closed, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  got = json.load(open(tmp_path / "results.json"))
  assert got["params"]["ordered_chain"] is not closed
  assert len(got["points"]) == 4
  errs = [math.log(1 + w["fit_error"]) for w in got["points"]]
  assert math.isclose(math.sqrt(sum(e * e for e in errs) / len(errs)), got["rms_log_error"], rel_tol=1e-9)
  for w in got["points"]:
    assert w["published_us"] > 0 and math.isfinite(w["loo_us"]) and w["configurations"] >= 1


@pytest.mark.gpu_compile
def test_sass_check_reads_the_compilers_schedule(tmp_path):
  """``benchmarks.sass_check`` (needs nvdisasm beside ptxas, as CI installs it): every
  warp-specialized 60M kernel of the masked step and the calibration's attention kernel
  have a SASS main loop whose HGMMA match the PTX's wgmma, and the scheduled cycles per
  PTX statement are those of a real schedule (between 1 and 4)."""
  import json
  import subprocess
  import sys

  from benchmarks import sass_check
  from tests.helpers import ROOT, require_deviceless

  require_deviceless()
  if sass_check.nvdisasm_beside_ptxas() is None:
    pytest.skip("nvdisasm is not installed beside the CUDA plugin's ptxas (benchmarks/sass_check.py)")
  p = subprocess.run([sys.executable, "-m", "benchmarks.sass_check", "--sizes", "60m", "--out",
                      str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  rows = {w["kernel"]: w for w in json.load(open(tmp_path / "results.json"))["rows"]}
  want = {"60m elas_mgpu_fwd_ws_store", "60m elas_mgpu_dh_ws_compressed", "60m elas_mgpu_dw_ws_compressed"}
  assert want <= set(rows), sorted(rows)
  for w in rows.values():
    assert w["sass_instructions"] > 0 and 1.0 < w["cycles_per_statement"] < 4.0, w
    assert w["ptx_wgmma"] == w["sass_hgmma"], w
