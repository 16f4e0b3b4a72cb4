"""Bad input gets a clear, specific error at the first call (issue 8, item 2).

Each case asserts the exception type and the message, which must name the
problem and the fix. "The first call" is the earliest call that can know:
the factory for hyperparameters, ``init`` for the params (masked, integer,
complex, a bad layer grouping), the first ``update`` for what only it sees
(``value_fn``, the updates, the dense layers ``value_fn`` calls).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_layerwise as olw
from tests import tiny

# One representative per module; each needs value_fn (cblr's default
# curvature is "hessian").
CURVATURE_TRANSFORMS = {
    "scale_by_layerwise_step_size": olw.layerwise_sgd,
    "scale_by_curvature_lr": olw.cblr,
    "kbfgs": olw.kbfgs,
}
ALL = sorted(CURVATURE_TRANSFORMS)


def _problem():
  params = tiny.init_params(jax.random.PRNGKey(0))
  xs, ts = tiny.batches(jax.random.PRNGKey(1), 1)
  loss = lambda p: tiny.loss(p, xs[0], ts[0])
  return params, loss, jax.grad(loss)(params)


def _first_update(name, value_fn, *, params=None, grads=None):
  p, loss, g = _problem()
  params = p if params is None else params
  grads = g if grads is None else grads
  tx = CURVATURE_TRANSFORMS[name]()
  return tx.update(grads, tx.init(params), params, value_fn=value_fn)


@pytest.mark.parametrize("name", ALL)
def test_missing_value_fn_names_it_and_shows_the_call(name):
  params, _, grads = _problem()
  tx = CURVATURE_TRANSFORMS[name]()
  with pytest.raises(ValueError, match=(
      rf"{name} needs the mini-batch loss as the keyword argument `value_fn`"
      r"[\s\S]*value_fn=lambda p: loss_fn\(p, batch\)")):
    tx.update(grads, tx.init(params), params)


@pytest.mark.parametrize("name", ALL)
def test_value_fn_returning_a_non_scalar(name):
  _, loss, _ = _problem()
  with pytest.raises(ValueError, match=(
      rf"{name}: `value_fn\(params\)` must return a float scalar .*got shape "
      r"\(8,\) and dtype float32\. Reduce per-example losses with "
      r"`\.mean\(\)`")):
    _first_update(name, lambda p: loss(p) * jnp.ones(8))


@pytest.mark.parametrize("name", ALL)
def test_value_fn_returning_a_non_float(name):
  _, loss, _ = _problem()
  with pytest.raises(ValueError, match=(
      rf"{name}: `value_fn\(params\)` must return a float scalar .*got shape "
      r"\(\) and dtype int32\. Return the loss as a float")):
    _first_update(name, lambda p: loss(p).astype(jnp.int32))


@pytest.mark.parametrize("name", ALL)
def test_value_fn_errors_are_raised_under_jit_too(name):
  _, loss, _ = _problem()
  params, _, grads = _problem()
  tx = CURVATURE_TRANSFORMS[name]()
  update = jax.jit(lambda g, s, p: tx.update(
      g, s, p, value_fn=lambda q: jnp.stack([loss(q), loss(q)])))
  with pytest.raises(ValueError, match=r"got shape \(2,\)"):
    update(grads, tx.init(params), params)


@pytest.mark.parametrize("name", ALL)
def test_params_and_updates_of_different_structure(name):
  params, loss, grads = _problem()
  partial = {"l0": grads["l0"]}
  with pytest.raises(ValueError, match=re.escape(
      f"{name}: the updates (gradients) does not match the params' "
      "structure.") + r"[\s\S]*params: PyTreeDef[\s\S]*got: +PyTreeDef"
                      r"[\s\S]*must all share the params' structure"):
    _first_update(name, loss, grads=partial)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64])
def test_integer_or_complex_params_fail_at_init(name, dtype):
  params, _, _ = _problem()
  params["l0"]["b"] = params["l0"]["b"].astype(dtype)
  with pytest.raises(ValueError, match=(
      rf"{name} needs real floating-point params, got a leaf of dtype "
      rf"{jnp.dtype(dtype).name}\. Keep integer or complex arrays out of the "
      r"params pytree .* or cast them to float")):
    CURVATURE_TRANSFORMS[name]().init(params)


def test_kbfgs_without_a_tappable_dense_layer():
  params, _, grads = _problem()
  xs, ts = tiny.batches(jax.random.PRNGKey(1), 1)
  supported = re.escape("Supported layers: flax.linen.Dense, "
                        "flax.linen.DenseGeneral, flax.linen.Einsum, "
                        "flax.linen.Conv, flax.linen.OptimizedLSTMCell, "
                        "linen layers inside nn.scan / nn.RNN / nn.remat, "
                        "flax.nnx.Linear, "
                        "flax.nnx.LinearGeneral, flax.nnx.Einsum, "
                        "flax.nnx.Conv, optax_layerwise.dense (plain JAX), "
                        "kinds added with optax_layerwise.register_layer_kind.")

  def bare(p):  # plain matmuls: nothing to tap
    h = jnp.tanh(xs[0] @ p["l0"]["w"] + p["l0"]["b"])
    return jnp.mean((h @ p["l1"]["w"] + p["l1"]["b"] - ts[0]) ** 2)

  with pytest.raises(ValueError, match=(
      "kbfgs found no layer to precondition. " + supported
      + " value_fn called no supported layer.")):
    _first_update("kbfgs", bare)

  def copied(p):  # dense calls, but on copies of the kernels
    h = jnp.tanh(olw.dense(xs[0], p["l0"]["w"] * 1.0, p["l0"]["b"]))
    return jnp.mean((olw.dense(h, p["l1"]["w"] + 0.0) - ts[0]) ** 2)

  with pytest.raises(ValueError, match=(
      supported + r" 2 layer call\(s\) ran, but none on a params leaf: "
      r"pass the params leaves to the layers unchanged")):
    _first_update("kbfgs", copied)

  # No 2-D leaf at all: nothing could be a dense kernel.
  vectors = {"a": {"w": jnp.ones(3)}}
  with pytest.raises(ValueError, match="found no layer"):
    _first_update("kbfgs", lambda p: jnp.sum(p["a"]["w"] ** 2),
                  params=vectors, grads=vectors)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_kbfgs_memory_size_below_one(bad):
  with pytest.raises(ValueError, match=re.escape(
      "kbfgs: memory_size must be None (K-BFGS) or an integer >= 1 "
      f"(K-BFGS(L)), got {bad!r}.")):
    olw.kbfgs(memory_size=bad)


@pytest.mark.parametrize("bad", [0, 2.5, True, "Auto", "256",
                                 np.bool_(True), jnp.asarray(2.5),
                                 jnp.asarray([2, 3])])
def test_kbfgs_block_size_not_a_positive_int(bad):
  with pytest.raises(ValueError, match=re.escape(
      "kbfgs: block_size must be a positive int or None, got")):
    olw.kbfgs(block_size=bad)


def test_kbfgs_block_size_injected_needs_static_args():
  """An int ``block_size`` under optax.inject_hyperparams arrives as an
  array: fine when concrete, a named error at a traced ``init``; listed in
  ``static_args`` it is a plain int. The default ``"auto"`` is a string,
  so it is never injected."""
  params = {"d": {"kernel": jnp.ones((3, 2))}}
  injected = optax.inject_hyperparams(olw.kbfgs)(block_size=2)
  assert injected.init(params).inner_state.layers[0].a.shape == (2, 2, 2)
  with pytest.raises(ValueError, match=re.escape(
      "static_args=('block_size',)")):
    jax.jit(injected.init)(params)
  static = optax.inject_hyperparams(olw.kbfgs, static_args=("block_size",))
  assert jax.jit(static(block_size=2).init)(params).inner_state.layers[
      0].a.shape == (2, 2, 2)
  assert "block_size" not in optax.inject_hyperparams(olw.kbfgs)().init(
      params).hyperparams


@pytest.mark.parametrize("make,match", [
    (lambda: olw.kbfgs(damping=-0.1),
     r"kbfgs: damping must be > 0 \(A is damped by sqrt\(damping\) I\), got "
     r"-0\.1"),
    (lambda: olw.kbfgs(damping=0.0), r"kbfgs: damping must be > 0"),
    (lambda: olw.layerwise_sgd(estimator="exact", coupled=True,
                               coupled_damping=-1.0),
     r"scale_by_layerwise_step_size: coupled_damping must be >= 0, got -1\.0\."
     r" It adds damping \* I to the coupled L x L system; use 0 for none\."),
])
def test_negative_damping(make, match):
  with pytest.raises(ValueError, match=match):
    make()


@pytest.mark.parametrize("bad", [jnp.int32, "not a dtype"])
def test_kbfgs_precondition_dtype_not_floating(bad):
  with pytest.raises(ValueError, match=(
      r"kbfgs: precondition_dtype must be a floating dtype \(jnp.bfloat16, "
      r"jnp.float32, ...\) or None \(automatic\), got")):
    olw.kbfgs(precondition_dtype=bad)


@pytest.mark.parametrize("make,match", [
    (lambda: olw.kbfgs(-0.1),
     r"kbfgs: learning_rate must be >= 0, got -0\.1\. .*pass a positive "
     r"rate"),
    (lambda: olw.cblr(-0.5),
     r"cblr: learning_rate_scale must be >= 0, got -0\.5\. It multiplies the "
     r"descent step \(the sign flip is built in\)"),
    (lambda: olw.mclr(-0.5), r"mclr: learning_rate_scale must be >= 0"),
    (lambda: olw.layerwise_sgd(scale=-1.0),
     r"layerwise_sgd: scale must be >= 0, got -1\.0\. It multiplies the "
     r"per-layer steps"),
    (lambda: olw.layerwise_adamw(scale=-1.0),
     r"layerwise_adamw: scale must be >= 0"),
    (lambda: olw.scale_by_layerwise_step_size(max_step=-1.0),
     r"scale_by_layerwise_step_size: max_step must be >= 0, got -1\.0\. It "
     r"caps each layer's step alpha_l \(the learning rate\)"),
    (lambda: olw.scale_by_curvature_lr(scale=-2.0),
     r"scale_by_curvature_lr: scale must be >= 0, got -2\.0\. lr_l = scale / "
     r"kappa_l is a learning rate"),
    (lambda: olw.scale_by_curvature_lr(initial_lr=-1e-3),
     r"scale_by_curvature_lr: initial_lr must be >= 0"),
    (lambda: olw.cblr(max_lr=-1.0), r"max_lr must be >= 0.*None for no clip"),
])
def test_negative_learning_rate(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_schedules_and_injected_hyperparameters_are_not_rejected():
  # A schedule cannot be checked at construction; an injected value is
  # traced: both must pass (negative values are the caller's to avoid).
  olw.cblr(optax.linear_schedule(0.0, 1.0, 10))
  olw.layerwise_sgd(scale=optax.constant_schedule(0.5))
  params, loss, grads = _problem()
  tx = optax.inject_hyperparams(olw.cblr)(learning_rate_scale=0.1)
  jax.jit(lambda s: tx.update(grads, s, params, value_fn=loss))(
      tx.init(params))


_UNASSIGNED = r"The layer grouping left the leaf \['l0'\]\['b'\] unassigned " \
              r"\(its label is None\)\. Give every leaf a label\."
_TWICE = (r"The layer grouping assigns the leaf \['l0'\]\['b'\] to several "
          r"layers \(\['a', 'b'\]\)\. A leaf belongs to exactly one layer: give "
          r"it one hashable label")


def _label_tree(b_label):
  return {"l0": {"w": "a", "b": b_label}, "l1": {"w": "c", "b": "c"}}


@pytest.mark.parametrize("name", ["layerwise_sgd", "cblr"])
@pytest.mark.parametrize("layers,match", [
    (lambda path, leaf: None if leaf.ndim == 1 and "l0" in str(path)
     else str(path[0]), _UNASSIGNED),
    (_label_tree(None), _UNASSIGNED),
    (lambda path, leaf: ["a", "b"] if leaf.ndim == 1 and "l0" in str(path)
     else str(path[0]), _TWICE),
    (_label_tree(["a", "b"]), _TWICE),
    (_label_tree({"a", "b"}), r"assigns the leaf \['l0'\]\['b'\] to "
     r"several layers"),
    ({"l0": "a", "l1": "b"}, r"The `layers` label pytree must have the "
     r"params' structure, one label per leaf: params have 4 leaves"),
    (lambda path, leaf: jnp.zeros(2), r"the unhashable label .* Labels must be "
     r"hashable"),
])
def test_layer_grouping_leaving_a_leaf_unassigned_or_assigning_it_twice(
    name, layers, match):
  params, _, _ = _problem()
  make = {"layerwise_sgd": olw.layerwise_sgd, "cblr": olw.cblr}[name]
  with pytest.raises(ValueError, match=match):
    make(layers=layers).init(params)


def test_a_tuple_label_is_one_layer():
  params, _, _ = _problem()
  layers = olw.group_layers(params, _label_tree(("a", 1)))
  assert layers.num_layers == 3 and ("a", 1) in layers.labels


_MASKED = (r"{name} received masked params \(optax\.MaskedNode leaves\): "
           r"inside `optax\.masked` or `optax\.multi_transform` the inner "
           r"transform only sees part of the params, so `value_fn\(params\)` "
           r"cannot be evaluated\. Apply this transform to the whole params "
           r"pytree and freeze leaves by chaining `optax\.masked\(optax\."
           r"set_to_zero\(\), mask\)` after it instead\.")


@pytest.mark.parametrize("name", ALL)
def test_inside_optax_masked_fails_at_init(name):
  params, _, _ = _problem()
  mask = {"l0": {"w": True, "b": False}, "l1": {"w": True, "b": True}}
  tx = optax.masked(CURVATURE_TRANSFORMS[name](), mask)
  with pytest.raises(ValueError, match=_MASKED.format(name=name)):
    tx.init(params)
  labels = {"l0": {"w": "c", "b": "sgd"}, "l1": {"w": "c", "b": "c"}}
  multi = optax.multi_transform(
      {"c": CURVATURE_TRANSFORMS[name](), "sgd": optax.sgd(0.1)}, labels)
  with pytest.raises(ValueError, match=_MASKED.format(name=name)):
    multi.init(params)
