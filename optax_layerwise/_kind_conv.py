"""The convolution kind: ``nn.Conv`` and ``nnx.Conv`` (1-D to 3-D).

KF-QN-CNN (Ren, Bahamou and Goldfarb, arXiv 2102.06737) writes a
convolution as a dense layer over input patches: the kernel
``(*window, c_in, c_out)`` is the ``(prod(window) c_in, c_out)`` matrix, each
output position of each example is one row, and the Kronecker factors'
statistics (``A``, the means of ``h`` and of ``g_h``) are averaged over the
batch and the spatial positions. The patches are extracted with the layer's
own strides, padding (including ``'CIRCULAR'``, ``'REFLECT'`` and
``'CAUSAL'``, padded as Flax does) and dilations. Grouped and depthwise
convolutions (``feature_group_count > 1``) are not Kronecker-factored over
patches: they take the fallback, with that reason.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from optax_layerwise import _kind_dense
from optax_layerwise import _layer_kinds


def _broadcast(value, rank: int) -> tuple:
  value = 1 if value is None else value
  return (value,) * rank if isinstance(value, int) else tuple(value)


def _padded(x, padding, kernel_size, kernel_dilation):
  """Flax's padding: string modes pad explicitly, then ``'VALID'``."""
  if isinstance(padding, int):
    return x, [(padding, padding)] * len(kernel_size)
  if not isinstance(padding, str):
    return x, [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
  if padding in ("CIRCULAR", "REFLECT"):
    sizes = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
    pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in sizes] + [(0, 0)]
    mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]
    return jnp.pad(x, pads, mode=mode), "VALID"
  if padding == "CAUSAL":
    left = kernel_dilation[0] * (kernel_size[0] - 1)
    return jnp.pad(x, [(0, 0), (left, 0), (0, 0)]), "VALID"
  return x, padding


def patches(x, kernel_size, strides, padding, input_dilation,
            kernel_dilation):
  """``(n * positions, prod(kernel_size) * c_in)`` input patches of a
  channels-last convolution, in the order of the flattened Flax kernel
  ``(*window, c_in)``."""
  rank = len(kernel_size)
  x = x.reshape((-1,) + x.shape[-(rank + 1):])
  x, padding = _padded(x, padding, kernel_size, kernel_dilation)
  spatial = tuple(range(1, rank + 1))
  numbers = jax.lax.ConvDimensionNumbers(
      lhs_spec=(0, rank + 1) + spatial, rhs_spec=(rank + 1, rank) + tuple(
          range(rank)), out_spec=(0, rank + 1) + spatial)
  out = jax.lax.conv_general_dilated_patches(
      x, kernel_size, strides, padding, lhs_dilation=input_dilation,
      rhs_dilation=kernel_dilation, dimension_numbers=numbers)
  c_in, window = x.shape[-1], math.prod(kernel_size)
  # Patch features come channel-major, (c_in, *window): reorder them.
  out = out.reshape(-1, c_in, window)
  return jnp.swapaxes(out, 1, 2).reshape(-1, window * c_in)


def _linen_types():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return (nn.Conv,)


def _nnx_types():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return (nnx.Conv,)


def _adapter(module, args, kwargs, y):
  x = args[0] if args else kwargs["inputs"]
  kernel, bias = _kind_dense.kernel_and_bias(module)
  if module.feature_group_count != 1:
    return "grouped or depthwise convolution (feature_group_count > 1)"
  if getattr(module, "mask", None) is not None:
    return "masked convolution"
  size = _broadcast(module.kernel_size, 1) if isinstance(
      module.kernel_size, int) else tuple(module.kernel_size)
  rank = len(size)
  rows = patches(x, size, _broadcast(module.strides, rank), module.padding,
                 _broadcast(module.input_dilation, rank),
                 _broadcast(module.kernel_dilation, rank))
  return _layer_kinds.LayerCall(rows, y, 1, kernel, bias)


KIND = _layer_kinds.register_layer_kind(_layer_kinds.LayerKind(
    name="conv", linen_types=_linen_types, nnx_types=_nnx_types,
    adapter=_adapter))
