"""Precision: low-precision params, float64, BFGS invariants (issue 8, item 3).

State dtypes (what the tests below pin down):

* every statistic a transform keeps is in the *statistics dtype*: float32 for
  bfloat16 / float16 / float32 params, float64 for float64 params (with
  ``jax_enable_x64``); see ``_layers.stats_dtype``. That covers the per-layer
  steps, rates, curvatures, the wrapped direction transform of the layer-wise
  step sizes (Adam's moments: float16 cannot hold Adam's ``eps`` nor the
  square of a gradient above 256), the secant estimator's previous iterate,
  and all of K-BFGS (momentum, ``A``, ``H_a``, ``H_g`` / L-BFGS pairs,
  ``s``, ``y``);
* the updates returned are in the params' dtypes;
* exception: the momentum stage of the ``cblr`` / ``mclr`` aliases is
  ``optax.trace``, whose buffer has the params' dtype (optax's behaviour for
  every optimizer; it accumulates updates, not statistics).
"""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_layerwise as olw
from optax_layerwise import _bfgs
from tests import tiny

STEPS = 12
NUM_BATCHES = 4


def _train(name, dtype):
  """Trains ``STEPS`` steps under one ``jit(scan)``; returns what to check."""
  tx = tiny.TRANSFORMS[name]()
  params = tiny.init_params(jax.random.PRNGKey(0), dtype)
  xs, ts = tiny.batches(jax.random.PRNGKey(1), NUM_BATCHES)
  xs, ts = xs.astype(dtype), ts.astype(jnp.float32)

  def mean_loss(p):
    return jnp.mean(jax.vmap(lambda x, t: tiny.loss(p, x, t))(xs, ts))

  @jax.jit
  def run(params):
    def body(carry, i):
      p, s = carry
      x, t = xs[i % NUM_BATCHES], ts[i % NUM_BATCHES]
      value_fn = lambda q: tiny.loss(q, x, t)
      u, s = tx.update(jax.grad(value_fn)(p), s, p, value_fn=value_fn)
      return (optax.apply_updates(p, u), s), u

    state = tx.init(params)
    (p, s), us = jax.lax.scan(body, (params, state), jnp.arange(STEPS))
    last = jax.tree_util.tree_map(lambda u: u[-1], us)
    return p, s, last, mean_loss(params), mean_loss(p)

  return run(params)


def _float_dtypes(tree):
  return {jnp.dtype(x.dtype) for x in jax.tree_util.tree_leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.inexact)}


def _check(name, dtype, stats_dtype, result):
  params, state, updates, before, after = result
  assert tiny.tree_finite((params, state, updates))
  assert all(x.dtype == dtype for x in jax.tree_util.tree_leaves(params))
  assert all(u.dtype == dtype for u in jax.tree_util.tree_leaves(updates))
  stats = tiny.head_state(name, state)
  assert _float_dtypes(stats) == {jnp.dtype(stats_dtype)}, name
  if name in ("cblr", "mclr", "cblr_secant"):  # the chained Optax stages
    for part in state[1:]:  # (momentum, when on, keeps the params' dtype)
      assert _float_dtypes(part) <= {jnp.dtype(dtype)}
  assert tiny.skip_count(name, state) == 0
  # The loss went down. The margin is modest: 12 steps of a tiny problem,
  # and bfloat16 rounds params to 3 significant digits.
  assert float(after) < 0.9 * float(before), (float(before), float(after))


@pytest.mark.parametrize("name", sorted(tiny.TRANSFORMS))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16],
                         ids=["bfloat16", "float16"])
def test_low_precision_params_train_with_float32_statistics(name, dtype):
  _check(name, dtype, jnp.float32, _train(name, dtype))


@pytest.mark.parametrize("name", ["layerwise_adamw", "mclr", "cblr_secant",
                                  "kbfgs_l"])
def test_float64_params_train_with_float64_statistics(name):
  # One representative per code path (direction state, Hutchinson diagonal,
  # secant iterate, K-BFGS factors) keeps compilations few.
  with jax.enable_x64(True):
    _check(name, jnp.float64, jnp.float64, _train(name, jnp.float64))


def test_float16_overflowing_step_is_skipped_not_written():
  # lr = 1e8 makes every K-BFGS step overflow float16 (max 65504): the step
  # is skipped and counted, the params stay exactly as they were.
  params = tiny.init_params(jax.random.PRNGKey(0), jnp.float16)
  xs, ts = tiny.batches(jax.random.PRNGKey(1), 1)
  value_fn = lambda p: tiny.loss(p, xs[0].astype(jnp.float16), ts[0])
  tx = olw.kbfgs(1e8, max_relative_change=None)  # no bound: it must overflow
  updates, state = jax.jit(lambda p, s: tx.update(
      jax.grad(value_fn)(p), s, p, value_fn=value_fn))(params, tx.init(params))
  assert int(state.num_skipped) == 1 and int(state.count) == 0
  assert all(not np.any(u) for u in jax.tree_util.tree_leaves(updates))


# ---------------------------------------------------------------------------
# Property-based BFGS / L-BFGS invariants (float64 via x64).
#
# Tolerances. Every check is in float64 (eps = 2.2e-16) on problems whose
# condition numbers are drawn up to 1e3:
# * symmetry: every term of the BFGS update is some x_i x_j, the same
#   product at (i, j) and (j, i), so a symmetric H stays symmetric up to XLA
#   re-rounding a fused entry (none measured; 8 ulps of the largest entry
#   allowed). The compact L-BFGS form is not symmetric by construction:
#   its asymmetry is round-off of a few matrix products, bounded by ~d p eps
#   times the terms' magnitudes (1e-9 of the largest entry is generous and
#   still ~1e6 times smaller than any real asymmetry would be).
# * positive definiteness: the smallest eigenvalue is > 0 (exact theory for
#   s^T y > 0; the computed matrices have condition numbers < 1e10, far from
#   float64's 1e16 limit).
# * the secant equation H+ y = s: H+ y is a sum of terms that cancel to s;
#   its round-off is a few eps times the sum of the terms' norms (``scale``
#   below), and 1e3 eps covers the d <= 8 products and the rank-two terms.
# ---------------------------------------------------------------------------

_SETTINGS = hypothesis.settings(
    max_examples=30, deadline=None, derandomize=True, database=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
_EPS = np.finfo(np.float64).eps

# Jitted once per shape (op-by-op dispatch would compile every primitive of
# every shape); the thresholds are traced arguments.
_bfgs_update = jax.jit(lambda h, s, y, g: _bfgs.bfgs_inverse_update(
    h, s, y, grad_norm=g))
_lbfgs_append = jax.jit(lambda m, s, y: _bfgs.lbfgs_append(m, s, y,
                                                           grad_norm=1.0))
_lbfgs_apply = jax.jit(_bfgs.lbfgs_apply)
_damping = jax.jit(lambda s, y, hy, mu2: _bfgs.double_damping(s, y, hy,
                                                              mu2=mu2))
_action_pair = jax.jit(_bfgs.hessian_action_pair)


def _spd(rng, d, log_cond):
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  m = (q * np.logspace(0, log_cond, d)) @ q.T
  return 0.5 * (m + m.T)


def _secant_atol(h, s, y):
  """Round-off bound of ``H+ y`` for ``H+`` the BFGS update of ``h``."""
  h, s, y = (np.asarray(v) for v in (h, s, y))
  rho = 1 / (s @ y)
  hy = h @ y
  ny = np.linalg.norm(y)
  scale = (np.linalg.norm(h) * ny
           + (rho ** 2 * (y @ hy) + rho) * (s @ s) * ny
           + 2 * abs(rho) * np.linalg.norm(s) * np.linalg.norm(hy) * ny)
  return 1e3 * _EPS * scale


def _assert_symmetric_pd(h, atol):
  h = np.asarray(h)
  assert np.all(np.isfinite(h))
  assert np.abs(h - h.T).max() <= atol, np.abs(h - h.T).max()
  assert np.linalg.eigvalsh(0.5 * (h + h.T))[0] > 0


@_SETTINGS
@hypothesis.given(
    d=st.integers(1, 8), seed=st.integers(0, 2**32 - 1),
    log_cond_h=st.floats(0, 3), log_cond_b=st.floats(0, 3),
    log_scale=st.floats(-3, 3))
def test_bfgs_inverse_update_invariants(d, seed, log_cond_h, log_cond_b,
                                        log_scale):
  with jax.enable_x64(True):
    rng = np.random.default_rng(seed)
    h = _spd(rng, d, log_cond_h) * 10 ** rng.uniform(-2, 2)
    s = rng.normal(size=d) * 10 ** log_scale
    y = _spd(rng, d, log_cond_b) @ s  # s^T y >= lmin(B) ||s||^2 > 0
    new, ok = _bfgs_update(jnp.asarray(h), jnp.asarray(s), jnp.asarray(y),
                           1.0)
    # Accepted: s^T y >= 1e-3 ||s||^2 > 1e-4 ||s||^2 (skip rule, ||g|| = 1).
    assert bool(ok)
    new = np.asarray(new)
    _assert_symmetric_pd(new, 8 * _EPS * np.abs(new).max())
    np.testing.assert_allclose(new @ y, s, rtol=0, atol=_secant_atol(h, s, y))


@_SETTINGS
@hypothesis.given(
    # A few shapes only: every (memory, d) pair compiles its own ops.
    d=st.sampled_from([1, 2, 5, 8]), memory=st.sampled_from([1, 2, 5]),
    num_pairs=st.integers(1, 8), seed=st.integers(0, 2**32 - 1),
    log_cond=st.floats(0, 2))
def test_lbfgs_operator_invariants(d, memory, num_pairs, seed, log_cond):
  with jax.enable_x64(True):
    rng = np.random.default_rng(seed)
    mem = _bfgs.lbfgs_init(memory, d, jnp.float64)
    for _ in range(num_pairs):
      s = rng.normal(size=d) * 10 ** rng.uniform(-1, 1)
      y = _spd(rng, d, log_cond) @ s
      mem, ok = _lbfgs_append(mem, jnp.asarray(s), jnp.asarray(y))
      assert bool(ok)
    assert int(mem.num_pairs) == min(memory, num_pairs)
    op = np.asarray(_lbfgs_apply(mem, jnp.eye(d)))
    _assert_symmetric_pd(op, 1e-9 * np.abs(op).max())
    # The secant equation holds for the newest pair (the last update).
    hy = np.asarray(_lbfgs_apply(mem, jnp.asarray(y)))
    scale = np.linalg.norm(s) + np.abs(op).max() * np.linalg.norm(y) * d
    np.testing.assert_allclose(hy, s, rtol=0, atol=1e3 * _EPS * scale)
    # The operator applied to rows is the operator applied to each vector.
    np.testing.assert_allclose(op @ y, hy, rtol=0, atol=1e3 * _EPS * scale)


@_SETTINGS
@hypothesis.given(
    d_in=st.integers(1, 6), d_out=st.sampled_from([1, 2, 5]),
    bias=st.booleans(), n=st.integers(1, 16), seed=st.integers(0, 2**32 - 1),
    damping=st.floats(0.01, 0.9))
def test_kbfgs_factor_updates_keep_invariants_on_random_layer_shapes(
    d_in, d_out, bias, n, seed, damping):
  """K-BFGS's own sequence on a random dense layer shape.

  ``H_a``: Hessian-action updates against running ``A + sqrt(lambda) I``;
  ``H_g``: double-damped BFGS updates with noisy pairs (damped, so the
  secant equation holds for the damped pair). Both stay symmetric positive
  definite, and each accepted update satisfies its secant equation.
  """
  with jax.enable_x64(True):
    rng = np.random.default_rng(seed)
    k = d_in + bias
    mu2 = float(np.sqrt(damping))
    a = np.zeros((k, k))
    h_a = h_g = None
    for step in range(4):
      inputs = rng.normal(size=(n, d_in)) * 10 ** rng.uniform(-1, 1, d_in)
      if bias:
        inputs = np.concatenate([inputs, np.ones((n, 1))], axis=1)
      a_batch = inputs.T @ inputs / n
      a = a_batch if step == 0 else 0.9 * a + 0.1 * a_batch
      a_damped = a + np.sqrt(damping) * np.eye(k)
      if h_a is None:
        # Symmetrised, as the library's first inverse is: the update keeps
        # a symmetric H symmetric, it does not repair an asymmetric one.
        inverse = np.linalg.inv(a_damped)
        h_a = jnp.asarray(0.5 * (inverse + inverse.T))
        h_g = jnp.eye(d_out)
      abar = inputs.mean(axis=0)
      s_a, y_a = _action_pair(h_a, jnp.asarray(a_damped), jnp.asarray(abar))
      old = h_a
      h_a, ok_a = _bfgs_update(h_a, s_a, y_a, np.linalg.norm(abar))
      _assert_symmetric_pd(h_a, 8 * _EPS * np.abs(h_a).max())
      if bool(ok_a):  # (skipped only for a near-zero abar)
        np.testing.assert_allclose(h_a @ y_a, s_a, rtol=0,
                                   atol=_secant_atol(old, s_a, y_a))
      s = rng.normal(size=d_out)
      y = rng.normal(size=d_out) * 10 ** rng.uniform(-2, 2)  # any sign
      s_d, y_d, _, _ = _damping(jnp.asarray(s), jnp.asarray(y),
                                h_g @ jnp.asarray(y), mu2)
      old = h_g
      h_g, ok_g = _bfgs_update(h_g, s_d, y_d, 1.0)
      _assert_symmetric_pd(h_g, 8 * _EPS * np.abs(h_g).max())
      assert bool(ok_g)  # damped: s^T y >= mu2 ||s||^2 > 1e-4 ||s||^2
      np.testing.assert_allclose(h_g @ y_d, s_d, rtol=0,
                                 atol=_secant_atol(old, s_d, y_d))
