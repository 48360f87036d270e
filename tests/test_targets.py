"""elas_jax.targets without the CUDA plugin: target configs, occupancy arithmetic,
dump parsing, the missing-plugin error, the static roofline, the tile tables."""

import jax
import pytest

from elas_jax import targets
from elas_jax.targets import compile as tcompile
from elas_kernels import common as cm
from elas_kernels import gpu as kgpu
from elas_kernels import roofline as kr
from elas_kernels import tiles as tile_tables


def test_target_configs_hold_the_published_numbers():
  # NVIDIA's published figures (and XLA's GPU specs) for each part.
  h200, h100, a100 = (targets.get(n) for n in ("h200", "H100", "a100"))
  assert (h200.device_kind, h200.sm_count, h200.smem_per_block) == ("NVIDIA H200", 132, 232448)
  assert h200.hbm_bytes_per_s == 4.8e12 and h200.memory_bytes == 141 * 2**30
  assert (h100.sm_count, h100.smem_per_block, h100.hbm_bytes_per_s) == (132, 232448, 3.35232e12)
  assert (a100.sm_count, a100.smem_per_block, a100.compute_capability) == (108, 166912, (8, 0))
  assert h200.bf16_flops_per_s == h100.bf16_flops_per_s == 989e12
  assert a100.bf16_flops_per_s == 312e12
  assert round(h200.ridge_flops_per_byte) == 206
  assert all(t.registers_per_sm == 65536 and t.threads_per_sm == 2048 for t in (h200, h100, a100))
  with pytest.raises(ValueError, match="unknown GPU target 'v100'"):
    targets.get("v100")


def test_the_kernels_default_gpu_is_the_h200_target():
  # The kernels never import the targets; their default GPU (elas_kernels.gpu.H200) must
  # hold the numbers the compiler reads from h200.textproto (and the flops table's peak).
  assert targets.get("h200").gpu_spec() == kgpu.H200
  h100 = targets.get("h100").gpu_spec()
  assert (h100.name, h100.sm_count, h100.smem_per_block, h100.is_hopper) == ("h100", 132, 232448, True)
  assert not targets.get("a100").gpu_spec().is_hopper


@pytest.mark.parametrize("threads,regs,smem,expected", [
    (256, 32, 0, 8),        # thread-limited: 2048 / 256
    (128, 255, 0, 2),       # 255 regs -> 8192 per warp: 8 warps per SM, 4 per block
    (256, 184, 16384, 1),   # 184 -> 192 regs: 6144 per warp, 10 warps, 8 per block
    (128, 64, 163840, 1),   # 160 KiB + 1 KiB reserved: one per 228 KiB SM
    (128, 32, 49152, 4),    # 4 x (48 + 1) KiB fits in 228 KiB
    (32, 16, 0, 32),        # the 32-blocks-per-SM limit
    (32, 65, 0, 28),        # 65 regs -> 2304 per warp (unit 256), not 2080: 28 warps, not 31
])
def test_programs_per_sm_follows_the_cuda_occupancy_rules(threads, regs, smem, expected):
  # Hand-computed with the CUDA occupancy rules for sm_90 (register unit 256 per warp).
  assert targets.get("h200").programs_per_sm(threads, regs, smem) == expected


def test_waves():
  h200 = targets.get("h200")
  assert h200.waves(132, 1) == 1.0
  assert h200.waves(64, 1) < 1 <= h200.waves(264, 2)


SEQUENCE = """\
001: kCustomKernel [source       | next=003 (2)] loop_transpose_fusion grid: [544, 1, 1] threads: [128, 1, 1]  shared_memory: 0 bytes
003: kCustomKernel [prev=002 (1) | next=004 (1)] elas_ffn_fwd grid: [64, 2, 1] threads: [128, 1, 1]  shared_memory: 163840 bytes
005: kCopy [prev=004 (1) | sink        ] copy.1
"""
METADATA = """thunk_metadata {
  thunk_info {
    profile_annotation: "pallas_call.3"
    thunk_id: 3
  }
  thunk_kind: "kCustomKernel"
}"""


def test_dump_parsers_read_xla_thunk_dumps():
  # Lines as XLA 0.12's *thunk_sequence.txt / *thunk_metadata.txt write them.
  th = targets.parse_thunk_sequence(SEQUENCE)
  assert [t["name"] for t in th] == ["loop_transpose_fusion", "elas_ffn_fwd", "copy.1"]
  assert th[1]["grid"] == (64, 2, 1) and th[1]["threads"] == (128, 1, 1)
  assert th[1]["shared_memory_bytes"] == 163840 and "grid" not in th[2]
  assert targets.parse_thunk_metadata(METADATA) == {3: "pallas_call.3"}


# A Mosaic GPU custom call as XLA 0.12's compiled HLO prints it (shortened).
MOSAIC_HLO = (r'  %mpmd_map.0 = (f32[{T},8]{1,0}) custom-call(%p0), custom_call_target="mosaic_gpu_v2", '
              r'operand_layout_constraints={bf16[{T},8]{1,0}}, api_version=API_VERSION_TYPED_FFI, metadata={op_name="jit(f)/elas_mgpu_fwd/mpmd_map"}, '
              r'backend_config="MLIR\00stable_mosaic_gpu.version\00stable_mosaic_gpu\00'
              r'mosaic_gpu.dump_basename\00elas_mgpu_fwd\00llvm.emit_c_interface\00'
              r'elas_mgpu_fwd_mosaic_gpu\00ordering\00loc(model.py:{LINE})"')


def test_mosaic_kernels_are_reported_from_the_dump_or_from_the_compile_that_built_them(tmp_path, monkeypatch):
  monkeypatch.setattr(tcompile, "_MOSAIC_SEEN", {})
  hlo = MOSAIC_HLO.replace("{T}", "64").replace("{LINE}", "10")
  assert [n for n, _ in tcompile._mosaic_calls(hlo)] == ["elas_mgpu_fwd"]
  (tmp_path / "elas_mgpu_fwd_0.ptxas").write_text(
      "ptxas info    : Used 249 registers, used 1 barriers\n"
      "ptxas info    : 0 bytes stack frame, 0 bytes spill stores, 8 bytes spill loads\n")
  # written when lowered, with its own counter (the .ptxas when compiled)
  (tmp_path / "elas_mgpu_fwd_3.resources.txt").write_text("smem_scratch_bytes=183296\n")
  [k] = tcompile._mosaic_kernels(str(tmp_path), hlo)
  assert (k.name, k.kind, k.registers, k.spill_bytes, k.shared_memory_bytes) == (
      "elas_mgpu_fwd", "mosaic", 249, 8, 183296)
  # Mosaic builds a kernel once per process: a later compile of the same kernel
  # leaves no dump, its numbers come from the first; a different kernel of the
  # same name (other shapes, or other tiles: other shared memory) is listed
  # without numbers rather than with wrong ones.
  later = tmp_path / "later"
  later.mkdir()
  # (the module carries source locations: another call site of the kernel differs there)
  [again] = tcompile._mosaic_kernels(str(later), hlo.replace("model.py:10", "model.py:99"))
  assert (again.registers, again.shared_memory_bytes) == (249, 183296)
  # (a lowering still dumps its shared memory; the registers come from the first build)
  (later / "elas_mgpu_fwd_7.resources.txt").write_text("smem_scratch_bytes=183296\n")
  [again] = tcompile._mosaic_kernels(str(later), hlo)
  assert (again.registers, again.spill_bytes, again.shared_memory_bytes) == (249, 8, 183296)
  empty = tmp_path / "empty"
  empty.mkdir()
  [other] = tcompile._mosaic_kernels(str(empty), MOSAIC_HLO.replace("{T}", "128").replace("{LINE}", "10"))
  assert other.name == "elas_mgpu_fwd" and other.registers is None
  (empty / "elas_mgpu_fwd_8.resources.txt").write_text("smem_scratch_bytes=99328\n")
  [other] = tcompile._mosaic_kernels(str(empty), hlo)
  assert (other.registers, other.shared_memory_bytes) == (None, 99328)


def test_deviceless_compiles_run_without_the_llvm_symbolizer(monkeypatch):
  monkeypatch.delenv("LLVM_DISABLE_SYMBOLIZATION", raising=False)
  assert targets.deviceless_env({})["LLVM_DISABLE_SYMBOLIZATION"] == "1"
  assert targets.deviceless_env({"LLVM_DISABLE_SYMBOLIZATION": ""})["LLVM_DISABLE_SYMBOLIZATION"] == ""


def test_missing_plugin_names_the_install_command(monkeypatch):
  monkeypatch.setattr(tcompile, "plugin_available", lambda: False)
  with pytest.raises(targets.MissingCudaPlugin,
                     match=rf'pip install "jax\[cuda12\]=={jax.__version__}"'):
    targets.compile_for_target(lambda x: x, jax.ShapeDtypeStruct((4,), "float32"))


def test_roofline_of_the_fused_forward():
  # 60M at 16384 tokens, by hand: 4·T·F·r FLOPs; h in (2Tr B), the compressed
  # activation out (9F/8 B per token), the fp32 output (4Tr B), both weights (4Fr B).
  t, f, r = 16384, 2064, 128
  fwd = kr.ffn_kernels(t, f, r, gpu=targets.get("h200").gpu_spec())[0]
  assert fwd.flops == 4 * t * f * r
  assert fwd.bytes == 2 * t * r + t * f * 9 / 8 + 4 * t * r + 4 * f * r
  assert fwd.bound == "compute" and fwd.intensity > targets.get("h200").ridge_flops_per_byte
  assert fwd.time_s == pytest.approx(4 * t * f * r / 989e12)
  # evaluation writes no activation: fewer bytes, same FLOPs
  ev = kr.ffn_kernels(t, f, r, train=False)
  assert len(ev) == 1 and ev[0].bytes < fwd.bytes and ev[0].flops == fwd.flops


def test_the_cores_lower_bound_counts_each_product_once():
  # By hand: forward y1 = h w_inᵀ and y2s w_outᵀ (2·T·F·r each); backward dy2 = g w_out,
  # dh = dy1 w_in, dw_in = dy1ᵀ h, dw_out = gᵀ y2s (2·T·F·r each): 12·T·F·r in every mode.
  # The four kernels execute more (dy2 in dh and in dw_in; ste recomputes y1 in each).
  t, f, r = 16384, 2064, 128
  for mode, executed in (("masked", 14), ("split", 14), ("ste", 20)):
    rows = kr.ffn_kernels(t, f, r, mode=mode)
    core = rows[-1]
    assert core.flops == 12 * t * f * r, mode
    assert sum(x.flops for x in rows[:-1]) == executed * t * f * r, mode
  assert core.time_s * 1e6 == pytest.approx(12 * t * f * r / 989e12 * 1e6)  # 52.5 µs, compute-bound
  # bytes: h and g in, out and dh (fp32) out, weights in, both weight grads (fp32) out, and
  # the compressed activation (9F/8 B per token) out and back in, except in ste
  masked, ste = kr.ffn_core(t, f, r), kr.ffn_core(t, f, r, mode="ste")
  common = 2 * 2 * t * r + 2 * 4 * t * r + 2 * 2 * f * r + 2 * 4 * f * r
  assert (masked.bytes, ste.bytes) == (common + 2 * t * f * 9 / 8, common)
  assert kr.ffn_core(t, f, r, train=False).flops == 4 * t * f * r


def test_tile_tables_hold_legal_tiles_for_every_kernel_and_class():
  from elas_kernels import relu2_sparsify, sparse_matmul
  from elas_kernels.ffn import triton as elas_ffn

  table = tile_tables.load("h200")
  assert table["target"] == "h200" and table["tokens"] == 16384
  kernels = elas_ffn.KERNELS + relu2_sparsify.KERNELS + sparse_matmul.KERNELS
  for cls in ("r128", "r256", "r512"):
    entry = table["classes"][cls]
    assert set(entry) == set(kernels) | {"elas_ffn_dw_out/split"}, cls
    for name, fields in entry.items():
      cm.Blocks(**fields).check(name, interpret=False, split=name.endswith("/split"))
  # the kernels read it when compiled for a target, and keep their small tiles interpreted
  got = cm.resolve_tiles("elas_ffn", elas_ffn.KERNELS, 16384, 8191, 512, 512, block_t=None,
                         block_f=None, interpret=None, target="h200")
  assert got[1] is False
  assert got[0]["elas_ffn_fwd"] == cm.Blocks(**table["classes"]["r512"]["elas_ffn_fwd"])
  interp = cm.resolve_tiles("elas_ffn", elas_ffn.KERNELS, 16384, 8191, 512, 512, block_t=None,
                            block_f=None, interpret=True, target="h200")[0]
  assert (interp["elas_ffn_fwd"].block_t, interp["elas_ffn_fwd"].block_f) == (16, 32)
