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
  forms is typically 1e-3 to 1e-2 on smooth networks (ReLU networks: see
  ``docs/step_sizes.md``). With ``step`` given, ``eps = step``: a secant
  over a finite step (the step sizes' ``hvp="secant"``, Bahamou and
  Goldfarb's step measured where it lands).

On top of an oracle, :func:`layer_quadratic_forms` returns, for a direction
``d`` split into layers ``d^(l)`` (docs/step_sizes.md, "Algorithm"):

* ``b_l = <g, d>_l`` (the first-order decrease),
* ``q_l = <d^(l), H d^(l)>`` by ``"exact"`` (all ``L`` masked products in one
  ``jax.vmap``; also gives the full ``L x L`` matrix ``M_lm = <d^(l), H d^(m)>``)
  or ``"hutchinson"`` (Rademacher layer signs ``e``, ``v = sum_l e_l d^(l)``,
  ``q_l ~ e_l <d, H v>_l``; unbiased since ``E[e_l e_m] = [l == m]``),
  or ``"row"`` (one product along ``d``: ``q_l = <d^(l), H d>``, no noise,
  but layer ``l``'s cross-layer terms ``sum_{m != l} M_lm`` included: not
  the diagonal block of arXiv 2305.13664).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from optax_layerwise import _checks
from optax_layerwise import _layers
from optax_layerwise import _parallel

PyTree = Any
ValueFn = Callable[[PyTree], jax.Array]
HVP_METHODS = ("forward_over_reverse", "gradient_difference")
ESTIMATORS = ("exact", "hutchinson", "row")

__all__ = ["LayerForms", "make_hvp", "layer_quadratic_forms",
           "layer_curvatures_forward", "rademacher", "check_measurement_args",
           "HVP_METHODS", "ESTIMATORS"]


def check_measurement_args(estimator: str, hvp: str, update_interval,
                           num_probes, *,
                           hvp_methods: tuple = HVP_METHODS) -> tuple:
  """Validates the arguments every curvature measurement shares.

  ``hvp_methods`` lists the ``hvp`` values the caller supports (the step
  sizes add ``"secant"``, which needs their last steps).

  Returns ``(static_interval, num_probes)``: ``update_interval`` as a Python
  int (``None`` when injected, so traced) and ``num_probes`` as a Python int.
  """
  _checks.check_one_of(estimator, "estimator", ESTIMATORS)
  _checks.check_one_of(hvp, "hvp", hvp_methods)
  static_interval = _checks.concrete_int(update_interval)
  if static_interval is not None and static_interval < 1:
    raise ValueError(f"update_interval must be >= 1, got {update_interval}.")
  return static_interval, _checks.static_num_probes(num_probes)


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
    step: Optional[jax.Array] = None,
    transform: str = "curvature",
    axis_name: Optional[_parallel.AxisName] = None,
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
    step: if given, the gradient difference's ``eps`` itself (signed, not
      relative): ``H v ~ (grad f(theta + step v) - g) / step``. With ``v``
      the step about to be taken and ``step = -1`` this is the secant
      curvature between ``theta`` and where the step lands.
    transform: the caller's name, for error messages.
    axis_name: under ``shard_map`` / ``pmap``: the data-parallel axis. The
      products are then this device's (``value_fn`` on its shard; see
      :func:`local_params`): take :func:`global_mean` of what is reduced
      from them.

  Returns:
    A function of a tangent ``v`` (params' structure and dtypes) returning the
    gradient and the Hessian-vector product, both in the params' dtypes. It
    can be ``jax.vmap``-ed over a batch of tangents (``g`` is then unbatched:
    use ``out_axes=(None, 0)``).
  """
  if method not in HVP_METHODS:
    raise ValueError(f"Unknown hvp method {method!r}; use one of {HVP_METHODS}.")
  loss = _checks.checked_value_fn(_parallel.local_value_fn(value_fn, axis_name), transform)
  grad_fn = jax.grad(loss)
  params = _parallel.local_params(params, axis_name)

  if method == "forward_over_reverse":

    def hvp(v):
      return jax.jvp(grad_fn, (params,), (_parallel.local_params(v, axis_name),))

    return hvp

  if grad is None:
    raise ValueError("hvp method 'gradient_difference' needs the gradient.")
  theta_norm = _tree_norm(params)

  def hvp_fd(v):
    if step is None:
      eps = fd_scale * (1.0 + theta_norm) / jnp.maximum(_tree_norm(v), 1e-30)
    else:
      eps = jnp.asarray(step, theta_norm.dtype)
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
    axis_name: Optional[_parallel.AxisName] = None,
    tangent_scales: Optional[jax.Array] = None,
) -> LayerForms:
  """Computes ``b_l`` and ``q_l`` (and ``M`` when exact) along ``direction``.

  Args:
    hvp: an oracle from :func:`make_hvp`.
    direction: ``d``, the params' structure.
    layers: the layer partition of the params.
    estimator: ``"exact"`` (``L`` products, vmapped), ``"hutchinson"``
      (``num_probes`` products, vmapped) or ``"row"`` (one product along the
      whole ``d``: ``q_l = <d^(l), H d>``, deterministic, the diagonal block
      plus layer ``l``'s cross-layer terms ``sum_{m != l} M_lm``).
    num_probes: Hutchinson probes averaged.
    key: PRNG key for the Hutchinson signs.
    tangent_scales: ``(L,)`` positive multipliers ``s_l`` of the layers of
      ``d`` in the tangents (``None``: ones). The forms are divided back by
      them, so they stay forms of ``d``: ``"exact"`` and ``"hutchinson"``
      are unchanged in expectation, while ``"row"`` becomes
      ``M_ll + sum_{m != l} (s_m / s_l) M_lm``. With ``s`` the last steps
      and a ``step=-1`` gradient difference, each product is a secant
      between ``theta`` and where the step lands.
    axis_name: the data-parallel axis of a per-device ``hvp`` (see
      :func:`make_hvp`): ``b``, ``q`` and ``M`` are then means over the axis
      (one all-reduce of ``(num_probes + 1) L`` or ``L^2 + L`` numbers);
      ``grad`` stays this device's.

  Returns:
    A :class:`LayerForms`.
  """
  if estimator not in ESTIMATORS:
    raise ValueError(
        f"Unknown curvature estimator {estimator!r}; use one of {ESTIMATORS}.")
  coeffs = _tangent_coefficients(estimator, layers.num_layers, num_probes,
                                 key, _layers.tree_stats_dtype(direction))
  scales = (jnp.ones(coeffs.shape[1:], coeffs.dtype) if tangent_scales is None
            else jnp.asarray(tangent_scales, coeffs.dtype))

  def products(c):
    return hvp(layers.scale(direction, c * scales))

  grad, hv = jax.vmap(products, out_axes=(None, 0))(coeffs)
  # rows[k, l] = <d, H v_k>_l, v_k = sum_m coeffs[k, m] s_m d^(m).
  rows = jax.vmap(lambda w: layers.inner(direction, w))(hv)
  decrease = layers.inner(grad, direction)
  rows, decrease = _parallel.global_mean((rows, decrease), axis_name)
  if estimator == "exact":
    matrix = rows.T / scales[None, :]  # M[l, m] = <d^(l), H d^(m)>
    matrix = 0.5 * (matrix + matrix.T)
    return LayerForms(grad, decrease, jnp.diagonal(matrix), matrix)
  curvature = jnp.mean(coeffs * rows, axis=0) / scales
  return LayerForms(grad, decrease, curvature, None)


def _tangent_coefficients(estimator: str, num_layers: int, num_probes: int,
                          key: Optional[jax.Array], dtype) -> jax.Array:
  """``(K, L)`` layer coefficients of the tangents ``v_k``: the identity
  (exact), Rademacher signs (Hutchinson) or one row of ones (row)."""
  if estimator == "exact":
    return jnp.eye(num_layers, dtype=dtype)
  if estimator == "row":
    return jnp.ones((1, num_layers), dtype)
  if key is None:
    raise ValueError("estimator='hutchinson' needs a PRNG key.")
  if num_probes < 1:
    raise ValueError(f"num_probes must be >= 1, got {num_probes}.")
  return rademacher(key, (num_probes, num_layers), dtype)


#: :func:`layer_curvatures_forward` traces the loss at most this many times:
#: with more layers, consecutive layers share a trace (compile time grows
#: with traces times layers; 96 layers in 96 traces took two minutes).
MAX_FORWARD_TRACES = 16


def layer_curvatures_forward(
    value_fn: ValueFn,
    params: PyTree,
    direction: PyTree,
    layers: _layers.Layers,
    *,
    transform: str = "curvature",
) -> LayerForms:
  """``b_l`` and the exact diagonal blocks ``q_l = d_l^T H_ll d_l`` as first
  and second directional derivatives of ``f(theta + t d^(l))`` at ``t = 0``.

  A ``jax.jvp`` of a ``jax.jvp`` of the loss as a function of one layer's
  leaves alone (the other layers are constants): the tangent enters at
  layer ``l``, so the layers before it carry none, and the primal passes
  are identical and merged by XLA's common-subexpression elimination. The
  numbers of ``estimator="exact"`` with the forward-over-reverse oracle, at
  about 2.7 gradients on the MNIST autoencoder (``L = 8``) against 10 for
  the same derivatives vmapped over masked tangents of all the params and
  18 forward-over-reverse (docs/step_sizes.md, "Measured cost"); no
  cross-layer matrix (``matrix`` and ``grad`` are ``None``). Beyond
  :data:`MAX_FORWARD_TRACES` layers, groups of consecutive layers (in the
  partition's order) share one trace, vmapped over masked tangents of the
  group. Not under ``shard_map`` / ``pmap``: the forward tangent of a
  ``pmean``-ed loss is already the mean over devices. A ``jax.custom_vjp``
  in ``value_fn`` raises ``NotImplementedError`` (JAX cannot push a tangent
  through it).

  Args:
    value_fn: the mini-batch loss.
    params: the point ``theta``.
    direction: ``d``.
    layers: the layer partition.
    transform: the caller's name, for error messages.
  """
  loss = _checks.checked_value_fn(value_fn, transform)
  dtype = _layers.tree_stats_dtype(direction)
  leaves = _layers.flatten_like(params, layers.treedef, "The params")
  tangents = _layers.flatten_like(direction, layers.treedef, "The direction")

  def group_derivatives(group):
    index = [i for l in group for i in layers.leaf_indices(l)]
    lane = [group.index(layers.leaf_layer[i]) for i in index]  # static

    def along(own):  # the loss as a function of the group's leaves
      full = list(leaves)
      for i, leaf in zip(index, own):
        full[i] = leaf
      return loss(jax.tree_util.tree_unflatten(layers.treedef, full))

    def derivatives(mask):  # one layer's: the group's tangent, masked
      tangent = [jnp.where(mask[lane[j]], tangents[i], 0).astype(
          tangents[i].dtype) for j, i in enumerate(index)]
      slope = lambda own: jax.jvp(along, (own,), (tangent,))[1]  # noqa: E731
      first, second = jax.jvp(slope, ([leaves[i] for i in index],),
                              (tangent,))
      return first.astype(dtype), second.astype(dtype)

    return jax.vmap(derivatives)(jnp.eye(len(group), dtype=bool))

  size = -(-layers.num_layers // MAX_FORWARD_TRACES)
  firsts, seconds = zip(*(
      group_derivatives(list(range(start, min(start + size,
                                               layers.num_layers))))
      for start in range(0, layers.num_layers, size)))
  return LayerForms(None, jnp.concatenate(firsts), jnp.concatenate(seconds),
                    None)
