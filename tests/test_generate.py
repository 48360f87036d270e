"""KV-cached generation (elas_jax/decode.py, elas_jax/generate.py).

The reference throughout is the model's own full forward pass
(``Transformer.__call__`` on each unpadded prompt), which never sees the cache.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elas_jax import decode, model as model_lib
from tests.helpers import ROOT, TINY_TRAIN_FLAGS, tiny_train_config, xla_flags

jax.config.update("jax_default_matmul_precision", "highest")


def _model(variant: str, **overrides):
  cfg = tiny_train_config(variant, **overrides)
  return cfg, model_lib.build_model(cfg.model, seed=1)


def _prompts(vocab: int, lengths, seed: int = 0) -> list[np.ndarray]:
  rng = np.random.RandomState(seed)
  return [rng.randint(0, vocab, n).astype(np.int32) for n in lengths]


def _cached_logits(m, cfg, toks, prefill_lens, sparse_on, max_len=16, width=8):
  """Every position's logits, by a right-padded prefill of ``prefill_lens[i]``
  tokens per row, then one token per row per decode step."""
  b = len(toks)
  tok_BxP = np.zeros((b, width), np.int32)
  for i, t in enumerate(toks):
    tok_BxP[i, :prefill_lens[i]] = t[:prefill_lens[i]]
  cache = model_lib.init_cache(cfg.model, b, max_len)
  on = jnp.asarray(sparse_on)
  h, cache = m.forward_cached(jnp.asarray(tok_BxP), on, cache, jnp.zeros(b, jnp.int32))
  lg = np.asarray(m.logits(h))
  got = [[lg[i, j] for j in range(prefill_lens[i])] for i in range(b)]
  pos = np.array(prefill_lens, np.int32)
  for _ in range(max(len(t) for t in toks) - min(prefill_lens)):
    # Finished rows feed a dummy token; their outputs are ignored.
    step = np.array([t[p] if p < len(t) else 0 for t, p in zip(toks, pos)], np.int32)
    h, cache = m.forward_cached(jnp.asarray(step)[:, None], on, cache, jnp.asarray(pos))
    lg = np.asarray(m.logits(h))
    for i, t in enumerate(toks):
      if pos[i] < len(t):
        got[i].append(lg[i, 0])
    pos = pos + 1
  return [np.stack(g) for g in got]


@pytest.mark.parametrize("variant,sparse_on,scan", [
    ("full", False, False), ("loro", False, False), ("loro_relu2", False, False),
    ("elas", False, False), ("elas", True, False), ("cola", False, False),
    ("elas", True, True), ("loro", False, True)])
def test_cached_logits_equal_full_forward(variant, sparse_on, scan):
  # scan: the blocks stacked and run by lax.scan, the cache written per layer inside it
  cfg, m = _model(variant, **{"model.scan_layers": scan})
  toks = _prompts(cfg.model.vocab_size, [5, 13, 9, 1])
  got = _cached_logits(m, cfg, toks, prefill_lens=[3, 8, 1, 1], sparse_on=sparse_on)
  for t, g in zip(toks, got):
    ref, _ = m(jnp.asarray(t)[None], sparse_on)
    np.testing.assert_allclose(g, np.asarray(ref[0]), rtol=1e-5, atol=1e-5)


def test_cached_logits_equal_full_forward_pallas():
  """The interpreted Pallas FFN with T = batch tokens per decode step (padded
  to its token block inside the kernel)."""
  cfg, m = _model("elas", **{"model.kernel": "triton"})
  toks = _prompts(cfg.model.vocab_size, [4, 6, 3], seed=1)
  got = _cached_logits(m, cfg, toks, prefill_lens=[3, 4, 2], sparse_on=True, max_len=8, width=4)
  for t, g in zip(toks, got):
    ref, _ = m(jnp.asarray(t)[None], True)
    np.testing.assert_allclose(g, np.asarray(ref[0]), rtol=1e-5, atol=1e-5)


def _generator(cfg, m, **kw):
  from flax import nnx
  graphdef, params = nnx.split(m, nnx.Param)
  args = dict(batch_size=4, max_len=24, sparse_on=True, eos_id=-1, pad_id=0)
  args.update(kw)
  return decode.Generator(graphdef, params, cfg.model, **args)


def test_greedy_is_the_argmax_of_the_full_forward_and_deterministic(monkeypatch):
  cfg, m = _model("elas")
  traces = []
  real = model_lib.Transformer.forward_cached
  monkeypatch.setattr(model_lib.Transformer, "forward_cached",
                      lambda self, *a: traces.append(a[0].shape) or real(self, *a))
  gen = _generator(cfg, m, temperature=0.0)
  prompts = [p.tolist() for p in _prompts(cfg.model.vocab_size, [3, 7, 5])]
  out = gen.generate(prompts, max_new_tokens=6)
  # Reference: recompute the whole sequence with Transformer.__call__ per token.
  for p, res in zip(prompts, out):
    seq = list(p)
    for _ in range(6):
      ref, _ = m(jnp.asarray(seq)[None], True)
      seq.append(int(jnp.argmax(ref[0, -1])))
    assert res.tokens == seq[len(p):] and res.stop == "max_new_tokens"
  # Other prompt lengths in the same bucket (<= 8), any number of tokens: no new trace.
  n_traces = len(traces)
  again = gen.generate([prompts[1], prompts[0][:2], prompts[2], prompts[1][:6]], max_new_tokens=9)
  assert len(traces) == n_traces, traces[n_traces:]
  assert [r.tokens for r in gen.generate(prompts, max_new_tokens=6)] == [r.tokens for r in out]
  assert again[0].tokens[:6] == out[1].tokens


def test_stops_at_eos_and_cache_end():
  cfg, m = _model("loro")
  prompts = [p.tolist() for p in _prompts(cfg.model.vocab_size, [3, 5])]
  first = _generator(cfg, m, temperature=0.0).generate(prompts, max_new_tokens=4)
  eos = first[0].tokens[1]  # make row 0's second token the EOS
  out = _generator(cfg, m, temperature=0.0, eos_id=eos).generate(prompts, max_new_tokens=4)
  assert out[0].tokens == first[0].tokens[:2] and out[0].stop == "eos"
  assert eos in first[1].tokens or out[1].tokens == first[1].tokens
  # max_len 7: the 5-token prompt gets slots 5, 6 and then one last token.
  full = _generator(cfg, m, temperature=0.0, max_len=7).generate(prompts, max_new_tokens=10)
  assert len(full[1].tokens) == 3 and full[1].stop == "max_len"
  assert len(full[0].tokens) == 5 and full[0].stop == "max_len"


def test_stop_fn_ends_only_its_row_and_keeps_the_tokens():
  cfg, m = _model("loro")
  prompts = [p.tolist() for p in _prompts(cfg.model.vocab_size, [3, 5])]
  gen = _generator(cfg, m, temperature=0.0)
  first = gen.generate(prompts, max_new_tokens=5)
  calls = []
  out = gen.generate(prompts, max_new_tokens=5,
                     stop_fn=lambda row, toks: calls.append((row, list(toks))) or (row == 0 and len(toks) == 2))
  assert out[0].tokens == first[0].tokens[:2] and out[0].stop == "stop"
  assert out[1].tokens == first[1].tokens and out[1].stop == "max_new_tokens"
  assert (0, first[0].tokens[:1]) in calls and (1, first[1].tokens[:4]) in calls


def test_sampling_is_reproducible_by_seed():
  cfg, m = _model("full")
  gen = _generator(cfg, m, temperature=1.0, top_k=0, top_p=1.0)
  prompts = [p.tolist() for p in _prompts(cfg.model.vocab_size, [4, 2])]
  a = [r.tokens for r in gen.generate(prompts, 8, seed=3)]
  assert a == [r.tokens for r in gen.generate(prompts, 8, seed=3)]
  assert a != [r.tokens for r in gen.generate(prompts, 8, seed=4)]


def _draws(logits_V, n=4000, **kw):
  logits_NxV = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (n, len(logits_V)))
  return np.asarray(decode.sample(logits_NxV, jax.random.key(0), **kw))


LOGITS = np.log(np.array([0.30, 0.05, 0.20, 0.02, 0.15, 0.10, 0.08, 0.06, 0.03, 0.01]))


def _check_frequencies(draws, allowed, p_V):
  """Only ``allowed`` tokens, each with the renormalised probability (4 sigma)."""
  assert set(np.unique(draws)) <= set(allowed)
  q = np.zeros_like(p_V)
  q[list(allowed)] = p_V[list(allowed)]
  q /= q.sum()
  freq = np.bincount(draws, minlength=len(p_V)) / len(draws)
  sigma = np.sqrt(q * (1 - q) / len(draws))
  assert np.all(np.abs(freq - q) <= 4 * sigma + 1e-12), (freq, q)


def test_top_k_samples_only_the_k_most_likely():
  p = np.exp(LOGITS)
  _check_frequencies(_draws(LOGITS, temperature=1.0, top_k=3), {0, 2, 4}, p)


def test_top_p_samples_only_the_nucleus():
  p = np.exp(LOGITS)
  # Sorted: .30 .20 .15 .10 ... cumulative .30 .50 .65 .75: mass 0.6 needs the first three.
  _check_frequencies(_draws(LOGITS, temperature=1.0, top_p=0.6), {0, 2, 4}, p)
  _check_frequencies(_draws(LOGITS, temperature=1.0, top_p=0.3), {0}, p)
  # top_k first, then top_p within it: {0, 2} hold .5/.65 of the top-3 mass.
  _check_frequencies(_draws(LOGITS, temperature=1.0, top_k=3, top_p=0.5), {0, 2}, p)


def test_temperature_scales_the_distribution():
  t = 0.5
  p = np.exp(LOGITS / t) / np.exp(LOGITS / t).sum()
  _check_frequencies(_draws(LOGITS, temperature=t), set(range(10)), p)
  assert np.all(_draws(LOGITS, n=16, temperature=0.0) == 0)


# ----------------------------------------------------------- the command line


def _generate(*args, devices: int = 1, timeout: int = 300):
  env = dict(os.environ, PYTHONPATH=ROOT)
  if devices > 1:
    env["XLA_FLAGS"] = xla_flags(devices)
  return subprocess.run([sys.executable, "-m", "elas_jax.generate", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny ELAS model trained 6 steps (2:4 from step 3: decoding is sparse)."""
  w = tmp_path_factory.mktemp("gen") / "elas"
  p = subprocess.run(
      [sys.executable, "train.py", "--config=configs/tiny.py:elas", *TINY_TRAIN_FLAGS,
       "--config.data.read_threads=1", "--config.train.steps=6", "--config.train.eval_every=6",
       "--config.train.ckpt_every=6", f"--workdir={w}"],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  return str(w)


def _one_error_line(p):
  assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
  lines = [line for line in p.stderr.strip().splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
  return lines[0]


def test_cli_errors(workdir, tmp_path):
  assert "no checkpoints" in _one_error_line(_generate("--workdir", str(tmp_path), "--prompt", "Hi"))
  assert "--prompt is empty" in _one_error_line(_generate("--workdir", workdir, "--prompt", ""))
  line = _one_error_line(_generate("--workdir", workdir, "--prompt", "The history of " * 20,
                                   "--max_len", "16"))
  assert "KV cache holds --max_len=16" in line


def test_cli_generates_the_same_greedy_text_on_a_mesh_and_with_pallas(workdir, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("The history of\n\nIn 1990 the\nA\n")
  outs = []
  for devices, mesh in ((1, []), (2, ["--mesh", "2,1,1", "--kernel", "triton"])):
    out = tmp_path / f"out{devices}.jsonl"
    p = _generate("--workdir", workdir, "--prompts_file", str(prompts), "--temperature", "0",
                  "--max_new_tokens", "5", "--batch_size", "2", "--out", str(out), *mesh,
                  devices=devices)
    assert p.returncode == 0, p.stderr[-3000:]
    outs.append([json.loads(line) for line in out.read_text().splitlines()])
  assert outs[0] == outs[1]
  assert [o["prompt"] for o in outs[0]] == ["The history of", "In 1990 the", "A"]
  assert all(o["tokens"] >= 1 and o["stop"] in ("eos", "max_new_tokens") for o in outs[0])


def test_cli_streams_a_single_prompt(workdir):
  p = _generate("--workdir", workdir, "--prompt", "The history of", "--max_new_tokens", "6",
                "--seed", "1")
  assert p.returncode == 0, p.stderr[-3000:]
  assert p.stdout.startswith("The history of") and len(p.stdout.strip()) > len("The history of")


def test_inference_benchmark_smoke(tmp_path):
  p = subprocess.run([sys.executable, "-m", "benchmarks.inference", "--preset", "smoke", "--out",
                      str(tmp_path)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  res = json.loads((tmp_path / "results.json").read_text())
  assert {r["variant"] for r in res["generation"]} == {"full", "loro", "loro_relu2", "elas"}
  assert all(r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 for r in res["generation"])
  assert len(res["ffn"]) == 1 and res["recompute"]["speedup"] > 0
  assert "| ELAS vs full |" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_a_scanned_checkpoint_generates_in_its_layout_and_exports_per_layer(tmp_path):
  from flax import nnx

  from elas_jax import checkpointing, hf, stacking, trainer

  cfg = tiny_train_config("elas", **{"model.scan_layers": True, "train.steps": 5, "train.eval_every": 5,
                                     "train.ckpt_every": 5})
  trainer.train_and_evaluate(cfg, str(tmp_path / "run"))
  scanned = trainer.build(cfg)
  state = checkpointing.restore_state(str(tmp_path / "run"), 5, scanned.abstract_state)
  run, params, step = decode.load(str(tmp_path / "run"))
  assert step == 5
  assert run.cfg.model.scan_layers  # decoding runs the model as trained, scanned
  tokens = (jnp.arange(2 * 16).reshape(2, 16) * 7) % cfg.model.vocab_size
  want, _ = nnx.merge(scanned.graphdef, state.params)(tokens, True)  # the scanned model itself
  got, _ = nnx.merge(run.graphdef, params)(tokens, True)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # Greedy text of the scanned model equals that of the same weights in the per-layer layout.
  per_layer, per_layer_params = trainer.with_unscanned_layers(run, params)
  np.testing.assert_array_equal(stacking.unstack_layers(params)["embed"]["embedding"][...],
                                per_layer_params["embed"]["embedding"][...])
  texts = []
  for r, p in ((run, params), (per_layer, per_layer_params)):
    gen = decode.Generator(r.graphdef, p, r.cfg.model, batch_size=1, max_len=32, sparse_on=True,
                           eos_id=-1, pad_id=0, temperature=0.0, top_k=0, top_p=1.0)
    (res,) = gen.generate([[5, 9, 11]], max_new_tokens=6, seed=0)
    texts.append(res.tokens)
  assert len(texts[0]) == 6 and texts[0] == texts[1]
  out = hf.export_checkpoint(str(tmp_path / "run"), str(tmp_path / "hf"), dtype="float32")
  assert os.path.exists(tmp_path / "hf" / "model.safetensors") and out
