"""Hugging Face Hub datasets and tokenizers by name, through huggingface_hub's cache.

- ``hf://datasets/<owner>/<name>[@<revision>]/<glob>`` (any ``data.train_files`` /
  ``eval_files`` glob, hence ``prepare`` too): :func:`match` returns the local paths of
  the matching files, e.g. ``hf://datasets/allenai/c4/en/c4-train.0000*-of-01024.json.gz``.
- ``hf:<owner>/<name>[@<revision>][/<file>]`` (``data.tokenizer``): :func:`tokenizer_file`
  returns a local tokenizer file of that repository, e.g. ``hf:google-t5/t5-base``.

Both go through one huggingface_hub call, ``snapshot_download(repo, allow_patterns=...)``:
online it lists the repository at the revision (the listing is cached per commit under
the cache's ``trees/``), downloads the matching files that are not cached yet and
returns the snapshot folder; offline (``HF_HUB_OFFLINE=1``, or the Hub unreachable) it
returns the cached snapshot of the revision, and refuses one that the cached listing
shows to be incomplete. Either way the files are then read from that folder, by the same
readers as any local file (the offset index, gzip, the resumable ``prepare``), so the
download path differs from the offline one only in huggingface_hub's network calls.

Why not stream through ``HfFileSystem`` (fsspec): it makes an HTTP call for every
listing and read, and has no offline mode; and training needs random access and stable
files (the offset index, ``prepare``'s size/mtime records), which a cached local copy
gives. The cache is huggingface_hub's own (``HF_HUB_CACHE``, default
``~/.cache/huggingface/hub``), shared with ``datasets`` and ``transformers``.

Globs follow huggingface_hub's ``allow_patterns`` (``fnmatch``: ``*`` also matches ``/``),
so the files used are exactly the files downloaded.
"""

from __future__ import annotations

import os
import sys

from elas_jax.errors import DataError

SCHEME = "hf://"  # data files
TOKENIZER_PREFIX = "hf:"  # data.tokenizer
# A tokenizer repository's files, in order of preference: tokenizer.json is what
# transformers' AutoTokenizer loads (T5TokenizerFast for t5-base, as the papers' code
# does); the SentencePiece models are the fallback for repositories without one.
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model")


def is_hub_files(pattern: str) -> bool:
  return pattern.startswith(SCHEME)


def is_hub_tokenizer(spec: str) -> bool:
  return spec.startswith(TOKENIZER_PREFIX)


def _parse(uri: str, what: str):
  from huggingface_hub import parse_hf_uri
  from huggingface_hub.errors import HfUriError

  try:
    parsed = parse_hf_uri(uri)
  except HfUriError as e:
    raise DataError(f"{what}: {e}".strip()) from None
  if parsed.type not in ("dataset", "model"):
    raise DataError(f"{what}: a {parsed.type} URI; give a dataset (hf://datasets/...) or model repository")
  return parsed


def _snapshot(repo_id: str, repo_type: str, revision: str | None, patterns: list[str], what: str) -> str:
  """huggingface_hub's snapshot folder of ``repo_id`` holding the files that match ``patterns``."""
  from huggingface_hub import constants, snapshot_download
  from huggingface_hub import errors as hf_errors

  name = f"{repo_type} repository {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
  try:
    return snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=patterns)
  except hf_errors.IncompleteSnapshotError as e:
    missing = _missing(repo_id, repo_type, revision, patterns, e.snapshot_path)
    raise DataError(f"{what}: {len(missing)} matching file(s) of the {name} are not in the Hugging Face "
                    f"cache (first: {missing[0] if missing else '?'}) and the Hub cannot be reached; "
                    "rerun with network access to download them") from None
  except hf_errors.LocalEntryNotFoundError:
    cause = ("HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "the Hub cannot be reached")
    raise DataError(f"{what}: the {name} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                    f"{cause}; download it once with network access") from None
  except hf_errors.RevisionNotFoundError:
    raise DataError(f"{what}: the {name} has no such revision on the Hub") from None
  except hf_errors.RepositoryNotFoundError:  # also gated and private repositories
    raise DataError(f"{what}: no {name} on the Hub, or it is private or gated (log in with "
                    "`hf auth login` or set HF_TOKEN)") from None
  except hf_errors.HfHubHTTPError as e:
    raise DataError(f"{what}: the Hub refused the {name} ({' '.join(str(e).split())})") from None


def _missing(repo_id: str, repo_type: str, revision: str | None, patterns: list[str], folder: str) -> list[str]:
  """The files of the cached listing that match ``patterns`` but are not in ``folder``."""
  from huggingface_hub import get_cached_repo_tree
  from huggingface_hub.utils import filter_repo_objects

  listed = [f.path for f in get_cached_repo_tree(repo_id, repo_type=repo_type, revision=revision)]
  return sorted(p for p in filter_repo_objects(listed, allow_patterns=patterns)
                if not os.path.exists(os.path.join(folder, p)))


def _warn_if_unlisted(repo_id: str, repo_type: str, revision: str | None, what: str) -> None:
  """Offline with no cached listing (files fetched one by one, e.g. by hf_hub_download),
  huggingface_hub cannot tell whether the cached snapshot is complete: say so."""
  from huggingface_hub import get_cached_repo_tree
  from huggingface_hub.errors import CachedRepoTreeNotFoundError

  try:
    get_cached_repo_tree(repo_id, repo_type=repo_type, revision=revision)
  except CachedRepoTreeNotFoundError:
    print(f"warning: {what}: no cached file listing of the {repo_type} repository {repo_id!r}, so the "
          "cached files matched here may be fewer than the Hub holds", file=sys.stderr, flush=True)


def match(uri: str) -> list[str]:
  """The local paths (in huggingface_hub's cache) of the files an ``hf://`` glob matches,
  sorted; downloads those not cached yet when the Hub is reachable."""
  from huggingface_hub.utils import filter_repo_objects

  parsed = _parse(uri, uri)
  if not parsed.path_in_repo:
    raise DataError(f"{uri}: give a glob of files inside the repository, e.g. "
                    "hf://datasets/allenai/c4/en/c4-train.0000*-of-01024.json.gz")
  folder = _snapshot(parsed.id, parsed.type, parsed.revision, [parsed.path_in_repo], uri)
  _warn_if_unlisted(parsed.id, parsed.type, parsed.revision, uri)
  found = []
  for root, _, names in os.walk(folder):
    found += [os.path.relpath(os.path.join(root, n), folder).replace(os.sep, "/") for n in names]
  chosen = filter_repo_objects(found, allow_patterns=[parsed.path_in_repo])
  return sorted(os.path.join(folder, f) for f in chosen if os.path.isfile(os.path.join(folder, f)))


def tokenizer_file(spec: str) -> str:
  """The local path of the tokenizer ``hf:<owner>/<name>[@<revision>][/<file>]`` names:
  the given file, else the first of :data:`TOKENIZER_FILES` the repository has."""
  what = f"config.data.tokenizer = {spec!r}"
  parsed = _parse(SCHEME + spec[len(TOKENIZER_PREFIX):], what)
  if parsed.type != "model":
    raise DataError(f"{what}: give a model repository, hf:<owner>/<name>")
  names = [parsed.path_in_repo] if parsed.path_in_repo else list(TOKENIZER_FILES)
  folder = _snapshot(parsed.id, parsed.type, parsed.revision, names, what)
  for name in names:
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  raise DataError(f"{what}: the model repository {parsed.id!r} has no {' or '.join(names)}"
                  + ("" if parsed.path_in_repo else "; name its tokenizer file: hf:<owner>/<name>/<file>"))
