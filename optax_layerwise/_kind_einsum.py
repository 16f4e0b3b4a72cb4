"""The einsum kind: ``nn.Einsum`` and ``nnx.Einsum``.

An einsum ``"<input>,<kernel>-><output>"`` is a dense layer over rows when
its kernel's letters are the contracted ones (in the input, not in the
output) followed by output ones (in the output, not in the input), and every
input letter that is not contracted is kept in the output (it indexes rows).
The rows are then the input with its contracted axes moved last, as for
``DenseGeneral`` (:mod:`optax_layerwise._kind_dense`). Other einsums (a
kernel letter shared by input and output, i.e. one kernel per head; summed
input axes; an ellipsis) take the fallback, with that reason.
"""

from __future__ import annotations

from typing import Union

from optax_layerwise import _kind_dense
from optax_layerwise import _layer_kinds


def _linen_types():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return (nn.Einsum,)


def _nnx_types():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return (nnx.Einsum,)


def contraction(equation: str) -> Union[tuple, str]:
  """``(input letters, contracted letters, output letters of the kernel)``,
  or the reason the einsum is not a dense layer over rows."""
  equation = equation.replace(" ", "")
  if "..." in equation:
    return "einsum with an ellipsis"
  operands, out = equation.split("->")
  xs, ks = operands.split(",")
  contracted = "".join(c for c in ks if c in xs and c not in out)
  outputs = "".join(c for c in ks if c in out and c not in xs)
  if len(contracted) + len(outputs) != len(ks):
    return ("kernel axes shared by input and output (one kernel per head) "
            "or summed alone")
  if ks != contracted + outputs:
    return "kernel axes not ordered as contracted, then output axes"
  if not out.endswith(outputs):
    return "the kernel's output axes are not the trailing output axes"
  if any(c not in out for c in xs if c not in contracted):
    return "input axes summed out of the output"
  return xs, contracted, outputs


def _adapter(module, args, kwargs, y):
  x = args[0] if args else kwargs["inputs"]
  equation = kwargs.get("einsum_str") or (
      args[1] if len(args) > 1 else None) or module.einsum_str
  parsed = contraction(equation)
  if isinstance(parsed, str):
    return parsed
  xs, contracted, outputs = parsed
  kernel, bias = _kind_dense.kernel_and_bias(module)
  rows = _kind_dense.rows_over(x, tuple(xs.index(c) for c in contracted))
  return _layer_kinds.LayerCall(rows, y, len(outputs), kernel, bias)


KIND = _layer_kinds.register_layer_kind(_layer_kinds.LayerKind(
    name="einsum", linen_types=_linen_types, nnx_types=_nnx_types,
    adapter=_adapter))
