"""lm-evaluation-harness on ELAS-JAX checkpoints (elas_jax/downstream.py, elas_jax/lm_eval.py).

Runs offline: the tasks are YAML files written here (``dataset_path: json``
with local ``data_files``), the model a tiny ELAS run trained here (past its
dense warm-up, so the 2:4 FFN is on). The references never call the adapter:
they tokenize as lm-eval's contract says (trailing context spaces move to the
continuation; BOS/EOS before an empty context), run the restored model on each
unpadded sequence (``Transformer.__call__``, one sequence at a time) and read
the target log-probabilities and argmaxes off it; rolling windows and greedy
decoding are likewise re-derived here. Skipped without lm-eval.
"""

import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install -r requirements-eval.txt")

from elas_jax import downstream, trainer  # noqa: E402
from elas_jax.ops import sparsity  # noqa: E402
from elas_jax.errors import UserError  # noqa: E402
from tests.helpers import ROOT, tiny_train_config, xla_flags  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

STEPS = 8  # tiny config: dense warm-up 4 steps, so the checkpoint decodes 2:4


@pytest.fixture(scope="module", autouse=True)
def offline_hf(tmp_path_factory):
  """lm-eval reads tasks through HF ``datasets``: offline, with a throwaway cache."""
  home = tmp_path_factory.mktemp("hf_home")
  env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(home),
         "HF_DATASETS_CACHE": str(home / "datasets")}
  with pytest.MonkeyPatch.context() as mp:
    for k, v in env.items():
      mp.setenv(k, v)
    if "datasets" in sys.modules:  # imported earlier in this process: set what it read
      import datasets.config
      mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
      mp.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    yield env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  w = str(tmp_path_factory.mktemp("lmeval") / "elas")
  cfg = tiny_train_config("elas", **{"train.steps": STEPS, "train.eval_every": STEPS,
                                     "train.ckpt_every": STEPS})
  trainer.train_and_evaluate(cfg, w)
  return w


class Reference:
  """Log-likelihoods and greedy tokens from unpadded full forward passes."""

  def __init__(self, workdir: str):
    from flax import nnx

    run, state = trainer.restore_run(workdir)
    self.cfg, self.tok, self.step = run.cfg, run.tokenizer, int(state.step)
    # One sequence, its own length (one compile per length; no padding, no batch).
    self._logits = jax.jit(lambda p, x, sparse: nnx.merge(run.graphdef, p)(x, sparse)[0],
                           static_argnums=2)
    self._params = state.params
    self.max_len = self.cfg.train.seq_len
    self.sparse = bool(sparsity.sparse_phase(self.cfg.model, self.step))
    bos = self.cfg.data.add_bos and self.tok.bos_id >= 0
    self.prefix = self.tok.bos_id if bos else self.tok.eos_id
    self.enc = lambda s: ([self.tok.bos_id] if bos else []) + self.tok.encode(s)

  def token_scores(self, seq: list[int], sparse: bool) -> tuple[np.ndarray, np.ndarray]:
    """``log p(seq[i+1] | seq[:i+1])`` and whether ``seq[i+1]`` is the argmax, ``i < len-1``."""
    logits = np.asarray(self.logits(seq[:-1], sparse), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    tgt = np.asarray(seq[1:])
    return logp[np.arange(len(tgt)), tgt], logits.argmax(-1) == tgt

  def logits(self, seq: list[int], sparse: bool) -> np.ndarray:
    """``[len(seq), V]`` logits of the unpadded sequence."""
    return np.asarray(self._logits(self._params, jnp.asarray(seq, jnp.int32)[None], bool(sparse))[0])

  def split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's token split of a request (``TemplateLM.loglikelihood``'s contract)."""
    if context == "":
      ids = self.tok.encode(continuation)
      return ([self.prefix], ids) if ids[0] != self.prefix else (ids[:1], ids[1:])
    n = len(context) - len(context.rstrip())
    if n:
      context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = self.enc(context + continuation), self.enc(context)
    return ctx, whole[len(ctx):]

  def loglikelihood(self, ctx: list[int], cont: list[int], sparse: bool | None = None):
    seq = (ctx + cont)[-(self.max_len + 1):]
    logp, greedy = self.token_scores(seq, self.sparse if sparse is None else sparse)
    return float(logp[-len(cont):].sum()), bool(greedy[-len(cont):].all())

  def rolling(self, text: str, stride: int | None = None) -> float:
    """Every token once: the first ``max_len`` after the prefix, then blocks of
    ``stride`` tokens, each conditioned on the ``max_len`` tokens before its last one."""
    seq = [self.prefix] + self.tok.encode(text)
    n, length = len(seq) - 1, self.max_len
    stride = stride or length
    total, done = 0.0, 0
    while done < n:
      end = min(length if done == 0 else done + stride, n)  # predict tokens done..end-1
      lo = max(end - length, 0)  # inputs seq[lo:end], targets seq[lo+1:end+1]
      logp, _ = self.token_scores(seq[lo:end + 1], self.sparse)
      total += float(logp[done - lo:].sum())
      done = end
    return total

  def greedy_text(self, prompt: str, max_new: int) -> str:
    """The greedy continuation's text: argmax of the full forward, token by token."""
    ids = self.enc(prompt)
    seq = list(ids)
    for _ in range(max_new):
      seq.append(int(np.argmax(self.logits(seq, self.sparse)[-1])))
      if seq[-1] == self.tok.eos_id:
        seq.pop()
        break
    return self.tok.decode(seq)[len(self.tok.decode(ids)):]


@pytest.fixture(scope="module")
def ref(workdir):
  return Reference(workdir)


@pytest.fixture(scope="module")
def lm(workdir):
  return downstream.ElasJaxLM(workdir=workdir, batch_size=3)  # several batches, padded rows


def write_task(root, name: str, docs: list[dict], body: str) -> None:
  data = os.path.join(str(root), f"{name}.jsonl")
  with open(data, "w") as f:
    f.write("".join(json.dumps(d) + "\n" for d in docs))
  with open(os.path.join(str(root), f"{name}.yaml"), "w") as f:
    f.write(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}")


def evaluate(lm, root, tasks: list[str]) -> dict:
  from lm_eval.tasks import TaskManager

  return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(root)),
                                 log_samples=True, verbosity="WARNING")


MC_BODY = """output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""
NEXT_BODY = """output_type: loglikelihood
doc_to_text: "{{context}}"
doc_to_target: "{{target}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: perplexity
"""
ROLL_BODY = """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""
GEN_BODY = """output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{target}}"
generation_kwargs:
  until: UNTIL
  max_gen_toks: MAX_GEN
metric_list:
  - metric: exact_match
"""


def gen_body(until: list[str], max_gen: int) -> str:
  return GEN_BODY.replace("UNTIL", json.dumps(until)).replace("MAX_GEN", str(max_gen))


CONTEXTS = ["The history of the city", "In 1990 the government of", "A", "The river flows through",
            "He was born in the north of the country and"]
CHOICES = [["began in the year", "is a small cat", "ran away"], ["the state", "of of", "banana"],
           ["small town", "list", "the first"], ["the valley", "and", "music"],
           ["studied at the university", "red", "the"]]
LONG = " ".join(["The river flows through the valley and the city of the north."] * 6)


def test_multiple_choice_and_loglikelihood_match_the_reference(lm, ref, tmp_path):
  assert lm.sparse_on and ref.sparse  # the checkpoint is past its dense warm-up: 2:4 FFN
  # Labels: the reference's best choice for even docs, another one for odd docs,
  # so acc is 3/5 exactly (a wrong score or ordering moves it).
  docs = []
  for i, (c, ch) in enumerate(zip(CONTEXTS, CHOICES)):
    lls = [ref.loglikelihood(*ref.split(c, " " + x))[0] for x in ch]
    best = int(np.argmax(lls))
    docs.append({"context": c, "choices": ch, "label": best if i % 2 == 0 else (best + 1) % len(ch)})
  write_task(tmp_path, "elas_mc", docs, MC_BODY)
  # Next-word requests: some targets are the reference's greedy next token (is_greedy
  # True), one context is empty (BOS/EOS prefix), one is longer than the window.
  nxt = []
  for c in CONTEXTS[:3] + [LONG]:
    ids = ref.enc(c)
    greedy_tok = int(np.argmax(ref.logits(ids[-ref.max_len:], ref.sparse)[-1]))
    greedy_text = ref.tok.decode(ids + [greedy_tok])[len(ref.tok.decode(ids)):]
    nxt.append({"context": c, "target": greedy_text})
    nxt.append({"context": c, "target": " the north"})
  nxt.append({"context": "", "target": "The city"})
  write_task(tmp_path, "elas_next", nxt, NEXT_BODY)

  out = evaluate(lm, tmp_path, ["elas_mc", "elas_next"])
  n_greedy = 0
  for task in ("elas_mc", "elas_next"):
    for s in out["samples"][task]:
      for args, resp in zip(s["arguments"], s["resps"]):
        want = ref.loglikelihood(*ref.split(*args))
        got = resp[0]
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-4, err_msg=str(args))
        assert got[1] == want[1], args
        n_greedy += want[1]
  assert n_greedy >= 3  # the greedy targets were recognised as such

  lls = {i: [ref.loglikelihood(*ref.split(d["context"], " " + x))[0] for x in d["choices"]]
         for i, d in enumerate(docs)}
  acc = np.mean([np.argmax(lls[i]) == d["label"] for i, d in enumerate(docs)])
  acc_norm = np.mean([np.argmax(np.array(lls[i]) / [len(" " + x) for x in d["choices"]]) == d["label"]
                      for i, d in enumerate(docs)])
  res = out["results"]["elas_mc"]
  assert acc == pytest.approx(0.6) and res["acc,none"] == pytest.approx(acc)
  assert res["acc_norm,none"] == pytest.approx(acc_norm)
  greedy = [ref.loglikelihood(*ref.split(d["context"], d["target"]))[1] for d in nxt]
  assert out["results"]["elas_next"]["acc,none"] == pytest.approx(np.mean(greedy))


ROLL_TEXTS = [LONG, "Short text.", "The history of the city is long, and it has many parts: " * 4]


def test_rolling_loglikelihood_is_the_sum_over_tokens(lm, ref, tmp_path):
  n_tokens = [len(ref.tok.encode(t)) for t in ROLL_TEXTS]
  assert max(n_tokens) > 2 * ref.max_len  # at least three windows
  write_task(tmp_path, "elas_roll", [{"text": t} for t in ROLL_TEXTS], ROLL_BODY)
  out = evaluate(lm, tmp_path, ["elas_roll"])
  want = {t: ref.rolling(t) for t in ROLL_TEXTS}
  for s in out["samples"]["elas_roll"]:
    np.testing.assert_allclose(s["resps"][0][0], want[s["doc"]["text"]], rtol=1e-5)
  words = sum(len(re.split(r"\s+", t)) for t in ROLL_TEXTS)
  total = sum(want.values())
  res = out["results"]["elas_roll"]
  np.testing.assert_allclose(res["word_perplexity,none"], math.exp(-total / words), rtol=1e-5)
  n_bytes = sum(len(t.encode("utf-8")) for t in ROLL_TEXTS)
  np.testing.assert_allclose(res["bits_per_byte,none"], -total / n_bytes / math.log(2), rtol=1e-5)


def test_rolling_windows_with_a_stride_score_each_token_once(lm, ref, monkeypatch):
  from lm_eval.api.instance import Instance

  ids = ref.tok.encode(ROLL_TEXTS[2])
  monkeypatch.setattr(lm, "rolling_stride", 8)
  windows = lm.rolling_windows(ids)
  assert [t for _, cont in windows for t in cont] == ids
  assert all(len(c) + len(x) <= ref.max_len + 1 for c, x in windows)
  reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(ROLL_TEXTS)]
  got = lm.loglikelihood_rolling(reqs, disable_tqdm=True)
  np.testing.assert_allclose(got, [ref.rolling(t, stride=8) for t in ROLL_TEXTS], rtol=1e-5)
  # Overlapping windows give more context than disjoint ones: a different sum.
  assert abs(got[0] - ref.rolling(ROLL_TEXTS[0])) > 1e-3


PROMPTS = ["The history of", "In 1990 the", "A", "The river flows through the"]


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(lm, ref, tmp_path):
  max_gen = 6
  full = [ref.greedy_text(p, max_gen) for p in PROMPTS]  # uncut
  # A stop string taken from the middle of the first uncut continuation.
  stop = next(full[0][i:i + 2] for i in range(1, len(full[0]) - 1) if full[0][i:i + 2].strip())
  until = [stop, "\n\n"]
  want = [f for f in full]
  for s in until:
    want = [w.split(s)[0] for w in want]
  assert want[0] != full[0]  # the stop string cut at least one continuation
  write_task(tmp_path, "elas_gen", [{"prompt": p, "target": w} for p, w in zip(PROMPTS, want)],
             gen_body(until, max_gen))
  out = evaluate(lm, tmp_path, ["elas_gen"])
  got = {s["doc"]["prompt"]: s["resps"][0][0] for s in out["samples"]["elas_gen"]}
  assert [got[p] for p in PROMPTS] == want
  assert out["results"]["elas_gen"]["exact_match,none"] == 1.0


def test_buckets_bound_the_compiles(workdir, ref, monkeypatch):
  traced = []
  real = downstream.token_logprobs
  monkeypatch.setattr(downstream, "token_logprobs",
                      lambda m, t, *a: traced.append(t.shape) or real(m, t, *a))
  lm = downstream.ElasJaxLM(workdir=workdir, batch_size=4)
  rng = np.random.RandomState(0)
  vocab = ref.cfg.model.vocab_size

  def pairs(n):
    return [(rng.randint(4, vocab, rng.randint(1, 46)).tolist(), rng.randint(4, vocab, rng.randint(1, 6)).tolist())
            for _ in range(n)]

  first = pairs(30)
  got = lm.score_tokens(first, disable_tqdm=True)
  for (c, x), (ll, greedy) in zip(first, got):  # incl. contexts cut from the left (> 33 tokens)
    want = ref.loglikelihood(c, x)
    np.testing.assert_allclose(ll, want[0], rtol=1e-5, atol=1e-4)
    assert greedy == want[1]
  buckets = {(4, w) for w in (1, 2, 4, 8, 16, 32)}  # batch 4, powers of two up to seq_len
  assert len(traced) == len(set(traced)) and set(traced) <= buckets, traced
  lm.score_tokens(pairs(40), disable_tqdm=True)  # new lengths: only unseen buckets compile
  assert len(traced) == len(set(traced)) and set(traced) <= buckets, traced


def test_dense_turns_the_24_ffn_off(workdir, ref, lm):
  dense = downstream.ElasJaxLM(workdir=workdir, batch_size=4, dense=True)
  assert not dense.sparse_on
  pairs = [ref.split(c, " " + ch[0]) for c, ch in zip(CONTEXTS, CHOICES)]
  got_dense = dense.score_tokens(pairs, disable_tqdm=True)
  got_sparse = lm.score_tokens(pairs, disable_tqdm=True)
  for (c, x), d, s in zip(pairs, got_dense, got_sparse):
    np.testing.assert_allclose(d[0], ref.loglikelihood(c, x, sparse=False)[0], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(s[0], ref.loglikelihood(c, x, sparse=True)[0], rtol=1e-5, atol=1e-4)
  assert max(abs(d[0] - s[0]) for d, s in zip(got_dense, got_sparse)) > 1e-4


@pytest.mark.parametrize("kernel", ["triton", "mosaic", "pallas"])
def test_model_args_kernel_takes_every_implementation_of_the_table(kernel, workdir, ref):
  # kernel=... is checked against the dispatch's table (elas_jax.ops.ffn.KERNELS), not a list
  # of its own; the model then runs that implementation (interpreted here), scoring like
  # the reference.
  from elas_kernels.ffn.mosaic import compat

  lm = downstream.ElasJaxLM(workdir=workdir, batch_size=2, kernel=kernel)
  assert lm.run.cfg.model.kernel == kernel
  if kernel == "mosaic" and compat.unavailable_reason():
    pytest.skip(compat.unavailable_reason())
  pairs = [ref.split(CONTEXTS[0], " " + CHOICES[0][0])]
  (ll, greedy), = lm.score_tokens(pairs, disable_tqdm=True)
  want = ref.loglikelihood(*pairs[0])
  np.testing.assert_allclose(ll, want[0], rtol=1e-5, atol=1e-4)
  assert greedy == want[1]


@pytest.mark.parametrize("args,message", [
    ({"batchsize": 4}, "unknown key(s) batchsize"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"mesh": "1,1"}, "three integers"),
    ({"dense": "maybe"}, "dense='maybe'"),
    ({"kernel": "cuda"}, "kernel='cuda'"),
])
def test_bad_model_args_fail_in_one_line_before_restoring(args, message, tmp_path):
  with pytest.raises(UserError, match=re.escape(message)):
    downstream.ElasJaxLM(workdir=str(tmp_path / "nothing"), **args)


def test_a_workdir_without_checkpoints_is_one_error(tmp_path):
  with pytest.raises(UserError, match="no checkpoints"):
    downstream.ElasJaxLM(workdir=str(tmp_path))


def test_registered_under_elas_jax_next_to_the_builtin_models():
  from lm_eval.api.registry import get_model

  downstream.register()
  downstream.register()  # idempotent
  assert get_model("elas_jax") is downstream.ElasJaxLM
  assert "hf" in lm_eval.api.registry.model_registry  # lm-eval's own table is still there


def test_hf_model_on_the_export_gives_the_same_loglikelihoods(workdir, ref, tmp_path):
  """lm-eval's ``hf`` model (torch + transformers) on the exported checkpoint; the
  export is the dense ReLU² model, so it is compared with ``dense=True``."""
  for module in ("torch", "transformers", "accelerate"):  # lm-eval's [hf] extra
    pytest.importorskip(module)
  from lm_eval.api.instance import Instance
  from lm_eval.models.huggingface import HFLM

  from elas_jax import hf

  out = str(tmp_path / "hf")
  hf.export_checkpoint(workdir, out, dtype="float32")
  hf = HFLM(pretrained=out, device="cpu", dtype="float32", batch_size=4, max_length=ref.max_len,
            prefix_token_id=ref.prefix)
  ours = downstream.ElasJaxLM(workdir=workdir, batch_size=4, dense=True)
  reqs = [Instance("loglikelihood", {}, (c, " " + x), i)
          for i, (c, ch) in enumerate(zip(CONTEXTS + [LONG, ""], CHOICES + [["the north"], ["The city"]]))
          for x in ch]
  want, got = hf.loglikelihood(reqs), ours.loglikelihood(reqs)
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=1e-4)
  assert [g[1] for g in got] == [w[1] for w in want]
  rolls = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(ROLL_TEXTS)]
  np.testing.assert_allclose(ours.loglikelihood_rolling(rolls), hf.loglikelihood_rolling(rolls),
                             rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------- the command line


def _cli(*args, devices: int = 1, env_extra=None, module="elas_jax.lm_eval", timeout=600):
  env = dict(os.environ, PYTHONPATH=ROOT, **(env_extra or {}))
  if devices > 1:
    env["XLA_FLAGS"] = xla_flags(devices)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.mark.slow
def test_cli_prints_the_table_on_one_and_two_devices_and_matches_elas_generate(
    workdir, ref, tmp_path, offline_hf):
  tasks = tmp_path / "tasks"
  tasks.mkdir()
  write_task(tasks, "elas_mc", [{"context": c, "choices": ch, "label": 0}
                                for c, ch in zip(CONTEXTS, CHOICES)], MC_BODY)
  write_task(tasks, "elas_roll", [{"text": t} for t in ROLL_TEXTS], ROLL_BODY)
  write_task(tasks, "elas_gen", [{"prompt": p, "target": ""} for p in PROMPTS],
             gen_body(["."], 5))
  results = []
  for devices, mesh in ((1, ""), (2, ",mesh=2,1,1")):
    out = tmp_path / f"out{devices}"
    p = _cli("--model", "elas_jax", "--model_args", f"workdir={workdir},batch_size=4{mesh}",
             "--tasks", "elas_mc,elas_roll,elas_gen", "--include_path", str(tasks),
             "--output_path", str(out), "--log_samples", devices=devices, env_extra=offline_hf)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"\|\s*elas_mc\s*\|.*\|\s*acc\s*\|", p.stdout), p.stdout
    assert "word_perplexity" in p.stdout and "exact_match" in p.stdout
    (res_file,) = [f for f in out.rglob("results_*.json")]
    results.append(json.loads(res_file.read_text())["results"])
    gen_samples = [json.loads(line) for f in out.rglob("samples_elas_gen_*.jsonl")
                   for line in f.read_text().splitlines()]
  for task in ("elas_mc", "elas_roll"):
    for k, v in results[0][task].items():
      if isinstance(v, float) and "stderr" not in k:
        assert results[1][task][k] == pytest.approx(v, rel=1e-5), (task, k)
  # generate_until = elas_jax.generate's greedy completions, cut at the stop string.
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("\n".join(PROMPTS) + "\n")
  p = _cli("--workdir", workdir, "--prompts_file", str(prompts), "--temperature", "0",
           "--max_new_tokens", "5", "--batch_size", "2", "--out", str(tmp_path / "gen.jsonl"),
           module="elas_jax.generate")
  assert p.returncode == 0, p.stderr[-3000:]
  completions = {json.loads(line)["prompt"]: json.loads(line)["completion"]
                 for line in (tmp_path / "gen.jsonl").read_text().splitlines()}
  got = {s["doc"]["prompt"]: s["resps"][0][0] for s in gen_samples}
  assert got == {k: v.split(".")[0] for k, v in completions.items()}


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path, offline_hf):
  p = _cli("--model_args", f"workdir={tmp_path}", "--tasks", "lambada_openai", env_extra=offline_hf)
  assert p.returncode == 2, p.stderr[-2000:]
  lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "no checkpoints" in lines[0] and "Traceback" not in p.stderr, p.stderr[-2000:]


@pytest.mark.slow
def test_a_scanned_checkpoint_scores_like_its_model(tmp_path, ref):
  from flax import nnx

  cfg = tiny_train_config("elas", **{"model.scan_layers": True, "train.steps": 5, "train.eval_every": 5,
                                     "train.ckpt_every": 5})
  w = str(tmp_path / "scanned")
  trainer.train_and_evaluate(cfg, w)
  lm = downstream.ElasJaxLM(workdir=w, batch_size=2)
  run, state = trainer.restore_run(w)
  scanned = nnx.merge(run.graphdef, state.params)  # the scanned model itself
  pairs = [ref.split(c, " " + ch[0]) for c, ch in zip(CONTEXTS, CHOICES)]
  for (c, x), (ll, _) in zip(pairs, lm.score_tokens(pairs, disable_tqdm=True)):
    seq = c + x
    logits, _ = scanned(jnp.asarray(seq[:-1])[None], True)
    logp = jax.nn.log_softmax(logits[0])
    want = float(sum(logp[i - 1, seq[i]] for i in range(len(c), len(seq))))
    np.testing.assert_allclose(ll, want, rtol=1e-5, atol=1e-4)
  from lm_eval.api.instance import Instance

  (text,) = lm.generate_until([Instance("generate_until", {}, ("The history of", {"max_gen_toks": 3}), 0)])
  seq = ref.enc("The history of")  # greedy tokens of the scanned model's full forward
  for _ in range(3):
    logits, _ = scanned(jnp.asarray(seq)[None], True)
    seq.append(int(jnp.argmax(logits[0, -1])))
  assert text == ref.tok.decode(seq)[len(ref.tok.decode(seq[:-3])):]


@pytest.mark.slow
def test_downstream_benchmark_smoke(tmp_path, offline_hf):
  p = subprocess.run([sys.executable, "-m", "benchmarks.downstream", "--preset", "smoke", "--variants",
                      "elas", "--seeds", "0", "--n_items", "8", "--n_docs", "3", "--batch_size", "8",
                      "--out", str(tmp_path)],
                     cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, **offline_hf), capture_output=True,
                     text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  res = json.loads((tmp_path / "results.json").read_text())
  assert set(res["runs"]) == {"elas", "elas (dense)"} and res["items"]["elas_cloze"] == 8
  sparse, dense = res["runs"]["elas"]["0"], res["runs"]["elas (dense)"]["0"]
  assert sparse["sparse_on"] and not dense["sparse_on"]
  for r in (sparse, dense):
    assert all(0 <= r["metrics"][k] <= 1 for k in r["metrics"] if "acc" in k)
    assert r["metrics"]["elas_wiki/bits_per_byte,none"] > 0
  table = (tmp_path / "results.md").read_text()
  assert "| elas |" in table and "| elas (dense) |" in table and "| chance |" in table
  docs = [json.loads(line) for line in (tmp_path / "tasks" / "elas_cloze.jsonl").read_text().splitlines()]
  assert all(len(d["choices"]) == 4 and len({c.lower() for c in d["choices"]}) == 4 for d in docs)
