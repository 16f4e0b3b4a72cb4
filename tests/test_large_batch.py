"""Tests for the large-batch helpers (_large_batch.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_layerwise as olw

# ------------------------------------------------------ batch_size_schedule ---


def test_batch_size_schedule_kinds():
  constant = olw.batch_size_schedule(256)
  assert [constant(s) for s in (0, 10, 10**6)] == [256, 256, 256]

  steps = olw.batch_size_schedule(
      256, boundaries_and_factors={200: 4, 100: 2}, max_batch_size=1500)
  assert [steps(s) for s in (0, 99, 100, 199, 200, 10**6)] == [
      256, 256, 512, 512, 1500, 1500]  # 2048 capped at 1500

  ramp = olw.batch_size_schedule(256, end_batch_size=4096,
                                 transition_begin=10, transition_steps=100)
  assert ramp(0) == ramp(10) == 256
  assert ramp(60) == 256 + 1920  # half-way
  assert ramp(110) == ramp(10**6) == 4096
  sizes = [ramp(s) for s in range(0, 120)]
  assert sizes == sorted(sizes)  # monotone

  coarse = olw.batch_size_schedule(256, end_batch_size=4096,
                                   transition_steps=100, multiple_of=512)
  sizes = {coarse(s) for s in range(200)}
  assert all(b % 512 == 0 for b in sizes) and len(sizes) <= 9
  assert coarse(0) == 512 and coarse(200) == 4096  # 256 rounds half up
  # Works with concrete array steps (e.g. an optimizer's step counter).
  assert steps(jnp.asarray(150)) == 512 and steps(np.int64(250)) == 1500


def test_batch_size_schedule_rejects_bad_configs():
  with pytest.raises(ValueError, match="not both"):
    olw.batch_size_schedule(8, boundaries_and_factors={1: 2},
                            end_batch_size=16, transition_steps=4)
  with pytest.raises(ValueError, match="ramp"):
    olw.batch_size_schedule(8, end_batch_size=16)
  with pytest.raises(ValueError, match="factors"):
    olw.batch_size_schedule(8, boundaries_and_factors={1: 0})
  with pytest.raises(ValueError, match="init_batch_size"):
    olw.batch_size_schedule(0)


# ------------------------------------------------------- small_loss_weights ---


def _reference_kept(losses, fraction):
  """NumPy reference: indices kept (finite, not among the k smallest)."""
  losses = np.asarray(losses, np.float64)
  finite = np.flatnonzero(np.isfinite(losses))
  k = math.floor(fraction * len(losses) + 1e-6)
  order = finite[np.argsort(losses[finite], kind="stable")]
  return set(order[k:].tolist())


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.29, 0.5, 0.7, 1.0])
def test_small_loss_weights_drops_exactly_the_requested_count(fraction):
  rng = np.random.default_rng()
  n = 100
  losses = rng.exponential(size=n).astype(np.float32)
  sel = olw.small_loss_weights(losses, fraction)
  k = {0.0: 0, 0.1: 10, 0.29: 29, 0.5: 50, 0.7: 70, 1.0: 100}[fraction]
  kept = np.flatnonzero(np.asarray(sel.weights) > 0)
  assert len(kept) == n - k and int(sel.num_dropped) == k
  assert set(kept.tolist()) == _reference_kept(losses, fraction)
  if k < n:
    # Every dropped loss is <= every kept one, and the weights average the
    # kept losses: mean(w * l) == mean of the kept.
    dropped = np.setdiff1d(np.arange(n), kept)
    if len(dropped):
      assert losses[dropped].max() <= losses[kept].min()
    np.testing.assert_allclose(np.asarray(sel.weights)[kept], n / (n - k),
                               rtol=1e-6)
    np.testing.assert_allclose(np.mean(sel.weights * losses),
                               losses[kept].mean(), rtol=1e-5)
  else:
    assert np.all(np.asarray(sel.weights) == 0)


def test_small_loss_weights_ties_are_broken_by_position():
  losses = jnp.array([1.0, 0.5, 0.5, 0.5, 2.0, 0.5])
  sel = olw.small_loss_weights(losses, 0.5)  # drop 3 of the four 0.5s
  np.testing.assert_array_equal(np.asarray(sel.weights) > 0,
                                [True, False, False, False, True, True])
  same = olw.small_loss_weights(jnp.full((7,), 3.0), 3 / 7)
  np.testing.assert_array_equal(np.asarray(same.weights) > 0,
                                [False] * 3 + [True] * 4)


def test_small_loss_weights_never_keeps_a_nan_silently():
  losses = jnp.array([0.3, jnp.nan, 5.0, 0.1, jnp.inf, 2.0, -jnp.inf, 1.0])
  sel = olw.small_loss_weights(losses, 0.25)  # k = 2 of the finite ones
  w = np.asarray(sel.weights)
  assert w[1] == 0 and w[4] == 0 and w[6] == 0  # non-finite: dropped
  np.testing.assert_array_equal(w > 0, [False, False, True, False, False,
                                        True, False, True])
  assert int(sel.num_nonfinite) == 3 and int(sel.num_dropped) == 5
  # The plain weighted mean is NaN (0 * nan), the safe mean is the kept mean.
  with np.errstate(invalid="ignore"):
    assert np.isnan(np.mean(w * np.asarray(losses)))
  np.testing.assert_allclose(sel.mean(losses), np.mean([5.0, 2.0, 1.0]),
                             rtol=1e-6)
  # All non-finite: nothing kept, all weights zero, every example reported.
  bad = olw.small_loss_weights(jnp.full((4,), jnp.nan), 0.0)
  assert np.all(np.asarray(bad.weights) == 0)
  assert int(bad.num_nonfinite) == 4 and int(bad.num_dropped) == 4
  assert float(bad.mean(jnp.full((4,), jnp.nan))) == 0.0


def test_small_loss_weights_under_jit_and_vmap():
  rng = np.random.default_rng()
  batch = rng.exponential(size=(5, 32)).astype(np.float32)
  batch[2, 7] = np.nan
  eager = [olw.small_loss_weights(row, 0.25) for row in batch]
  jitted = jax.jit(olw.small_loss_weights)(batch[0], 0.25)  # traced fraction
  np.testing.assert_array_equal(jitted.weights, eager[0].weights)
  mapped = jax.jit(jax.vmap(olw.small_loss_weights, in_axes=(0, None)))(
      batch, 0.25)
  assert mapped.weights.shape == (5, 32)  # static output shape
  for row, sel in enumerate(eager):
    np.testing.assert_array_equal(mapped.weights[row], sel.weights)
  np.testing.assert_array_equal(mapped.num_nonfinite, [0, 0, 1, 0, 0])
  np.testing.assert_array_equal(mapped.num_dropped, [8, 8, 9, 8, 8])
  # A per-row fraction, vmapped: row r drops floor(f_r * 32) examples.
  fractions = jnp.array([0.0, 0.125, 0.5, 0.75, 1.0])
  per_row = jax.vmap(olw.small_loss_weights)(batch, fractions)
  np.testing.assert_array_equal(per_row.num_dropped, [0, 4, 16 + 1, 24, 32])


def test_small_loss_weights_gradient_flows_through_kept_losses_only():
  x = jnp.array([0.1, 2.0, 0.5, 3.0])

  def loss(theta):
    losses = theta * x
    return olw.small_loss_weights(losses, 0.5).mean(losses)

  # Kept: 2.0 and 3.0, so loss = theta * 2.5 and d loss / d theta = 2.5.
  np.testing.assert_allclose(jax.grad(loss)(1.0), 2.5, rtol=1e-6)


def test_small_loss_weights_rejects_bad_inputs():
  with pytest.raises(ValueError, match="per-example"):
    olw.small_loss_weights(jnp.ones((2, 3)), 0.1)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    olw.small_loss_weights(jnp.ones(4), 1.5)
