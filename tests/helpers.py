"""Shared test helpers."""

import os

from elas_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xla_flags(devices: int) -> str:
  """``XLA_FLAGS`` for a subprocess with ``devices`` CPU devices: the session's own flags
  (tests/conftest.py) kept, so that both sides of a comparison compile alike."""
  keep = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join(keep + [f"--xla_force_host_platform_device_count={devices}"])


def require_deviceless() -> None:
  """Skip (with the reason) unless this process can compile for a GPU with no GPU
  present: the jax CUDA plugin installed and the deviceless environment set."""
  import pytest

  from elas_jax import targets

  if not targets.plugin_available():
    pytest.skip(f"needs the jax CUDA plugin: {targets.install_hint()}")
  try:
    targets.check_environment()
  except targets.MissingCudaPlugin as e:
    pytest.skip(str(e))


def ffn_inputs(seed: int, t: int, f: int, k: int, n: int, dtype):
  """Random ``h [t, k]``, ``w_in [f, k]``, ``w_out [n, f]`` (scaled like the model's) in
  ``dtype`` and an fp32 output cotangent ``[t, n]``, for the FFN core's tests."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  h = jax.random.normal(ks[0], (t, k), jnp.float32)
  w_in = jax.random.normal(ks[1], (f, k), jnp.float32) / np.sqrt(k)
  w_out = jax.random.normal(ks[2], (n, f), jnp.float32) / np.sqrt(f)
  cot = jax.random.normal(ks[3], (t, n), jnp.float32)
  return h.astype(dtype), w_in.astype(dtype), w_out.astype(dtype), cot


def ffn_value_and_grads(fn, h, w_in, w_out, cot):
  """``(out, stats, (d_h, d_w_in, d_w_out))`` of ``fn(h, w_in, w_out) -> (out, stats)``
  under ``jit``, for the loss ``sum(out · cot)``."""
  import jax
  import jax.numpy as jnp

  def loss(h, w_in, w_out):
    out, stats = fn(h, w_in, w_out)
    return jnp.sum(out.astype(jnp.float32) * cot), (out, stats)

  (_, (out, stats)), grads = jax.jit(
      jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(h, w_in, w_out)
  return out, stats, grads


# The primitives a Pallas kernel launch appears as in a jaxpr (pallas_call: Triton-style
# and Mosaic GPU's pallas_call; plgpu.kernel: core_map / mpmd_map, by jax version).
KERNEL_PRIMITIVES = ("pallas_call", "core_map", "mpmd_map")


def _sub_jaxprs(params):
  for v in params:
    if hasattr(v, "eqns") or hasattr(getattr(v, "jaxpr", None), "eqns"):
      yield v
    elif isinstance(v, (tuple, list)):
      yield from _sub_jaxprs(v)


def kernel_launches(jaxpr) -> int:
  """Pallas kernels one evaluation of ``jaxpr`` launches, counted through its
  sub-jaxprs (jit, shard_map, custom_vjp, ...); of a ``cond``'s branches, the
  one that launches most (one branch runs)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # ClosedJaxpr -> Jaxpr
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in KERNEL_PRIMITIVES:
      total += 1
      continue
    subs = [kernel_launches(j) for j in _sub_jaxprs(eqn.params.values())]
    total += max(subs, default=0) if eqn.primitive.name == "cond" else sum(subs)
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


def load_config(path: str, variant: str):
  """A config from ``configs/`` (path relative to the repository root)."""
  return config_lib.load(f"{os.path.join(ROOT, path)}:{variant}")


# The shrunken tiny model (d=64, 2 layers, 4 heads, rank 16, FFN 258 = ReLU² with
# a dense tail of 2 features, or SwiGLU 172), its optimizer and batch, shared by
# the in-process tests (tiny_train_config) and the train.py subprocess tests
# (TINY_TRAIN_FLAGS), so both train the same model.
TINY_OVERRIDES = {
    "model.d_model": 64, "model.n_heads": 4, "model.n_layers": 2, "model.rank": 16,
    "model.sparsity.dense_warmup_steps": 4, "optimizer.warmup_steps": 2, "optimizer.exact_every": 5,
    "train.batch_size": 8, "train.seq_len": 32, "train.log_every": 1, "train.eval_tokens": 2048,
    "data.read_threads": 1,
}


def tiny_ffn_dim(ffn_kind: str) -> int:
  return 258 if ffn_kind == "relu2" else 172


def tiny_train_config(variant: str = "elas", **overrides):
  """The shrunken tiny model: 12 steps of well under a second each on CPU.

  ``overrides`` are dotted paths: ``tiny_train_config(**{"train.steps": 6})``.
  """
  c = config_lib.override(load_config("configs/tiny.py", variant), TINY_OVERRIDES)
  c.model.ffn_dim = tiny_ffn_dim(c.model.ffn_kind)
  c.train.steps, c.train.eval_every, c.train.ckpt_every = 12, 6, 3
  config_lib.override(c, overrides)
  config_lib.validate(c)
  return c


def read_metrics(workdir: str) -> list[dict]:
  import json
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def step_losses(workdir: str) -> dict[int, float]:
  """step -> training loss, asserting no step was logged twice."""
  out: dict[int, float] = {}
  for m in read_metrics(workdir):
    if "loss" in m:
      assert m["step"] not in out, f"step {m['step']} logged twice"
      out[m["step"]] = m["loss"]
  return out


# train.py flags for tiny_train_config("elas")'s model, optimizer and batch (the
# tiny config's default variant); train.steps, eval_every and ckpt_every stay the
# caller's choice (the tiny config's 600 / 200 / 200 otherwise).
TINY_TRAIN_FLAGS = ([f"--config.{key}={value}" for key, value in TINY_OVERRIDES.items()]
                    + [f"--config.model.ffn_dim={tiny_ffn_dim('relu2')}"])


def assert_trainings_match(tmp_path, want_cfg, got_cfg, rtol: float) -> None:
  """Trains both configs in ``tmp_path``; per-step losses and the final evaluation
  must agree within ``rtol`` (and cover the same steps and eval tokens)."""
  import numpy as np

  from elas_jax import trainer

  runs = {}
  for name, cfg in (("want", want_cfg), ("got", got_cfg)):
    final = trainer.train_and_evaluate(cfg, os.path.join(str(tmp_path), name))
    runs[name] = (final, step_losses(os.path.join(str(tmp_path), name)))
  (want, want_losses), (got, got_losses) = runs["want"], runs["got"]
  steps = list(range(1, want_cfg.train.steps + 1))
  assert sorted(got_losses) == sorted(want_losses) == steps
  np.testing.assert_allclose([got_losses[s] for s in steps], [want_losses[s] for s in steps], rtol=rtol)
  np.testing.assert_allclose(got["eval_loss"], want["eval_loss"], rtol=rtol)
  assert got["eval_tokens"] == want["eval_tokens"]


# ------------------------------------------------------- small filesystems


def _mount_or_skip(args: list[str], what: str) -> None:
  import shutil
  import subprocess

  import pytest

  if shutil.which(args[0]) is None:
    pytest.skip(f"{what}: no {args[0]} command here")
  try:
    p = subprocess.run(args, capture_output=True, text=True, timeout=60)
  except OSError as e:
    pytest.skip(f"{what}: {e}")
  if p.returncode != 0:
    pytest.skip(f"{what} is not permitted here ({(p.stderr or p.stdout).strip()[:200]}); "
                "the storage fault tests need root (mount)")


def _unmount(path) -> None:
  import subprocess

  subprocess.run(["umount", "-l", str(path)], capture_output=True)


def mounted_tmpfs(path, size: str):
  """A context manager: a tmpfs of ``size`` (e.g. ``"256k"``) mounted at ``path``; the
  test is skipped where mounting is not permitted."""
  import contextlib

  @contextlib.contextmanager
  def mount():
    os.makedirs(path, exist_ok=True)
    _mount_or_skip(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   "mounting a tmpfs")
    try:
      yield path
    finally:
      _unmount(path)

  return mount()


def mounted_ext4(path, image, size_mb: int = 32):
  """A context manager: a fresh ext4 filesystem of ``size_mb`` in the file ``image``,
  mounted at ``path`` with ``errors=remount-ro``; yields the path of its
  ``trigger_fs_error`` switch (writing 1 there makes the kernel turn the
  filesystem read-only, open files included, as after a disk error). Skipped
  where loop devices, mkfs.ext4 or mounting are not available."""
  import contextlib
  import subprocess

  import pytest

  @contextlib.contextmanager
  def mount():
    os.makedirs(path, exist_ok=True)
    with open(image, "wb") as f:
      f.truncate(size_mb << 20)
    _mount_or_skip(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], "mkfs.ext4")
    _mount_or_skip(["mount", "-o", "loop,errors=remount-ro", str(image), str(path)],
                   "mounting an ext4 image on a loop device")
    try:
      dev = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(path)], capture_output=True,
                           text=True).stdout.strip()
      trigger = f"/sys/fs/ext4/{os.path.basename(dev)}/trigger_fs_error"
      if not dev or not os.path.exists(trigger):
        pytest.skip(f"no {trigger}: cannot make the filesystem fail")
      yield trigger
    finally:
      _unmount(path)

  return mount()
