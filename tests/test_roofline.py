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

pytestmark = pytest.mark.libtpu

P = jax.sharding.PartitionSpec


@pytest.fixture(scope="module")
def mesh():
  _, devices = aot_compile.topology_devices("v4:2x2x1")
  return jax.sharding.Mesh(np.array(devices), ("d",))


def _coords(mesh):
  return np.array([d.coords for d in mesh.devices.flat])


def _sent(text, num_devices=4):
  return roofline.collective_bytes(roofline.collectives(text, num_devices))


def _hlo(fn, mesh, in_specs, out_spec, *shapes):
  sharding = lambda spec: jax.sharding.NamedSharding(mesh, spec)
  lowered = jax.jit(fn, in_shardings=tuple(map(sharding, in_specs)),
                    out_shardings=sharding(out_spec)).lower(
                        *(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes))
  return lowered.compile().as_text()


def test_all_gather_sends_three_quarters_of_its_result(mesh):
  # [1024, 256] f32 sharded by rows, wanted whole: each chip sends its 1/4 to 3 others.
  text = _hlo(lambda x: x * 2, mesh, [P("d")], P(), (1024, 256))
  sent = _sent(text)
  assert sent["total"] == pytest.approx(1024 * 256 * 4 * 3 / 4)
  assert set(sent) == {"all-gather", "total"}
  # The 4 chips of a 2x2 slice: the gather runs on rings along both torus dims.
  (gather,) = roofline.collectives(text, 4, _coords(mesh))
  assert gather.group_size == 4 and gather.torus_dims == 2
  assert roofline.collective_seconds([gather], "v4") == pytest.approx(
      1024 * 256 * 3 / (2 * 4.5e10 * 2))


def test_a_group_along_one_mesh_axis_spans_one_torus_dim():
  _, devices = aot_compile.topology_devices("v4:2x2x1")
  mesh = jax.sharding.Mesh(np.array(devices).reshape(2, 2), ("a", "b"))
  text = _hlo(lambda x: x * 2, mesh, [P(None, "b")], P(), (256, 1024))
  (gather,) = roofline.collectives(text, 4, _coords(mesh))
  assert (gather.group_size, gather.torus_dims) == (2, 1)
  assert gather.bytes_per_chip == pytest.approx(256 * 1024 * 4 / 2)


def test_all_reduce_sends_twice_three_quarters_of_its_operand(mesh):
  # Row sums of a row-sharded [64, 2048] f32: each chip all-reduces a [2048] partial.
  text = _hlo(lambda x: x.sum(0), mesh, [P("d")], P(), (64, 2048))
  sent = _sent(text)
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
  assert _sent(text)["total"] >= 5 * per_step > 0


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
  assert _sent(HLO, 8)["total"] == pytest.approx(875 + 32 + 192 + 7 * (96 + 8))
  # Groups read back as device ids: iota [2,4]<=[8] -> 0..3, mesh 'y' -> 0..3.
  np.testing.assert_array_equal(roofline.replica_group(
      "replica_groups=[4,2]<=[2,4]T(1,0), x", 8), [0, 4])
  np.testing.assert_array_equal(roofline.replica_group(
      "replica_groups=mesh['x'=2,'y'=4] {'x'}, x", 8), [0, 4])
  # A mesh over devices in another order: [2,2]T(1,0) lists 0, 2, 1, 3.
  np.testing.assert_array_equal(roofline.replica_group(
      "replica_groups=mesh['a'=2,'b'=2], device_ids=([2,2]T(1,0)) {'b'}, x", 4), [0, 2])
  coords = np.array([[i % 2, i // 2 % 2, i // 4] for i in range(8)])  # 2x2x2.
  assert roofline.torus_dims(np.array([0, 4]), coords) == 1
  assert roofline.torus_dims(np.arange(8), coords) == 3


def test_estimate_is_compute_at_peak_plus_collectives_over_bidirectional_rings():
  colls = [roofline.Collective("all-gather", "main", 64, 3e9, 2, torus_dims=3),
           roofline.Collective("all-reduce", "main", 8, 1.8e9, 1, torus_dims=1)]
  out = roofline.estimate(model_flops=3e15, executed_flops=4e15, num_chips=64,
                          peak_flops=275e12, colls=colls, chip="v4")
  compute_s = 4e15 / 64 / 275e12
  collective_s = 6e9 / (2 * 4.5e10 * 3) + 1.8e9 / (2 * 4.5e10)
  assert out["compute_s"] == pytest.approx(compute_s)
  assert out["collective_s"] == pytest.approx(collective_s)
  assert out["collective_bytes_per_chip"] == pytest.approx(7.8e9)
  assert out["collective_bytes_by_kind"] == {"all-gather": 6e9, "all-reduce": 1.8e9}
  assert out["step_time_s"] == pytest.approx(compute_s + collective_s)
  assert out["mfu"] == pytest.approx(3e15 / 64 / 275e12 / (compute_s + collective_s))
  with pytest.raises(ValueError, match=r"chip 'v3'.*known"):
    roofline.estimate(model_flops=1, executed_flops=1, num_chips=1, peak_flops=1,
                      colls=colls, chip="v3")


def test_text_without_an_entry_computation_is_a_clear_error():
  with pytest.raises(ValueError, match="No ENTRY computation"):
    roofline.collectives("HloModule m\n", 8)
