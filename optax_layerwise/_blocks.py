"""Block-diagonal factors: a ``k x k`` factor kept as its diagonal blocks.

Blocking is how Shampoo scales its Kronecker factors to wide layers (Anil et
al., "Scalable Second Order Optimization for Deep Learning", arXiv
2002.09018, section 3.4): the index range ``0..k-1`` is cut into ``n``
consecutive blocks of equal size ``s <= block_size`` (the last one padded),
the factor's ``n`` diagonal ``s x s`` blocks are kept and inverted, and the
off-diagonal ones are dropped. Inverting costs ``n s^3`` instead of ``k^3``
and multiplying a ``(k, d)`` matrix ``n s^2 d`` instead of ``k^2 d``
(docs/step_sizes.md, "Input-side preconditioning").

A padded index is an identity row and column of its block, and the rows of
a product for padded indices are dropped, so the blocks act on ``0..k-1``
exactly as the block-diagonal ``k x k`` matrix would.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from optax_layerwise import _layer_matrices as _lm

__all__ = ["check_block_size", "layout", "identity", "diagonal_blocks",
           "spd_inverse", "multiply", "vector", "matvec"]


def check_block_size(block_size, transform: str) -> None:
  """A clear error unless ``block_size`` is a positive int or ``None``."""
  if block_size is not None and (isinstance(block_size, bool) or not
                                 isinstance(block_size, int)
                                 or block_size < 1):
    raise ValueError(f"{transform}: block_size must be a positive int or "
                     f"None, got {block_size!r}.")


def layout(k: int, block_size: Optional[int]) -> Tuple[int, int]:
  """``(n, s)``: ``k`` in ``n = ceil(k / block_size)`` blocks of size ``s =
  ceil(k / n)``; ``(1, k)`` for ``block_size=None`` or ``k <=
  block_size``."""
  if block_size is None or k <= block_size:
    return 1, k
  n = -(-k // block_size)
  return n, -(-k // n)


def identity(k: int, block_size: Optional[int], dtype) -> jax.Array:
  """The identity as ``(n, s, s)`` blocks (a buffer of its own on every
  call, so that a jitted step may donate the state)."""
  n, s = layout(k, block_size)
  return jnp.tile(jnp.eye(s, dtype=dtype), (n, 1, 1))


def diagonal_blocks(a: jax.Array, block_size: Optional[int]) -> jax.Array:
  """The ``(n, s, s)`` diagonal blocks of a ``(k, k)`` matrix; a padded
  index has 1 on its diagonal and 0 elsewhere."""
  k = a.shape[-1]
  n, s = layout(k, block_size)
  pad = n * s - k
  padded = jnp.pad(a, ((0, pad), (0, pad)))
  lanes = jnp.arange(n)
  blocks = padded.reshape(n, s, n, s)[lanes, :, lanes, :]
  is_pad = (jnp.arange(n * s) >= k).reshape(n, s).astype(a.dtype)
  return blocks + jax.vmap(jnp.diag)(is_pad)


def spd_inverse(blocks: jax.Array) -> jax.Array:
  """The inverse of each symmetric positive-definite block, one block after
  the other (:func:`jax.lax.map`): the batched Cholesky and triangular
  solves hung XLA:CPU in about one run in three (jax 0.10.2, eight layers'
  blocks in one step)."""
  return jax.lax.map(_lm.spd_inverse, blocks)


def multiply(blocks: jax.Array, m: jax.Array, out_dtype) -> jax.Array:
  """The block-diagonal matrix times ``m`` ``(k, d)``, in ``blocks``' dtype
  with ``out_dtype`` accumulation and result."""
  n, s, _ = blocks.shape
  k = m.shape[0]
  padded = jnp.pad(m.astype(blocks.dtype), ((0, n * s - k), (0, 0)))
  out = jnp.matmul(blocks, padded.reshape(n, s, -1),
                   preferred_element_type=out_dtype)
  return out.reshape(n * s, -1)[:k]


def vector(v: jax.Array, block_size: Optional[int]) -> jax.Array:
  """A ``(k,)`` vector as ``(n, s)`` blocks, padded with zeros."""
  n, s = layout(v.shape[0], block_size)
  return jnp.pad(v, (0, n * s - v.shape[0])).reshape(n, s)


def matvec(blocks: jax.Array, v: jax.Array) -> jax.Array:
  """Each ``(s, s)`` block times its ``(s,)`` slice of ``v`` ``(n, s)``."""
  return jnp.einsum("nij,nj->ni", blocks, v)
