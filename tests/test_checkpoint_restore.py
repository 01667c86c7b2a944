"""checkpoint.restore_params: one subtree, onto given shardings, past a broken newest checkpoint."""
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from vimjax import checkpoint
from vimjax import parallel
from vimjax.train.state import TrainState


def _state(seed: int) -> TrainState:
  rng = np.random.default_rng(seed)
  model = lambda: {"dense": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
                             "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}}
  return TrainState(step=jnp.asarray(seed, jnp.int32), params={"model": model()},
                    opt_state={"model": {"mu": model()}}, ema_params={"model": model()},
                    extra={"usage_ema": jnp.arange(5, dtype=jnp.float32) + seed})


def _save(workdir, states: dict[int, TrainState]) -> None:
  ckpt = checkpoint.Checkpointer(str(workdir), every_steps=1, keep=10, async_save=False)
  for step, state in states.items():
    ckpt.save(step, state, None, ml_collections.ConfigDict({"task": "vim"}))
  ckpt.close()


def _abstract_and_shardings(mesh):
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          _state(0).ema_params["model"])
  shardings = {"dense": {"kernel": NamedSharding(mesh, P("fsdp", "tensor")),
                         "bias": NamedSharding(mesh, P("tensor"))}}
  return abstract, shardings


@pytest.fixture
def mesh():
  return parallel.create_mesh(dict(data=1, fsdp=2, tensor=4))


def test_restores_only_the_subtree_onto_the_shardings(tmp_path, mesh):
  saved = {1: _state(1), 2: _state(2)}
  _save(tmp_path, saved)
  abstract, shardings = _abstract_and_shardings(mesh)
  params, step = checkpoint.restore_params(str(tmp_path), "ema_params/model", abstract, shardings)
  assert step == 2
  assert set(params) == {"dense"}  # Only the subtree: no opt_state, no raw params.
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(params["dense"][name], saved[2].ema_params["model"]["dense"][name])
    assert params["dense"][name].sharding == shardings["dense"][name]
  assert len(params["dense"]["kernel"].addressable_shards) == 8
  assert params["dense"]["kernel"].addressable_shards[0].data.shape == (4, 1)


def test_without_shardings_restores_host_numpy(tmp_path):
  _save(tmp_path, {3: _state(3)})
  usage, step = checkpoint.restore_params(str(tmp_path), "extra/usage_ema")
  assert step == 3 and isinstance(usage, np.ndarray)
  np.testing.assert_array_equal(usage, np.arange(5, dtype=np.float32) + 3)


def test_skips_a_broken_newest_checkpoint_without_moving_it(tmp_path, mesh, capsys):
  saved = {1: _state(1), 2: _state(2)}
  _save(tmp_path, saved)
  broken = tmp_path / "checkpoints" / "2" / "state" / "manifest.ocdbt"
  broken.unlink()
  abstract, shardings = _abstract_and_shardings(mesh)
  params, step = checkpoint.restore_params(str(tmp_path), "ema_params/model", abstract, shardings)
  assert step == 1
  np.testing.assert_array_equal(params["dense"]["kernel"],
                                saved[1].ema_params["model"]["dense"]["kernel"])
  assert "checkpoints/2 is broken" in capsys.readouterr().out
  assert (tmp_path / "checkpoints" / "2").is_dir()  # Read-only: skipped, never moved.
  assert not (tmp_path / "checkpoints_broken").exists()


def test_one_line_errors(tmp_path, mesh):
  with pytest.raises(ValueError, match=r"--tokenizer_workdir='.*missing' has no checkpoints/"):
    checkpoint.restore_params(str(tmp_path / "missing"), "params/model",
                              flag="--tokenizer_workdir")
  _save(tmp_path, {1: _state(1)})
  (tmp_path / "checkpoints" / "1" / "state" / "manifest.ocdbt").unlink()
  with pytest.raises(ValueError, match=r"no intact checkpoint under .*broken: 1 \(no state/"):
    checkpoint.restore_params(str(tmp_path), "params/model")


def test_a_changed_model_or_a_wrong_subtree_is_named(tmp_path, mesh):
  _save(tmp_path, {1: _state(1)})
  abstract, shardings = _abstract_and_shardings(mesh)
  abstract["dense"]["kernel"] = jax.ShapeDtypeStruct((8, 6), jnp.float32)
  with pytest.raises(ValueError, match=r"dense.kernel is float32\[8, 4\] there but "
                                       r"float32\[8, 6\] here"):
    checkpoint.restore_params(str(tmp_path), "params/model", abstract, shardings)
  with pytest.raises(ValueError, match=r"has no 'ema_params/generator'.*\['model'\]"):
    checkpoint.restore_params(str(tmp_path), "ema_params/generator")
