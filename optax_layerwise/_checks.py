"""Argument checks shared by the transforms: clear errors, raised here.

Hyperparameters may arrive traced (injected by
:func:`optax.inject_hyperparams`): :func:`concrete_float` and
:func:`concrete_int` return ``None`` for those, and the checks let them pass.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

PyTree = Any
ValueFn = Callable[[PyTree], jax.Array]

__all__ = ["require_value_fn", "checked_value_fn", "ValueFnTraceError",
           "concrete_float", "concrete_int", "static_num_probes",
           "check_non_negative",
           "check_decay", "check_one_of", "value_fn_transformation"]

_CALL_EXAMPLE = """
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(
        grads, opt_state, params,
        value_fn=lambda p: loss_fn(p, batch))
    params = optax.apply_updates(params, updates)"""


def require_value_fn(value_fn: Optional[ValueFn], *, transform: str) -> ValueFn:
  """Returns ``value_fn`` or raises a ``ValueError`` that shows the call."""
  if value_fn is None:
    raise ValueError(
        f"{transform} needs the mini-batch loss as the keyword argument "
        "`value_fn` (a function of the params alone, returning a scalar). "
        f"Call it as:\n{_CALL_EXAMPLE}")
  if not callable(value_fn):
    raise ValueError(
        f"{transform}: `value_fn` must be callable params -> scalar loss, got "
        f"{type(value_fn).__name__}.")
  return value_fn


class ValueFnTraceError(ValueError):
  """A Flax or JAX trace error raised while a transform re-ran ``value_fn``."""


_NNX_FIX = """Build value_fn from arrays, not from the model's variables:
    value_fn = olw.nnx_value_fn(loss_fn, model, batch)  # before the forward
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    optimizer.update(model, grads, value_fn=value_fn)
or by hand: `graphdef, _, rest = nnx.split(model, nnx.Param, ...)`, then
`rest = nnx.as_pure(rest)` and, inside value_fn,
`nnx.merge(graphdef, params, rest, copy=True)` (see the Flax NNX guide)."""

_PURE_FIX = ("Make value_fn a pure function of the params (and the batch it "
             "closes over): store nothing from inside it, and use no array "
             "computed inside another jax.jit / jax.grad / scan. " + _NNX_FIX)

_TRACE_ERRORS = (
    # (Flax error class name or None, JAX error class name or None,
    #  message fragment or None, cause, fix)
    ("TraceContextError", None, None,
     "it mutates Flax NNX state that belongs to the caller's trace: the "
     "model built inside value_fn shares the caller's nnx.Variable objects "
     "(`nnx.merge(graphdef, params, rest)` with `rest` from `nnx.split` "
     "does), and the forward pass writes to them (BatchNorm statistics, "
     "Dropout RNG counts, ...).", _NNX_FIX),
    (None, None, "different trace level",
     "it passes Flax NNX variables that belong to the caller's trace to an "
     "NNX transform (nnx.scan, nnx.vmap, nnx.remat, ...): the model built "
     "inside value_fn shares the caller's nnx.Variable objects "
     "(`nnx.merge(graphdef, params, rest)` with `rest` from `nnx.split` "
     "does).", _NNX_FIX),
    ("JaxTransformError", None, None,
     "it calls a Flax linen module bound outside value_fn (`module.bind(...)`"
     " or a module captured inside another `apply`).",
     "Call `model.apply({'params': params, ...}, batch)` inside value_fn "
     "(with `mutable=[...]` for BatchNorm statistics, returning the loss "
     "only)."),
    (None, "UnexpectedTracerError", None,
     "it uses a tracer that escaped from another trace (an array computed "
     "inside another jax.jit / jax.grad / scan and kept in a Python object, a "
     "global or a model variable).", _PURE_FIX),
    (None, "ConcretizationTypeError", None,
     "it turns a traced array into a Python value (`float()`, `int()`, "
     "`bool()`, `if` / `while` on an array, `np.asarray`).",
     "Keep value_fn traceable as for jax.grad: jnp.where or jax.lax.cond "
     "instead of Python control flow on arrays."),
    (None, "TracerIntegerConversionError", None,
     "it turns a traced array into a Python int (an index or a shape).",
     "Keep value_fn traceable as for jax.grad (jnp.take, lax.dynamic_slice)."),
    (None, "TracerArrayConversionError", None,
     "it converts a traced array to NumPy (`np.asarray`, `np.array`).",
     "Use jax.numpy inside value_fn."),
)


def _trace_error(err: BaseException) -> Optional[tuple[str, str]]:
  """``(cause, fix)`` when ``err`` is a Flax or JAX trace error, else None."""
  if isinstance(err, ValueFnTraceError):  # already explained (nested wrapper)
    return None
  flax_errors = sys.modules.get("flax.errors")  # not imported: not raised
  for flax_name, jax_name, fragment, cause, fix in _TRACE_ERRORS:
    if flax_name is not None:
      cls = getattr(flax_errors, flax_name, None)
      if cls is not None and isinstance(err, cls):
        return cause, fix
    elif jax_name is not None:
      cls = getattr(jax.errors, jax_name, None)
      if cls is not None and isinstance(err, cls):
        return cause, fix
    elif (isinstance(err, ValueError) and fragment in str(err)
          and _raised_by_flax(err)):
      return cause, fix
  return None


def _raised_by_flax(err: BaseException) -> bool:
  """Whether the innermost frame of ``err``'s traceback is Flax's code."""
  tb = err.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  module = "" if tb is None else tb.tb_frame.f_globals.get("__name__", "")
  return module == "flax" or module.startswith("flax.")


def checked_value_fn(value_fn: ValueFn, transform: str) -> ValueFn:
  """Wraps ``value_fn`` so that a wrong output or a trace error fails clearly.

  A non-scalar or non-float output raises a ``ValueError`` that names the
  fix. A Flax or JAX trace error raised while the transform re-runs
  ``value_fn`` under its own ``jax.jvp`` / ``jax.vjp`` (Flax's
  ``TraceContextError`` for an NNX model that shares the caller's variables,
  ``jax.errors.UnexpectedTracerError``, ...) is re-raised as a
  :class:`ValueFnTraceError` (a ``ValueError``) naming ``transform``, the
  cause and the fix, chained to the original.
  """

  def wrapped(params):
    try:
      value = value_fn(params)
    except Exception as err:  # pylint: disable=broad-exception-caught
      explained = _trace_error(err)
      if explained is None:
        raise
      cause, fix = explained
      first_line = (str(err).strip().splitlines() or [""])[0]
      raise ValueFnTraceError(
          f"{transform}: `value_fn` failed when the transform re-ran it under "
          f"its own trace (jax.jvp / jax.vjp of value_fn): {cause}\n{fix}\n"
          f"(Original error: {type(err).__name__}: {first_line})") from err
    shape = jnp.shape(value)
    dtype = jnp.result_type(value)
    if shape != () or not jnp.issubdtype(dtype, jnp.floating):
      fix = ("Reduce per-example losses with `.mean()`." if shape != () else
             "Return the loss as a float (it is differentiated), e.g. "
             "`loss.astype(jnp.float32)`.")
      raise ValueError(
          f"{transform}: `value_fn(params)` must return a float scalar (the "
          f"mean mini-batch loss), got shape {shape} and dtype {dtype}. "
          f"{fix}")
    return value

  return wrapped


def concrete_float(value) -> Optional[float]:
  """``float(value)`` when known at trace time, else ``None`` (a value traced
  by :func:`optax.inject_hyperparams`, which cannot be checked or branched on
  in Python)."""
  try:
    return float(value)
  except (jax.errors.ConcretizationTypeError,
          jax.errors.TracerArrayConversionError, TypeError):
    return None


def concrete_int(value) -> Optional[int]:
  """``int(value)`` when it is known at trace time, else ``None``."""
  try:
    return int(value)
  except (jax.errors.ConcretizationTypeError, TypeError):
    return None


def static_num_probes(num_probes) -> int:
  """``num_probes`` as a Python int (``None`` means 1), validated.

  It sets an array shape, so a traced value (from
  :func:`optax.inject_hyperparams`) gets an error that names the fix.
  """
  if num_probes is None:
    return 1
  value = concrete_int(num_probes)
  if value is None:
    raise ValueError(
        "num_probes sets an array shape and must be a Python int. With "
        "optax.inject_hyperparams, pass static_args=('num_probes',).")
  if value < 1:
    raise ValueError(f"num_probes must be >= 1, got {value}.")
  return value


def check_non_negative(value, name: str, *, transform: str,
                       why: str = "") -> None:
  """Raises a ``ValueError`` for a concrete hyperparameter below 0 (or NaN).

  Schedules (callables) and traced values (from
  :func:`optax.inject_hyperparams`) cannot be checked here and pass.
  """
  number = None if callable(value) else concrete_float(value)
  if number is None:
    return
  if not number >= 0:
    raise ValueError(f"{transform}: {name} must be >= 0, got {value}. {why}"
                     .rstrip())


def check_decay(value, name: str, *, transform: str, why: str = "") -> None:
  """Raises a ``ValueError`` for a concrete decay factor outside ``[0, 1)``."""
  number = concrete_float(value)
  if number is not None and not 0 <= number < 1:
    raise ValueError(f"{transform}: {name} must lie in [0, 1), got {value}. "
                     f"{why}".rstrip())


def check_one_of(value, name: str, choices: tuple, *,
                 transform: Optional[str] = None) -> None:
  """Raises a ``ValueError`` unless ``value`` is one of ``choices``."""
  if value not in choices:
    prefix = f"{transform}: " if transform else ""
    raise ValueError(f"{prefix}{name} must be one of {choices}, got "
                     f"{value!r}.")


def value_fn_transformation(cfg, init, update
                            ) -> optax.GradientTransformationExtraArgs:
  """The transform of ``init(cfg, params)`` and ``update(cfg, updates,
  state, params, value_fn)``: ``update`` takes the params and the keyword
  ``value_fn`` and ignores other extra arguments (a whole ``optax.chain``
  can be called with them)."""
  def init_fn(params):
    return init(cfg, params)

  def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
    del extra_args
    return update(cfg, updates, state, params, value_fn)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
