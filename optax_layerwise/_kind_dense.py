"""The dense kind: ``nn.Dense``, ``nn.DenseGeneral``, ``nnx.Linear``,
``nnx.LinearGeneral`` and plain-JAX :func:`optax_layerwise.dense`.

A call contracts some input axes with the kernel's leading axes; moving them
last and flattening them gives the rows ``(n, d_in)``; every other input
axis (batch, sequence, heads that are not contracted) joins the rows, so its
statistics are averaged like the batch (K-BFGS, arXiv 2006.08877, section 3,
over the examples of the mini-batch).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from optax_layerwise import _layer_kinds


def unbox(value):
  """The array inside a Flax ``Partitioned`` / ``LogicallyPartitioned`` box."""
  unbox = getattr(value, "unbox", None)
  return unbox() if callable(unbox) else value


def _raw(variable):
  """The array held by an NNX variable."""
  get = getattr(variable, "get_value", None)
  return unbox(get() if get is not None else variable.value)


def kernel_and_bias(module):
  """The kernel and bias arrays (``None`` without a bias) of a linen or NNX
  module, unboxed: the very params leaves the tap matches by identity."""
  if hasattr(module, "get_variable"):  # linen
    kernel = unbox(module.get_variable("params", "kernel"))
    bias = (unbox(module.get_variable("params", "bias"))
            if module.use_bias else None)
    return kernel, bias
  bias = getattr(module, "bias", None)
  return _raw(module.kernel), None if bias is None else _raw(bias)


def rows_over(x, axes: tuple):
  """``x`` with the contracted ``axes`` moved last (in kernel order) and
  flattened, every other axis flattened into rows."""
  axes = tuple(a % x.ndim for a in axes)
  moved = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
  d_in = math.prod(x.shape[a] for a in axes)
  return moved.reshape(-1, d_in)


def _inputs(args, kwargs):
  return args[0] if args else kwargs["inputs"]


def _linen_types():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return (nn.Dense, nn.DenseGeneral)


def _nnx_types():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return (nnx.Linear, nnx.LinearGeneral)


def _as_tuple(x):
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _axes(module) -> tuple:
  """Contracted input axes and number of output axes of a module's call."""
  if not hasattr(module, "axis"):  # nn.Dense, nnx.Linear
    return (-1,), 1
  if hasattr(module, "batch_dims"):  # nn.DenseGeneral
    return _as_tuple(module.axis), len(_as_tuple(module.features))
  return _as_tuple(module.axis), len(_as_tuple(module.out_features))


def _adapter(module, args, kwargs, y):
  if _as_tuple(getattr(module, "batch_dims", ())) or getattr(
      module, "batch_axis", None):
    return "batch axes in the kernel (one kernel per batch entry)"
  kernel, bias = kernel_and_bias(module)
  axes, out_axes = _axes(module)
  x = _inputs(args, kwargs)
  # Flax sorts the contracted axes before it shapes the kernel.
  rows = rows_over(x, tuple(sorted(a % x.ndim for a in axes)))
  return _layer_kinds.LayerCall(rows, y, out_axes, kernel, bias)


KIND = _layer_kinds.register_layer_kind(_layer_kinds.LayerKind(
    name="dense", linen_types=_linen_types, nnx_types=_nnx_types,
    adapter=_adapter))
