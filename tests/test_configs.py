"""Configs: every size and variant loads; impossible configs fail naming the field."""

import json
import os
import re
import subprocess
import sys

import pytest

from elas_jax import config_lib
from tests.helpers import ROOT, load_config

CONFIG_FILES = ["configs/tiny.py"] + [f"configs/llama_{s}.py" for s in ("60m", "130m", "350m", "1b")]
# SwiGLU FFN width and ReLU² (1.5x) width per size: the ELAS paper's table, and the
# tiny model's as its docstring states them.
FFN_WIDTHS = {"60m": (1376, 2064), "130m": (2048, 3072), "350m": (2736, 4104), "1b": (5461, 8191),
              "tiny": (344, 516)}


@pytest.mark.parametrize("path", CONFIG_FILES)
@pytest.mark.parametrize("variant", config_lib.VARIANTS)
def test_every_size_and_variant_loads(path, variant):
  c = load_config(path, variant)
  m = c.model
  assert c.variant == variant
  assert m.sparsity.enabled == (variant == "elas")
  assert m.ffn_kind == ("relu2" if variant in ("loro_relu2", "elas") else "swiglu")
  assert m.linear_kind == {"full": "full", "cola": "cola"}.get(variant, "lowrank")
  assert c.optimizer.name == ("loro_adamw" if m.linear_kind == "lowrank" else "adamw")
  swiglu, relu2 = FFN_WIDTHS[c.size]  # literal widths, not a restated formula
  assert m.ffn_dim == (relu2 if m.ffn_kind == "relu2" else swiglu)


def test_paper_shapes():
  shapes = {"60m": (512, 1376, 8, 8, 128, 500), "130m": (768, 2048, 12, 12, 256, 500),
            "350m": (1024, 2736, 24, 16, 256, 500), "1b": (2048, 5461, 24, 32, 512, 200)}
  for size, (d, f, layers, heads, r, k) in shapes.items():
    c = load_config(f"configs/llama_{size}.py", "loro")
    assert (c.model.d_model, c.model.ffn_dim, c.model.n_layers, c.model.n_heads, c.model.rank,
            c.optimizer.exact_every) == (d, f, layers, heads, r, k)
    assert (c.train.batch_size, c.train.seq_len, c.model.vocab_size) == (512, 256, 32000)
  assert load_config("configs/llama_1b.py", "elas").model.ffn_dim == 8191


def test_paper_configs_default_to_the_papers_data_protocol():
  # GaLore (torchrun_main.py, peft_pretraining/dataloader.py) and LORO (run_c4.py): the
  # t5-base tokenizer, tokenizer(text, max_length=256, truncation=True, padding="max_length")
  # per document (no BOS; EOS kept), total batch 512, a 32000-entry vocabulary, evaluation
  # until 10M tokens. The tiny config keeps its sample-corpus settings.
  papers = {"data.tokenizer": "hf:google-t5/t5-base", "data.packing": "truncate_pad", "data.add_bos": False,
            "train.seq_len": 256, "train.batch_size": 512, "model.vocab_size": 32000,
            "train.eval_tokens": 10_000_000}
  tiny = {"data.tokenizer": "", "data.packing": "concat", "data.add_bos": False, "train.seq_len": 128,
          "train.batch_size": 16, "model.vocab_size": 4096, "train.eval_tokens": 65_536}
  resolved = lambda c: {k: c[k.split(".")[0]][k.split(".")[1]] for k in papers}
  for size in ("60m", "130m", "350m", "1b"):
    for variant in config_lib.VARIANTS:
      assert resolved(load_config(f"configs/llama_{size}.py", variant)) == papers, (size, variant)
  assert resolved(load_config("configs/tiny.py", "elas")) == tiny
  assert load_config("configs/tiny.py", "elas").data.source == "sample"


def _modified(path, variant, **changes):
  return config_lib.override(load_config(path, variant), changes)


@pytest.mark.parametrize("changes,field", [
    ({"model.rank": 512}, "model.rank"),                 # rank >= min(d, f)
    ({"model.rank": 0}, "model.rank"),
    ({"model.n_heads": 7}, "model.n_heads"),             # does not divide 512
    ({"model.ffn_dim": 3}, "model.ffn_dim"),             # no 2:4 group
    ({"model.ffn_kind": "swiglu"}, "model.sparsity.enabled"),
    ({"model.dtype": "float16"}, "model.dtype"),
    ({"model.sparsity.backward": "soft"}, "model.sparsity.backward"),
    ({"model.sparsity.dense_warmup_steps": -1}, "model.sparsity.dense_warmup_steps"),
    ({"model.linear_kind": "full"}, "optimizer.name"),    # LORO needs low-rank factors
    ({"train.steps": 0}, "train.steps"),
    ({"train.batch_size": -4}, "train.batch_size"),
    ({"optimizer.lr": 0.0}, "optimizer.lr"),
    ({"optimizer.warmup_steps": 10**9}, "optimizer.warmup_steps"),
    ({"model.sparsity.dense_warmup_steps": 10_001}, "model.sparsity.dense_warmup_steps"),  # > steps
    ({"data.source": "c5"}, "data.source"),
    ({"model.kernel": "cuda"}, "model.kernel"),
    ({"model.kernel": "pallas", "model.sparsity.enabled": False}, "model.kernel"),  # 2:4 only
])
def test_impossible_config_names_the_field(changes, field):
  c = _modified("configs/llama_60m.py", "elas", **changes)
  with pytest.raises(config_lib.ConfigError, match=re.escape(f"config.{field} ")):
    config_lib.validate(c)


def test_unknown_variant_and_missing_file():
  with pytest.raises(config_lib.ConfigError, match="variant 'sparse' .* unknown"):
    load_config("configs/llama_60m.py", "sparse")
  with pytest.raises(config_lib.ConfigError, match="does not exist"):
    config_lib.load("configs/llama_7b.py:elas")


@pytest.mark.parametrize("path", ["configs/tiny.py", "elas_jax/config_lib.py"])
def test_every_config_field_has_a_comment(path):
  # A field assignment ("c.x = ", "m.x = ", ...) and a field of the table rows'
  # dataclasses (Size, Variant) carries a comment on its line or the line before.
  lines = open(os.path.join(ROOT, path)).read().splitlines()
  assign = re.compile(r"^\s+(c|m|s|o|t|d|w|c\.model|c\.train|c\.data)\.\w+(\.\w+)* = ")
  field = re.compile(r"^  [a-z_]\w*: (int|float|bool|str)( = .+)?")
  checked = 0
  for i, line in enumerate(lines):
    if assign.match(line) or field.match(line):
      if re.search(r"= ml_collections\.ConfigDict\(\)", line):
        continue
      checked += 1
      assert "#" in line or lines[i - 1].strip().startswith("#"), f"{path}:{i + 1}: {line.strip()}"
  assert checked > 5


def _run(*args):
  return subprocess.run([sys.executable, "-m", "elas_jax.summary", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["--config", "configs/llama_60m.py:sparse"], "variant 'sparse'"),
    (["--config", "configs/llama_60m.py:elas", "--config.model.rank=600"], "config.model.rank = 600"),
    (["--config", "configs/llama_60m.py:elas", "--config.model.rnak=64"], "config.model.rnak: no such config field"),
    (["--config", "configs/llama_60m.py:elas", "--config.model.rank=abc"], "--config.model.rank=abc"),
    (["--config", "configs/nope.py:elas"], "configs/nope.py"),
    (["--config", "configs/tiny.py:elas", "--config.train.micro_batch=big"], "config.train.micro_batch = 'big'"),
])
def test_cli_reports_bad_config_in_one_line(args, needle):
  p = _run(*args)
  assert p.returncode == 2, p.stderr
  assert "Traceback" not in p.stderr, p.stderr
  errors = [l for l in p.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and needle in errors[0], p.stderr


@pytest.mark.slow
def test_short_run_errors_name_the_fix():
  # `--config.train.steps=30` on the tiny config: each warm-up longer than the
  # run is refused in one line that names the flag fixing it; applying the
  # fixes one by one ends in a config that loads.
  base = ["--config", "configs/tiny.py:elas", "--config.train.steps=30"]
  fixes = []
  for field in ("optimizer.warmup_steps", "model.sparsity.dense_warmup_steps"):
    p = _run(*base, *fixes)
    errors = [l for l in p.stderr.splitlines() if l.startswith("error: ")]
    assert p.returncode == 2 and len(errors) == 1, p.stderr
    assert errors[0].startswith(f"error: config.{field} = ") and "train.steps = 30" in errors[0], errors[0]
    assert f"pass --config.{field}=N with " in errors[0], errors[0]
    fixes.append(f"--config.{field}=29")
  p = _run(*base, *fixes)
  assert p.returncode == 0, p.stderr
  assert json.loads(p.stdout.strip().splitlines()[-1])["variant"] == "elas"


def test_dense_warmup_bound_applies_only_to_sparse_variants():
  for variant in ("loro_relu2", "loro"):  # no 2:4 step: the dense warm-up does nothing
    config_lib.validate(_modified("configs/tiny.py", variant, **{"train.steps": 30, "optimizer.warmup_steps": 3}))
  # A warm-up as long as the run is a fully dense ELAS run: allowed.
  config_lib.validate(_modified("configs/tiny.py", "elas", **{
      "train.steps": 30, "optimizer.warmup_steps": 3, "model.sparsity.dense_warmup_steps": 30}))


@pytest.mark.slow
def test_summary_cli_last_line_is_json():
  p = _run("--config", "configs/llama_60m.py:elas")
  assert p.returncode == 0, p.stderr
  lines = p.stdout.strip().splitlines()
  summary = json.loads(lines[-1])
  assert summary["params"] == 42_246_656 and summary["variant"] == "elas" and summary["size"] == "60m"
  assert any(l.startswith("blocks.0.ffn.up") for l in lines)
  assert any("blocks.* (x8)" in l for l in lines)
  act = summary["activation_bytes_per_token"]
  dense = json.loads(_run("--config", "configs/llama_60m.py:loro_relu2").stdout.strip().splitlines()[-1])
  # ELAS keeps the FFN activation compressed: well under 0.6x of the dense ReLU² FFN.
  assert act["ffn"] < 0.6 * dense["activation_bytes_per_token"]["ffn"]
  assert dense["params"] == summary["params"]


def test_mesh_flag_of_evaluate_and_generate():
  from elas_jax import sharding
  from elas_jax.errors import UserError

  assert sharding.parse_mesh("-1,1,1") == (-1, 1, 1) and sharding.parse_mesh("") is None
  for bad in ("2,2", "a,b,c", "1,1,1,1"):
    with pytest.raises(UserError, match=r"--mesh=.*: expected three integers data,fsdp,tensor"):
      sharding.parse_mesh(bad)


def test_a_config_saved_before_later_fields_completes_to_the_old_behaviour():
  # tests/data holds the tiny elas config as the first training system (commit
  # c1c8086) saved it. Completed, it is a valid config whose later fields mean
  # what the code did before them.
  with open(os.path.join(ROOT, "tests", "data", "config_tiny_elas_c1c8086.json")) as f:
    old = json.load(f)
  assert "remat" not in old["model"] and "scan_layers" not in old["model"]
  import ml_collections

  cfg = ml_collections.ConfigDict(config_lib.complete_saved(old))
  config_lib.validate(cfg)
  m = cfg.model
  assert (m.remat, m.scan_layers, m.attention, m.loss_chunk, m.cola_only_lr_act) == ("none", False, "xla", 0, False)
  assert (cfg.optimizer.lr_adjust_steps, cfg.train.micro_batch, cfg.train.profile_steps) == (0, 0, "")
  # Every field of today's config is either in the old one or completed.
  now = load_config("configs/tiny.py", "elas").to_dict()
  missing = [f"{s}.{k}" for s in now if isinstance(now[s], dict) for k in now[s] if k not in cfg[s]]
  assert not missing, missing


def test_micro_batch_is_a_number_or_auto():
  c = _modified("configs/tiny.py", "elas", **{"train.micro_batch": "auto"})
  assert c.train.micro_batch == "auto"
  config_lib.override(c, {"train.micro_batch": "4"})  # a string from the command line
  assert c.train.micro_batch == 4
  for bad in ("big", "3", -4):  # 3 does not divide the tiny batch of 16
    config_lib.override(c, {"train.micro_batch": bad})
    with pytest.raises(config_lib.ConfigError, match=re.escape("config.train.micro_batch = ")):
      config_lib.validate(c)
  p = _run("--config", "configs/tiny.py:elas", "--config.train.micro_batch=auto")  # parsed by absl
  assert p.returncode == 0, p.stderr
