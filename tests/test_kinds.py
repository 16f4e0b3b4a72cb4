"""Tests of K-BFGS's layer kinds: convolutions, DenseGeneral, boxed params.

References are independent of the kinds' code: input patches gathered by
plain indexing (no ``conv_general_dilated_patches``), and every model
re-written with :func:`optax_layerwise.dense` on reshaped kernels, whose
K-BFGS is itself checked against a NumPy re-implementation
(tests/test_kbfgs.py). A kind is right when K-BFGS on the model equals
K-BFGS on its dense rewrite, step by step.
"""

import itertools
import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_layerwise as olw


def _key():
  return jax.random.PRNGKey(np.random.SeedSequence().entropy % 2**31)


def _same_pads(size, window, stride, dilation):
  span = (window - 1) * dilation + 1
  out = -(-size // stride)
  total = max((out - 1) * stride + span - size, 0)
  return total // 2, total - total // 2


def _gather_patches(x, window, strides, padding, dilation):
  """``(n * positions, prod(window) * c_in)`` rows by explicit indexing, in
  the order of the flattened Flax kernel ``(*window, c_in)``."""
  rank = len(window)
  spatial = x.shape[1:1 + rank]
  if padding == "SAME":
    pads = [_same_pads(n, k, s, d)
            for n, k, s, d in zip(spatial, window, strides, dilation)]
  elif padding == "VALID":
    pads = [(0, 0)] * rank
  elif padding == "CIRCULAR":
    pads = [((k - 1) * d // 2, ((k - 1) * d + 1) // 2)
            for k, d in zip(window, dilation)]
  else:
    pads = list(padding)
  mode = "wrap" if padding == "CIRCULAR" else "constant"
  x = jnp.pad(x, [(0, 0)] + pads + [(0, 0)], mode=mode)
  outs = [(x.shape[1 + i] - (window[i] - 1) * dilation[i] - 1) // strides[i]
          + 1 for i in range(rank)]
  rows = []
  for pos in itertools.product(*[range(o) for o in outs]):
    taps = []
    for offs in itertools.product(*[range(k) for k in window]):
      index = tuple(p * s + o * d for p, s, o, d in
                    zip(pos, strides, offs, dilation))
      taps.append(x[(slice(None),) + index])  # (n, c_in)
    rows.append(jnp.stack(taps, axis=1).reshape(x.shape[0], -1))
  return jnp.stack(rows, axis=1).reshape(-1, rows[0].shape[-1]), outs


CONVS = [  # (input spatial, window, strides, padding, dilation)
    ((9,), (3,), (2,), "SAME", (1,)),
    ((7, 6), (3, 2), (1, 2), "VALID", (1, 1)),
    ((6, 6), (3, 3), (2, 1), "SAME", (1, 2)),
    ((5, 6), (3, 3), (1, 1), "CIRCULAR", (1, 1)),
    ((6, 5), (2, 3), (1, 1), ((1, 0), (2, 1)), (1, 1)),
    ((3, 4, 3), (2, 2, 3), (1, 2, 1), "SAME", (1, 1, 1)),
]


@pytest.mark.parametrize("spatial,window,strides,padding,dilation", CONVS)
def test_conv_tap_is_a_dense_layer_over_the_patches(spatial, window, strides,
                                                    padding, dilation):
  key = _key()
  c_in, c_out, n = 3, 4, 2
  x = jax.random.normal(key, (n,) + spatial + (c_in,))
  conv = nn.Conv(c_out, window, strides=strides, padding=padding,
                 kernel_dilation=dilation)
  params = conv.init(jax.random.fold_in(key, 1), x)["params"]
  params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # bias != 0
  weights = jax.random.normal(jax.random.fold_in(key, 2),
                              conv.apply({"params": params}, x).shape)
  loss = lambda p: jnp.sum(weights * conv.apply({"params": p}, x))
  res = jax.jit(lambda p: olw.tap_dense_layers(
      loss, p, kernels={1: c_out}))(params)  # leaves: bias 0, kernel 1
  rows, _ = _gather_patches(x, window, strides, padding, dilation)
  # The gathered patches are right: they reproduce the convolution.
  y = conv.apply({"params": params}, x)
  k = params["kernel"].reshape(-1, c_out)
  np.testing.assert_allclose(rows @ k + params["bias"], y.reshape(-1, c_out),
                             rtol=1e-4, atol=1e-4)
  tap = res.layers[1]
  assert tap.num_rows == rows.shape[0] and tap.bias_index == 0
  np.testing.assert_allclose(tap.input_mean, rows.mean(0), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(tap.input_second_moment,
                             rows.T @ rows / rows.shape[0], rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(tap.output_mean, y.reshape(-1, c_out).mean(0),
                             rtol=1e-4, atol=1e-5)
  # sum over rows of dL/dh is the bias gradient.
  np.testing.assert_allclose(tap.output_grad, jax.grad(loss)(params)["bias"],
                             rtol=1e-4, atol=1e-4)


# --- K-BFGS on a model equals K-BFGS on its dense rewrite -------------------


class _ConvNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), strides=2, padding="SAME")(x))
    x = jnp.tanh(nn.Conv(3, (2, 2), padding="VALID", use_bias=False)(x))
    return nn.Dense(2)(x.reshape(x.shape[0], -1))


def _conv_net_as_dense(p, x):
  """_ConvNet with gathered patches and 2-D kernels (olw.dense)."""
  rows, outs = _gather_patches(x, (3, 3), (2, 2), "SAME", (1, 1))
  h = nn.relu(olw.dense(rows, p["Conv_0"]["kernel"], p["Conv_0"]["bias"]))
  h = h.reshape((x.shape[0],) + tuple(outs) + (4,))
  rows, outs = _gather_patches(h, (2, 2), (1, 1), "VALID", (1, 1))
  h = jnp.tanh(olw.dense(rows, p["Conv_1"]["kernel"]))
  h = h.reshape(x.shape[0], -1)
  return olw.dense(h, p["Dense_0"]["kernel"], p["Dense_0"]["bias"])


class _Heads(nn.Module):
  """Attention-style projections: d -> (heads, head_dim) -> d_out."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.DenseGeneral((2, 3), axis=-1)(x))
    return nn.DenseGeneral(4, axis=(-2, -1), use_bias=False)(h)


def _heads_as_dense(p, x):
  h = jnp.tanh(olw.dense(x, p["DenseGeneral_0"]["kernel"],
                         p["DenseGeneral_0"]["bias"]))
  h = h.reshape(x.shape[:-1] + (6,))
  return olw.dense(h, p["DenseGeneral_1"]["kernel"])


class _Einsums(nn.Module):
  """Gemma-style projections: "btd,dhk->bthk" then "bthk,hkd->btd"."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Einsum((5, 2, 3), "btd,dhk->bthk")(x))
    return nn.Einsum((2, 3, 4), "bthk,hkd->btd", use_bias=False)(h)


def _einsums_as_dense(p, x):
  h = jnp.tanh(olw.dense(x, p["Einsum_0"]["kernel"], p["Einsum_0"]["bias"]))
  h = h.reshape(x.shape[:-1] + (6,))
  return olw.dense(h, p["Einsum_1"]["kernel"])


def _as_matrices(params):
  """Kernels reshaped to the (d_in, d_out) matrices their kind uses."""
  def matrix(path, leaf):
    name = jax.tree_util.keystr(path)
    if "kernel" not in name or leaf.ndim == 2:
      return leaf.reshape(-1) if "bias" in name else leaf
    split = 1 if "_0" in name and "Conv" not in name else leaf.ndim - 1
    return leaf.reshape(math.prod(leaf.shape[:split]), -1)
  return jax.tree_util.tree_map_with_path(matrix, params)


def _kbfgs_run(loss, params, batches, memory):
  tx = olw.kbfgs(memory_size=memory)

  @jax.jit
  def step(params, state, batch):
    value_fn = lambda p: loss(p, *batch)
    grads = jax.grad(value_fn)(params)
    updates, state = tx.update(grads, state, params, value_fn=value_fn)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for batch in batches:
    params, state = step(params, state, batch)
  return params, state


def _targets(key, model, params, x):
  out = model.apply({"params": params}, x)
  return jax.random.normal(key, out.shape)


@pytest.mark.parametrize("model,as_dense,shape,memory", [
    (_ConvNet(), _conv_net_as_dense, (5, 6, 6, 2), None),
    (_Heads(), _heads_as_dense, (3, 4, 5), 3),
    (_Einsums(), _einsums_as_dense, (3, 4, 5), None),
], ids=["conv-kbfgs", "dense_general-kbfgs_l", "einsum-kbfgs"])
def test_kbfgs_on_a_model_equals_kbfgs_on_its_dense_rewrite(
    x64, model, as_dense, shape, memory):
  del x64
  key = _key()
  xs = [jax.random.normal(jax.random.fold_in(key, i), shape)
        for i in range(4)]
  params = jax.tree_util.tree_map(
      lambda p: p.astype(jnp.float64),
      model.init(jax.random.fold_in(key, 9), xs[0])["params"])
  ts = [_targets(jax.random.fold_in(key, 20 + i), model, params, x)
        for i, x in enumerate(xs)]
  batches = list(zip(xs, ts))
  sq = lambda out, t: jnp.mean(jnp.sum((out - t) ** 2, -1))
  got, state = _kbfgs_run(
      lambda p, x, t: sq(model.apply({"params": p}, x), t), params, batches,
      memory)
  want, ref = _kbfgs_run(lambda p, x, t: sq(as_dense(p, x), t),
                         _as_matrices(params), batches, memory)
  assert all(jax.tree_util.tree_leaves(state.preconditioned))
  tol = dict(rtol=1e-8, atol=1e-10)
  for a, b in zip(jax.tree_util.tree_leaves(_as_matrices(got)),
                  jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, **tol)
  for a, b in zip(jax.tree_util.tree_leaves(state.layers),
                  jax.tree_util.tree_leaves(ref.layers)):
    np.testing.assert_allclose(a, b, **tol)
  np.testing.assert_allclose(state.step_sizes, ref.step_sizes, **tol)
  assert int(state.count) == len(batches)


# --- NNX, boxed params, fallbacks -------------------------------------------


class _NNXNet(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 3, (3, 3), strides=2, rngs=rngs)
    self.heads = nnx.LinearGeneral(3, (2, 2), rngs=rngs)
    self.out = nnx.LinearGeneral((2, 2), 1, axis=(-2, -1), rngs=rngs)

  def __call__(self, x):
    h = nn.relu(self.conv(x)).mean(axis=(1, 2))
    return self.out(jnp.tanh(self.heads(h)))


def test_nnx_conv_and_linear_general_are_preconditioned():
  key = _key()
  model = _NNXNet(nnx.Rngs(int(key[1])))
  graphdef, params = nnx.split(model, nnx.Param)
  x = jax.random.normal(key, (6, 5, 5, 2))
  t = jax.random.normal(jax.random.fold_in(key, 1), (6, 1))
  loss = lambda p: jnp.mean((nnx.merge(graphdef, p)(x) - t) ** 2)
  tx = olw.kbfgs()
  state = tx.init(params)
  assert olw.kbfgs_layer_names(params) == ("['conv']", "['heads']", "['out']")
  # H_a sizes: 3*3*2 + 1 patches, 3 + 1, 4 (no bias... out has one): +1.
  assert [ls.h_a.shape[-1] for ls in state.layers] == [19, 4, 5]
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p,
                                        value_fn=loss))
  losses = []
  for _ in range(5):
    losses.append(float(loss(params)))
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  assert all(bool(f) for f in jax.tree_util.tree_leaves(state.preconditioned))
  assert np.isfinite(float(loss(params))) and float(loss(params)) < losses[0]


def test_logically_partitioned_params_are_preconditioned():
  class Net(nn.Module):

    @nn.compact
    def __call__(self, x):
      init = nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                          ("embed", "mlp"))
      h = jnp.tanh(nn.Dense(8, kernel_init=init)(x))
      return nn.Dense(1, kernel_init=nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), ("mlp", "embed")))(h)

  key = _key()
  x = jax.random.normal(key, (16, 4))
  params = Net().init(key, x)["params"]
  assert isinstance(params["Dense_0"]["kernel"], nn.LogicallyPartitioned)
  loss = lambda p: jnp.mean(Net().apply({"params": p}, x) ** 2)
  tx = olw.kbfgs()
  state = tx.init(params)
  updates, state = jax.jit(lambda p, s: tx.update(
      jax.grad(loss)(p), s, p, value_fn=loss))(params, state)
  assert olw.kbfgs_layer_names(params) == ("['Dense_0']", "['Dense_1']")
  assert all(bool(f) for f in jax.tree_util.tree_leaves(state.preconditioned))
  assert isinstance(updates["Dense_0"]["kernel"], nn.LogicallyPartitioned)


@pytest.mark.parametrize("equation,reason", [
    ("bthd,hdk->bthk", "one kernel per head"),
    ("btd,kd->btk", "not ordered"),
    ("btd,dk->bk", "summed out"),
    ("...d,dk->...k", "ellipsis"),
])
def test_einsums_that_are_not_dense_layers_say_why(equation, reason):
  from optax_layerwise import _kind_einsum  # pylint: disable=g-import-not-at-top
  assert reason in _kind_einsum.contraction(equation)


def test_grouped_convolution_takes_the_fallback_with_its_reason():
  class Net(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (3, 3), feature_group_count=2)(x)
      return nn.Dense(1)(x.mean(axis=(1, 2)))

  key = _key()
  x = jax.random.normal(key, (4, 5, 5, 2))
  params = Net().init(key, x)["params"]
  loss = lambda p: jnp.mean(Net().apply({"params": p}, x) ** 2)
  tx = olw.kbfgs()
  state = tx.init(params)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    _, state = tx.update(jax.grad(loss)(params), state, params, value_fn=loss)
  assert any("grouped or depthwise" in str(w.message) for w in caught)
  assert not bool(state.preconditioned["Conv_0"]["kernel"])
  assert bool(state.preconditioned["Dense_0"]["kernel"])


class _PlainScan(nn.Module):
  """A dense map applied by a plain ``jax.lax.scan`` over time (no Flax
  scope inside the scan: its statistics cannot be routed out)."""

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (5, 5))
    step = lambda _, x_t: (None, olw.dense(x_t, kernel))
    return jnp.moveaxis(jax.lax.scan(step, None, jnp.moveaxis(x, 1, 0))[1],
                        0, 1)


class _Mixed(nn.Module):
  """One of each: conv, grouped conv, norm, a cell scanned by nn.RNN, a
  plain lax.scan, dense."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3,), name="conv")(x))
    h = nn.Conv(4, (3,), feature_group_count=2, name="grouped")(h)
    h = nn.LayerNorm(name="norm")(h)
    h = _PlainScan(name="plain_scan")(nn.RNN(nn.SimpleCell(5))(h))
    return nn.Dense(1, name="out")(h[:, -1])


def test_coverage_names_each_leafs_kind_or_reason_and_matches_kbfgs():
  key = _key()
  x = jax.random.normal(key, (3, 6, 2))
  params = _Mixed().init(key, x)["params"]
  loss = lambda p: jnp.mean(_Mixed().apply({"params": p}, x) ** 2)
  report = olw.kbfgs_coverage(loss, params)
  by_path = {leaf.path: leaf for leaf in report.leaves}
  assert by_path["['conv']['kernel']"].kind == "conv"
  assert by_path["['out']['kernel']"].kind == "dense"
  assert "grouped" in by_path["['grouped']['kernel']"].reason
  assert by_path["['norm']['scale']"].kind is None
  rnn = [leaf for path, leaf in by_path.items() if "SimpleCell" in path]
  assert rnn and all(leaf.kind == "dense" for leaf in rnn)  # via shadows
  plain = by_path["['plain_scan']['kernel']"]
  assert plain.kind is None and "jax.lax.scan" in plain.reason
  sizes = {leaf.path: math.prod(leaf.shape) for leaf in report.leaves}
  kept = sum(sizes[p] for p, leaf in by_path.items() if leaf.kind)
  assert report.fraction == pytest.approx(kept / sum(sizes.values()))
  assert "conv" in str(report) and "fallback" in str(report)
  # K-BFGS preconditions exactly these leaves, and the scanned calls do
  # not leak a tracer out of the scans.
  tx = olw.kbfgs()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    _, state = jax.jit(lambda p, s: tx.update(
        jax.grad(loss)(p), s, p, value_fn=loss))(params, tx.init(params))
  flags = jax.tree_util.tree_flatten_with_path(state.preconditioned)[0]
  for path, flag in flags:
    path = jax.tree_util.keystr(path)
    assert bool(flag) == (by_path[path].kind is not None), path


@pytest.mark.parametrize("axis", [(-1, -2), (-2, -1)])
def test_dense_general_rows_follow_the_kernel_whatever_the_axis_order(axis):
  """Flax sorts DenseGeneral's contracted axes before it shapes the kernel:
  the tapped rows must too, or A and the sampled gradient pair the wrong
  inputs with the kernel's entries. Checked against jax.grad: the sampled
  gradient from every row equals the kernel's gradient."""
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 2))
  model = nn.DenseGeneral(5, axis=axis)
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  loss = lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, x)))
  kernel = jax.tree_util.tree_leaves(params)[1]  # leaves: bias, kernel
  tap = olw.tap_dense_layers(loss, params, kernels={1: 5},
                             sampled_grads=1).layers[1]
  rows = np.asarray(x).reshape(4, 6)  # axes (1, 2) in order: kernel order
  np.testing.assert_allclose(tap.input_second_moment, rows.T @ rows / 4,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      tap.sampled_grad[0].reshape(kernel.shape),
      jax.grad(loss)(params)["kernel"], rtol=1e-5, atol=1e-6)
