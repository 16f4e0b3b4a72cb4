"""Every integration guide's script in ``examples/`` runs and does what it says.

The guides in ``docs/guides/`` include these scripts verbatim
(``literalinclude``), so what the docs show is what runs here.
"""

import importlib.util
import pathlib

from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_layerwise as olw

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
  spec = importlib.util.spec_from_file_location(
      f"olw_example_{name}", EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _assert_decreasing(losses, factor, what):
  assert len(losses) >= 3, what
  assert all(np.isfinite(losses)), (what, losses)
  assert all(b < a for a, b in zip(losses, losses[1:])), (what, losses)
  assert losses[-1] < factor * losses[0], (what, losses)


def test_plain_jax():
  results = _load("plain_jax").main()
  assert set(results) == {"layerwise_sgd", "kbfgs"}
  for name, losses in results.items():
    _assert_decreasing(losses, 0.7, name)


def test_flax_linen_train_state():
  example = _load("flax_linen")
  results = example.main()
  _assert_decreasing(results["losses"], 0.7, "kbfgs / TrainState")
  assert int(results["state"].step) == 60

  # The guide's claims about the stock TrainState.
  x, y = example.make_data(n=16)
  model = example.MLP()
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=olw.kbfgs())
  loss = lambda p: example.loss_fn(p, model.apply, x, y)
  grads = jax.jit(jax.grad(loss))(params)
  # apply_gradients calls tx.update(grads, opt_state, params) and nothing
  # more, with or without a value_fn keyword (which it keeps for replace()).
  for kwargs in ({}, {"value_fn": loss}):
    with pytest.raises(ValueError, match="value_fn"):
      state.apply_gradients(grads=grads, **kwargs)


def test_flax_nnx_optimizer():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  results = _load("flax_nnx").main()
  _assert_decreasing(results["losses"], 0.7, "kbfgs / nnx.Optimizer")
  optimizer = results["optimizer"]
  assert int(optimizer.step[...]) == 80
  # value_fn reached K-BFGS, whose taps found every nnx.Linear layer
  # (BatchNorm's scale and bias take the momentum fallback).
  opt_state = nnx.as_pure(optimizer.opt_state)
  preconditioned = opt_state.preconditioned
  assert all(bool(preconditioned[layer][leaf])
             for layer in ("hidden1", "hidden2", "out")
             for leaf in ("kernel", "bias"))
  assert not any(bool(b) for b in jax.tree_util.tree_leaves(
      preconditioned["norm"]))
  assert int(opt_state.count) == 80
  # The BatchNorm statistics and the Dropout RNG count moved with the
  # user's 80 forward passes only (K-BFGS's re-runs of value_fn use a copy).
  model = results["model"]
  assert int(model.dropout.rngs.count[...]) == 80
  assert float(jnp.abs(model.norm.mean[...]).max()) > 0


def test_schedules_and_inject_hyperparams():
  example = _load("schedules")
  results = example.main()
  _assert_decreasing(results["kbfgs"]["losses"], 0.7, "kbfgs schedule")
  _assert_decreasing(results["cblr"]["losses"], 0.7, "cblr injected")
  # The injected values logged from the state follow the schedules...
  warmup_cosine = optax.warmup_cosine_decay_schedule(0.0, 3.0, 10, 60, 0.3)
  np.testing.assert_allclose(results["kbfgs"]["learning_rates"],
                             [warmup_cosine(i) for i in range(60)],
                             rtol=1e-5, atol=1e-6)
  logged = np.array(results["cblr"]["logged"])
  np.testing.assert_allclose(
      logged[:, 0], [optax.linear_schedule(0.5, 0.1, 60)(i) for i in range(60)],
      rtol=1e-5)
  # ...and the momentum set by hand mid-run took effect from step 30 on.
  np.testing.assert_allclose(logged[:30, 1], 0.9, rtol=1e-6)
  np.testing.assert_allclose(logged[30:, 1], 0.5, rtol=1e-6)


def test_gradient_accumulation():
  example = _load("gradient_accumulation")
  results = example.main()
  history_a, losses_a, state_a = results["multisteps"]
  history_b, losses_b = results["in_step"]
  _assert_decreasing(losses_a, 0.7, "MultiSteps")
  _assert_decreasing(losses_b, 0.7, "accumulated in the step")
  # Both ways take the same steps (to float32 round-off of the mean).
  assert results["first_step_gap"] < 1e-5
  np.testing.assert_allclose(losses_a, losses_b, rtol=1e-3)
  # MultiSteps forwarded value_fn and kept one inner step per K micro-batches.
  assert int(state_a.gradient_step) == example.NUM_STEPS
  assert int(state_a.mini_step) == 0
  inner = olw.ScaleByLayerwiseStepSizeState
  counts = [s.count for s in jax.tree_util.tree_leaves(
      state_a.inner_opt_state, is_leaf=lambda s: isinstance(s, inner))
            if isinstance(s, inner)]
  assert [int(c) for c in counts] == [example.NUM_STEPS]


def test_checkpoint_resume_is_bit_identical(tmp_path):
  """K-BFGS and layer-wise AdamW, resumed from orbax in a new process."""
  example = _load("checkpointing")
  results = example.main(workdir=tmp_path)
  assert results["identical"] == {"kbfgs": True, "layerwise_adamw": True}, (
      results["max_diff"])
  init = example.init_params()
  for name, params in results["uninterrupted"].items():
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    init_leaves = jax.tree_util.tree_leaves(init)
    for (path, leaf), start in zip(leaves, init_leaves):
      resumed = results["resumed"][f"{name}{jax.tree_util.keystr(path)}"]
      assert np.array_equal(np.asarray(leaf), resumed), (name, path)
      assert resumed.dtype == np.float32
    # Not vacuous: training moved every kernel.
    assert all(not np.array_equal(np.asarray(leaf), np.asarray(start))
               for (path, leaf), start in zip(leaves, init_leaves)
               if "kernel" in jax.tree_util.keystr(path)), name


def test_checkpoint_restore_gives_the_state_types(tmp_path):
  """Restoring with the abstract target from tx.init keeps NamedTuples."""
  example = _load("checkpointing")
  params = example.init_params()
  for name, make_tx in example.OPTIMIZERS.items():
    tx = make_tx()
    state = tx.init(params)
    example.save(str(tmp_path / name), params, state, 7)
    _, restored, step = example.restore(str(tmp_path / name), tx, params)
    assert step == 7
    assert (jax.tree_util.tree_structure(restored)
            == jax.tree_util.tree_structure(state)), name


def test_logging_diagnostics():
  results = _load("logging_diagnostics").main()
  sgd, kbfgs = results["layerwise_sgd"], results["kbfgs"]
  _assert_decreasing(sgd["losses"], 0.7, "layerwise_sgd")
  _assert_decreasing(kbfgs["losses"], 0.7, "kbfgs")

  names = ["dense_0", "dense_1", "dense_2"]
  assert [n.strip("[]'") for n in sgd["labels"]] == names
  assert list(kbfgs["names"]) == list(sgd["labels"])
  for record in sgd["history"]:
    assert set(record) == {f"{f}/{n}" for f in
                           ("step_size", "curvature", "fallbacks")
                           for n in names}
    steps = [record[f"step_size/{n}"] for n in names]
    assert all(0.0 <= s <= 1.0 for s in steps), steps   # max_step = 1
  assert any(record["step_size/dense_2"] > 0 for record in sgd["history"])
  # The logged value is the state's.
  np.testing.assert_allclose(
      [sgd["history"][-1][f"step_size/{n}"] for n in names],
      optax.tree_utils.tree_get(sgd["state"], "step_sizes"))

  # K-BFGS counters only grow, and the last record is the final state.
  fields = ("powell", "lm", "skipped_h_g", "skipped_h_a")
  for field in fields:
    for n in names:
      series = [r[f"{field}/{n}"] for r in kbfgs["history"]]
      assert all(b >= a for a, b in zip(series, series[1:])), (field, n)
  state = kbfgs["state"]
  np.testing.assert_array_equal(
      [kbfgs["history"][-1][f"lm/{n}"] for n in names], state.num_lm)
  assert int(state.num_skipped) == 0
  assert all(jax.tree_util.tree_leaves(
      jax.tree.map(lambda b: bool(jnp.asarray(b)), state.preconditioned)))
