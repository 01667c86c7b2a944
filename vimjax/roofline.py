"""A roofline step time for a compiled, sharded program: compute + collectives.

Where the TPU compiler's cost model gives no step time (scanned stacks, FSDP and
tensor-parallel programs), `aot_compile` estimates one from two numbers:

  compute    = executed FLOPs per chip (the model's FLOPs plus what the remat
               policy recomputes) / the chip's peak bf16 FLOP/s;
  collective = bytes each chip sends in the compiled program's collectives /
               the ICI bandwidth one collective gets.

The estimate is compute + collective: matmuls at peak, memory-bound ops free,
no overlap of communication with compute. It is a model, not a measurement;
it says which configs are communication-bound and by how much.

Collective bytes are read from the compiled HLO text (`compiled.as_text()`),
with each computation weighted by how often it runs (a `while` body by its trip
count, read from its condition). Per chip, with n devices in the group and
ring algorithms: all-gather sends (n-1)/n of its result, reduce-scatter (n-1)
times its result, all-reduce 2(n-1)/n of its operand, all-to-all (n-1)/n, and
collective-permute its operand (unless it sends to itself). A collective whose
replica group spans k torus dimensions (from the devices' coordinates) runs on
bidirectional rings along all k: 2k x the one-way bandwidth of a link (JAX
scaling book, "How to Scale Your Model", part 2; `hardware.CHIPS`). Collectives
run one after another.
"""
import collections
import dataclasses
import math
import re
from typing import Any

from absl import logging
import numpy as np

from vimjax import hardware

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e\w+)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%[\w.\-]+ = (.*?) ([a-z][a-z0-9\-]*)\(")
_CALLEES = re.compile(r"\b(to_apply|calls|body|condition|true_computation|"
                      r"false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction of a compiled program."""
  opcode: str  # e.g. "all-gather" (an async "-start" is named without the suffix).
  computation: str
  group_size: int
  bytes_per_chip: float  # Sent by each chip, per execution.
  executions: int  # Per call of the program (while trip counts multiplied in).
  torus_dims: int = 1  # Torus dimensions its replica group spans.


def _array_bytes(type_text: str) -> list[float]:
  """Bytes of each array in an HLO type ('f32[2,3]{1,0}' or a tuple of them)."""
  out = []
  for dtype, dims in _ARRAY.findall(type_text):
    size = _DTYPE_BYTES.get(dtype, 1)  # fp8 kinds: 1 byte.
    out.append(size * math.prod(int(d) for d in dims.split(",") if d))
  return out


def split_computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
  """({computation name: its instruction lines}, the entry computation's name)."""
  computations, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    header = re.match(r"^(ENTRY )?%([\w.\-]+) ", line)
    if header and line.rstrip().endswith("{"):
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
    elif line.startswith("}"):
      current = None
    elif current is not None:
      computations[current].append(line)
  if entry is None:
    raise ValueError("No ENTRY computation in the HLO text; pass compiled.as_text().")
  return computations, entry


def trip_count(condition: list[str]) -> int | None:
  """N of a `while` whose condition is `counter < N` (a constant), else None."""
  constants = {}
  for line in condition:
    match = re.match(r"^\s*%([\w.\-]+) = s32\[\]\S* constant\((-?\d+)\)", line)
    if match:
      constants[match.group(1)] = int(match.group(2))
  for line in condition:
    match = re.search(r"compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT", line)
    if match and match.group(1) in constants:
      return constants[match.group(1)]
  return None


def executions(computations: dict[str, list[str]], entry: str) -> dict[str, int]:
  """How often each computation runs per call of the program.

  A `while` body (and condition) runs its trip count times per execution of
  the instruction; every branch of a `conditional` is counted (an upper bound).
  """
  calls = collections.defaultdict(list)  # name -> [(callee, factor)]
  for name, lines in computations.items():
    for line in lines:
      callees = dict((kind, callee) for kind, callee in _CALLEES.findall(line))
      factor = 1
      if "body" in callees:
        factor = trip_count(computations.get(callees.get("condition"), []))
        if factor is None:
          logging.warning("while body %s: no trip count in its condition; counted once "
                          "(collective bytes are a lower bound).", callees["body"])
          factor = 1
      for kind, callee in callees.items():
        calls[name].append((callee, factor if kind in ("body", "condition") else 1))
      branches = _BRANCHES.search(line)
      if branches:
        calls[name] += [(b.strip().lstrip("%"), 1) for b in branches.group(1).split(",")]
  # Callers before callees (the call graph is a DAG), then counts flow down once
  # per edge: shared callees (reductions, fusions) are not walked per caller.
  order, seen = [], set()

  def post_order(name: str) -> None:
    seen.add(name)
    for callee, _ in calls.get(name, ()):
      if callee not in seen:
        post_order(callee)
    order.append(name)

  post_order(entry)
  counts = collections.Counter({entry: 1})
  for name in reversed(order):
    for callee, factor in calls.get(name, ()):
      counts[callee] += counts[name] * factor
  return dict(counts)


def replica_group(line: str, num_devices: int) -> np.ndarray:
  """Logical device ids of the first replica group of a collective instruction."""
  iota = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
  if iota:
    shape, dims = _ints(iota.group(1)), _ints(iota.group(2))
    perm = _ints(iota.group(3)) if iota.group(3) else list(range(len(dims)))
    return np.arange(math.prod(dims)).reshape(dims).transpose(perm).reshape(shape)[0]
  # mesh['a'=2,'b'=4][, device_ids=(<iota or list>)] {'b'}: the group varies 'b'.
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\((.*?)\))?\s*\{([^}]*)\}",
                   line)
  if mesh:
    names, sizes = zip(*[(a, int(n)) for a, n in re.findall(r"'([^']+)'=(\d+)", mesh.group(1))])
    selected = set(re.findall(r"'([^']+)'", mesh.group(3)))
    ids = _device_ids(mesh.group(2), math.prod(sizes)).reshape(sizes)
    return ids[tuple(slice(None) if a in selected else 0 for a in names)].ravel()
  explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if explicit:
    return np.array(_ints(explicit.group(1)))
  return np.arange(num_devices)  # replica_groups={} (or absent): all devices.


def _device_ids(text: str | None, size: int) -> np.ndarray:
  """A mesh's device order: '[2,2]T(1,0)' (an iota, transposed), '0,2,1,3', or None."""
  if not text:
    return np.arange(size)
  iota = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", text.strip())
  if iota:
    dims = _ints(iota.group(1))
    perm = _ints(iota.group(2)) if iota.group(2) else list(range(len(dims)))
    return np.arange(size).reshape(dims).transpose(perm).ravel()
  return np.array(_ints(text))


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def torus_dims(ids: np.ndarray, device_coords: np.ndarray | None) -> int:
  """How many torus dimensions the devices `ids` span (1 when coords are unknown)."""
  if device_coords is None or not len(ids):
    return 1
  coords = device_coords[ids]
  return max(1, sum(len(np.unique(coords[:, d])) > 1 for d in range(coords.shape[1])))


def _bytes_sent(opcode: str, line: str, type_text: str, async_start: bool,
                n: int) -> float:
  arrays = [b for b in _array_bytes(type_text) if b > 4]  # Drop async scalars.
  if async_start and opcode != "all-reduce":
    arrays = arrays[len(arrays) // 2:]  # (inputs..., outputs...): the outputs.
  total = sum(arrays)
  if opcode == "collective-permute":
    pairs = re.findall(r"\{(\d+),(\d+)\}", line.split("source_target_pairs=")[-1])
    moving = sum(s != t for s, t in pairs)
    return total * moving / len(pairs) if pairs else total
  if n <= 1:
    return 0.0
  if opcode == "all-reduce":
    return 2 * total * (n - 1) / n
  if opcode == "reduce-scatter":
    return total * (n - 1)
  return total * (n - 1) / n  # all-gather (of its result), all-to-all.


def collectives(hlo_text: str, num_devices: int,
                device_coords: np.ndarray | None = None) -> list[Collective]:
  """Every collective of a compiled (per-device) program, with bytes and counts.

  `device_coords` [num_devices, 3]: the torus coordinates of logical device i
  (the program's device assignment: the mesh's devices, flattened), which say
  how many torus dimensions each replica group spans.
  """
  computations, entry = split_computations(hlo_text)
  runs = executions(computations, entry)
  out = []
  for name, lines in computations.items():
    for line in lines:
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      type_text, opcode = match.groups()
      base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
      if base not in COLLECTIVES or name not in runs:
        continue
      group = (np.arange(num_devices) if base == "collective-permute"
               else replica_group(line, num_devices))
      sent = _bytes_sent(base, line, type_text, opcode.endswith("-start"), len(group))
      out.append(Collective(base, name, len(group), sent, runs[name],
                            torus_dims(group, device_coords)))
  return out


def collective_bytes(colls: list[Collective]) -> dict[str, float]:
  """Bytes each chip sends per call, by collective kind (plus "total")."""
  by_kind = collections.Counter()
  for c in colls:
    by_kind[c.opcode] += c.bytes_per_chip * c.executions
  return {**dict(by_kind), "total": float(sum(by_kind.values()))}


def collective_seconds(colls: list[Collective], chip: str) -> float:
  """Time of the collectives, one after another, each on bidirectional rings
  along every torus dimension its group spans."""
  link = hardware.CHIPS[chip].ici_link_bytes_per_s if chip in hardware.CHIPS else None
  if link is None:
    raise ValueError(f"No ICI bandwidth for chip {chip!r}; known: {sorted(hardware.TPUS)}.")
  return sum(c.bytes_per_chip * c.executions / (2 * link * c.torus_dims) for c in colls)


def estimate(*, model_flops: float, executed_flops: float, num_chips: int,
             peak_flops: float, colls: list[Collective], chip: str) -> dict[str, Any]:
  """The roofline step time and MFU (see the module docstring); global FLOPs in."""
  compute_s = executed_flops / num_chips / peak_flops
  collective_s = collective_seconds(colls, chip)
  step_s = compute_s + collective_s
  sent = collective_bytes(colls)
  return {
      "compute_s": compute_s, "collective_s": collective_s,
      "collective_bytes_per_chip": sent.pop("total"), "collective_bytes_by_kind": sent,
      "executed_flops": executed_flops,
      "step_time_s": step_s, "mfu": model_flops / (step_s * num_chips * peak_flops),
  }
