"""Argument checks shared by the transforms: clear errors, raised here.

Hyperparameters may arrive traced (injected by
:func:`optax.inject_hyperparams`): :func:`concrete_float` and
:func:`concrete_int` return ``None`` for those, and the checks let them pass.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

PyTree = Any
ValueFn = Callable[[PyTree], jax.Array]

__all__ = ["require_value_fn", "checked_value_fn", "concrete_float",
           "concrete_int", "static_num_probes", "check_non_negative",
           "check_decay", "check_one_of"]

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


def checked_value_fn(value_fn: ValueFn, transform: str) -> ValueFn:
  """Wraps ``value_fn`` so a non-scalar or non-float output fails clearly."""

  def wrapped(params):
    value = value_fn(params)
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
