"""The shared per-layer safeguard pipeline (_safeguards.py) against NumPy.

Each test draws fresh random inputs (the seed is in the failure message) and
compares with a plain NumPy re-implementation of the rules in the module
docstring.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_layerwise import _safeguards


@pytest.fixture
def rng():
  seed = int(np.random.SeedSequence().entropy % 2**32)
  return seed, np.random.default_rng(seed)


def _proposals(rng, num):
  """Raw values with some NaN / inf / negative entries, in float32."""
  raw = rng.lognormal(0.0, 2.0, num).astype(np.float32)
  raw[rng.random(num) < 0.2] *= -1
  raw[rng.random(num) < 0.1] = np.nan
  raw[rng.random(num) < 0.1] = np.inf
  return raw


def _np_accept(raw, valid, previous, num_accepted, initial, lower, upper,
               ema):
  seen = num_accepted > 0
  clipped = np.clip(np.nan_to_num(raw), lower, upper)
  smoothed = np.where(seen, ema * previous + (1 - ema) * clipped, clipped)
  fallback = np.where(seen, previous, initial)
  return np.where(valid, smoothed, fallback)


def _np_safeguard(raw, valid, previous, num_accepted, *, initial, lower,
                  upper, ema, limit):
  values = _np_accept(raw, valid, previous, num_accepted, initial, lower,
                      upper, ema).astype(previous.dtype)
  return values if limit is None else np.minimum(values, limit).astype(
      previous.dtype)


@pytest.mark.parametrize("with_limit", [False, True])
def test_safeguard_matches_numpy(rng, with_limit):
  seed, rng = rng
  num = 64
  for _ in range(5):
    raw = _proposals(rng, num)
    valid = rng.random(num) < 0.7
    previous = rng.uniform(0, 2, num).astype(np.float32)
    num_accepted = rng.integers(0, 3, num).astype(np.int32)
    lower = float(rng.uniform(0, 0.1))
    upper = rng.uniform(0.5, 5, num).astype(np.float32)
    ema = float(rng.choice([0.0, rng.uniform()]))
    initial = float(rng.uniform(0, 1))
    limit = None
    if with_limit:
      limit = rng.uniform(0, 3, num).astype(np.float32)
      limit[rng.random(num) < 0.2] = np.inf
    got = _safeguards.safeguard(
        jnp.asarray(raw), jnp.asarray(valid), jnp.asarray(previous),
        jnp.asarray(num_accepted), initial=initial, lower=lower,
        upper=jnp.asarray(upper), ema=ema,
        limit=None if limit is None else jnp.asarray(limit))
    want = _np_safeguard(raw, valid, previous, num_accepted, initial=initial,
                         lower=lower, upper=upper, ema=ema, limit=limit)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6,
                               err_msg=f"seed {seed}")
    # Accepted values before any average are clipped; a fallback or an
    # average with a larger previous value may exceed `upper` (a bound given
    # as `limit` applies on every path).
    accepted = np.asarray(_safeguards.accept(
        jnp.asarray(raw), jnp.asarray(valid), jnp.asarray(previous),
        jnp.asarray(num_accepted), initial=initial, lower=lower,
        upper=jnp.asarray(upper), ema=ema))
    fresh = valid & ((num_accepted == 0) | (ema == 0.0))
    assert np.all(accepted[fresh] <= upper[fresh]), seed
    assert np.all(accepted[fresh] >= np.float32(lower)), seed
    if limit is not None:
      assert np.all(np.asarray(got) <= limit), seed


def test_accept_falls_back_to_initial_before_any_accepted_value(rng):
  seed, rng = rng
  previous = rng.uniform(1, 2, 8).astype(np.float32)
  got = _safeguards.accept(
      jnp.full(8, jnp.nan), jnp.zeros(8, bool), jnp.asarray(previous),
      jnp.asarray([0, 1] * 4), initial=0.25, lower=0.0, upper=1.0, ema=0.5)
  np.testing.assert_array_equal(
      np.asarray(got), np.where(np.arange(8) % 2 == 1, previous, 0.25),
      err_msg=f"seed {seed}")


def test_usable_matches_numpy(rng):
  seed, rng = rng
  raw, curvature = _proposals(rng, 64), _proposals(rng, 64)
  floor = rng.uniform(0, 1, 64).astype(np.float32)
  want = np.isfinite(raw) & np.isfinite(curvature) & (curvature > floor)
  got = _safeguards.usable(jnp.asarray(raw), jnp.asarray(curvature),
                           jnp.asarray(floor))
  np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"seed {seed}")


def test_counts_and_keep_finite_match_numpy(rng):
  seed, rng = rng
  num = 32
  accepted = rng.integers(0, 9, num).astype(np.int32)
  fallbacks = rng.integers(0, 9, num).astype(np.int32)
  measured = bool(rng.random() < 0.5)
  valid = measured & (rng.random(num) < 0.5)
  got = _safeguards.counts(jnp.asarray(accepted), jnp.asarray(fallbacks),
                           jnp.asarray(measured), jnp.asarray(valid))
  np.testing.assert_array_equal(got[0], accepted + valid, err_msg=str(seed))
  np.testing.assert_array_equal(got[1], fallbacks + (measured & ~valid),
                                err_msg=str(seed))
  assert got[0].dtype == got[1].dtype == jnp.int32
  new, old = _proposals(rng, num), rng.normal(size=num).astype(np.float32)
  kept = _safeguards.keep_finite(jnp.asarray(new), jnp.asarray(old),
                                 jnp.asarray(measured), jnp.float32)
  np.testing.assert_array_equal(
      np.asarray(kept), np.where(measured & np.isfinite(new), new, old),
      err_msg=f"seed {seed}")


@pytest.mark.parametrize("until_accepted", [False, True])
def test_is_measured_schedule(rng, until_accepted):
  seed, rng = rng
  interval = int(rng.integers(2, 6))
  measured = jax.jit(lambda c, k, a: _safeguards.is_measured(
      c, k, None, a if until_accepted else None))
  for count in range(3 * interval):
    num_accepted = rng.integers(0, 2, 4).astype(np.int32)
    want = count % interval == 0 or (
        until_accepted and count < interval and np.any(num_accepted == 0))
    got = measured(jnp.int32(count), jnp.int32(interval),
                   jnp.asarray(num_accepted))
    assert bool(got) == want, (seed, count, interval, num_accepted)
  # A static interval of 1 measures every step, without lax.cond.
  assert bool(_safeguards.is_measured(jnp.int32(7), 1, 1))


def test_measure_or_reuse(rng):
  seed, rng = rng
  fresh, last = rng.normal(size=3), rng.normal(size=3)
  measure = lambda _: jnp.asarray(fresh, jnp.float32)
  reuse = lambda _: jnp.asarray(last, jnp.float32)
  pick = jax.jit(lambda m: _safeguards.measure_or_reuse(m, measure, reuse,
                                                        None))
  np.testing.assert_allclose(pick(True), fresh, rtol=1e-6, err_msg=str(seed))
  np.testing.assert_allclose(pick(False), last, rtol=1e-6, err_msg=str(seed))
  calls = []
  _safeguards.measure_or_reuse(jnp.asarray(True),
                               lambda _: calls.append("measure"),
                               lambda _: calls.append("reuse"), 1)
  assert calls == ["measure"]


def test_checked_layers_names_the_transform_and_the_fix():
  params = {"a": {"w": jnp.ones(3)}, "b": {"w": jnp.ones(2)}}
  partition = _safeguards.checked_layers(params, params, None, 2,
                                         transform="my_transform")
  assert partition.num_layers == 2
  with pytest.raises(ValueError, match="my_transform: the params have 2 "
                     "layers but the state was built for 3; re-run init."):
    _safeguards.checked_layers(params, params, None, 3,
                               transform="my_transform")
