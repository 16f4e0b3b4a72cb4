"""Tests for curvature-based layer-wise learning rates (_curvature_lr.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_layerwise as olw
from optax_layerwise import _curvature_lr
from tests import nets


def _per_leaf(path, _):
  return jax.tree_util.keystr(path)


def _fresh_seed():
  return int(np.random.SeedSequence().entropy % 2**31)  # fresh every run


def _layer_values(tree, layers):
  """Per-layer flat float64 NumPy vectors of a pytree."""
  leaves = jax.tree_util.tree_leaves(tree)
  return [np.concatenate([np.ravel(np.asarray(x, np.float64))
                          for x, i in zip(leaves, layers.leaf_layer) if i == l])
          for l in range(layers.num_layers)]


def _mlp(seed, dtype):
  """A tanh MLP 5-4-3-2 with softmax cross-entropy, drawn with NumPy.

  NumPy draws do not depend on JAX's x64 mode, so the float32 problem and its
  float64 reference are the same problem (params and data of the float64 one
  are the float32 values, exactly).
  """
  rng = np.random.default_rng(seed)
  sizes = (5, 4, 3, 2)
  params = {f"layer{i}": {
      "w": (rng.normal(size=(m, n)) / np.sqrt(m)).astype(np.float32),
      "b": (0.1 * rng.normal(size=(n,))).astype(np.float32)}
            for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:]))}
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)
  x = rng.normal(size=(8, sizes[0])).astype(np.float32)
  y = rng.integers(0, sizes[-1], size=8)

  def loss_fn(p):
    h = jnp.asarray(x, dtype)
    for i in range(len(sizes) - 1):
      h = h @ p[f"layer{i}"]["w"] + p[f"layer{i}"]["b"]
      if i < len(sizes) - 2:
        h = jnp.tanh(h)
    logp = jax.nn.log_softmax(h)
    return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(y)[:, None], 1))

  return params, loss_fn


def _forbidden_value_fn(params):
  raise AssertionError("value_fn must not be called by this estimator")


def _update(tx, value_fn=None):
  """``tx.update`` compiled with ``value_fn`` bound (faster than op by op)."""
  return jax.jit(functools.partial(tx.update, value_fn=value_fn))


def _grad(loss_fn):
  return jax.jit(jax.grad(loss_fn))


# --------------------------------------------------------------- LARS case ---


def test_norm_ratio_equals_optax_trust_ratio():
  seed = _fresh_seed()
  params, loss_fn = nets.mlp(jax.random.PRNGKey(seed))
  params["layer1"]["b"] = jnp.zeros_like(params["layer1"]["b"])  # zero norm
  grads = _grad(loss_fn)(params)
  tc = 0.37
  want, _ = optax.scale_by_trust_ratio(trust_coefficient=tc).update(
      grads, None, params)
  tx = olw.scale_by_curvature_lr(curvature="norm_ratio", scale=tc,
                                 layers=_per_leaf)
  got, state = _update(tx)(grads, tx.init(params), params)
  for a, b in zip(jax.tree_util.tree_leaves(got),
                  jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-9, err_msg=f"{seed=}")
  # The diagnostics are the trust ratios themselves; a zero-norm leaf takes 1.
  leaves = jax.tree_util.tree_leaves(params)
  gleaves = jax.tree_util.tree_leaves(grads)
  ratios = [1.0 if np.linalg.norm(p) == 0 else
            tc * np.linalg.norm(p) / np.linalg.norm(g)
            for p, g in zip(leaves, gleaves)]
  np.testing.assert_allclose(state.lrs, ratios, rtol=2e-6)
  assert np.sum(np.asarray(ratios) == 1.0) == 1
  assert np.all(np.isfinite(state.curvatures))  # 0 for the zero-norm leaf


@pytest.mark.parametrize("nesterov", [False, True])
def test_cblr_as_lars_matches_optax_lars_over_20_steps(nesterov):
  params, loss_fn = nets.mlp(jax.random.PRNGKey(_fresh_seed()),
                             sizes=(6, 8, 8, 3), batch=16)
  params["layer0"]["b"] = jnp.zeros_like(params["layer0"]["b"])
  kw = dict(weight_decay=1e-2, momentum=0.9, nesterov=nesterov)
  schedule = optax.linear_schedule(0.5, 0.1, 20)  # lr as a schedule, too
  reference = optax.lars(schedule, trust_coefficient=0.02, **kw)
  ours = olw.cblr(schedule, curvature="norm_ratio", scale=0.02,
                  layers=_per_leaf, **kw)

  def run(tx):
    @jax.jit
    def step(p, s):
      u, s = tx.update(jax.grad(loss_fn)(p), s, p)
      return optax.apply_updates(p, u), s, u

    p, s, history = params, tx.init(params), []
    for _ in range(20):
      p, s, u = step(p, s)
      history.append(u)
    return p, history

  p_ref, u_ref = run(reference)
  p_got, u_got = run(ours)
  for k, (a, b) in enumerate(zip(u_got, u_ref)):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
      # float32: the norms are summed in a different order, so the trust
      # ratios differ by a few ulps, and 20 steps of a nonlinear map amplify
      # that (elementwise, entries that nearly cancel under Nesterov reach
      # 1e-3 relative): normwise 1e-5 per leaf, ~100 ulps.
      err = np.linalg.norm(x - y) / np.linalg.norm(y)
      assert err < 1e-5, (k, err)
  assert loss_fn(p_got) < 0.9 * loss_fn(params)  # it did train


def test_lars_paper_convention_matches_you_et_al_algorithm_1():
  params, loss_fn = nets.mlp(jax.random.PRNGKey(_fresh_seed()))
  wd, tc, lr, m = 0.05, 0.01, 0.3, 0.9
  tx = olw.cblr(lr, m, weight_decay=wd, curvature="norm_ratio", scale=tc,
                weight_decay_convention="lars_paper", layers=_per_leaf)
  state = tx.init(params)
  update, grad = _update(tx), _grad(loss_fn)
  p_ours = params
  p_ref = jax.tree_util.tree_map(np.asarray, params)
  v = jax.tree_util.tree_map(np.zeros_like, p_ref)
  for _ in range(5):
    u, state = update(grad(p_ours), state, p_ours)
    p_ours = optax.apply_updates(p_ours, u)
    g_ref = grad(p_ref)

    # You et al. (2017), Algorithm 1: local lr = eta ||w|| / (||g|| + b ||w||),
    # v <- m v + gamma * local_lr * (g + b w), w <- w - v.
    def step(w, g, v_):
      w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
      w_norm = np.linalg.norm(w)
      local = tc * w_norm / (np.linalg.norm(g) + wd * w_norm)
      return m * v_ + lr * local * (g + wd * w)

    v = jax.tree_util.tree_map(step, p_ref, g_ref, v)
    p_ref = jax.tree_util.tree_map(lambda w, v_: w - v_, p_ref, v)
  for a, b in zip(jax.tree_util.tree_leaves(p_ours),
                  jax.tree_util.tree_leaves(p_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # ... and it is not Optax's convention (||g + wd w|| in the denominator).
  optax_tx = olw.cblr(lr, m, weight_decay=wd, curvature="norm_ratio",
                      scale=tc, layers=_per_leaf)
  g = grad(params)
  u_optax, _ = _update(optax_tx)(g, optax_tx.init(params), params)
  u_paper, _ = update(g, tx.init(params), params)
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree_util.tree_leaves(u_optax), jax.tree_util.tree_leaves(u_paper)))
  assert diff > 1e-6


# ----------------------------------------------------------- Hessian case ---


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_hessian_rayleigh_matches_dense_hessian_float64(weight_decay, x64):
  seed = _fresh_seed()
  params, loss_fn = _mlp(seed, jnp.float64)
  layers = olw.group_layers(params)
  grads = _grad(loss_fn)(params)
  # The formula itself: no joint factor, no trust bound.
  tx = olw.scale_by_curvature_lr(curvature="hessian", estimator="exact",
                                 scale=0.7, weight_decay=weight_decay,
                                 initial_lr=0.05, joint_step=False,
                                 max_relative_change=None)
  updates, state = _update(tx, loss_fn)(grads, tx.init(params), params)
  g, hess, index = nets.dense_reference(loss_fn, params, layers)
  reg = g + weight_decay * nets.ravel(params)
  want = []
  for l in range(layers.num_layers):
    gl = np.where(index == l, reg, 0.0)
    want.append(gl @ hess @ gl / (gl @ gl) + weight_decay)
  want = np.asarray(want)
  # float64 params keep float64 statistics: both routes are exact up to
  # round-off (~1e-15 relative); 1e-9 of the largest |kappa| leaves room for
  # quotients near zero yet catches any wrong block or missing term.
  assert state.curvatures.dtype == jnp.float64
  np.testing.assert_allclose(state.curvatures, want, rtol=1e-9,
                             atol=1e-9 * np.abs(want).max(),
                             err_msg=f"{seed=}")
  # A layer of negative curvature (possible on a random draw) falls back.
  lrs = np.where(want > 0, 0.7 / want, 0.05)
  np.testing.assert_allclose(state.lrs, lrs, rtol=1e-8, err_msg=f"{seed=}")
  np.testing.assert_allclose(nets.ravel(updates), lrs[index] * reg,
                             rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("reduce", ["rayleigh", "median"])
def test_joint_factor_is_saddle_free_along_negative_curvature(reduce, x64):
  # Two layers, each convex (H_ll = a I, c I), coupled by e x.y with e large:
  # along the combined step d = (lr_x g_x, lr_y g_y) the curvature
  # q = d^T H d is negative. t = min(1, <g, d> / |q|) (saddle-free, Dauphin
  # et al. 2014), from the dense Hessian here; CBLR takes q from its exact
  # blocks, MCLR from one more Hessian-vector product.
  seed = _fresh_seed()
  rng = np.random.default_rng(seed)
  a, c = rng.uniform(0.5, 2.0, 2)
  e = rng.uniform(3.0, 4.0)
  r = rng.normal(size=5)
  params = {"x": {"w": jnp.asarray(r)},
            "y": {"w": jnp.asarray(-r + 0.1 * rng.normal(size=5))}}

  def loss(p):
    x, y = p["x"]["w"], p["y"]["w"]
    return 0.5 * a * x @ x + 0.5 * c * y @ y + e * x @ y

  tx = olw.scale_by_curvature_lr(reduce=reduce, max_relative_change=None,
                                 seed=seed % 1000)
  grads = _grad(loss)(params)
  updates, state = _update(tx, loss)(grads, tx.init(params), params)
  eye = np.eye(5)
  hess = np.block([[a * eye, e * eye], [e * eye, c * eye]])
  g = np.concatenate([grads["x"]["w"], grads["y"]["w"]])
  lrs = np.repeat(np.asarray(state.lrs), 5)
  d = lrs * g
  q = d @ hess @ d
  if reduce == "rayleigh":  # kappa_l = a, c exactly
    np.testing.assert_allclose(state.lrs, [1 / a, 1 / c], rtol=1e-10)
    assert q < 0, (seed, q)
  t = min(1.0, (g @ d) / abs(q))
  np.testing.assert_allclose(state.joint_scale, t, rtol=1e-10,
                             err_msg=f"{seed=}")
  np.testing.assert_allclose(
      np.concatenate([updates["x"]["w"], updates["y"]["w"]]), t * d,
      rtol=1e-10, err_msg=f"{seed=}")


def test_hessian_rayleigh_float32_tolerance():
  seed = _fresh_seed()
  params, loss_fn = _mlp(seed, jnp.float32)
  layers = olw.group_layers(params)
  tx = olw.scale_by_curvature_lr(curvature="hessian", estimator="exact")
  _, state = _update(tx, loss_fn)(_grad(loss_fn)(params), tx.init(params),
                                  params)
  with jax.enable_x64(True):
    params64, loss64 = _mlp(seed, jnp.float64)
    g, hess, index = nets.dense_reference(loss64, params64, layers)
  for l in range(layers.num_layers):
    gl = np.where(index == l, g, 0.0)
    want = gl @ hess @ gl / (gl @ gl)
    block = hess[np.ix_(index == l, index == l)]
    # Same problem, float32 arithmetic: forward-over-reverse through 3 tanh
    # layers and float32 sums of ~10 products carry a relative error of a few
    # hundred ulps (u = 6e-8) on the scale of the block, ||H_ll||_2, which
    # bounds |kappa_l|: 1e-4 ||H_ll||_2 leaves a margin of ~10x.
    tol = 1e-4 * np.linalg.norm(block, 2)
    assert abs(state.curvatures[l] - want) <= tol, (seed, l, want)


def test_hessian_median_matches_numpy_median_of_hutchinson_diagonal(x64):
  seed = _fresh_seed()
  params, loss_fn = _mlp(seed, jnp.float64)
  layers = olw.group_layers(params)
  tx = olw.mclr(1.0, momentum=0.0, curvature="hessian", num_probes=3,
                seed=seed % 1000, max_relative_change=None)
  grads = _grad(loss_fn)(params)
  _, state = _update(tx, loss_fn)(grads, tx.init(params), params)
  _, hess, index = nets.dense_reference(loss_fn, params, layers)
  key = jax.random.fold_in(jax.random.PRNGKey(seed % 1000), 0)  # step 0
  probes = jax.jit(_curvature_lr.elementwise_probes, static_argnums=2)(
      key, params, 3)
  z = np.stack([nets.ravel(jax.tree_util.tree_map(lambda x: x[k], probes))
                for k in range(3)])
  estimate = np.abs(np.mean(z * (z @ hess), axis=0))  # |mean_k z_k * H z_k|
  want = np.array([np.median(estimate[index == l])
                   for l in range(layers.num_layers)])
  inner = state[0]
  # float64 throughout; the median picks (or averages) entries, so only
  # round-off of the Hessian-vector products remains.
  np.testing.assert_allclose(inner.curvatures, want, rtol=1e-10,
                             err_msg=f"{seed=}")
  np.testing.assert_allclose(inner.lrs, 1.0 / want, rtol=1e-10)
  # The probes matter: the exact diagonal gives other medians.
  exact = np.array([np.median(np.abs(np.diag(hess))[index == l])
                    for l in range(layers.num_layers)])
  assert not np.allclose(inner.curvatures, exact, rtol=1e-3)


def test_hessian_needs_value_fn_and_others_ignore_it():
  params, loss_fn = nets.mlp(jax.random.PRNGKey(0))
  grads = _grad(loss_fn)(params)
  tx = olw.cblr(curvature="hessian")
  with pytest.raises(ValueError, match="value_fn"):
    tx.update(grads, tx.init(params), params)
  for curvature in ("secant", "norm_ratio"):
    tx = olw.cblr(curvature=curvature)
    state = tx.init(params)
    a, _ = _update(tx, _forbidden_value_fn)(grads, state, params)
    b, _ = _update(tx)(grads, state, params)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
      np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------ secant case ---


@pytest.mark.parametrize("reduce", ["rayleigh", "median"])
def test_secant_matches_hand_computed_barzilai_borwein(reduce):
  seed = _fresh_seed()
  params, loss_fn = nets.mlp(jax.random.PRNGKey(seed))
  layers = olw.group_layers(params)
  wd, scale, initial_lr = 0.01, 0.5, 0.05
  # The displacement bound (max_relative_change, on by default) would lower
  # some rates below lr = scale / kappa on some draws: off for the formula.
  tx = olw.scale_by_curvature_lr(curvature="secant", reduce=reduce,
                                 scale=scale, weight_decay=wd,
                                 initial_lr=initial_lr,
                                 max_relative_change=None)
  state = tx.init(params)
  update, grad = _update(tx, _forbidden_value_fn), _grad(loss_fn)
  g0 = grad(params)
  u0, state = update(g0, state, params)
  # Warm-up: no previous iterate, so every layer takes initial_lr.
  np.testing.assert_allclose(state.lrs, initial_lr)
  np.testing.assert_array_equal(state.num_fallbacks, 1)
  np.testing.assert_allclose(
      nets.ravel(u0), initial_lr * (nets.ravel(g0) + wd * nets.ravel(params)),
      rtol=1e-6, atol=1e-8 * initial_lr)  # g + wd theta rounds in float32
  params1 = jax.tree_util.tree_map(lambda p, u: p - u, params, u0)
  g1 = grad(params1)
  u1, state = update(g1, state, params1)
  # The reference differences the same float32 values in float64, so the
  # only error left is float32 rounding in the transform (a few ulps a ratio).
  s = [a - b for a, b in zip(_layer_values(params1, layers),
                             _layer_values(params, layers))]
  y = [a - b for a, b in zip(_layer_values(g1, layers),
                             _layer_values(g0, layers))]
  if reduce == "rayleigh":
    want = np.array([sl @ yl / (sl @ sl) for sl, yl in zip(s, y)]) + wd
    # float32 sums of ~20 products: error <= 1e-5 of the Cauchy-Schwarz
    # bound ||y_l|| / ||s_l|| on |<s, y>_l| / ||s_l||^2.
    atol = 1e-5 * np.array([np.linalg.norm(yl) / np.linalg.norm(sl)
                            for sl, yl in zip(s, y)])
  else:
    want = np.array([np.median((yl / sl)[sl != 0]) for sl, yl in zip(s, y)])
    want = want + wd
    atol = 0.0
  err = np.abs(np.asarray(state.curvatures) - want)
  assert np.all(err <= 1e-5 * np.abs(want) + atol), (seed, err, want)
  accepted = np.asarray(state.num_accepted) == 1
  np.testing.assert_array_equal(accepted, np.asarray(state.curvatures) > 0)
  np.testing.assert_allclose(
      np.where(accepted, state.lrs * state.curvatures, scale), scale,
      rtol=1e-6)
  np.testing.assert_allclose(np.asarray(state.lrs)[~accepted], initial_lr)
  reg1 = _layer_values(jax.tree_util.tree_map(
      lambda g, p: g + wd * p, g1, params1), layers)
  for l, (ul, rl) in enumerate(zip(_layer_values(u1, layers), reg1)):
    np.testing.assert_allclose(ul, float(state.lrs[l]) * rl, rtol=1e-5,
                               atol=1e-9)


# ------------------------------------------------------------- safeguards ---


def test_safeguards_fallback_clip_and_skip():
  params = {"a": {"w": jnp.ones(3)}, "b": {"w": jnp.ones(2)}}

  def loss(p):  # layer a convex (curvature 4), layer b concave (-2)
    return 2 * jnp.sum(p["a"]["w"] ** 2) - jnp.sum(p["b"]["w"] ** 2)

  grads = jax.grad(loss)(params)
  # The clip alone (the displacement bound, 0.1 ||w|| / ||g|| = 0.025 for
  # layer a, is checked on Flax models below).
  tx = olw.scale_by_curvature_lr(estimator="exact", initial_lr=0.01,
                                 max_lr=0.2, max_relative_change=None)
  update = _update(tx, loss)
  updates, state = update(grads, tx.init(params), params)
  np.testing.assert_allclose(state.curvatures, [4.0, -2.0], rtol=1e-6)
  # a: 1 / 4 clipped to max_lr 0.2; b: negative curvature, initial_lr.
  np.testing.assert_allclose(state.lrs, [0.2, 0.01], rtol=1e-6)
  np.testing.assert_array_equal(state.num_accepted, [1, 0])
  np.testing.assert_array_equal(state.num_fallbacks, [0, 1])
  np.testing.assert_allclose(updates["b"]["w"], 0.01 * grads["b"]["w"])

  # A non-finite gradient skips the step: zero update, lrs kept, counted.
  bad = jax.tree_util.tree_map(lambda g: g.at[0].set(jnp.nan), grads)
  updates, state2 = update(bad, state, params)
  assert all(np.all(u == 0) for u in jax.tree_util.tree_leaves(updates))
  np.testing.assert_array_equal(state2.lrs, state.lrs)
  assert int(state2.num_skipped) == 1 and int(state2.count) == 1

  # EMA smooths accepted rates; a rejected layer keeps its last accepted one.
  tx = olw.scale_by_curvature_lr(estimator="exact", ema=0.5, initial_lr=0.01,
                                 max_relative_change=None)
  s = tx.init(params)
  _, s = _update(tx, loss)(grads, s, params)
  _, s = _update(tx, lambda p: 3 * loss(p))(grads, s, params)
  np.testing.assert_allclose(s.lrs, [0.5 * 0.25 + 0.5 / 12, 0.01], rtol=1e-6)


def test_jit_fixed_state_and_update_interval():
  params, loss_fn = nets.mlp(jax.random.PRNGKey(1))
  for curvature, reduce in [("hessian", "rayleigh"), ("secant", "median"),
                            ("norm_ratio", "rayleigh")]:
    tx = olw.scale_by_curvature_lr(curvature=curvature, reduce=reduce,
                                   update_interval=2, initial_lr=0.1)

    @jax.jit
    def step(p, s, tx=tx):
      u, s = tx.update(jax.grad(loss_fn)(p), s, p, value_fn=loss_fn)
      return optax.apply_updates(p, jax.tree_util.tree_map(lambda x: -x, u)), s

    s0 = tx.init(params)
    p, s1 = step(params, s0)
    p, s2 = step(p, s1)
    p, s3 = step(p, s2)
    shapes = lambda s: [(x.shape, x.dtype)  # noqa: E731
                        for x in jax.tree_util.tree_leaves(s)]
    assert shapes(s0) == shapes(s1) == shapes(s3), curvature
    assert s3.lrs.dtype == jnp.float32 and s3.curvatures.dtype == jnp.float32
    # Step 1 reuses step 0's rates (no measurement, no counter change).
    np.testing.assert_array_equal(s2.lrs, s1.lrs)
    np.testing.assert_array_equal(s2.num_accepted + s2.num_fallbacks,
                                  s1.num_accepted + s1.num_fallbacks)
    assert np.all(s3.num_accepted + s3.num_fallbacks == 2), curvature


def test_inject_hyperparams():
  params, loss_fn = nets.mlp(jax.random.PRNGKey(2))
  grads = _grad(loss_fn)(params)
  plain = olw.cblr(0.1, curvature="hessian", estimator="exact",
                   weight_decay=0.01, update_interval=1)
  ref, _ = _update(plain, loss_fn)(grads, plain.init(params), params)
  # Numbers arrive traced (scale, weight decay, momentum, update_interval,
  # seed, ...); strings stay static.
  injected = optax.inject_hyperparams(olw.cblr)(
      learning_rate_scale=0.05, curvature="hessian", estimator="exact",
      weight_decay=0.01)
  state = injected.init(params)
  half, state = _update(injected, loss_fn)(grads, state, params)
  for h, r in zip(jax.tree_util.tree_leaves(half),
                  jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(h, 0.5 * r, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(state.hyperparams["learning_rate_scale"], 0.05)


def test_invalid_options_raise():
  with pytest.raises(ValueError, match="norm_ratio"):
    olw.mclr(curvature="norm_ratio")
  with pytest.raises(ValueError, match="hutchinson"):
    olw.mclr(estimator="exact")
  with pytest.raises(ValueError, match="initial_lr"):
    olw.cblr(curvature="secant", initial_lr=0.0)
  with pytest.raises(ValueError, match="curvature"):
    olw.scale_by_curvature_lr(curvature="fisher")
  with pytest.raises(TypeError, match="reduce"):
    olw.cblr(reduce="median")  # fixed by the alias


# ------------------------------------- layer-wise ill-conditioned quadratic ---

_CURVATURES = (1.0, 100.0, 10000.0)


def _quadratic():
  key = jax.random.PRNGKey(3)
  target = {f"block{i}": {"w": jax.random.normal(jax.random.fold_in(key, i),
                                                 (4,))}
            for i in range(3)}
  params = jax.tree_util.tree_map(jnp.zeros_like, target)

  def loss(p):
    return sum(0.5 * c * jnp.sum((p[f"block{i}"]["w"] - target[f"block{i}"]
                                  ["w"]) ** 2)
               for i, c in enumerate(_CURVATURES))

  def error(p):
    return float(optax.tree.norm(jax.tree_util.tree_map(
        lambda a, b: a - b, p, target)) / optax.tree.norm(target))

  return params, loss, error


def _iterations_to(tx, tol, max_iters):
  params, loss, error = _quadratic()
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p, value_fn=loss)
    return optax.apply_updates(p, u), s

  for k in range(1, max_iters + 1):
    params, state = step(params, state)
    if error(params) < tol:
      return k
  return None


def test_cblr_converges_where_a_single_tuned_learning_rate_crawls():
  tol = 1e-4
  # CBLR/MCLR: the Hessian is c_l I on block l, so kappa_l = c_l exactly (for
  # Hutchinson too: the layer signs square to 1) and one step is Newton's.
  assert _iterations_to(olw.cblr(1.0, 0.0, estimator="exact"), tol, 20) == 1
  assert _iterations_to(olw.cblr(1.0, 0.0), tol, 20) == 1
  assert _iterations_to(olw.mclr(1.0, 0.0), tol, 20) == 1
  # Secant: one warm-up step, then the exact per-block BB curvature (float32
  # differences of gradients lose ~u / initial_lr relative: 6e-6 here).
  # (No trust bound: from zero params it would let each block grow by at
  # most max_relative_change of its norm a step.)
  secant = olw.cblr(1.0, 0.0, curvature="secant", initial_lr=1e-2,
                    max_relative_change=None)
  assert _iterations_to(secant, tol, 20) == 2

  # A single learning rate: stable only for lr < 2 / 10000, so the block of
  # curvature 1 contracts by at least 1 - 2 / 10001 a step, whatever the lr
  # (the best is 2 / (1 + 10000)): about 46,000 steps to reach 1e-4.
  params, loss, error = _quadratic()
  @jax.jit
  @jax.vmap
  def gradient_descent(lr):
    return jax.lax.fori_loop(0, 1000, lambda _, p: jax.tree_util.tree_map(
        lambda x, g: x - lr * g, p, jax.grad(loss)(p)), params)

  lrs = jnp.array([1e-5, 5e-5, 1e-4, 1.5e-4, 2 / 10001, 2.1e-4])
  finals = gradient_descent(lrs)
  errors = [error(jax.tree_util.tree_map(lambda x, k=k: x[k], finals))
            for k in range(len(lrs))]
  errors = np.nan_to_num(errors, nan=np.inf)
  assert errors[-1] > 1.0  # above 2 / 10000 it diverges
  assert errors.min() > 0.5  # after 1000 steps, more than half the way to go
  rho = 1 - 2 / 10001
  assert np.ceil(np.log(tol) / np.log(rho)) > 40000


# ---------------------------------------------- defaults on Flax models ---

# The rates are checked on the CNN; the loss at the defaults on a conv net
# with BatchNorm, the LSTM and the transformers is tests/test_real_models.py's
# (every alias), and the benchmark sweep's (python -m
# benchmarks.cblr_defaults, 10 steps, two seeds).
_DEFAULT_KINDS = ("cnn",)


@pytest.mark.parametrize("kind", _DEFAULT_KINDS)
def test_defaults_lower_the_loss_on_flax_models_and_rates_follow_curvature(
    kind):
  from tests import flax_models  # flax only where needed

  for make_tx in (olw.cblr, olw.mclr):
    tx = make_tx()  # the defaults: nothing tuned

    @jax.jit
    def step(params, state, data, tx=tx):
      loss_fn = _problem_loss[kind]
      value, grads = jax.value_and_grad(loss_fn)(params, data)
      updates, state = tx.update(grads, state, params,
                                 value_fn=lambda p: loss_fn(p, data))
      return optax.apply_updates(params, updates), state, value, updates

    for seed in (0, 1):
      params, loss_fn, data = flax_models.make_problem(kind, seed)
      _problem_loss[kind] = loss_fn
      layers = olw.group_layers(params)
      state = tx.init(params)
      start = float(jax.jit(loss_fn)(params, data))
      p = params
      for k in range(10):
        p, state, _, updates = step(p, state, data)
        inner = state[0]
        assert np.all(np.isfinite(inner.lrs)), (kind, seed, k)
        if k == 0:
          first, first_updates = inner, updates
      end = float(jax.jit(loss_fn)(p, data))
      name = make_tx.__name__
      assert end < start, (name, kind, seed, start, end)

      # The rates follow the curvature. One factor t <= 1 scales all layers
      # alike: update_l = -t lr_l g_l (momentum 0 by default).
      g = jax.grad(loss_fn)(params, data)
      t = float(first.joint_scale)
      assert 0 < t <= 1
      p_norm = np.sqrt(np.asarray(layers.sq_norm(params)))
      g_norm = np.sqrt(np.asarray(layers.sq_norm(g)))
      u_norm = np.sqrt(np.asarray(layers.sq_norm(first_updates)))
      np.testing.assert_allclose(u_norm, t * np.asarray(first.lrs) * g_norm,
                                 rtol=1e-3)
      accepted = np.asarray(first.num_accepted) == 1
      lrs = np.asarray(first.lrs)
      if make_tx is olw.cblr:
        kappa = flax_models.layer_rayleigh(loss_fn, params, data, layers)
      else:
        kappa = np.asarray(first.curvatures)
      # lr_l = min(1 / kappa_l, 0.1 ||theta_l|| / ||g_l||) on every accepted
      # layer (kappa_l measured independently here for CBLR): the curvature
      # sets the rate unless the Newton step would move the layer by more
      # than a tenth of its norm (max_relative_change=0.1).
      want = np.minimum(1.0 / kappa, 0.1 * p_norm / g_norm)
      np.testing.assert_allclose(lrs[accepted], want[accepted], rtol=2e-2,
                                 err_msg=f"{name} {kind} {seed}")
      # ... and the rates differ across layers (by 2x-4x at init on the NNX
      # transformer, whose layers mostly sit at the norm bound there; by
      # 10x-100x elsewhere).
      assert lrs[accepted].max() > 1.5 * lrs[accepted].min(), (name, kind, lrs)


_problem_loss = {}
