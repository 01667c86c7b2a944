"""Per-op profile tables (vimjax/perf/op_profile.py) from a real jax.profiler trace."""
import jax
import jax.numpy as jnp
import numpy as np

from vimjax.perf import op_profile


def test_trace_attributes_time_to_the_matmul_and_its_source_line(tmp_path):
  def f(a, b):
    return jnp.tanh(a @ b).sum(0)

  a = jnp.asarray(np.random.RandomState(0).randn(256, 256), jnp.float32)
  compiled = jax.jit(f).lower(a, a).compile()
  result = op_profile.trace(lambda: [compiled(a, a) for _ in range(3)][-1], str(tmp_path),
                            hlo_texts=[compiled.as_text()], calls=3)
  assert result["xplane"].endswith(".xplane.pb")
  assert "Per HLO instruction:" in result["table"] and "Per JAX primitive:" in result["table"]
  assert (tmp_path / "op_breakdown.txt").read_text().strip() == result["table"]
  assert (tmp_path / "program_0.hlo.txt").exists()
  rows = op_profile.annotate(op_profile.op_times(result["xplane"], calls=3),
                             [compiled.as_text()])
  assert rows and all(r.seconds > 0 for r in rows)
  # The matmul (alone or fused with tanh / the sum) is found and named, with this file's line.
  matmul = [r for r in rows if op_profile.primitive(r.jax_op, r.opcode).startswith("dot_general")]
  assert matmul, [(r.name, r.opcode, r.jax_op) for r in rows]
  assert any("test_op_profile.py:" in r.source for r in matmul)


def test_hlo_instructions_reads_fusions_and_stack_frames():
  text = """FileNames
1 "/src/model.py"

FunctionNames
1 "f"

FileLocations
1 {file_name_id=1 function_name_id=1 line=42 end_line=42 column=1 end_column=2}

StackFrames
1 {file_location_id=1 parent_frame_id=1}


%fused_computation (p0: f32[4,4], p1: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  %p1 = f32[4,4]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[4,4]) -> f32[4,4] {
  %a = f32[4,4]{1,0} parameter(0)
  ROOT %fusion.7 = f32[4,4]{1,0} fusion(%a, %a), kind=kOutput, calls=%fused_computation, metadata={op_name="jit(f)/tanh" stack_frame_id=1}
}
"""
  table = op_profile.hlo_instructions(text)
  assert table["fusion.7"] == {"opcode": "fusion:Output[dot]", "shape": "f32[4,4]{1,0}",
                               "jax_op": "jit(f)/tanh", "source": "model.py:42"}
  assert op_profile.primitive("jit(f)/tanh", "fusion:Output[dot]") == "dot_general+fused"
  assert op_profile.primitive("jit(f)/jvp(g)/reduce_max", "fusion:Loop") == "reduce_max"
  folded = op_profile.by_primitive([op_profile.OpTime("x", 1.0, 1, "fusion:Loop", "", "a/mul"),
                                    op_profile.OpTime("y", 2.0, 1, "fusion:Loop", "", "b/mul")])
  assert [(r.name, r.seconds, r.count) for r in folded] == [("mul", 3.0, 2)]


def test_idle_gaps_go_to_the_last_async_op_else_the_last_to_finish():
  """Gaps of the busy union (overlapping events merged), per call: filed under the
  last async op (an Eigen dot, whose matmul runs after its event ends) started
  before the gap, else under the op whose end the gap follows."""
  ms = 1_000_000
  events = [(0, 2 * ms, "fusion.1"),
            (3 * ms, 9 * ms, "fusion.2"),  # 1 ms after fusion.1.
            (6 * ms, 7 * ms, "copy.3"),    # Inside fusion.2: no gap, and not the last to end.
            (10 * ms, 11 * ms, "fusion.2"),  # 1 ms after fusion.2.
            (15 * ms, 16 * ms, "add.4")]   # 4 ms after fusion.2.
  rows = op_profile.idle_gaps(events, calls=2)
  assert [(r.name, round(r.seconds * 1e3, 6), r.count) for r in rows] == [
      ("fusion.2", 2.5, 1), ("fusion.1", 0.5, 1)]
  # copy.3 an async dot: every gap after it started is its own.
  rows = op_profile.idle_gaps(events, calls=2, async_ops=frozenset({"copy.3"}))
  assert [(r.name, round(r.seconds * 1e3, 6)) for r in rows] == [
      ("copy.3", 2.5), ("fusion.1", 0.5)]
  assert op_profile.idle_gaps([]) == []
