"""Shadow accumulators: layer statistics out of transforms nested in a loss.

A layer called inside ``nn.scan``, ``nn.RNN``, ``nn.remat`` or ``nn.jit``
runs in an inner JAX trace: the tap sees its input and output there, but
values computed from them may not leave that trace, and its kernel is an
inner tracer that no longer *is* the params leaf. The statistics leave it
the way gradients do. Next to such a kernel the tap puts a zero *shadow*
leaf in the params (key ``<kernel>__olw_tap``) that Flax hands the layer like
any other variable (sliced by ``nn.scan``'s ``variable_axes``, broadcast by
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
from typing import Any, Optional

import jax
import jax.numpy as jnp

PyTree = Any

SUFFIX = "__olw_tap"


def name_for(kernel_name: str) -> str:
  """The shadow's key beside the kernel's."""
  return kernel_name + SUFFIX


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def emit(head: int, d_out: int, shadow: jax.Array, stats: jax.Array,
         y: jax.Array):
  """``y``; its backward pass gives ``shadow`` the cotangent ``[stats[:head],
  sum of y's cotangent over rows, stats[head:]]``.

  ``stats`` is ``[count, sum_x, sum_y, sum_xx]`` in the shadow's dtype and
  ``head = 1 + d_in + d_out``; ``y``'s trailing axes hold its ``d_out``
  outputs.
  """
  del head, d_out, shadow, stats
  return y


def _emit_fwd(head, d_out, shadow, stats, y):
  del head, d_out, shadow
  return y, stats


def _emit_bwd(head, d_out, stats, g):
  g_sum = jnp.sum(g.reshape(-1, d_out).astype(stats.dtype), axis=0)
  shadow_ct = jnp.concatenate([stats[:head], g_sum, stats[head:]])
  return shadow_ct, jnp.zeros_like(stats), g


emit.defvjp(_emit_fwd, _emit_bwd)


def stats_vector(rows: jax.Array, out: jax.Array,
                 second: Optional[jax.Array], dtype) -> jax.Array:
  """``[count, sum_x, sum_y, sum_xx]`` of one call, in ``dtype``."""
  parts = [jnp.full((1,), rows.shape[0], dtype),
           jnp.sum(rows.astype(dtype), axis=0),
           jnp.sum(out.astype(dtype), axis=0)]
  if second is not None:
    parts.append(second.astype(dtype).reshape(-1))
  return jnp.concatenate(parts)


def insert(params: PyTree, shadows: dict) -> Optional[PyTree]:
  """``params`` with each ``shadows[path]`` beside the leaf at ``path`` (a
  tuple of key names); ``None`` if a parent is not a mapping."""
  tree = params
  for path, value in shadows.items():
    tree = _insert_one(tree, path, value)
    if tree is None:
      return None
  return tree


def _insert_one(node, path: tuple, value):
  if not isinstance(node, Mapping) or path[0] not in node:
    return None
  if len(path) == 1:
    return _rebuilt(node, {**node, name_for(path[0]): value})
  child = _insert_one(node[path[0]], path[1:], value)
  return None if child is None else _rebuilt(node, {**node, path[0]: child})


def _rebuilt(node, items: dict):
  """A mapping of ``node``'s type (``dict``, ``FrozenDict``) with ``items``."""
  return items if type(node) is dict else type(node)(items)  # pylint: disable=unidiomatic-typecheck


def remove(tree: PyTree, prefix: tuple = ()) -> tuple[PyTree, dict]:
  """``tree`` without its shadows, and ``{kernel path: shadow}``."""
  if not isinstance(tree, Mapping):
    return tree, {}
  kept, found = {}, {}
  for key, value in tree.items():
    if isinstance(key, str) and key.endswith(SUFFIX):
      found[prefix + (key[:-len(SUFFIX)],)] = value
      continue
    kept[key], inner = remove(value, prefix + (key,))
    found.update(inner)
  return _rebuilt(tree, kept), found
