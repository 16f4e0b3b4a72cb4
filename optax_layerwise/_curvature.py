"""Curvature oracles: gradient and Hessian-vector products, per-layer forms.

Everything is matrix-free. A Hessian-vector product ``H v`` of the mini-batch
loss ``f = value_fn`` comes from one of two oracles (:func:`make_hvp`):

* ``"forward_over_reverse"`` (exact): ``jax.jvp(jax.grad(f), (theta,), (v,))``.
  Its primal output is the gradient ``g``, so ``g`` comes for free.
* ``"gradient_difference"`` (one extra gradient): the forward difference
  ``H v ~ (grad f(theta + eps v) - g) / eps`` with the incoming gradient ``g``
  reused and ``eps = fd_scale * (1 + ||theta||) / ||v||``. Its error is
  ``O(eps ||v||^2 ||f'''||)`` plus float round-off ``O(u / eps)``; with the
  default ``fd_scale = 1e-3`` in float32 the relative error of the per-layer
  forms is typically 1e-3 to 1e-2 (measured in ``benchmarks/overhead.py``).

On top of an oracle, :func:`layer_quadratic_forms` returns, for a direction
``d`` split into layers ``d^(l)`` (ALGORITHMS.md section 1):

* ``b_l = <g, d>_l`` (the first-order decrease),
* ``q_l = <d^(l), H d^(l)>`` by ``"exact"`` (all ``L`` masked products in one
  ``jax.vmap``; also gives the full ``L x L`` matrix ``M_lm = <d^(l), H d^(m)>``)
  or ``"hutchinson"`` (Rademacher layer signs ``e``, ``v = sum_l e_l d^(l)``,
  ``q_l ~ e_l <d, H v>_l``; unbiased since ``E[e_l e_m] = [l == m]``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from optax_layerwise import _layers

PyTree = Any
ValueFn = Callable[[PyTree], jax.Array]
HVP_METHODS = ("forward_over_reverse", "gradient_difference")
ESTIMATORS = ("exact", "hutchinson")

__all__ = [
    "LayerForms", "make_hvp", "layer_quadratic_forms", "require_value_fn",
    "rademacher", "tree_all_finite", "concrete_int", "static_num_probes",
    "skip_non_finite_step",
]

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


def _checked_value_fn(value_fn: ValueFn, transform: str) -> ValueFn:
  """Wraps ``value_fn`` so a non-scalar or non-float output fails clearly."""

  def wrapped(params):
    value = value_fn(params)
    shape = jnp.shape(value)
    dtype = jnp.result_type(value)
    if shape != () or not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
          f"{transform}: `value_fn(params)` must return a float scalar (the "
          f"mean mini-batch loss), got shape {shape} and dtype {dtype}. "
          "Reduce per-example losses with `.mean()`.")
    return value

  return wrapped


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


def tree_all_finite(tree: PyTree) -> jax.Array:
  """``True`` when every entry of every leaf is finite."""
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.asarray(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def skip_non_finite_step(grads: PyTree, new_updates: PyTree, new_state,
                         old_state):
  """Skips the step when the gradient or the new updates are not finite.

  Returns ``(new_updates, new_state)``, or, if any entry of ``grads`` or
  ``new_updates`` is NaN or infinite, zero updates and ``old_state`` with its
  ``count`` and ``num_skipped`` fields incremented, so a bad batch never
  reaches the params or the statistics. Selection by ``jnp.where``: no
  Python branch, jit- and scan-safe.
  """
  finite = tree_all_finite((grads, new_updates))
  skipped = old_state._replace(count=old_state.count + 1,
                               num_skipped=old_state.num_skipped + 1)
  state = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b),
                                 new_state, skipped)
  updates = jax.tree_util.tree_map(
      lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
  return updates, state


def rademacher(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """Random signs +-1."""
  return jax.random.rademacher(key, shape, dtype=dtype)


def _tree_norm(tree: PyTree) -> jax.Array:
  return jnp.sqrt(sum(
      jnp.sum(jnp.square(x.astype(_layers.stats_dtype(x.dtype))))
      for x in jax.tree_util.tree_leaves(tree)))


def make_hvp(
    value_fn: ValueFn,
    params: PyTree,
    *,
    method: str = "forward_over_reverse",
    grad: Optional[PyTree] = None,
    fd_scale: float = 1e-3,
    transform: str = "curvature",
) -> Callable[[PyTree], tuple[PyTree, PyTree]]:
  """Returns ``hvp(v) -> (g, H v)`` for the loss ``value_fn`` at ``params``.

  Args:
    value_fn: the mini-batch loss, params -> scalar.
    params: the point ``theta``.
    method: ``"forward_over_reverse"`` (exact, about 2-3 gradients of cost) or
      ``"gradient_difference"`` (one extra gradient, needs ``grad``).
    grad: ``grad f(theta)``, required by ``"gradient_difference"`` and reused
      as the returned ``g``.
    fd_scale: relative step of the gradient difference.
    transform: the caller's name, for error messages.

  Returns:
    A function of a tangent ``v`` (params' structure and dtypes) returning the
    gradient and the Hessian-vector product, both in the params' dtypes. It
    can be ``jax.vmap``-ed over a batch of tangents (``g`` is then unbatched:
    use ``out_axes=(None, 0)``).
  """
  if method not in HVP_METHODS:
    raise ValueError(f"Unknown hvp method {method!r}; use one of {HVP_METHODS}.")
  loss = _checked_value_fn(value_fn, transform)
  grad_fn = jax.grad(loss)

  if method == "forward_over_reverse":

    def hvp(v):
      return jax.jvp(grad_fn, (params,), (v,))

    return hvp

  if grad is None:
    raise ValueError("hvp method 'gradient_difference' needs the gradient.")
  theta_norm = _tree_norm(params)

  def hvp_fd(v):
    eps = fd_scale * (1.0 + theta_norm) / jnp.maximum(_tree_norm(v), 1e-30)
    def shift(p, t):
      dtype = _layers.stats_dtype(p.dtype)
      return (p.astype(dtype) + eps * t.astype(dtype)).astype(p.dtype)

    def difference(a, b):
      dtype = _layers.stats_dtype(a.dtype)
      return ((a.astype(dtype) - b.astype(dtype)) / eps).astype(a.dtype)

    g_shift = grad_fn(jax.tree_util.tree_map(shift, params, v))
    hv = jax.tree_util.tree_map(difference, g_shift, grad)
    return grad, hv

  return hvp_fd


class LayerForms(NamedTuple):
  """Per-layer first- and second-order quantities along a direction ``d``.

  Attributes:
    grad: the gradient ``g`` (params' structure).
    decrease: ``b_l = <g, d>_l``, shape ``(L,)``, float32 (float64 for
      float64 params).
    curvature: ``q_l ~ d_l^T H_ll d_l``, shape ``(L,)``.
    matrix: ``M_lm = <d^(l), H d^(m)>``, shape ``(L, L)``, only for
      ``estimator="exact"`` (else ``None``).
  """
  grad: PyTree
  decrease: jax.Array
  curvature: jax.Array
  matrix: Optional[jax.Array]


def layer_quadratic_forms(
    hvp: Callable[[PyTree], tuple[PyTree, PyTree]],
    direction: PyTree,
    layers: _layers.Layers,
    *,
    estimator: str = "hutchinson",
    num_probes: int = 1,
    key: Optional[jax.Array] = None,
) -> LayerForms:
  """Computes ``b_l`` and ``q_l`` (and ``M`` when exact) along ``direction``.

  Args:
    hvp: an oracle from :func:`make_hvp`.
    direction: ``d``, the params' structure.
    layers: the layer partition of the params.
    estimator: ``"exact"`` (``L`` products, vmapped) or ``"hutchinson"``
      (``num_probes`` products, vmapped).
    num_probes: Hutchinson probes averaged.
    key: PRNG key for the Hutchinson signs.

  Returns:
    A :class:`LayerForms`.
  """
  if estimator not in ESTIMATORS:
    raise ValueError(
        f"Unknown curvature estimator {estimator!r}; use one of {ESTIMATORS}.")
  num_layers = layers.num_layers
  if estimator == "exact":
    coeffs = jnp.eye(num_layers, dtype=_layers.tree_stats_dtype(direction))
  else:
    if key is None:
      raise ValueError("estimator='hutchinson' needs a PRNG key.")
    if num_probes < 1:
      raise ValueError(f"num_probes must be >= 1, got {num_probes}.")
    coeffs = rademacher(key, (num_probes, num_layers),
                        _layers.tree_stats_dtype(direction))

  def products(c):
    return hvp(layers.scale(direction, c))

  grad, hv = jax.vmap(products, out_axes=(None, 0))(coeffs)
  # rows[k, l] = <d, H v_k>_l, with v_k = sum_m coeffs[k, m] d^(m).
  rows = jax.vmap(lambda w: layers.inner(direction, w))(hv)
  decrease = layers.inner(grad, direction)
  if estimator == "exact":
    matrix = rows.T  # M[l, m] = <d^(l), H d^(m)>
    matrix = 0.5 * (matrix + matrix.T)
    return LayerForms(grad, decrease, jnp.diagonal(matrix), matrix)
  curvature = jnp.mean(coeffs * rows, axis=0)
  return LayerForms(grad, decrease, curvature, None)
