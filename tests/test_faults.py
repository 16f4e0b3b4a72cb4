"""Non-finite values never reach the params or the state (issue 8, item 1).

Faults are injected at chosen steps into every transform, through one jitted
step per transform whose fault is a runtime code (so the faulty run and its
reference run execute the very same compiled program, and results can be
compared bit for bit):

* ``BAD_BATCH``: the batch's inputs are NaN (loss and gradient NaN);
* ``INF_GRAD``: one gradient entry is +inf (the loss is finite);
* ``NAN_VALUE``: ``value_fn`` returns NaN, the gradient is finite;
* ``NAN_HVP``: loss and gradient finite, every second derivative through the
  first layer NaN (a Hessian-vector product, K-BFGS's tangent pair);
* ``NAN_AWAY``: ``value_fn`` is NaN anywhere but at the current params (the
  K-BFGS secant pair is NaN; the first pass is clean).

Semantics checked (see the module docstrings of the transforms):

* a non-finite gradient (or, for K-BFGS, non-finite tapped statistics, i.e. a
  NaN loss) skips the whole step: zero update, the state unchanged but its
  skip counter, and ``count`` does not advance. So the run after the fault is
  *bit-identical* to a run from which the bad batch was removed (the
  Hutchinson probes are keyed by ``count``, and the alias's momentum and
  learning-rate stages are held too);
* a non-finite measurement (NaN loss or Hessian-vector product) with a finite
  gradient makes the affected layers fall back to their last step, counted
  per layer in ``num_fallbacks``; the diagnostics keep their last finite
  values;
* a non-finite K-BFGS pair skips that layer's ``s, y, H_g`` update, counted
  per layer in ``num_skipped_h_g``, and the (finite) step is still taken;
* estimators that do not call ``value_fn`` are not affected at all.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_layerwise as olw
from tests import tiny

CLEAN, BAD_BATCH, INF_GRAD, NAN_VALUE, NAN_HVP, NAN_AWAY = range(6)
NUM_BATCHES = 6

_FACTORIES = dict(tiny.TRANSFORMS)
_FACTORIES["kbfgs_tangent"] = lambda: olw.kbfgs(0.2, pair="tangent")


@functools.lru_cache(maxsize=None)
def _stepper(name):
  """``(tx, step)``: one compilation per transform and test process."""
  tx = _FACTORIES[name]()

  @jax.jit
  def step(params, state, x, t, code):
    x = jnp.where(code == BAD_BATCH, jnp.nan, x)
    poison = (code == NAN_HVP).astype(jnp.float32)
    grads = jax.grad(tiny.loss)(params, x, t, poison)
    inf = jnp.where(code == INF_GRAD, jnp.inf, 0.0)
    grads = {**grads, "l0": {**grads["l0"],
                             "w": grads["l0"]["w"].at[0, 0].add(inf)}}

    def value_fn(p):
      moved = jnp.any(jnp.stack([jnp.any(a != b) for a, b in zip(
          jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(params))]))
      bad = (code == NAN_VALUE) | ((code == NAN_AWAY) & moved)
      # A product, not a select, so that the derivatives are NaN as well.
      return tiny.loss(p, x, t, poison) * jnp.where(bad, jnp.nan, 1.0)

    updates, state = tx.update(grads, state, params, value_fn=value_fn)
    return optax.apply_updates(params, updates), state, updates

  return tx, step


def _problem():
  params = tiny.init_params(jax.random.PRNGKey(0))
  xs, ts = tiny.batches(jax.random.PRNGKey(1), NUM_BATCHES)
  return params, xs, ts


def _run(name, schedule):
  """Runs ``[(batch index, fault code), ...]``; returns the trajectory."""
  tx, step = _stepper(name)
  params, xs, ts = _problem()
  state = tx.init(params)
  out = [(params, state, None)]
  for i, code in schedule:
    params, state, updates = step(params, state, xs[i], ts[i], code)
    out.append((params, state, updates))
  return out


def _assert_trees_equal(a, b, what):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                  strict=True):
    np.testing.assert_array_equal(x, y, err_msg=what)


def _without_skip_counter(name, state):
  if name.startswith("kbfgs"):
    return state._replace(num_skipped=0)
  return (state[0]._replace(num_skipped=0),) + tuple(state[1:])


def _clean_schedule():
  return [(i, CLEAN) for i in range(NUM_BATCHES)]


def _with_faults(faults):
  """The clean schedule with ``{position: code}`` extra faulty steps."""
  schedule = []
  for i in range(NUM_BATCHES):
    if i in faults:
      schedule.append((i, faults[i]))
    schedule.append((i, CLEAN))
  return schedule


def _check_skips_equal_removed_batches(name, faults):
  faulty = _run(name, _with_faults(faults))
  clean = _run(name, _clean_schedule())
  params, state, _ = faulty[-1]
  ref_params, ref_state, _ = clean[-1]
  # Bit-identical: the same compiled step on the same inputs, since a
  # skipped step leaves the whole state (count included) as it was.
  _assert_trees_equal(params, ref_params, f"{name}: params")
  _assert_trees_equal(_without_skip_counter(name, state),
                      _without_skip_counter(name, ref_state), f"{name}: state")
  assert tiny.skip_count(name, state) == len(faults)
  assert tiny.tree_finite((params, state))
  # Every skipped step returned exactly zero updates.
  for k, (i, code) in enumerate(_with_faults(faults)):
    if code != CLEAN:
      updates = faulty[k + 1][2]
      assert all(not np.any(u) for u in jax.tree_util.tree_leaves(updates))
  # Training continued: the loss went down over the six clean batches.
  _, xs, ts = _problem()
  initial = faulty[0][0]
  total = lambda p: float(sum(tiny.loss(p, xs[i], ts[i])
                              for i in range(NUM_BATCHES)))
  assert total(params) < total(initial)


@pytest.mark.parametrize("name", sorted(tiny.TRANSFORMS))
def test_nonfinite_gradient_skips_the_step_like_a_removed_batch(name):
  # A NaN batch at step 2 and an Inf gradient entry at step 4 (counted from
  # 0 in the clean sequence): the run equals the run without those batches.
  _check_skips_equal_removed_batches(name, {2: BAD_BATCH, 4: INF_GRAD})


@pytest.mark.parametrize("name", ["kbfgs", "kbfgs_l"])
def test_kbfgs_nan_loss_skips_the_step_like_a_removed_batch(name):
  # K-BFGS reads value_fn's tapped statistics (the pre-activation gradients
  # are NaN when the loss is): the whole step is skipped even though the
  # incoming gradient is finite.
  _check_skips_equal_removed_batches(name, {1: NAN_VALUE, 3: NAN_VALUE})


@pytest.mark.parametrize("name", ["cblr_secant", "kbfgs"])
def test_faults_outside_what_a_transform_reads_change_nothing(name):
  # The secant estimator never calls value_fn; K-BFGS's secant pair uses
  # first derivatives only, so a NaN second derivative is never formed.
  codes = [NAN_HVP] if name == "kbfgs" else [NAN_VALUE, NAN_HVP]
  schedule = _clean_schedule()
  for pos, code in zip((2, 4), codes):
    schedule[pos] = (pos, code)
  faulty = _run(name, schedule)[-1]
  clean = _run(name, _clean_schedule())[-1]
  _assert_trees_equal(faulty[:2], clean[:2], name)


def _layer_stats(name, state):
  """(step sizes or rates, curvature diagnostics, fallbacks, count)."""
  head = tiny.head_state(name, state)
  steps = head.step_sizes if name.startswith("layerwise") else head.lrs
  return (np.asarray(steps), np.asarray(head.curvatures),
          np.asarray(head.num_fallbacks), int(head.count))


@pytest.mark.parametrize("name", ["layerwise_sgd", "layerwise_adamw", "cblr",
                                  "mclr"])
def test_nonfinite_measurement_falls_back_per_layer(name):
  schedule = [(0, CLEAN), (1, CLEAN), (2, NAN_VALUE), (3, CLEAN),
              (4, NAN_HVP), (5, CLEAN)]
  run = _run(name, schedule)
  num_layers = 2
  for k, (_, code) in enumerate(schedule):
    if code == CLEAN:
      continue
    _, before, _ = run[k]
    params, after, updates = run[k + 1]
    steps0, curv0, fall0, count0 = _layer_stats(name, before)
    steps1, curv1, fall1, count1 = _layer_stats(name, after)
    # The step is taken (count advances, nothing skipped) ...
    assert count1 == count0 + 1 and tiny.skip_count(name, after) == 0
    assert tiny.tree_finite((params, after, updates))
    # ... with the affected layers on their last step, counted per layer.
    # NaN loss: every layer's measurement is NaN. NaN second derivative
    # through layer 0: only layer 0's, both with Hessian-vector products
    # (CBLR, MCLR: the product is NaN in layer 0's entries only) and with
    # the layer-wise aliases' per-layer second directional derivatives
    # (layer 1's tangent enters after layer 0).
    hit = list(range(num_layers)) if code == NAN_VALUE else [0]
    for layer in hit:
      assert fall1[layer] == fall0[layer] + 1, (code, layer)
      # The last step (rate), shortened if this step's displacement bound
      # (max_relative_change, which depends on the new direction) is lower.
      assert 0 < steps1[layer] <= steps0[layer], (code, layer)
      assert curv1[layer] == curv0[layer], (code, layer)  # last finite kept
    if code == NAN_HVP:
      assert curv1[1] != curv0[1]  # layer 1 was measured as usual
  final_params, final_state, _ = run[-1]
  assert tiny.tree_finite((final_params, final_state))


@pytest.mark.parametrize("name,code,hit", [
    ("kbfgs", NAN_AWAY, [0, 1]),       # NaN loss at theta + delta
    ("kbfgs_l", NAN_AWAY, [0, 1]),
    ("kbfgs_tangent", NAN_HVP, [0]),   # NaN directional derivative, layer 0
])
def test_kbfgs_nonfinite_pair_skips_that_layers_update(name, code, hit):
  schedule = [(0, CLEAN), (1, CLEAN), (2, code), (3, CLEAN)]
  run = _run(name, schedule)
  _, before, _ = run[2]
  params, after, updates = run[3]
  assert int(after.count) == int(before.count) + 1  # the step is taken
  assert int(after.num_skipped) == 0
  assert tiny.tree_finite((params, after, updates))
  assert float(optax.global_norm(updates)) > 0
  skipped = np.asarray(after.num_skipped_h_g) - np.asarray(
      before.num_skipped_h_g)
  for layer, (old, new) in enumerate(zip(before.layers, after.layers)):
    if layer in hit:
      assert skipped[layer] == 1
      # s, y and H_g (or the L-BFGS memory) untouched by the bad pair.
      _assert_trees_equal((old.s, old.y, old.h_g), (new.s, new.y, new.h_g),
                          f"{name} layer {layer}")
    else:
      assert skipped[layer] == 0
      assert not np.array_equal(old.h_g, new.h_g)
    # H_a is updated from the (finite) first pass as usual.
    assert not np.array_equal(old.h_a, new.h_a)
  final_params, final_state, _ = run[-1]
  assert tiny.tree_finite((final_params, final_state))


def test_small_loss_weights_drop_nan_examples_and_the_transform_skips():
  """A NaN example: dropped and counted, and its NaN gradient is skipped.

  ``small_loss_weights`` keeps the logged loss finite, but the backward pass
  of a NaN example is NaN even with a zero weight (0 * NaN): the transform
  must skip that step rather than write NaN into the params.
  """
  params, xs, ts = _problem()
  x = xs[0].at[3].set(jnp.nan)
  t = ts[0]
  tx = olw.layerwise_sgd()

  def per_example(p):
    return jax.vmap(lambda xi, ti: tiny.loss(p, xi[None], ti[None]))(x, t)

  def value_fn(p):
    losses = per_example(p)
    return olw.small_loss_weights(losses, 0.25).mean(losses)

  @jax.jit
  def step(p, state):
    sel = olw.small_loss_weights(per_example(p), 0.25)
    loss, grads = jax.value_and_grad(value_fn)(p)
    updates, state = tx.update(grads, state, p, value_fn=value_fn)
    return optax.apply_updates(p, updates), state, loss, sel

  new, state, loss, sel = step(params, tx.init(params))
  assert int(sel.num_nonfinite) == 1 and int(sel.num_dropped) == 3  # 1 + 2
  assert np.isfinite(float(loss))
  assert int(state[0].num_skipped) == 1 and int(state[0].count) == 0
  _assert_trees_equal(new, params, "params after the skipped step")
