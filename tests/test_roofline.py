"""roofline: collective bytes read from compiled TPU HLO, and the step-time model.

Programs are compiled by libtpu for a v4:2x2x1 slice (4 chips) on this CPU;
the expected bytes are worked out by hand from the shapes and the ring formulas.
"""
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from vimjax import aot_compile
from vimjax import roofline

P = jax.sharding.PartitionSpec


@pytest.fixture(scope="module")
def mesh():
  _, devices = aot_compile.topology_devices("v4:2x2x1")
  return jax.sharding.Mesh(np.array(devices), ("d",))


def _hlo(fn, mesh, in_specs, out_spec, *shapes):
  sharding = lambda spec: jax.sharding.NamedSharding(mesh, spec)
  lowered = jax.jit(fn, in_shardings=tuple(map(sharding, in_specs)),
                    out_shardings=sharding(out_spec)).lower(
                        *(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes))
  return lowered.compile().as_text()


def test_all_gather_sends_three_quarters_of_its_result(mesh):
  # [1024, 256] f32 sharded by rows, wanted whole: each chip sends its 1/4 to 3 others.
  text = _hlo(lambda x: x * 2, mesh, [P("d")], P(), (1024, 256))
  sent = roofline.collective_bytes(text, 4)
  assert sent["total"] == pytest.approx(1024 * 256 * 4 * 3 / 4)
  assert set(sent) == {"all-gather", "total"}


def test_all_reduce_sends_twice_three_quarters_of_its_operand(mesh):
  # Row sums of a row-sharded [64, 2048] f32: each chip all-reduces a [2048] partial.
  text = _hlo(lambda x: x.sum(0), mesh, [P("d")], P(), (64, 2048))
  sent = roofline.collective_bytes(text, 4)
  assert sent["total"] == pytest.approx(2 * 2048 * 4 * 3 / 4)
  assert set(sent) == {"all-reduce", "total"}


def test_a_collective_in_a_scanned_loop_counts_once_per_iteration(mesh):
  # Each of 5 steps gathers one [512, 512] f32 weight whose columns are sharded.
  def fn(x, w):
    body = lambda h, wi: (jnp.tanh(h @ wi), None)
    return lax.scan(body, x, w)[0]

  text = _hlo(fn, mesh, [P(), P(None, None, "d")], P(), (8, 512), (5, 512, 512))
  in_loop = [c for c in roofline.collectives(text, 4) if c.executions == 5]
  assert in_loop, "no collective found inside the scan's while loop"
  per_step = sum(c.bytes_per_chip for c in in_loop)
  assert roofline.collective_bytes(text, 4)["total"] >= 5 * per_step > 0


HLO = """\
HloModule m

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  %limit = s32[]{:T(128)} constant(7)
  ROOT %lt = pred[] compare(%i, %limit), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ag = f32[32]{0:T(128)} all-gather(%x), replica_groups=[2,4]<=[8], dimensions={0}
  %rs = bf16[4]{0} reduce-scatter(%x), replica_groups={{0,1},{2,3},{4,5},{6,7}}, dimensions={0}
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %x)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %ar = (f32[100]{0}, bf16[50]{0}) all-reduce(%a, %a), replica_groups={}, to_apply=%add
  %cp = (f32[16]{0}, f32[16]{0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%a), source_target_pairs={{0,1},{1,0},{2,2},{3,3}}
  %a2a = f32[64]{0} all-to-all(%a), replica_groups=mesh['x'=2,'y'=4] {'y'}, dimensions={0}
  %w = (s32[], f32[8]{0}) while(%t0), condition=%cond, body=%body
  ROOT %r = f32[8]{0} copy(%a)
}
"""


def test_handwritten_hlo_bytes_groups_and_trip_counts():
  by_op = {c.opcode: c for c in roofline.collectives(HLO, 8)}
  # all-reduce over all 8 devices of a (f32[100], bf16[50]) tuple: 2 * 500 B * 7/8.
  assert by_op["all-reduce"].group_size == 8
  assert by_op["all-reduce"].bytes_per_chip == pytest.approx(2 * 500 * 7 / 8)
  # Permute-start: (in, out, 2 scalars); 2 of 4 pairs send to another device.
  assert by_op["collective-permute"].bytes_per_chip == pytest.approx(64 * 2 / 4)
  # all-to-all over mesh axis 'y' of size 4: 256 B * 3/4.
  assert by_op["all-to-all"].group_size == 4
  assert by_op["all-to-all"].bytes_per_chip == pytest.approx(192)
  # Inside the while: 7 iterations; groups of 4 (iota) and of 2 (explicit).
  ag, rs = by_op["all-gather"], by_op["reduce-scatter"]
  assert (ag.executions, ag.group_size, ag.bytes_per_chip) == (7, 4, 128 * 3 / 4)
  assert (rs.executions, rs.group_size, rs.bytes_per_chip) == (7, 2, 8 * 1)
  assert roofline.collective_bytes(HLO, 8)["total"] == pytest.approx(
      875 + 32 + 192 + 7 * (96 + 8))


def test_estimate_is_compute_at_peak_plus_collectives_over_a_bidirectional_ring():
  out = roofline.estimate(model_flops=3e15, executed_flops=4e15, num_chips=64,
                          peak_flops=275e12, sent_bytes=9e9, chip="v4")
  compute_s = 4e15 / 64 / 275e12
  assert out["compute_s"] == pytest.approx(compute_s)
  assert out["collective_s"] == pytest.approx(9e9 / 9e10)
  assert out["step_time_s"] == pytest.approx(compute_s + 0.1)
  assert out["mfu"] == pytest.approx(3e15 / 64 / 275e12 / (compute_s + 0.1))
  with pytest.raises(ValueError, match=r"chip 'v3'.*known"):
    roofline.estimate(model_flops=1, executed_flops=1, num_chips=1, peak_flops=1,
                      sent_bytes=0, chip="v3")


def test_text_without_an_entry_computation_is_a_clear_error():
  with pytest.raises(ValueError, match="No ENTRY computation"):
    roofline.collectives("HloModule m\n", 8)
