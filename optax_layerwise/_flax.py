"""Flax helpers: ``value_fn`` of an NNX model, and a linen ``TrainState`` step.

Every transform re-runs ``value_fn`` under its own ``jax.jvp`` / ``jax.vjp``
trace. For Flax that means:

* NNX: ``value_fn`` must build its model from arrays, not from the user's
  ``nnx.Variable`` objects. :func:`nnx_value_fn` snapshots everything but the
  params (BatchNorm statistics, RNG counters, ...) as arrays and merges a
  fresh model from them at every call, so the forward passes the transform
  re-runs mutate only that throw-away model, never the user's.
* linen: ``TrainState.apply_gradients`` cannot forward ``value_fn``;
  :func:`apply_gradients` is the same step with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import optax

__all__ = ["nnx_value_fn", "apply_gradients"]


def nnx_value_fn(loss_fn: Callable[..., Any], model, *args,
                 wrt: Any = None, has_aux: bool = False,
                 **kwargs) -> Callable[[Any], Any]:
  """``value_fn`` for a Flax NNX model: ``params -> loss_fn(model, *args)``.

  Call it where you would call ``nnx.split`` (inside the jitted or scanned
  step, before the forward pass): it splits ``model`` into its ``wrt``
  variables and the rest (BatchNorm statistics, Dropout RNG counters, any
  other ``nnx.Variable``), and keeps the rest as plain arrays, as they are
  now. The returned function merges a fresh model from ``params`` and that
  snapshot at every call (``nnx.merge(graphdef, params, rest, copy=True)``)
  and evaluates ``loss_fn`` on it, so:

  * it is a pure function of ``params``: every re-run by a transform sees
    the same Dropout masks and statistics as the gradient computed right
    after it (``nnx.value_and_grad(loss_fn)(model, *args)``);
  * what the forward pass mutates (running averages, RNG counts) is written
    to the throw-away copy: the transforms never change ``model``, and no
    Flax ``TraceContextError`` is raised under their ``jax.jvp`` /
    ``jax.vjp``.

  Args:
    loss_fn: ``loss_fn(model, *args, **kwargs)``, the mean mini-batch loss
      (the function you differentiate with ``nnx.value_and_grad``).
    model: the ``nnx.Module`` being trained.
    *args: the batch (and anything else ``loss_fn`` takes after the model).
    wrt: the filter of the optimised variables; the same as
      ``nnx.Optimizer``'s ``wrt`` (default ``nnx.Param``).
    has_aux: ``loss_fn`` returns ``(loss, aux)``; ``aux`` is dropped.
    **kwargs: keyword arguments of ``loss_fn``.

  Returns:
    ``value_fn(params)``, for ``optimizer.update(model, grads,
    value_fn=...)``, or for ``tx.update(..., value_fn=...)`` with the
    ``nnx.State`` of the ``wrt`` variables as params.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> import optax_layerwise as olw
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.linear = nnx.Linear(3, 2, rngs=rngs)
    ...     self.norm = nnx.BatchNorm(2, rngs=rngs)
    ...     self.drop = nnx.Dropout(0.5, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.drop(self.norm(self.linear(x)))
    >>> model = Net(nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, olw.layerwise_sgd(), wrt=nnx.Param)
    >>> loss_fn = lambda model, x: jnp.mean(model(x) ** 2)
    >>> @nnx.jit
    ... def train_step(model, optimizer, x):
    ...   value_fn = olw.nnx_value_fn(loss_fn, model, x)  # before the forward
    ...   loss, grads = nnx.value_and_grad(loss_fn)(model, x)
    ...   optimizer.update(model, grads, value_fn=value_fn)
    ...   return loss
    >>> loss = train_step(model, optimizer, jnp.ones((4, 3)))
    >>> int(optimizer.step[...])
    1
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  wrt = nnx.Param if wrt is None else wrt
  graphdef, _, rest = nnx.split(model, wrt, ...)
  rest = nnx.as_pure(rest)  # arrays: a snapshot, no shared Variables

  def value_fn(params):
    copy = nnx.merge(graphdef, params, rest, copy=True)
    out = loss_fn(copy, *args, **kwargs)
    return out[0] if has_aux else out

  return value_fn


def apply_gradients(state, *, grads, value_fn: Callable[[Any], Any],
                    **kwargs):
  """``state.apply_gradients(grads=grads)`` that forwards ``value_fn``.

  Flax linen's ``TrainState.apply_gradients`` calls ``tx.update(grads,
  opt_state, params)`` and hands any other keyword to ``state.replace``, so
  it cannot pass ``value_fn``. This is the same step with ``value_fn``:
  ``tx.update(grads, opt_state, params, value_fn=value_fn)``, then
  ``optax.apply_updates``, ``step + 1`` and ``state.replace(...,
  **kwargs)``. It takes any ``TrainState`` (or subclass, e.g. one with
  ``batch_stats``), and params exactly as ``init`` returns them, including
  ``nn.Partitioned`` / ``nn.LogicallyPartitioned`` boxes. With the FP8
  ``{"params": ..., "overwrite_with_gradient": ...}`` split it updates
  ``params["params"]`` as Flax does, and ``value_fn`` still receives the
  whole ``state.params`` structure.

  Args:
    state: a ``flax.training.train_state.TrainState`` (or any object with
      its ``step``, ``params``, ``tx``, ``opt_state`` and ``replace``).
    grads: the gradients, ``state.params``' structure.
    value_fn: the mini-batch loss as a function of ``state.params`` alone.
    **kwargs: other fields to replace, as in ``apply_gradients``.

  Returns:
    The updated state.

  Example:
    >>> import flax.linen as nn
    >>> from flax.training import train_state
    >>> import jax, jax.numpy as jnp
    >>> import optax_layerwise as olw
    >>> model = nn.Dense(1)
    >>> x, y = jnp.ones((4, 3)), jnp.zeros((4, 1))
    >>> params = model.init(jax.random.PRNGKey(0), x)["params"]
    >>> state = train_state.TrainState.create(
    ...     apply_fn=model.apply, params=params, tx=olw.layerwise_sgd())
    >>> @jax.jit
    ... def train_step(state):
    ...   loss_fn = lambda p: jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)
    ...   grads = jax.grad(loss_fn)(state.params)
    ...   return olw.apply_gradients(state, grads=grads, value_fn=loss_fn)
    >>> int(train_step(state).step)
    1
  """
  params, full_grads = state.params, grads
  overwrite = _overwrite_with_gradient_key()
  split = isinstance(grads, Mapping) and overwrite in grads
  if split:  # as TrainState.apply_gradients: the optimiser sees "params"
    params, grads = params["params"], grads["params"]
    value_fn = _with_params_entry(value_fn, state.params)
  updates, opt_state = state.tx.update(grads, state.opt_state, params,
                                       value_fn=value_fn)
  new_params = optax.apply_updates(params, updates)
  if split:  # and the overwrite-with-gradient entries take the gradients
    new_params = {"params": new_params, overwrite: full_grads[overwrite]}
  return state.replace(step=state.step + 1, params=new_params,
                       opt_state=opt_state, **kwargs)


def _with_params_entry(value_fn, full_params):
  """``value_fn`` of ``full_params["params"]``, the rest held fixed."""
  return lambda p: value_fn({**full_params, "params": p})


def _overwrite_with_gradient_key() -> str:
  from flax.training import train_state  # pylint: disable=g-import-not-at-top
  return train_state.OVERWRITE_WITH_GRADIENT
