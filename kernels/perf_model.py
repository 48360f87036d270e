"""A static performance model of a Hopper kernel from the PTX its compiler emitted.

No GPU is needed and nothing here is a measurement. From one kernel's PTX
(:func:`profile_ptx`) the model reads, per warpgroup role:

* the executed ``wgmma`` instructions, each costed at its tensor-core cycles at
  peak (``2·m·n·k`` FLOPs at 4096 dense bf16/f16 FLOP per cycle per SM, the
  H100/H200 rate; tf32 half that, fp8 twice);
* the executed SIMT instructions per warp (every PTX statement but ``wgmma``,
  directives and labels; the special-function unit's ``ex2``/``rcp``/... apart);
* ``wgmma.wait_group 0`` events (the warpgroup waits out the tensor-core
  pipeline) and whether its loop keeps a wgmma in flight while it works
  (``wait_group`` >= 1);
* TMA bytes loaded (``mbarrier.arrive.expect_tx`` byte counts).

Loops are the control-flow graph's natural loops; a loop's trip count comes from
the compare of the branch that leaves it (``setp.ne %r, 64``, with the counter's
start and stride, up or down); a loop bounded at run time (a
persistent kernel's work loop, or one LLVM rewrote to run on flags) takes
``runtime_trips`` from the caller; callers check the FLOPs read against the
work they know. Roles
come from ``setmaxnreg``: code dominated by ``setmaxnreg.inc`` is a consumer's,
by ``setmaxnreg.dec`` the producer's, the rest every warpgroup's; a kernel
without it is one role run by all its warpgroups. Within the consumers' code a
branch on the warpgroup index (``%tid.x >> 7``, as Mosaic's ``lax.axis_index``
computes it, compared with a constant ``k``) guards the blocks it dominates:
only consumer ``k`` runs them (a kernel whose consumers do different work,
e.g. one weight gradient each).

:func:`estimate` turns a profile into time on one GPU (:class:`Params`, fitted by
``benchmarks/calibrate_model.py`` against published measurements). Per SM and
per wave of ``k`` co-resident programs the time is the largest of

* the tensor cores: ``k ·`` (consumers' wgmma cycles) ``/ tc_efficiency``;
* one consumer's own chain: wgmma, its waits (``wait_latency`` cycles each) and
  its SIMT (``cpi`` cycles per instruction, ``mufu_cycles`` per special
  function) one after another when each step waits for all its wgmma, or the
  larger of the two when a wgmma stays in flight (``Params.ordered_chain=False``), or
  its code played in program order (:func:`chain_cycles`, the default);
* the issue slots: ``k ·`` (all warpgroups' instructions per warp; each
  warpgroup puts one warp on each of an SM's four schedulers);
* the L2: ``k ·`` TMA bytes at ``l2_bytes_per_s / SMs``;

then waves (or a persistent loop) multiply it, HBM bounds the whole kernel
(``hbm_bytes / hbm_bytes_per_s``) and ``overhead_s`` is added once. What it
leaves out is listed in docs/kernels.md ("A static model of the kernels").
"""

from __future__ import annotations

import dataclasses
import math
import re

from elas_kernels.gpu import H200, GpuSpec

# Dense tensor-core FLOPs per cycle per SM by input type (H100/H200: 989 TFLOP/s bf16
# over 132 SMs at 1.83 GHz); tf32 runs at half the bf16 rate, fp8 at twice.
_TC_FLOPS_PER_CYCLE = {"f16": 4096, "bf16": 4096, "tf32": 2048, "e4m3": 8192, "e5m2": 8192}
_MUFU = ("ex2.", "lg2.", "rcp.approx", "rsqrt.", "sqrt.approx", "sin.", "cos.", "tanh.")
_WGMMA = re.compile(r"wgmma\.mma_async(?:\.sp)?\.sync\.aligned\.m(\d+)n(\d+)k(\d+)\.\w+\.(\w+)\.")


def _wgmma_work(m: re.Match) -> tuple[float, str]:
  """(tensor-core FLOPs executed, operand dtype) of a matched wgmma: ``2·M·N·K``, half of
  it for the 2:4 sparse ``wgmma.mma_async.sp`` (its ``K`` counts the zeros it skips: the
  sparse tensor cores run an ``m64nNk32`` in the time of a dense ``m64nNk16``)."""
  mm, nn, kk = int(m.group(1)), int(m.group(2)), int(m.group(3))
  flops = 2.0 * mm * nn * kk
  return (flops / 2 if ".sp." in m.group(0) else flops), m.group(4)
_LABEL = re.compile(r"^(\$L__\w+):")
_BRANCH = re.compile(r"^(@(!?)(%p\d+)\s+)?bra(?:\.uni)?\s+(\$L__\w+);")
_SETP = re.compile(r"^setp\.(\w+)\.\w+ (%p\d+), (%\w+), (-?\d+);")
_MOV_IMM = re.compile(r"^mov\.[bu]32\s+(%r\d+),\s*(\d+);")
_WG_GUARD = re.compile(r"^setp\.(ne|eq)\.[bsu]32\s+(%p\d+),\s*(%r\d+),\s*(\d+);")
_EXPECT_TX = re.compile(r"^mbarrier\.arrive\.expect_tx\.\S+\s+\S+,\s*\[[^\]]*\],\s*(%r\d+|\d+);")


@dataclasses.dataclass(frozen=True)
class Role:
  """What one warpgroup of a role executes in one program (per warp where it says so)."""

  wgmma_cycles: float = 0.0  # tensor-core cycles at peak
  wgmma_flops: float = 0.0
  simt: float = 0.0  # instructions per warp, special functions excluded
  mufu: float = 0.0  # special-function instructions per warp
  waits: float = 0.0  # wgmma.wait_group 0 executed
  overlapped: bool = False  # a loop keeps a wgmma in flight (wait_group >= 1)
  tma_bytes: float = 0.0  # bytes TMA loads into shared memory
  # The role's code in program order (:func:`_program`): SIMT runs, wgmma issues, commits,
  # waits, loops with their trips; :func:`chain_cycles` plays it (``Params.ordered_chain``).
  # In the closed form (and for a Role made by hand, which has none) the chain is costed
  # from the totals above (``overlapped``: the larger of the wgmma and the SIMT, else their
  # sum).
  program: tuple = dataclasses.field(default=(), compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class Profile:
  """One kernel's PTX, summarised: ``consumers`` warpgroups run ``consumer``, one runs
  ``producer`` when the kernel is warp-specialized (``producers`` 1), else 0."""

  threads: int
  consumers: int
  producers: int
  consumer: Role
  producer: Role
  loops: tuple[tuple[int, int | None], ...]  # (body statements, trips) per loop
  wgmma_shapes: tuple[str, ...]
  # Where consumers run different code (branches on the warpgroup index): each one's own
  # Role, and ``consumer`` their mean (what the tensor, issue and L2 terms add up)
  consumer_roles: tuple[Role, ...] = ()

  @property
  def warpgroups(self) -> int:
    return self.consumers + self.producers

  @property
  def wgmma_flops(self) -> float:
    """Tensor-core FLOPs of one program."""
    return self.consumers * self.consumer.wgmma_flops + self.producers * self.producer.wgmma_flops


def _statements(ptx: str) -> list[str]:
  """The entry function's statements, one per item (an instruction may span lines):
  labels as ``$L__x:``, inline assembly split at ``;``, directives, comments,
  declarations and inline assembly's local labels dropped."""
  body = ptx[ptx.index(".entry"):] if ".entry" in ptx else ptx
  body = body[body.index("{") + 1:] if "{" in body else body
  lines = []
  for line in body.splitlines():
    line = line.split("//", 1)[0].strip()
    if line.startswith("{"):  # an inline-assembly block opens (maybe on the same line)
      line = line[1:].strip()
    if line.endswith("}") and "{" not in line:
      line = line[:-1].strip()
    if line and not (line.startswith(".") and ";" not in line):  # .loc etc. end without ';'
      lines.append(line)
  out = []
  for chunk in " ".join(lines).split(";"):
    chunk = " ".join(chunk.split()).lstrip("{} ")  # what is left of an inline-asm block's braces
    while True:  # labels in front of an instruction
      m = re.match(r"^([$A-Za-z_][\w$]*):(?!:)\s*(.*)$", chunk)
      if not m:
        break
      if m.group(1).startswith("$L__"):
        out.append(m.group(1) + ":")
      chunk = m.group(2)
    if chunk and not chunk.startswith("."):
      out.append(chunk + ";")
  return out


def _blocks(sts: list[str]) -> tuple[list[tuple[int, int]], dict[int, list[int]], dict[str, int]]:
  """Basic blocks as statement ranges ``[start, end)``, their successors, and each label's block."""
  labels = {m.group(1): i for i, s in enumerate(sts) if (m := _LABEL.match(s))}
  starts = {0} | set(labels.values())
  for i, s in enumerate(sts):
    if _BRANCH.match(s) or s.startswith("ret"):
      starts.add(i + 1)
  starts = sorted(x for x in starts if x < len(sts))
  blocks = [(a, b) for a, b in zip(starts, starts[1:] + [len(sts)])]
  index = {a: k for k, (a, _) in enumerate(blocks)}
  succ: dict[int, list[int]] = {}
  for k, (a, b) in enumerate(blocks):
    last, nxt = sts[b - 1], []
    m = _BRANCH.match(last)
    if m:
      nxt.append(index[labels[m.group(4)]])
    if not last.startswith("ret") and not (m and not m.group(1)) and k + 1 < len(blocks):
      nxt.append(k + 1)  # falls through (a conditional branch or no branch)
    succ[k] = nxt
  return blocks, succ, {name: index[i] for name, i in labels.items()}


def _preds(n: int, succ: dict[int, list[int]]) -> dict[int, list[int]]:
  preds: dict[int, list[int]] = {k: [] for k in range(n)}
  for k, vs in succ.items():
    for v in vs:
      preds[v].append(k)
  return preds


def _dominators(n: int, preds: dict[int, list[int]]) -> list[set[int]]:
  dom = [set(range(n)) for _ in range(n)]
  dom[0] = {0}
  changed = True
  while changed:
    changed = False
    for k in range(1, n):
      ps = [dom[p] for p in preds[k]]
      new = ({k} | set.intersection(*ps)) if ps else {k}
      if new != dom[k]:
        dom[k], changed = new, True
  return dom


def _natural_loops(sts: list[str], blocks, succ, preds, dom, block_of) -> list[tuple[set[int], int | None]]:
  """``(blocks, trips)`` per loop header: a back edge is an edge to a block that
  dominates its source; the loop is every block that reaches the source without
  passing the header. Trips: from the branch that leaves the loop (at its latch or
  in its body), the immediate its compare tests and the counter's start and stride
  (``(imm - start) / stride``, counting up or down), ``None`` when the bound is a
  register (known at run time only). ``block_of``: label -> its block."""
  loops: dict[int, tuple[set[int], int | None]] = {}
  for u, vs in succ.items():
    for h in vs:
      if h not in dom[u]:
        continue
      body, stack = {h, u}, ([u] if u != h else [])
      while stack:
        x = stack.pop()
        for p in preds[x]:
          if p not in body:
            body.add(p)
            stack.append(p)
      trips = None
      for k in sorted(body):  # the first exit whose compare and counter can be read
        trips = _exit_trips(sts, blocks, block_of, body, h, k)
        if trips is not None:
          break
      old = loops.get(h)
      loops[h] = (body | old[0], old[1] if old and old[1] is not None else trips) if old else (body, trips)
  return [loops[h] for h in sorted(loops)]


def _exit_trips(sts: list[str], blocks, block_of: dict[str, int], body: set[int], head: int,
                k: int) -> int | None:
  """Trips of a loop from the conditional branch ending block ``k``, if it leaves the loop:
  its compare ``counter <cmp> imm`` and the counter's start and stride."""
  a, b = blocks[k]
  m = _BRANCH.match(sts[b - 1])
  if not m or not m.group(1):
    return None
  stays = block_of[m.group(4)] in body
  falls = k + 1 in body
  if stays == falls:
    return None  # both ways stay in (or leave) the loop: not its exit
  # the loop goes on while the predicate (negated by '@!') is true, when the branch stays
  exit_when_true = not stays
  if m.group(2):
    exit_when_true = not exit_when_true
  flag = _flag_trips(sts, blocks, body, head, m.group(3), exit_when_true)
  if flag is not None:
    return flag
  for i in range(b - 2, a - 1, -1):
    c = _SETP.match(sts[i])
    if c and c.group(2) == m.group(3):
      cmp, bound = c.group(1), int(c.group(4))
      start, step = _induction(sts, blocks, body, head, c.group(3))
      # continue while counter != bound (or < bound): trips = (bound - start) / step
      if (cmp == "eq" and exit_when_true) or (cmp == "ne" and not exit_when_true):
        pass
      elif cmp in ("lt", "le") and not exit_when_true:
        bound += cmp == "le"
      elif cmp in ("ge", "gt") and exit_when_true:
        bound += cmp == "gt"
      else:
        return None
      n = (bound - start) / step if step else -1
      return max(0, math.ceil(n)) if n >= 0 else None
  return None


def _flag_trips(sts: list[str], blocks, body: set[int], head: int, pred: str,
                exit_when_true: bool) -> int | None:
  """2 for the loop LLVM makes of a 2-trip loop: the branch tests ``pred = q`` copied at
  the top, ``q`` true before the loop and false after the first trip."""
  loop = [x for k in sorted(body) for x in sts[blocks[k][0]:blocks[k][1]]]
  copy = next((m.group(1) for x in loop
               if (m := re.match(rf"^mov\.pred {re.escape(pred)}, (%p\d+);", x))), None)
  if copy is None or exit_when_true or f"mov.pred {copy}, 0;" not in loop:
    return None
  before = [x for x in sts[:blocks[head][0]] if x.startswith(f"mov.pred {copy}, ")]
  return 2 if before and before[-1] in (f"mov.pred {copy}, -1;", f"mov.pred {copy}, 1;") else None


def _induction(sts: list[str], blocks, body: set[int], head: int, reg: str) -> tuple[int, int]:
  """(start, step) of the counter ``reg`` a loop's exit compare tests: ``reg = x + step``
  in the loop (through a ``cvt`` of a 64-bit counter), ``x`` set to an immediate before
  the header (else 0 and 1)."""
  loop = [s for k in body for s in sts[blocks[k][0]:blocks[k][1]]]
  for s in loop:
    m = re.match(rf"^cvt\.u32\.u64 {re.escape(reg)}, (%rd\d+);", s)
    if m:
      reg = m.group(1)
  step, phi = 1, None
  for s in loop:
    m = re.match(rf"^add\.[su](?:32|64) {re.escape(reg)}, (%\w+), (-?\d+);", s)
    if m:
      phi, step = m.group(1), int(m.group(2))
  start = 0
  if phi:
    for s in sts[:blocks[head][0]]:
      m = re.match(rf"^mov\.[bu](?:32|64) {re.escape(phi)}, (-?\d+);", s)
      if m:
        start = int(m.group(1))
  return start, step


def _program(sts: list[str], blocks, loops, keep) -> tuple:
  """The statements ``keep(i)`` selects, in program order, as events: ``("simt", n,
  mufu)`` (a run of instructions), ``("mma", cycles at peak)``, ``("commit",)``,
  ``("wait", n)`` and ``("loop", trips, body)`` for each natural loop (taken as the
  statements from its first block's start to its last block's end: Mosaic's loops are
  laid out contiguously). ``loops``: ``(blocks, trips)``, trips already resolved."""
  spans = sorted({(min(blocks[k][0] for k in body), max(blocks[k][1] for k in body), trips)
                  for body, trips in loops}, key=lambda x: (x[0], -x[1]))

  def build(a: int, b: int, outer=None) -> list:
    items: list = []

    def simt(n: float, mufu: float) -> None:
      if items and items[-1][0] == "simt":
        items[-1] = ("simt", items[-1][1] + n, items[-1][2] + mufu)
      else:
        items.append(("simt", n, mufu))

    i = a
    while i < b:
      inner = [x for x in spans if x[0] == i and x[1] <= b and x[:2] != outer]
      if inner:
        la, lb, trips = inner[0]  # the outermost loop starting here
        items.append(("loop", trips, tuple(build(la, lb, (la, lb)))))
        i = lb
        continue
      st = sts[i]
      i += 1
      if not keep(i - 1) or _LABEL.match(st) or st.startswith("setp.ne.b32 p,"):
        continue
      m = _WGMMA.search(st)
      if m:
        flops, dtype = _wgmma_work(m)
        items.append(("mma", flops / _TC_FLOPS_PER_CYCLE.get(dtype, 4096)))
      elif st.startswith("wgmma.commit_group"):
        items.append(("commit",))
        simt(1, 0)
      elif (w := re.match(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", st)):
        items.append(("wait", int(w.group(1))))
        simt(1, 0)
      elif st.startswith(_MUFU):
        simt(0, 1)
      else:
        simt(1, 0)
    return items

  return tuple(build(0, len(sts)))


def chain_cycles(program: tuple, prm: "Params") -> float:
  """One warpgroup's critical path through its :func:`_program`: its SIMT instructions
  one after another (``cpi`` cycles each, ``mufu_cycles`` per special function), each
  wgmma starting when issued and the tensor cores are done with its predecessors
  (``cycles / tc_efficiency``), a ``wait_group n`` holding the warpgroup until all but
  the newest ``n`` committed groups are done (``wait_latency`` more at ``n = 0``). SIMT
  between a wgmma and its wait runs under it; only what the wait still finds running
  counts. Loops are played trip by trip (to their steady state). Memoised per program and
  constants (a calibration's grid search plays each program thousands of times)."""
  key = (id(program), prm.tc_efficiency, prm.wait_latency, prm.cpi, prm.mufu_cycles)
  hit = _CHAINS.get(key)
  if hit is not None and hit[0] is program:
    return hit[1]
  st = {"t": 0.0, "tc": 0.0, "open": None, "groups": []}

  def play(items) -> None:
    for it in items:
      kind = it[0]
      if kind == "simt":
        st["t"] += it[1] * prm.cpi + it[2] * prm.mufu_cycles
      elif kind == "mma":
        st["tc"] = max(st["t"], st["tc"]) + it[1] / prm.tc_efficiency
        st["open"] = st["tc"]
      elif kind == "commit":
        if st["open"] is not None:
          st["groups"].append(st["open"])
          st["open"] = None
          # groups finish in order: the newest few decide any wait_group n below that
          del st["groups"][:-_GROUPS_KEPT]
      elif kind == "wait":
        n, groups = it[1], st["groups"]
        if st["open"] is not None:  # issued, not committed: waited for like a group
          groups.append(st["open"])
          st["open"] = None
        if len(groups) > n:
          st["t"] = max(st["t"], max(groups[:len(groups) - n]))
          del groups[:len(groups) - n]
        if n == 0:
          st["t"] += prm.wait_latency
      else:
        loop(int(it[1]), it[2])

  def times() -> list:
    return [st["t"], st["tc"], st["open"], *st["groups"]]

  def loop(trips: int, body) -> None:
    # Played trip by trip until two trips in a row move every time by the same amount
    # (the steady state of these max-plus updates); the trips left then move it alike.
    last, step = times(), None
    for done in range(1, trips + 1):
      play(body)
      now = times()
      d = [None if a is None or b is None else b - a for a, b in zip(last, now)]
      same = (len(now) == len(last) and all((a is None) == (b is None) for a, b in zip(last, now))
              and len({x for x in d if x is not None}) <= 1)
      if same and step is not None and d == step:
        shift = (trips - done) * (d[0] or 0.0)
        st["t"] += shift
        st["tc"] += shift
        if st["open"] is not None:
          st["open"] += shift
        st["groups"] = [g + shift for g in st["groups"]]
        return
      step = d if same else None
      last = now

  play(program)
  if st["open"] is not None or st["groups"]:  # the kernel's end waits for every wgmma
    st["t"] = max([st["t"], st["tc"]])
  if len(_CHAINS) > 100_000:
    _CHAINS.clear()
  _CHAINS[key] = (program, st["t"])  # the program kept alive: its id is not reused
  return st["t"]


_CHAINS: dict = {}
_GROUPS_KEPT = 8  # more than any wait_group n Mosaic emits


def _control_flow(sts: list[str]):
  """(blocks, successors, predecessors, dominators, label -> block, natural loops) of a
  kernel's statements."""
  blocks, succ, block_of = _blocks(sts)
  preds = _preds(len(blocks), succ)
  dom = _dominators(len(blocks), preds)
  return blocks, succ, preds, dom, block_of, _natural_loops(sts, blocks, succ, preds, dom, block_of)


def profile_ptx(ptx: str, runtime_trips: int | None = None) -> Profile:
  """Summarise one kernel's PTX (see the module docstring). ``runtime_trips``: the
  trip count of every loop whose bound is not a constant (1 when not given)."""
  sts = _statements(ptx)
  threads = re.search(r"\.(?:maxntid|reqntid)\s+(\d+)", ptx)
  threads = int(threads.group(1)) if threads else 128
  warpgroups = max(1, threads // 128)
  regs = {m.group(1): int(m.group(2)) for s in sts if (m := _MOV_IMM.match(s))}
  blocks, succ, preds, dom, block_of, loops = _control_flow(sts)
  weight = [1.0] * len(sts)
  resolved = [(body, trips if trips is not None else (runtime_trips or 1)) for body, trips in loops]
  for body, t in resolved:
    for k in body:
      a, b = blocks[k]
      for i in range(a, b):
        weight[i] *= t
  seeds = {"consumer": set(), "producer": set()}
  for k, (a, b) in enumerate(blocks):
    for s in sts[a:b]:
      if s.startswith("setmaxnreg.inc"):
        seeds["consumer"].add(k)
      elif s.startswith("setmaxnreg.dec"):
        seeds["producer"].add(k)
  role_of = ["all"] * len(sts)
  for k, (a, b) in enumerate(blocks):
    for name, ks in seeds.items():
      if ks & dom[k]:
        role_of[a:b] = [name] * (b - a)

  guard = _consumer_guards(sts, blocks, succ, preds, dom, block_of)

  def role(names: tuple[str, ...], index: int | None = None) -> Role:
    acc = dict(wgmma_cycles=0.0, wgmma_flops=0.0, simt=0.0, mufu=0.0, waits=0.0, tma_bytes=0.0)
    overlapped = False
    for s, w, r, g in zip(sts, weight, role_of, guard):
      if r not in names or _LABEL.match(s) or (index is not None and g not in (None, index)):
        continue
      m = _WGMMA.search(s)
      if m:
        flops, dtype = _wgmma_work(m)
        acc["wgmma_flops"] += w * flops
        acc["wgmma_cycles"] += w * flops / _TC_FLOPS_PER_CYCLE.get(dtype, 4096)
        continue
      if s.startswith("setp.ne.b32 p,"):
        continue  # the scale-d predicate of wgmma's own inline assembly
      wait = re.match(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", s)
      if wait:
        if int(wait.group(1)) == 0:
          acc["waits"] += w
        elif w > 1:
          overlapped = True
      tx = _EXPECT_TX.match(s.split(" ", 1)[1] if s.startswith("@") else s)
      if tx:  # Mosaic arrives from every thread of the warpgroup with its share of the bytes
        v = tx.group(1)
        per = int(v) if v.isdigit() else regs.get(v, 0)
        acc["tma_bytes"] += w * per * (1 if s.startswith("@") else 128)
      if s.startswith(_MUFU):
        acc["mufu"] += w
      else:
        acc["simt"] += w

    def keep(i: int) -> bool:
      return role_of[i] in names and (index is None or guard[i] in (None, index))

    return Role(overlapped=overlapped, program=_program(sts, blocks, resolved, keep), **acc)

  ws = bool(seeds["producer"]) and bool(seeds["consumer"])
  consumers = warpgroups - 1 if ws else warpgroups
  shapes = tuple(sorted({f"m{a}n{b}k{c}" + ("sp" if ".sp." in x.group(0) else "")
                         for s in sts if (x := _WGMMA.search(s)) for a, b, c in [x.groups()[:3]]}))
  consumer, per_consumer = role(("consumer", "all")), ()
  if any(g is not None and g < consumers and r == "consumer" for g, r in zip(guard, role_of)):
    per_consumer = tuple(role(("consumer", "all"), k) for k in range(consumers))
    consumer = _mean_role(per_consumer)
  return Profile(
      threads=threads, consumers=consumers, producers=1 if ws else 0,
      consumer=consumer, producer=role(("producer", "all")) if ws else Role(),
      loops=tuple((sum(blocks[k][1] - blocks[k][0] for k in body), trips) for body, trips in loops),
      wgmma_shapes=shapes, consumer_roles=per_consumer)


def _consumer_guards(sts: list[str], blocks, succ, preds, dom,
                     block_of: dict[str, int]) -> list[int | None]:
  """Per statement: the warpgroup index ``k`` that alone runs it (a block dominated by the
  one-predecessor successor of a branch on ``wg == k`` / ``wg != k``), else None. The
  index is ``%tid.x >> 7``, possibly broadcast by ``shfl.sync.idx`` (Mosaic's form)."""
  tid = {m.group(1) for s in sts if (m := re.match(r"^mov\.u32\s+(%r\d+),\s*%tid\.x;", s))}
  wg = {m.group(1) for s in sts
        if (m := re.match(r"^shr\.u32\s+(%r\d+),\s*(%r\d+),\s*7;", s)) and m.group(2) in tid}
  wg |= {m.group(1) for s in sts
         if (m := re.match(r"^shfl\.sync\.idx\.b32\s+(%r\d+),\s*(%r\d+),\s*0,", s))
         and m.group(2) in wg}
  tests = {m.group(2): (m.group(1), int(m.group(4))) for s in sts
           if (m := _WG_GUARD.match(s)) and m.group(3) in wg}
  guard: list[int | None] = [None] * len(sts)
  for k, (a, b) in enumerate(blocks):
    m = _BRANCH.match(sts[b - 1]) if b > a else None
    if not m or not m.group(3) or m.group(3) not in tests or len(succ.get(k, [])) != 2:
      continue
    op, index = tests[m.group(3)]
    taken_when_equal = (op == "eq") != (m.group(2) == "!")
    target = block_of[m.group(4)]
    fall = k + 1
    only = target if taken_when_equal else fall  # the successor run only by warpgroup index
    if preds.get(only) != [k]:
      continue
    for j, (x, y) in enumerate(blocks):
      if only in dom[j]:
        guard[x:y] = [index] * (y - x)
  return guard


def _mean_role(roles: tuple[Role, ...]) -> Role:
  n = len(roles)
  fields = ("wgmma_cycles", "wgmma_flops", "simt", "mufu", "waits", "tma_bytes")
  return Role(overlapped=any(r.overlapped for r in roles),
              **{f: sum(getattr(r, f) for r in roles) / n for f in fields})


@dataclasses.dataclass(frozen=True)
class Params:
  """The model's free constants. Defaults: ``benchmarks/calibrate_model.py``'s fit to 11
  published Hopper measurements with a consumer's chain played in program order
  (:func:`chain_cycles`; 2026-12-05, jax 0.12.0.1, SIMT cost on a grid of half cycles; RMS
  log error 0.099, leave-one-out errors -22% to +18%, docs/kernels.md). Bandwidths are the
  H200's measured ones (docs/hopper_published.md), not fitted.

  ``ordered_chain=False``: the closed form instead (a loop with ``wait_group`` >= 1
  overlaps all its SIMT with all its wgmma, else none), :data:`CLOSED_FORM` with its own
  fit (RMS 0.091). The published points do not tell the two apart; the closed form reads
  one ``wait_group 1`` on a tiny wgmma as the whole loop overlapped (tried on the ELAS
  forward: 23% off its chain where the program order took 6%, and ptxas' schedule had
  the change slower), so the program order is the default and docs/kernels.md reports
  both."""

  tc_efficiency: float = 1.0  # sustained fraction of the tensor cores' peak
  wait_latency: float = 0.0  # cycles a wgmma.wait_group 0 costs beyond the MMAs
  cpi: float = 5.0  # cycles per SIMT instruction on one warpgroup's own chain
  mufu_cycles: float = 1.0  # issue cycles of one special-function warp instruction
  overhead_s: float = 4e-6  # per kernel: launch tail, prologue, pipeline fill, epilogue drain
  l2_bytes_per_s: float = 9.7e12  # H200 L2 read, 4-40 MB working set (gpu-benches)
  hbm_bytes_per_s: float = 3.89e12  # H200 DRAM read (gpu-benches)
  ordered_chain: bool = True


# The closed form's own fit to the same points (2026-12-05; RMS log error 0.091,
# leave-one-out -20% to +18%).
CLOSED_FORM = Params(tc_efficiency=1.0, cpi=4.5, mufu_cycles=1.0, ordered_chain=False)


@dataclasses.dataclass(frozen=True)
class Estimate:
  """One kernel's modelled time and which term bounds it."""

  time_s: float
  bound: str  # tensor, chain, issue, l2, hbm
  terms_s: dict  # every term, seconds for the whole kernel
  waves: float

  @property
  def time_us(self) -> float:
    return self.time_s * 1e6


def clock_hz(gpu: GpuSpec = H200) -> float:
  """The SM clock the dense bf16 peak implies (4096 FLOP per cycle per SM)."""
  return gpu.bf16_flops_per_s / (gpu.sm_count * 4096)


def _program_cycles(p: Profile, k: int, prm: Params, gpu: GpuSpec) -> dict[str, float]:
  """Cycles of one wave on one SM with ``k`` programs resident, per term."""
  c, q = p.consumer, p.producer
  tc = c.wgmma_cycles / prm.tc_efficiency

  def own_chain(r: Role) -> float:  # one warpgroup's wgmma, SIMT and waits
    if prm.ordered_chain and r.program:
      return chain_cycles(r.program, prm)
    t = r.wgmma_cycles / prm.tc_efficiency
    simt = r.simt * prm.cpi + r.mufu * prm.mufu_cycles
    return (max(t, simt) if r.overlapped else t + simt) + r.waits * prm.wait_latency

  chain = max(own_chain(r) for r in (p.consumer_roles or (c,)))
  chain = max(chain, q.simt * prm.cpi + q.mufu * prm.mufu_cycles)
  issue = (p.consumers * (c.simt + c.mufu * prm.mufu_cycles)
           + p.producers * (q.simt + q.mufu * prm.mufu_cycles))
  l2_per_cycle = prm.l2_bytes_per_s / gpu.sm_count / clock_hz(gpu)
  tma = p.consumers * c.tma_bytes + p.producers * q.tma_bytes
  return {"tensor": k * p.consumers * tc, "chain": chain, "issue": k * issue,
          "l2": k * tma / l2_per_cycle}


def estimate(p: Profile, programs: int, programs_per_sm: int, hbm_bytes: float,
             params: Params | None = None, gpu: GpuSpec = H200) -> Estimate:
  """Time of a kernel launching ``programs`` copies of the profiled program (a
  persistent kernel: one per SM, its work loop given to :func:`profile_ptx` as
  ``runtime_trips``), ``programs_per_sm`` of them resident at once, moving
  ``hbm_bytes`` to and from HBM (each input and output once)."""
  prm = params or Params()
  k = max(1, programs_per_sm)
  sms = gpu.sm_count
  full, rest = divmod(programs, sms * k)
  waves = programs / (sms * k)
  terms = {name: 0.0 for name in ("tensor", "chain", "issue", "l2")}
  total = 0.0
  for count, kk in ((full, k), (1 if rest else 0, math.ceil(rest / sms))):
    if not count:
      continue
    cyc = _program_cycles(p, kk, prm, gpu)
    total += count * max(cyc.values())
    for name, v in cyc.items():
      terms[name] += count * v / clock_hz(gpu)
  sm_s = total / clock_hz(gpu)
  terms["hbm"] = hbm_bytes / prm.hbm_bytes_per_s
  bound = max(terms, key=terms.get)
  return Estimate(time_s=max(sm_s, terms["hbm"]) + prm.overhead_s, bound=bound, terms_s=terms,
                  waves=waves)


# --------------------------------------------------------------------------
# SASS: the compiler's own schedule (a cross-check of the SIMT terms, not a term).
# --------------------------------------------------------------------------

_SASS_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
# nvdisasm -print-instruction-ctrl (Mosaic's MOSAIC_GPU_DUMP_SASS_CTRL): wait mask, read and
# write barriers, yield, stall cycles, then the address and the instruction
_SASS_INSTR = re.compile(r"^\s*[\w&-]+:[\w-]+:[\w-]+:[\w-]:(\d+)\s+/\*[0-9a-f]+\*/\s+(.+?)\s*;?\s*$")
_SASS_BRA = re.compile(r"\bBRA\s+`\((\.L_x_\d+)\)")


@dataclasses.dataclass(frozen=True)
class SassLoop:
  """A loop of a kernel's SASS: its instructions and the stall cycles the compiler
  scheduled between them (one pass over the span, nested loops once), and its
  ``HGMMA`` count; ``inner``: the nested loops' own (instructions, stall cycles)."""

  instructions: int
  stall_cycles: int
  hgmma: int
  inner: tuple[tuple[int, int], ...] = ()


def sass_loops(sass: str) -> list[SassLoop]:
  """The loops of a SASS listing with control codes: each backward branch's span (its
  label to the branch). Out-of-line retry blocks that branch back into the code (a
  barrier's try-wait) make spans of their own too; :func:`sass_main_loop` picks."""
  lines = sass.splitlines()
  labels, ins = {}, []
  for i, line in enumerate(lines):
    m = _SASS_LABEL.match(line)
    if m:
      labels[m.group(1)] = i
      continue
    m = _SASS_INSTR.match(line)
    if m:
      ins.append((i, int(m.group(1)), m.group(2)))
  spans = []
  for i, _, text in ins:
    m = _SASS_BRA.search(text)
    if m and labels.get(m.group(1), i) < i:
      spans.append((labels[m.group(1)], i))

  def summary(a: int, b: int, inner=()) -> SassLoop:
    body = [x for x in ins if a <= x[0] <= b]
    return SassLoop(len(body), sum(x[1] for x in body), sum("HGMMA" in x[2] for x in body),
                    inner)

  out = []
  for a, b in spans:
    nested = tuple((s.instructions, s.stall_cycles) for s in
                   (summary(x, y) for x, y in spans if a <= x and y <= b and (x, y) != (a, b)))
    out.append(summary(a, b, nested))
  return out


@dataclasses.dataclass(frozen=True)
class PtxLoop:
  """A kernel's main PTX loop (the one :func:`sass_main_loop` finds in its SASS): statements
  per trip (nested loops at their trip counts), the nested loops' trips, and its wgmma
  (nested loops once, as :class:`SassLoop` counts ``HGMMA``)."""

  statements: float
  nested_trips: tuple[int, ...]
  wgmma: int


def ptx_main_loop(ptx: str) -> PtxLoop | None:
  """Of the natural loops holding the most wgmma, the smallest (the main loop; an
  enclosing work loop holds the same wgmma), or None without wgmma in a loop."""
  sts = _statements(ptx)
  blocks, *_, loops = _control_flow(sts)

  def stmts(body):
    return [i for k in body for i in range(*blocks[k])]

  def wgmma(body):
    return sum(bool(_WGMMA.search(sts[i])) for i in stmts(body))

  cands = [(body, wgmma(body)) for body, _ in loops]
  most = max((n for _, n in cands), default=0)
  if not most:
    return None
  body = min((b for b, n in cands if n == most), key=len)
  nested = [(b, t or 1) for b, t in loops if b < body]
  weight = {i: 1.0 for i in stmts(body)}
  for b, t in nested:
    for i in stmts(b):
      weight[i] *= t
  return PtxLoop(sum(weight.values()), tuple(t for _, t in nested), most)


def sass_main_loop(sass: str) -> SassLoop | None:
  """The kernel's main loop: of the loops holding the most ``HGMMA``, the shortest (the
  retry blocks' spans reach around it)."""
  loops = [x for x in sass_loops(sass) if x.hgmma]
  if not loops:
    return None
  most = max(x.hgmma for x in loops)
  return min((x for x in loops if x.hgmma == most), key=lambda x: x.instructions)
