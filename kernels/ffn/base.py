"""The contract of the 2:4-sparse squared-ReLU FFN core, written once for every backend.

    out_TxN, stats = ffn(h_TxK, w_in_FxK, w_out_NxF, sparse_on, mode=..., dense_fraction=...)
    out = sparsify_24(relu(h @ w_inᵀ)²) @ w_outᵀ

For a low-rank FFN ``h`` is the rank-r code ``x A_upᵀ``, ``w_in = B_up`` and
``w_out = A_down`` (``K`` and ``N`` are ranks; the ``[T, F]`` activation is
the only big tensor). This module holds what every implementation shares:

* :func:`check_args`: the argument checks and their messages (shapes, dtypes,
  backward mode, split mode's dense fraction), run before anything is traced;
* :func:`reference`: the plain-jnp definition (no ``custom_vjp``), whose
  ``jax.grad`` is the gradient every backend is tested against;
* the statistics' definition (:func:`statistics`);
* the pieces backends share: :func:`ffn_grads` (the backward's three products)
  and the dense ``F % 4`` tail (:func:`tail_forward`, :func:`tail_grads`);
* :class:`FfnCore`, the base class: ``__call__`` checks, asks the backend
  whether it can serve the call (:meth:`FfnCore.check_servable`, raising
  ``NotImplementedError`` with the reason, which a dispatcher may fall through
  on) and runs the backend's :meth:`FfnCore._core`.

Semantics. ``y1 = h @ w_inᵀ`` accumulates in fp32 and is rounded to ``h``'s
dtype; ``y2 = relu(y1)²``; with ``sparse_on`` (a traced bool: flipping it
never recompiles) every group of 4 features keeps its 2 largest entries
(:mod:`elas_kernels.sparse24`), else everything (the dense warm-up); the
``F % 4`` tail is always dense. Backward modes:

* ``masked``: the exact gradient of the sparse forward (needs only the
  compressed activation: 9/16 of the dense bf16 bytes);
* ``ste``: straight-through, the mask passes gradient unchanged (needs the
  dense ``relu(y1)``, recomputed);
* ``split``: ``masked`` for ``h`` and ``w_in``; ``w_out``'s gradient sees the
  activation with token-wise 2:4 (in :func:`~elas_kernels.sparse24.split_token_order`)
  on all but the ``dense_fraction`` densest features (Haziza et al.).

In the dense warm-up every mode's gradient is the dense FFN's.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp

from elas_kernels import sparse24
from elas_kernels.gpu import GpuSpec

BACKWARD_MODES = ("masked", "ste", "split")
BackwardMode = Literal["masked", "ste", "split"]
# checkpoint_name of the compressed activation (and what goes with it) in a
# backend's residuals: a remat policy that saves this name keeps it instead of
# re-running the forward (names inside a custom_vjp's fwd rule are seen by
# jax.checkpoint policies).
SAVED_24_NAME = "elas_24_activation"
Stats = dict[str, jax.Array]


# --------------------------------------------------------------------------
# Arguments.
# --------------------------------------------------------------------------


def check_options(mode: str, dense_fraction: float) -> None:
  """The backward-mode options (every backend's, and the config's)."""
  if mode not in BACKWARD_MODES:
    raise ValueError(f"unknown 2:4 backward mode {mode!r}; expected one of {BACKWARD_MODES}")
  if not 0.0 <= dense_fraction < 1.0:
    raise ValueError(f"dense_fraction must be in [0, 1), got {dense_fraction}")


@dataclasses.dataclass(frozen=True)
class Call:
  """The static facts of one checked call (``h`` flattened to ``[T, K]``)."""

  lead: tuple[int, ...]  # h's leading dimensions
  t: int
  k: int
  f: int
  n: int
  dtype: jnp.dtype
  mode: str
  dense_fraction: float

  @property
  def f_main(self) -> int:
    """Features in complete 2:4 groups (the ``F % 4`` tail stays dense)."""
    return self.f - self.f % sparse24.GROUP


def check_args(what: str, h: jax.Array, w_in_FxK: jax.Array, w_out_NxF: jax.Array, mode: str,
               dense_fraction: float) -> Call:
  """Check one call's arguments (``what`` names the implementation in the messages)."""
  check_options(mode, dense_fraction)
  if h.ndim < 1 or w_in_FxK.ndim != 2 or w_out_NxF.ndim != 2:
    raise ValueError(f"{what}: expected h [..., K], w_in [F, K], w_out [N, F]; got "
                     f"{h.shape}, {w_in_FxK.shape}, {w_out_NxF.shape}")
  k = h.shape[-1]
  f, n = w_in_FxK.shape[0], w_out_NxF.shape[0]
  if w_in_FxK.shape[1] != k or w_out_NxF.shape[1] != f:
    raise ValueError(f"{what}: shapes do not chain: h {h.shape}, w_in {w_in_FxK.shape}, "
                     f"w_out {w_out_NxF.shape}")
  if f < sparse24.GROUP:
    raise ValueError(f"{what}: {f} features form no 2:4 group")
  dtypes = {jnp.dtype(x.dtype) for x in (h, w_in_FxK, w_out_NxF)}
  if len(dtypes) != 1 or not jnp.issubdtype(next(iter(dtypes)), jnp.floating):
    raise ValueError(f"{what}: h, w_in and w_out must share one floating dtype; got "
                     f"{h.dtype}, {w_in_FxK.dtype}, {w_out_NxF.dtype}")
  lead = tuple(h.shape[:-1])
  t = 1
  for d in lead:
    t *= d
  return Call(lead, t, k, f, n, jnp.dtype(h.dtype), mode, float(dense_fraction))


# --------------------------------------------------------------------------
# The definition.
# --------------------------------------------------------------------------


def statistics(zeros: jax.Array, total: jax.Array, dropped: jax.Array, count: int) -> Stats:
  """The sparsity statistics of one call from fp32 sums over the ``count = T·F`` entries of
  ``y2 = relu(y1)²``: ``zero_frac``, the fraction exactly zero; ``dropped_mass``, the
  fraction of its mass 2:4 drops (or would drop, in the dense warm-up; the dense tail
  drops nothing). No gradient flows through them."""
  return {"zero_frac": zeros / count,
          "dropped_mass": dropped / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)}


def reference(h: jax.Array, w_in_FxK: jax.Array, w_out_NxF: jax.Array, sparse_on, *,
              mode: str = "masked", dense_fraction: float = 0.05) -> tuple[jax.Array, Stats]:
  """Plain jnp, no ``custom_vjp``: the op, differentiated by ``jax.grad`` itself, so that
  the tests' gradients do not share the code under test.

  Each backward mode is written as the forward whose autodiff is that mode:
  ``masked`` is autodiff of the 2:4-masked forward; ``ste`` adds the mask as a
  constant (``y2 + stop_gradient(y2s - y2)``: the value is ``y2s``, the gradient
  passes the mask); ``split`` feeds ``w_out`` a zero-valued term whose
  gradient is the token-wise 2:4 activation. The selection rules come from
  :mod:`elas_kernels.sparse24` (tested there against numpy).
  """
  lead = h.shape[:-1]
  h_TxK = h.reshape(-1, h.shape[-1])
  sparse_on = jnp.asarray(sparse_on, bool)
  y1 = jnp.einsum("tk,fk->tf", h_TxK, w_in_FxK, preferred_element_type=jnp.float32)
  r = jnp.maximum(y1.astype(h.dtype), 0)
  y2 = r * r
  keep24 = sparse24.mask_24(y2)
  y2s = jnp.where(keep24 | ~sparse_on, y2, jnp.zeros((), y2.dtype))
  if mode == "ste":
    y2s = y2 + jax.lax.stop_gradient(y2s - y2)
  if mode != "split":
    out = jnp.einsum("tf,nf->tn", y2s, w_out_NxF, preferred_element_type=jnp.float32)
  else:  # w_out's gradient from a zero-valued term: gᵀ y2_dw
    y2c = jax.lax.stop_gradient(y2s)
    dense_F = sparse24.densest_features(jnp.sum(y2c != 0, axis=0), dense_fraction)
    y2_dw = jnp.where(sparse24.token_keep_24(y2c, dense_F) | ~sparse_on, y2c, 0)
    w_const = jax.lax.stop_gradient(w_out_NxF)
    out = (jnp.einsum("tf,nf->tn", y2s, w_const, preferred_element_type=jnp.float32)
           + jnp.einsum("tf,nf->tn", y2_dw, w_out_NxF - w_const, preferred_element_type=jnp.float32))
  y2f = jax.lax.stop_gradient(y2).astype(jnp.float32)
  stats = statistics(jnp.sum((y2f == 0).astype(jnp.float32)), jnp.sum(y2f),
                     jnp.sum(jnp.where(keep24, 0.0, y2f)), y2f.size)
  return out.astype(h.dtype).reshape(*lead, -1), stats


# --------------------------------------------------------------------------
# Pieces the backends share.
# --------------------------------------------------------------------------


def matmul_t(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a @ bᵀ`` accumulated in fp32, returned in ``a``'s dtype."""
  return jnp.einsum("tk,fk->tf", a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def ffn_grads(g_TxN: jax.Array, h_TxK: jax.Array, w_in_FxK: jax.Array, w_out_NxF: jax.Array,
              dy2_dy1_TxF: jax.Array, y2_dw_TxF: jax.Array
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """fp32 gradients ``(d_h, d_w_in, d_w_out)`` of ``out = y2 @ w_outᵀ``, ``y1 = h @ w_inᵀ``.

  ``dy2_dy1`` is ``d(y2)/d(y1)`` as the backward mode defines it (``2 relu(y1)``,
  zero where 2:4 dropped for the exact masked gradient) and ``y2_dw`` the
  activation ``w_out``'s gradient sees. ``dy1`` is rounded to ``h``'s dtype,
  as the forward rounds ``y1``. For fewer than a 2:4 group of features (the dense
  tail) ``d_h`` is :func:`small_outer`'s, which XLA fuses into the add to the main part.
  """
  dy2 = jnp.einsum("tn,nf->tf", g_TxN, w_out_NxF, preferred_element_type=jnp.float32)
  dy1 = (dy2 * dy2_dy1_TxF.astype(jnp.float32)).astype(h_TxK.dtype)
  d_w_out = jnp.einsum("tn,tf->nf", g_TxN, y2_dw_TxF, preferred_element_type=jnp.float32)
  d_w_in = jnp.einsum("tf,tk->fk", dy1, h_TxK, preferred_element_type=jnp.float32)
  if w_in_FxK.shape[0] < sparse24.GROUP:
    d_h = small_outer(dy1, w_in_FxK)
  else:
    d_h = jnp.einsum("tf,fk->tk", dy1, w_in_FxK, preferred_element_type=jnp.float32)
  return d_h, d_w_in, d_w_out


def small_outer(a_TxJ: jax.Array, b_JxN: jax.Array) -> jax.Array:
  """``a @ b`` in fp32 for a few ``J`` (the ``F % 4 <= 3`` tail features) written as
  ``J`` broadcast products: element-wise, so XLA fuses it into the pass that adds it to
  the kernels' output (a dot was a GEMM of its own writing ``[T, N]`` fp32, then a
  second pass to add it: ~35 µs at 1B shapes, compiled for the H200)."""
  a, b = a_TxJ.astype(jnp.float32), b_JxN.astype(jnp.float32)
  return sum(a[:, j, None] * b[None, j, :] for j in range(a.shape[1]))


def tail_forward(h_TxK: jax.Array, w_in_FxK: jax.Array, w_out_NxF: jax.Array, f_main: int
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The dense ``F % 4`` tail in XLA, for backends whose kernels take whole 2:4 groups:
  ``(out_TxN fp32, relu(y1) of the tail, its zeros and its mass per token)``; never
  dropped."""
  r_tail = jnp.maximum(matmul_t(h_TxK, w_in_FxK[f_main:]), 0)
  y2_tail = r_tail * r_tail
  out = small_outer(y2_tail, w_out_NxF[:, f_main:].T)
  y2t = y2_tail.astype(jnp.float32)
  return out, r_tail, jnp.sum((y2t == 0).astype(jnp.float32), axis=1), jnp.sum(y2t, axis=1)


def finish_forward(out_TxN: jax.Array, stats_Tx3: jax.Array, h_TxK: jax.Array,
                   w_in_FxK: jax.Array, w_out_NxF: jax.Array, f_padded: int
                   ) -> tuple[jax.Array, Stats, jax.Array | None]:
  """A kernel forward's results -> the op's ``(out, stats, relu(y1) of the tail or None)``.

  ``out_TxN`` (fp32 or the compute dtype) and ``stats_Tx3`` (per token: zeros, mass and
  2:4-dropped mass of ``y2`` over the ``f_padded`` features the kernels saw, the ``F % 4``
  tail excluded) are in call order with padding dropped; the dense tail is added here, in
  XLA."""
  t, f = h_TxK.shape[0], w_in_FxK.shape[0]
  f_main = f - f % sparse24.GROUP
  r_tail = None
  if f_main != f:
    out_tail, r_tail, zeros_tail, total_tail = tail_forward(h_TxK, w_in_FxK, w_out_NxF, f_main)
    out_TxN = out_TxN + out_tail
    # the tail's per-token sums join the kernels' before the one reduction below
    stats_Tx3 = stats_Tx3 + jnp.stack([zeros_tail, total_tail, jnp.zeros_like(total_tail)], 1)
  # one reduction for the three (XLA launched one small kernel per column summed)
  zeros, total, dropped = jnp.sum(stats_Tx3, axis=0)
  zeros = zeros - t * (f_padded - f_main)  # padded features are zeros
  return out_TxN.astype(h_TxK.dtype), statistics(zeros, total, dropped, t * f), r_tail


def tail_grads(g_TxN: jax.Array, h_TxK: jax.Array, w_in_FxK: jax.Array, w_out_NxF: jax.Array,
               f_main: int, r_tail: jax.Array, mode: str, dense_F: jax.Array | None,
               sparse_on: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """fp32 ``(d_h, d_w_in, d_w_out)`` of the dense tail (:func:`tail_forward`); in ``split``
  mode ``w_out``'s gradient applies the token-wise 2:4 with the whole width's
  ``dense_F`` (bool ``[F]``) as the 2:4 part does."""
  y2_tail = r_tail * r_tail
  if mode == "split":
    keep = sparse24.token_keep_24(y2_tail, dense_F[f_main:])
    y2_tail = jax.lax.select(sparse_on, jnp.where(keep, y2_tail, 0), y2_tail)
  return ffn_grads(g_TxN, h_TxK, w_in_FxK[f_main:], w_out_NxF[:, f_main:], 2 * r_tail, y2_tail)


# --------------------------------------------------------------------------
# The base class.
# --------------------------------------------------------------------------


class FfnCore:
  """One implementation of the FFN core; a backend implements :meth:`_core` (and, if
  it saves an activation for backward, :meth:`saved_activation`).

  Args:
    interpret: run Pallas kernels in jax's interpreter (CPU). Default: False when
      a ``gpu`` is named (build for it), else True unless jax's default backend
      is a GPU. Ignored by XLA.
    gpu: the GPU the kernels are built for (tile tables, SMs, shared memory);
      None: :data:`elas_kernels.gpu.H200`. Given by the caller, which knows the
      compile target; never read from ``jax.devices()``.
  """

  name: ClassVar[str] = "reference"
  # An opaque custom call XLA's SPMD partitioner cannot split: a dispatcher on a
  # mesh runs it per device (``shard_map``); False for plain XLA ops.
  per_device: ClassVar[bool] = True

  def __init__(self, *, interpret: bool | None = None, gpu: GpuSpec | None = None):
    if interpret is None:
      interpret = gpu is None and jax.default_backend() != "gpu"
    self.interpret = bool(interpret)
    self.gpu = gpu

  @property
  def what(self) -> str:
    return f"elas_ffn ({self.name})"

  def check_servable(self, call: Call) -> None:
    """Raise ``NotImplementedError`` with the reason when this backend cannot serve ``call``
    (a dtype, a shape, a GPU, a jax version); ``ValueError`` for bad options."""
    del call

  def _core(self, call: Call, h_TxK: jax.Array, w_in_FxK: jax.Array, w_out_NxF: jax.Array,
            sparse_on: jax.Array) -> tuple[jax.Array, Stats]:
    """The checked call on ``h`` flattened to ``[T, K]``: ``([T, N] output, stats)``."""
    raise NotImplementedError(f"{type(self).__name__} implements no FFN core")

  def __call__(self, h: jax.Array, w_in_FxK: jax.Array, w_out_NxF: jax.Array,
               sparse_on: jax.Array | bool, *, mode: BackwardMode = "masked",
               dense_fraction: float = 0.05) -> tuple[jax.Array, Stats]:
    """``([..., N] output, {"zero_frac", "dropped_mass"} fp32 scalars)``; see the module
    docstring for the semantics of ``sparse_on``, ``mode`` and ``dense_fraction``."""
    call = check_args(self.what, h, w_in_FxK, w_out_NxF, mode, dense_fraction)
    self.check_servable(call)
    out_TxN, stats = self._core(call, h.reshape(call.t, call.k), w_in_FxK, w_out_NxF,
                                jnp.asarray(sparse_on, dtype=bool))
    return out_TxN.reshape(*call.lead, call.n), stats

  def saved_activation(self, h: jax.Array, w_in_FxK: jax.Array, w_out_NxF: jax.Array, *,
                       mode: BackwardMode = "masked") -> tuple[jax.Array, jax.Array]:
    """What the training forward keeps for backward, decoded to
    :func:`~elas_kernels.sparse24.compress_24`'s layout: ``relu(y1)`` at the 2:4-kept
    positions of the ``F - F % 4`` grouped features (values ``[T, F_main/2]``, uint8
    metadata ``[T, ceil(F_main/8)]``), in the 2:4 phase (``sparse_on``)."""
    raise NotImplementedError(f"{self.what} keeps no compressed activation")
