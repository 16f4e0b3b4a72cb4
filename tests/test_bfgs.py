"""Tests of the array-level BFGS machinery (optax_layerwise._bfgs)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_layerwise import _bfgs


def _rng():
  return np.random.default_rng(np.random.SeedSequence().entropy)


def _spd(rng, d, cond=10.0):
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  m = (q * np.logspace(0, np.log10(cond), d)) @ q.T
  return 0.5 * (m + m.T)


def test_bfgs_update_satisfies_secant_and_matches_product_form(x64):
  rng = _rng()
  d = 7
  h = _spd(rng, d)
  s = rng.normal(size=d)
  y = _spd(rng, d) @ s  # s^T y > 0
  new, ok = _bfgs.bfgs_inverse_update(jnp.asarray(h), jnp.asarray(s),
                                      jnp.asarray(y), grad_norm=1.0)
  assert bool(ok)
  rho = 1 / (s @ y)
  v = np.eye(d) - rho * np.outer(y, s)
  # Float64 on O(1) data; the two forms differ only by round-off.
  np.testing.assert_allclose(new, v.T @ h @ v + rho * np.outer(s, s),
                             rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(new @ y, s, rtol=1e-10, atol=1e-12)  # secant
  # Symmetric to round-off (see _bfgs._symmetric_update).
  np.testing.assert_allclose(new, np.asarray(new).T, rtol=0,
                             atol=8 * np.finfo(float).eps * np.abs(h).max())


def test_bfgs_update_is_finite_where_its_terms_are():
  """Float32 with ``H y`` of 1e20 entries: ``s (H y)^T`` (1e8) is finite,
  but ``||H y||^2`` (2e40) is not; the symmetric form balances ``s`` and
  ``H y`` by their largest entries, so it does not overflow (``||H y||``
  gave an all-NaN ``H`` with ``ok`` true)."""
  new, ok = _bfgs.bfgs_inverse_update(
      jnp.eye(3), jnp.asarray([1e-12, 0.0, 0.0]), jnp.asarray([1e6, 0.0, 0.0]),
      grad_norm=1.0, hy=jnp.asarray([0.0, 1e20, 1e20]))
  assert np.all(np.isfinite(np.asarray(new)))
  if bool(ok):
    np.testing.assert_array_equal(np.asarray(new), np.asarray(new).T)


@pytest.mark.parametrize("case", ["negative", "tiny", "nonfinite"])
def test_bfgs_update_skip_rule(x64, case):
  rng = _rng()
  d = 5
  h = jnp.asarray(_spd(rng, d))
  s = rng.normal(size=d)
  gnorm = 3.0
  if case == "negative":
    y = -s
  elif case == "tiny":  # s^T y just below 1e-4 s^T s ||g||
    y = 0.99e-4 * gnorm * s
  else:
    y = s.copy()
    y[0] = np.inf
  new, ok = _bfgs.bfgs_inverse_update(h, jnp.asarray(s), jnp.asarray(y),
                                      grad_norm=gnorm)
  assert not bool(ok)
  np.testing.assert_array_equal(new, h)
  if case == "tiny":  # just above the threshold: accepted
    _, ok = _bfgs.bfgs_inverse_update(h, jnp.asarray(s),
                                      jnp.asarray(1.01e-4 * gnorm * s),
                                      grad_norm=gnorm)
    assert bool(ok)


def test_double_damping_postconditions(x64):
  rng = _rng()
  d, mu1, mu2 = 6, 0.2, np.sqrt(0.3)
  h = _spd(rng, d, cond=100.0)
  fired = {"powell": 0, "lm": 0}
  for _ in range(200):
    s = rng.normal(size=d) * 10 ** rng.uniform(-2, 2)
    y = rng.normal(size=d) * 10 ** rng.uniform(-2, 2)
    sd, yd, powell, lm = _bfgs.double_damping(
        jnp.asarray(s), jnp.asarray(y), jnp.asarray(h @ y), mu1=mu1, mu2=mu2)
    sd, yd = np.asarray(sd), np.asarray(yd)
    assert bool(powell) == (s @ y < mu1 * (y @ h @ y))
    if bool(powell):
      fired["powell"] += 1
      # Powell sets s^T y = mu1 y^T H y exactly (y unchanged by Powell).
      np.testing.assert_allclose(sd @ y, mu1 * (y @ h @ y), rtol=1e-9)
    if bool(lm):
      fired["lm"] += 1
      np.testing.assert_allclose(sd @ yd, mu2 * (sd @ sd), rtol=1e-9)
    else:
      np.testing.assert_array_equal(yd, y)
    # Afterwards always s^T y >= mu2 s^T s (1e-9: round-off of the equality).
    assert sd @ yd >= mu2 * (sd @ sd) * (1 - 1e-9)
  assert fired["powell"] > 0 and fired["lm"] > 0


def _dense_lbfgs(pairs, gamma, d, w=None):
  h = gamma * np.diag(np.ones(d) if w is None else w)
  for s, y in pairs:
    rho = 1 / (s @ y)
    v = np.eye(d) - rho * np.outer(y, s)
    h = v.T @ h @ v + rho * np.outer(s, s)
  return h


@pytest.mark.parametrize("num_pairs", [0, 2, 4])
@pytest.mark.parametrize("diagonal", [False, True])
def test_lbfgs_compact_form_equals_bfgs_recursion(x64, num_pairs, diagonal):
  rng = _rng()
  d, p, gamma = 6, 4, 0.7
  b = _spd(rng, d)
  memory = _bfgs.lbfgs_init(p, d, jnp.float64)
  # H_0 = gamma diag(w) (K-BFGS's diagonal start), set while empty.
  w = rng.uniform(0.1, 10.0, size=d) if diagonal else np.ones(d)
  memory = _bfgs.LimitedMemory(p).start(memory, jnp.asarray(diagonal),
                                        jnp.asarray(w))
  pairs = []
  for _ in range(num_pairs):
    s = rng.normal(size=d)
    y = b @ s
    memory, ok = _bfgs.lbfgs_append(memory, jnp.asarray(s), jnp.asarray(y),
                                    grad_norm=1.0)
    assert bool(ok)
    pairs.append((s, y))
  dense = _dense_lbfgs(pairs, gamma, d, w)
  v = rng.normal(size=(3, d))  # rows
  # Float64; compact form vs product form differ by round-off only.
  np.testing.assert_allclose(_bfgs.lbfgs_apply(memory, jnp.asarray(v), gamma),
                             v @ dense, rtol=1e-9, atol=1e-11)
  np.testing.assert_allclose(
      _bfgs.lbfgs_apply(memory, jnp.asarray(v[0]), gamma), dense @ v[0],
      rtol=1e-9, atol=1e-11)


def test_lbfgs_ring_buffer_keeps_the_last_pairs_and_skips_bad_ones(x64):
  rng = _rng()
  d, p = 5, 3
  b = _spd(rng, d)
  memory = _bfgs.lbfgs_init(p, d, jnp.float64)
  append = jax.jit(functools.partial(_bfgs.lbfgs_append, grad_norm=1.0))
  kept = []
  for i in range(7):
    s = rng.normal(size=d)
    y = b @ s if i != 4 else -s  # pair 4 has negative curvature: skipped
    memory, ok = append(memory, jnp.asarray(s), jnp.asarray(y))
    assert bool(ok) == (i != 4)
    if i != 4:
      kept.append((s, y))
  assert int(memory.num_pairs) == p
  # Stored scaled to ||s|| = 1 (the L-BFGS operator is the same).
  np.testing.assert_allclose(
      memory.s, np.stack([k[0] / np.linalg.norm(k[0]) for k in kept[-p:]]),
      rtol=1e-12)
  np.testing.assert_allclose(
      _bfgs.lbfgs_apply(memory, jnp.eye(d)), _dense_lbfgs(kept[-p:], 1.0, d),
      rtol=1e-9, atol=1e-11)


def test_hessian_action_update_is_exact_on_the_inverse(x64):
  rng = _rng()
  k = 6
  a = _spd(rng, k) + np.sqrt(0.3) * np.eye(k)
  abar = rng.normal(size=k)
  h = np.linalg.inv(a)
  s_a, y_a = _bfgs.hessian_action_pair(jnp.asarray(h), jnp.asarray(a),
                                       jnp.asarray(abar))
  np.testing.assert_allclose(y_a, abar, rtol=1e-10)  # y_a = A H_a abar
  new, ok = _bfgs.bfgs_inverse_update(jnp.asarray(h), s_a, y_a,
                                      grad_norm=np.linalg.norm(abar))
  assert bool(ok)
  # A BFGS update of the exact inverse with an exact pair changes nothing.
  np.testing.assert_allclose(new, h, rtol=1e-9, atol=1e-12)
  # From a wrong H_a, updates move H_a towards A^-1 along abar (secant).
  new, _ = _bfgs.bfgs_inverse_update(jnp.eye(k), abar, a @ abar,
                                     grad_norm=1.0)
  np.testing.assert_allclose(new @ (a @ abar), abar, rtol=1e-9)


# ---------------------------------------------------------------------------
# Double damping keeps H_g SPD with bounded eigenvalues.
#
# The paper (Goldfarb, Ren and Bahamou 2020) introduces double damping "to
# keep the upper as well as the lower bounds of the BFGS and L-BFGS
# approximations bounded" (abstract); its full text could not be consulted
# here, so the per-update bounds below are derived from the two damping rules
# (the same mechanism). Let H > 0 be the matrix before the update, y the
# incoming pair after Powell (which changes s), and y~ = t2 y + (1 - t2) s,
# t2 in (0, 1], after Levenberg-Marquardt.
#   (P) Powell: s^T y >= mu1 y^T H y >= mu1 lmin(H) ||y||^2, and s^T y <=
#       ||s|| ||y||, so ||y|| <= ||s|| / (mu1 lmin(H)).
#   (L) LM: s^T y~ >= mu2 ||s||^2; and ||y~|| <= max(||y||, ||s||).
#   So r := ||y~|| / ||s|| <= R := max(1, 1 / (mu1 lmin(H))).
# BFGS: H+ = V^T H V + rho s s^T with V = I - rho y~ s^T an oblique projector,
# ||V|| = ||y~|| ||s|| / s^T y~ <= r / mu2; and B+ = H+^-1 <= H^-1 + y~ y~^T /
# s^T y~. Hence
#   lmax(H+) <= lmax(H) R^2 / mu2^2 + 1 / mu2,                           (U)
#   lmin(H+) >= 1 / (1 / lmin(H) + R^2 / mu2).                           (D)
# Without damping neither ratio is bounded (s^T y can be ~0 or negative), so
# the stream below drives undamped BFGS to condition numbers > 1e12.
# ---------------------------------------------------------------------------


def _adversarial_pairs(rng, d, steps):
  """Pairs from a badly conditioned quadratic (cond 1e6), corrupted."""
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  b = (q * np.logspace(-3, 3, d)) @ q.T
  s = rng.normal(size=(steps, d)) * 10 ** rng.uniform(-3, 3, (steps, 1))
  y = s @ b
  kind = rng.integers(0, 5, steps)
  norm = np.linalg.norm(s, axis=1, keepdims=True)
  noise = rng.normal(size=(steps, d))
  y = np.where((kind == 1)[:, None], -y, y)          # negative curvature
  y = np.where((kind == 2)[:, None], 1e4 * y, y)     # huge y
  y = np.where((kind == 3)[:, None], 1e-6 * y + 1e-8 * noise, y)  # s^T y ~ 0
  y = np.where((kind == 4)[:, None], 1e3 * norm * noise, y)       # unrelated
  return s, y


@functools.partial(jax.jit, static_argnames=("damped", "mu1", "mu2"))
def _run_dense(s, y, *, damped, mu1, mu2):
  d = s.shape[1]

  def body(h, pair):
    si, yi = pair
    if damped:
      si, yi, _, _ = _bfgs.double_damping(si, yi, h @ yi, mu1=mu1, mu2=mu2)
    new, ok = _bfgs.bfgs_inverse_update(h, si, yi, grad_norm=1.0)
    return new, (h, new, si, yi, ok)

  return jax.lax.scan(body, jnp.eye(d, dtype=s.dtype), (s, y))[1]


def test_double_damping_keeps_h_g_spd_and_bounded(x64):
  rng = _rng()
  d, steps, mu1, mu2 = 8, 500, 0.2, float(np.sqrt(0.3))
  s, y = _adversarial_pairs(rng, d, steps)
  before, after, sd, yd, ok = map(np.asarray, _run_dense(
      jnp.asarray(s), jnp.asarray(y), damped=True, mu1=mu1, mu2=mu2))
  assert ok.sum() > steps // 2  # most damped pairs are usable
  for i in range(steps):
    h, new = before[i], after[i]
    # Symmetric to round-off, with no drift over the 500 updates (every
    # term of the update is the same product at (i, j) and (j, i)).
    assert np.abs(new - new.T).max() <= 8 * np.finfo(float).eps * np.abs(
        new).max()
    lam = np.linalg.eigvalsh(h)
    lam_new = np.linalg.eigvalsh(new)
    assert lam_new[0] > 0
    if not ok[i]:
      continue
    big_r = max(1.0, 1.0 / (mu1 * lam[0]))
    # 1e-9 relative slack for the round-off of eigvalsh on float64.
    assert sd[i] @ yd[i] >= mu2 * (sd[i] @ sd[i]) * (1 - 1e-9)
    assert lam_new[-1] <= (lam[-1] * big_r ** 2 / mu2 ** 2 + 1 / mu2) * (
        1 + 1e-9)                                                      # (U)
    assert lam_new[0] >= 1 / (1 / lam[0] + big_r ** 2 / mu2) * (1 - 1e-9)  # (D)
  # The stream is adversarial: undamped BFGS (same skip rule) breaks down.
  _, after_raw, _, _, _ = map(np.asarray, _run_dense(
      jnp.asarray(s), jnp.asarray(y), damped=False, mu1=mu1, mu2=mu2))
  cond_raw = max(np.linalg.cond(h) for h in after_raw
                 if np.all(np.isfinite(h)))
  cond_damped = max(np.linalg.cond(h) for h in after)
  assert cond_raw > 1e12 and cond_raw > 1e3 * cond_damped


def test_double_damping_bounds_lbfgs_operator(x64):
  rng = _rng()
  d, p, steps, mu1, mu2 = 8, 5, 500, 0.2, float(np.sqrt(0.3))
  s, y = _adversarial_pairs(rng, d, steps)

  @jax.jit
  def run(s, y):
    def body(mem, pair):
      hy = _bfgs.lbfgs_apply(mem, pair[1])
      si, yi, _, _ = _bfgs.double_damping(pair[0], pair[1], hy, mu1=mu1,
                                          mu2=mu2)
      mem, _ = _bfgs.lbfgs_append(mem, si, yi, grad_norm=1.0)
      return mem, (mem, _bfgs.lbfgs_apply(mem, jnp.eye(d, dtype=s.dtype)))
    return jax.lax.scan(body, _bfgs.lbfgs_init(p, d, s.dtype), (s, y))[1]

  mems, ops = run(jnp.asarray(s), jnp.asarray(y))
  for i in range(0, steps, 7):
    op = np.asarray(ops[i])
    # Symmetric up to round-off (the compact form is not exactly symmetric).
    np.testing.assert_allclose(op, op.T, rtol=1e-8, atol=1e-10 * np.abs(
        op).max())
    lam = np.linalg.eigvalsh(0.5 * (op + op.T))
    # The per-update bounds (U), (D) iterated along the stored pairs from
    # gamma I = I, with the pairs' actual ratios ||y||^2 / s^T y and
    # ||s||^2 / s^T y, which double damping made finite (s^T y >= mu2 s^T s).
    lo = hi = 1.0
    n = int(mems.num_pairs[i])
    for sj, yj in zip(np.asarray(mems.s[i])[p - n:],
                      np.asarray(mems.y[i])[p - n:]):
      sy = sj @ yj
      assert sy >= mu2 * (sj @ sj) * (1 - 1e-9)
      hi = hi * (yj @ yj) * (sj @ sj) / sy ** 2 + (sj @ sj) / sy
      lo = 1 / (1 / lo + (yj @ yj) / sy)
    assert lam[0] > 0
    assert lo * (1 - 1e-6) <= lam[0] and lam[-1] <= hi * (1 + 1e-6)


def test_bfloat16_products_are_exact_products_of_the_rounded_inputs():
  # K-BFGS's step products (_bfgs.product with dtype=bfloat16): the inputs
  # are rounded to bfloat16, the products accumulated in float32. Reference:
  # float64 products of the rounded inputs; the only error left is float32
  # accumulation, bounded by k * 2^-24 * (|x| @ |y|) entrywise.
  rng = _rng()
  k, d = 160, 96
  x = rng.normal(size=(k, k)).astype(np.float32)
  y = rng.normal(size=(k, d)).astype(np.float32)
  rounded = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)
  got = np.asarray(_bfgs.product(jnp.asarray(x), jnp.asarray(y),
                                 jnp.bfloat16))
  assert got.dtype == np.float32
  ref = rounded(x) @ rounded(y)
  bound = k * 2.0**-24 * (np.abs(rounded(x)) @ np.abs(rounded(y)))
  assert np.all(np.abs(got - ref) <= bound)
  # ... and they were rounded: far from the float32 product, by about
  # bfloat16's unit roundoff (2^-9) relative.
  exact = x.astype(np.float64) @ y.astype(np.float64)
  rel = np.linalg.norm(got - exact) / np.linalg.norm(exact)
  assert 2.0**-13 < rel < 2.0**-6, rel
  # None and the inputs' own dtype are the plain product.
  np.testing.assert_array_equal(
      _bfgs.product(jnp.asarray(x), jnp.asarray(y), None),
      jnp.asarray(x) @ jnp.asarray(y))
