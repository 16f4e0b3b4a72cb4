"""Tests for the curvature oracles (_curvature.py) against jax.hessian."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_layerwise as olw
from optax_layerwise import _checks
from optax_layerwise import _curvature
from tests import nets

PROBLEMS = {"mlp": nets.mlp, "cnn": nets.cnn}


def _exact_forms(loss_fn, params, d, layers, **hvp_kwargs):
  return jax.jit(lambda p, v: _curvature.layer_quadratic_forms(
      _curvature.make_hvp(loss_fn, p, **hvp_kwargs), v, layers,
      estimator="exact"))(params, d)


def _direction(key, params):
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(treedef, [
      jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_exact_forms_match_dense_hessian_float64(problem, x64):
  seed = np.random.SeedSequence().entropy % 2**31  # fresh draw every run
  key = jax.random.PRNGKey(seed)
  params, loss_fn = PROBLEMS[problem](key, dtype=jnp.float64)
  d = _direction(jax.random.fold_in(key, 7), params)
  layers = olw.group_layers(params)
  forms = _exact_forms(loss_fn, params, d, layers)
  g, hess, index = nets.dense_reference(loss_fn, params, layers)
  dflat = nets.ravel(d)
  want_b = np.array([np.sum((index == l) * g * dflat)
                     for l in range(layers.num_layers)])
  want_m = nets.layer_matrix(hess, index, dflat, layers.num_layers)
  # float64: both routes are exact up to round-off (~1e-14); 1e-8 relative
  # (on the matrix scale) leaves ample room yet catches any wrong block.
  scale = np.abs(want_m).max()
  np.testing.assert_allclose(forms.decrease, want_b, rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(forms.matrix, want_m, rtol=1e-8, atol=1e-10 * scale)
  np.testing.assert_allclose(forms.curvature, np.diag(want_m), rtol=1e-8,
                             atol=1e-10 * scale)
  np.testing.assert_allclose(nets.ravel(forms.grad), g, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_exact_forms_float32_tolerance(problem):
  key = jax.random.PRNGKey(np.random.SeedSequence().entropy % 2**31)
  params, loss_fn = PROBLEMS[problem](key)
  d = _direction(jax.random.fold_in(key, 3), params)
  layers = olw.group_layers(params)
  forms = _exact_forms(loss_fn, params, d, layers)
  with jax.enable_x64(True):
    p64, loss64 = PROBLEMS[problem](key, dtype=jnp.float64)
    _, hess, index = nets.dense_reference(loss64, p64, layers)
  want_m = nets.layer_matrix(hess, index, nets.ravel(d), layers.num_layers)
  # float32 forward-over-reverse through ~4 layers accumulates a few hundred
  # ulps (u = 6e-8) relative to the largest entry: 1e-4 of the matrix scale.
  scale = np.abs(want_m).max()
  np.testing.assert_allclose(forms.matrix, want_m, atol=1e-4 * scale)


def test_hutchinson_is_unbiased(x64):
  key = jax.random.PRNGKey(np.random.SeedSequence().entropy % 2**31)
  params, loss_fn = nets.mlp(key, sizes=(4, 5, 4, 3, 2), dtype=jnp.float64)
  d = _direction(jax.random.fold_in(key, 1), params)
  layers = olw.group_layers(params)
  hvp = _curvature.make_hvp(loss_fn, params)
  exact = _exact_forms(loss_fn, params, d, layers)
  num_draws = 2000
  draws = jax.jit(jax.vmap(lambda k: _curvature.layer_quadratic_forms(
      hvp, d, layers, estimator="hutchinson", num_probes=1, key=k).curvature))(
          jax.random.split(jax.random.fold_in(key, 2), num_draws))
  # q_hat_l = M_ll + sum_{m != l} e_l e_m M_lm: the products e_l e_m are
  # pairwise uncorrelated +-1, so Var(q_hat_l) = sum_{m != l} M_lm^2 and the
  # mean of N draws has standard error sqrt(Var / N). Allow 5 standard errors.
  m = np.asarray(exact.matrix)
  std_err = np.sqrt((np.sum(m ** 2, axis=1) - np.diag(m) ** 2) / num_draws)
  err = np.abs(np.mean(draws, axis=0) - np.diag(m))
  assert np.all(err <= 5 * std_err + 1e-12), (err, std_err)
  # And the estimator really is random (not the exact value every draw).
  assert np.all(np.std(draws, axis=0) > 0.1 * np.sqrt(num_draws) * std_err)


def test_gradient_difference_hvp_accuracy():
  key = jax.random.PRNGKey(np.random.SeedSequence().entropy % 2**31)
  params, loss_fn = nets.mlp(key)
  d = _direction(jax.random.fold_in(key, 5), params)
  layers = olw.group_layers(params)
  g = jax.grad(loss_fn)(params)
  exact = _exact_forms(loss_fn, params, d, layers)
  approx = _exact_forms(loss_fn, params, d, layers,
                        method="gradient_difference", grad=g)
  # Forward difference: truncation O(eps) with eps = 1e-3 (1 + ||theta||) /
  # ||v|| plus float32 round-off O(6e-8 / eps): a few percent of the scale.
  scale = np.abs(np.asarray(exact.matrix)).max()
  np.testing.assert_allclose(approx.curvature, exact.curvature,
                             atol=5e-2 * scale)


@pytest.mark.parametrize("scaled", [False, True])
def test_row_and_scaled_forms_match_dense_hessian_float64(scaled, x64):
  key = jax.random.PRNGKey(np.random.SeedSequence().entropy % 2**31)
  params, loss_fn = nets.mlp(key, dtype=jnp.float64)
  d = _direction(jax.random.fold_in(key, 4), params)
  layers = olw.group_layers(params)
  num_layers = layers.num_layers
  s = (np.asarray(jax.random.uniform(jax.random.fold_in(key, 5),
                                     (num_layers,), minval=0.1, maxval=3.0))
       if scaled else np.ones(num_layers))
  forms = lambda est: jax.jit(lambda p, v: _curvature.layer_quadratic_forms(
      _curvature.make_hvp(loss_fn, p), v, layers, estimator=est,
      tangent_scales=s if scaled else None))(params, d)
  _, hess, index = nets.dense_reference(loss_fn, params, layers)
  want_m = nets.layer_matrix(hess, index, nets.ravel(d), num_layers)
  # row: q_l = M_ll + sum_{m != l} (s_m / s_l) M_lm, i.e. (M s)_l / s_l;
  # exact: the tangent scales are divided back out, M is unchanged.
  want_row = want_m @ s / s
  scale = np.abs(want_m).max()
  # float64 forward-over-reverse: round-off ~1e-14 of the matrix scale.
  np.testing.assert_allclose(forms("row").curvature, want_row,
                             atol=1e-10 * scale * s.max() / s.min())
  np.testing.assert_allclose(forms("exact").matrix, want_m,
                             atol=1e-10 * scale)
  assert forms("row").matrix is None


def test_secant_hvp_is_the_gradient_difference_at_the_given_step(x64):
  key = jax.random.PRNGKey(np.random.SeedSequence().entropy % 2**31)
  params, loss_fn = nets.mlp(key, dtype=jnp.float64)
  v = _direction(jax.random.fold_in(key, 6), params)
  g = jax.grad(loss_fn)(params)
  step = -0.3  # a finite step: the secant differs from H v (tanh MLP)
  _, hv = _curvature.make_hvp(loss_fn, params, method="gradient_difference",
                              grad=g, step=step)(v)
  shifted = jax.tree_util.tree_map(lambda p, t: p + step * t, params, v)
  want = (nets.ravel(jax.grad(loss_fn)(shifted)) - nets.ravel(g)) / step
  np.testing.assert_allclose(nets.ravel(hv), want, rtol=1e-10, atol=1e-12)
  _, exact = _curvature.make_hvp(loss_fn, params)(v)
  # ... which is not H v: the step is finite (a check that `step` is used).
  assert np.abs(nets.ravel(hv) - nets.ravel(exact)).max() > 1e-6


def test_secant_of_a_quadratic_is_exact_at_any_step():
  a = jnp.array([[3.0, 1.0], [1.0, 2.0]])
  loss_fn = lambda p: 0.5 * p["x"] @ a @ p["x"] + jnp.sum(p["x"])
  params = {"x": jnp.array([0.5, -1.0])}
  g = jax.grad(loss_fn)(params)
  v = {"x": jnp.array([2.0, -1.0])}
  for step in (-1.0, 1e-3, 10.0):
    _, hv = _curvature.make_hvp(loss_fn, params, method="gradient_difference",
                                grad=g, step=step)(v)
    # float32 difference of O(10) gradients divided by the step: ~1e-6 / |s|.
    np.testing.assert_allclose(hv["x"], a @ v["x"], rtol=1e-5,
                               atol=1e-5 / abs(step))


def test_value_fn_must_return_a_float_scalar():
  params, _ = nets.mlp(jax.random.PRNGKey(0))
  layers = olw.group_layers(params)
  bad = _curvature.make_hvp(lambda p: jnp.ones(3), params)
  with pytest.raises(ValueError, match="float scalar"):
    _curvature.layer_quadratic_forms(bad, params, layers, estimator="exact")
  with pytest.raises(ValueError, match="value_fn"):
    _checks.require_value_fn(None, transform="t")
