"""Row sums estimated from every ``stride``-th row of a layer call (ours).

Two of K-BFGS's costs are sums over a layer's ``n`` rows (examples times
positions): the input second moment ``sum_i a_i a_i^T`` (``O(n d_in^2)``),
and, for the per-layer step's curvature ``q_l``, the weight-gradient products
``sum_i [a_i; 1] g_i^T`` of both passes (``O(n d_in d_out)`` each). Both are
estimated as ``n / k`` times their sum over the ``k = ceil(n / s)`` rows
``0, s, 2s, ...`` of each call, ``s`` raised to the next stride coprime with
the rows per example (the positions of a sequence or an image), so that the
sample takes every position, each from other examples (a stride dividing
them would take only some columns of every image). Exact for ``s = 1``.
The estimates are sums over rows, so the shards of a data-parallel batch add
up to the whole batch's (when each shard's rows are a multiple of ``s``).
K-BFGS's ``A`` of a layer with a bias, ``[[A, abar], [abar^T, 1]]``, takes
the sampled rows' mean for ``abar`` too (:func:`second_moment`): the Gram
matrix of the sampled ``[a_i; 1]``, positive semi-definite, which the exact
mean beside a sampled ``A`` need not be.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Union

import jax
import jax.numpy as jnp


def _scale(n: int, stride: int) -> float:
  """``n / k``: the rows a sample of every ``stride``-th row stands for."""
  return n / len(range(0, n, stride))


def rows_matmul(rows: jax.Array):
  """``jnp.matmul`` for products that contract ``rows``' first axis: with
  the rows sharded over an explicit mesh axis (``jax.make_mesh``'s default
  ``AxisType.Explicit``, batch sharded under ``jax.jit``) the product's
  sharding must be given: replicated (XLA all-reduces the per-shard
  products)."""
  sharding = getattr(jax.typeof(rows), "sharding", None)
  if any(axes is not None for axes in getattr(sharding, "spec", ())):
    replicated = jax.sharding.NamedSharding(sharding.mesh,
                                            jax.sharding.PartitionSpec())
    return functools.partial(jnp.matmul, out_sharding=replicated)
  return jnp.matmul


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Every ``stride``-th row of the calls with at least ``min_rows`` rows
  (smaller calls, whose sums cost little, use all of theirs), the stride
  lowered where needed to keep at least ``min_sample`` rows in the sample."""
  stride: int = 1
  min_rows: int = 0
  min_sample: int = 0

  @classmethod
  def of(cls, value: Union[int, tuple, "Sampling"]) -> "Sampling":
    """From a stride or a ``(stride, min_rows[, min_sample])`` tuple."""
    if isinstance(value, Sampling):
      return value
    return cls(*value) if isinstance(value, tuple) else cls(value)

  def stride_for(self, rows: jax.Array, positions: int = 1) -> int:
    """The stride for this call's ``rows`` (``positions`` per example): the
    next one coprime with ``positions``, or, where that would leave fewer
    than ``min_sample`` rows, the largest smaller one that is coprime and
    leaves enough; 1 (all rows) below ``min_rows``, or for rows sharded over
    an explicit mesh (``jax.make_mesh``'s default) unless each shard's rows
    are a multiple of the stride (then the sample, :func:`take`, stays on
    its shards)."""
    n = rows.shape[0]
    stride = self.stride if n >= self.min_rows else 1
    while stride > 1 and math.gcd(stride, positions) > 1:
      stride += 1
    while stride > 1 and (math.gcd(stride, positions) > 1
                          or len(range(0, n, stride)) < self.min_sample):
      stride -= 1
    sharding = getattr(jax.typeof(rows), "sharding", None)
    spec = tuple(getattr(sharding, "spec", ()))
    axes = spec[0] if spec else None
    if stride == 1 or axes is None:
      return stride
    names = axes if isinstance(axes, tuple) else (axes,)
    shards = math.prod(sharding.mesh.shape[name] for name in names)
    return stride if rows.shape[0] % (stride * shards) == 0 else 1


def take(rows: jax.Array, stride: int) -> jax.Array:
  """``rows[::stride]``, as a reshape when ``stride`` divides the rows (a
  sharded batch then keeps its sharding: no strided slice across shards)."""
  n = rows.shape[0]
  if n % stride:
    return rows[::stride]
  return rows.reshape((n // stride, stride) + rows.shape[1:])[:, 0]


def second_moment(gram_fn, rows: jax.Array, sampling: Sampling,
                  positions: int = 1) -> tuple:
  """``(rows^T rows, sum of the rows)`` estimated from ``sampling``'s rows
  (``gram_fn`` forms their Gram matrix; ``positions`` rows per example);
  ``None`` for the sum when all rows are used."""
  stride = sampling.stride_for(rows, positions)
  if stride == 1:
    return gram_fn(rows), None
  sampled = take(rows, stride)
  scale = jnp.asarray(_scale(rows.shape[0], stride), rows.dtype)
  return gram_fn(sampled) * scale, jnp.sum(sampled, 0) * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gradient_hook(stride: int, y: jax.Array, rows: jax.Array,
                  slot: tuple) -> jax.Array:
  """``y``, a layer's output (rows flattened: ``(n, d_out)``); its backward
  pass gives ``slot`` (zeros of shapes ``(d_in, d_out)`` and ``(d_out,)``)
  the cotangents ``(n / k) sum_{i in S} a_i g_i^T`` and ``(n / k) sum_{i in
  S} g_i``: the gradients of the layer's ``W`` and ``b`` estimated from the
  rows ``S`` (every ``stride``-th; ``a_i`` the rows, ``g_i`` the cotangent
  of ``y``). The rows get no cotangent from it."""
  del stride, rows, slot
  return y


def _hook_fwd(stride, y, rows, slot):
  del slot
  return y, take(rows, stride)


def _sampled_cotangent(g: jax.Array, stride: int, dtype) -> tuple:
  """The sampled rows of ``g`` in ``dtype``, and the rows they stand for."""
  return (take(g, stride).astype(dtype),
          jnp.asarray(_scale(g.shape[0], stride), dtype))


def _hook_bwd(stride, sampled, g):
  g_rows, scale = _sampled_cotangent(g, stride, sampled.dtype)
  weights = rows_matmul(sampled)(sampled.T, g_rows) * scale
  return g, None, (weights, jnp.sum(g_rows, 0) * scale)


gradient_hook.defvjp(_hook_fwd, _hook_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def square_hook(stride: int, y: jax.Array, slot: jax.Array) -> jax.Array:
  """``y``, a layer's output (rows flattened: ``(n, d_out)``); its backward
  pass gives ``slot`` (zeros ``(d_out,)``) the cotangent ``(n / k) sum_{i in
  S} g_i * g_i``: the rows' sum of the squared output gradients, estimated
  from the rows ``S`` (every ``stride``-th; ``g_i`` the cotangent of
  ``y``)."""
  del stride, slot
  return y


def _square_fwd(stride, y, slot):
  return y, jnp.zeros((0,), slot.dtype)


def _square_bwd(stride, like, g):
  g_rows, scale = _sampled_cotangent(g, stride, like.dtype)
  return g, jnp.sum(jnp.square(g_rows), 0) * scale


square_hook.defvjp(_square_fwd, _square_bwd)
