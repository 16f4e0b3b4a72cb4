"""Data parallelism: per-device statistics and their global means.

Under `jax.shard_map` / `jax.pmap` with `axis_name`, `value_fn` is this
device's mini-batch loss (a mean over its shard; its `pmean` over the axis
is accepted too). The transforms evaluate it on this device only, so that
every gradient, Hessian-vector product and tapped statistic is the
per-device one, reduce it to the small statistics they need (per-layer
quadratic forms, Kronecker-factor moments, pre-activation means) and then
take the mean of those over the axis with one `jax.lax.pmean` a step and
stage. Every statistic used is linear in the per-example terms of a
mean-reduced loss, so the mean over equal shards is the global-batch value;
nonlinear functions of them (ratios, medians, inverses, norms) are applied
after the mean. Probes depend only on `seed` and the step count, so they are
drawn identically on every device.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax

PyTree = Any
ValueFn = Callable[[PyTree], jax.Array]

__all__ = ["AxisName", "local_params", "per_device_loss", "local_value_fn",
           "global_mean"]

AxisName = Union[str, tuple]


def _axes(axis_name: AxisName) -> tuple:
  return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (
      axis_name,)


def _varying_axes(x) -> frozenset:
  """The mesh axes ``x`` varies over in ``shard_map``'s type system."""
  aval = jax.typeof(x)
  vma = getattr(aval, "vma", None)
  if vma is None:
    mat = getattr(aval, "mat", None)
    vma = getattr(mat, "varying", ())
  return frozenset(vma)


def _checks_vma(axes: tuple) -> bool:
  """``True`` under ``shard_map(check_vma=True)`` (the default).

  There, differentiating a per-device loss with respect to replicated
  (invariant) params sums the gradient over the axis implicitly. ``pmap`` and
  ``check_vma=False`` give per-device gradients.
  """
  return all(a in _varying_axes(jax.lax.axis_index(a)) for a in axes)


def local_params(tree: PyTree, axis_name: Optional[AxisName]) -> PyTree:
  """A point (or tangent) at which derivatives of the loss are per-device.

  Identity unless under ``shard_map`` with ``check_vma=True``: there the
  replicated (invariant) leaves are cast to varying (no data moves), so that
  ``jax.grad`` / ``jax.jvp`` / ``jax.vjp`` at them give this device's
  derivatives instead of implicitly summing them over the axis.
  """
  if axis_name is None:
    return tree
  axes = _axes(axis_name)
  if not _checks_vma(axes):
    return tree

  def cast(x):
    missing = tuple(a for a in axes if a not in _varying_axes(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree_util.tree_map(cast, tree)


def per_device_loss(value: jax.Array,
                    axis_name: Optional[AxisName]) -> jax.Array:
  """A loss value whose derivatives at :func:`local_params` are per-device.

  ``value`` itself, unless it is invariant under ``check_vma=True``, i.e.
  ``value_fn`` already returned the axis mean of the per-device losses: it is
  then multiplied by the axis size, giving the sum of the per-device losses,
  whose derivatives with respect to this device's params are this device's.
  (Under ``pmap`` or ``check_vma=False`` the derivative of a ``pmean`` is
  already per-device.)
  """
  if axis_name is None:
    return value
  axes = _axes(axis_name)
  if _checks_vma(axes):
    varying = _varying_axes(value)
    for a in axes:
      if a not in varying:
        value = value * jax.lax.axis_size(a)
  return value


def local_value_fn(value_fn: ValueFn,
                   axis_name: Optional[AxisName]) -> ValueFn:
  """``value_fn`` as this device's loss (:func:`per_device_loss`), to be
  evaluated at :func:`local_params`."""
  if axis_name is None:
    return value_fn
  return lambda params: per_device_loss(value_fn(params), axis_name)


def global_mean(tree: PyTree, axis_name: Optional[AxisName]) -> PyTree:
  """``jax.lax.pmean`` of a pytree over ``axis_name`` (identity for ``None``).

  One call for the whole pytree: XLA combines its leaves into one
  all-reduce.
  """
  if axis_name is None:
    return tree
  return jax.lax.pmean(tree, axis_name)
