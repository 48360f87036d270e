"""Tokenizers: SentencePiece models, HF ``tokenizer.json`` files, Hub tokenizers
(``hf:<owner>/<name>``, resolved by :mod:`elas_jax.data.hub`) and the sample tokenizer.

BOS/EOS: documents are encoded without special tokens; the pipeline appends
EOS to every document (and prepends BOS when ``data.add_bos``), so packed
windows show document boundaries the way T5/LLaMA-style pre-training does.
Special tokens spelled out in a document's text (``</s>``, T5's ``<extra_id_0>``)
are encoded as text, as SentencePiece does, never as their ids.

Vocabulary: ``model.vocab_size`` must equal the tokenizer's vocabulary, or its
vocabulary without the trailing special tokens it never emits from text
(:attr:`text_vocab_size`). T5's tokenizer (``hf:google-t5/t5-base``) has 32,100
ids: 32,000 SentencePiece pieces and 100 span-corruption sentinels
``<extra_id_*>`` at 32,000-32,099; the paper configs' 32,000-row embedding
covers every id it emits, as in the GaLore/LORO code (vocab 32000, t5-base).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from typing import Iterable, Protocol

from elas_jax.data import corpus, hub
from elas_jax.errors import DataError


class Tokenizer(Protocol):
  vocab_size: int  # every id
  text_vocab_size: int  # ids text can encode to: vocab_size less trailing special tokens
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
    self.vocab_size = self.text_vocab_size = self._sp.get_piece_size()
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
    # Special tokens written in a document are text, not control ids (SentencePiece's
    # behaviour); so the special tokens added after the model's vocabulary (T5's
    # sentinels) are never emitted and need no embedding row.
    self._tok.encode_special_tokens = True
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
    # The ids text encodes to, plus the EOS/BOS/pad ids the pipeline writes.
    added = self._tok.get_added_tokens_decoder()
    n = self.vocab_size
    while n > 0 and getattr(added.get(n - 1), "special", False):
      n -= 1
    self.text_vocab_size = max(n, self.eos_id + 1, self.bos_id + 1, self.pad_id + 1)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids])


def load(path: str) -> Tokenizer:
  """A SentencePiece model or a ``tokenizer.json``, chosen by content; ``hf:<owner>/<name>``
  is a Hub repository's tokenizer (:func:`hub.tokenizer_file`)."""
  if hub.is_hub_tokenizer(path):
    path = hub.tokenizer_file(path)
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
                    "model or tokenizer.json path, or a Hub tokenizer (hf:google-t5/t5-base)")
  check_vocab(tok, vocab_size, data_cfg.tokenizer or tok.path)
  return tok


def check_vocab(tok: Tokenizer, vocab_size: int, name: str) -> None:
  """``vocab_size`` (the model's) must cover every id ``tok`` emits: its vocabulary,
  with or without the trailing special tokens it never emits (module docstring)."""
  if vocab_size in (tok.vocab_size, tok.text_vocab_size):
    return
  unused = tok.vocab_size - tok.text_vocab_size
  extra = f" (the last {unused} special tokens it never emits: {tok.text_vocab_size} fits too)" if unused else ""
  raise DataError(f"config.model.vocab_size = {vocab_size} but tokenizer {name} has {tok.vocab_size} "
                  f"tokens{extra}; set --config.model.vocab_size={tok.text_vocab_size}")


def fingerprint(tok: Tokenizer) -> str:
  """Content hash of the tokenizer file (recorded with pre-tokenised data)."""
  with open(tok.path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]
