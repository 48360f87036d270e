"""benchmarks/step_memory.py: the compiled step's bytes against independent estimates.

The smoke preset (tiny shapes) is compiled once per module; every check compares
XLA's numbers with a count made without XLA (the abstract train state's bytes,
the ``[T, V]`` fp32 logits a loss without chunking has to hold) or with steps
compiled at other micro-batches than the fit was made from.
"""

import numpy as np
import pytest

from benchmarks import step_memory


@pytest.fixture(scope="module")
def smoke():
  p = step_memory.PRESETS["smoke"]
  rows, notes = step_memory.run(p["sizes"], p["variants"], p["settings"], p["batches"], p["depths"],
                                p["seq_len"], log=lambda s: None, base=p["base"], loss_chunk=p["loss_chunk"])
  cfg = step_memory.make_config(f"{step_memory.harness.ROOT}/{p['sizes']['tiny']}:elas", p["base"], layers=None,
                                batch=p["batches"][0], seq_len=p["seq_len"])
  return {r.setting: r for r in rows}, notes, cfg


def logits_bytes_per_token(cfg) -> int:
  return cfg.model.vocab_size * 4  # one fp32 row of [T, V]


def test_argument_bytes_are_the_state_and_the_batch(smoke):
  rows, _, cfg = smoke
  r = rows["default"]
  for b, point in r.points.items():
    batch_bytes = 3 * b * cfg.train.seq_len * 4  # inputs, targets, mask: int32 [b, L]
    # XLA may pad buffers a little; the count itself must be the state's.
    assert point.argument == pytest.approx(r.state["total"] + batch_bytes, rel=0.01)
    # The state is donated: its outputs are written in place.
    assert point.alias >= r.state["params"] + r.state["opt_state"]


def test_default_step_holds_the_full_logits(smoke):
  rows, _, cfg = smoke
  r = rows["default"]
  # Without chunking the fp32 logits [T, V] and the softmax gradient are alive
  # at once: the step grows by at least one logits row per extra token.
  assert r.act_per_token >= logits_bytes_per_token(cfg)
  assert r.temp_per_token >= logits_bytes_per_token(cfg)
  fixed, per_seq = r.fit()
  assert fixed >= r.state["total"]  # the state is there at any micro-batch


def _peak_at(cfg_overrides, batch: int) -> float:
  p = step_memory.PRESETS["smoke"]
  cfg = step_memory.make_config(f"{step_memory.harness.ROOT}/{p['sizes']['tiny']}:elas",
                                {**p["base"], **cfg_overrides}, layers=None, batch=batch, seq_len=p["seq_len"])
  return step_memory.measure(cfg).peak


def test_fit_predicts_a_third_micro_batch(smoke):
  # The line through the compiles at micro-batches 2 and 4 predicts the peak of a
  # step compiled at 8.
  rows, _, _ = smoke
  r = rows["default"]
  fixed, per_seq = r.fit()
  assert fixed + 8 * per_seq == pytest.approx(_peak_at(step_memory.settings(32)["default"], 8), rel=0.03)


def test_chunked_loss_saves_the_logits(smoke):
  rows, notes, cfg = smoke
  base, chunked = rows["default"], rows["loss"]
  v = logits_bytes_per_token(cfg)
  # The chunked loss keeps only [T, d] and per-token scalars: its per-token
  # activation is below the dense logits alone, and it saves at least one
  # logits row per token against the dense step.
  assert chunked.act_per_token < v
  assert base.act_per_token - chunked.act_per_token >= v
  # Same state either way.
  np.testing.assert_allclose(chunked.at().argument, base.at().argument)


def test_max_batch_is_the_largest_that_fits(smoke):
  # A capacity between the compiled peaks at micro-batches 6 and 7: the fit made
  # from micro-batches 2 and 4 must give 6.
  rows, _, _ = smoke
  r = rows["default"]
  over = step_memory.settings(32)["default"]
  p6, p7 = _peak_at(over, 6), _peak_at(over, 7)
  assert p6 < p7
  assert r.max_batch((p6 + p7) / 2 / 1e9) == 6
