"""Generates text with a trained checkpoint (KV-cached, batched).

    python -m elas_jax.generate --workdir runs/tiny-elas --prompt "The history of"
    python -m elas_jax.generate --workdir DIR --prompts_file prompts.txt --out out.jsonl

Restores the latest (or ``--step``) checkpoint with its saved config, onto
this machine's mesh (the batch is split over its data axes), and continues
each prompt with the compiled prefill and decode steps of
:mod:`elas_jax.decode`. ELAS checkpoints past the dense warm-up decode with
the 2:4 FFN, as evaluation does (``--dense`` forces the dense ReLU² FFN).

A single ``--prompt`` is streamed to stdout as it is produced. A
``--prompts_file`` (one prompt per line; blank lines skipped) runs in batches
of ``--batch_size`` with a progress bar on stderr and writes one JSON object
per prompt (``prompt``, ``completion``, ``tokens``, ``stop``) to ``--out``,
or to stdout without it. Sampling: ``--temperature 0`` is greedy; otherwise
``--top_k`` / ``--top_p`` restrict the choice; the same ``--seed`` gives the
same text.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from elas_jax import decode, sharding
from elas_jax.ops import ffn
from elas_jax.cli import common, distributed
from elas_jax.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "File with one prompt per line.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt (at most).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0 = all.")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass; 1 = off.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Prompts per batch (--prompts_file).")
_MAX_LEN = flags.DEFINE_integer("max_len", None, "KV cache length (prompt + generated tokens); "
                                "default: the training sequence length.")
_DENSE = flags.DEFINE_bool("dense", False, "Decode an ELAS model with the dense ReLU² FFN.")
_OUT = flags.DEFINE_string("out", None, "Write results as JSON lines to this file.")
_MESH = flags.DEFINE_string("mesh", None, "Override the saved mesh as data,fsdp,tensor (e.g. -1,1,1).")
_KERNEL = flags.DEFINE_enum("kernel", None, list(ffn.KERNELS),
                            "Override config.model.kernel (the 2:4 FFN implementation of ELAS models).")


def read_prompts(path: str) -> list[str]:
  if not os.path.isfile(path):
    raise UserError(f"--prompts_file={path!r}: file does not exist")
  with open(path, encoding="utf-8") as f:
    prompts = [line.rstrip("\n") for line in f if line.strip()]
  if not prompts:
    raise UserError(f"--prompts_file={path!r}: holds no prompts (one per non-blank line)")
  return prompts


class _Stream:
  """Prints one row's continuation as its tokens arrive."""

  def __init__(self, tok, prompt_ids: list[int]):
    self.tok, self.prompt_ids, self.ids, self.shown = tok, prompt_ids, [], ""

  def __call__(self, new: list[int | None]) -> None:
    if new[0] is None or new[0] == self.tok.eos_id:
      return
    self.ids.append(new[0])
    text = decode.continuation(self.tok, self.prompt_ids, self.ids)
    if text.startswith(self.shown) and not text.endswith("\ufffd"):  # wait for whole characters
      sys.stdout.write(text[len(self.shown):])
      sys.stdout.flush()
      self.shown = text

  def finish(self) -> None:
    text = decode.continuation(self.tok, self.prompt_ids, self.ids)
    if text.startswith(self.shown):
      sys.stdout.write(text[len(self.shown):])
    sys.stdout.write("\n")
    sys.stdout.flush()


def main(argv) -> None:
  del argv
  distributed.initialize_from_flags()
  if (_PROMPT.value is None) == (_PROMPTS_FILE.value is None):
    raise UserError("give exactly one of --prompt TEXT and --prompts_file FILE")
  if _PROMPT.value is not None and not _PROMPT.value.strip():
    raise UserError("--prompt is empty: give some text to continue")
  if _MAX_NEW.value < 1:
    raise UserError(f"--max_new_tokens={_MAX_NEW.value}: must be positive")
  if _BATCH.value < 1:
    raise UserError(f"--batch_size={_BATCH.value}: must be positive")
  texts = [_PROMPT.value] if _PROMPT.value is not None else read_prompts(_PROMPTS_FILE.value)

  run, params, step = decode.load(_WORKDIR.value, _STEP.value,
                                  mesh_shape=sharding.parse_mesh(_MESH.value),
                                  kernel=_KERNEL.value)
  cfg, tok = run.cfg, run.tokenizer
  max_len = _MAX_LEN.value or cfg.train.seq_len
  prompts = [decode.encode(tok, cfg, t) for t in texts]
  batch = 1 if _PROMPT.value is not None else min(_BATCH.value, len(prompts))
  gen = decode.Generator(
      run.graphdef, params, cfg.model, batch_size=batch, max_len=max_len,
      sparse_on=decode.sparse_on_for(cfg, step, _DENSE.value), eos_id=tok.eos_id, pad_id=tok.pad_id,
      temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value, mesh=run.mesh)
  for i, p in enumerate(prompts):  # every prompt checked before anything is compiled
    try:
      gen.check_prompts([p])
    except UserError as e:
      raise UserError(str(e).replace("prompt 0", f"prompt {i + 1}" if len(prompts) > 1 else "the prompt")
                      ) from None

  out_f = open(_OUT.value, "w", encoding="utf-8") if _OUT.value else None
  try:
    if _PROMPT.value is not None:
      sys.stdout.write(_PROMPT.value)
      sys.stdout.flush()
      stream = _Stream(tok, prompts[0])
      results = gen.generate(prompts, _MAX_NEW.value, _SEED.value, on_step=stream)
      stream.finish()
      if out_f:
        _write(out_f, texts[0], prompts[0], tok, results[0])
      return
    from tqdm import tqdm

    with tqdm(total=len(prompts), unit="prompt", file=sys.stderr, dynamic_ncols=True) as bar:
      for lo in range(0, len(prompts), gen.batch):
        chunk = prompts[lo:lo + gen.batch]
        results = gen.generate(chunk, _MAX_NEW.value, _SEED.value + lo)
        for text, ids, res in zip(texts[lo:lo + gen.batch], chunk, results):
          _write(out_f or sys.stdout, text, ids, tok, res)
        bar.update(len(chunk))
  finally:
    if out_f:
      out_f.close()
  if _OUT.value:
    print(f"wrote {len(prompts)} completions to {_OUT.value}", file=sys.stderr)


def _write(f, prompt: str, prompt_ids: list[int], tok, res: decode.Result) -> None:
  f.write(json.dumps({"prompt": prompt, "completion": decode.continuation(tok, prompt_ids, res.tokens),
                      "tokens": len(res.tokens), "stop": res.stop}, ensure_ascii=False) + "\n")
  f.flush()


def run() -> None:
  """Console-script entry point (``elas-generate``)."""
  distributed.define_flags()
  common.run(main)


if __name__ == "__main__":
  run()
