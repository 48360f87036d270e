"""Pre-tokenises a corpus once into ArrayRecord shards the pipeline can train from.

    python -m elas_jax.data.prepare --config configs/llama_60m.py:elas \\
        --config.data.train_files='c4/en/c4-train.*.json.gz' \\
        --config.data.eval_files='c4/en/c4-validation.*.json.gz' \\
        --config.data.tokenizer=t5.model --output c4_tokens/ [--workers 2]

then train with ``--config.data.train_files='c4_tokens/train-*.arrayrecord'
--config.data.eval_files='c4_tokens/validation-*.arrayrecord'`` and the same
tokenizer. Each record is one document's token ids (int32, no EOS: the
pipeline adds it). Input file i of n becomes ``train-{i:05d}-of-{n:05d}.arrayrecord``;
memory holds one batch of documents per worker, whatever the corpus size.
``elas_prepared.json`` beside the shards records the tokenizer's hash (which
the pipeline checks) and every shard's document and token counts.

Resumable: a rerun skips finished shards. Several machines split the work
with ``--shard_index i --num_shards n`` (same command, same output directory);
the one that finishes the last shard writes the manifest. Beyond one
machine's reach, ``--runner`` runs the same per-shard work as an Apache Beam
pipeline (``pip install -r requirements-beam.txt``); Beam's own options follow
a ``--``::

    python -m elas_jax.data.prepare ... --output gs://bucket/c4_tokens \\
        --runner DataflowRunner -- --project P --region R --temp_location gs://bucket/tmp

The work is in :mod:`elas_jax.data.pretokenize` (and ``beam_prepare``); this
module is the command line (``python -m elas_jax.data.prepare`` is its alias).
"""

from __future__ import annotations

from absl import flags

from elas_jax.cli import common as cli
from elas_jax.data import pretokenize, tokenizer as tokenizer_lib
from elas_jax.errors import UserError

_OUTPUT = flags.DEFINE_string("output", None, "Directory for the ArrayRecord shards.", required=True)
_SHARD_DOCS = flags.DEFINE_integer(
    "shard_docs", 0, "Documents per output shard; 0 = one output shard per input file.")
_BATCH = flags.DEFINE_integer("encode_batch", 1024, "Documents tokenised per call (bounds memory).")
_WORKERS = flags.DEFINE_integer("workers", 1, "Processes tokenising input files in parallel.")
_SHARD_INDEX = flags.DEFINE_integer("shard_index", 0, "This machine's part of the work, 0 <= i < n.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Machines splitting the work.")
_RUNNER = flags.DEFINE_string(
    "runner", "", "Run as an Apache Beam pipeline on this runner (DirectRunner, DataflowRunner, "
    "FlinkRunner, SparkRunner, ...); Beam pipeline options go after '--'. Empty: this machine.")


def _check_flags() -> None:
  for flag, low in ((_SHARD_DOCS, 0), (_BATCH, 1), (_WORKERS, 1), (_NUM_SHARDS, 1)):
    if flag.value < low:
      raise UserError(f"--{flag.name}={flag.value}: must be >= {low}")
  if not 0 <= _SHARD_INDEX.value < _NUM_SHARDS.value:
    raise UserError(f"--shard_index={_SHARD_INDEX.value}: must be in [0, --num_shards = "
                    f"{_NUM_SHARDS.value})")
  if _RUNNER.value and _WORKERS.value > 1:
    raise UserError("--workers is for this machine; with --runner set Beam's parallelism "
                    "(e.g. -- --direct_num_workers=2)")


def main(argv: list[str]) -> None:
  cfg = flags.FLAGS.config
  _check_flags()
  beam_args = argv[1:]
  if beam_args and not _RUNNER.value:
    raise UserError(f"unexpected arguments {' '.join(beam_args)!r}: Beam options need --runner")
  if _RUNNER.value:
    try:
      from elas_jax.data import beam_prepare
    except ImportError as e:
      raise UserError(f"--runner={_RUNNER.value} needs Apache Beam ({e}): "
                      "pip install -r requirements-beam.txt") from None
    storage = beam_prepare.BeamStorage()
    tok, tok_path = beam_prepare.load_tokenizer(cfg.data, cfg.model.vocab_size, storage)
    tasks = pretokenize.plan(cfg, beam_prepare.match)
  else:
    storage = pretokenize.LOCAL
    tok = tokenizer_lib.from_config(cfg.data, cfg.model.vocab_size)
    tok_path, tasks = "", pretokenize.plan(cfg)
  mine = pretokenize.assign(tasks, _SHARD_INDEX.value, _NUM_SHARDS.value)
  settings = pretokenize.make_settings(cfg, tok, _OUTPUT.value, _SHARD_DOCS.value, _BATCH.value,
                                       tok_path)
  if _RUNNER.value:
    records = beam_prepare.run(mine, settings, [f"--runner={_RUNNER.value}", *beam_args], storage)
  else:
    records = pretokenize.run_local(mine, settings, _WORKERS.value, tok)
  manifest = pretokenize.merge(tasks, settings, tok, storage)
  pretokenize.summarize(mine, records, settings, manifest, len(tasks))


def run() -> None:
  """Console-script entry point (``elas-prepare``)."""
  cli.define_config_flag()
  cli.run(main)


if __name__ == "__main__":
  run()
