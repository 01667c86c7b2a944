"""Compile-time and memory levers from the config: scan, remat policy, bf16 compute.

Also the names Adafactor's factored moments get (what FSDP / TP split them by).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vimjax.configs import vim as vim_config
from vimjax import config_lib
from vimjax.models import layers
from vimjax.models import transformer
from vimjax.train import optimizers
from vimjax.tasks import vim

pytestmark = pytest.mark.slow

LAYERS = 3


def _model(**fields) -> transformer.VIM:
  config = vim_config.get_config("tiny")
  with config.unlocked():
    config.model.update(grid_size=4, codebook_size=32, emb_dim=32, mlp_dim=64, num_heads=4,
                        num_layers=LAYERS, num_classes=4, dropout_rate=0.0, **fields)
  return vim.build_model(config)


TOKENS = np.random.RandomState(0).randint(0, 32, (4, 16)).astype(np.int32)
LABELS = np.arange(4, dtype=np.int32)


def _loss_and_grads(model, params):
  def loss(p):
    logits = model.apply({"params": p}, TOKENS, LABELS, train=False)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), TOKENS[..., None], -1))
  return jax.jit(jax.value_and_grad(loss))(params)


def _init(model):
  return nn.unbox(model.init({"params": jax.random.key(0)}, TOKENS, LABELS,
                             train=False)["params"])


def test_remat_policies_give_identical_loss_and_grads():
  assert {"none", "full", "dots", "dots_with_no_batch_dims"} <= set(layers.REMAT_POLICIES)
  params = _init(_model(remat_policy="none", scan_layers=False))
  ref_loss, ref_grads = _loss_and_grads(_model(remat_policy="none", scan_layers=False), params)
  for policy in ("full", "dots"):
    loss, grads = _loss_and_grads(_model(remat_policy=policy, scan_layers=False), params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=policy)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=policy)


def test_scanned_stack_matches_unrolled_with_stacked_params():
  unrolled = _init(_model(scan_layers=False, remat_policy="none"))
  scanned = dict(unrolled)
  decoder = dict(unrolled["decoder"])
  blocks = [decoder.pop(f"layers_{i}") for i in range(LAYERS)]
  scanned["decoder"] = {**decoder, "layers": jax.tree.map(lambda *x: jnp.stack(x), *blocks)}
  # The stacked tree is exactly what a scanned model initialises (leading "layers" axis).
  fresh = _init(_model(scan_layers=True, remat_policy="dots"))
  assert (jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, scanned))
  ref_loss, ref_grads = _loss_and_grads(_model(scan_layers=False, remat_policy="none"), unrolled)
  loss, grads = _loss_and_grads(_model(scan_layers=True, remat_policy="dots"), scanned)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for i in range(LAYERS):
    for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[i], grads["decoder"]["layers"])),
                    jax.tree.leaves(ref_grads["decoder"][f"layers_{i}"])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_compute_keeps_params_norms_and_logits_float32():
  model = _model(dtype="bfloat16", scan_layers=True, remat_policy="dots")
  params = _init(model)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  logits, state = model.apply({"params": params}, TOKENS, LABELS, train=False,
                              capture_intermediates=True)
  inter = state["intermediates"]
  assert logits.dtype == jnp.float32
  assert inter["decoder_norm"]["__call__"][0].dtype == jnp.float32
  # Inside the blocks matmuls run in bf16 while LayerNorm statistics are float32.
  ref = _model(dtype="float32", scan_layers=True, remat_policy="dots").apply(
      {"params": params}, TOKENS, LABELS, train=False)
  np.testing.assert_allclose(logits, ref, atol=0.1)
  assert jnp.all(jnp.isfinite(logits))


@pytest.mark.parametrize("key,value,match", [
    ("model.remat_policy", "dots_only", r"model.remat_policy='dots_only'; valid: \('none', "
                                        r"'full', 'dots'"),
    ("model.dtype", "bf16", r"model.dtype='bf16'; valid: \('float32', 'bfloat16'"),
])
def test_bad_levers_fail_with_one_line(key, value, match):
  config = vim_config.get_config("tiny")
  with config.unlocked():
    section, name = key.split(".")
    config[section][name] = value
  with pytest.raises(ValueError, match=match):
    config_lib._validate_levers(config.model)  # pylint: disable=protected-access


def test_adafactor_factored_moments_get_the_names_of_the_dims_they_keep():
  params = {"wi": nn.Partitioned(jnp.zeros((256, 512)), ("embed", "mlp")),
            "query": nn.Partitioned(jnp.zeros((256, 4, 128)), ("embed", "heads", "kv")),
            "bias": nn.Partitioned(jnp.zeros((512,)), ("mlp",))}
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adafactor(1e-3, momentum=0.9, multiply_by_parameter_scale=False))
  specs = nn.get_partition_spec(optimizers.init_state(tx, params))
  factored = [s for s in jax.tree.leaves(specs, is_leaf=lambda x: hasattr(x, "v_row"))
              if hasattr(s, "v_row")][0]
  P = jax.sharding.PartitionSpec  # pylint: disable=invalid-name
  # v_row drops the largest dim, v_col the second largest (optax's rule).
  assert factored.v_row == {"wi": P("embed"), "query": P("heads", "kv"), "bias": P(None)}
  assert factored.v_col == {"wi": P("mlp"), "query": P("embed", "heads"), "bias": P(None)}
  assert factored.v == {"wi": P(None), "query": P(None), "bias": P("mlp")}
  # Momentum (and Adam's moments) keep the params' names.
  assert specs[1][3].ema["wi"] == P("embed", "mlp")
