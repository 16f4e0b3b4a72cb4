"""Determinism (issue 8, item 5).

* The same seed gives bit-identical params and state across two separate
  compilations of the same training loop, and across two processes.
* The Hutchinson probes depend only on the transform's ``seed`` and the step
  count: step ``k`` draws from ``fold_in(PRNGKey(seed), k)``, whatever the
  params or gradients, and a skipped step does not consume a count.
"""

import functools
import hashlib
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_layerwise as olw
from optax_layerwise import _curvature
from tests import tiny

STEPS = 8
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_fn(name):
  """A fresh function object each call, hence a fresh jit compilation."""
  tx = tiny.TRANSFORMS[name]()
  xs, ts = tiny.batches(jax.random.PRNGKey(1), STEPS)

  def train(params):
    def body(carry, batch):
      p, s = carry
      value_fn = lambda q: tiny.loss(q, *batch)
      u, s = tx.update(jax.grad(value_fn)(p), s, p, value_fn=value_fn)
      return (optax.apply_updates(p, u), s), None

    return jax.lax.scan(body, (params, tx.init(params)), (xs, ts))[0]

  return train


def _digest(tree) -> str:
  h = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(tree):
    h.update(np.asarray(leaf).tobytes())
  return h.hexdigest()


_SCRIPT = textwrap.dedent("""
    import jax
    from tests import test_determinism as T, tiny
    params = tiny.init_params(jax.random.PRNGKey(0))
    print(T._digest(jax.jit(T._train_fn({name!r}))(params)))
""")


# layerwise_sgd draws Hutchinson probes; K-BFGS has the most state.
@pytest.mark.parametrize("name,other_process", [("layerwise_sgd", True),
                                                ("kbfgs", False)])
def test_same_seed_is_bit_identical_across_compilations(name, other_process):
  params = tiny.init_params(jax.random.PRNGKey(0))
  first = jax.jit(_train_fn(name))
  second = jax.jit(_train_fn(name))  # another function: compiled anew
  a = first(params)
  b = second(params)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                  strict=True):
    np.testing.assert_array_equal(x, y)
  assert tiny.tree_finite(a)
  if other_process:  # and a third compilation, in a fresh interpreter
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(name=name)], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == _digest(a)


_REAL_RADEMACHER = _curvature.rademacher


class _ProbeSpy:
  """Records every probe draw (its key and signs) of the transforms.

  The draws happen inside ``jax.jit``: :func:`_spy` wraps the library's sign
  generator and reports each draw's key and signs through an ordered
  ``jax.debug.callback`` into the one module-level record, so that a step
  compiled (and cached) under one test still reports to the next test.
  """
  draws: list = []

  def __init__(self, monkeypatch):
    _ProbeSpy.draws.clear()
    self.draws = _ProbeSpy.draws
    monkeypatch.setattr(_curvature, "rademacher", _spy)


def _record(key_data, signs):
  _ProbeSpy.draws.append((np.asarray(key_data), np.asarray(signs)))


def _spy(key, shape, dtype=jnp.float32):
  signs = _REAL_RADEMACHER(key, shape, dtype)
  jax.debug.callback(_record, jax.random.key_data(key), signs, ordered=True)
  return signs


# The seed is injected (optax.inject_hyperparams), so that one compiled step
# serves every seed; num_probes sets a shape and stays static.
_PROBED = {
    "layerwise_sgd (Hutchinson layer signs)": lambda seed: (
        optax.inject_hyperparams(olw.layerwise_sgd, static_args=(
            "num_probes",))(num_probes=2, seed=seed)),
    "mclr (Hutchinson signs over every entry)": lambda seed: (
        optax.inject_hyperparams(olw.mclr, static_args=("num_probes",))(
            0.1, num_probes=2, seed=seed)),
}


@functools.lru_cache(maxsize=None)
def _probe_step(name):
  """One compiled step per transform: the seed is in the injected state."""
  tx = _PROBED[name](0)

  @jax.jit
  def step(params, state, x, t, loss_scale, skip):
    value_fn = lambda q: loss_scale * tiny.loss(q, x, t)
    grads = jax.grad(value_fn)(params)
    grads = jax.tree_util.tree_map(
        lambda g: jnp.where(skip, jnp.nan, g), grads)
    updates, state = tx.update(grads, state, params, value_fn=value_fn)
    return optax.apply_updates(params, updates), state

  return step


def _probe_run(spy, name, seed, params, loss_scale, steps, skip_at=None):
  """Runs ``steps`` jitted updates; returns the probe draws and the state."""
  xs, ts = tiny.batches(jax.random.PRNGKey(5), 4)
  step = _probe_step(name)
  state = _PROBED[name](seed).init(params)
  start = len(spy.draws)
  for i in range(steps):
    params, state = step(params, state, xs[i % 4], ts[i % 4], loss_scale,
                         i == skip_at)
    jax.block_until_ready(params)
  jax.effects_barrier()
  return spy.draws[start:], state.inner_state


@pytest.mark.parametrize("name", sorted(_PROBED))
def test_probes_depend_only_on_seed_and_step_count(monkeypatch, name):
  spy = _ProbeSpy(monkeypatch)
  steps = 3
  one = tiny.init_params(jax.random.PRNGKey(0))
  other = tiny.init_params(jax.random.PRNGKey(7))  # other params, gradients
  draws_a, _ = _probe_run(spy, name, 11, one, 1.0, steps)
  draws_b, _ = _probe_run(spy, name, 11, other, 3.0, steps)
  draws_c, _ = _probe_run(spy, name, 12, one, 1.0, steps)
  assert len(draws_a) == len(draws_b) == len(draws_c) >= steps, name
  per_step = len(draws_a) // steps
  for k, ((key_a, a), (key_b, b), (key_c, c)) in enumerate(
      zip(draws_a, draws_b, draws_c)):
    if per_step == 1:  # one draw a step, keyed fold_in(PRNGKey(seed), count)
      want = jax.random.key_data(jax.random.fold_in(jax.random.PRNGKey(11),
                                                    k))
      np.testing.assert_array_equal(key_a, want)
    # (mclr splits that key into one key per leaf before drawing.)
    np.testing.assert_array_equal(key_a, key_b)
    np.testing.assert_array_equal(a, b)  # same seed and count: same signs
    assert not np.array_equal(key_a, key_c)
  # Another seed draws other signs (3 steps of >= 8 signs each: a
  # coincidence has probability < 2^-24; the seeds are fixed, so the test is
  # deterministic anyway).
  assert any(not np.array_equal(a, c) for (_, a), (_, c) in zip(draws_a,
                                                                draws_c))


def test_a_skipped_step_does_not_consume_a_probe_count(monkeypatch):
  spy = _ProbeSpy(monkeypatch)
  name = "layerwise_sgd (Hutchinson layer signs)"
  params = tiny.init_params(jax.random.PRNGKey(0))
  clean, clean_state = _probe_run(spy, name, 3, params, 1.0, 3)
  faulty, faulty_state = _probe_run(spy, name, 3, params, 1.0, 4, skip_at=1)
  # Draws: counts 0, 1 (the skipped step measures, then is discarded), 1, 2.
  keys = [key for key, _ in faulty]
  np.testing.assert_array_equal(keys[1], keys[2])
  # After the skip the probes are those of the clean run at the same count.
  np.testing.assert_array_equal(faulty[2][1], clean[1][1])
  np.testing.assert_array_equal(faulty[3][1], clean[2][1])
  assert int(faulty_state[0].count) == int(clean_state[0].count) == 3
  assert int(faulty_state[0].num_skipped) == 1
