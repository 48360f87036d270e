"""Hugging Face export and import (the command: :mod:`elas_jax.cli.export`).

Export writes a directory that ``transformers.LlamaForCausalLM.from_pretrained``
loads: ``config.json``, ``model.safetensors`` (written with the ``safetensors``
numpy API, no torch), ``generation_config.json``, the tokenizer
(``tokenizer.json`` + ``tokenizer_config.json``, and the SentencePiece
``tokenizer.model`` when the run used one) and a ``README.md`` model card.

The mapping (this model is the same function as ``LlamaForCausalLM``: rotate-half
rotary, ``[out, in]`` weights, pre-norm RMSNorm, untied head):

* ``full`` linears are copied; ``lowrank`` linears are merged, W = B·A, in
  float32 before the cast to ``--dtype``;
* the SwiGLU FFN is LlamaMLP with ``hidden_act = "silu"``; the gate-less
  squared-ReLU FFN ``down(relu(U x)²)`` is LlamaMLP with ``hidden_act = "relu"``
  and ``gate_proj = up_proj = U``, since relu(u)·u = relu(u)²;
* ELAS checkpoints export as that dense ReLU² model: transformers does not
  apply the 2:4 activation mask (docs/export.md gives the perplexity change);
* CoLA (σ(x Aᵀ) Bᵀ) is not a linear layer and is refused.

Import reads a Llama directory (safetensors, one file or an index) into a
full-rank checkpoint of this project at step 0 with a fresh optimizer state,
plus ``OUT/hf_config.py``, a config file holding the imported config, so that
``python -m elas_jax.evaluate --workdir OUT`` and ``python train.py --config
OUT/hf_config.py --workdir OUT`` continue from it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import numpy as np

from elas_jax.errors import UserError


# Projections of one decoder layer: (our module path, HF name).
_ATTN = (("attn", "q", "self_attn.q_proj"), ("attn", "k", "self_attn.k_proj"),
         ("attn", "v", "self_attn.v_proj"), ("attn", "o", "self_attn.o_proj"))
# HF keys that are buffers, not weights (older transformers saved them).
_IGNORED_KEYS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
# Config fields LlamaConfig has that must hold these values for an exact import.
_IMPORT_REQUIRED = {"attention_bias": False, "mlp_bias": False, "rope_scaling": None}


# ------------------------------------------------------------------- export


def check_exportable(model_cfg) -> None:
  """Raises :class:`UserError` for models LlamaForCausalLM cannot express."""
  if model_cfg.linear_kind == "cola":
    raise UserError("config.model.linear_kind = 'cola': CoLA's σ(x Aᵀ) Bᵀ is not a linear layer, "
                    "so it cannot be expressed as LlamaForCausalLM; export full, loro, loro_relu2 "
                    "or elas runs")
  if model_cfg.linear_kind not in ("full", "lowrank"):
    raise UserError(f"config.model.linear_kind = {model_cfg.linear_kind!r} cannot be exported")
  if model_cfg.ffn_kind not in ("swiglu", "relu2"):
    raise UserError(f"config.model.ffn_kind = {model_cfg.ffn_kind!r} cannot be exported")


def _weight_f32(linear: dict[str, Any]) -> np.ndarray:
  """The ``[out, in]`` matrix of one linear, merged (W = B·A) in float32."""
  if "w" in linear:
    return np.asarray(linear["w"], np.float32)
  return np.asarray(linear["b"], np.float32) @ np.asarray(linear["a"], np.float32)


def hf_tensors(model_cfg, params: dict[str, Any], dtype: str = "float32") -> dict[str, np.ndarray]:
  """The LlamaForCausalLM state dict for ``params`` (``nnx.to_pure_dict`` of the model)."""
  import ml_dtypes

  check_exportable(model_cfg)
  np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
  out = {"model.embed_tokens.weight": np.asarray(params["embed"]["embedding"], np.float32),
         "model.norm.weight": np.asarray(params["final_norm"]["scale"], np.float32),
         "lm_head.weight": _weight_f32(params["lm_head"])}
  for i in range(model_cfg.n_layers):
    blk, pre = params["blocks"][i], f"model.layers.{i}."
    out[pre + "input_layernorm.weight"] = np.asarray(blk["attn_norm"]["scale"], np.float32)
    out[pre + "post_attention_layernorm.weight"] = np.asarray(blk["ffn_norm"]["scale"], np.float32)
    for mod, name, hf in _ATTN:
      out[pre + hf + ".weight"] = _weight_f32(blk[mod][name])
    ffn = blk["ffn"]
    up = _weight_f32(ffn["up"])
    # relu2: gate = up = U, so LlamaMLP's act(gate x)·(up x) = relu(Ux)·(Ux) = relu(Ux)².
    out[pre + "mlp.gate_proj.weight"] = _weight_f32(ffn["gate"]) if model_cfg.ffn_kind == "swiglu" else up
    out[pre + "mlp.up_proj.weight"] = up
    out[pre + "mlp.down_proj.weight"] = _weight_f32(ffn["down"])
  return {k: np.ascontiguousarray(v.astype(np_dtype)) for k, v in out.items()}


def hf_config(model_cfg, *, dtype: str, bos_id: int, eos_id: int, pad_id: int,
              max_positions: int) -> dict[str, Any]:
  """``config.json`` of the exported LlamaForCausalLM."""
  check_exportable(model_cfg)
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": model_cfg.vocab_size,
      "hidden_size": model_cfg.d_model,
      "intermediate_size": model_cfg.ffn_dim,
      "num_hidden_layers": model_cfg.n_layers,
      "num_attention_heads": model_cfg.n_heads,
      "num_key_value_heads": model_cfg.n_heads,
      "head_dim": model_cfg.d_model // model_cfg.n_heads,
      "hidden_act": "silu" if model_cfg.ffn_kind == "swiglu" else "relu",
      "rms_norm_eps": model_cfg.norm_eps,
      "rope_theta": model_cfg.rope_theta,
      "rope_scaling": None,
      # The training context; rotary itself has no length limit.
      "max_position_embeddings": max_positions,
      "tie_word_embeddings": False,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "mlp_bias": False,
      "pretraining_tp": 1,
      "initializer_range": 0.02,
      "use_cache": True,
      "bos_token_id": bos_id if bos_id >= 0 else None,
      "eos_token_id": eos_id,
      "pad_token_id": pad_id,
      "torch_dtype": dtype,
  }


def _sp_to_tokenizer_json(sp_path: str):
  """A ``tokenizers`` Tokenizer that encodes like ``SentencePieceProcessor.encode`` (unigram models).

  SentencePiece's own normalizer (the precompiled NFKC charsmap) is kept, its
  whitespace cleanup (strip, collapse runs of spaces) is spelt out, and the
  dummy ``▁`` prefix is the Metaspace pre-tokenizer's.
  """
  from sentencepiece import sentencepiece_model_pb2
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

  proto = sentencepiece_model_pb2.ModelProto()
  with open(sp_path, "rb") as f:
    proto.ParseFromString(f.read())
  if proto.trainer_spec.model_type != proto.trainer_spec.UNIGRAM:
    return None
  spec = proto.normalizer_spec
  tok = Tokenizer(models.Unigram([(p.piece, p.score) for p in proto.pieces], proto.trainer_spec.unk_id,
                                 proto.trainer_spec.byte_fallback))
  norm = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
  if spec.remove_extra_whitespaces:
    norm += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
  tok.normalizer = normalizers.Sequence(norm)
  scheme = "always" if spec.add_dummy_prefix else "never"
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
  tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1 if spec.add_dummy_prefix else 0, 0)])
  control = proto.pieces[0].CONTROL
  tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                          for p in proto.pieces if p.type == control])
  return tok


def write_tokenizer(tok, out: str, add_bos: bool) -> list[str]:
  """Tokenizer files for ``out`` that tokenise as this project does; returns their names."""
  from elas_jax.data.tokenizer import SentencePieceTokenizer

  written = []
  if isinstance(tok, SentencePieceTokenizer):
    shutil.copyfile(tok.path, os.path.join(out, "tokenizer.model"))
    written.append("tokenizer.model")
    fast = _sp_to_tokenizer_json(tok.path)
    names = {i: tok._sp.id_to_piece(i) for i in (tok.bos_id, tok.eos_id, tok.pad_id, tok._sp.unk_id())
             if i >= 0}
  else:
    from tokenizers import Tokenizer

    fast = Tokenizer.from_file(tok.path)
    names = {i: fast.id_to_token(i) for i in (tok.bos_id, tok.eos_id, tok.pad_id) if i >= 0}
  if fast is not None:
    from tokenizers import processors

    # The pipeline encodes documents without special tokens and prepends BOS
    # only with data.add_bos; HF's tokenizer(text) does the same.
    if add_bos and tok.bos_id >= 0:
      bos = names[tok.bos_id]
      fast.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, tok.bos_id)])
    else:
      fast.post_processor = None
    fast.save(os.path.join(out, "tokenizer.json"))
    written.append("tokenizer.json")
  cfg: dict[str, Any] = {
      # Fast tokenizer from tokenizer.json as written; the slow LlamaTokenizer
      # (legacy mode, i.e. plain SentencePiece) when only tokenizer.model exists.
      "tokenizer_class": "PreTrainedTokenizerFast" if fast is not None else "LlamaTokenizer",
      "eos_token": names[tok.eos_id],
      "pad_token": names.get(tok.pad_id),
      "bos_token": names.get(tok.bos_id),
      "add_bos_token": bool(add_bos),
      "add_eos_token": False,
      "clean_up_tokenization_spaces": False,
      "model_max_length": 1_000_000_000,
  }
  if isinstance(tok, SentencePieceTokenizer):
    cfg["unk_token"] = names.get(tok._sp.unk_id())
    cfg["legacy"] = True
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump(cfg, f, indent=1)
  special = {k: v for k, v in cfg.items() if k.endswith("_token") and isinstance(v, str)}
  with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
    json.dump(special, f, indent=1)
  return written + ["tokenizer_config.json", "special_tokens_map.json"]


def _eval_record(workdir: str, step: int) -> dict | None:
  """The ``metrics.jsonl`` record with an evaluation at ``step`` (else the latest one before it)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  best = None
  with open(path) as f:
    for line in f:
      try:
        r = json.loads(line)
      except json.JSONDecodeError:
        continue
      if "eval_ppl" in r and r.get("step", 0) <= step and (best is None or r["step"] >= best["step"]):
        best = r
  return best


def _card(cfg, step: int, dtype: str, record: dict | None, files: list[str]) -> str:
  m = cfg.model
  kind = {"full": "full-rank", "lowrank": f"low-rank (LORO, rank {m.rank}; exported merged W = B·A)"}
  ffn = ("SwiGLU" if m.ffn_kind == "swiglu" else
         "squared ReLU, exported as LlamaMLP with hidden_act relu and gate_proj = up_proj")
  lines = [
      "---", "library_name: transformers", "tags: [llama, elas-jax]", "---", "",
      f"# ELAS-JAX {cfg.size} {cfg.variant}", "",
      f"A LLaMA decoder pre-trained with ELAS-JAX, exported at step {step} in {dtype}.", "",
      f"- linears: {kind[m.linear_kind]}", f"- FFN: {ffn} (width {m.ffn_dim})",
      f"- d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads, vocabulary {m.vocab_size}, "
      f"trained on sequences of {cfg.train.seq_len} tokens",
  ]
  if m.sparsity.enabled:
    lines += ["", "**ELAS caveat.** Training applied 2:4 activation sparsity in the FFN after "
              f"{m.sparsity.dense_warmup_steps} dense warm-up steps. transformers does not apply the "
              "2:4 mask: this export is the *dense* ReLU² model with the same weights, so its "
              "perplexity differs from the 2:4 evaluation below (see docs/export.md of ELAS-JAX)."]
  lines += ["", "## Evaluation", ""]
  if record is not None:
    how = "2:4-sparse FFN" if m.sparsity.enabled and record["step"] >= m.sparsity.dense_warmup_steps else "as trained"
    lines.append(f"Validation perplexity {record['eval_ppl']:.3f} (loss {record['eval_loss']:.4f}, "
                 f"{record.get('eval_tokens', 0):,} tokens) at step {record['step']}, evaluated by "
                 f"ELAS-JAX ({how}).")
  else:
    lines.append("No evaluation was recorded in metrics.jsonl.")
  lines += ["", "## Usage", "", "```python",
            "from transformers import AutoTokenizer, LlamaForCausalLM",
            "model = LlamaForCausalLM.from_pretrained(PATH)",
            "tok = AutoTokenizer.from_pretrained(PATH)", "```", "",
            f"Files: {', '.join(sorted(files))}.", "",
            "## Training config", "", "```json", cfg.to_json_best_effort(indent=1), "```", ""]
  return "\n".join(lines)


def export_checkpoint(workdir: str, out: str, step: int | None = None, dtype: str = "bfloat16") -> dict:
  """Writes the Hugging Face directory ``out`` for a checkpoint of ``workdir``."""
  import jax
  from flax import nnx
  from safetensors.numpy import save_file

  from elas_jax import checkpointing, trainer

  cfg, step = checkpointing.load_config(workdir, step)
  check_exportable(cfg.model)
  if os.path.exists(out) and os.listdir(out):
    raise UserError(f"--out={out}: directory exists and is not empty; choose a new one")
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = -1, 1, 1  # the export gathers every weight anyway
  run = trainer.build(cfg)
  state = checkpointing.restore_state(workdir, step, run.abstract_state)
  run, params = trainer.with_unscanned_layers(run, state.params)
  cfg = run.cfg
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(jax.device_get(params)))
  tensors = hf_tensors(cfg.model, params, dtype)
  os.makedirs(out, exist_ok=True)
  save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
  tok = run.tokenizer
  config = hf_config(cfg.model, dtype=dtype, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
                     max_positions=cfg.train.seq_len)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f, indent=1)
  gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
  with open(os.path.join(out, "generation_config.json"), "w") as f:
    json.dump(gen, f, indent=1)
  files = ["config.json", "model.safetensors", "generation_config.json", "README.md"]
  files += write_tokenizer(tok, out, cfg.data.add_bos)
  with open(os.path.join(out, "README.md"), "w") as f:
    f.write(_card(cfg, step, dtype, _eval_record(workdir, step), files))
  return {"out": out, "step": step, "dtype": dtype, "variant": cfg.variant, "files": sorted(files)}


# ------------------------------------------------------------------- import


def read_hf(hf_dir: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """``config.json`` and the float32 tensors of a Hugging Face directory (safetensors only)."""
  from safetensors.numpy import load_file

  cfg_path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(cfg_path):
    raise UserError(f"--hf={hf_dir}: no config.json (not a Hugging Face model directory)")
  with open(cfg_path) as f:
    config = json.load(f)
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
    files = ["model.safetensors"]
  else:
    raise UserError(f"--hf={hf_dir}: no model.safetensors(.index.json); only safetensors weights "
                    "can be imported (convert .bin files with transformers' save_pretrained)")
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    for k, v in load_file(os.path.join(hf_dir, name)).items():
      tensors[k] = v.astype(np.float32)
  return config, tensors


def model_fields(config: dict[str, Any], tensors: dict[str, np.ndarray]) -> dict[str, Any]:
  """``config.model`` fields for a Llama config, or :class:`UserError` for what cannot be expressed."""
  if config.get("model_type") != "llama":
    raise UserError(f"config.json model_type = {config.get('model_type')!r}: only 'llama' can be imported")
  need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
  missing = [k for k in need if k not in config]
  if missing:
    raise UserError(f"config.json lacks {', '.join(missing)}")
  d, heads = config["hidden_size"], config["num_attention_heads"]
  if config.get("num_key_value_heads", heads) != heads:
    raise UserError(f"config.json num_key_value_heads = {config['num_key_value_heads']} != "
                    f"num_attention_heads = {heads}: grouped-query attention is not supported here")
  if config.get("head_dim", d // heads) * heads != d:
    raise UserError(f"config.json head_dim = {config['head_dim']}: only head_dim = hidden_size / "
                    "num_attention_heads is supported")
  for key, want in _IMPORT_REQUIRED.items():
    if config.get(key, want) != want:
      raise UserError(f"config.json {key} = {config[key]!r}: only {json.dumps(want)} can be imported")
  if config.get("pretraining_tp", 1) != 1:
    raise UserError(f"config.json pretraining_tp = {config['pretraining_tp']}: only 1 is supported")
  act = config.get("hidden_act", "silu")
  if act == "silu":
    ffn_kind = "swiglu"
  elif act == "relu":
    # relu(G x)·(U x) is this project's ReLU² FFN only when G = U.
    for i in range(config["num_hidden_layers"]):
      pre = f"model.layers.{i}.mlp."
      if not np.array_equal(tensors.get(pre + "gate_proj.weight"), tensors.get(pre + "up_proj.weight")):
        raise UserError(f"config.json hidden_act = 'relu' with {pre}gate_proj != up_proj: only the "
                        "squared-ReLU FFN (gate_proj = up_proj) can be imported")
    ffn_kind = "relu2"
  else:
    raise UserError(f"config.json hidden_act = {act!r}: only 'silu' (SwiGLU) and 'relu' with "
                    "gate_proj = up_proj (squared ReLU) can be imported")
  return {"vocab_size": config["vocab_size"], "d_model": d, "n_layers": config["num_hidden_layers"],
          "n_heads": heads, "ffn_dim": config["intermediate_size"], "ffn_kind": ffn_kind,
          "linear_kind": "full", "rope_theta": float(config.get("rope_theta", 10000.0)),
          "norm_eps": float(config.get("rms_norm_eps", 1e-6))}


def expected_shapes(fields: dict[str, Any], tied: bool = False) -> dict[str, tuple[int, ...]]:
  """The LlamaForCausalLM state-dict names and shapes for ``fields`` (no GQA, no biases)."""
  d, f, v = fields["d_model"], fields["ffn_dim"], fields["vocab_size"]
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  if not tied:
    shapes["lm_head.weight"] = (v, d)
  for i in range(fields["n_layers"]):
    pre = f"model.layers.{i}."
    shapes[pre + "input_layernorm.weight"] = (d,)
    shapes[pre + "post_attention_layernorm.weight"] = (d,)
    for _, _, hf in _ATTN:
      shapes[pre + hf + ".weight"] = (d, d)
    shapes[pre + "mlp.gate_proj.weight"] = (f, d)
    shapes[pre + "mlp.up_proj.weight"] = (f, d)
    shapes[pre + "mlp.down_proj.weight"] = (d, f)
  return shapes


def params_from_hf(config: dict[str, Any], tensors: dict[str, np.ndarray]
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
  """``(config.model fields, nnx pure-dict params)`` of a full-rank model equal to the HF one."""
  fields = model_fields(config, tensors)
  tied = bool(config.get("tie_word_embeddings", False))
  tensors = {k: v for k, v in tensors.items() if not _IGNORED_KEYS.fullmatch(k)}
  if tied:  # the same function with the head untied (training then updates them separately)
    tensors.setdefault("lm_head.weight", tensors.get("model.embed_tokens.weight"))
  want = expected_shapes(fields)
  extra, missing = sorted(set(tensors) - set(want)), sorted(set(want) - set(tensors))
  if extra or missing:
    raise UserError(f"weights do not match a Llama model of this config: unexpected {extra[:3]}, "
                    f"missing {missing[:3]}")
  for k, shape in want.items():
    if tensors[k].shape != shape:
      raise UserError(f"weight {k} has shape {tuple(tensors[k].shape)}, expected {shape} from config.json")
  t = tensors
  params: dict[str, Any] = {"embed": {"embedding": t["model.embed_tokens.weight"]},
                            "final_norm": {"scale": t["model.norm.weight"]},
                            "lm_head": {"w": t["lm_head.weight"]}, "blocks": {}}
  for i in range(fields["n_layers"]):
    pre = f"model.layers.{i}."
    blk = {"attn_norm": {"scale": t[pre + "input_layernorm.weight"]},
           "ffn_norm": {"scale": t[pre + "post_attention_layernorm.weight"]},
           "attn": {name: {"w": t[pre + hf + ".weight"]} for _, name, hf in _ATTN},
           "ffn": {"up": {"w": t[pre + "mlp.up_proj.weight"]}, "down": {"w": t[pre + "mlp.down_proj.weight"]}}}
    if fields["ffn_kind"] == "swiglu":
      blk["ffn"]["gate"] = {"w": t[pre + "mlp.gate_proj.weight"]}
    params["blocks"][i] = blk
  return fields, params


def imported_config(base, fields: dict[str, Any], hf_dir: str, config: dict[str, Any], workdir: str):
  """``base`` (a config of this project) with the imported model and its tokenizer."""
  import ml_collections

  from elas_jax import config_lib

  cfg = ml_collections.ConfigDict(base.to_dict())
  if cfg.optimizer.name != "adamw":
    raise UserError(f"config.optimizer.name = {cfg.optimizer.name!r}: an imported model is full-rank; "
                    "use a :full config (e.g. --config configs/tiny.py:full)")
  for k, v in fields.items():
    cfg.model[k] = v
  cfg.model.sparsity.enabled = bool(cfg.model.sparsity.enabled and fields["ffn_kind"] == "relu2")
  cfg.variant = "full" if fields["ffn_kind"] == "swiglu" else "full_relu2"
  cfg.size = f"hf-{os.path.basename(os.path.normpath(hf_dir))}"
  for name in ("tokenizer.model", "tokenizer.json"):  # SentencePiece first: the project's own kind
    src = os.path.join(hf_dir, name)
    if os.path.isfile(src):
      os.makedirs(workdir, exist_ok=True)
      dst = os.path.abspath(os.path.join(workdir, name))
      shutil.copyfile(src, dst)
      cfg.data.tokenizer = dst
      break
  if "max_position_embeddings" in config and cfg.train.seq_len > config["max_position_embeddings"]:
    cfg.train.seq_len = int(config["max_position_embeddings"])
  config_lib.validate(cfg)
  return cfg


_CONFIG_PY = '''"""The config of a model imported from Hugging Face (written by elas_jax.export import)."""

import json

import ml_collections

_CONFIG = json.loads(r"""{config}""")


def get_config():
  """The imported config; override fields with --config.<field>=value."""
  return ml_collections.ConfigDict(_CONFIG)
'''


def import_hf(hf_dir: str, workdir: str, base_cfg) -> dict:
  """Writes a step-0 full-rank checkpoint of the HF model in ``hf_dir`` to ``workdir``."""
  import jax
  from flax import nnx

  from elas_jax import checkpointing, model as model_lib, trainer
  from elas_jax.data import pipeline

  if os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(os.path.join(workdir, "checkpoints")):
    raise UserError(f"--workdir={workdir} already holds checkpoints; import into a new workdir")
  config, tensors = read_hf(hf_dir)
  fields, pure = params_from_hf(config, tensors)
  cfg = imported_config(base_cfg, fields, hf_dir, config, workdir)
  run = trainer.build(cfg)
  abstract = nnx.state(nnx.eval_shape(lambda: model_lib.build_model(cfg.model, seed=cfg.seed)), nnx.Param)
  param_dtype = model_lib.DTYPES[cfg.model.param_dtype]
  nnx.replace_by_pure_dict(abstract, jax.tree.map(lambda x: np.asarray(x).astype(param_dtype), pure))
  state = jax.jit(lambda p: trainer.TrainState.create(p, run.tx),
                  out_shardings=run.state_shardings)(abstract)
  train_docs = pipeline.open_split(cfg, "train")
  pipeline.check_prepared(train_docs, run.tokenizer)
  data_iter = iter(pipeline.train_dataset(train_docs, run.tokenizer, run.spec))
  os.makedirs(workdir, exist_ok=True)
  with checkpointing.WorkdirLock(workdir):
    mngr = checkpointing.manager(workdir, cfg.train.keep_checkpoints)
    try:
      checkpointing.save(mngr, 0, state, data_iter, cfg)
      mngr.wait_until_finished()
    finally:
      mngr.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(cfg.to_json_best_effort(indent=1))
  config_py = os.path.join(workdir, "hf_config.py")
  with open(config_py, "w") as f:
    f.write(_CONFIG_PY.format(config=json.dumps(cfg.to_dict(), indent=1)))
  return {"workdir": workdir, "config": config_py, "ffn_kind": fields["ffn_kind"],
          "tokenizer": cfg.data.tokenizer}
