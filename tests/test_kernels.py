"""Pallas kernels against their plain-jnp references (interpret mode on CPU).

Every kernel's output and ``jax.grad`` are compared with the reference on fresh
random inputs over several shapes, including token counts and widths that do
not divide the blocks (padded path) and widths with a dense ``F % 4`` tail.
fp32 must agree to rounding (the kernels accumulate in fp32 in another order);
bf16 within the tolerance documented in docs/kernels.md. The ``gpu`` tests run
the same cases compiled for a GPU (``pytest -m gpu`` selects them) and are
skipped elsewhere; ``slow`` marks the tests that train or run subprocesses.
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
from kernels import common as cm
from kernels import elas_ffn, relu2_sparsify, sparse_matmul
from tests.helpers import ROOT

ON_GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU (the kernels compile for Triton there)")

# bf16: outputs and gradients within 2% of their largest magnitude (one bf16
# rounding of y1 can flip a near-tie in 2:4 selection; the rest is summation order).
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def kernel_launches(jaxpr) -> int:
  """Pallas kernels one evaluation of ``jaxpr`` launches, counted through its
  sub-jaxprs (jit, shard_map, custom_vjp, ...); of a ``cond``'s branches, the
  one that launches most (one branch runs)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # ClosedJaxpr -> Jaxpr
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      total += 1
      continue
    subs = [kernel_launches(j) for j in _sub_jaxprs(eqn.params.values())]
    total += (max(subs, default=0) if eqn.primitive.name == "cond" else sum(subs))
  return total


def pallas_out_shapes(jaxpr) -> list[str]:
  """Output shapes of every ``pallas_call`` in ``jaxpr`` and its sub-jaxprs, sorted."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      out.append(" ".join(str(v.aval) for v in eqn.outvars))
    for j in _sub_jaxprs(eqn.params.values()):
      out += pallas_out_shapes(j)
  return sorted(out)


def _sub_jaxprs(params):
  for v in params:
    if hasattr(v, "eqns") or hasattr(getattr(v, "jaxpr", None), "eqns"):
      yield v
    elif isinstance(v, (tuple, list)):
      yield from _sub_jaxprs(v)


def ffn_inputs(seed, t, f, k, n, dtype):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  h = jax.random.normal(ks[0], (t, k), jnp.float32)
  w_in = jax.random.normal(ks[1], (f, k), jnp.float32) / np.sqrt(k)
  w_out = jax.random.normal(ks[2], (n, f), jnp.float32) / np.sqrt(f)
  cot = jax.random.normal(ks[3], (t, n), jnp.float32)
  return h.astype(dtype), w_in.astype(dtype), w_out.astype(dtype), cot


def value_and_grads(fn, h, w_in, w_out, cot):
  def loss(h, w_in, w_out):
    out, stats = fn(h, w_in, w_out)
    return jnp.sum(out.astype(jnp.float32) * cot), (out, stats)

  (_, (out, stats)), grads = jax.jit(
      jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(h, w_in, w_out)
  return out, stats, grads


def check_ffn(mode, sparse_on, t, f, k, n, dtype, seed=0, interpret=True, **blocks):
  h, w_in, w_out, cot = ffn_inputs(seed, t, f, k, n, dtype)
  kern = lambda h, wi, wo: elas_ffn.elas_ffn(h, wi, wo, sparse_on, mode=mode, interpret=interpret,
                                             **blocks)
  ref = lambda h, wi, wo: elas_ffn.reference(h, wi, wo, sparse_on, mode=mode)
  out_k, st_k, g_k = value_and_grads(kern, h, w_in, w_out, cot)
  out_r, st_r, g_r = value_and_grads(ref, h, w_in, w_out, cot)
  tol = TOL[dtype]
  assert out_k.dtype == out_r.dtype and out_k.shape == out_r.shape
  assert rel_err(out_k, out_r) < tol, "forward"
  for name, a, b in zip(("dh", "dw_in", "dw_out"), g_k, g_r):
    assert a.dtype == b.dtype and a.shape == b.shape, name
    assert rel_err(a, b) < tol, name
  for key in ("zero_frac", "dropped_mass"):
    np.testing.assert_allclose(float(st_k[key]), float(st_r[key]), rtol=1e-4 if dtype == jnp.float32
                               else 2e-2, atol=1e-6, err_msg=key)


# t, f, k, n, blocks: divisible; ragged tokens and a width with a 2-feature
# dense tail (f_main % 8 == 4); ragged everything with non-power-of-two ranks.
SHAPES = [
    (64, 128, 16, 16, dict(block_t=16, block_f=32)),
    (50, 258, 16, 8, dict(block_t=16, block_f=64)),
    (37, 203, 12, 10, {}),
]


CASES = [("masked", s) for s in SHAPES] + [("split", SHAPES[0]), ("split", SHAPES[2]),
                                           ("ste", SHAPES[1])]


@pytest.mark.parametrize("mode,shape", CASES)
def test_elas_ffn_fp32_matches_reference(mode, shape):
  t, f, k, n, blocks = shape
  check_ffn(mode, True, t, f, k, n, jnp.float32, seed=t + f, **blocks)


@pytest.mark.parametrize("mode", ["masked", "split"])
def test_elas_ffn_dense_warmup_matches_reference(mode):
  # sparse_on=False: the dense ReLU² FFN and its exact gradient (recomputed from h).
  check_ffn(mode, False, 48, 130, 16, 16, jnp.float32, seed=3)


@pytest.mark.parametrize("mode", ["masked", "split"])
def test_elas_ffn_bf16_within_documented_tolerance(mode):
  check_ffn(mode, True, 64, 256, 32, 32, jnp.bfloat16, seed=5, block_t=32, block_f=64)


def test_backward_modes_really_differ():
  # The per-mode comparisons above mean something only if the modes' gradients
  # differ: ste passes gradient through dropped entries, split masks dW_out by tokens.
  h, w_in, w_out, cot = ffn_inputs(1, 64, 128, 16, 16, jnp.float32)
  grads = {}
  for mode in ("masked", "ste", "split"):
    fn = lambda h, wi, wo, mode=mode: elas_ffn.elas_ffn(h, wi, wo, True, mode=mode, block_t=16,
                                                        block_f=32)
    grads[mode] = value_and_grads(fn, h, w_in, w_out, cot)[2]
  assert rel_err(grads["ste"][0], grads["masked"][0]) > 1e-2  # dh
  assert rel_err(grads["split"][2], grads["masked"][2]) > 1e-2  # dw_out
  assert rel_err(grads["split"][0], grads["masked"][0]) < 1e-6  # split's dh is the masked one


def test_sparse_on_is_data_not_a_recompile():
  h, w_in, w_out, _ = ffn_inputs(2, 32, 64, 16, 16, jnp.float32)
  traces = []

  @jax.jit
  def f(flag):
    traces.append(1)
    return elas_ffn.elas_ffn(h, w_in, w_out, flag)[0]

  dense, sparse = f(jnp.asarray(False)), f(jnp.asarray(True))
  assert len(traces) == 1
  assert rel_err(sparse, dense) > 1e-3  # and the flag does change the result


@pytest.mark.parametrize("mode", ["masked", "ste", "split"])
def test_each_kernel_launches_once_per_call(mode):
  # Forward: the one fused kernel. Forward + backward: that and dh, dw_in, dw_out
  # (the warm-up switch is a cond: one branch runs). The stand-alone ops: one
  # forward kernel each, two backward kernels each.
  h, w_in, w_out, cot = ffn_inputs(0, 40, 130, 16, 16, jnp.float32)
  fwd = lambda h, wi, wo: elas_ffn.elas_ffn(h, wi, wo, True, mode=mode)[0]
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
  from elas_jax.ops import sparsity

  y = jax.random.normal(jax.random.PRNGKey(0), (6, 48))
  values, meta = sparsity.compress_24(y)
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


def test_bad_blocks_and_shapes_fail_clearly():
  h, w_in, w_out, _ = ffn_inputs(0, 16, 64, 16, 16, jnp.float32)
  with pytest.raises(ValueError, match="block_f=24 must be a power of two"):
    elas_ffn.elas_ffn(h, w_in, w_out, True, block_f=24)
  with pytest.raises(ValueError, match="block_f=4 must be a power of two >= 8"):
    elas_ffn.elas_ffn(h, w_in, w_out, True, block_f=4)
  with pytest.raises(ValueError, match="do not chain"):
    elas_ffn.elas_ffn(h, w_in[:, :8], w_out, True)
  with pytest.raises(ValueError, match="unknown 2:4 backward mode"):
    elas_ffn.elas_ffn(h, w_in, w_out, True, mode="mvue")
  # Compiled for a GPU, tiles too small for Triton's dots are refused up front.
  with pytest.raises(ValueError, match="block_f=64 is too small for the GPU kernels"):
    elas_ffn.elas_ffn(h, w_in, w_out, True, block_f=64, interpret=False)
  with pytest.raises(ValueError, match="block_t=32 is too small .* use >= 64"):
    elas_ffn.elas_ffn(h, w_in, w_out, True, mode="split", block_t=32, interpret=False)
  # The raw pallas_call builders refuse a grid that would not cover the array.
  with pytest.raises(ValueError, match="tokens=16 is not a multiple of the block size 32"):
    elas_ffn._fwd_call(jnp.ones((1,), jnp.int32), h, cm.weight_planes(w_in),
                       cm.out_weight_planes(w_out), cm.Blocks(32, 32), True, True, False)


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
from kernels import elas_ffn, relu2_sparsify, sparse_matmul

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
    return jnp.sum(elas_ffn.elas_ffn(h, wi, wo, True, mode=mode, interpret=False)[0].astype(jnp.float32))
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
@pytest.mark.parametrize("mode", ["masked", "ste", "split"])
def test_elas_ffn_on_gpu_matches_reference(mode):
  check_ffn(mode, True, 1000, 2064, 128, 128, jnp.bfloat16, seed=7, interpret=False)
  check_ffn(mode, True, 512, 1030, 64, 64, jnp.float32, seed=8, interpret=False)


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
from kernels import elas_ffn
from tests.test_kernels import kernel_launches, pallas_out_shapes
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
one = jax.jit(value_and_grads(elas_ffn.elas_ffn))(h, wi, wo)
local = jax.make_jaxpr(value_and_grads(elas_ffn.elas_ffn))(h[:2], wi, wo)
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
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
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
  # The benchmark's interpret-mode smoke preset runs every section, and each Pallas
  # row agrees with the XLA op it is timed against.
  p = subprocess.run([sys.executable, "-m", "benchmarks.ffn_kernels", "--preset", "cpu", "--modes",
                      "masked", "--repeats", "1", "--out", str(tmp_path)], cwd=ROOT,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  rows = json.load(open(tmp_path / "results.json"))["rows"]
  assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
  pallas = {(r["op"], r["pass_"]): r for r in rows if r["impl"] == "pallas"}
  assert sorted(pallas) == [("pallas elas_ffn/masked", "fwd"), ("pallas elas_ffn/masked", "fwd+bwd"),
                            ("pallas relu2_sparsify (F=256)", ""), ("pallas sparse24_matmul (F=256)", "")]
  assert all(r["max_rel_err"] is not None and r["max_rel_err"] < 2e-2 for r in pallas.values())
  # the markdown table has one line per row, with the same op and pass
  table = (tmp_path / "results.md").read_text().split("\n\n## ")[0].splitlines()
  cells = [[c.strip() for c in line.strip("|").split("|")] for line in table if line.startswith("| ")]
  assert [(c[2], c[3]) for c in cells[1:]] == [(r["op"], r["pass_"] or "-") for r in rows]
