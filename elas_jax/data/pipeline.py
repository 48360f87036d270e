"""The grain input pipeline: documents -> tokens -> fixed-length windows -> batches.

Training stream (per process)::

    documents --[process shard: i::n]--> shuffle(seed, reshuffled every epoch) --> repeat
      --> tokenize (+EOS, optional BOS; grain read threads)
      --> windows of seq_len + 1 tokens:
            concat:       documents joined and cut (ConcatThenSplitIterDataset)
            truncate_pad: one document per row, truncated, padded, pad masked
      --> batch(global_batch / process_count) --> [worker processes]

A window of ``seq_len + 1`` tokens gives ``inputs = w[:-1]``, ``targets =
w[1:]`` and ``mask`` (1 where the target is a real token). ``truncate_pad`` is the
GaLore/LORO C4 protocol: a row is what ``tokenizer(text, max_length=seq_len,
truncation=True, padding="max_length")`` gives with the T5 tokenizer, i.e. the
document's first ``seq_len - 1`` tokens and its EOS, then padding; the targets
are the row shifted by one, padding masked (so at most ``seq_len - 1`` per row,
as in HF's causal-LM loss on such rows). The iterator is a grain
``DatasetIterator``: ``get_state()`` / ``set_state()`` restore it exactly. The
validation stream is fixed: unshuffled documents, the same windows, global
batches until they hold ``eval_tokens`` real target tokens, every process
holding its rows of each.
"""

from __future__ import annotations

import dataclasses

import grain
import jax
import numpy as np
from grain import experimental as grain_exp

from elas_jax.data import corpus, pretokenize, sources, tokenizer as tokenizer_lib
from elas_jax.errors import DataError

PACKING_MODES = ("concat", "truncate_pad")


@dataclasses.dataclass(frozen=True)
class Spec:
  """What the pipeline needs from the config."""

  seq_len: int
  global_batch: int
  packing: str = "concat"
  add_bos: bool = False
  seed: int = 0
  read_threads: int = 2
  prefetch_buffer: int = 64
  worker_count: int = 0
  eval_tokens: int = 0
  steps: int = 0  # optimizer steps of the run (to warn when truncate_pad repeats documents)

  @classmethod
  def from_config(cls, cfg) -> "Spec":
    d = cfg.data
    return cls(seq_len=cfg.train.seq_len, global_batch=cfg.train.batch_size, packing=d.packing,
               add_bos=d.add_bos, seed=cfg.seed, read_threads=d.read_threads,
               prefetch_buffer=d.prefetch_buffer, worker_count=d.worker_count,
               eval_tokens=cfg.train.eval_tokens, steps=cfg.train.steps)


def local_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise DataError(f"config.train.batch_size = {global_batch} is not divisible by the "
                    f"{process_count} processes")
  return global_batch // process_count


def open_split(cfg, split: str):
  """The documents of ``split`` ("train" or "validation") for a config."""
  d = cfg.data
  opts = sources.Options(text_key=d.text_key, txt_split=d.txt_split,
                         skip_bad_records=d.skip_bad_records,
                         max_in_memory_bytes=d.max_in_memory_bytes,
                         prepare_hint=pretokenize.prepare_command(cfg))
  if d.source == "sample":
    path = corpus.sample_corpus()[split]
    return sources.open_documents(path, "data.source (sample corpus)", "jsonl", opts)
  field = "data.train_files" if split == "train" else "data.eval_files"
  return sources.open_documents(d[field.split(".")[1]], field, d.format, opts)


def check_prepared(docs, tok) -> None:
  """Pre-tokenised shards must come from the same tokenizer as the config's."""
  if getattr(docs, "kind", "text") != "tokens":
    return
  want = tokenizer_lib.fingerprint(tok)
  for m in docs.manifests:
    if m.get("tokenizer_sha256") != want:
      raise DataError(f"pre-tokenised data was made with tokenizer {m.get('tokenizer')} "
                      f"(sha256 {m.get('tokenizer_sha256')}), but config.data.tokenizer "
                      f"{tok.path} has sha256 {want}")


class Tokenize:
  """Document (text or token ids) -> int32 tokens with EOS (and optional BOS)."""

  def __init__(self, tok, add_bos: bool):
    if add_bos and tok.bos_id < 0:
      raise DataError(f"config.data.add_bos = True but tokenizer {tok.path} has no BOS token")
    self._tok, self._bos, self._eos = tok, (tok.bos_id if add_bos else None), tok.eos_id

  def __call__(self, doc) -> np.ndarray:
    ids = doc if isinstance(doc, np.ndarray) else np.asarray(self._tok.encode(doc), np.int32)
    parts = ([np.int32([self._bos])] if self._bos is not None else []) + [ids, np.int32([self._eos])]
    return np.concatenate(parts).astype(np.int32)


def document_stream(docs, seed: int, process_index: int, process_count: int,
                    shuffle: bool = True) -> grain.MapDataset:
  """This process's share of the documents, globally shuffled, repeated forever."""
  ds = grain.MapDataset.source(docs)[process_index::process_count]
  if len(ds) == 0:
    raise DataError(f"{len(docs)} document(s) cannot be shared among {process_count} processes")
  return ds.shuffle(seed=seed).repeat() if shuffle else ds


def _split_window(w: np.ndarray, real: np.ndarray) -> dict[str, np.ndarray]:
  return {"inputs": w[:-1], "targets": w[1:], "mask": real[1:].astype(np.int32)}


def windows(ds: grain.IterDataset, spec: Spec, pad_id: int) -> grain.IterDataset:
  """Token arrays -> {"inputs", "targets", "mask"} windows of ``seq_len``."""
  n = spec.seq_len + 1
  if spec.packing == "concat":
    packed = grain_exp.ConcatThenSplitIterDataset(
        ds.map(lambda t: {"tokens": t}), length_struct={"tokens": n})
    # A last, partial window (finite streams only) is zero-padded with segment id 0.
    return packed.map(lambda e: _split_window(e["tokens"], e["tokens_segment_ids"] > 0))
  if spec.packing == "truncate_pad":
    def pad(t: np.ndarray) -> dict[str, np.ndarray]:
      if len(t) > spec.seq_len:  # the row: the document's start and its EOS, as HF truncation keeps
        t = np.concatenate([t[: spec.seq_len - 1], t[-1:]])
      w = np.full((n,), pad_id, np.int32)
      w[: len(t)] = t
      return _split_window(w, np.arange(n) < len(t))
    return ds.map(pad)
  raise DataError(f"config.data.packing = {spec.packing!r}: must be one of {', '.join(PACKING_MODES)}")


def train_dataset(docs, tok, spec: Spec, process_index: int | None = None,
                  process_count: int | None = None) -> grain.IterDataset:
  """The infinite training stream of this process (iterate it for batches)."""
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  local = local_batch_size(spec.global_batch, pc)
  rows = spec.steps * spec.global_batch
  if spec.packing == "truncate_pad" and rows > len(docs) and pi == 0:
    print(f"warning: the training data holds {len(docs):,} documents but train.steps x train.batch_size = "
          f"{rows:,} rows of one document each (data.packing = truncate_pad): documents repeat "
          f"({rows / len(docs):.1f} epochs); give more files for a single pass", flush=True)
  ds = document_stream(docs, spec.seed, pi, pc).map(Tokenize(tok, spec.add_bos))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=spec.read_threads,
                                            prefetch_buffer_size=spec.prefetch_buffer))
  it = windows(it, spec, tok.pad_id).batch(local, drop_remainder=True)
  if spec.worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=spec.worker_count))
  return it


def eval_batches(docs, tok, spec: Spec, process_index: int | None = None,
                 process_count: int | None = None) -> tuple[list[dict[str, np.ndarray]], int]:
  """The fixed validation batches of this process and the global token count.

  Global batches of the documents in order, until they hold ``eval_tokens`` real
  (unmasked) target tokens: with ``concat`` every row is full, so that is
  ``ceil(eval_tokens / (batch x seq_len))`` batches; with ``truncate_pad`` it is as
  many padded rows as it takes, as GaLore/LORO evaluate until 10M tokens are seen.
  Every run with the same data, tokenizer, ``seq_len``, batch size and
  ``eval_tokens`` evaluates exactly the same target tokens.
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  local = local_batch_size(spec.global_batch, pc)
  ds = grain.MapDataset.source(docs).map(Tokenize(tok, spec.add_bos)).to_iter_dataset()
  rows = iter(windows(ds, spec, tok.pad_id))
  batches, tokens, exhausted = [], 0, False
  while tokens < max(spec.eval_tokens, 1):
    window_list = [w for _, w in zip(range(spec.global_batch), rows)]
    if not window_list:
      exhausted = True
      break
    while len(window_list) < spec.global_batch:  # pad the last batch with masked rows
      window_list.append({k: np.zeros_like(v) for k, v in window_list[0].items()})
    batch = {k: np.stack([w[k] for w in window_list]) for k in window_list[0]}
    tokens += int(batch["mask"].sum())
    batches.append({k: v[pi * local:(pi + 1) * local] for k, v in batch.items()})
  if exhausted:
    print(f"warning: the validation data holds {tokens} target tokens, fewer than "
          f"train.eval_tokens = {spec.eval_tokens}; evaluating on all of them", flush=True)
  return batches, tokens


def global_batch(local: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """This process's rows -> global ``jax.Array``s laid out by ``sharding``."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
