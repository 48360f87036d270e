"""What is particular to the Pallas Triton kernels (interpret mode on CPU).

The FFN core's contract (forward, statistics and gradients in every mode,
ragged shapes, dtypes) is tests/test_ffn_core.py, run against this backend
with the others. Here: the plane layout, tile checks, how many kernels a call
launches, the stand-alone ``relu2_sparsify`` and ``sparse24_matmul`` ops
against their references, lowering for Triton, training through the kernels,
the kernels under a device mesh and the benchmark's smoke run. The ``gpu``
tests run compiled on a GPU (``pytest -m gpu``) and are skipped elsewhere;
``slow`` marks the tests that train or run subprocesses.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.harness import rel_err
from elas_kernels import common as cm
from elas_kernels import relu2_sparsify, sparse24, sparse_matmul
from elas_kernels.ffn import triton
from tests.helpers import ROOT, ffn_inputs, kernel_launches, xla_flags

ON_GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU (the kernels compile for Triton there)")

# bf16: outputs and gradients within 2% of their largest magnitude (one bf16
# rounding of y1 can flip a near-tie in 2:4 selection; the rest is summation order).
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


@pytest.mark.parametrize("mode", ["masked", "ste", "split"])
def test_each_kernel_launches_once_per_call(mode):
  # Forward: the one fused kernel. Forward + backward: that and dh, dw_in, dw_out
  # (the warm-up switch is a cond: one branch runs). The stand-alone ops: one
  # forward kernel each, two backward kernels each.
  h, w_in, w_out, cot = ffn_inputs(0, 40, 130, 16, 16, jnp.float32)
  fwd = lambda h, wi, wo: triton.TritonFfn(interpret=True)(h, wi, wo, True, mode=mode)[0]
  assert kernel_launches(jax.make_jaxpr(fwd)(h, w_in, w_out)) == 1
  vg = jax.value_and_grad(lambda h, wi, wo: jnp.sum(fwd(h, wi, wo) * cot), argnums=(0, 1, 2))
  assert kernel_launches(jax.make_jaxpr(vg)(h, w_in, w_out)) == 4

  def both(z, wi, wo):
    vals, meta = relu2_sparsify.relu2_sparsify(z, wi)
    return jnp.sum(sparse_matmul.sparse24_matmul(vals, meta, wo))

  wi, wo = w_in[:128], w_out[:, :128]
  assert kernel_launches(jax.make_jaxpr(both)(h, wi, wo)) == 2
  assert kernel_launches(jax.make_jaxpr(jax.value_and_grad(both, (0, 1, 2)))(h, wi, wo)) == 6


def test_plane_layout_round_trips_compress_24():
  y = jax.random.normal(jax.random.PRNGKey(0), (6, 48))
  values, meta = sparse24.compress_24(y)
  planes = cm.to_planes(values)
  assert planes.shape == (4, 6, 6)
  np.testing.assert_array_equal(cm.from_planes(planes), values)
  # Compressing through the in-register plane helpers gives the same bytes.
  yp = cm.weight_planes(y.T)  # [8, G, T]: plane j = features 8g + j
  x = [jnp.abs(yp[j]) for j in range(8)]
  a0, a1, na = cm.compress_group([yp[j] for j in range(4)], cm.keep_24(x[:4]))
  b0, b1, nb = cm.compress_group([yp[j] for j in range(4, 8)], cm.keep_24(x[4:]))
  np.testing.assert_array_equal(jnp.stack([a0, a1, b0, b1]).transpose(0, 2, 1), planes)
  np.testing.assert_array_equal(cm.pack_meta(na, nb).T, meta)
  # gather_group (how the Mosaic dh stores dy1) reads the kept values of a dense group by
  # its nibble: compress_24's values again.
  kept = (cm.gather_group([yp[j] for j in range(4)], na)
          + cm.gather_group([yp[j] for j in range(4, 8)], nb))
  np.testing.assert_array_equal(jnp.stack(kept).transpose(0, 2, 1), planes)


def test_bad_blocks_fail_clearly():
  h, w_in, w_out, _ = ffn_inputs(0, 16, 64, 16, 16, jnp.float32)
  op = lambda **kw: triton.TritonFfn(**{"interpret": True, **kw})
  with pytest.raises(ValueError, match="block_f=24 must be a power of two"):
    op(block_f=24)(h, w_in, w_out, True)
  with pytest.raises(ValueError, match="block_f=4 must be a power of two >= 8"):
    op(block_f=4)(h, w_in, w_out, True)
  # Compiled for a GPU, tiles too small for Triton's dots are refused up front.
  with pytest.raises(ValueError, match="block_f=64 is too small for the GPU kernels"):
    op(block_f=64, interpret=False)(h, w_in, w_out, True)
  with pytest.raises(ValueError, match="block_t=32 is too small .* use >= 64"):
    op(block_t=32, interpret=False)(h, w_in, w_out, True, mode="split")
  # A kernel alone refuses a grid that would not cover the array (the op pads).
  fn, args = triton.kernel_program("elas_ffn_fwd", triton.VARIANTS["elas_ffn_fwd"][0], 16, 64, 16,
                                   cm.Blocks(32, 32))
  arrays = [jnp.zeros(a.shape, a.dtype) for a in args]
  arrays[1] = arrays[1][:16]  # 16 tokens against a 32-token block
  with pytest.raises(ValueError, match="tokens=16 is not a multiple of the block size 32"):
    fn(*arrays)


@pytest.mark.parametrize("t,f,k,dtype,blocks", [
    (40, 64, 16, jnp.float32, {}), (64, 128, 12, jnp.float32, dict(block_t=16, block_f=32)),
    (70, 96, 32, jnp.bfloat16, {})])
def test_relu2_sparsify_and_sparse_matmul_match_references(t, f, k, dtype, blocks):
  ks = jax.random.split(jax.random.PRNGKey(t + f), 5)
  z = jax.random.normal(ks[0], (t, k)).astype(dtype)
  w_in = (jax.random.normal(ks[1], (f, k)) / np.sqrt(k)).astype(dtype)
  w_out = (jax.random.normal(ks[2], (24, f)) / np.sqrt(f)).astype(dtype)
  tol = TOL[dtype]
  # fused z wᵀ -> ReLU² -> 2:4 -> compress: identical metadata, values to rounding
  vals, meta = relu2_sparsify.relu2_sparsify(z, w_in, **blocks)
  vals_r, meta_r = relu2_sparsify.reference(z, w_in)
  np.testing.assert_array_equal(meta, meta_r)
  assert vals.dtype == dtype and rel_err(vals, vals_r) < tol
  c = jax.random.normal(ks[3], vals.shape)
  grad = lambda fn: jax.jit(jax.grad(
      lambda z, w: jnp.sum(fn(z, w)[0].astype(jnp.float32) * c), argnums=(0, 1)))(z, w_in)
  for a, b in zip(grad(lambda z, w: relu2_sparsify.relu2_sparsify(z, w, **blocks)),
                  grad(relu2_sparsify.reference)):
    assert rel_err(a, b) < tol
  # compressed 2:4 x dense, on the reference's compressed activation
  out = sparse_matmul.sparse24_matmul(vals_r, meta_r, w_out, **blocks)
  assert rel_err(out, sparse_matmul.reference(vals_r, meta_r, w_out)) < tol
  c2 = jax.random.normal(ks[4], out.shape)
  grad2 = lambda fn: jax.jit(jax.grad(
      lambda v, w: jnp.sum(fn(v, meta_r, w).astype(jnp.float32) * c2), argnums=(0, 1)))(vals_r, w_out)
  for a, b in zip(grad2(lambda v, m, w: sparse_matmul.sparse24_matmul(v, m, w, **blocks)),
                  grad2(sparse_matmul.reference)):
    assert rel_err(a, b) < tol


def test_standalone_kernels_refuse_bad_shapes():
  z, w = jnp.ones((8, 16)), jnp.ones((20, 16))
  with pytest.raises(ValueError, match="F=20 is not a multiple of 8"):
    relu2_sparsify.relu2_sparsify(z, w)
  vals, meta = relu2_sparsify.reference(z, jnp.ones((32, 16)))
  # a block wider than F is padded, not refused, and gives the same result
  np.testing.assert_array_equal(relu2_sparsify.relu2_sparsify(z, jnp.ones((32, 16)), block_f=64)[1],
                                meta)
  with pytest.raises(ValueError, match="w must be"):
    sparse_matmul.sparse24_matmul(vals, meta, jnp.ones((4, 24)))
  with pytest.raises(ValueError, match="does not match"):
    sparse_matmul.sparse24_matmul(vals, meta[:4], jnp.ones((4, 32)))


_LOWER = r"""
import contextlib, re, jax, jax.numpy as jnp
from elas_kernels import relu2_sparsify, sparse_matmul
from elas_kernels.ffn.triton import TritonFfn

def h200():
  # jax >= 0.11 lowers Pallas for Triton only for a known GPU: name one (H200).
  try:
    from jax._src.mesh import AbstractDevice, AbstractMesh
    dev = AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="gpu")
    return jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=dev))
  except (ImportError, TypeError, AttributeError):
    return contextlib.nullcontext()

ctx = h200()
ctx.__enter__()
h = jax.ShapeDtypeStruct((512, 128), jnp.bfloat16)
wi = jax.ShapeDtypeStruct((2064, 128), jnp.bfloat16)
wo = jax.ShapeDtypeStruct((128, 2064), jnp.bfloat16)
for mode in ("masked", "ste", "split"):
  def loss(h, wi, wo):
    return jnp.sum(TritonFfn(interpret=False)(h, wi, wo, True, mode=mode)[0].astype(jnp.float32))
  txt = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(h, wi, wo).lower(
      lowering_platforms=("cuda",)).as_text()
  print(mode, ",".join(sorted(set(re.findall(r"(elas_ffn_[a-z_]+)", txt)))))
z = jax.ShapeDtypeStruct((512, 128), jnp.bfloat16)
def loss2(z, wi, wo):
  v, m = relu2_sparsify.relu2_sparsify(z, wi, interpret=False)
  return jnp.sum(sparse_matmul.sparse24_matmul(v, m, wo, interpret=False).astype(jnp.float32))
wi8 = jax.ShapeDtypeStruct((2048, 128), jnp.bfloat16)
wo8 = jax.ShapeDtypeStruct((128, 2048), jnp.bfloat16)
txt = jax.jit(jax.value_and_grad(loss2, argnums=(0, 1, 2))).trace(z, wi8, wo8).lower(
    lowering_platforms=("cuda",)).as_text()
print("ops", ",".join(sorted(set(re.findall(r"(relu2_sparsify_[a-z]+|sparse24_matmul_[a-z]+)", txt)))))
"""


@pytest.mark.slow
def test_kernels_lower_to_triton():
  # Lowering for CUDA (an abstract H200) on this CPU machine runs Pallas' Triton
  # lowering: every primitive must have a Triton rule and every tile a
  # power-of-two size. Compiling to PTX and running are the gpu tests' job.
  p = subprocess.run([sys.executable, "-c", _LOWER], cwd=ROOT, capture_output=True, text=True,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  if "No supported GPU devices found" in p.stderr:
    pytest.skip("this jax lowers Pallas for Triton only with a GPU present")
  assert p.returncode == 0, p.stderr[-3000:]
  # every kernel of every op made it through the lowering, by name
  ffn = "elas_ffn_dh,elas_ffn_dw_in,elas_ffn_dw_out,elas_ffn_fwd"
  ops = ("relu2_sparsify_dw,relu2_sparsify_dz,relu2_sparsify_fwd,"
         "sparse24_matmul_dvals,sparse24_matmul_dw,sparse24_matmul_fwd")
  assert p.stdout.split() == ["masked", ffn, "ste", ffn, "split", ffn, "ops", ops]


@pytest.mark.gpu
@needs_gpu
def test_standalone_kernels_on_gpu():
  test_relu2_sparsify_and_sparse_matmul_match_references(1000, 2048, 128, jnp.bfloat16, {})


@pytest.mark.slow
def test_tiny_training_with_pallas_kernel_matches_xla(tmp_path):
  # config.model.kernel=pallas (the old name of triton; interpreted on CPU) trains like the XLA op:
  # dense warm-up, the 2:4 switch at step 4, a LORO exact step at 5, evaluation.
  from tests.helpers import assert_trainings_match, tiny_train_config

  common = {"train.steps": 8, "train.eval_every": 8, "train.ckpt_every": 8, "train.eval_tokens": 1024}
  assert_trainings_match(tmp_path, tiny_train_config(**common, **{"model.kernel": "xla"}),
                         tiny_train_config(**common, **{"model.kernel": "pallas"}), rtol=2e-5)


_MESH_SCRIPT = r"""
import json, jax, jax.numpy as jnp, numpy as np
from elas_jax.ops import ffn
from elas_kernels.ffn.triton import TritonFfn
from tests.helpers import kernel_launches, pallas_out_shapes
mesh = jax.make_mesh((2, 2, 1), ("data", "fsdp", "tensor"),
                     axis_types=(jax.sharding.AxisType.Auto,) * 3)
ks = jax.random.split(jax.random.PRNGKey(0), 3)
h = jax.random.normal(ks[0], (8, 6, 16))
wi = jax.random.normal(ks[1], (66, 16)) / 4
wo = jax.random.normal(ks[2], (16, 66)) / 8
def value_and_grads(fn):
  return jax.value_and_grad(lambda h, wi, wo: jnp.sum(
      fn(h, wi, wo, True, mode="masked", dense_fraction=0.05)[0] ** 2), argnums=(0, 1, 2))
hs = jax.device_put(h, jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"))))
def on_mesh(h, wi, wo, sparse_on, **kw):  # the model's call, the mesh given explicitly
  return ffn.sparse_ffn(h, wi, wo, jnp.asarray(sparse_on), kernel="triton", mesh=mesh, **kw)
meshed = jax.jit(value_and_grads(on_mesh))(hs, wi, wo)
jaxpr = jax.make_jaxpr(value_and_grads(on_mesh))(hs, wi, wo)
# one device, no mesh: the whole batch, and one device's share of it (8 / 4 sequences)
one = jax.jit(value_and_grads(TritonFfn(interpret=True)))(h, wi, wo)
local = jax.make_jaxpr(value_and_grads(TritonFfn(interpret=True)))(h[:2], wi, wo)
print(json.dumps({
    "loss": [float(meshed[0]), float(one[0])],
    "grad_err": max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                    for a, b in zip(meshed[1], one[1])),
    "devices": len(hs.sharding.device_set),
    "launches": kernel_launches(jaxpr), "shapes": pallas_out_shapes(jaxpr),
    "local_shapes": pallas_out_shapes(local)}))
"""


@pytest.mark.slow
def test_pallas_ffn_under_a_mesh_equals_one_device():
  # Under a 4-device data x fsdp mesh: the loss and gradients (weights summed
  # over shards) equal a one-device run; the op launches each of its 4 kernels
  # once, on one device's share of the tokens (shard_map), not on the gathered batch.
  env = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                     env=env, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads(p.stdout.strip().splitlines()[-1])
  assert r["devices"] == 4
  np.testing.assert_allclose(*r["loss"], rtol=1e-5)
  assert r["grad_err"] < 1e-5
  assert r["launches"] == 4  # fused forward, dh, dw_in, dw_out
  assert r["shapes"] == r["local_shapes"]


@pytest.mark.slow
def test_kernel_benchmark_cpu_smoke(tmp_path):
  # The benchmark's interpret-mode smoke preset runs every section, and each Triton
  # row agrees with the XLA op it is timed against.
  p = subprocess.run([sys.executable, "-m", "benchmarks.ffn_kernels", "--preset", "cpu", "--modes",
                      "masked", "--repeats", "1", "--out", str(tmp_path)], cwd=ROOT,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  rows = json.load(open(tmp_path / "results.json"))["rows"]
  assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
  triton = {(r["op"], r["pass_"]): r for r in rows if r["impl"] == "triton"}
  assert sorted(triton) == [("triton elas_ffn/masked", "fwd"), ("triton elas_ffn/masked", "fwd+bwd"),
                            ("triton relu2_sparsify (F=256)", ""), ("triton sparse24_matmul (F=256)", "")]
  assert all(r["max_rel_err"] is not None and r["max_rel_err"] < 2e-2 for r in triton.values())
  # the markdown table has one line per row, with the same op and pass
  table = (tmp_path / "results.md").read_text().split("\n\n## ")[0].splitlines()
  cells = [[c.strip() for c in line.strip("|").split("|")] for line in table if line.startswith("| ")]
  assert [(c[2], c[3]) for c in cells[1:]] == [(r["op"], r["pass_"] or "-") for r in rows]
