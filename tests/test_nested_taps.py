"""K-BFGS on layers called inside nested transforms: ``nn.scan``, ``nn.RNN``.

Their statistics leave the inner trace through shadow accumulators
(``optax_layerwise/_shadows.py``). The references are the same models
written without the transform, whose layers K-BFGS taps directly (checked
against NumPy in tests/test_kbfgs.py and tests/test_kinds_reference.py):

* a stack of blocks scanned by ``nn.scan`` (params stacked on a leading
  axis) equals the unrolled stack of separate layers holding the slices:
  one set of Kronecker factors per slice;
* ``nn.RNN`` over ``nn.OptimizedLSTMCell`` (kernels applied fused, broadcast
  over time) equals a Python loop over time calling one ``nn.LSTMCell``
  (the same params; the rows of all steps pooled, the reused-kernel case).

Float64, several steps, params and every factor compared at rtol 1e-8: both
sides do the same arithmetic in another order (a scan's sums against a
loop's), so they agree to round-off; a lost slice or time step changes them
at 1e-2 or more.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_layerwise as olw

DEPTH, WIDTH, STEPS = 3, 4, 5


def _seed():
  return int(np.random.SeedSequence().entropy % 2**31)


class _Block(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    return jnp.tanh(nn.Dense(WIDTH, param_dtype=jnp.float64)(x)), None


class _Scanned(nn.Module):

  @nn.compact
  def __call__(self, x):
    x, _ = nn.scan(_Block, variable_axes={"params": 0},
                   split_rngs={"params": True}, length=DEPTH)(
                       name="stack")(x, None)
    return nn.Dense(2, param_dtype=jnp.float64, name="head")(x)


class _Unrolled(nn.Module):

  @nn.compact
  def __call__(self, x):
    for j in range(DEPTH):
      x = jnp.tanh(nn.Dense(WIDTH, param_dtype=jnp.float64,
                            name=f"layer{j}")(x))
    return nn.Dense(2, param_dtype=jnp.float64, name="head")(x)


def _unstack(params):
  """The scanned model's params as the unrolled model's."""
  stack = params["stack"]["Dense_0"]
  out = {f"layer{j}": jax.tree_util.tree_map(lambda x, j=j: x[j], stack)
         for j in range(DEPTH)}
  return {**out, "head": params["head"]}


def _run(model, params, batches, tx):
  """``STEPS`` K-BFGS steps; the params and the state after each."""
  state = tx.init(params)
  history = []

  @jax.jit
  def step(params, state, batch):
    x, t = batch
    loss = lambda p: jnp.mean((model.apply({"params": p}, x) - t) ** 2)
    updates, state = tx.update(jax.grad(loss)(params), state, params,
                               value_fn=loss)
    return optax.apply_updates(params, updates), state

  for batch in batches:
    params, state = step(params, state, batch)
    history.append((params, state))
  return history


def _batches(key, shape, targets):
  keys = jax.random.split(key, 2 * STEPS)
  return [(jax.random.normal(keys[2 * i], shape, jnp.float64),
           3.0 * jax.random.normal(keys[2 * i + 1], shape[:-1] + (targets,),
                                   jnp.float64))
          for i in range(STEPS)]


# Nested calls give no per-row output gradients, so their H_g starts from
# I, not K-BFGS's default diagonal: the direct runs start there too.
ALL_ROWS = dict(input_factor_row_stride=1, step_size_row_stride=1,
                h_g_init="identity")


def _close(a, b, what):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-8,
                             atol=1e-10 * float(np.abs(b).max() + 1e-300),
                             err_msg=what)


# K-BFGS(L) takes the same taps (checked here), its H_g the same pairs
# (checked on dense layers against NumPy in test_kbfgs / test_kinds_reference).
@pytest.mark.parametrize("memory", [None])
def test_scanned_stack_has_the_factors_of_its_unrolled_layers(x64, memory):
  key = jax.random.PRNGKey(_seed())
  x = jnp.zeros((6, 5, WIDTH), jnp.float64)
  params = _Scanned().init(key, x)["params"]
  batches = _batches(jax.random.fold_in(key, 1), (6, 5, WIDTH), 2)
  # All rows: the unrolled layers' calls are direct, whose statistics the
  # defaults sample; a scanned stack's are not sampled.
  tx = olw.kbfgs(memory_size=memory, **ALL_ROWS)
  names = olw.kbfgs_layer_names(params)
  assert names == ("['head']",) + tuple(
      f"['stack']['Dense_0'][{j}]" for j in range(DEPTH))
  scanned = _run(_Scanned(), params, batches, tx)
  unrolled = _run(_Unrolled(), _unstack(params), batches, tx)
  order = {n: i for i, n in enumerate(olw.kbfgs_layer_names(
      _unstack(params)))}
  twins = {"['head']": "['head']", **{
      f"['stack']['Dense_0'][{j}]": f"['layer{j}']" for j in range(DEPTH)}}
  for step, ((p_s, s_s), (p_u, s_u)) in enumerate(zip(scanned, unrolled)):
    jax.tree_util.tree_map(
        lambda a, b, step=step: _close(a, b, f"params, step {step}"),
        _unstack(p_s), p_u)
    for i, name in enumerate(names):
      twin = order[twins[name]]
      jax.tree_util.tree_map(
          lambda a, b, name=name, step=step: _close(
              a, b, f"{name} factors, step {step}"),
          s_s.layers[i], s_u.layers[twin])
      assert int(s_s.num_powell[i]) == int(s_u.num_powell[twin])
  print("Powell fired", int(scanned[-1][1].num_powell.sum()), "times")


class _FusedRNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    cell = nn.OptimizedLSTMCell(5, param_dtype=jnp.float64, name="cell")
    return nn.Dense(2, param_dtype=jnp.float64, name="head")(
        nn.RNN(cell)(x))


class _LoopRNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    cell = nn.LSTMCell(5, param_dtype=jnp.float64, name="cell")
    carry = cell.initialize_carry(jax.random.PRNGKey(0), x[:, 0].shape)
    outs = []
    for t in range(x.shape[1]):
      carry, y = cell(carry, x[:, t])
      outs.append(y)
    return nn.Dense(2, param_dtype=jnp.float64, name="head")(
        jnp.stack(outs, axis=1))


@pytest.mark.parametrize("pair", ["secant", "tangent"])
def test_rnn_cell_statistics_combine_all_time_steps(x64, pair):
  key = jax.random.PRNGKey(_seed())
  x = jnp.zeros((4, 4, 3), jnp.float64)
  params = _FusedRNN().init(key, x)["params"]
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
      _LoopRNN().init(key, x)["params"])
  report = olw.kbfgs_coverage(
      lambda p: jnp.sum(_FusedRNN().apply({"params": p}, x)), params)
  assert report.fraction == 1.0, str(report)
  batches = _batches(jax.random.fold_in(key, 1), (4, 4, 3), 2)
  tx = olw.kbfgs(pair=pair, **ALL_ROWS)  # the loop's cell calls are direct
  fused = _run(_FusedRNN(), params, batches, tx)
  loop = _run(_LoopRNN(), params, batches, tx)
  for step, ((p_f, s_f), (p_l, s_l)) in enumerate(zip(fused, loop)):
    jax.tree_util.tree_map(
        lambda a, b, step=step: _close(a, b, f"step {step}"),
        (p_f, s_f.layers, s_f.step_sizes), (p_l, s_l.layers, s_l.step_sizes))
    np.testing.assert_array_equal(s_f.num_powell, s_l.num_powell)


def test_scanned_layers_are_found_in_the_whole_variables_dict():
  """``value_fn`` may take ``{"params": ...}``: a scope path is matched as
  the end of the leaf's key path."""
  x = jnp.ones((3, 5, WIDTH), jnp.float64)
  variables = _Scanned().init(jax.random.PRNGKey(_seed()), x)
  loss = lambda v: jnp.sum(_Scanned().apply(v, x) ** 2)
  report = olw.kbfgs_coverage(loss, variables)
  assert report.fraction == 1.0, str(report)


def test_frozen_teacher_and_cell_subclass_are_left_alone():
  """A frozen network with the same module names (distillation), scanned
  by nn.RNN, is not tapped; its calls do not take the student's shadows.
  A subclass of ``nn.OptimizedLSTMCell`` with its own ``__call__`` runs as
  written (the tap's loss is the loss), untapped."""

  class HalfCell(nn.OptimizedLSTMCell):

    @nn.compact
    def __call__(self, carry, inputs):
      (c, h), y = super().__call__(carry, inputs)
      return (c, 0.5 * h), 0.5 * y

  x = jax.random.normal(jax.random.PRNGKey(_seed()), (4, 5, 3))
  for cell, tapped in ((nn.OptimizedLSTMCell(6), True), (HalfCell(6), False)):
    model = nn.RNN(cell)
    student = model.init(jax.random.PRNGKey(0), x)["params"]
    teacher = model.init(jax.random.PRNGKey(1), x)["params"]
    loss = lambda p, m=model, t=teacher: jnp.mean(
        (m.apply({"params": p}, x) - m.apply({"params": t}, x)) ** 2)
    res = olw.tap_dense_layers(loss, student)
    np.testing.assert_allclose(res.loss, loss(student), rtol=1e-6)
    assert len(res.layers) == (8 if tapped else 0), res.layers.keys()
    assert res.num_untapped_calls > 0  # the teacher's calls (and HalfCell)
