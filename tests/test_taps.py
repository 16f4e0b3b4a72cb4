"""Tests of the dense-layer taps (optax_layerwise._taps)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optax_layerwise as olw
from optax_layerwise import _taps


def _key():
  return jax.random.PRNGKey(np.random.SeedSequence().entropy % 2**31)


def _mlp_params(key, sizes=(4, 5, 3), bias=(True, False)):
  keys = jax.random.split(key, len(sizes))
  params = {}
  for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f"d{i}"] = {"kernel": jax.random.normal(keys[i], (m, n)) / m**0.5}
    if bias[i]:
      params[f"d{i}"]["bias"] = 0.1 * jax.random.normal(
          jax.random.fold_in(keys[i], 1), (n,))
  return params


@jax.jit
def _manual(params, x, t):
  """Inputs, pre-activations and per-example dL/dh by explicit perturbation:
  h_l + e_l with e_l of shape (n, d_out), dL/de_l = dL/dh_l per example."""

  def loss(e):
    a, inputs, pre = x, [], []
    for i, name in enumerate(("d0", "d1")):
      p = params[name]
      h = a @ p["kernel"] + p.get("bias", 0.0) + e[i]
      inputs.append(a)
      pre.append(h)
      a = jnp.tanh(h) if i == 0 else h
    return jnp.mean(jnp.sum((a - t) ** 2, -1)), (inputs, pre)

  zeros = [jnp.zeros(x.shape[:-1] + (5,)), jnp.zeros(x.shape[:-1] + (3,))]
  grads, (inputs, pre) = jax.grad(loss, has_aux=True)(zeros)
  return inputs, pre, grads


def _plain_loss(x, t):
  def loss(p):
    a = jnp.tanh(olw.dense(x, p["d0"]["kernel"], p["d0"]["bias"]))
    a = olw.dense(a, p["d1"]["kernel"])
    return jnp.mean(jnp.sum((a - t) ** 2, -1))
  return loss


def test_plain_dense_taps_match_manual_statistics():
  key = _key()
  params = _mlp_params(key)
  x = jax.random.normal(jax.random.fold_in(key, 7), (11, 4))
  t = jax.random.normal(jax.random.fold_in(key, 8), (11, 3))
  loss = _plain_loss(x, t)
  res = jax.jit(lambda p: olw.tap_dense_layers(loss, p))(params)
  inputs, pre, dh = _manual(params, x, t)
  leaves = jax.tree_util.tree_leaves(params)
  # Flatten order: d0/bias, d0/kernel, d1/kernel.
  assert sorted(res.layers) == [1, 2]
  assert {i: t.name for i, t in res.layers.items()} == {
      1: "['d0']['kernel']", 2: "['d1']['kernel']"}
  assert res.layers[1].bias_index == 0 and res.layers[2].bias_index is None
  assert res.num_untapped_calls == 0
  # float32 sums of ~10 O(1) terms: 1e-5 relative is a few ulps of margin.
  tol = dict(rtol=1e-5, atol=1e-6)
  for index, l in ((1, 0), (2, 1)):
    tap = res.layers[index]
    assert tap.num_rows == 11
    np.testing.assert_allclose(tap.input_mean, inputs[l].mean(0), **tol)
    np.testing.assert_allclose(tap.input_second_moment,
                               inputs[l].T @ inputs[l] / 11, **tol)
    np.testing.assert_allclose(tap.output_mean, pre[l].mean(0), **tol)
    # mean_i gh_i with gh_i = n dL/dh_i, i.e. sum_i dL/dh_i.
    np.testing.assert_allclose(tap.output_grad, dh[l].sum(0), **tol)
  np.testing.assert_allclose(res.layers[1].output_grad, res.grads["d0"]["bias"],
                             **tol)
  np.testing.assert_allclose(res.loss, loss(params), **tol)
  for a, b in zip(jax.tree_util.tree_leaves(res.grads),
                  jax.tree_util.tree_leaves(jax.grad(loss)(params))):
    np.testing.assert_allclose(a, b, **tol)
  assert len(leaves) == 3


def test_leading_dims_are_flattened_into_examples():
  key = _key()
  params = _mlp_params(key)
  x = jax.random.normal(jax.random.fold_in(key, 7), (3, 7, 4))  # (B, T, d)
  t = jax.random.normal(jax.random.fold_in(key, 8), (3, 7, 3))
  res = jax.jit(lambda p: olw.tap_dense_layers(_plain_loss(x, t), p))(params)
  inputs, pre, dh = _manual(params, x, t)
  tap = res.layers[1]
  assert tap.num_rows == 21
  rows = inputs[0].reshape(21, 4)
  np.testing.assert_allclose(tap.input_second_moment, rows.T @ rows / 21,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(tap.output_mean, pre[0].reshape(21, 5).mean(0),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(tap.output_grad, dh[0].reshape(21, 5).sum(0),
                             rtol=1e-5, atol=1e-6)


def test_calls_are_matched_by_identity_not_order_and_shared_layers_pool():
  key = _key()
  params = {"a": {"kernel": jax.random.normal(key, (3, 3)),
                  "bias": jnp.zeros(3)},
            "b": {"kernel": jax.random.normal(jax.random.fold_in(key, 1),
                                              (3, 2))}}
  x = jax.random.normal(jax.random.fold_in(key, 2), (6, 3))
  frozen = jax.random.normal(jax.random.fold_in(key, 3), (3, 3))

  def loss(p):
    h = olw.dense(x, frozen)  # not a params leaf: left untapped
    h = jnp.tanh(olw.dense(h, p["a"]["kernel"], p["a"]["bias"]))
    h = jnp.tanh(olw.dense(h, p["a"]["kernel"], p["a"]["bias"]))  # shared
    return jnp.sum(olw.dense(h, p["b"]["kernel"]) ** 2) / 6

  res = jax.jit(lambda p: olw.tap_dense_layers(loss, p))(params)
  assert res.num_untapped_calls == 1
  names = {i: t.name for i, t in res.layers.items()}
  assert sorted(names.values()) == ["['a']['kernel']", "['b']['kernel']"]
  a_index = [i for i, n in names.items() if n.startswith("['a']")][0]
  tap = res.layers[a_index]
  assert tap.num_rows == 12  # the two calls pool their rows
  # The summed pre-activation gradient of a layer used twice is the gradient
  # of its bias (which collects both uses).
  np.testing.assert_allclose(tap.output_grad, res.grads["a"]["bias"],
                             rtol=1e-5, atol=1e-6)
  h0 = olw.dense(x, frozen)
  h1 = jnp.tanh(h0 @ params["a"]["kernel"])
  both = jnp.concatenate([h0, h1])
  np.testing.assert_allclose(tap.input_mean, both.mean(0), rtol=1e-5,
                             atol=1e-6)


class _LinenNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm()(nn.Dense(5)(x))
    return nn.Dense(3, use_bias=False)(jnp.tanh(x))


def test_linen_dense_is_tapped_without_changing_the_model():
  key = _key()
  model = _LinenNet()
  x = jax.random.normal(key, (9, 4))
  params = model.init(jax.random.fold_in(key, 1), x)
  loss = lambda p: jnp.mean(model.apply(p, x) ** 2)
  res = jax.jit(lambda p: olw.tap_dense_layers(loss, p))(params)
  names = {i: t.name for i, t in res.layers.items()}
  assert sorted(names.values()) == ["['params']['Dense_0']['kernel']",
                                    "['params']['Dense_1']['kernel']"]
  # Compare with the intermediates linen itself records.
  _, inter = model.apply(params, x, capture_intermediates=True)
  inter = inter["intermediates"]
  for index, name in names.items():
    layer = name.split("'")[3]
    tap = res.layers[index]
    out = inter[layer]["__call__"][0]
    np.testing.assert_allclose(tap.output_mean, out.mean(0), rtol=1e-5,
                               atol=1e-6)
    assert (tap.bias_index is None) == (layer == "Dense_1")
  d0 = [i for i, n in names.items() if "Dense_0" in n][0]
  np.testing.assert_allclose(res.layers[d0].input_mean, x.mean(0), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(res.layers[d0].output_grad,
                             res.grads["params"]["Dense_0"]["bias"],
                             rtol=1e-5, atol=1e-6)


class _NNXNet(nnx.Module):

  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 5, rngs=rngs)
    self.norm = nnx.LayerNorm(5, rngs=rngs)
    self.l2 = nnx.Linear(5, 3, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.norm(self.l1(x))))


def test_nnx_linear_is_tapped_and_the_patch_is_removed():
  key = _key()
  net = _NNXNet(nnx.Rngs(int(key[1])))
  graphdef, params = nnx.split(net, nnx.Param)
  params = nnx.as_pure(params)  # what nnx.Optimizer.update hands over
  x = jax.random.normal(key, (8, 4))
  original = nnx.Linear.__call__
  loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(x) ** 2)
  res = jax.jit(lambda p: olw.tap_dense_layers(loss, p))(params)
  assert nnx.Linear.__call__ is original
  names = {i: t.name for i, t in res.layers.items()}
  assert sorted(names.values()) == ["['l1']['kernel']", "['l2']['kernel']"]
  l1 = [i for i, n in names.items() if "l1" in n][0]
  np.testing.assert_allclose(res.layers[l1].input_mean, x.mean(0), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(res.layers[l1].output_grad,
                             res.grads["l1"]["bias"], rtol=1e-5, atol=1e-6)

  def failing(p):
    nnx.merge(graphdef, p)(x)
    raise RuntimeError("boom")

  with pytest.raises(RuntimeError, match="boom"):
    olw.tap_dense_layers(failing, params)
  assert nnx.Linear.__call__ is original  # restored after an error too
  assert not _taps._CONTEXTS


def test_dense_outside_a_tap_is_the_affine_map():
  key = _key()
  x = jax.random.normal(key, (2, 3, 4))
  kernel = jax.random.normal(jax.random.fold_in(key, 1), (4, 5))
  bias = jax.random.normal(jax.random.fold_in(key, 2), (5,))
  np.testing.assert_allclose(olw.dense(x, kernel, bias), x @ kernel + bias,
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="kernel must be"):
    olw.dense(x, bias)


def test_bfloat16_params_give_float32_statistics():
  key = _key()
  params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16),
                                  _mlp_params(key))
  x = jax.random.normal(jax.random.fold_in(key, 7), (64, 4)).astype(
      jnp.bfloat16)
  t = jax.random.normal(jax.random.fold_in(key, 8), (64, 3)).astype(
      jnp.bfloat16)
  res = jax.jit(lambda p: olw.tap_dense_layers(_plain_loss(x, t), p))(params)
  f32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
  ref = jax.jit(lambda p: olw.tap_dense_layers(
      _plain_loss(x.astype(jnp.float32), t.astype(jnp.float32)), p))(f32)
  for index, tap in res.layers.items():
    assert tap.output_grad.dtype == jnp.float32
    assert tap.input_second_moment.dtype == jnp.float32
    # bf16 forward and backward (8 mantissa bits, 2^-9 = 0.2 % per rounding)
    # through two layers and a 64-example sum: over 40 fresh draws the
    # difference from the float32 reference was 0.3 % (median) to 1.7 % of
    # the gradient's scale, and one CI draw reached 5.0 %: the tail is heavy.
    # 10 % bounds it, while a wrong layer or a mixed-up statistic is off by
    # O(100 %).
    scale = np.abs(ref.layers[index].output_grad).max()
    np.testing.assert_allclose(tap.output_grad, ref.layers[index].output_grad,
                               atol=0.1 * scale)


def test_blockwise_gram_matches_the_full_product():
  rows = jax.random.normal(_key(), (50, 450))
  g = jax.jit(lambda r: _taps.gram(r, block=128))(rows)
  # float32 sums of 50 O(1) products.
  np.testing.assert_allclose(g, rows.T @ rows, rtol=1e-4, atol=1e-3)
  np.testing.assert_array_equal(g[:128, 128:], g[128:, :128].T)


def test_no_sampled_gradient_for_a_kernel_with_an_untapped_call():
  """A kernel called directly and inside jax.checkpoint (untapped there):
  a sampled gradient of the direct call alone would miss the other call's
  share, so the layer has none (K-BFGS then takes its params gradient)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
  params = {"w": jax.random.normal(jax.random.PRNGKey(1), (3, 3))}

  def loss(p):  # the checkpointed call closes over the params leaf
    inner = jax.checkpoint(lambda h: olw.dense(h, p["w"]))
    return jnp.sum(jnp.tanh(inner(olw.dense(x, p["w"]))) ** 2)

  direct = lambda p: jnp.sum(jnp.tanh(olw.dense(x, p["w"])) ** 2)
  assert olw.tap_dense_layers(direct, params, sampled_grads=1).layers[
      0].sampled_grad is not None
  tap = olw.tap_dense_layers(loss, params, sampled_grads=1).layers[0]
  assert tap.sampled_grad is None


@pytest.mark.parametrize("stride", [1, 3])
def test_output_gradient_second_moment_matches_per_example_gradients(stride):
  """``output_second_moment=s``: ``mean_i gh_i * gh_i`` (``gh_i = n dL/dh_i``)
  over every ``s``-th row of the (B, T) rows, against the per-example
  ``dL/dh`` of :func:`_manual` (explicit perturbations, ``jax.grad``)."""
  key = _key()
  params = _mlp_params(key)
  x = jax.random.normal(jax.random.fold_in(key, 7), (4, 5, 4))  # 20 rows
  t = jax.random.normal(jax.random.fold_in(key, 8), (4, 5, 3))
  res = jax.jit(lambda p: olw.tap_dense_layers(
      _plain_loss(x, t), p, output_second_moment=stride))(params)
  _, _, dh = _manual(params, x, t)
  for index, l, d in ((1, 0, 5), (2, 1, 3)):
    gh = 20 * np.asarray(dh[l]).reshape(20, d)[::stride]
    # float32 means of 7-20 squares: 1e-5 relative is a few ulps of margin.
    np.testing.assert_allclose(res.layers[index].output_grad_second_moment,
                               (gh * gh).mean(0), rtol=1e-5, atol=1e-9)
  assert olw.tap_dense_layers(_plain_loss(x, t), params).layers[
      1].output_grad_second_moment is None
