"""Tests for the layer-wise step sizes (_step_size.py; docs/step_sizes.md)."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_layerwise as olw
from tests import nets


# The exact diagonal blocks by forward-over-reverse products, every step: the
# reference path that the dense-Hessian tests check (the aliases' default
# measures them by secants every 20 steps; tested below).
EXACT = dict(estimator="exact", hvp="forward_over_reverse", update_interval=1)


def _fresh_key():
  return jax.random.PRNGKey(np.random.SeedSequence().entropy % 2**31)


def _jit_update(tx, loss_fn):
  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss_fn)(params), state, params,
                               value_fn=loss_fn)
    return optax.apply_updates(params, updates), updates, state
  return step


def _step_state(opt_state):
  """The ScaleByLayerwiseStepSizeState inside an alias's chain state."""
  return opt_state[0]


@pytest.mark.parametrize("problem, hvp", [
    ("mlp", "forward_over_reverse"), ("cnn", "forward_over_reverse"),
    ("mlp", "forward_over_forward"), ("cnn", "forward_over_forward")])
def test_steps_equal_b_over_q_from_dense_hessian(problem, hvp, x64):
  key = _fresh_key()
  params, loss_fn = {"mlp": nets.mlp, "cnn": nets.cnn}[problem](
      key, dtype=jnp.float64)
  # Adam's first direction is g / (|g| + eps): not parallel to g, so the
  # test distinguishes <g, d>_l from ||g_l||^2.
  eps = 1e-8
  tx = olw.layerwise_adamw(**dict(EXACT, hvp=hvp),
                           max_relative_change=None, weight_decay=0.0, eps=eps,
                           max_step=1e6)
  _, updates, state = _jit_update(tx, loss_fn)(params, tx.init(params))

  layers = olw.group_layers(params)
  g, hess, index = nets.dense_reference(loss_fn, params, layers)
  d = g / (np.abs(g) + eps)
  b = np.array([np.sum((index == l) * g * d) for l in range(layers.num_layers)])
  q = np.diag(nets.layer_matrix(hess, index, d, layers.num_layers))
  # float64 end to end; 1e-8 relative is round-off plus Adam's eps terms.
  np.testing.assert_allclose(_step_state(state).decreases, b, rtol=1e-8)
  np.testing.assert_allclose(_step_state(state).curvatures, q, rtol=1e-8,
                             atol=1e-12 * np.abs(q).max())
  # alpha_l = b_l / q_l where the safeguards do not fire (q_l > 0, b_l > 0);
  # a layer with negative curvature along d falls back to initial_step = 0.
  valid = (q > 0) & (b > 0)
  want = np.where(valid, b / np.where(valid, q, 1.0), 0.0)
  np.testing.assert_allclose(_step_state(state).step_sizes, want, rtol=1e-8)
  alpha = want[index]
  np.testing.assert_allclose(nets.ravel(updates), -alpha * d, rtol=1e-8)


def test_float32_steps_match_float64_reference():
  key = _fresh_key()
  params, loss_fn = nets.mlp(key)
  tx = olw.layerwise_sgd(**EXACT,
                         max_relative_change=None, momentum=0.0)
  _, _, state = _jit_update(tx, loss_fn)(params, tx.init(params))
  with jax.enable_x64(True):
    p64, loss64 = nets.mlp(key, dtype=jnp.float64)
    layers = olw.group_layers(p64)
    g, hess, index = nets.dense_reference(loss64, p64, layers)
  b = np.array([np.sum((index == l) * g * g) for l in range(layers.num_layers)])
  q = np.diag(nets.layer_matrix(hess, index, g, layers.num_layers))
  # float32 Hessian-vector products through a few tanh layers are accurate
  # to ~1e-6 of the largest curvature; 1e-4 of the scale is a safe bound.
  scale = np.abs(q).max()
  np.testing.assert_allclose(_step_state(state).curvatures, q,
                             atol=1e-4 * scale)
  np.testing.assert_allclose(_step_state(state).decreases, b, rtol=1e-5)
  # Where q_l > 0 the step is b_l / q_l clipped to max_step = 1; where the
  # curvature is negative (tanh layers at random init often are) the layer
  # falls back to initial_step = 0.
  want = np.where(q > 0, np.minimum(b / np.where(q > 0, q, 1.0), 1.0), 0.0)
  np.testing.assert_allclose(_step_state(state).step_sizes, want, rtol=1e-3)
  np.testing.assert_array_equal(_step_state(state).num_fallbacks, q <= 0)


def _block_quadratic(coupling, seed=0):
  """0.5 x^T A x - c^T x with 3 blocks of curvature scale 1, 100, 0.01."""
  rng = np.random.default_rng(seed)
  sizes, scales = (4, 6, 5), (1.0, 100.0, 0.01)
  n = sum(sizes)
  a = np.zeros((n, n))
  mask = np.ones((n, n))
  offset = 0
  for size, scale in zip(sizes, scales):
    q, _ = np.linalg.qr(rng.normal(size=(size, size)))
    # Every block has condition number 10 (eigenvalues 1..10 times scale).
    a[offset:offset + size, offset:offset + size] = (
        scale * q @ np.diag(np.linspace(1, 10, size)) @ q.T)
    mask[offset:offset + size, offset:offset + size] = 0
    offset += size
  sym = rng.normal(size=(n, n))
  diag = np.sqrt(np.diag(a))
  a = a + coupling * np.outer(diag, diag) * (sym + sym.T) / 2 * mask
  c = rng.normal(size=n)
  bounds = np.cumsum((0,) + sizes)

  def unflatten(v):
    return {f"l{i}": {"w": v[bounds[i]:bounds[i + 1]]} for i in range(3)}

  def loss(p):
    v = jnp.concatenate([p[f"l{i}"]["w"] for i in range(3)])
    return 0.5 * v @ a @ v - c @ v

  optimum = loss(unflatten(np.linalg.solve(a, c)))
  return loss, unflatten(rng.normal(size=n)), optimum


def test_max_relative_change_bounds_each_layers_displacement(x64):
  seed = int(np.random.SeedSequence().entropy % 2**31)
  loss, params, _ = _block_quadratic(0.0, seed=seed)
  # Independent reference: for a quadratic, g = A x - c and with momentum 0
  # d = g, so b_l = ||g_l||^2 and q_l = g_l^T A_ll g_l in closed form.
  g = jax.grad(loss)(params)
  hvp = jax.jvp(jax.grad(loss), (params,), (g,))[1]  # block-diagonal A here
  names = sorted(params)
  b = np.array([np.sum(np.square(g[n]["w"])) for n in names])
  q = np.array([np.sum(g[n]["w"] * hvp[n]["w"]) for n in names])
  g_norm = np.array([np.linalg.norm(g[n]["w"]) for n in names])
  p_norm = np.array([np.linalg.norm(params[n]["w"]) for n in names])
  relative = (b / q) * g_norm / p_norm  # each layer's unbounded move / norm
  # A bound between the two smallest relative moves leaves one layer free
  # and clips the other two to exactly rho * ||theta_l||.
  rho = float(np.mean(np.sort(relative)[:2]))
  tx = olw.layerwise_sgd(momentum=0.0, **EXACT, max_step=1e6,
                         max_relative_change=rho)
  new_params, _, state = _jit_update(tx, loss)(params, tx.init(params))
  want = np.minimum(b / q, rho * p_norm / g_norm)
  # float64 end to end: only round-off separates the two.
  np.testing.assert_allclose(_step_state(state).step_sizes, want, rtol=1e-10)
  moved = np.array([np.linalg.norm(new_params[n]["w"] - params[n]["w"])
                    for n in names])
  bounded = relative > rho
  assert bounded.sum() == 2, relative
  np.testing.assert_allclose(moved[bounded], rho * p_norm[bounded],
                             rtol=1e-10)
  assert np.all(moved[~bounded] < rho * p_norm[~bounded])


@pytest.mark.parametrize("config", [
    dict(update_interval=2), dict(ema=0.9), dict(initial_step=1.0),
    dict(estimator="exact")])
def test_max_relative_change_bounds_every_path(config):
  # The bound must hold on every path that sets a step: a fresh measurement,
  # the moving average, the fallback of a rejected layer (initial_step = 1
  # would move a layer by ||d_l|| otherwise) and reused steps in between
  # measurements, whose direction has changed.
  params, loss_fn = nets.mlp(_fresh_key())
  rho = 0.01
  tx = olw.layerwise_sgd(max_relative_change=rho, **config)
  step = _jit_update(tx, loss_fn)
  state = tx.init(params)
  layers = olw.group_layers(params)
  for _ in range(6):
    new_params, _, state = step(params, state)
    moved = np.sqrt(layers.sq_norm(jax.tree_util.tree_map(
        lambda a, b: a - b, new_params, params)))
    size = np.sqrt(layers.sq_norm(params))
    # float32 norms of the same arrays: 1e-5 relative is round-off.
    assert np.all(moved <= rho * size * (1 + 1e-5)), (moved / size)
    params = new_params


def test_negative_max_relative_change_is_an_error():
  with pytest.raises(ValueError, match="max_relative_change must be >= 0"):
    olw.layerwise_sgd(max_relative_change=-0.1)


@pytest.mark.parametrize("coupling", [0.0, 0.05])
def test_full_batch_sgd_converges_linearly(coupling, x64):
  loss, params, optimum = _block_quadratic(coupling)
  # The rule itself: no averaging of the steps (the alias's ema=0.9).
  tx = olw.layerwise_sgd(momentum=0.0, **EXACT, ema=0.0,
                         max_relative_change=None, max_step=1e6)
  step = _jit_update(tx, loss)
  state = tx.init(params)
  gaps = []
  for _ in range(60):
    gaps.append(float(loss(params) - optimum))
    params, _, state = step(params, state)
  ratios = np.array(gaps[1:]) / np.array(gaps[:-1])
  if coupling == 0.0:
    # Uncoupled blocks: exact per-block line search is steepest descent on
    # each block, so the gap contracts at least by Kantorovich's factor
    # ((kappa - 1) / (kappa + 1))^2 with kappa = 10 in every step.
    bound = (9 / 11) ** 2
    assert np.all(ratios[:40] <= bound * (1 + 1e-6)), ratios.max()
  else:
    # Weak coupling: still a fixed contraction per step (linear rate); the
    # factor (about 0.76 here) depends on the coupling, 0.85 bounds it.
    assert np.all(ratios[:40] <= 0.85), ratios.max()
  assert gaps[-1] < 1e-6 * gaps[0]
  # A single learning rate must stay below 2 / L_max = 2 / 1000 and then
  # crawls on the 0.01-scale block: the layer-wise steps are what converge.
  sgd = optax.sgd(1.0 / 1000)
  p_sgd, s_sgd = _block_quadratic(coupling)[1], sgd.init(params)
  for _ in range(60):
    u, s_sgd = sgd.update(jax.grad(loss)(p_sgd), s_sgd)
    p_sgd = optax.apply_updates(p_sgd, u)
  assert float(loss(p_sgd) - optimum) > 1e3 * gaps[-1]


def test_coupled_steps_solve_the_subspace_newton_system(x64):
  loss, params, _ = _block_quadratic(0.3, seed=3)
  tx = olw.layerwise_sgd(momentum=0.0, **EXACT,
                         max_relative_change=None, coupled=True,
                         max_step=1e6)
  _, updates, state = _jit_update(tx, loss)(params, tx.init(params))
  layers = olw.group_layers(params)
  g, hess, index = nets.dense_reference(loss, params, layers)
  m = nets.layer_matrix(hess, index, g, layers.num_layers)
  b = np.array([np.sum((index == l) * g * g) for l in range(3)])
  alpha = np.linalg.solve(m, b)
  assert np.all(alpha > 0)
  # float64 dense solve vs Cholesky solve of the same 3x3 system.
  np.testing.assert_allclose(_step_state(state).step_sizes, alpha, rtol=1e-8)
  # The coupled step is the exact minimiser over the 3-D layer subspace, so
  # no other per-layer steps do better: check against random perturbations.
  base = float(loss(optax.apply_updates(params, updates)))
  for k in range(5):
    other = alpha * (1 + 0.1 * np.random.default_rng(k).normal(size=3))
    moved = jax.tree_util.tree_map(
        lambda p, gg: p - gg, params,
        layers.scale(jax.grad(loss)(params), jnp.asarray(other)))
    assert float(loss(moved)) >= base - 1e-12


def test_coupled_needs_exact_estimator():
  with pytest.raises(ValueError, match="estimator='exact'"):
    olw.scale_by_layerwise_step_size(coupled=True)


def test_hutchinson_steps_are_reproducible_per_seed_and_step():
  params, loss_fn = nets.mlp(jax.random.PRNGKey(0), sizes=(5, 6, 4, 3, 2))
  tx_a = olw.layerwise_sgd(estimator="hutchinson", seed=3)
  tx_b = olw.layerwise_sgd(estimator="hutchinson", seed=4)
  run = lambda tx: _jit_update(tx, loss_fn)(params, tx.init(params))[2]
  a1, a2, b1 = run(tx_a), run(tx_a), run(tx_b)
  np.testing.assert_array_equal(_step_state(a1).curvatures,
                                _step_state(a2).curvatures)
  assert not np.array_equal(_step_state(a1).curvatures,
                            _step_state(b1).curvatures)


def test_update_interval_reuses_steps_between_measurements():
  # A convex loss (every layer's first measurement is accepted, so only the
  # interval schedules them; see the next test for the first interval).
  params, _ = nets.mlp(jax.random.PRNGKey(1))
  loss_fn = lambda p: sum(
      (i + 1.0) * jnp.sum((x - 0.3) ** 2)
      for i, x in enumerate(jax.tree_util.tree_leaves(p)))
  tx = olw.layerwise_sgd(estimator="exact", hvp="forward_over_reverse",
                         max_relative_change=None, update_interval=3)
  step = _jit_update(tx, loss_fn)
  state = tx.init(params)
  history = []
  for _ in range(7):
    params, _, state = step(params, state)
    history.append(np.asarray(_step_state(state).curvatures))
  assert np.array_equal(history[0], history[1])
  assert np.array_equal(history[1], history[2])
  assert not np.array_equal(history[2], history[3])
  assert np.array_equal(history[3], history[5])
  assert not np.array_equal(history[5], history[6])
  assert int(_step_state(state).num_accepted.max()) <= 3


def test_ema_smooths_accepted_steps():
  params, loss_fn = nets.mlp(jax.random.PRNGKey(2))
  plain = olw.layerwise_sgd(**EXACT,
                            max_relative_change=None, momentum=0.0)
  smooth = olw.layerwise_sgd(**EXACT,
                             max_relative_change=None, momentum=0.0, ema=0.5)
  s_plain, s_smooth = plain.init(params), smooth.init(params)
  step_plain, step_smooth = _jit_update(plain, loss_fn), _jit_update(
      smooth, loss_fn)
  _, _, s_smooth = step_smooth(params, s_smooth)
  first = np.asarray(_step_state(s_smooth).step_sizes)
  moved = jax.tree_util.tree_map(lambda p: p * 0.9, params)
  _, _, s_plain = step_plain(moved, s_plain)
  _, _, s_smooth = step_smooth(moved, s_smooth)
  raw = np.minimum(np.asarray(_step_state(s_plain).step_sizes), 1.0)
  # float32 steps computed by identical ops in both transforms.
  np.testing.assert_allclose(_step_state(s_smooth).step_sizes,
                             0.5 * first + 0.5 * raw, rtol=1e-5)


def test_gradient_difference_steps_are_close_to_exact():
  params, loss_fn = nets.mlp(_fresh_key())
  exact = olw.layerwise_sgd(**EXACT,
                            max_relative_change=None, momentum=0.0)
  diff = olw.layerwise_sgd(estimator="exact", update_interval=1,
                           max_relative_change=None, momentum=0.0,
                           hvp="gradient_difference")
  s_e = _jit_update(exact, loss_fn)(params, exact.init(params))[2]
  s_d = _jit_update(diff, loss_fn)(params, diff.init(params))[2]
  # Forward differences at the default relative step: O(1e-3) truncation and
  # O(1e-4) float32 round-off relative to each layer's curvature.
  np.testing.assert_allclose(_step_state(s_d).step_sizes,
                             _step_state(s_e).step_sizes, rtol=3e-2)


def test_secant_steps_on_a_quadratic_equal_b_over_q_exactly():
  # On a quadratic every secant is the Hessian, whatever the step: the first
  # step (tangents scaled by the bound) and the later ones (scaled by the
  # last steps) must all give alpha_l = b_l / d_l^T H_ll d_l.
  a = {"u": jnp.array([[4.0, 1.0], [1.0, 3.0]]), "v": jnp.array([[0.5]])}
  loss_fn = lambda p: (0.5 * p["u"]["w"] @ a["u"] @ p["u"]["w"]
                       + 0.5 * p["v"]["w"] @ a["v"] @ p["v"]["w"]
                       + p["u"]["w"][0] * p["v"]["w"][0])
  params = {"u": {"w": jnp.array([1.0, -2.0])}, "v": {"w": jnp.array([3.0])}}
  tx = olw.layerwise_sgd(momentum=0.5, max_step=10.0, update_interval=1,
                         hvp="secant", max_relative_change=None, ema=0.0)
  state = tx.init(params)
  step = _jit_update(tx, loss_fn)
  for _ in range(3):
    g = jax.grad(loss_fn)(params)
    trace = optax.tree.get(_step_state(state).direction_state, "trace")
    d = jax.tree_util.tree_map(lambda t, x: 0.5 * t + x, trace, g)
    params, _, state = step(params, state)
    for name in ("u", "v"):
      dl, gl = d[name]["w"], g[name]["w"]
      b, q = gl @ dl, dl @ a[name] @ dl
      got = _step_state(state)
      i = 0 if name == "u" else 1
      # float32 gradient differences of O(10) gradients at steps of O(0.1-1):
      # a few 1e-6 relative.
      np.testing.assert_allclose(got.curvatures[i], q, rtol=1e-4)
      if b > 0:
        np.testing.assert_allclose(got.step_sizes[i], min(b / q, 10.0),
                                   rtol=1e-4)
  assert int(_step_state(state).num_fallbacks.sum()) == 0


def test_secant_steps_match_the_secant_at_the_last_step(x64):
  # A tanh MLP (not quadratic): layer l's q_l is the secant
  # <d_l, g - grad f(theta - s_l d_l)> / s_l, s_l the step applied last.
  params, loss_fn = nets.mlp(_fresh_key(), dtype=jnp.float64)
  tx = olw.layerwise_sgd(momentum=0.0, max_relative_change=None,
                         max_step=1.0, update_interval=1, hvp="secant")
  step = _jit_update(tx, loss_fn)
  params, _, state = step(params, tx.init(params))
  last = np.asarray(_step_state(state).step_sizes)
  last = np.where(last > 0, last, 1.0)  # no step yet: measured at max_step
  layers = olw.group_layers(params)
  g = jax.grad(loss_fn)(params)
  want = []
  for l in range(layers.num_layers):
    mask = np.eye(layers.num_layers)[l]
    shifted = jax.tree_util.tree_map(
        lambda p, x: p - x, params, layers.scale(g, jnp.asarray(mask * last)))
    diff = jax.tree_util.tree_map(lambda a, b: a - b, g,
                                  jax.grad(loss_fn)(shifted))
    want.append(float(layers.inner(layers.scale(g, jnp.asarray(mask)),
                                   diff)[l]) / last[l])
  _, _, state = step(params, state)
  # float64: round-off only.
  np.testing.assert_allclose(_step_state(state).curvatures, want, rtol=1e-9)


def test_aliases_default_to_exact_blocks_every_40_steps():
  # The default measurement (docs/step_sizes.md): re-measured on steps 0 and
  # 40 only, each the exact diagonal blocks (no probe noise).
  params, loss_fn = nets.mlp(jax.random.PRNGKey(3))
  for tx in (olw.layerwise_sgd(), olw.layerwise_adamw()):
    step = _jit_update(tx, loss_fn)
    state = tx.init(params)
    p = params
    history = []
    for _ in range(41):
      p, _, state = step(p, state)
      history.append(np.asarray(_step_state(state).curvatures))
    changes = [i for i in range(1, 41)
               if not np.array_equal(history[i], history[i - 1])]
    assert changes == [40]
    s = _step_state(state)
    assert int((s.num_accepted + s.num_fallbacks).max()) == 2
  # Giving num_probes selects the paper's Hutchinson measurement, every step.
  tx = olw.layerwise_sgd(num_probes=2)
  state = _jit_update(tx, loss_fn)(params, tx.init(params))[2]
  state = _jit_update(tx, loss_fn)(params, state)[2]
  s = _step_state(state)
  assert int((s.num_accepted + s.num_fallbacks).max()) == 2


def test_a_layer_without_a_step_is_remeasured_in_the_first_interval():
  # Layer "b" has negative curvature (-b^2): every measurement is rejected,
  # so with initial_step = 0 it never moves. In the first interval (k = 5)
  # it is re-measured every step, then only every k: steps 0-4 and 5.
  loss_fn = lambda p: jnp.sum(p["a"]["w"] ** 2) - jnp.sum(p["b"]["w"] ** 2)
  params = {"a": {"w": jnp.array([1.0])}, "b": {"w": jnp.array([0.5])}}
  # max_step 0.25 < b / q = 0.5 keeps layer "a" from reaching 0 (where
  # b_l = 0 would be rejected too).
  tx = olw.layerwise_sgd(momentum=0.0, update_interval=5, max_step=0.25,
                         max_relative_change=None)
  step = _jit_update(tx, loss_fn)
  state = tx.init(params)
  for _ in range(10):
    params, _, state = step(params, state)
  s = _step_state(state)
  np.testing.assert_array_equal(s.num_fallbacks, [0, 6])
  np.testing.assert_array_equal(s.num_accepted, [6, 0])
  assert float(params["b"]["w"][0]) == 0.5


@pytest.mark.parametrize("bad", [dict(estimator="diagonal"),
                                 dict(hvp="finite_difference")])
def test_unknown_estimator_or_hvp_lists_the_choices(bad):
  with pytest.raises(ValueError, match="must be one of .*'row'|.*'secant'"):
    olw.layerwise_sgd(**bad)


@pytest.mark.parametrize("bad", [dict(estimator="hutchinson"),
                                 dict(estimator="exact", coupled=True)])
def test_forward_over_forward_needs_the_diagonal_blocks_alone(bad):
  with pytest.raises(ValueError, match="forward_over_forward.*diagonal"):
    olw.layerwise_sgd(hvp="forward_over_forward", **bad)


def test_a_custom_vjp_loss_falls_back_to_forward_over_reverse():
  """JAX cannot push a tangent through a ``jax.custom_vjp``: the default
  measurement warns and measures forward-over-reverse instead, the same
  steps as asking for it."""
  @jax.custom_vjp
  def act(x):
    return jnp.tanh(x)

  act.defvjp(lambda x: (jnp.tanh(x), x),
             lambda x, g: (g * (1 - jnp.tanh(x) ** 2),))
  params, loss_fn = nets.mlp(_fresh_key())
  loss = lambda p: loss_fn(p) + jnp.sum(act(p["layer0"]["w"]) ** 2)  # noqa
  states = []
  for hvp in (None, "forward_over_reverse"):
    tx = olw.layerwise_adamw(hvp=hvp)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      _, _, state = _jit_update(tx, loss)(params, tx.init(params))
    assert any("forward_over_reverse" in str(w.message)
               for w in caught) == (hvp is None)
    states.append(_step_state(state))
  np.testing.assert_allclose(states[0].step_sizes, states[1].step_sizes,
                             rtol=1e-6)
  assert np.any(np.asarray(states[0].step_sizes) > 0)


def test_aliases_take_forward_over_reverse_where_forward_cannot_serve():
  # hvp not given: the exact diagonal takes forward-over-forward, the
  # other measurements the Hessian-vector product (no error).
  for kwargs in (dict(estimator="hutchinson"), dict(coupled=True),
                 dict(num_probes=2)):
    olw.layerwise_adamw(**kwargs)


def test_secant_is_only_for_the_step_sizes():
  # CBLR / MCLR have no last steps to measure at.
  with pytest.raises(ValueError, match="hvp must be one of"):
    olw.scale_by_curvature_lr(hvp="secant")


def test_missing_value_fn_names_it_and_shows_the_call():
  params, loss_fn = nets.mlp(jax.random.PRNGKey(0))
  tx = olw.layerwise_sgd()
  with pytest.raises(ValueError) as err:
    tx.update(jax.grad(loss_fn)(params), tx.init(params), params)
  assert "value_fn" in str(err.value)
  assert "tx.update(" in str(err.value)


def test_params_updates_mismatch_is_named():
  params, loss_fn = nets.mlp(jax.random.PRNGKey(0))
  tx = olw.layerwise_sgd()
  grads = jax.grad(loss_fn)(params)
  del grads["layer0"]
  with pytest.raises(ValueError, match="updates"):
    tx.update(grads, tx.init(params), params, value_fn=loss_fn)


def test_negative_curvature_zero_direction_and_nan_never_give_nan():
  params = {"a": {"w": jnp.ones(3)}, "b": {"w": jnp.ones(2)}}
  # Layer a is concave: q_a < 0, its step must fall back (initial_step 0).
  loss = lambda p: -jnp.sum(p["a"]["w"] ** 2) + jnp.sum(p["b"]["w"] ** 2)
  tx = olw.layerwise_sgd(**EXACT,
                         max_relative_change=None, momentum=0.0)
  new, _, state = _jit_update(tx, loss)(params, tx.init(params))
  assert np.array_equal(_step_state(state).num_fallbacks, [1, 0])
  np.testing.assert_array_equal(new["a"]["w"], params["a"]["w"])
  np.testing.assert_allclose(new["b"]["w"], 0.0, atol=1e-7)

  # A zero gradient gives a zero direction: b = q = 0, no NaN, no move.
  flat = lambda p: 0.0 * jnp.sum(p["a"]["w"]) + jnp.sum(p["b"]["w"] ** 2)
  zero = {"a": {"w": jnp.zeros(3)}, "b": {"w": jnp.zeros(2)}}
  new, updates, state = _jit_update(tx, flat)(zero, tx.init(zero))
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(new))
  assert np.array_equal(_step_state(state).num_fallbacks, [1, 1])

  # A NaN in the gradient skips the step: zero update, state counts it.
  state = tx.init(params)
  grads = {"a": {"w": jnp.array([1.0, jnp.nan, 0.0])}, "b": {"w": jnp.ones(2)}}
  updates, state2 = jax.jit(
      lambda g, s, p: tx.update(g, s, p, value_fn=loss))(grads, state, params)
  assert all(np.all(u == 0) for u in jax.tree_util.tree_leaves(updates))
  assert int(_step_state(state2).num_skipped) == 1
  np.testing.assert_array_equal(optax.tree.get(
      _step_state(state2).direction_state, "trace")["a"]["w"], 0.0)


def test_chains_with_clipping_inject_hyperparams_and_apply_if_finite():
  params, loss_fn = nets.mlp(jax.random.PRNGKey(4))
  grads = jax.grad(loss_fn)(params)

  clipped = optax.chain(optax.clip_by_global_norm(1e-3),
                        olw.layerwise_sgd(**EXACT,
                                          max_relative_change=None))
  updates, _ = clipped.update(grads, clipped.init(params), params,
                              value_fn=loss_fn)
  plain = olw.layerwise_sgd(**EXACT, max_relative_change=None)
  ref, _ = plain.update(grads, plain.init(params), params, value_fn=loss_fn)
  # alpha = <g, d> / d^T H d is invariant to scaling g, except through
  # clipping at max_step: so the updates of clipped grads are no larger.
  assert sum(jnp.sum(u ** 2) for u in jax.tree_util.tree_leaves(updates)) <= (
      sum(jnp.sum(u ** 2) for u in jax.tree_util.tree_leaves(ref)) * 1.0001)

  # Plain inject_hyperparams: ints such as update_interval and seed arrive
  # traced, strings and bools stay static.
  injected = optax.inject_hyperparams(olw.layerwise_sgd)(
      scale=0.5, **EXACT, max_relative_change=None)
  state = injected.init(params)
  half, state = jax.jit(lambda g, s, p: injected.update(
      g, s, p, value_fn=loss_fn))(grads, state, params)
  for h, r in zip(jax.tree_util.tree_leaves(half),
                  jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(h, 0.5 * r, rtol=1e-5, atol=1e-8)
  assert float(state.hyperparams["scale"]) == 0.5

  guarded = optax.apply_if_finite(olw.layerwise_sgd(), max_consecutive_errors=3)
  state = guarded.init(params)
  bad = jax.tree_util.tree_map(lambda g: g * jnp.nan, grads)
  updates, state = guarded.update(bad, state, params, value_fn=loss_fn)
  assert int(state.notfinite_count) == 1
  assert all(np.all(u == 0) for u in jax.tree_util.tree_leaves(updates))


def test_jit_compiles_once_and_scan_matches_loop():
  params, loss_fn = nets.mlp(jax.random.PRNGKey(5))
  tx = olw.layerwise_adamw()
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    updates, state = tx.update(jax.grad(loss_fn)(params), state, params,
                               value_fn=loss_fn)
    return optax.apply_updates(params, updates), state

  p_loop, s_loop = params, tx.init(params)
  for _ in range(4):
    p_loop, s_loop = step(p_loop, s_loop)
  assert len(traces) == 1, "state shapes or dtypes changed between steps"

  def body(carry, _):
    return step(*carry), None

  (p_scan, s_scan), _ = jax.lax.scan(body, (params, tx.init(params)), None,
                                     length=4)
  for a, b in zip(jax.tree_util.tree_leaves((p_loop, s_loop)),
                  jax.tree_util.tree_leaves((p_scan, s_scan))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bfloat16_params_keep_float32_statistics():
  params, loss_fn = nets.mlp(jax.random.PRNGKey(6), dtype=jnp.bfloat16)
  tx = olw.layerwise_sgd(**EXACT, max_relative_change=None)
  state = tx.init(params)
  new, updates, state = _jit_update(tx, loss_fn)(params, state)
  assert _step_state(state).step_sizes.dtype == jnp.float32
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree_util.tree_leaves(updates))
  assert float(loss_fn(new)) < float(loss_fn(params))


class _LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(16)(x))
    x = jnp.tanh(nn.Dense(16)(x))
    return nn.Dense(3)(x)


def _classification_data(key, n=64):
  x = jax.random.normal(key, (n, 5))
  y = (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 0).astype(jnp.int32)
  return x, y


def _ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.mark.parametrize("make_tx", [olw.layerwise_sgd, olw.layerwise_adamw])
def test_trains_flax_linen_model(make_tx):
  x, y = _classification_data(jax.random.PRNGKey(0))
  model = _LinenMLP()
  params = model.init(jax.random.PRNGKey(1), x)
  loss_fn = lambda p: _ce(model.apply(p, x), y)
  tx = make_tx()
  state = tx.init(params)
  assert olw.group_layers(params).num_layers == 3  # one per nn.Dense
  step = _jit_update(tx, loss_fn)
  start = float(loss_fn(params))
  for _ in range(30):
    params, _, state = step(params, state)
  assert float(loss_fn(params)) < 0.7 * start


def test_trains_flax_nnx_model_through_optimizer_update():
  x, y = _classification_data(jax.random.PRNGKey(0))

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(5, 16, rngs=rngs)
      self.l2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
      return self.l2(jnp.tanh(self.l1(x)))

  model = Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, olw.layerwise_sgd(), wrt=nnx.Param)
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)

  @nnx.jit
  def train_step(model, optimizer):
    loss_of_params = lambda p: _ce(nnx.merge(graphdef, p, rest)(x), y)
    loss, grads = nnx.value_and_grad(lambda m: _ce(m(x), y))(model)
    optimizer.update(model, grads, value_fn=loss_of_params)
    return loss

  losses = [float(train_step(model, optimizer)) for _ in range(30)]
  assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("max_traces", [1, 2, 16])
def test_forward_blocks_in_groups_of_layers_match_the_dense_hessian(
    max_traces, monkeypatch, x64):
  """Beyond MAX_FORWARD_TRACES layers, consecutive layers share a trace
  (vmapped over masked tangents); every grouping gives the diagonal blocks
  and the decreases of the dense Hessian, along a random direction."""
  from jax.flatten_util import ravel_pytree
  from optax_layerwise import _curvature
  monkeypatch.setattr(_curvature, "MAX_FORWARD_TRACES", max_traces)
  key = _fresh_key()
  params, loss_fn = nets.mlp(key, sizes=(4, 3, 5, 3, 4, 2),
                             dtype=jnp.float64)
  layers = olw.group_layers(params)
  flat, unravel = ravel_pytree(params)
  d = np.asarray(jax.random.normal(jax.random.fold_in(key, 7), flat.shape,
                                   jnp.float64))
  forms = jax.jit(lambda p, t: _curvature.layer_curvatures_forward(
      loss_fn, p, t, layers))(params, unravel(d))
  g, hess, index = nets.dense_reference(loss_fn, params, layers)
  num = layers.num_layers
  b = np.array([np.sum((index == l) * g * d) for l in range(num)])
  q = np.diag(nets.layer_matrix(hess, index, d, num))
  # float64 end to end: round-off only.
  np.testing.assert_allclose(forms.decrease, b, rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(forms.curvature, q, rtol=1e-10,
                             atol=1e-12 * np.abs(q).max())
