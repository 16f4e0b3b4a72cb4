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

from optax_layerwise import _layers

PyTree = Any
ValueFn = Callable[[PyTree], jax.Array]
HVP_METHODS = ("forward_over_reverse", "gradient_difference")
ESTIMATORS = ("exact", "hutchinson", "row")

__all__ = [
    "LayerForms", "make_hvp", "layer_quadratic_forms", "require_value_fn",
    "rademacher", "tree_all_finite", "concrete_int", "static_num_probes",
    "skip_non_finite_step", "skip_aware_chain", "check_non_negative",
    "AxisName", "local_params", "local_value_fn", "per_device_loss",
    "global_mean",
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


def checked_value_fn(value_fn: ValueFn, transform: str) -> ValueFn:
  """Wraps ``value_fn`` so a non-scalar or non-float output fails clearly."""

  def wrapped(params):
    value = value_fn(params)
    shape = jnp.shape(value)
    dtype = jnp.result_type(value)
    if shape != () or not jnp.issubdtype(dtype, jnp.floating):
      fix = ("Reduce per-example losses with `.mean()`." if shape != () else
             "Return the loss as a float (it is differentiated), e.g. "
             "`loss.astype(jnp.float32)`.")
      raise ValueError(
          f"{transform}: `value_fn(params)` must return a float scalar (the "
          f"mean mini-batch loss), got shape {shape} and dtype {dtype}. "
          f"{fix}")
    return value

  return wrapped


def concrete_float(value) -> Optional[float]:
  """``float(value)`` when known at trace time, else ``None`` (a value traced
  by :func:`optax.inject_hyperparams`, which cannot be checked or branched on
  in Python)."""
  try:
    return float(value)
  except (jax.errors.ConcretizationTypeError,
          jax.errors.TracerArrayConversionError, TypeError):
    return None


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


def check_non_negative(value, name: str, *, transform: str,
                       why: str = "") -> None:
  """Raises a ``ValueError`` for a concrete hyperparameter below 0 (or NaN).

  Schedules (callables) and traced values (from
  :func:`optax.inject_hyperparams`) cannot be checked here and pass.
  """
  number = None if callable(value) else concrete_float(value)
  if number is None:
    return
  if not number >= 0:
    raise ValueError(f"{transform}: {name} must be >= 0, got {value}. {why}"
                     .rstrip())


def check_measurement_args(estimator: str, hvp: str, update_interval,
                           num_probes, *,
                           hvp_methods: tuple = HVP_METHODS) -> tuple:
  """Validates the arguments every curvature measurement shares.

  ``hvp_methods`` lists the ``hvp`` values the caller supports (the step
  sizes add ``"secant"``, which needs their last steps).

  Returns ``(static_interval, num_probes)``: ``update_interval`` as a Python
  int (``None`` when injected, so traced) and ``num_probes`` as a Python int.
  """
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator must be one of {ESTIMATORS}, "
                     f"got {estimator!r}.")
  if hvp not in hvp_methods:
    raise ValueError(f"hvp must be one of {hvp_methods}, got {hvp!r}.")
  static_interval = concrete_int(update_interval)
  if static_interval is not None and static_interval < 1:
    raise ValueError(f"update_interval must be >= 1, got {update_interval}.")
  return static_interval, static_num_probes(num_probes)


def check_decay(value, name: str, *, transform: str, why: str = "") -> None:
  """Raises a ``ValueError`` for a concrete decay factor outside ``[0, 1)``."""
  number = concrete_float(value)
  if number is not None and not 0 <= number < 1:
    raise ValueError(f"{transform}: {name} must lie in [0, 1), got {value}. "
                     f"{why}".rstrip())


def tree_all_finite(tree: PyTree) -> jax.Array:
  """``True`` when every entry of every leaf is finite."""
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.asarray(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _no_new_non_finite(new_state, old_state) -> jax.Array:
  """``True`` unless an entry finite in ``old_state`` is not in ``new_state``.

  Entries that were already non-finite (a user transform's ``inf`` sentinel,
  say) do not count, so such a state does not block every step.
  """
  checks = [
      jnp.all(jnp.isfinite(a) | ~jnp.isfinite(b))
      for a, b in zip(jax.tree_util.tree_leaves(new_state),
                      jax.tree_util.tree_leaves(old_state))
      if jnp.issubdtype(jnp.result_type(a), jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def skip_non_finite_step(grads: PyTree, new_updates: PyTree, new_state,
                         old_state):
  """Skips the step when the gradient, the updates or the state go non-finite.

  Returns ``(new_updates, new_state)``, or, if any entry of ``grads`` or
  ``new_updates`` is NaN or infinite, or ``new_state`` has a non-finite
  entry where ``old_state`` had a finite one (e.g. an Adam second moment
  overflowing in float16), zero updates and ``old_state`` with only its
  ``num_skipped`` field incremented. ``count`` does not advance: a skipped
  step is the step of a run that never saw the bad batch, so the Hutchinson
  probes (keyed by ``count``) and the ``update_interval`` schedule of the
  following steps are those of that run, and the params and statistics never
  see a NaN. Selection by ``jnp.where``: no Python branch, jit- and
  scan-safe.
  """
  finite = tree_all_finite((grads, new_updates)) & _no_new_non_finite(
      new_state, old_state)
  skipped = old_state._replace(num_skipped=old_state.num_skipped + 1)
  state = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b),
                                 new_state, skipped)
  updates = jax.tree_util.tree_map(
      lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
  return updates, state


def skip_aware_chain(
    head: optax.GradientTransformation,
    *tail: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """``optax.chain(head, *tail)``, skipping the tail when ``head`` skips.

  ``head``'s state has a ``num_skipped`` counter (see
  :func:`skip_non_finite_step`). On a step it skips, the tail's states are
  kept as they were (a momentum buffer does not decay, a schedule's count
  does not advance) and the updates are zero, so a skipped step leaves the
  whole alias exactly as a run that never saw the bad batch. The state is
  the flat tuple of :func:`optax.chain`.
  """
  parts = [optax.with_extra_args_support(t) for t in (head,) + tail]

  def init_fn(params):
    return tuple(part.init(params) for part in parts)

  def update_fn(updates, state, params=None, **extra_args):
    if len(state) != len(parts):
      raise ValueError(f"Expected a state of {len(parts)} parts, got "
                       f"{len(state)}; re-run init.")
    updates, head_state = parts[0].update(updates, state[0], params,
                                          **extra_args)
    skipped = head_state.num_skipped != state[0].num_skipped
    new_state = [head_state]
    for part, old in zip(parts[1:], state[1:]):
      updates, new = part.update(updates, old, params, **extra_args)
      new_state.append(jax.tree_util.tree_map(
          lambda a, b: jnp.where(skipped, b, a), new, old))
    updates = jax.tree_util.tree_map(
        lambda u: jnp.where(skipped, jnp.zeros_like(u), u), updates)
    return updates, tuple(new_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def rademacher(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """Random signs +-1."""
  return jax.random.rademacher(key, shape, dtype=dtype)


# --- Data parallelism: per-device statistics and their global means --------
#
# Under `jax.shard_map` / `jax.pmap` with `axis_name`, `value_fn` is this
# device's mini-batch loss (a mean over its shard; its `pmean` over the axis
# is accepted too). The transforms evaluate it on this device only, so that
# every gradient, Hessian-vector product and tapped statistic is the
# per-device one, reduce it to the small statistics they need (per-layer
# quadratic forms, Kronecker-factor moments, pre-activation means) and then
# take the mean of those over the axis with one `jax.lax.pmean` a step and
# stage. Every statistic used is linear in the per-example terms of a
# mean-reduced loss, so the mean over equal shards is the global-batch value;
# nonlinear functions of them (ratios, medians, inverses, norms) are applied
# after the mean. Probes depend only on `seed` and the step count, so they are
# drawn identically on every device.

AxisName = Union[str, tuple]


def _axes(axis_name: AxisName) -> tuple:
  return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (
      axis_name,)


def _varying_axes(x) -> frozenset:
  """The mesh axes ``x`` varies over in ``shard_map``'s type system."""
  aval = jax.typeof(x)
  vma = getattr(aval, "vma", None)
  if vma is None:
    mat = getattr(aval, "mat", None)
    vma = getattr(mat, "varying", ())
  return frozenset(vma)


def _checks_vma(axes: tuple) -> bool:
  """``True`` under ``shard_map(check_vma=True)`` (the default).

  There, differentiating a per-device loss with respect to replicated
  (invariant) params sums the gradient over the axis implicitly. ``pmap`` and
  ``check_vma=False`` give per-device gradients.
  """
  return all(a in _varying_axes(jax.lax.axis_index(a)) for a in axes)


def local_params(tree: PyTree, axis_name: Optional[AxisName]) -> PyTree:
  """A point (or tangent) at which derivatives of the loss are per-device.

  Identity unless under ``shard_map`` with ``check_vma=True``: there the
  replicated (invariant) leaves are cast to varying (no data moves), so that
  ``jax.grad`` / ``jax.jvp`` / ``jax.vjp`` at them give this device's
  derivatives instead of implicitly summing them over the axis.
  """
  if axis_name is None:
    return tree
  axes = _axes(axis_name)
  if not _checks_vma(axes):
    return tree

  def cast(x):
    missing = tuple(a for a in axes if a not in _varying_axes(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree_util.tree_map(cast, tree)


def per_device_loss(value: jax.Array,
                    axis_name: Optional[AxisName]) -> jax.Array:
  """A loss value whose derivatives at :func:`local_params` are per-device.

  ``value`` itself, unless it is invariant under ``check_vma=True``, i.e.
  ``value_fn`` already returned the axis mean of the per-device losses: it is
  then multiplied by the axis size, giving the sum of the per-device losses,
  whose derivatives with respect to this device's params are this device's.
  (Under ``pmap`` or ``check_vma=False`` the derivative of a ``pmean`` is
  already per-device.)
  """
  if axis_name is None:
    return value
  axes = _axes(axis_name)
  if _checks_vma(axes):
    varying = _varying_axes(value)
    for a in axes:
      if a not in varying:
        value = value * jax.lax.axis_size(a)
  return value


def local_value_fn(value_fn: ValueFn,
                   axis_name: Optional[AxisName]) -> ValueFn:
  """``value_fn`` as this device's loss (:func:`per_device_loss`), to be
  evaluated at :func:`local_params`."""
  if axis_name is None:
    return value_fn
  return lambda params: per_device_loss(value_fn(params), axis_name)


def global_mean(tree: PyTree, axis_name: Optional[AxisName]) -> PyTree:
  """``jax.lax.pmean`` of a pytree over ``axis_name`` (identity for ``None``).

  One call for the whole pytree: XLA combines its leaves into one
  all-reduce.
  """
  if axis_name is None:
    return tree
  return jax.lax.pmean(tree, axis_name)


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
    axis_name: Optional[AxisName] = None,
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
  loss = checked_value_fn(local_value_fn(value_fn, axis_name), transform)
  grad_fn = jax.grad(loss)
  params = local_params(params, axis_name)

  if method == "forward_over_reverse":

    def hvp(v):
      return jax.jvp(grad_fn, (params,), (local_params(v, axis_name),))

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
    axis_name: Optional[AxisName] = None,
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
  rows, decrease = global_mean((rows, decrease), axis_name)
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
