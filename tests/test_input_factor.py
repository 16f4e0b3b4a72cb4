"""precondition_by_inputs and the aliases' precondition="inputs".

References: the input factor recomputed in NumPy from the activations of
the network written out by hand (float64), and the per-layer step from
`jax.hessian` of the flattened loss.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import optax_layerwise as olw
from tests import tiny
from tests.kbfgs_reference import block_mask
from tests.kbfgs_reference import block_slices


def _fresh_key():
  return jax.random.PRNGKey(np.random.SeedSequence().entropy % (2**31))


def _numpy_factors(params, x):
  """``[mean_i abar_i abar_i^T]`` per layer of tiny's tanh network."""
  h, factors = np.asarray(x, np.float64), []
  for i in range(len(params)):
    abar = np.concatenate([h, np.ones((h.shape[0], 1))], axis=1)
    factors.append(abar.T @ abar / h.shape[0])
    layer = params[f"l{i}"]
    h = h @ np.asarray(layer["w"]) + np.asarray(layer["b"])
    if i < len(params) - 1:
      h = np.tanh(h)
  return factors


def _numpy_precondition(grads, inverses):
  out = {}
  for i, h_a in enumerate(inverses):
    g = grads[f"l{i}"]
    m = np.concatenate([np.asarray(g["w"]), np.asarray(g["b"])[None]], 0)
    pm = h_a @ m
    out[f"l{i}"] = {"w": pm[:-1], "b": pm[-1]}
  return out


@pytest.mark.parametrize("block_size", [None, 2])
def test_matches_numpy_reference_over_refreshes(x64, block_size):
  """Four SGD steps, refreshed on steps 0 and 2 (``A`` = the batch's, then
  the moving average), every output against NumPy's ``H_a [g_W; g_b]``;
  with ``block_size=2``, ``H_a`` the inverse of ``A``'s block-diagonal part
  (tiny's layers have ``k`` = 4 and 5: two blocks, and three with a padded
  last one)."""
  key = _fresh_key()
  params = tiny.init_params(key, jnp.float64)
  xs, ts = tiny.batches(jax.random.fold_in(key, 1), 4)
  damping, decay = 0.2, 0.7
  tx = olw.precondition_by_inputs(damping=damping, stat_decay=decay,
                                  update_interval=2, block_size=block_size)
  state = tx.init(params)
  update = jax.jit(lambda g, s, p, x, t: tx.update(
      g, s, p, value_fn=lambda q: tiny.loss(q, x, t)))
  ref_params = jax.tree_util.tree_map(np.asarray, params)
  ref_a = None
  for step in range(4):
    x, t = xs[step], ts[step]
    grads = jax.grad(tiny.loss)(params, x, t)
    out, state = update(grads, state, params, x, t)
    if step % 2 == 0:
      batch = _numpy_factors(ref_params, x)
      ref_a = batch if ref_a is None else [
          decay * a + (1 - decay) * b for a, b in zip(ref_a, batch)]
      inverses = [np.linalg.inv(a * block_mask(len(a), block_size)
                                + np.sqrt(damping) * np.eye(len(a)))
                  for a in ref_a]
    ref_grads = jax.grad(tiny.loss)(jax.tree_util.tree_map(
        jnp.asarray, ref_params), x, t)
    ref_out = _numpy_precondition(ref_grads, inverses)
    for i in range(len(params)):
      for leaf in ("w", "b"):
        np.testing.assert_allclose(out[f"l{i}"][leaf],
                                   ref_out[f"l{i}"][leaf], rtol=1e-9,
                                   atol=1e-12)
    for blocks, r in zip(state.factors, ref_a):
      ranges = block_slices(len(r), block_size)
      assert blocks.shape[0] == len(ranges)
      for block, sl in zip(blocks, ranges):
        size = sl.stop - sl.start
        np.testing.assert_allclose(block[:size, :size], r[sl, sl],
                                   rtol=1e-12, atol=1e-14)
    params = optax.apply_updates(params, jax.tree_util.tree_map(
        lambda u: -0.1 * u, out))
    ref_params = jax.tree_util.tree_map(
        lambda p, u: p - 0.1 * np.asarray(u), ref_params, ref_out)


def test_leaves_outside_layers_pass_and_state_is_fixed_under_scan():
  """A leaf no layer uses (a free scale) comes out unchanged; the state
  keeps its shapes and dtypes, so ``lax.scan`` runs the transform and
  matches a Python loop."""
  key = _fresh_key()
  params = dict(tiny.init_params(key), gain={"scale": jnp.ones(2)})
  xs, ts = tiny.batches(jax.random.fold_in(key, 1), 3)

  def loss(p, x, t):
    core = {k: v for k, v in p.items() if k != "gain"}
    return tiny.loss(core, x, t) * jnp.mean(p["gain"]["scale"])

  tx = olw.precondition_by_inputs(update_interval=2)

  def step(state, batch):
    x, t = batch
    g = jax.grad(loss)(params, x, t)
    out, state = tx.update(g, state, params,
                           value_fn=lambda q: loss(q, x, t))
    return state, (out, g)

  state0 = tx.init(params)
  final, (outs, grads) = jax.lax.scan(step, state0, (xs, ts))
  np.testing.assert_array_equal(outs["gain"]["scale"],
                                grads["gain"]["scale"])
  assert not np.allclose(outs["l0"]["w"], grads["l0"]["w"])
  assert (jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), final)
          == jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), state0))
  state = state0
  for i in range(3):
    state, (out, _) = jax.jit(step)(state, (xs[i], ts[i]))
  np.testing.assert_allclose(out["l1"]["w"], outs["l1"]["w"][-1],
                             rtol=1e-5, atol=1e-6)
  assert int(final.count) == 3


def test_non_finite_statistics_keep_the_factors_and_count():
  key = _fresh_key()
  params = tiny.init_params(key)
  xs, ts = tiny.batches(jax.random.fold_in(key, 1), 2)
  tx = olw.precondition_by_inputs(update_interval=1)
  state = tx.init(params)
  grads = jax.grad(tiny.loss)(params, xs[0], ts[0])
  _, state = tx.update(grads, state, params,
                       value_fn=lambda p: tiny.loss(p, xs[0], ts[0]))
  bad_x = xs[1].at[0, 0].set(jnp.nan)
  out, new = tx.update(grads, state, params,
                       value_fn=lambda p: tiny.loss(p, bad_x, ts[1]))
  assert int(new.num_skipped_refreshes) == 1
  for old, kept in zip(state.inverses, new.inverses):
    np.testing.assert_array_equal(old, kept)
  assert tiny.tree_finite(out)


def test_bfloat16_params_keep_float32_factors():
  key = _fresh_key()
  params = tiny.init_params(key, jnp.bfloat16)
  xs, ts = tiny.batches(jax.random.fold_in(key, 1), 1)
  tx = olw.precondition_by_inputs()
  state = tx.init(params)
  grads = jax.grad(tiny.loss)(params, xs[0], ts[0])
  out, state = tx.update(grads, state, params,
                         value_fn=lambda p: tiny.loss(p, xs[0], ts[0]))
  assert all(a.dtype == jnp.float32 for a in state.factors)
  assert out["l0"]["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize("kwargs, words", [
    (dict(stat_decay=1.5), "stat_decay"),
    (dict(damping=-1.0), "damping"),
    (dict(damping=0.0), "damping must be > 0"),
    (dict(update_interval=0), "update_interval"),
    (dict(block_size=0), "block_size"),
    (dict(block_size=2.5), "block_size"),
    (dict(block_size=True), "block_size"),
])
def test_bad_arguments_are_named(kwargs, words):
  with pytest.raises(ValueError, match=words):
    olw.precondition_by_inputs(**kwargs)


def test_a_loss_without_tappable_layers_is_an_error():
  """``x @ W + b`` written by hand: nothing to precondition, said so
  (rather than returning the updates unchanged)."""
  params = tiny.init_params(jax.random.PRNGKey(0))
  x = jnp.ones((4, 3))
  loss = lambda p: jnp.sum(x @ p["l0"]["w"] + p["l0"]["b"])  # noqa: E731
  tx = olw.precondition_by_inputs()
  with pytest.raises(ValueError, match="found no layer to precondition"):
    tx.update(jax.grad(loss)(params), tx.init(params), params, value_fn=loss)


def test_missing_value_fn_is_named():
  params = tiny.init_params(jax.random.PRNGKey(0))
  tx = olw.precondition_by_inputs()
  with pytest.raises(ValueError, match="value_fn"):
    tx.update(params, tx.init(params), params)


def test_aliases_reject_an_unknown_preconditioner():
  with pytest.raises(ValueError, match="precondition must be one of"):
    olw.layerwise_adamw(precondition="input")


def test_alias_step_is_b_over_q_along_the_preconditioned_gradient(x64):
  """``layerwise_sgd(precondition="inputs")`` without momentum or bounds:
  layer ``l`` moves by ``-alpha_l H_a g_l`` with ``alpha_l = <g, d>_l /
  d_l^T H_ll d_l``, ``H_a`` from NumPy and ``H`` from ``jax.hessian``
  (a layer whose tanh block has ``q_l <= 0`` is rejected: no move)."""
  key = _fresh_key()
  params = tiny.init_params(key, jnp.float64)
  xs, ts = tiny.batches(jax.random.fold_in(key, 1), 1)
  loss = lambda p: tiny.loss(p, xs[0], ts[0])  # noqa: E731
  tx = olw.layerwise_sgd(precondition="inputs", momentum=0.0, ema=0.0,
                         max_relative_change=None, max_step=1e6,
                         update_interval=1)
  grads = jax.grad(loss)(params)
  out, _ = tx.update(grads, tx.init(params), params, value_fn=loss)
  inverses = [np.linalg.inv(a + np.sqrt(0.3) * np.eye(len(a)))
              for a in _numpy_factors(params, xs[0])]
  d = _numpy_precondition(grads, inverses)
  flat, unravel = ravel_pytree(params)
  hessian = jax.hessian(lambda f: loss(unravel(f)))(flat)
  accepted = []
  for i in range(len(params)):
    masked = {k: jax.tree_util.tree_map(
        lambda x, keep=(k == f"l{i}"): x if keep else 0 * x, v)
              for k, v in d.items()}
    d_l = ravel_pytree(jax.tree_util.tree_map(jnp.asarray, masked))[0]
    b = float(d_l @ ravel_pytree(grads)[0])
    q = float(d_l @ hessian @ d_l)
    accepted.append(q > 0)
    for leaf in ("w", "b"):
      np.testing.assert_allclose(out[f"l{i}"][leaf],
                                 -(b / q) * d[f"l{i}"][leaf] * (q > 0),
                                 rtol=1e-8, atol=1e-12)
  assert any(accepted)



def test_a_skipped_step_keeps_the_factors_and_the_next_step_refreshes():
  """A non-finite gradient on a refresh step: the alias skips the step, the
  factors (which the skip neither checks nor restores) stay as they were,
  and the refresh happens on the next, finite step, from that batch."""
  key = _fresh_key()
  params = tiny.init_params(key)
  xs, ts = tiny.batches(jax.random.fold_in(key, 1), 1)
  loss = lambda p: tiny.loss(p, xs[0], ts[0])  # noqa: E731
  tx = olw.layerwise_sgd(precondition="inputs")
  state = tx.init(params)
  grads = jax.grad(loss)(params)
  bad = jax.tree_util.tree_map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan),
                               grads)
  step = jax.jit(lambda g, s: tx.update(g, s, params, value_fn=loss))
  out, skipped = step(bad, state)
  pre = lambda s: s[0].direction_state[0]  # noqa: E731
  assert int(skipped[0].num_skipped) == 1 and int(pre(skipped).count) == 0
  assert all(float(jnp.max(jnp.abs(u))) == 0.0
             for u in jax.tree_util.tree_leaves(out))
  for kept, init in zip(pre(skipped).factors + pre(skipped).inverses,
                        pre(state).factors + pre(state).inverses):
    np.testing.assert_array_equal(kept, init)
  _, after = step(grads, skipped)
  # float32 factors from the batch's activations, against float64 NumPy.
  for a, want in zip(pre(after).factors, _numpy_factors(params, xs[0])):
    np.testing.assert_allclose(a[0], want, rtol=1e-5, atol=1e-5)
  assert int(pre(after).count) == 1
  assert int(pre(after).num_skipped_refreshes) == 0


def _gained_problem(key, dtype=jnp.float32):
  """tiny's network with an elementwise gain on the hidden units: the two
  dense layers are tapped, the gain (a leaf of its own layer) is not. The
  loss is quadratic in the gain and in the output layer, so their diagonal
  blocks are positive semi-definite."""
  params = tiny.init_params(key, dtype)
  params["gain"] = {"g": (1.0 + 0.3 * jax.random.normal(
      jax.random.fold_in(key, 7), (tiny.SIZES[1],))).astype(dtype)}
  xs, ts = tiny.batches(jax.random.fold_in(key, 1), 1)
  x, t = xs[0].astype(dtype), ts[0].astype(dtype)

  def loss(p):
    h = jnp.tanh(olw.dense(x, p["l0"]["w"], p["l0"]["b"])) * p["gain"]["g"]
    err = olw.dense(h, p["l1"]["w"], p["l1"]["b"]) - t
    return 0.5 * jnp.mean(jnp.sum(err ** 2, axis=-1))

  def inputs(p):  # each dense layer's inputs, in float64
    x64 = np.asarray(x, np.float64)
    h = np.tanh(x64 @ np.asarray(p["l0"]["w"], np.float64)
                + np.asarray(p["l0"]["b"])) * np.asarray(p["gain"]["g"])
    return [x64, h]

  return params, loss, inputs


def test_auto_preconditions_the_tapped_layers_only(x64):
  """The aliases' default ``precondition="auto"`` without momentum or
  bounds: each dense layer moves by ``-alpha_l H_a g_l`` (``H_a`` from
  NumPy), the untapped gain by ``-alpha_l g_l``, ``alpha_l = <g, d>_l /
  d_l^T H_ll d_l`` from ``jax.hessian`` (a rejected ``q_l <= 0`` of the
  tanh layer: no move; the other two blocks are semi-definite)."""
  seed = np.random.SeedSequence().entropy % (2**31)
  print("seed", seed)
  key = jax.random.PRNGKey(seed)
  params, loss, inputs = _gained_problem(key, jnp.float64)
  tx = olw.layerwise_sgd(momentum=0.0, ema=0.0, max_relative_change=None,
                         max_step=1e6, update_interval=1)
  grads = jax.grad(loss)(params)
  out, _ = tx.update(grads, tx.init(params), params, value_fn=loss)
  d = {"gain": {"g": np.asarray(grads["gain"]["g"])}}
  for i, a in enumerate(inputs(params)):
    abar = np.concatenate([a, np.ones((len(a), 1))], axis=1)
    h_a = np.linalg.inv(abar.T @ abar / len(a) + np.sqrt(0.3) * np.eye(
        abar.shape[1]))
    g = grads[f"l{i}"]
    pm = h_a @ np.concatenate([np.asarray(g["w"]), np.asarray(g["b"])[None]])
    d[f"l{i}"] = {"w": pm[:-1], "b": pm[-1]}
  flat, unravel = ravel_pytree(params)
  hessian = jax.hessian(lambda f: loss(unravel(f)))(flat)
  moved = []
  for name in ("l0", "l1", "gain"):
    only = {k: jax.tree_util.tree_map(
        lambda v, keep=(k == name): jnp.asarray(v) * keep, d[k]) for k in d}
    d_l = ravel_pytree(only)[0]
    b = float(d_l @ ravel_pytree(grads)[0])
    q = float(d_l @ hessian @ d_l)
    moved.append(q > 0)
    for leaf, want in d[name].items():
      np.testing.assert_allclose(out[name][leaf], -(b / q) * want * (q > 0),
                                 rtol=1e-8, atol=1e-12)
  assert moved[1] and moved[2], seed


def _relative_moves(out, params, groups) -> dict:
  """``||update_G|| / ||theta_G||`` per group ``G`` of top-level keys."""
  def norm(tree, keys):
    return np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for k in keys
                       for v in jax.tree_util.tree_leaves(tree[k])))
  return {g: norm(out, keys) / norm(params, keys) for g, keys in groups}


@pytest.mark.parametrize("precondition", ["auto", "inputs"])
def test_the_bound_follows_whether_a_layer_is_preconditioned(precondition):
  """``max_relative_change="auto"`` with the input factor: with every
  measurement rejected (``curvature_floor`` huge) the fallback step
  ``initial_step`` is clipped to the bound, so each layer moves by exactly
  0.02 of its norm where ``H_a`` preconditions it and 0.01 elsewhere; a
  layer group only partly preconditioned (the gain with ``l0``) gets 0.01."""
  params, loss, _ = _gained_problem(_fresh_key())
  grads = jax.grad(loss)(params)
  for layers, groups, want in (
      (None, [("l0", ["l0"]), ("l1", ["l1"]), ("gain", ["gain"])],
       {"l0": 0.02, "l1": 0.02, "gain": 0.01}),
      (lambda path, leaf: path[0].key == "l1",
       [("l1", ["l1"]), ("rest", ["l0", "gain"])],
       {"l1": 0.02, "rest": 0.01})):
    tx = olw.layerwise_adamw(precondition=precondition, layers=layers,
                             curvature_floor=1e30, initial_step=1e6,
                             max_step=1e6)
    out, state = jax.jit(lambda g, tx=tx: tx.update(
        g, tx.init(params), params, value_fn=loss))(grads)
    assert int(state[0].num_fallbacks.sum()) == len(groups)
    # float32 norms of a few dozen entries: 1e-5 relative.
    moves = _relative_moves(out, params, groups)
    for group, bound in want.items():
      np.testing.assert_allclose(moves[group], bound, rtol=1e-5,
                                 err_msg=group)


def test_auto_skips_a_model_the_tap_cannot_read():
  """One kernel called with two different biases cannot be tapped:
  ``precondition="inputs"`` raises the library's error, ``"auto"`` warns
  and takes the same steps as ``precondition=None``."""
  key = _fresh_key()
  params = {"w": {"kernel": jax.random.normal(key, (3, 3)) / 2},
            "b1": {"bias": jnp.zeros(3)}, "b2": {"bias": jnp.ones(3) / 4}}
  x = jax.random.normal(jax.random.fold_in(key, 1), (8, 3))

  def loss(p):
    h = jnp.tanh(olw.dense(x, p["w"]["kernel"], p["b1"]["bias"]))
    return jnp.mean((olw.dense(h, p["w"]["kernel"], p["b2"]["bias"]) - 1) ** 2)

  def update(**kwargs):
    tx = olw.layerwise_sgd(**kwargs)
    return tx.update(jax.grad(loss)(params), tx.init(params), params,
                     value_fn=loss)[0]

  with pytest.raises(ValueError, match="different biases"):
    update(precondition="inputs")
  with pytest.warns(UserWarning, match="preconditions no layer.*different"):
    auto = update()
  jax.tree_util.tree_map(np.testing.assert_array_equal, auto,
                         update(precondition=None))
  assert any(float(jnp.abs(u).max()) > 0
             for u in jax.tree_util.tree_leaves(auto))


def test_auto_passes_a_model_without_tapped_layers_through():
  """Plain ``x @ w`` layers are not tapped: ``precondition="inputs"``
  raises this library's error, the default ``"auto"`` takes the paper's
  direction, bound 0.01 (the same steps as ``precondition=None``)."""
  key = _fresh_key()
  params = tiny.init_params(key)
  xs, ts = tiny.batches(jax.random.fold_in(key, 1), 3)

  def loss_on(x, t):
    def loss(p):
      h = jnp.tanh(x @ p["l0"]["w"] + p["l0"]["b"])
      return jnp.mean((h @ p["l1"]["w"] + p["l1"]["b"] - t) ** 2)
    return loss

  def run(**kwargs):
    tx = olw.layerwise_adamw(**kwargs)
    p, state, moves = params, tx.init(params), []
    for x, t in zip(xs, ts):
      loss = loss_on(x, t)
      u, state = tx.update(jax.grad(loss)(p), state, p, value_fn=loss)
      p = optax.apply_updates(p, u)
      moves.append(u)
    return moves

  with pytest.raises(ValueError,
                     match="precondition_by_inputs found no layer"):
    run(precondition="inputs")
  for auto, plain in zip(run(), run(precondition=None)):
    jax.tree_util.tree_map(np.testing.assert_array_equal, auto, plain)
  assert any(float(jnp.abs(u).max()) > 0
             for u in jax.tree_util.tree_leaves(auto))
