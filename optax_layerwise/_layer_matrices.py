"""A layer's matrix view ``[W; b]`` and its input statistics.

Every layer the Kronecker-factored methods precondition (K-BFGS, Goldfarb,
Ren and Bahamou, arXiv 2006.08877, section 3; the input-side preconditioner
of :mod:`optax_layerwise._input_factor`) is a dense layer ``h = a @ W + b``
over rows (:mod:`optax_layerwise._layer_kinds`).
These helpers read and write its ``(k, d_out)`` matrix ``[W; b]`` from the
kernel and bias leaves (one slice of a kernel stacked by ``nn.scan``), pick
its statistics out of a tap, and form its input factor
``A = mean_i [a_i; 1] [a_i; 1]^T``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optax_layerwise import _hardware
from optax_layerwise import _layer_kinds
from optax_layerwise import _taps

Spec = _layer_kinds.LayerSpec

#: Automatic ``precondition_dtype``: layers whose factors are both at least
#: this wide take bfloat16 products (smaller ones cost little either way).
BF16_MIN_WIDTH = 128

__all__ = ["BF16_MIN_WIDTH", "precondition_dtype", "Spec", "sym",
           "spd_inverse", "homogeneous", "averaged", "part", "set_part",
           "matrix", "set_matrix", "layer_indices", "layer_tap"]


def sym(x: jax.Array) -> jax.Array:
  return 0.5 * (x + x.T)


def spd_inverse(x: jax.Array) -> jax.Array:
  chol = jnp.linalg.cholesky(x)
  eye = jnp.eye(x.shape[0], dtype=x.dtype)
  return sym(jax.scipy.linalg.cho_solve((chol, True), eye))


def homogeneous(spec: Spec, tap: _taps.DenseTap):
  """``abar`` and ``A_batch`` with the homogeneous coordinate for a bias
  (``A_batch``'s from the rows its second moment was formed from, so that
  it stays positive semi-definite)."""
  mean, second = tap.input_mean, tap.input_second_moment
  if spec.bias_index is None:
    return mean, second
  one = jnp.ones((1,), mean.dtype)
  abar = jnp.concatenate([mean, one])
  rows_mean = mean if tap.second_moment_mean is None else (
      tap.second_moment_mean)
  a_batch = jnp.block([[second, rows_mean[:, None]],
                       [rows_mean[None, :], one[None]]])
  return abar, a_batch


def averaged(old, batch, beta, first, refresh=True):
  """The running input factor: ``A_batch`` on the first step, else ``beta A
  + (1 - beta) A_batch`` when ``refresh``, else ``A`` unchanged (K-BFGS's
  moving average, arXiv 2006.08877, section 3). Linear, so it also gives
  ``A v`` from ``(A v, A_batch v)``."""
  average = beta * old + (1.0 - beta) * batch
  return jnp.where(first, batch, jnp.where(refresh, average, old))


def part(leaves: list, index: int, spec: Spec) -> jax.Array:
  """The layer's slice of a leaf (the whole leaf unless stacked)."""
  return leaves[index][spec.slice] if spec.slice else leaves[index]


def set_part(leaves: list, index: int, spec: Spec, value) -> None:
  """Writes the layer's slice of a leaf."""
  leaf = leaves[index]
  if not spec.slice:
    leaves[index] = value.reshape(jnp.shape(leaf)).astype(leaf.dtype)
    return
  shape = jnp.shape(leaf)[len(spec.slice):]
  leaves[index] = leaf.at[spec.slice].set(
      value.reshape(shape).astype(leaf.dtype))


def matrix(leaves: list, spec: Spec) -> jax.Array:
  """A layer's ``(k, d_out)`` matrix ``[W; b]`` from its kernel and bias."""
  w = part(leaves, spec.kernel_index, spec).reshape(spec.d_in, spec.d_out)
  if spec.bias_index is None:
    return w
  return jnp.concatenate([w, part(leaves, spec.bias_index, spec).reshape(
      1, -1)])


def set_matrix(leaves: list, spec: Spec, matrix: jax.Array) -> None:
  """Writes a ``(k, d_out)`` matrix back into the kernel and bias leaves."""
  set_part(leaves, spec.kernel_index, spec, matrix[:spec.d_in])
  if spec.bias_index is not None:
    set_part(leaves, spec.bias_index, spec, matrix[spec.d_in])


def layer_indices(spec: Spec) -> tuple:
  return tuple(i for i in (spec.kernel_index, spec.bias_index)
               if i is not None)


def layer_tap(taps: _taps.TapResult, spec: Spec, transform: str):
  """The layer's statistics (its slice's, for a scanned stack), or
  ``None`` if no call was tapped."""
  tap = taps.layers.get(spec.kernel_index)
  if tap is None or not spec.slice:
    return tap
  if tap.input_mean.ndim == 1:
    raise ValueError(
        f"{transform}: the layer {spec.name} was read as a slice of a stacked "
        "kernel, but it was called unstacked. Pass a `dense_layers` "
        "predicate returning the number of contracted leading kernel axes "
        "for this leaf.")
  return jax.tree_util.tree_map(lambda x: x[spec.slice], tap)


def precondition_dtype(given, spec: Spec, factor_dtype):
  """The dtype of the preconditioning products' inputs: ``given``, or by
  default bfloat16 for float32 factors of a layer with both factors at
  least ``BF16_MIN_WIDTH`` wide on a backend that multiplies bfloat16
  natively (:mod:`._hardware`), else the factors' own dtype."""
  if given is not None:
    return jnp.dtype(given)
  if (jnp.dtype(factor_dtype) == jnp.float32
      and min(spec.k, spec.d_out) >= BF16_MIN_WIDTH
      and _hardware.native_bfloat16(jax.default_backend())):
    return jnp.dtype(jnp.bfloat16)
  return jnp.dtype(factor_dtype)
