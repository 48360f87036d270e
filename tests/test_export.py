"""Hugging Face export and import (elas_jax/hf.py, elas_jax/cli/export.py).

The reference for the exported weights is a numpy forward pass written here
from Hugging Face's LlamaForCausalLM formulas (LlamaRMSNorm, rotate-half
rotary, causal softmax attention, LlamaMLP ``down(act(gate x) * up x)``), not
this project's model code. A test with transformers + torch runs only where
both import (requirements-interop.txt).
"""

import json
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from elas_jax import hf, model as model_lib, trainer
from elas_jax.errors import UserError
from tests.helpers import ROOT, tiny_train_config

VARIANTS = ("full", "loro", "loro_relu2", "elas")


def _random_params(model, seed: int) -> dict:
  """Weights of O(1) activations (init's 0.02 scale would hide mapping errors in tiny logits)."""
  rng = np.random.default_rng(seed)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

  def draw(path, x):
    name = str(path[-1].key)
    if name == "scale":
      return (1.0 + 0.2 * rng.standard_normal(x.shape)).astype(np.float32)
    std = 1.0 if name == "embedding" else x.shape[-1] ** -0.5
    return (std * rng.standard_normal(x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, params)


def _model(variant: str, seed: int = 0):
  """(model config, model with random weights, its pure-dict params)."""
  cfg = tiny_train_config(variant).model
  m = model_lib.build_model(cfg)
  params = _random_params(m, seed)
  state = nnx.state(m, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(m, state)
  return cfg, m, params


def _tokens(vocab: int, b: int = 2, l: int = 11) -> np.ndarray:
  return np.random.default_rng(1).integers(0, vocab, (b, l)).astype(np.int32)


# ---------------------------------------------------- the HF reference forward


def _rms_norm(x, w, eps):
  return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _rotate_half(x):
  h = x.shape[-1] // 2
  return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def hf_llama_logits(config: dict, t: dict, tokens: np.ndarray) -> np.ndarray:
  """LlamaForCausalLM's forward in float64 numpy, from the HF modeling formulas."""
  t = {k: v.astype(np.float64) for k, v in t.items()}
  b, l = tokens.shape
  n, hd = config["num_attention_heads"], config["head_dim"]
  eps = config["rms_norm_eps"]
  act = {"silu": lambda x: x / (1 + np.exp(-x)), "relu": lambda x: np.maximum(x, 0)}[config["hidden_act"]]
  inv_freq = 1.0 / config["rope_theta"] ** (np.arange(0, hd, 2) / hd)
  freqs = np.arange(l)[:, None] * inv_freq[None, :]
  emb = np.concatenate([freqs, freqs], axis=-1)  # [L, hd]
  cos, sin = np.cos(emb)[None, None], np.sin(emb)[None, None]
  mask = np.triu(np.full((l, l), -np.inf), k=1)
  h = t["model.embed_tokens.weight"][tokens]
  for i in range(config["num_hidden_layers"]):
    p = lambda name: t[f"model.layers.{i}.{name}.weight"]
    x = _rms_norm(h, p("input_layernorm"), eps)
    heads = lambda y: y.reshape(b, l, n, hd).transpose(0, 2, 1, 3)  # [B, N, L, hd]
    q, k, v = (heads(x @ p(f"self_attn.{w}_proj").T) for w in "qkv")
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd) + mask
    s = np.exp(s - s.max(-1, keepdims=True))
    o = (s / s.sum(-1, keepdims=True)) @ v
    h = h + o.transpose(0, 2, 1, 3).reshape(b, l, n * hd) @ p("self_attn.o_proj").T
    x = _rms_norm(h, p("post_attention_layernorm"), eps)
    h = h + (act(x @ p("mlp.gate_proj").T) * (x @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
  return _rms_norm(h, t["model.norm.weight"], eps) @ t["lm_head.weight"].T


def _hf_config(cfg, dtype="float32") -> dict:
  return hf.hf_config(cfg, dtype=dtype, bos_id=3, eos_id=1, pad_id=0, max_positions=32)


# ------------------------------------------------------------------- tests


def test_exported_names_and_shapes_are_the_llama_state_dict():
  cfg, _, params = _model("loro_relu2")
  d, f, v = cfg.d_model, cfg.ffn_dim, cfg.vocab_size
  want = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
  for i in range(cfg.n_layers):
    want.update({f"model.layers.{i}.self_attn.{x}_proj.weight": (d, d) for x in "qkvo"})
    want.update({f"model.layers.{i}.mlp.{x}_proj.weight": (f, d) for x in ("gate", "up")})
    want[f"model.layers.{i}.mlp.down_proj.weight"] = (d, f)
    want[f"model.layers.{i}.input_layernorm.weight"] = (d,)
    want[f"model.layers.{i}.post_attention_layernorm.weight"] = (d,)
  got = hf.hf_tensors(cfg, params)
  assert {k: x.shape for k, x in got.items()} == want
  assert all(x.dtype == np.float32 for x in got.values())


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_reference_forward_reproduces_the_logits(variant):
  """The exported safetensors, run through HF's formulas, give this model's (dense) logits."""
  cfg, m, params = _model(variant)
  tokens = _tokens(cfg.vocab_size)
  want = np.asarray(m(tokens, False)[0], np.float64)
  got = hf_llama_logits(_hf_config(cfg), hf.hf_tensors(cfg, params), tokens)
  assert np.abs(want).max() > 1.0  # the weights make logits of a size that shows mistakes
  np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), rtol=0)


def test_elas_export_is_the_dense_model_not_the_24_one():
  cfg, m, params = _model("elas")
  tokens = _tokens(cfg.vocab_size)
  sparse = np.asarray(m(tokens, True)[0])
  got = hf_llama_logits(_hf_config(cfg), hf.hf_tensors(cfg, params), tokens)
  assert np.abs(got - sparse).max() > 1e-2


def test_bfloat16_export_rounds_the_float32_weights():
  cfg, _, params = _model("loro")
  f32, bf16 = hf.hf_tensors(cfg, params, "float32"), hf.hf_tensors(cfg, params, "bfloat16")
  for k, x in bf16.items():
    assert x.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(x, f32[k].astype(ml_dtypes.bfloat16))
  b, a = params["blocks"][1]["ffn"]["down"]["b"], params["blocks"][1]["ffn"]["down"]["a"]
  np.testing.assert_allclose(f32["model.layers.1.mlp.down_proj.weight"], b @ a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["full", "loro_relu2"])
def test_config_fields(variant):
  cfg, _, _ = _model(variant)
  c = hf.hf_config(cfg, dtype="bfloat16", bos_id=3, eos_id=1, pad_id=0, max_positions=128)
  assert c["architectures"] == ["LlamaForCausalLM"] and c["model_type"] == "llama"
  assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (64, cfg.ffn_dim, 2)
  assert c["num_attention_heads"] == c["num_key_value_heads"] == 4 and c["head_dim"] == 16
  assert c["hidden_act"] == ("silu" if variant == "full" else "relu")
  assert (c["rms_norm_eps"], c["rope_theta"], c["vocab_size"]) == (1e-6, 10000.0, 4096)
  assert c["tie_word_embeddings"] is c["attention_bias"] is c["mlp_bias"] is False
  assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (3, 1, 0)
  assert c["max_position_embeddings"] == 128 and c["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_export_import_reproduces_the_logits(variant):
  cfg, m, params = _model(variant)
  hf_cfg, tensors = _hf_config(cfg), hf.hf_tensors(cfg, params)
  fields, pure = hf.params_from_hf(hf_cfg, tensors)
  assert fields["linear_kind"] == "full"
  assert fields["ffn_kind"] == ("swiglu" if variant in ("full", "loro") else "relu2")
  new_cfg = tiny_train_config("full").model
  for k, v in fields.items():
    new_cfg[k] = v
  back = model_lib.build_model(new_cfg)
  state = nnx.state(back, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(back, state)
  tokens = _tokens(cfg.vocab_size)
  want = np.asarray(m(tokens, False)[0])
  np.testing.assert_allclose(np.asarray(back(tokens, False)[0]), want, atol=1e-4 * np.abs(want).max(), rtol=0)


def test_cola_is_refused():
  cfg = tiny_train_config("cola").model
  with pytest.raises(UserError, match="linear_kind = 'cola'.*not a linear layer"):
    hf.check_exportable(cfg)
  with pytest.raises(UserError, match="cola"):
    hf.hf_tensors(cfg, {})


@pytest.mark.parametrize("change, message", [
    ({"num_key_value_heads": 2}, "num_key_value_heads = 2"),
    ({"attention_bias": True}, "attention_bias = True"),
    ({"mlp_bias": True}, "mlp_bias = True"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
    ({"hidden_act": "relu"}, "gate_proj != up_proj"),  # a SwiGLU export's gate differs from up
    ({"model_type": "mistral"}, "model_type = 'mistral'"),
    ({"head_dim": 8}, "head_dim = 8"),
])
def test_import_refuses_what_cannot_be_expressed(change, message):
  cfg, _, params = _model("full")
  hf_cfg = {**_hf_config(cfg), **change}
  with pytest.raises(UserError, match=message):
    hf.params_from_hf(hf_cfg, hf.hf_tensors(cfg, params))


def test_import_of_tied_embeddings_and_stale_buffers():
  cfg, m, params = _model("full")
  tensors = hf.hf_tensors(cfg, params)
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
  tied = {k: x for k, x in tensors.items() if k != "lm_head.weight"}
  tied["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(8, np.float32)
  _, pure = hf.params_from_hf({**_hf_config(cfg), "tie_word_embeddings": True}, tied)
  np.testing.assert_array_equal(pure["lm_head"]["w"], tensors["model.embed_tokens.weight"])
  with pytest.raises(UserError, match="missing.*lm_head"):
    hf.params_from_hf(_hf_config(cfg), tied)


def test_exported_tokenizer_json_encodes_like_the_project(tmp_path):
  from tokenizers import Tokenizer

  from elas_jax.data import corpus, tokenizer as tokenizer_lib

  tok = tokenizer_lib.load(tokenizer_lib.train_sample_tokenizer(4096))
  names = hf.write_tokenizer(tok, str(tmp_path), add_bos=False)
  assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= set(names)
  fast = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
  with open(corpus.sample_corpus()["validation"]) as f:
    docs = [json.loads(line)["text"] for line in f]
  docs += ["  leading,  inner   and trailing spaces ", "tab\tand\nnewlines\n\n", "ｆｕｌｌ ﬁ 😀 ✓", ""]
  for d in docs:
    ids = fast.encode(d).ids  # with the post-processor: no BOS when data.add_bos is False
    assert ids == tok.encode(d), d[:60]
    assert fast.decode(ids) == tok.decode(ids)
  hf.write_tokenizer(tok, str(tmp_path), add_bos=True)
  fast = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
  assert fast.encode("Some text").ids == [tok.bos_id] + tok.encode("Some text")
  cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
  assert (cfg["eos_token"], cfg["bos_token"], cfg["pad_token"]) == ("</s>", "<s>", "<pad>")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny loro_relu2 run (2 steps), exported in float32."""
  root = tmp_path_factory.mktemp("export")
  workdir, out = str(root / "run"), str(root / "hf")
  cfg = tiny_train_config("loro_relu2", **{"train.steps": 2, "train.eval_every": 2, "train.ckpt_every": 2})
  trainer.train_and_evaluate(cfg, workdir)
  summary = hf.export_checkpoint(workdir, out, dtype="float32")
  return workdir, out, summary


def test_export_then_import_evaluates_the_same(trained, tmp_path):
  """CLI functions end to end: export, import into a new workdir, same validation loss."""
  workdir, out, summary = trained
  assert set(summary["files"]) >= {"config.json", "model.safetensors", "generation_config.json",
                                   "README.md", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"}
  card = open(os.path.join(out, "README.md")).read()
  assert "Validation perplexity" in card and '"variant": "loro_relu2"' in card
  imported = str(tmp_path / "imported")
  base = tiny_train_config("full", **{"train.eval_tokens": 2048})
  got = hf.import_hf(out, imported, base)
  assert got["ffn_kind"] == "relu2" and os.path.isfile(got["config"])
  a, b = trainer.evaluate_checkpoint(workdir), trainer.evaluate_checkpoint(imported)
  assert b["step"] == 0 and a["eval_tokens"] == b["eval_tokens"]
  assert abs(a["eval_loss"] - b["eval_loss"]) < 1e-5, (a, b)
  with pytest.raises(UserError, match="already holds checkpoints"):
    hf.import_hf(out, imported, base)


def test_cli_errors_are_one_line(tmp_path):
  env = {**os.environ, "PYTHONPATH": ROOT}
  for args in (["--workdir", str(tmp_path / "none"), "--out", str(tmp_path / "o")],
               ["import", "--hf", str(tmp_path), "--workdir", str(tmp_path / "w")]):
    p = subprocess.run([sys.executable, "-m", "elas_jax.export", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr


@pytest.mark.parametrize("variant", ["full", "loro_relu2", "elas"])
def test_transformers_loads_the_export_with_the_same_logits(variant, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from safetensors.numpy import save_file

  cfg, m, params = _model(variant)
  save_file(hf.hf_tensors(cfg, params), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  (tmp_path / "config.json").write_text(json.dumps(_hf_config(cfg)))
  llama = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.float32).eval()
  tokens = _tokens(cfg.vocab_size)
  with torch.no_grad():
    got = llama(torch.from_numpy(tokens).long()).logits.numpy()
  want = np.asarray(m(tokens, False)[0])
  np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)


def test_transformers_tokenizer_of_the_export(trained):
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from elas_jax.data import tokenizer as tokenizer_lib

  _, out, _ = trained
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  tok = tokenizer_lib.load(os.path.join(out, "tokenizer.model"))
  text = "The history of  the  world\nbegins ﬁ."
  assert hf_tok(text)["input_ids"] == tok.encode(text)
  assert hf_tok.eos_token_id == tok.eos_id


_BESIDE = r"""
import json, sys
import elas_jax, elas_kernels.ffn  # noqa: F401  (ours first, from the repository root)
import kernels
from transformers import LlamaForCausalLM  # imports Hugging Face's kernels package
from elas_jax import trainer
from tests.helpers import step_losses, tiny_train_config
common = {"train.steps": 2, "train.eval_every": 2, "train.ckpt_every": 2, "train.eval_tokens": 512,
          "model.sparsity.dense_warmup_steps": 1}
losses = {}
for kernel in sys.argv[2:]:
  trainer.train_and_evaluate(tiny_train_config(**common, **{"model.kernel": kernel}),
                             f"{sys.argv[1]}/{kernel}")
  losses[kernel] = step_losses(f"{sys.argv[1]}/{kernel}")
print(json.dumps({"kernels": kernels.__file__, "llama": LlamaForCausalLM.__name__,
                  "losses": losses}))
"""


@pytest.mark.slow
def test_transformers_and_hf_kernels_work_beside_elas_jax(tmp_path):
  # transformers >= 5.25 imports Hugging Face's `kernels` package; run from the repository
  # root with ours imported first, it gets HF's, and a training step runs through our Triton
  # and Mosaic kernels (interpreted) in the same process, with the XLA op's losses.
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  hf_kernels = pytest.importorskip("kernels")
  from elas_kernels.ffn.mosaic import compat

  impls = ["xla", "triton"] + ([] if compat.unavailable_reason() else ["mosaic"])
  p = subprocess.run([sys.executable, "-c", _BESIDE, str(tmp_path), *impls], cwd=ROOT,
                     capture_output=True, text=True, timeout=1800)
  assert p.returncode == 0, p.stderr[-3000:]
  got = json.loads(p.stdout.strip().splitlines()[-1])
  assert got["kernels"] == hf_kernels.__file__ and got["llama"] == "LlamaForCausalLM"
  want = got["losses"]["xla"]
  for impl in impls[1:]:
    np.testing.assert_allclose([got["losses"][impl][s] for s in sorted(want)],
                               [want[s] for s in sorted(want)], rtol=2e-5)
