"""Per-op time breakdown of compiled programs from a `jax.profiler` trace.

`trace(fn, profile_dir)` runs `fn` under `jax.profiler.trace`, which writes the
usual TensorBoard / XProf trace (`profile_dir/plugins/profile/<run>/*.xplane.pb`),
then reads the trace back (`jax.profiler.ProfileData`) and sums the device time
of every executed HLO instruction (events carrying an `hlo_op` stat: the thunks
of XLA:CPU, the kernels of GPU / TPU). Joined with the optimized HLO text of
the compiled programs, each instruction gets its opcode, shape and the JAX op
it came from (`metadata op_name`, source line), so a table says which model
part the time goes to. `by_primitive` folds the rows onto the JAX primitive
(dot_general, conv_general_dilated, reduce_max, ...).

Times are summed over the traced calls and divided by `calls`; instructions
that run concurrently on several threads count each thread's time, so the
total can exceed the wall time.
"""
import collections
import dataclasses
import os
import re

import jax

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.+?)\s+"
    r"(?P<opcode>[\w\-]+)\((?P<rest>.*)$")
_OP_NAME = re.compile(r'op_name="(?P<op>[^"]*)"')
_SOURCE = re.compile(r'source_file="(?P<file>[^"]*)"\s+source_line=(?P<line>\d+)')
_FRAME_ID = re.compile(r"stack_frame_id=(?P<id>\d+)")
_TABLE_ROW = re.compile(r'^(?P<id>\d+)\s+(?P<value>.*)$')
_FIELD = re.compile(r"(\w+)=(\d+)")
_KIND = re.compile(r"kind=(?P<kind>k\w+)")
_CALLS = re.compile(r"calls=%?(?P<callee>[\w.\-]+)")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s+\(.*\{\s*$")
# Opcodes that make a fusion a matmul / convolution (XLA:CPU fuses dots with
# their elementwise neighbours, so the root's op name alone would hide them).
_HEAVY = ("dot", "convolution")


@dataclasses.dataclass
class OpTime:
  """Time of one HLO instruction (or a group of them), per traced call."""
  name: str
  seconds: float
  count: int
  opcode: str = ""
  shape: str = ""
  jax_op: str = ""
  source: str = ""


def _stack_frames(hlo_text: str) -> dict[str, str]:
  """{stack_frame_id: "file.py:line"} from the tables newer XLA prints before the HLO."""
  tables = collections.defaultdict(dict)
  section = None
  for line in hlo_text.splitlines():
    line = line.strip()
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      section = line
      continue
    m = _TABLE_ROW.match(line) if section else None
    if not m:
      section = None if not line else section
      continue
    tables[section][m.group("id")] = m.group("value")
  frames = {}
  for frame_id, value in tables["StackFrames"].items():
    location = tables["FileLocations"].get(dict(_FIELD.findall(value)).get("file_location_id"))
    if location is None:
      continue
    fields = dict(_FIELD.findall(location))
    name = tables["FileNames"].get(fields.get("file_name_id"), "").strip('"')
    frames[frame_id] = f"{os.path.basename(name)}:{fields.get('line', '?')}"
  return frames


def _computation_opcodes(hlo_text: str) -> dict[str, set[str]]:
  """{computation name: the opcodes of its instructions}."""
  opcodes = collections.defaultdict(set)
  current = None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = header.group("name")
      continue
    m = _INSTRUCTION.match(line)
    if current and m:
      opcodes[current].add(m.group("opcode"))
  return opcodes


def hlo_instructions(hlo_text: str) -> dict[str, dict[str, str]]:
  """{instruction name: {opcode, shape, jax_op, source}} of an HLO module's text.

  A fusion's opcode is `fusion:<kind>`, plus `[dot]` / `[convolution]` when its
  fused computation holds one.
  """
  frames = _stack_frames(hlo_text)
  computations = _computation_opcodes(hlo_text)
  table = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    rest = m.group("rest")
    opcode = m.group("opcode")
    kind = _KIND.search(rest)
    if opcode == "fusion" and kind:
      callee = _CALLS.search(rest)
      heavy = [op for op in _HEAVY if callee and op in computations[callee.group("callee")]]
      opcode = f"fusion:{kind.group('kind')[1:]}" + (f"[{heavy[0]}]" if heavy else "")
    op = _OP_NAME.search(rest)
    src = _SOURCE.search(rest)
    frame = _FRAME_ID.search(rest)
    if src:
      source = f"{os.path.basename(src.group('file'))}:{src.group('line')}"
    else:
      source = frames.get(frame.group("id"), "") if frame else ""
    shape = m.group("shape")
    table[m.group("name")] = dict(
        opcode=opcode, shape=shape if len(shape) <= 40 else shape[:37] + "...",
        jax_op=op.group("op") if op else "", source=source)
  return table


def _latest_xplane(profile_dir: str) -> str:
  found = []
  for root, _, files in os.walk(profile_dir):
    found += [os.path.join(root, f) for f in files if f.endswith(".xplane.pb")]
  if not found:
    raise FileNotFoundError(f"No *.xplane.pb under --profile_dir={profile_dir!r}: the "
                            "profiler wrote no trace.")
  return max(found, key=os.path.getmtime)


def op_events(xplane_path: str) -> list[tuple[int, int, str]]:
  """(start ns, end ns, HLO instruction) of every executed op in the trace, by start."""
  data = jax.profiler.ProfileData.from_file(xplane_path)
  events = []
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        op = dict(event.stats).get("hlo_op")
        if op:
          events.append((event.start_ns, event.start_ns + event.duration_ns, op))
  return sorted(events)


def op_times(xplane_path: str, calls: int = 1) -> list[OpTime]:
  """HLO instruction -> summed event time / calls, longest first."""
  return _summed(op_events(xplane_path), calls)


def _per_call(total: dict[str, float], count: collections.Counter, calls: int) -> list[OpTime]:
  rows = [OpTime(name, seconds / calls, max(count[name] // calls, 1))
          for name, seconds in total.items()]
  return sorted(rows, key=lambda r: -r.seconds)


def _summed(events: list[tuple[int, int, str]], calls: int) -> list[OpTime]:
  total = collections.defaultdict(float)
  count = collections.Counter()
  for start, end, op in events:
    total[op] += (end - start) * 1e-9
    count[op] += 1
  return _per_call(total, count, calls)


def idle_gaps(events: list[tuple[int, int, str]], calls: int = 1,
              async_ops: frozenset[str] = frozenset()) -> list[OpTime]:
  """Time in which no op runs, filed under the async op (else the op) before it.

  On XLA:CPU a dot that Eigen runs is an async thunk: its trace event ends when
  the work is handed to the thread pool, and the matmul itself runs in the gap
  before the next op that needs it (or the threads) can start. A gap is filed
  under the last op of `async_ops` that started before it, if any, else under
  the op that last finished: the async dot's real cost, which the per-op table
  cannot show. Rows: (op, seconds per call, gaps per call), longest first;
  their sum is the step's idle time.
  """
  if not events:
    return []
  total = collections.defaultdict(float)
  count = collections.Counter()
  busy_until, last_finished, last_async = events[0][1], events[0][2], None
  for start, end, op in events:
    if start > busy_until:
      owner = last_async or last_finished
      total[owner] += (start - busy_until) * 1e-9
      count[owner] += 1
    if op in async_ops:
      last_async = op
    if end > busy_until:
      busy_until, last_finished = end, op
  return _per_call(total, count, calls)


def annotate(rows: list[OpTime], hlo_texts: list[str]) -> list[OpTime]:
  """Fills opcode / shape / jax_op / source from the compiled programs' HLO."""
  table = {}
  for text in hlo_texts:
    table.update(hlo_instructions(text))
  for row in rows:
    info = table.get(row.name)
    if info:
      row.opcode, row.shape, row.jax_op, row.source = (
          info["opcode"], info["shape"], info["jax_op"], info["source"])
  return rows


def primitive(jax_op: str, opcode: str) -> str:
  """The JAX primitive of an op_name path (its last component), else the opcode.

  Instructions that are or fuse a dot / convolution are filed under it
  (`dot_general` / `conv_general_dilated`, "+fused" when inside a fusion).
  """
  for heavy, name in (("dot", "dot_general"), ("convolution", "conv_general_dilated")):
    if opcode == heavy:
      return name
    if opcode.endswith(f"[{heavy}]"):
      return f"{name}+fused"
  if not jax_op:
    return opcode or "?"
  last = jax_op.rstrip("/").split("/")[-1]
  return re.sub(r"\[.*$", "", last) or opcode


def by_primitive(rows: list[OpTime]) -> list[OpTime]:
  """Rows folded onto (transform path kind, primitive), longest first."""
  total = collections.defaultdict(float)
  count = collections.Counter()
  for row in rows:
    key = primitive(row.jax_op, row.opcode)
    total[key] += row.seconds
    count[key] += row.count
  return sorted((OpTime(k, v, count[k]) for k, v in total.items()), key=lambda r: -r.seconds)


def format_table(rows: list[OpTime], top: int = 15, title: str = "") -> str:
  """A short fixed-width table of the `top` rows with their share of the total."""
  total = sum(r.seconds for r in rows) or 1.0
  lines = [title] if title else []
  lines.append(f"{'ms/call':>9} {'%':>5} {'n':>4}  {'opcode':<16} {'shape':<28} jax op (source)")
  for r in rows[:top]:
    op = r.jax_op.split("/")[-1] if r.jax_op else r.name
    where = f" ({r.source})" if r.source else ""
    lines.append(f"{r.seconds * 1e3:9.2f} {100 * r.seconds / total:5.1f} {r.count:4d}  "
                 f"{r.opcode[:16]:<16} {r.shape[:28]:<28} {op[:48]}{where}")
  lines.append(f"{total * 1e3:9.2f} 100.0       total over {len(rows)} ops")
  return "\n".join(lines)


def trace(fn, profile_dir: str, *, hlo_texts: list[str], calls: int = 1,
          top: int = 15) -> dict:
  """Runs `fn()` (blocking on its result) under the profiler and summarises the trace.

  Args:
    fn: runs the work to profile; returns device arrays.
    profile_dir: where the trace goes (TensorBoard's --logdir for the profile plugin).
    hlo_texts: `compiled.as_text()` of the programs `fn` runs (to name the ops).
    calls: how many calls of the program `fn` makes (times are per call).
    top: rows in the printed tables.
  Returns:
    {"xplane": path, "table": text of the three tables (per instruction, per
    primitive, idle gaps), "top_ops": [[jax op, ms/call], ...]};
    the tables also go to profile_dir/op_breakdown.txt, the HLO texts to
    profile_dir/program_<i>.hlo.txt.
  """
  os.makedirs(profile_dir, exist_ok=True)
  with jax.profiler.trace(profile_dir):
    jax.block_until_ready(fn())
  path = _latest_xplane(profile_dir)
  for i, text in enumerate(hlo_texts):  # To read a row's instruction in full.
    with open(os.path.join(profile_dir, f"program_{i}.hlo.txt"), "w") as f:
      f.write(text)
  events = op_events(path)
  rows = annotate(_summed(events, calls), hlo_texts)
  eigen_dots = frozenset(r.name for r in rows if r.opcode == "dot")  # Async thunks.
  gaps = annotate(idle_gaps(events, calls, eigen_dots), hlo_texts)
  table = "\n\n".join([
      format_table(rows, top, "Per HLO instruction:"),
      format_table(by_primitive(rows), top, "Per JAX primitive:"),
      format_table(gaps, top, "No op running, after (the last Eigen dot, whose async "
                   "matmul computes there; else the last op; n = gaps per call):")])
  with open(os.path.join(profile_dir, "op_breakdown.txt"), "w") as f:
    f.write(table + "\n")
  return {"xplane": path, "table": table,
          "top_ops": [[primitive(r.jax_op, r.opcode), round(r.seconds * 1e3, 2)]
                      for r in rows[:5]]}
