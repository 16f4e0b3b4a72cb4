"""Every transform on real Flax models: NNX mutable state, linen boxes, TrainState.

* NNX with BatchNorm, Dropout and a custom mutable variable, ``value_fn``
  from :func:`olw.nnx_value_fn`: 3 steps under ``nnx.jit`` (and under
  ``nnx.scan``), finite losses, and the model's non-param state after
  ``optimizer.update`` is exactly what the user's own forward pass left (the
  transform's re-runs of ``value_fn`` mutate nothing).
* The library's former recipe (``nnx.merge(graphdef, p, rest)`` sharing the
  model's variables) raises this library's error, naming the transform, the
  cause and the fix, chained to Flax's.
* linen params exactly as ``init`` returns them (``nn.LogicallyPartitioned``
  and ``nn.Partitioned`` boxes): the same steps as on the unboxed params,
  boxes kept.
* :func:`olw.apply_gradients` equals the manual two-line ``TrainState``
  workaround.
"""

import flax
from flax import nnx
import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_layerwise as olw

TRANSFORMS = {
    "layerwise_sgd": olw.layerwise_sgd,
    "layerwise_adamw": olw.layerwise_adamw,
    "layerwise_adamw_inputs": lambda: olw.layerwise_adamw(
        precondition="inputs"),
    "scale_by_layerwise_step_size": lambda: optax.chain(
        olw.scale_by_layerwise_step_size(), optax.scale(-1.0)),
    "cblr": olw.cblr,
    "mclr": olw.mclr,
    "scale_by_curvature_lr": lambda: optax.chain(
        olw.scale_by_curvature_lr(), optax.scale(-1.0)),
    "kbfgs": olw.kbfgs,
}
# The transform's name in the error (the stage that re-runs value_fn).
ERROR_NAMES = {"layerwise_sgd": "scale_by_layerwise_step_size",
               "layerwise_adamw": "scale_by_layerwise_step_size",
               # Its preconditioner runs value_fn first.
               "layerwise_adamw_inputs": "precondition_by_inputs",
               "cblr": "scale_by_curvature_lr",
               "mclr": "scale_by_curvature_lr"}

# ---------------------------------------------------------------------------
# Flax NNX


class Counter(nnx.Variable):
  """Some other mutable state: counts forward passes."""


class NNXNet(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(4, 8, rngs=rngs)
    self.norm = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(0.25, rngs=rngs)
    self.out = nnx.Linear(8, 1, rngs=rngs)
    self.calls = Counter(jnp.zeros((), jnp.int32))

  def __call__(self, x):
    self.calls[...] += 1
    h = self.drop(nnx.relu(self.norm(self.hidden(x))))
    return self.out(h)


def _mse(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


def _data(n=16, d=4, seed=0):
  x = jax.random.normal(jax.random.PRNGKey(seed), (n, d))
  return x, jnp.sin(x.sum(axis=1, keepdims=True))


def _rest(model):
  """Every non-param variable of ``model``, as arrays (RNG keys as data)."""
  _, _, rest = nnx.split(model, nnx.Param, ...)
  return jax.tree.map(
      lambda a: jax.random.key_data(a) if jax.dtypes.issubdtype(
          a.dtype, jax.dtypes.prng_key) else a, nnx.as_pure(rest))


def _nnx_body(model, optimizer, x, y):
  """One step as a user writes it; also returns the state to check."""
  value_fn = olw.nnx_value_fn(_mse, model, x, y)  # before the forward pass
  loss, grads = nnx.value_and_grad(_mse)(model, x, y)
  after_forward = _rest(model)
  # value_fn at the current params is the loss just differentiated: the
  # same Dropout mask and batch statistics.
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  value = value_fn(params)
  optimizer.update(model, grads, value_fn=value_fn)
  return loss, value, after_forward, _rest(model)


_nnx_step = nnx.jit(_nnx_body)


def _check_nnx_steps(losses, values, after_forward, after_update):
  assert np.all(np.isfinite(losses)), losses
  np.testing.assert_allclose(values, losses, rtol=1e-5)
  # Only the user's forward pass changed the non-param state.
  jax.tree.map(np.testing.assert_array_equal, after_update, after_forward)
  calls = np.asarray(after_update["calls"])
  np.testing.assert_array_equal(calls.reshape(-1), np.arange(1, 4))


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_nnx_batchnorm_dropout_under_jit(name):
  model = NNXNet(nnx.Rngs(0, dropout=1))
  optimizer = nnx.Optimizer(model, TRANSFORMS[name](), wrt=nnx.Param)
  before = _rest(model)
  kernel = np.asarray(model.hidden.kernel[...])
  x, y = _data()
  results = [_nnx_step(model, optimizer, x, y) for _ in range(3)]
  losses = [float(r[0]) for r in results]
  values = [float(r[1]) for r in results]
  stack = lambda i: jax.tree.map(lambda *a: np.stack(a),
                                 *[r[i] for r in results])
  _check_nnx_steps(losses, values, stack(2), stack(3))
  assert int(optimizer.step[...]) == 3
  # The forward passes did update the statistics and the RNG count...
  assert not np.allclose(model.norm.mean[...], before["norm"]["mean"])
  assert int(model.drop.rngs.count[...]) == 3 + int(
      before["drop"]["rngs"]["count"])
  # ...and the transform moved the params (the bare scale_by_layerwise_
  # step_size starts from step 0 and may keep it over 3 steps).
  assert name == "scale_by_layerwise_step_size" or not np.allclose(
      model.hidden.kernel[...], kernel)


def test_nnx_under_scan():
  model = NNXNet(nnx.Rngs(0, dropout=1))
  optimizer = nnx.Optimizer(model, olw.kbfgs(), wrt=nnx.Param)
  x, y = _data()

  @nnx.jit
  @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))
  def train(carry, xs, ys):
    model, optimizer = carry
    return (model, optimizer), _nnx_body(model, optimizer, xs, ys)

  xs, ys = jnp.stack([x] * 3), jnp.stack([y] * 3)
  _, (losses, values, after_forward, after_update) = train(
      (model, optimizer), xs, ys)
  _check_nnx_steps(np.asarray(losses), np.asarray(values), after_forward,
                   after_update)
  assert int(optimizer.step[...]) == 3
  # K-BFGS tapped both nnx.Linear layers through value_fn (BatchNorm's
  # scale and bias take the momentum fallback).
  preconditioned = nnx.as_pure(optimizer.opt_state).preconditioned
  assert all(bool(preconditioned[layer][leaf]) for layer in ("hidden", "out")
             for leaf in ("kernel", "bias"))


def _wrong_body(model, optimizer, x, y):
  """The former documented recipe: ``rest`` shares the model's variables."""
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  value_fn = lambda p: _mse(nnx.merge(graphdef, p, rest), x, y)
  loss, grads = nnx.value_and_grad(_mse)(model, x, y)
  optimizer.update(model, grads, value_fn=value_fn)
  return loss


def _assert_explained(excinfo, name, cause):
  err = excinfo.value
  assert not isinstance(err, flax.errors.FlaxError)
  assert isinstance(err.__cause__, cause), repr(err.__cause__)
  message = str(err)
  assert message.startswith(ERROR_NAMES.get(name, name) + ":"), message
  assert "olw.nnx_value_fn(loss_fn, model, batch)" in message
  assert "copy=True" in message and "nnx.as_pure(rest)" in message


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_nnx_shared_variables_raise_this_librarys_error(name):
  model = NNXNet(nnx.Rngs(0, dropout=1))
  optimizer = nnx.Optimizer(model, TRANSFORMS[name](), wrt=nnx.Param)
  x, y = _data()
  with pytest.raises(ValueError, match="mutates Flax NNX state") as excinfo:
    nnx.jit(_wrong_body)(model, optimizer, x, y)
  _assert_explained(excinfo, name, flax.errors.TraceContextError)


class Block(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.linear = nnx.Linear(4, 4, rngs=rngs)
    self.norm = nnx.BatchNorm(4, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.norm(self.linear(x)))


class ScannedNet(nnx.Module):
  """Blocks stacked by ``nnx.vmap`` and applied by ``nnx.scan``."""

  def __init__(self, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=2)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def blocks(rngs):
      return Block(rngs)
    self.blocks = blocks(rngs)
    self.out = nnx.Linear(4, 1, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def apply(h, block):
      return block(h)
    return self.out(apply(x, self.blocks))


def test_nnx_scan_inside_the_model():
  """``nnx.scan`` inside value_fn: the helper works, the shared one raises."""
  x, y = _data()
  model = ScannedNet(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, olw.layerwise_sgd(), wrt=nnx.Param)
  with pytest.raises(ValueError, match="to an NNX transform") as excinfo:
    nnx.jit(_wrong_body)(model, optimizer, x, y)
  _assert_explained(excinfo, "layerwise_sgd", ValueError)
  assert "different trace level" in str(excinfo.value.__cause__)

  @nnx.jit
  def step(model, optimizer, x, y):
    value_fn = olw.nnx_value_fn(_mse, model, x, y)
    loss, grads = nnx.value_and_grad(_mse)(model, x, y)
    optimizer.update(model, grads, value_fn=value_fn)
    return loss, _rest(model)

  stats = _rest(model)
  for _ in range(2):
    loss, after = step(model, optimizer, x, y)
    assert np.isfinite(float(loss))
    assert not np.allclose(after["blocks"]["norm"]["mean"],
                           stats["blocks"]["norm"]["mean"])
    stats = after


def test_nnx_value_fn_has_aux_and_wrt():
  model = NNXNet(nnx.Rngs(0, dropout=1))
  x, y = _data()
  aux_loss = lambda m, x, y: (_mse(m, x, y), {"n": x.shape[0]})
  value_fn = olw.nnx_value_fn(aux_loss, model, x, y, has_aux=True,
                              wrt=nnx.Param)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  before = _rest(model)
  value = value_fn(params)
  assert value.shape == ()
  np.testing.assert_allclose(value, _mse(model, x, y), rtol=1e-6)
  # Evaluating value_fn changed nothing in the model.
  model2 = NNXNet(nnx.Rngs(0, dropout=1))
  _mse(model2, x, y)  # advances model2's state once, as value_fn's copy
  jax.tree.map(np.testing.assert_array_equal, _rest(model),
               _rest(model2))
  assert int(before["calls"]) == 0


# ---------------------------------------------------------------------------
# Flax linen: partitioned params and TrainState


class Partitioned(nn.Module):
  """Dense layers with logically partitioned and partitioned params."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("embed", "mlp")),
                 bias_init=nn.with_logical_partitioning(
                     nn.initializers.zeros_init(), ("mlp",)))(x)
    x = nn.Dense(8, kernel_init=nn.with_partitioning(
        nn.initializers.lecun_normal(), (None, "model")))(nn.tanh(x))
    return nn.Dense(1, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("mlp", None)))(nn.tanh(x))


def _linen_problem():
  model = Partitioned()
  x, y = _data()
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  loss = lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
  return model, params, loss


def _is_box(leaf):
  return isinstance(leaf, nn.meta.AxisMetadata)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_linen_partitioned_params_as_init_returns_them(name):
  _, boxed, loss = _linen_problem()
  assert isinstance(boxed["Dense_0"]["kernel"], nn.LogicallyPartitioned)
  assert isinstance(boxed["Dense_1"]["kernel"], nn.Partitioned)
  plain = nn.meta.unbox(boxed)
  tx = TRANSFORMS[name]()

  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params, value_fn=loss)
    return optax.apply_updates(params, updates), state, value

  # The boxed params trace to the very computation the plain ones do (so
  # the layers, statistics and steps are the same)...
  assert (str(jax.make_jaxpr(step)(boxed, tx.init(boxed)))
          == str(jax.make_jaxpr(step)(plain, tx.init(plain))))
  # ...and it runs, keeping the boxes and their names.
  params, state, losses = boxed, tx.init(boxed), []
  jit_step = jax.jit(step)
  for _ in range(3):
    params, state, value = jit_step(params, state)
    losses.append(float(value))
  assert np.all(np.isfinite(losses + [float(loss(params))])), losses
  assert (jax.tree.structure(params, is_leaf=_is_box)
          == jax.tree.structure(boxed, is_leaf=_is_box))
  assert params["Dense_0"]["kernel"].names == ("embed", "mlp")
  assert params["Dense_1"]["kernel"].names == (None, "model")


class TrainStateWithStats(train_state.TrainState):
  batch_stats: dict


def test_apply_gradients_equals_the_two_line_workaround():
  model, params, loss = _linen_problem()
  state = TrainStateWithStats.create(
      apply_fn=model.apply, params=params, tx=olw.kbfgs(),
      batch_stats={"n": jnp.zeros(())})

  def helper(state):
    grads = jax.grad(loss)(state.params)
    return olw.apply_gradients(state, grads=grads, value_fn=loss,
                               batch_stats={"n": state.batch_stats["n"] + 1})

  def manual(state):  # the guide's two lines (in the helper's order)
    grads = jax.grad(loss)(state.params)
    batch_stats = {"n": state.batch_stats["n"] + 1}
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params,
                                         value_fn=loss)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params,
                         opt_state=opt_state, batch_stats=batch_stats)

  # The same computation, primitive for primitive...
  assert str(jax.make_jaxpr(helper)(state)) == str(
      jax.make_jaxpr(manual)(state))
  # ...which steps the state, boxes kept.
  step = jax.jit(helper)
  for _ in range(3):
    state = step(state)
  assert int(state.step) == 3 and float(state.batch_stats["n"]) == 3.0
  assert isinstance(state.params["Dense_0"]["kernel"], nn.LogicallyPartitioned)
  assert float(loss(state.params)) < float(loss(params))


def test_apply_gradients_overwrite_with_gradient_split():
  """FP8's ``{"params", OVERWRITE_WITH_GRADIENT}`` split, as Flax's."""
  owg = train_state.OVERWRITE_WITH_GRADIENT
  params = {"params": {"w": jnp.ones(3)}, owg: {"scale": jnp.ones(())}}
  loss = lambda p: jnp.sum((p["params"]["w"] * p[owg]["scale"] - 2.0) ** 2)

  def update(updates, state, params, *, value_fn):
    # A step of -value_fn(params) * g: value_fn must see the whole params.
    return jax.tree.map(lambda g: -value_fn(params) * g, updates), state

  tx = optax.GradientTransformationExtraArgs(optax.init_empty_state, update)
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  grads = jax.grad(loss)(params)
  new = olw.apply_gradients(state, grads=grads, value_fn=loss)
  np.testing.assert_allclose(new.params["params"]["w"],
                             1.0 - loss(params) * grads["params"]["w"])
  np.testing.assert_array_equal(new.params[owg]["scale"],
                                grads[owg]["scale"])
  assert int(new.step) == 1


def test_checked_value_fn_explains_trace_errors_only():
  """The wrapper every transform puts around value_fn (unit level)."""
  from optax_layerwise import _checks  # pylint: disable=g-import-not-at-top

  def raising(err):
    def value_fn(params):
      raise err
    return value_fn

  checked = _checks.checked_value_fn(
      raising(jax.errors.UnexpectedTracerError("leaked")), "cblr")
  with pytest.raises(ValueError, match=r"^cblr: .*escaped from another "
                     r"trace") as excinfo:
    checked({})
  assert isinstance(excinfo.value.__cause__, jax.errors.UnexpectedTracerError)
  # Nested wrappers (K-BFGS's tap) keep the innermost explanation.
  outer = _checks.checked_value_fn(checked, "tap_dense_layers")
  with pytest.raises(ValueError, match=r"^cblr: "):
    outer({})
  # Other errors, including a ValueError of the user's, pass untouched.
  for err in (KeyError("w"), ValueError("different trace level, mine")):
    with pytest.raises(type(err)) as excinfo:
      _checks.checked_value_fn(raising(err), "cblr")({})
    assert excinfo.value is err
