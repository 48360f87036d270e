"""The embedded offline sample corpus: a Wikipedia excerpt shipped in gensim.

The ``gensim`` wheel carries ``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
(MediaWiki XML, CC BY-SA). It is located with ``importlib.util.find_spec``
(gensim itself is never imported), its articles are converted from wiki markup
to plain text with ``mwparserfromhell``, each article is cut into documents at
its level-2 sections (closer to C4's web-page sized documents than whole
articles), and articles are split deterministically into train and validation
by a hash of their title, so no article contributes to both. The result is
cached as JSON lines under the cache directory.
"""

from __future__ import annotations

import bz2
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import xml.etree.ElementTree as ET
from typing import Iterator

CORPUS_VERSION = "v1"  # bump when the cleaning changes: invalidates caches
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
VALIDATION_FRACTION = 0.1  # of articles, chosen by title hash
MIN_DOC_CHARS = 200

_XML_NS = "{http://www.mediawiki.org/xml/export-0.10/}"
# Image-caption options that strip_code leaves in the text ("thumb|200px|...").
_IMAGE_OPTS = re.compile(r"(?:\b(?:thumb|thumbnail|left|right|center|upright|frameless|frame|border|"
                         r"\d+(?:x\d+)?px)\|)+")


def cache_dir() -> str:
  """``$ELAS_JAX_CACHE`` or ``~/.cache/elas_jax``."""
  return os.environ.get("ELAS_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "elas_jax")


def wiki_dump_path() -> str:
  spec = importlib.util.find_spec("gensim")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("the sample corpus ships in the 'gensim' package: pip install gensim")
  path = os.path.join(spec.submodule_search_locations[0], "test", "test_data", WIKI_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: the installed gensim has no Wikipedia sample")
  return path


def _clean(text: str) -> str:
  lines = []
  for line in text.splitlines():
    line = _IMAGE_OPTS.sub("", line)
    line = re.sub(r"[ \t]+", " ", line).strip()
    if line:
      lines.append(line)
  return "\n".join(lines)


def articles(path: str | None = None) -> Iterator[tuple[str, list[str]]]:
  """(title, section texts) of every main-namespace, non-redirect page."""
  import mwparserfromhell

  with bz2.open(path or wiki_dump_path()) as f:
    for _, el in ET.iterparse(f, events=("end",)):
      if el.tag != _XML_NS + "page":
        continue
      if el.findtext(_XML_NS + "ns") == "0" and el.find(_XML_NS + "redirect") is None:
        title = el.findtext(_XML_NS + "title") or ""
        wikicode = mwparserfromhell.parse(el.findtext(f"{_XML_NS}revision/{_XML_NS}text") or "")
        sections = []
        for section in wikicode.get_sections(levels=[2], include_lead=True):
          text = _clean(section.strip_code())
          if len(text) >= MIN_DOC_CHARS:
            sections.append(text)
        if sections:
          yield title, sections
      el.clear()


def is_validation(title: str) -> bool:
  h = int.from_bytes(hashlib.sha256(title.encode()).digest()[:8], "big")
  return h / 2**64 < VALIDATION_FRACTION


@contextlib.contextmanager
def locked(path: str):
  """An exclusive inter-process lock (several test workers may build the cache)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def sample_corpus() -> dict[str, str]:
  """Builds (once) and returns ``{"train": path, "validation": path}`` JSON-lines files."""
  root = os.path.join(cache_dir(), "sample", CORPUS_VERSION)
  out = {split: os.path.join(root, f"{split}.jsonl") for split in ("train", "validation")}
  if all(os.path.isfile(p) for p in out.values()):
    return out
  with locked(os.path.join(root, ".lock")):
    if all(os.path.isfile(p) for p in out.values()):
      return out
    tmp = {split: p + ".tmp" for split, p in out.items()}
    files = {split: open(p, "w", encoding="utf-8") for split, p in tmp.items()}
    try:
      for title, sections in articles():
        f = files["validation" if is_validation(title) else "train"]
        for i, text in enumerate(sections):
          f.write(json.dumps({"text": text, "title": title, "section": i}, ensure_ascii=False) + "\n")
    finally:
      for f in files.values():
        f.close()
    for split in out:
      os.replace(tmp[split], out[split])  # atomic: readers never see a partial file
  return out
