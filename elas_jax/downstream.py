"""lm-evaluation-harness on ELAS-JAX checkpoints, in JAX (no torch; ELAS keeps its 2:4 FFN).

    from elas_jax import downstream
    downstream.register()                      # lm-eval's model name "elas_jax"
    lm = downstream.ElasJaxLM(workdir="runs/tiny-elas", batch_size=32)
    lm_eval.simple_evaluate(model=lm, tasks=["my_task"], task_manager=...)

or from the command line, ``elas-lm-eval`` (:mod:`elas_jax.lm_eval`).

:class:`ElasJaxLM` is an ``lm_eval.api.model.TemplateLM``: lm-eval tokenizes
``(context, continuation)`` pairs with :meth:`ElasJaxLM.tok_encode` (the
checkpoint's own tokenizer) and this class scores token ids:

- ``loglikelihood``: rows of ``(context + continuation)[-(max_length+1):]``
  (contexts longer than the window are cut from the left, as lm-eval's ``hf``
  model does), sorted by length, right-padded to a power-of-two bucket
  (:func:`elas_jax.decode.bucket`, capped at ``max_length``) and scored
  ``batch_size`` rows at a time by one jitted full forward pass per bucket:
  the batch shape is fixed, so at most ``log2(max_length) + 1`` programs are
  compiled, whatever the requests.
- ``loglikelihood_rolling``: the whole text in windows of ``max_length``
  tokens that advance by ``rolling_stride`` (default ``max_length``: disjoint
  windows, as the ``hf`` model), from ``lm_eval.utils.get_rolling_token_windows``;
  each token is scored exactly once, the first one after the prefix token.
- ``generate_until``: :class:`elas_jax.decode.Generator` (KV cache, batched),
  stopped at EOS, at the first stop string of ``until`` or after
  ``max_gen_toks``; the text is cut before the first stop string.

Model and tokenizer come from the checkpoint (:func:`elas_jax.decode.load`: its
saved config, restored onto this machine's mesh, scanned layers unstacked).
ELAS checkpoints past the dense warm-up run the 2:4 FFN, as evaluation does;
``dense=True`` runs the dense ReLU² FFN. Empty contexts and the rolling prefix
use BOS when the run trained with ``data.add_bos``, else EOS (what precedes a
document in the packed training stream).

Needs ``pip install -r requirements-eval.txt``; nothing else in ``elas_jax``
imports this module.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

try:
  import lm_eval.models  # noqa: F401  (lm-eval's own model table, registered lazily)
  from lm_eval import utils as lm_utils
  from lm_eval.api.model import TemplateLM
  from lm_eval.api.registry import model_registry
except ImportError as e:  # pragma: no cover - exercised only without the extra
  raise ImportError("elas_jax.downstream needs lm-eval: pip install -r requirements-eval.txt "
                    f"(or the [eval] extra): {e}") from e

from elas_jax import decode, sharding
from elas_jax.errors import UserError
from elas_jax.ops import ffn

MODEL_NAME = "elas_jax"
GEN_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")
_log = logging.getLogger(__name__)


def register(name: str = MODEL_NAME) -> None:
  """Registers :class:`ElasJaxLM` in lm-eval's model registry (idempotent).

  lm-eval's CLI looks models up only in that registry; ``lm_eval.models`` is
  imported first (above) because lm-eval fills in its own table only when it
  finds the registry empty.
  """
  if model_registry.get(name, None) is not ElasJaxLM:
    model_registry.register(name, target=ElasJaxLM)


def token_logprobs(model, tokens_BxL: jax.Array, targets_BxL: jax.Array, sparse_on: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """Per-position ``log p(target | tokens[:i+1])`` and whether the target is the argmax."""
  logits_BxLxV, _ = model(tokens_BxL, sparse_on)
  logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
  logp_BxL = jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  return logp_BxL, jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL


def _as_bool(value: Any, key: str) -> bool:
  if isinstance(value, bool):
    return value
  if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
    return value.lower() in ("true", "1")
  if isinstance(value, int) and value in (0, 1):
    return bool(value)
  raise UserError(f"model_args {key}={value!r}: expected True or False")


def _as_int(value: Any, key: str, minimum: int = 1) -> int:
  if isinstance(value, str) and value.strip().lstrip("-").isdigit():
    value = int(value)
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise UserError(f"model_args {key}={value!r}: expected an integer >= {minimum}")
  return value


def _as_mesh(value: Any) -> tuple[int, int, int] | None:
  """``mesh`` as ``[d,f,t]`` / ``(d,f,t)`` or the string ``"d,f,t"`` (as ``--mesh``)."""
  if value is None or value == "":
    return None
  if isinstance(value, str):
    return sharding.parse_mesh(value, flag="model_args mesh")
  if isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, int) for v in value):
    return tuple(value)
  raise UserError(f"model_args mesh={value!r}: expected three integers data,fsdp,tensor, "
                  "e.g. mesh=[1,-1,1]")


def _batch_size(value: Any, max_batch_size: Any) -> int:
  """An integer, or lm-eval's ``auto`` / ``auto:N``, which this model reads as
  ``max_batch_size`` (default 32): jitted batches have one fixed size, so there is
  nothing to probe."""
  if isinstance(value, str) and value.startswith("auto"):
    size = _as_int(max_batch_size, "max_batch_size") if max_batch_size else 32
    _log.info("batch_size=%s: using %d rows per batch", value, size)
    return size
  return _as_int(value, "batch_size")


class ElasJaxLM(TemplateLM):
  """An ELAS-JAX checkpoint as an lm-eval language model.

  model_args: ``workdir`` (the training run), ``step`` (default: the latest
  checkpoint), ``dense`` (ELAS: the dense ReLU² FFN instead of 2:4),
  ``batch_size`` (rows per jitted batch; rounded up to a multiple of the
  mesh's data x fsdp ways), ``mesh`` (data, fsdp, tensor, as ``--mesh``),
  ``max_length`` (window, default the training ``seq_len``),
  ``max_gen_toks`` (generation default, 256), ``rolling_stride`` (default
  ``max_length``), ``kernel`` (the 2:4 FFN implementation). lm-eval's
  ``device`` is ignored (JAX places the model on ``mesh``).
  """

  def __init__(self, workdir: str, step: int | None = None, dense: bool = False,
               batch_size: int | str = 16, mesh: Any = None, max_length: int | None = None,
               max_gen_toks: int = 256, rolling_stride: int | None = None, kernel: str | None = None,
               max_batch_size: int | None = None, device: str | None = None, devices=None, **unknown):
    super().__init__()
    if unknown:
      known = ("workdir, step, dense, batch_size, mesh, max_length, max_gen_toks, rolling_stride, "
               "kernel")
      raise UserError(f"model_args: unknown key(s) {', '.join(sorted(unknown))} for model "
                      f"{MODEL_NAME!r}; known: {known}")
    if jax.process_count() > 1:
      raise UserError("the elas_jax lm-eval model runs in one process (its mesh spans that "
                      "process's devices); start lm-eval once per host with its own share of tasks")
    if kernel is not None and kernel not in ffn.KERNELS:
      raise UserError(f"model_args kernel={kernel!r}: expected one of {', '.join(ffn.KERNELS)}")
    dense = _as_bool(dense, "dense")
    batch = _batch_size(batch_size, max_batch_size)
    step = None if step is None else _as_int(step, "step", minimum=0)
    self.max_gen_toks = _as_int(max_gen_toks, "max_gen_toks")
    del device  # lm-eval's torch device string; the mesh decides here

    run, params, self.step = decode.load(str(workdir), step, mesh_shape=_as_mesh(mesh), kernel=kernel,
                                         devices=devices)
    self.run, self.params, self.cfg, self.tok = run, params, run.cfg, run.tokenizer
    self._max_length = (_as_int(max_length, "max_length") if max_length is not None
                        else int(self.cfg.train.seq_len))
    self.rolling_stride = (_as_int(rolling_stride, "rolling_stride") if rolling_stride is not None
                           else self._max_length)
    if self.rolling_stride > self._max_length:
      raise UserError(f"model_args rolling_stride={self.rolling_stride}: at most max_length "
                      f"{self._max_length}")
    self.sparse_on = decode.sparse_on_for(self.cfg, self.step, dense)
    ways = int(np.prod([run.mesh.shape[a] for a in sharding.BATCH_AXES]))
    self.batch_size = -(-batch // ways) * ways
    graphdef = run.graphdef

    def score(params, tokens_BxL, targets_BxL, mask_BxL, sparse_on):
      logp_BxL, greedy_BxL = token_logprobs(nnx.merge(graphdef, params), tokens_BxL, targets_BxL,
                                            sparse_on)
      ll_B = jnp.sum(jnp.where(mask_BxL, logp_BxL, 0.0), axis=-1)
      return ll_B, jnp.all(greedy_BxL | ~mask_BxL, axis=-1)

    rows = NamedSharding(run.mesh, P(sharding.BATCH_AXES))
    p_sh = jax.tree.map(lambda a: a.sharding, params)
    rep = sharding.replicated(run.mesh)
    self._score = jax.jit(score, in_shardings=(p_sh, rows, rows, rows, rep), out_shardings=rows)
    self._generators: dict[tuple, decode.Generator] = {}
    _log.info("elas_jax: %s step %d, %s FFN, batch %d, max_length %d", workdir, self.step,
              "2:4" if self.sparse_on else "dense", self.batch_size, self._max_length)

  # ------------------------------------------------------------ lm-eval API

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
    """As lm-eval's, except that ``model_args`` win over the CLI's ``--batch_size``
    (which lm-eval always passes, 1 by default) instead of clashing with it."""
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
    return cls(**arg_dict, **extra)

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
    return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

  @property
  def eot_token_id(self) -> int:
    return self.tok.eos_id

  @property
  def prefix_token_id(self) -> int:
    if self.cfg.data.add_bos and self.tok.bos_id >= 0:
      return self.tok.bos_id
    return self.tok.eos_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def tokenizer_name(self) -> str:
    return self.tok.path.replace("/", "__")

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    """The checkpoint's tokenizer, BOS first when the run trained with ``data.add_bos``
    (unless ``add_special_tokens=False``)."""
    if add_special_tokens is False:
      return self.tok.encode(string)
    return decode.encode(self.tok, self.cfg, string)

  def tok_decode(self, ids: Iterable[int]) -> str:
    return self.tok.decode(ids)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                            ) -> list[tuple[float, bool]]:
    out = self.score_tokens([(ctx, cont) for _, ctx, cont in requests], disable_tqdm=disable_tqdm)
    for (request_str, _, _), answer in zip(requests, out):
      if request_str is not None:
        self.cache_hook.add_partial("loglikelihood", request_str, answer)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for i, req in enumerate(requests):
      (string,) = req.args
      for w in self.rolling_windows(self.tok_encode(string, add_special_tokens=False)):
        windows.append(w)
        owner.append(i)
    scores = self.score_tokens(windows, disable_tqdm=disable_tqdm, desc="Rolling windows")
    totals = [0.0] * len(requests)
    for i, (ll, _) in zip(owner, scores):
      totals[i] += ll
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    # Every request is checked before anything is compiled.
    jobs = [self._generation_job(i, *req.args) for i, req in enumerate(requests)]
    out: list[str | None] = [None] * len(jobs)
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
      groups.setdefault(job["sampling"] + (job["max_gen_toks"],), []).append(i)
    from tqdm import tqdm

    with tqdm(total=len(jobs), desc="Running generate_until requests", disable=disable_tqdm) as bar:
      for key, members in groups.items():
        gen = self._generator(key[:3])
        members.sort(key=lambda i: -len(jobs[i]["prompt"]))
        for lo in range(0, len(members), gen.batch):
          chunk = [jobs[i] for i in members[lo:lo + gen.batch]]
          prompts = [j["prompt"] for j in chunk]

          def stopped(row: int, ids: list[int], chunk=chunk, prompts=prompts) -> bool:
            text = decode.continuation(self.tok, prompts[row], ids)
            return any(s in text for s in chunk[row]["until"])

          results = gen.generate(prompts, key[3], seed=lo, stop_fn=stopped)
          for job, res in zip(chunk, results):
            text = decode.continuation(self.tok, job["prompt"], res.tokens)
            for s in job["until"]:
              text = text.split(s)[0]
            out[job["index"]] = text
            self.cache_hook.add_partial("generate_until", job["args"], text)
          bar.update(len(chunk))
    return out

  # ------------------------------------------------------------ token level

  def rolling_windows(self, ids: list[int]) -> list[tuple[list[int], list[int]]]:
    """``(context, continuation)`` windows covering ``ids``, each token once."""
    context_len = self._max_length - self.rolling_stride + 1
    return [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
        token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=self._max_length,
        context_len=context_len)]

  def score_tokens(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool = False,
                   desc: str = "Running loglikelihood requests") -> list[tuple[float, bool]]:
    """``(sum of log p(continuation | context), whether greedy decoding gives it)`` per pair."""
    rows = []
    for i, (ctx, cont) in enumerate(pairs):
      if len(cont) > self._max_length:
        raise UserError(f"request {i}: the continuation has {len(cont)} tokens, more than the "
                        f"model's max_length {self._max_length}")
      ctx = list(ctx) or [self.prefix_token_id]
      full = (ctx + list(cont))[-(self._max_length + 1):]  # cut from the left, as the hf model
      rows.append((full[:-1], full[1:], len(cont)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first: ETA honest
    out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
    from tqdm import tqdm

    b = self.batch_size
    with tqdm(total=len(rows), desc=desc, disable=disable_tqdm) as bar:
      for lo in range(0, len(order), b):
        chunk = order[lo:lo + b]
        width = decode.bucket(len(rows[chunk[0]][0]), self._max_length)
        tokens = np.full((b, width), self.tok.pad_id, np.int32)
        targets = np.zeros((b, width), np.int32)
        mask = np.zeros((b, width), bool)
        for j, i in enumerate(chunk):
          inp, tgt, n_cont = rows[i]
          n = len(inp)
          tokens[j, :n], targets[j, :n] = inp, tgt
          mask[j, n - n_cont:n] = True  # the continuation's tokens are the last targets
        ll_B, greedy_B = self._score(self.params, tokens, targets, mask, jnp.asarray(self.sparse_on))
        ll_B, greedy_B = np.asarray(ll_B), np.asarray(greedy_B)
        for j, i in enumerate(chunk):
          out[i] = (float(ll_B[j]), bool(greedy_B[j]))
        bar.update(len(chunk))
    return out

  # ------------------------------------------------------------ helpers

  def _generation_job(self, index: int, context: str, gen_kwargs: dict | None) -> dict:
    kw = dict(gen_kwargs or {})
    bad = sorted(set(kw) - set(GEN_KEYS))
    if bad:
      raise UserError(f"generate_until request {index}: unsupported generation argument(s) "
                      f"{', '.join(bad)} (supported: {', '.join(GEN_KEYS)})")
    until = kw.get("until") or []
    until = [until] if isinstance(until, str) else [s for s in until if s]
    max_gen = _as_int(kw.get("max_gen_toks", self.max_gen_toks), "max_gen_toks")
    temperature = float(kw.get("temperature", 1.0 if kw.get("do_sample") else 0.0))
    if not kw.get("do_sample", temperature > 0):
      temperature = 0.0
    sampling = (temperature, int(kw.get("top_k") or 0), float(kw.get("top_p") or 1.0))
    # Left-truncate the context to leave room for max_gen_toks, keeping at
    # least half the window (the hf model would keep max_length - max_gen_toks,
    # nothing when that is negative); the cache end stops the generation.
    keep = max(self._max_length - max_gen, self._max_length // 2, 1)
    prompt = self.tok_encode(context)[-keep:] or [self.prefix_token_id]
    return {"index": index, "args": (context, gen_kwargs), "until": until, "max_gen_toks": max_gen,
            "sampling": sampling, "prompt": prompt}

  def _generator(self, sampling: tuple[float, int, float]) -> decode.Generator:
    if sampling not in self._generators:
      temperature, top_k, top_p = sampling
      self._generators[sampling] = decode.Generator(
          self.run.graphdef, self.params, self.cfg.model, batch_size=self.batch_size,
          max_len=self._max_length, sparse_on=self.sparse_on, eos_id=self.tok.eos_id,
          pad_id=self.tok.pad_id, temperature=temperature, top_k=top_k, top_p=top_p,
          mesh=self.run.mesh)
    return self._generators[sampling]
