"""2:4 selection and compression (elas_kernels.sparse24), the FFN core's plain-jnp
reference (elas_kernels.ffn.base.reference) and the XLA implementation's own guarantees.

References are independent: the selection is checked against a per-group numpy
sort, and the reference's values and gradients against ``jax.grad`` of a
plain-JAX function whose masks come from that numpy reference. Every
implementation is then checked against ``base.reference`` in tests/test_ffn_core.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elas_kernels import sparse24
from elas_kernels.ffn import base
from elas_kernels.ffn.xla import XlaFfn


def ref_mask(y) -> np.ndarray:
  """Per group of 4: keep the 2 largest |y|, ties to the lowest index."""
  y = np.asarray(y, dtype=np.float32)
  f = y.shape[-1]
  flat = y.reshape(-1, f)
  keep = np.ones_like(flat, dtype=bool)
  for row in range(flat.shape[0]):
    for g in range(f // 4):
      vals = np.abs(flat[row, 4 * g: 4 * g + 4])
      order = sorted(range(4), key=lambda i: (-vals[i], i))
      keep[row, 4 * g: 4 * g + 4] = False
      for i in order[:2]:
        keep[row, 4 * g + i] = True
  return keep.reshape(y.shape)


ADVERSARIAL = np.array([
    [0, 0, 0, 0],          # all zero: the first two positions
    [1, 1, 1, 1],          # all equal
    [-3, 3, 3, -3],        # equal magnitudes with signs
    [-5, 1, 2, -0.5],      # a negative of largest magnitude
    [0, 2, 0, 2],          # ties between the kept two
    [0, 0, 0, 7],          # one non-zero
    [2, 1, 1, 1],          # tie for the second place
    [-0.0, 0.0, -1, 1],    # signed zeros
], dtype=np.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mask_matches_reference_random(dtype):
  y = jax.random.normal(jax.random.key(0), (3, 7, 64), dtype)
  np.testing.assert_array_equal(np.asarray(sparse24.mask_24(y)), ref_mask(y))


def test_mask_adversarial_groups():
  y = jnp.asarray(ADVERSARIAL.reshape(1, -1))
  keep = np.asarray(sparse24.mask_24(y)).reshape(-1, 4)
  np.testing.assert_array_equal(keep, ref_mask(ADVERSARIAL))
  np.testing.assert_array_equal(keep[0], [True, True, False, False])
  np.testing.assert_array_equal(keep[1], [True, True, False, False])
  np.testing.assert_array_equal(keep[2], [True, True, False, False])
  np.testing.assert_array_equal(keep[3], [True, False, True, False])
  np.testing.assert_array_equal(keep[6], [True, True, False, False])


def test_invariants_on_quantised_inputs():
  # Few distinct values: many ties. Exactly 2 kept per group, each kept
  # magnitude >= each dropped one, and the sparse array equals where(mask).
  y = jax.random.randint(jax.random.key(1), (50, 32), -2, 3).astype(jnp.float32)
  keep = np.asarray(sparse24.mask_24(y)).reshape(50, 8, 4)
  a = np.abs(np.asarray(y)).reshape(50, 8, 4)
  assert (keep.sum(-1) == 2).all()
  kept_min = np.where(keep, a, np.inf).min(-1)
  dropped_max = np.where(~keep, a, -np.inf).max(-1)
  assert (kept_min >= dropped_max).all()
  np.testing.assert_array_equal(np.asarray(sparse24.sparsify_24(y)),
                                np.where(keep.reshape(50, 32), np.asarray(y), 0))
  np.testing.assert_array_equal(keep.reshape(50, 32), ref_mask(y))


def test_tail_features_stay_dense():
  y = jax.random.normal(jax.random.key(2), (4, 11))
  keep = np.asarray(sparse24.mask_24(y))
  np.testing.assert_array_equal(keep[:, :8], ref_mask(y[:, :8]))
  assert keep[:, 8:].all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("f", [4, 8, 12, 64])
def test_compress_round_trip(dtype, f):
  y = jax.random.normal(jax.random.key(f), (2, 5, f), dtype)
  y = y.at[0, 0].set(0).at[1, 1, :4].set(1)  # zeros and ties
  values, meta = sparse24.compress_24(y)
  assert values.shape == (2, 5, f // 2) and values.dtype == dtype
  assert meta.shape == (2, 5, -(-f // 8)) and meta.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(sparse24.decompress_24(values, meta)),
                                np.asarray(sparse24.sparsify_24(y)))
  # values hold the kept entries in feature order
  kept = np.asarray(y)[ref_mask(y)].reshape(2, 5, f // 2)
  np.testing.assert_array_equal(np.asarray(values), kept)


def test_compress_rejects_ragged_width_and_bad_meta():
  with pytest.raises(ValueError, match="not a multiple of 4"):
    sparse24.compress_24(jnp.ones((2, 6)))
  values, meta = sparse24.compress_24(jnp.ones((2, 16)))
  with pytest.raises(ValueError, match="meta"):
    sparse24.decompress_24(values, meta[:, :1])


def test_compressed_bytes_is_nine_sixteenths_in_bf16():
  assert sparse24.compressed_bytes((256, 2064), jnp.bfloat16) / (256 * 2064 * 2) == 9 / 16


# --------------------------------------------------------------------------
# The FFN core: the reference (the other implementations' ground truth) and XLA's op.
# --------------------------------------------------------------------------

# Both against the independent numpy-mask formulas below.
OPS = {"reference": base.reference, "xla": XlaFfn()}
xla_op = OPS["xla"]


def _inputs(key, t=24, k=16, f=20, n=12, dtype=jnp.float32):
  kh, ki, ko, kg = jax.random.split(key, 4)
  h = jax.random.normal(kh, (t, k), dtype)
  w_in = (jax.random.normal(ki, (f, k)) / 4).astype(dtype)
  w_out = (jax.random.normal(ko, (n, f)) / 4).astype(dtype)
  g = jax.random.normal(kg, (t, n), jnp.float32)
  return h, w_in, w_out, g


def _ref_ffn(h, w_in, w_out, keep, mode="masked", keep_dw=None):
  """Plain-JAX reference; ``keep`` and ``keep_dw`` are constant numpy masks."""
  y2 = jnp.square(jax.nn.relu(jnp.dot(h, w_in.T, preferred_element_type=jnp.float32)))
  if mode == "ste":
    y2s = y2 + jax.lax.stop_gradient(jnp.where(keep, y2, 0) - y2)
  else:
    y2s = jnp.where(keep, y2, 0)
  out = jnp.dot(y2s, w_out.T.astype(jnp.float32))
  if keep_dw is not None:  # weight gradient from a different activation
    y2d = jax.lax.stop_gradient(jnp.where(keep_dw, y2s, 0))
    out = (jnp.dot(y2s, jax.lax.stop_gradient(w_out).T)
           + jnp.dot(y2d, w_out.T) - jax.lax.stop_gradient(jnp.dot(y2d, w_out.T)))
  return out


def _loss(fn, g):
  return lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * g)


def _y2(h, w_in):
  return np.square(np.maximum(np.asarray(h, np.float32) @ np.asarray(w_in, np.float32).T, 0))


def _assert_grads_close(got, want, rtol, atol):
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=rtol, atol=atol)


@pytest.mark.parametrize("mode", base.BACKWARD_MODES)
@pytest.mark.parametrize("sparse_on", [False, True])
@pytest.mark.parametrize("op_name", list(OPS))
def test_forward_matches_reference(op_name, mode, sparse_on):
  h, w_in, w_out, _ = _inputs(jax.random.key(3))
  out, stats = OPS[op_name](h, w_in, w_out, sparse_on, mode=mode)
  y2 = _y2(h, w_in)
  keep = ref_mask(y2) if sparse_on else np.ones_like(y2, bool)
  np.testing.assert_allclose(np.asarray(out), np.where(keep, y2, 0) @ np.asarray(w_out).T,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(stats["zero_frac"]), (y2 == 0).mean(), rtol=1e-6)
  dropped = np.where(ref_mask(y2), 0, y2).sum() / y2.sum()
  np.testing.assert_allclose(float(stats["dropped_mass"]), dropped, rtol=1e-5)


@pytest.mark.parametrize("op_name", list(OPS))
def test_masked_grad_equals_stop_gradient_mask_reference(op_name):
  h, w_in, w_out, g = _inputs(jax.random.key(4))
  keep = ref_mask(_y2(h, w_in))
  got = jax.grad(_loss(lambda *a: OPS[op_name](*a, True)[0], g), (0, 1, 2))(h, w_in, w_out)
  want = jax.grad(_loss(lambda *a: _ref_ffn(*a, keep), g), (0, 1, 2))(h, w_in, w_out)
  _assert_grads_close(got, want, 1e-5, 1e-5)


@pytest.mark.parametrize("op_name", list(OPS))
def test_ste_grad_passes_gradient_through_the_mask(op_name):
  h, w_in, w_out, g = _inputs(jax.random.key(5))
  keep = ref_mask(_y2(h, w_in))
  op = lambda *a: OPS[op_name](*a, True, mode="ste")[0]
  got = jax.grad(_loss(op, g), (0, 1, 2))(h, w_in, w_out)
  want = jax.grad(_loss(lambda *a: _ref_ffn(*a, keep, "ste"), g), (0, 1, 2))(h, w_in, w_out)
  _assert_grads_close(got, want, 1e-5, 1e-5)
  masked = jax.grad(_loss(lambda *a: OPS[op_name](*a, True)[0], g), 0)(h, w_in, w_out)
  assert not np.allclose(np.asarray(got[0]), np.asarray(masked))  # the modes really differ


def _ref_token_mask(y2s: np.ndarray, dense_fraction: float) -> np.ndarray:
  t, f = y2s.shape
  perm = np.random.RandomState(0).permutation(t)
  keep_perm = ref_mask(y2s[perm].T).T  # 2:4 along (permuted) tokens
  keep = np.empty_like(keep_perm)
  keep[perm] = keep_perm
  n_dense = int(np.ceil(dense_fraction * f))
  nnz = (y2s != 0).sum(0)
  dense_cols = np.argsort(-nnz, kind="stable")[:n_dense]
  keep[:, dense_cols] = True
  return keep


@pytest.mark.parametrize("t", [24, 26])  # 26: a ragged tail of tokens stays dense
@pytest.mark.parametrize("op_name", list(OPS))
def test_split_grad_uses_token_24_for_the_weight_gradient(op_name, t):
  # Distinct non-zero counts per feature so "the densest 5%" is unambiguous.
  h, w_in, w_out, g = _inputs(jax.random.key(6), t=t, f=40)
  keep = ref_mask(_y2(h, w_in))
  y2s = np.where(keep, _y2(h, w_in), 0)
  nnz = (y2s != 0).sum(0)
  top = np.sort(nnz)[::-1]
  assert top[1] > top[2], "test inputs must have a unique top-2 of feature densities"
  keep_dw = _ref_token_mask(y2s, 0.05)
  op = lambda *a: OPS[op_name](*a, True, mode="split", dense_fraction=0.05)[0]
  got = jax.grad(_loss(op, g), (0, 1, 2))(h, w_in, w_out)
  want = jax.grad(_loss(lambda *a: _ref_ffn(*a, keep, keep_dw=keep_dw), g), (0, 1, 2))(h, w_in, w_out)
  _assert_grads_close(got, want, 1e-5, 1e-5)
  masked_dw = jax.grad(_loss(lambda *a: OPS[op_name](*a, True)[0], g), 2)(h, w_in, w_out)
  assert not np.allclose(np.asarray(got[2]), np.asarray(masked_dw))


@pytest.mark.parametrize("mode", base.BACKWARD_MODES)
@pytest.mark.parametrize("op_name", list(OPS))
def test_dense_warmup_grads_are_the_dense_relu2_grads(op_name, mode):
  h, w_in, w_out, g = _inputs(jax.random.key(7))
  dense = np.ones((h.shape[0], w_in.shape[0]), bool)
  op = lambda *a: OPS[op_name](*a, False, mode=mode)[0]
  got = jax.grad(_loss(op, g), (0, 1, 2))(h, w_in, w_out)
  want = jax.grad(_loss(lambda *a: _ref_ffn(*a, dense), g), (0, 1, 2))(h, w_in, w_out)
  _assert_grads_close(got, want, 1e-5, 1e-5)


@pytest.mark.parametrize("mode", base.BACKWARD_MODES)
def test_jit_and_eager_agree(mode):
  h, w_in, w_out, g = _inputs(jax.random.key(8))
  fn = lambda h, wi, wo, on: _loss(lambda *a: xla_op(*a, on, mode=mode)[0], g)(h, wi, wo)
  vg = jax.value_and_grad(fn, (0, 1, 2))
  eager = vg(h, w_in, w_out, True)
  jitted = jax.jit(vg)(h, w_in, w_out, True)
  np.testing.assert_allclose(float(eager[0]), float(jitted[0]), rtol=1e-6)
  _assert_grads_close(jitted[1], eager[1], 1e-5, 1e-6)


@pytest.mark.parametrize("mode", base.BACKWARD_MODES)
def test_bf16_close_to_fp32_reference(mode):
  # bf16 inputs; the fp32 reference sees the same (bf16-rounded) numbers.
  h, w_in, w_out, g = _inputs(jax.random.key(9), dtype=jnp.bfloat16)
  h32, wi32, wo32 = (x.astype(jnp.float32) for x in (h, w_in, w_out))
  out, _ = xla_op(h, w_in, w_out, True, mode=mode)
  assert out.dtype == jnp.bfloat16
  ref, _ = xla_op(h32, wi32, wo32, True, mode=mode)
  # bf16 has an 8-bit mantissa: 2-3 roundings along the chain.
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), rtol=3e-2, atol=3e-2)
  op = lambda on: lambda *a: xla_op(*a, on, mode=mode)[0]
  got = jax.grad(_loss(op(True), g), (0, 1, 2))(h, w_in, w_out)
  want = jax.grad(_loss(op(True), g), (0, 1, 2))(h32, wi32, wo32)
  for a, b in zip(got, want):
    assert a.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b), atol=4e-2 * scale)


def test_warmup_switch_flips_without_recompiling():
  h, w_in, w_out, g = _inputs(jax.random.key(10))
  traces = []

  @jax.jit
  def step(h, w_in, w_out, step, warmup):
    traces.append(1)
    on = step >= warmup
    return jax.value_and_grad(
        _loss(lambda *a: xla_op(*a, on)[0], g), (0, 1, 2))(h, w_in, w_out)

  results = [step(h, w_in, w_out, jnp.int32(s), jnp.int32(3)) for s in (0, 2, 3, 5)]
  results.append(step(h, w_in, w_out, jnp.int32(5), jnp.int32(100)))  # another warm-up length
  assert len(traces) == 1, "the switch or the warm-up length caused a retrace"
  dense = jax.value_and_grad(_loss(lambda *a: xla_op(*a, False)[0], g), (0, 1, 2))
  sparse = jax.value_and_grad(_loss(lambda *a: xla_op(*a, True)[0], g), (0, 1, 2))
  d, s = dense(h, w_in, w_out), sparse(h, w_in, w_out)
  assert abs(float(d[0]) - float(s[0])) > 1e-3  # the two behaviours really differ
  for got, want in zip(results, [d, d, s, s, d]):
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
    _assert_grads_close(got[1], want[1], 1e-5, 1e-6)


def test_leading_batch_dims_and_bad_arguments():
  h, w_in, w_out, _ = _inputs(jax.random.key(11))
  out3, _ = xla_op(h.reshape(2, 12, -1), w_in, w_out, True)
  out2, _ = xla_op(h, w_in, w_out, True)
  np.testing.assert_array_equal(np.asarray(out3).reshape(out2.shape), np.asarray(out2))
  with pytest.raises(ValueError, match="backward mode"):
    xla_op(h, w_in, w_out, True, mode="soft")
  with pytest.raises(ValueError, match="dense_fraction"):
    xla_op(h, w_in, w_out, True, mode="split", dense_fraction=1.0)


def test_masked_mode_saves_only_the_compressed_activation():
  from elas_jax import memory
  t, k, f, n = 64, 16, 32, 8

  def make(b):
    return (jax.ShapeDtypeStruct((b * t, k), jnp.bfloat16), jax.ShapeDtypeStruct((f, k), jnp.bfloat16),
            jax.ShapeDtypeStruct((n, f), jnp.bfloat16))

  def sparse(h, wi, wo):
    return jnp.sum(xla_op(h, wi, wo, True)[0].astype(jnp.float32))

  res = memory.token_residuals(make, sparse, t)
  # h itself (k bf16), the kept values (f/2 bf16) and the metadata (f/8 bytes)
  assert memory.total_bytes_per_token(res) == 2 * k + 2 * (f // 2) + f // 8
