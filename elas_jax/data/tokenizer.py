"""Tokenizers: SentencePiece models, HF ``tokenizer.json`` files, and the sample tokenizer.

BOS/EOS: documents are encoded without special tokens; the pipeline appends
EOS to every document (and prepends BOS when ``data.add_bos``), so packed
windows show document boundaries the way T5/LLaMA-style pre-training does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from typing import Iterable, Protocol

from elas_jax.data import corpus
from elas_jax.errors import DataError


class Tokenizer(Protocol):
  vocab_size: int
  eos_id: int
  bos_id: int
  pad_id: int
  path: str

  def encode(self, text: str) -> list[int]: ...

  def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

  def decode(self, ids: Iterable[int]) -> str: ...


@dataclasses.dataclass
class SentencePieceTokenizer:
  """A SentencePiece ``.model`` file."""

  path: str
  threads: int = 0  # encode_batch threads; 0 = one per CPU (prepare's workers share the CPUs)

  def __post_init__(self):
    import sentencepiece as spm

    try:
      self._sp = spm.SentencePieceProcessor(model_file=self.path)
    except Exception as e:  # sentencepiece raises OSError/RuntimeError with C++ text
      raise DataError(f"{self.path}: not a readable SentencePiece model ({e})") from None
    self.vocab_size = self._sp.get_piece_size()
    self.eos_id = self._sp.eos_id()
    if self.eos_id < 0:
      raise DataError(f"{self.path}: the SentencePiece model defines no EOS token")
    self.bos_id = self._sp.bos_id()
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self._sp.encode(texts, num_threads=self.threads or os.cpu_count() or 1)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])


_EOS_NAMES = ("</s>", "<|endoftext|>", "<eos>", "[SEP]")
_BOS_NAMES = ("<s>", "<|startoftext|>", "<bos>", "[CLS]")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>")


@dataclasses.dataclass
class HFTokenizer:
  """A Hugging Face ``tokenizers`` JSON file."""

  path: str

  def __post_init__(self):
    from tokenizers import Tokenizer as _Tok

    try:
      self._tok = _Tok.from_file(self.path)
    except Exception as e:
      raise DataError(f"{self.path}: not a readable tokenizer.json ({e})") from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def find(names):
      for n in names:
        i = self._tok.token_to_id(n)
        if i is not None:
          return i
      return -1

    self.eos_id = find(_EOS_NAMES)
    if self.eos_id < 0:
      raise DataError(f"{self.path}: no EOS token found (looked for {', '.join(_EOS_NAMES)})")
    self.bos_id = find(_BOS_NAMES)
    pad = find(_PAD_NAMES)
    self.pad_id = pad if pad >= 0 else self.eos_id

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids])


def load(path: str) -> Tokenizer:
  """A SentencePiece model or a ``tokenizer.json``, chosen by content."""
  if not os.path.isfile(path):
    raise DataError(f"config.data.tokenizer = {path!r}: file does not exist")
  with open(path, "rb") as f:
    head = f.read(1).lstrip()
  if path.endswith(".json") or head == b"{":
    return HFTokenizer(path)
  return SentencePieceTokenizer(path)


def train_sample_tokenizer(vocab_size: int) -> str:
  """Trains (once, cached) a SentencePiece unigram model on the sample's train split.

  Ids: pad 0, eos 1, unk 2, bos 3 (T5's first three, plus a BOS); byte
  fallback, so any text encodes. Single-threaded on a fixed input order:
  the same model bytes every time.
  """
  import sentencepiece as spm

  files = corpus.sample_corpus()
  root = os.path.dirname(files["train"])
  path = os.path.join(root, f"spm_unigram_{vocab_size}.model")
  if os.path.isfile(path):
    return path
  with corpus.locked(os.path.join(root, ".tokenizer.lock")):
    if os.path.isfile(path):
      return path
    with open(files["train"], encoding="utf-8") as f:
      docs = [json.loads(line)["text"] for line in f]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=3, byte_fallback=True,
        character_coverage=0.9995, num_threads=1, shuffle_input_sentence=False,
        max_sentence_length=1 << 20, minloglevel=2)
    with open(path + ".tmp", "wb") as f:
      f.write(model.getvalue())
    os.replace(path + ".tmp", path)
  return path


def from_config(data_cfg, vocab_size: int) -> Tokenizer:
  """The tokenizer a config asks for; its vocabulary must equal the model's."""
  if data_cfg.tokenizer:
    tok = load(data_cfg.tokenizer)
  elif data_cfg.source == "sample":
    tok = load(train_sample_tokenizer(vocab_size))
  else:
    raise DataError("config.data.tokenizer is empty: data.source = 'files' needs a SentencePiece "
                    "model or tokenizer.json path")
  if tok.vocab_size != vocab_size:
    raise DataError(f"config.model.vocab_size = {vocab_size} but tokenizer {tok.path} has "
                    f"{tok.vocab_size} tokens; set --config.model.vocab_size={tok.vocab_size}")
  return tok


def fingerprint(tok: Tokenizer) -> str:
  """Content hash of the tokenizer file (recorded with pre-tokenised data)."""
  with open(tok.path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]
