"""Builds and validates the ml_collections configs of ``configs/``, from tables.

:data:`SIZES` holds one row per model size (shapes and schedule of the LLaMA family
the LORO and ELAS papers train), :data:`VARIANTS` what each variant changes,
:data:`VARIANT_OPTIMIZERS` each variant family's optimizer settings. :func:`llama_config`
builds a size's config in a variant; ``configs/<size>.py`` is that call (plus, for
``tiny``, its CPU settings). Every field has one default, set there. :data:`LEGACY_DEFAULTS` says
what the fields added later meant for configs saved before them.
:func:`validate` rejects a config that cannot work with an error naming the
field; it runs at load and again after command-line overrides.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_collections
from ml_collections import config_dict

from elas_jax import model, profiling
from elas_jax.data.pipeline import PACKING_MODES
from elas_jax.data.records import DEFAULT_MAX_IN_MEMORY_BYTES
from elas_jax.data.sources import FORMATS
from elas_jax.errors import ConfigError  # re-exported
from elas_jax.sharding import MESH_AXES
from elas_jax.ops import attention, ffn
from elas_kernels.ffn import BACKWARD_MODES

LINEAR_KINDS = ("full", "lowrank", "cola")
FFN_KINDS = ("swiglu", "relu2")
DTYPE_NAMES = ("float32", "bfloat16")
OPTIMIZERS = ("adamw", "loro_adamw")
SCHEDULES = ("cosine", "cosine_restart")
RELU2_WIDTH_FACTOR = 1.5  # ReLU² FFN width = int(1.5 x SwiGLU width): same parameter count
AUTO = "auto"  # train.micro_batch = auto: the largest that fits the memory budget (trainer.fit_micro_batch)


@dataclasses.dataclass(frozen=True)
class Size:
  """One model size: shapes and schedule (the ELAS paper's table, the official LORO and
  CoLA scripts). A row of :data:`SIZES`."""

  d_model: int  # hidden size d
  n_layers: int  # decoder blocks
  n_heads: int  # attention heads
  swiglu_ffn: int  # SwiGLU FFN width (the ReLU² variants use int(1.5x))
  rank: int  # rank r of every low-rank / CoLA linear
  exact_every: int  # LORO: exact Riemannian step every K updates
  steps: int  # optimizer steps
  warmup_steps: int  # lr warm-up steps of the LORO and full-rank variants
  lr: float  # peak lr of the LORO variants
  lr_adjust_steps: int  # LORO lr clock shift, as the official scripts' --lr_adjust_steps
  cola_lr: float  # peak lr of the CoLA variant
  cola_warmup_steps: int  # lr warm-up steps of the CoLA variant
  cola_only_lr_act: bool  # CoLA: no SiLU on the gate path (the official only_lr_act)
  full_lr: float = 1e-3  # peak lr of the full-rank variant (GaLore's AdamW)
  dense_warmup_steps: int = 1000  # ELAS: dense ReLU² optimizer steps before 2:4
  vocab_size: int = 32000  # vocabulary (the paper's T5 tokenizer)
  seq_len: int = 256  # tokens per sequence
  batch_size: int = 512  # sequences per optimizer step


SIZES = {
    #            d_model layers heads swiglu rank   K     steps  warmup     lr  lr_adjust cola_lr cola_warmup only_lr_act
    "60m": Size(512,      8,     8,  1376, 128, 500,   10_000,  1_000, 0.01,    -1_000, 0.006,  2_000,     False),
    "130m": Size(768,    12,    12,  2048, 256, 500,   20_000,  2_000, 0.01,    -2_000, 0.003,  2_000,     False),
    "350m": Size(1024,   24,    16,  2736, 256, 500,   60_000,  2_000, 0.01,    -6_000, 0.003,  6_000,     True),
    "1b": Size(2048,     24,    32,  5461, 512, 200,  100_000, 10_000, 0.005,  -10_000, 0.002, 10_000,     True),
    # CPU-sized: minutes on 2 cores (configs/tiny.py); the full-rank and CoLA lrs from a CPU
    # sweep (docs/results.md); r/d = 0.25 as in the paper; a 4096-token sample-corpus vocabulary.
    "tiny": Size(128,     4,     4,   344,  32, 100,      600,     60, 0.01,         0, 0.002,     60,     False,
                 dense_warmup_steps=100, vocab_size=4096, seq_len=128, batch_size=16),
}


@dataclasses.dataclass(frozen=True)
class Variant:
  """What a variant changes in the model, and its optimizer (a key of :data:`VARIANT_OPTIMIZERS`)."""

  linear_kind: str  # full | lowrank | cola
  ffn_kind: str  # swiglu | relu2 (gate-less squared ReLU, int(1.5x) wide)
  sparse: bool  # 2:4 activation sparsity after the dense warm-up
  optimizer: str  # full | loro | cola


VARIANTS = {
    "full": Variant("full", "swiglu", False, "full"),  # the paper's Full-Rank row
    "loro": Variant("lowrank", "swiglu", False, "loro"),  # the LORO baseline
    "loro_relu2": Variant("lowrank", "relu2", False, "loro"),  # ELAS minus the 2:4 step
    "elas": Variant("lowrank", "relu2", True, "loro"),  # the method
    "cola": Variant("cola", "swiglu", False, "cola"),  # CoLA, a second low-rank baseline
}

# Optimizer settings per variant family, from a size's row (docs/optimizer.md).
VARIANT_OPTIMIZERS: dict[str, Callable[[Size], dict[str, Any]]] = {
    "full": lambda s: dict(name="adamw", lr=s.full_lr, schedule="cosine", warmup_steps=s.warmup_steps,
                           weight_decay=0.0, grad_clip=0.0, lr_adjust_steps=0),
    "loro": lambda s: dict(name="loro_adamw", lr=s.lr, schedule="cosine_restart",
                           warmup_steps=s.warmup_steps, weight_decay=0.0, grad_clip=0.0,
                           lr_adjust_steps=s.lr_adjust_steps),
    "cola": lambda s: dict(name="adamw", lr=s.cola_lr, schedule="cosine",
                           warmup_steps=s.cola_warmup_steps, weight_decay=0.01, grad_clip=0.5,
                           lr_adjust_steps=0),
}


def size_config(size: str) -> Callable[..., ml_collections.ConfigDict]:
  """The ``get_config(variant="elas")`` of a size file in ``configs/``."""

  def get_config(variant: str = "elas") -> ml_collections.ConfigDict:
    return llama_config(size, variant)

  get_config.__doc__ = f"The {size} model (config_lib.SIZES[{size!r}]) in ``variant``."
  return get_config


def llama_config(size: str, variant: str) -> ml_collections.ConfigDict:
  """The config of model size ``size`` (a key of :data:`SIZES`) in ``variant``."""
  if variant not in VARIANTS:
    raise ConfigError(f"config variant {variant!r} (after ':' in --config) is unknown; "
                      f"choose one of {', '.join(VARIANTS)}")
  if size not in SIZES:
    raise ConfigError(f"model size {size!r} is unknown; choose one of {', '.join(SIZES)}")
  z, v = SIZES[size], VARIANTS[variant]
  opt = VARIANT_OPTIMIZERS[v.optimizer](z)
  c = ml_collections.ConfigDict()
  c.size = size  # model size label, e.g. "60m"
  c.variant = variant  # one of full, loro, loro_relu2, elas, cola
  c.seed = 0  # seed of parameter init and data order

  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = z.vocab_size  # vocabulary size; must equal the tokenizer's
  m.d_model = z.d_model  # hidden size d
  m.n_layers = z.n_layers  # number of decoder blocks
  m.n_heads = z.n_heads  # attention heads; must divide d_model
  m.ffn_kind = v.ffn_kind  # "swiglu" or gate-less squared ReLU "relu2"
  # FFN intermediate width; ReLU² uses int(1.5 x SwiGLU width) to keep the parameter count
  m.ffn_dim = int(RELU2_WIDTH_FACTOR * z.swiglu_ffn) if v.ffn_kind == "relu2" else z.swiglu_ffn
  m.linear_kind = v.linear_kind  # full | lowrank | cola
  m.rank = z.rank  # rank r of every low-rank / CoLA linear (unused for full)
  # CoLA SwiGLU without SiLU on the gate path, down(gate x · up x), as the official CoLA
  # configs leave it at 350M/1B (their only_lr_act default True); False = down(silu(gate x) · up x)
  m.cola_only_lr_act = z.cola_only_lr_act and v.linear_kind == "cola"
  m.rope_theta = 10000.0  # rotary embedding base
  m.norm_eps = 1e-6  # RMSNorm epsilon
  m.dtype = "bfloat16"  # compute dtype: float32 | bfloat16
  m.param_dtype = "float32"  # parameter (and optimizer state) dtype: float32 | bfloat16
  # 2:4 FFN implementation, one of elas_kernels.ffn.IMPLEMENTATIONS (elas_jax/ops/ffn.py):
  # xla (pure JAX) | triton (the Pallas Triton kernels of kernels/; "pallas" is its old
  # name) | mosaic (the Pallas Mosaic GPU kernels, Hopper, jax >= 0.11) | mosaic_ws (the
  # same, forward and dh warp-specialized, ranks <= 256) | mosaic_sparse (the 2:4 products
  # on Hopper's sparse tensor cores; opt-in, unverified on a GPU); all interpreted off GPUs | auto
  # (compiling for a GPU: mosaic_ws, else mosaic, else triton, else xla, whichever serves
  # first; xla elsewhere)
  m.kernel = "auto"
  # causal attention: xla (jax.nn.dot_product_attention) | cudnn (flash, CUDA GPUs, bf16)
  # | chunked (pure-JAX flash-style, any backend) | auto (cudnn where it can run, else
  # chunked on CPU, xla elsewhere)
  # Step-memory defaults (measured best, docs/benchmarks.md "Whole train step memory"):
  # at 1B they cut the step's activation bytes per token to 0.08x and fit the paper's
  # 512-sequence batch on one H200 (micro-batch up to ~1000 instead of 79).
  m.attention = "auto"
  m.attention_block = 64  # attention = chunked: query/key positions per block
  m.loss_chunk = 512  # tokens per chunk of the chunked lm_head + cross-entropy; 0 = full logits
  # activation rematerialisation: none | block (keep each block's input, recompute the rest)
  # | lowrank (also keep the rank-r codes, attention output and compressed 2:4 activation)
  m.remat = "block"
  m.scan_layers = True  # run the blocks with lax.scan over stacked params (compile time flat in depth)
  s = m.sparsity = ml_collections.ConfigDict()
  s.enabled = v.sparse  # 2:4 activation sparsity in the ReLU² FFN
  s.dense_warmup_steps = z.dense_warmup_steps  # optimizer steps of dense ReLU² before 2:4 starts
  s.backward = "masked"  # 2:4 backward mode: masked | ste | split
  s.split_dense_fraction = 0.05  # split mode: fraction of densest features kept dense in dW

  o = c.optimizer = ml_collections.ConfigDict()  # per variant: VARIANT_OPTIMIZERS
  o.name = opt["name"]  # adamw | loro_adamw
  o.lr = opt["lr"]  # peak learning rate
  o.schedule = opt["schedule"]  # cosine | cosine_restart (LORO)
  o.warmup_steps = opt["warmup_steps"]  # linear warm-up steps
  o.weight_decay = opt["weight_decay"]  # decoupled weight decay
  o.grad_clip = opt["grad_clip"]  # global-norm gradient clipping; 0 disables
  o.min_lr_ratio = 0.1  # cosine floor as a fraction of lr
  o.b1 = 0.9  # Adam beta1
  o.b2 = 0.999  # Adam beta2
  o.eps = 1e-6  # Adam epsilon (added to the uncorrected sqrt(v) in LORO)
  o.exact_every = z.exact_every  # LORO: exact Riemannian step every K updates
  o.restart_warmup = 5  # cosine_restart: updates to ramp back after each exact step
  # cosine_restart: shift of the cycle clock after warm-up, as LORO's --lr_adjust_steps
  # (the paper's scripts: -warmup, or -6000 at 350M); 0 = unshifted. docs/optimizer.md
  o.lr_adjust_steps = opt["lr_adjust_steps"]

  t = c.train = ml_collections.ConfigDict()
  t.steps = z.steps  # optimizer steps
  t.batch_size = z.batch_size  # global batch, in sequences (per optimizer step)
  # sequences per forward/backward pass; gradients of batch_size / micro_batch
  # micro-batches are accumulated into one update. 0 = batch_size (no accumulation);
  # "auto" = the largest whose compiled step fits the memory budget with 10% to spare,
  # chosen at start-up (an int or "auto", hence the untyped field)
  t.micro_batch = config_dict.FieldReference(0, field_type=object)
  t.seq_len = z.seq_len  # tokens per sequence
  t.log_every = 50  # steps between metric logs
  t.eval_every = 1000  # steps between evaluations
  t.eval_tokens = 10_000_000  # validation tokens per evaluation
  t.ckpt_every = 1000  # steps between checkpoints
  t.keep_checkpoints = 3  # most recent checkpoints kept
  t.skip_nonfinite = False  # skip (and count) NaN/Inf steps instead of stopping the run
  t.peak_tflops = 0.0  # per-device peak TFLOP/s for the MFU metric; 0 = from flops.DEVICE_PEAK_TFLOPS
  # jax.profiler trace of steps a <= step < b (0-based) into <workdir>/profile, "a:b"; "" = off
  t.profile_steps = ""
  # device memory a train step may use, GB (1e9 bytes) per device; 0 = the device's own
  # (its allocator's limit; unknown on CPU). A step compiled over it stops with one line
  t.memory_budget_gb = 0.0
  # persistent XLA compilation cache in <workdir>/xla_cache (an explicit
  # JAX_COMPILATION_CACHE_DIR wins): a restarted run loads its compiled steps. False = off
  t.compile_cache = True

  mesh = c.mesh = ml_collections.ConfigDict()
  mesh.data = -1  # data-parallel ways; -1 = all devices left over
  mesh.fsdp = 1  # fully-sharded data-parallel ways (parameters and optimizer state sharded)
  mesh.tensor = 1  # tensor-parallel ways

  d = c.data = ml_collections.ConfigDict()
  d.source = "files"  # sample (embedded corpus) | files
  d.train_files = ""  # glob of training files (source = files)
  d.eval_files = ""  # glob of validation files (source = files)
  d.format = "auto"  # auto (by extension) | jsonl | txt | parquet | arrayrecord
  d.text_key = "text"  # JSON key / Parquet column holding the document text
  d.txt_split = "blank_line"  # .txt documents: blank_line (blocks) | file (one per file)
  d.skip_bad_records = False  # skip and count bad records (and broken files) instead of stopping
  # text that may be read into memory (.gz, JSON-array .json, Parquet: no random access);
  # above it training refuses and names the prepare command. Plain .jsonl/.txt are read
  # lazily through an offset index and do not count. docs/data.md
  d.max_in_memory_bytes = DEFAULT_MAX_IN_MEMORY_BYTES
  # SentencePiece model or tokenizer.json path, or hf:<owner>/<name> (a Hub repository's
  # tokenizer, cached); "" = train one on the sample. The papers': T5's (docs/data.md)
  d.tokenizer = "hf:google-t5/t5-base"
  # truncate_pad: one document per row of seq_len tokens, truncated keeping its EOS, padded,
  # the padding masked (the GaLore/LORO C4 protocol) | concat: documents joined and cut
  d.packing = "truncate_pad"
  d.add_bos = False  # prepend BOS to every document (EOS is always appended)
  d.read_threads = 2  # grain threads reading and tokenising documents
  d.prefetch_buffer = 64  # documents read ahead per thread pool
  d.worker_count = 0  # grain worker processes after batching (0 = in the training process)

  # Weights & Biases (pip install -e .[wandb]): process 0 logs the metrics.jsonl records and
  # the resolved config; the run id is kept in <workdir>/wandb_run_id so a resumed run
  # continues the same W&B run. WANDB_MODE=offline (and W&B's other variables) apply.
  w = c.wandb = ml_collections.ConfigDict()
  w.enabled = False  # log to Weights & Biases
  w.project = "elas-jax"  # W&B project
  w.entity = ""  # W&B entity (team or user); "" = your default entity
  w.name = ""  # run name; "" = the workdir's name
  validate(c)
  return c


# What each field added after the first checkpoints meant before it existed: a
# config saved by an older version (in a checkpoint) lacks the field and had this
# behaviour. :func:`complete_saved` fills them in (checkpointing.load_config and
# check_compatible); a new field goes here with the old code's behaviour.
LEGACY_DEFAULTS = {
    "model": {"attention": "xla", "attention_block": 64, "loss_chunk": 0, "remat": "none",
              "scan_layers": False, "cola_only_lr_act": False},
    "optimizer": {"lr_adjust_steps": 0},
    "train": {"micro_batch": 0, "peak_tflops": 0.0, "profile_steps": "", "memory_budget_gb": 0.0,
              "compile_cache": False},
    "wandb": {"enabled": False, "project": "elas-jax", "entity": "", "name": ""},
    # Text files were always read into memory; an old config gets today's limit (a
    # corpus above it is refused with the prepare command, as for a new config).
    "data": {"max_in_memory_bytes": DEFAULT_MAX_IN_MEMORY_BYTES},
}


def complete_saved(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved config (a dict) with the fields it predates set to :data:`LEGACY_DEFAULTS`."""
  out = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
  for section, fields in LEGACY_DEFAULTS.items():
    for key, value in fields.items():
      out.setdefault(section, {}).setdefault(key, value)
  return out


def _err(field: str, value, why: str) -> ConfigError:
  return ConfigError(f"config.{field} = {value!r}: {why}")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(c, field: str) -> None:
  value = c
  for part in field.split("."):
    value = value[part]
  if not _is_int(value) or value <= 0:
    raise _err(field, value, "must be a positive integer")


def _choice(value, field: str, options) -> None:
  if value not in options:
    raise _err(field, value, f"must be one of {', '.join(options)}")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises :class:`ConfigError` naming the first field that cannot work."""
  m = c.model
  for f in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_dim"):
    _positive_int(c, f"model.{f}")
  for f in ("steps", "batch_size", "seq_len"):
    _positive_int(c, f"train.{f}")
  for axis in MESH_AXES:
    size = c.mesh[axis]
    if not _is_int(size) or (size < 1 and size != -1):
      raise _err(f"mesh.{axis}", size, "must be a positive integer or -1 (the rest)")
  _choice(m.linear_kind, "model.linear_kind", LINEAR_KINDS)
  _choice(m.ffn_kind, "model.ffn_kind", FFN_KINDS)
  _choice(m.dtype, "model.dtype", DTYPE_NAMES)
  _choice(m.param_dtype, "model.param_dtype", DTYPE_NAMES)
  _choice(m.kernel, "model.kernel", ffn.KERNELS)
  _choice(m.attention, "model.attention", attention.IMPLEMENTATIONS)
  _positive_int(c, "model.attention_block")
  if not _is_int(m.loss_chunk) or m.loss_chunk < 0:
    raise _err("model.loss_chunk", m.loss_chunk, "must be an integer >= 0 (tokens per chunk; 0 = off)")
  _choice(m.remat, "model.remat", model.REMAT_MODES)
  if not isinstance(m.scan_layers, bool):
    raise _err("model.scan_layers", m.scan_layers, "must be true or false")
  if m.d_model % m.n_heads:
    raise _err("model.n_heads", m.n_heads, f"must divide model.d_model = {m.d_model}")
  if (m.d_model // m.n_heads) % 2:
    raise _err("model.n_heads", m.n_heads,
               f"gives odd head size {m.d_model // m.n_heads}; rotary needs an even one")
  s = m.sparsity
  _choice(s.backward, "model.sparsity.backward", BACKWARD_MODES)
  if s.enabled:
    if m.ffn_kind != "relu2":
      raise _err("model.sparsity.enabled", True, "2:4 activation sparsity needs model.ffn_kind = relu2")
    if m.ffn_dim < 4:
      raise _err("model.ffn_dim", m.ffn_dim, "has no complete group of 4 features for 2:4 sparsity")
  elif m.kernel not in ("auto", "xla"):
    raise _err("model.kernel", m.kernel, "the kernels implement the 2:4-sparse FFN; "
               "set model.sparsity.enabled = True (variant elas) or use kernel = xla / auto")
  if not _is_int(s.dense_warmup_steps) or s.dense_warmup_steps < 0:
    raise _err("model.sparsity.dense_warmup_steps", s.dense_warmup_steps,
               "must be an integer >= 0")
  if not 0.0 <= s.split_dense_fraction < 1.0:
    raise _err("model.sparsity.split_dense_fraction", s.split_dense_fraction, "must be in [0, 1)")
  if m.linear_kind != "full":
    _positive_int(c, "model.rank")
    smallest = min(m.d_model, m.ffn_dim)
    if m.rank >= smallest:
      raise _err("model.rank", m.rank,
                 f"must be smaller than min(d_model, ffn_dim) = {smallest}; a rank that large "
                 "is not low-rank (use variant full)")

  o = c.optimizer
  _choice(o.name, "optimizer.name", OPTIMIZERS)
  _choice(o.schedule, "optimizer.schedule", SCHEDULES)
  if o.name == "loro_adamw" and m.linear_kind != "lowrank":
    raise _err("optimizer.name", o.name, f"needs model.linear_kind = lowrank, not {m.linear_kind}")
  if not o.lr > 0:
    raise _err("optimizer.lr", o.lr, "must be > 0")
  if not 0 <= o.warmup_steps <= c.train.steps:
    raise _err("optimizer.warmup_steps", o.warmup_steps,
               f"must be in [0, train.steps = {c.train.steps}]; "
               f"pass --config.optimizer.warmup_steps=N with 0 <= N <= {c.train.steps}")
  if s.enabled and s.dense_warmup_steps > c.train.steps:
    # A short run (--config.train.steps=N) would stay dense throughout: refuse, naming the fix.
    # Equal to train.steps is allowed (a fully dense run, as benchmarks/quality.py clamps to).
    raise _err("model.sparsity.dense_warmup_steps", s.dense_warmup_steps,
               f"exceeds train.steps = {c.train.steps}, so 2:4 sparsity would never start; "
               f"pass --config.model.sparsity.dense_warmup_steps=N with N < {c.train.steps}")
  if not 0.0 <= o.min_lr_ratio <= 1.0:
    raise _err("optimizer.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
  for f in ("b1", "b2"):
    if not 0.0 <= o[f] < 1.0:
      raise _err(f"optimizer.{f}", o[f], "must be in [0, 1)")
  if o.weight_decay < 0:
    raise _err("optimizer.weight_decay", o.weight_decay, "must be >= 0")
  if o.grad_clip < 0:
    raise _err("optimizer.grad_clip", o.grad_clip, "must be >= 0 (0 disables clipping)")
  _positive_int(c, "optimizer.exact_every")
  if not _is_int(o.restart_warmup) or o.restart_warmup < 0:
    raise _err("optimizer.restart_warmup", o.restart_warmup, "must be an integer >= 0")
  if not _is_int(o.lr_adjust_steps):
    raise _err("optimizer.lr_adjust_steps", o.lr_adjust_steps, "must be an integer")
  if o.lr_adjust_steps and o.schedule != "cosine_restart":
    raise _err("optimizer.lr_adjust_steps", o.lr_adjust_steps,
               "is only defined for optimizer.schedule = cosine_restart (0 otherwise)")
  if o.lr_adjust_steps and o.warmup_steps + o.lr_adjust_steps >= c.train.steps:
    raise _err("optimizer.lr_adjust_steps", o.lr_adjust_steps,
               f"plus optimizer.warmup_steps = {o.warmup_steps} must be < train.steps = {c.train.steps}")
  if not isinstance(m.cola_only_lr_act, bool):
    raise _err("model.cola_only_lr_act", m.cola_only_lr_act, "must be true or false")
  if m.cola_only_lr_act and (m.linear_kind != "cola" or m.ffn_kind != "swiglu"):
    raise _err("model.cola_only_lr_act", True, "needs model.linear_kind = cola and model.ffn_kind = swiglu")
  if isinstance(c.train.peak_tflops, bool) or not isinstance(c.train.peak_tflops, (int, float)) \
      or not c.train.peak_tflops >= 0:
    raise _err("train.peak_tflops", c.train.peak_tflops, "must be a number >= 0 (0 = from the device table)")
  profiling.parse_profile_steps(c.train.profile_steps)
  d = c.data
  _choice(d.source, "data.source", ("sample", "files"))
  _choice(d.format, "data.format", FORMATS)
  _choice(d.txt_split, "data.txt_split", ("blank_line", "file"))
  _choice(d.packing, "data.packing", PACKING_MODES)
  for f in ("read_threads", "prefetch_buffer"):
    _positive_int(c, f"data.{f}")
  if not _is_int(d.worker_count) or d.worker_count < 0:
    raise _err("data.worker_count", d.worker_count, "must be an integer >= 0")
  if not _is_int(d.max_in_memory_bytes) or d.max_in_memory_bytes < 0:
    raise _err("data.max_in_memory_bytes", d.max_in_memory_bytes,
               "must be an integer >= 0 (bytes of text; 0 = never load text files into memory)")
  mb = c.train.micro_batch
  if mb != AUTO and (not _is_int(mb) or mb < 0 or (mb and c.train.batch_size % mb)):
    raise _err("train.micro_batch", mb, f"must be 0 (= batch_size), a divisor of train.batch_size = "
               f"{c.train.batch_size}, or {AUTO!r} (the largest that fits the device memory)")
  budget = c.train.memory_budget_gb
  if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0:
    raise _err("train.memory_budget_gb", budget, "must be a number >= 0 (GB per device; 0 = the device's memory)")
  if not isinstance(c.train.compile_cache, bool):
    raise _err("train.compile_cache", c.train.compile_cache, "must be true or false")
  w = c.wandb
  if not isinstance(w.enabled, bool):
    raise _err("wandb.enabled", w.enabled, "must be true or false")
  if w.enabled and not w.project:
    raise _err("wandb.project", w.project, "must name a W&B project when wandb.enabled")
  _positive_int(c, "train.eval_tokens")
  for f in ("log_every", "eval_every", "ckpt_every", "keep_checkpoints"):
    _positive_int(c, f"train.{f}")


def override(cfg: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted fields in place (``{"train.steps": 6}``) and returns ``cfg``.

  A string value for a non-string field is parsed as that field's type, the
  way ``--config.train.steps=6`` is on the command line. An unknown field is a
  :class:`ConfigError` naming it.
  """
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split(".")
    for part in parents:
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise ConfigError(f"config.{key}: no such config field")
      node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise ConfigError(f"config.{key}: no such config field")
    old = node[leaf]
    if isinstance(value, str) and node.get_type(leaf) is object:  # an untyped field (micro_batch)
      value = int(value) if value.strip().lstrip("-").isdigit() else value
    elif isinstance(value, str) and not isinstance(old, str) and old is not None:
      value = _parse_as(value, old, key)
    node[leaf] = value
  return cfg


def _parse_as(text: str, like: Any, key: str) -> Any:
  if isinstance(like, bool):
    if text.lower() in ("1", "true", "yes"):
      return True
    if text.lower() in ("0", "false", "no"):
      return False
    raise ConfigError(f"config.{key} = {text!r}: expected true or false")
  try:
    return type(like)(text)
  except ValueError:
    raise ConfigError(f"config.{key} = {text!r}: expected a {type(like).__name__}") from None


def load(spec: str) -> ml_collections.ConfigDict:
  """Loads ``path[:variant]`` the way ``--config`` does, for scripts and tests."""
  import importlib.util
  import os

  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location(
      "elas_config_" + os.path.basename(path).removesuffix(".py"), path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  cfg = module.get_config(variant) if variant else module.get_config()
  validate(cfg)
  return cfg
