"""Shadow accumulators: layer statistics out of transforms nested in a loss.

A layer called inside ``nn.scan``, ``nn.RNN``, ``nn.remat`` or ``nn.jit``
runs in an inner JAX trace: the tap sees its input and output there, but
values computed from them may not leave that trace, and its kernel is an
inner tracer that no longer *is* the params leaf. The statistics leave it
the way gradients do. Next to such a kernel the tap puts a zero *shadow*
leaf in the params (key ``<kernel>__olw_tap<leaf index>``) that Flax hands
the layer like any other variable (sliced by ``nn.scan``'s ``variable_axes``, broadcast by
``variable_broadcast``). The layer passes its output through :func:`emit`,
the identity whose backward pass returns, as the shadow's cotangent, the
call's statistics and the sum of its output cotangents. The transpose of the
scan then sums them over the steps of a broadcast cell (``nn.RNN``: the
statistics of all steps combined) and stacks them for a scanned stack
(``nn.scan`` over layers: one set per slice).

The shadow vector is ``[count, sum_x (d_in), sum_y (d_out), sum_g (d_out),
sum_xx (d_in^2, if asked)]``: counts and sums, so that repeated calls add up.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

PyTree = Any

SUFFIX = "__olw_tap"


def name_for(kernel_name: str, index: int) -> str:
  """The shadow's key beside the kernel's: it names the kernel's leaf index,
  so a layer reads its own shadow whatever path its params came by."""
  return f"{kernel_name}{SUFFIX}{index}"


def find(params, kernel_name: str = "kernel") -> Optional[tuple]:
  """``(leaf index, shadow)`` of the shadow in a layer's params dict."""
  if not isinstance(params, Mapping):
    return None
  prefix = kernel_name + SUFFIX
  for key, value in params.items():
    if isinstance(key, str) and key.startswith(prefix):
      return int(key[len(prefix):]), value
  return None


@dataclasses.dataclass(frozen=True)
class Layout:
  """Sizes of one kernel's shadow vector."""
  d_in: int
  d_out: int
  second_moment: bool

  @property
  def size(self) -> int:
    return 1 + self.d_in + 2 * self.d_out + (
        self.d_in * self.d_in if self.second_moment else 0)

  def pack(self, count, sum_x, sum_y, sum_g, sum_xx, dtype) -> jax.Array:
    """The vector ``[count, sum_x, sum_y, sum_g, sum_xx]`` in ``dtype``
    (``sum_xx`` left out unless the layout has the second moment)."""
    parts = [jnp.reshape(count, (1,)), sum_x, sum_y, sum_g]
    if self.second_moment:
      parts.append(jnp.reshape(sum_xx, (-1,)))
    return jnp.concatenate([jnp.asarray(x, dtype) for x in parts])

  def unpack(self, vec: jax.Array) -> dict:
    """Means of the statistics from a ``(..., size)`` vector of sums."""
    count = vec[..., :1]
    cut = [1, 1 + self.d_in, 1 + self.d_in + self.d_out,
           1 + self.d_in + 2 * self.d_out]
    second = None
    if self.second_moment:
      second = (vec[..., cut[3]:] / count).reshape(
          vec.shape[:-1] + (self.d_in, self.d_in))
    return dict(input_mean=vec[..., cut[0]:cut[1]] / count,
                output_mean=vec[..., cut[1]:cut[2]] / count,
                output_grad=vec[..., cut[2]:cut[3]],
                input_second_moment=second)


@dataclasses.dataclass(frozen=True)
class Emit:
  """Static part of one :func:`emit`: the layout, the statistics dtype, the
  Gram function, a static ``want`` (``None`` when it is traced), and where
  the statistics are formed."""
  layout: Layout
  dtype: Any
  gram: Callable  # (rows, want) -> rows^T rows, or zeros if not want
  static_want: Optional[bool]
  in_backward: bool  # form them in the backward pass from the saved rows

  def stats(self, rows, out, want) -> tuple:
    """``(sum_x, sum_y, sum_xx)`` of one call (``sum_xx`` ``None`` unless
    the layout has the second moment)."""
    rows = rows.astype(self.dtype)
    sum_y = jnp.sum(out.reshape(-1, self.layout.d_out).astype(self.dtype),
                    axis=0)
    sum_xx = None
    if self.layout.second_moment:
      pred = self.static_want if self.static_want is not None else want > 0
      sum_xx = self.gram(rows, pred)
    return jnp.sum(rows, axis=0), sum_y, sum_xx


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def emit(spec: Emit, shadow: jax.Array, rows: jax.Array, y: jax.Array,
         want: jax.Array):
  """``y``; its backward pass gives ``shadow`` the cotangent ``[count,
  sum_x, sum_y, sum of y's cotangent over rows, sum_xx]`` of this call
  (``want``: a float scalar, the second moment is formed where it is > 0).

  The statistics are formed in the backward pass from the saved rows when
  those are the smaller residual (``n d_in <= d_in^2``: a recurrent cell
  over a long sequence saves no ``d_in^2`` Gram matrix per step), else in
  the forward pass (a convolution's many patch rows).
  """
  del spec, shadow, rows, want
  return y


def _emit_fwd(spec: Emit, shadow, rows, y, want):
  del shadow
  count = jnp.asarray(rows.shape[0], spec.dtype)
  if spec.in_backward:
    return y, (count, (rows, y, want))
  return y, (count, spec.stats(rows, y, want))


def _emit_bwd(spec: Emit, saved, g):
  count, saved = saved
  sum_x, sum_y, sum_xx = spec.stats(*saved) if spec.in_backward else saved
  sum_g = jnp.sum(g.reshape(-1, spec.layout.d_out).astype(spec.dtype),
                  axis=0)
  shadow_ct = spec.layout.pack(count, sum_x, sum_y, sum_g, sum_xx,
                               spec.dtype)
  return shadow_ct, None, g, None


emit.defvjp(_emit_fwd, _emit_bwd)


def insert(params: PyTree, shadows: dict) -> Optional[PyTree]:
  """``params`` with, for each ``index: (path, value)``, the shadow
  ``value`` beside the leaf at ``path`` (a tuple of key names); ``None`` if
  a parent is not a mapping."""
  tree = params
  for index, (path, value) in shadows.items():
    tree = _insert_one(tree, path, name_for(path[-1], index), value)
    if tree is None:
      return None
  return tree


def _insert_one(node, path: tuple, key: str, value):
  if not isinstance(node, Mapping) or path[0] not in node:
    return None
  if len(path) == 1:
    return _rebuilt(node, {**node, key: value})
  child = _insert_one(node[path[0]], path[1:], key, value)
  return None if child is None else _rebuilt(node, {**node, path[0]: child})


def _rebuilt(node, items: dict):
  """A mapping of ``node``'s type (``dict``, ``FrozenDict``) with ``items``."""
  return items if type(node) is dict else type(node)(items)  # pylint: disable=unidiomatic-typecheck


def remove(tree: PyTree) -> tuple[PyTree, dict]:
  """``tree`` without its shadows, and ``{leaf index: shadow}``."""
  if not isinstance(tree, Mapping):
    return tree, {}
  kept, found = {}, {}
  for key, value in tree.items():
    if isinstance(key, str) and SUFFIX in key:
      found[int(key[key.index(SUFFIX) + len(SUFFIX):])] = value
      continue
    kept[key], inner = remove(value)
    found.update(inner)
  return _rebuilt(tree, kept), found
