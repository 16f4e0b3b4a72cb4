"""Curvature-based layer-wise learning rates (Gao and Zhong, arXiv 2012.08795).

Large-batch training fails in part because layers see very different
curvature; CBLR fits each layer's learning rate to its own curvature, and LARS
is one instance. Only the paper's abstract could be consulted, so this module
implements the library's reading (docs/curvature_lr.md, "Algorithm")::

    kappa_l = g_l^T H_ll g_l / ||g_l||^2   (curvature along the layer gradient)
    lr_l    = scale / kappa_l               (CBLR: a Newton step along g_l)
    update_l = lr_l * g_l                   (negated by the alias's lr stage)

Curvature estimators (``curvature=``):

* ``"hessian"``: forward-over-reverse (or gradient-difference) Hessian-vector
  products of ``value_fn`` through the shared oracles of
  :mod:`optax_layerwise._curvature`, with ``d = g``: ``estimator="exact"``
  (one product per layer, vmapped) or ``"hutchinson"`` (one per probe).
* ``"secant"``: free, from successive iterates, ``kappa_l = <s, y>_l /
  ||s_l||^2`` with ``s = theta_t - theta_{t-1}``, ``y = g_t - g_{t-1}``: the
  inverse of a per-layer Barzilai-Borwein step. Needs no ``value_fn`` and no
  extra pass; its state keeps the previous params and gradient.
* ``"norm_ratio"``: ``kappa_l = ||g_l|| / ||theta_l||``, so ``lr_l = scale *
  ||theta_l|| / ||g_l||``: LARS's trust ratio with ``trust_coefficient =
  scale`` (You et al. 2017; :func:`optax.scale_by_trust_ratio`).

Reductions (``reduce=``): ``"rayleigh"`` (CBLR, the quotient above) or
``"median"`` (MCLR): the median over the layer's entries of an elementwise
curvature estimate, robust to a few extreme entries: the Hutchinson diagonal
``|mean_k z_k * H z_k|`` (Rademacher ``z_k`` over every entry, one product per
probe) for ``"hessian"``, the elementwise secant ratios ``y_i / s_i`` (entries
with ``s_i = 0`` ignored) for ``"secant"``.

Weight decay ``wd`` (the objective is ``f + wd / 2 ||theta||^2``): the
transform adds ``wd * theta`` to the gradient and ``wd`` (the exact curvature
of the L2 term along any direction) to ``kappa_l``. For ``"norm_ratio"`` two
conventions exist: Optax's ``optax.lars`` takes the norm of the regularised
gradient, ``||g + wd theta||_l / ||theta_l||`` (``weight_decay_convention=
"optax"``, the default); You et al. (2017, Algorithm 1) use ``||g_l|| /
||theta_l|| + wd`` (``"lars_paper"``), which is the additive rule above.

Safeguards (the library's, modelled on the layer-wise step sizes): a layer
whose measurement is unusable (``kappa_l <= curvature_floor`` or non-finite,
and the secant estimator's first step, which has no previous iterate) keeps
its last accepted learning rate (``initial_lr`` until it has one); accepted
rates are clipped to ``[min_lr, max_lr]`` and optionally smoothed by an
exponential moving average; ``update_interval`` re-measures only every k steps
under ``lax.cond``. A non-finite gradient or update skips the whole step (zero
update, state unchanged but ``num_skipped``; ``count`` does not advance, so
the run continues as one that never saw the bad batch); a non-finite
measurement (NaN loss or Hessian-vector product) makes the affected layers
fall back, counted in ``num_fallbacks``. Statistics are float32 (float64 for
float64 params, :func:`optax_layerwise._layers.stats_dtype`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from optax_layerwise import _checks
from optax_layerwise import _curvature
from optax_layerwise import _layers
from optax_layerwise import _nonfinite
from optax_layerwise import _parallel
from optax_layerwise import _safeguards

PyTree = Any
ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]

__all__ = [
    "ScaleByCurvatureLRState",
    "scale_by_curvature_lr",
    "cblr",
    "mclr",
]

_NAME = "scale_by_curvature_lr"
CURVATURES = ("hessian", "secant", "norm_ratio")
REDUCTIONS = ("rayleigh", "median")
WEIGHT_DECAY_CONVENTIONS = ("optax", "lars_paper")


class ScaleByCurvatureLRState(NamedTuple):
  """State of :func:`scale_by_curvature_lr`; all shapes are fixed.

  Attributes:
    count: steps taken (int32; a skipped step does not count); seeds the
      Hutchinson probes and the ``update_interval`` schedule.
    lrs: per-layer learning rates ``lr_l`` applied last, ``(L,)``; float32
      (float64 for float64 params), as every statistic here.
    curvatures: last finite measured ``kappa_l`` (weight decay included),
      ``(L,)``; 0 until the first (after the secant warm-up step), and 0 for
      a ``"norm_ratio"`` layer with a zero norm.
    num_accepted: per layer, measurements accepted, ``(L,)`` int32.
    num_fallbacks: per layer, measurements rejected by the safeguards
      (including the secant estimator's warm-up step), ``(L,)`` int32.
    num_skipped: steps skipped for a non-finite gradient or update (int32).
    joint_scale: the factor ``t <= 1`` applied to every layer's rate at the
      last measurement (1 when ``joint_step=False``): ``lrs`` are the
      per-layer rates before it, the update is ``t * lrs_l * g_l``.
    prev_params: ``curvature="secant"`` only: the params of the last step
      taken, in the statistics dtype (``None`` otherwise).
    prev_grads: ``curvature="secant"`` only: the gradient of the last step
      taken, in the statistics dtype (``None`` otherwise).
  """
  count: jax.Array
  lrs: jax.Array
  curvatures: jax.Array
  num_accepted: jax.Array
  num_fallbacks: jax.Array
  num_skipped: jax.Array
  joint_scale: jax.Array
  prev_params: Optional[PyTree]
  prev_grads: Optional[PyTree]


def elementwise_probes(key: jax.Array, params: PyTree,
                       num_probes: int) -> PyTree:
  """Rademacher probes over every entry, with a leading probe axis.

  Leaf ``i`` (flatten order) draws its signs from ``jax.random.split(key,
  num_leaves)[i]``, shape ``(num_probes,) + leaf.shape``, in the leaf's dtype.
  The median-curvature estimator uses ``key = fold_in(PRNGKey(seed), count)``.
  """
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(treedef, [
      _curvature.rademacher(k, (num_probes,) + jnp.shape(x), jnp.result_type(x))
      for k, x in zip(keys, leaves)])


def _layer_medians(partition: _layers.Layers, tree: PyTree) -> jax.Array:
  """Per-layer medians of all entries (NaN entries ignored), ``(L,)``."""
  leaves = jax.tree_util.tree_leaves(tree)
  medians = []
  for layer in range(partition.num_layers):  # static, one op per layer
    entries = jnp.concatenate([
        jnp.ravel(leaves[i]).astype(_layers.stats_dtype(leaves[i].dtype))
        for i in partition.leaf_indices(layer)])
    medians.append(jnp.nanmedian(entries))
  return jnp.stack(medians)


@dataclasses.dataclass(frozen=True)
class _Config:
  """The checked arguments (numbers may be traced when injected)."""
  curvature: str
  reduce: str
  scale: Any
  estimator: str
  num_probes: int
  hvp: str
  weight_decay: Any
  weight_decay_convention: str
  initial_lr: Any
  min_lr: Any
  max_lr: Any
  curvature_floor: Any
  ema: Any
  update_interval: Any
  static_interval: Optional[int]
  fd_scale: Any
  joint_step: bool
  max_relative_change: Any
  layers: _layers.LayerGrouping
  seed: Any
  axis_name: Optional[_parallel.AxisName]

  @property
  def is_secant(self) -> bool:
    return self.curvature == "secant"

  @property
  def no_weight_decay(self) -> bool:
    return _checks.concrete_float(self.weight_decay) == 0.0

  @property
  def use_trust(self) -> bool:
    """Whether the displacement bound applies (``"norm_ratio"`` is it)."""
    return (self.max_relative_change is not None
            and self.curvature != "norm_ratio")


def _check_choice(value, name: str, choices: tuple) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


def _check_options(curvature, reduce, estimator, num_probes, hvp,
                   update_interval, weight_decay_convention) -> tuple:
  """Checks the string options; returns ``(estimator, static_interval,
  num_probes)`` (``estimator=None`` resolved: exact quotients unless probes
  are asked for)."""
  _check_choice(curvature, "curvature", CURVATURES)
  _check_choice(reduce, "reduce", REDUCTIONS)
  if estimator is None:
    estimator = ("hutchinson" if reduce == "median" or num_probes is not None
                 else "exact")
  static_interval, num_probes = _curvature.check_measurement_args(
      estimator, hvp, update_interval, num_probes)
  _check_choice(weight_decay_convention, "weight_decay_convention",
                WEIGHT_DECAY_CONVENTIONS)
  if curvature == "norm_ratio" and reduce == "median":
    raise ValueError(
        "curvature='norm_ratio' is a per-layer norm ratio (LARS) with no "
        "elementwise estimate: use reduce='rayleigh', or curvature='hessian' "
        "or 'secant' with reduce='median' (MCLR).")
  if (curvature == "hessian" and reduce == "median"
      and estimator != "hutchinson"):
    raise ValueError(
        "reduce='median' needs the elementwise Hessian diagonal, estimated by "
        "Hutchinson probes: use estimator='hutchinson' (the exact diagonal "
        "would cost one Hessian-vector product per parameter).")
  return estimator, static_interval, num_probes


def _check_numbers(curvature, scale, initial_lr, min_lr, max_lr,
                   weight_decay, ema) -> None:
  """Clear errors for bad numbers; traced (injected) ones pass."""
  static_initial_lr = _checks.concrete_float(initial_lr)
  if curvature == "secant" and static_initial_lr is not None and not (
      static_initial_lr > 0):
    raise ValueError(
        "curvature='secant' warms up with `initial_lr` on its first step; it "
        f"must be > 0 (got {initial_lr}), else the params never move.")
  for name, value, why in (
      ("scale", scale, "lr_l = scale / kappa_l is a learning rate; a "
       "negative one would climb the loss."),
      ("initial_lr", initial_lr, "It is a layer's learning rate before its "
       "first accepted measurement."),
      ("min_lr", min_lr, "It is the lower clip of the learning rates."),
      ("max_lr", 0.0 if max_lr is None else max_lr, "It is the upper clip of "
       "the learning rates; None for no clip."),
      ("weight_decay", weight_decay, "It is an L2 strength; 0 for none.")):
    _checks.check_non_negative(value, name, transform=_NAME, why=why)
  _checks.check_decay(ema, "ema", transform=_NAME,
                         why="0 for no averaging; 1 would freeze the steps.")


def _check_joint_step(curvature, joint_step) -> bool:
  """``joint_step`` resolved (``None``: on for ``"hessian"``) and checked."""
  if joint_step is None:
    joint_step = curvature == "hessian"
  if joint_step and curvature != "hessian":
    raise ValueError(
        "joint_step=True measures the curvature along the combined step with "
        "a Hessian-vector product: it needs curvature='hessian'.")
  return bool(joint_step)


def _check_args(curvature, reduce, estimator, num_probes, hvp,
                update_interval, weight_decay_convention, scale, initial_lr,
                min_lr, max_lr, weight_decay, ema, joint_step) -> tuple:
  """Clear errors for bad arguments, in this order: the options, the
  numbers, ``joint_step``. Returns ``(estimator, static_interval,
  num_probes, joint_step)`` with the ``None`` defaults resolved."""
  estimator, static_interval, num_probes = _check_options(
      curvature, reduce, estimator, num_probes, hvp, update_interval,
      weight_decay_convention)
  _check_numbers(curvature, scale, initial_lr, min_lr, max_lr, weight_decay,
                 ema)
  return (estimator, static_interval, num_probes,
          _check_joint_step(curvature, joint_step))


def _init(cfg: _Config, params) -> ScaleByCurvatureLRState:
  # Bad params fail here, at the first call (masked, integer, complex).
  _layers.check_params(params, transform=_NAME)
  num_layers = _layers.group_layers(params, cfg.layers).num_layers
  # Functions, not arrays: every state leaf its own buffer, so that a
  # jitted step may donate the state.
  dtype = _layers.tree_stats_dtype(params)
  zeros = lambda: jnp.zeros((num_layers,), dtype)
  counts = lambda: jnp.zeros((num_layers,), jnp.int32)
  prev = lambda: (_layers.to_stats(jax.tree_util.tree_map(
      jnp.zeros_like, params)) if cfg.is_secant else None)
  return ScaleByCurvatureLRState(
      count=jnp.zeros([], jnp.int32),
      lrs=zeros() + cfg.initial_lr,
      curvatures=zeros(),
      num_accepted=counts(),
      num_fallbacks=counts(),
      num_skipped=jnp.zeros([], jnp.int32),
      joint_scale=jnp.ones([], dtype),
      prev_params=prev(),
      prev_grads=prev())


def _norm(partition: _layers.Layers, tree: PyTree) -> jax.Array:
  """Per-layer norms ``||x_l||``, ``(L,)``."""
  return jnp.sqrt(partition.sq_norm(tree))


def _regularised(cfg: _Config, grads, params) -> PyTree:
  """``g + weight_decay * theta`` in the gradient's dtypes."""
  if cfg.no_weight_decay:
    return grads
  return jax.tree_util.tree_map(
      lambda g, p: (g + cfg.weight_decay * p).astype(g.dtype), grads, params)


def _trust_limit(cfg: _Config, partition, params, reg_grads):
  """``max_relative_change ||theta_l|| / ||g_l||`` (``inf`` for a zero
  layer or gradient), or ``None`` without the bound: the quadratic model is
  trusted over at most that fraction of the layer's norm."""
  if not cfg.use_trust:
    return None
  p_norm = _norm(partition, params)
  g_norm = _norm(partition, reg_grads)
  has_norm = (p_norm > 0) & (g_norm > 0)
  return jnp.where(has_norm, cfg.max_relative_change * p_norm
                   / jnp.where(has_norm, g_norm, 1.0), jnp.inf)


def _norm_ratio(cfg: _Config, partition, params, grads, reg_grads,
                dtype) -> tuple:
  """``(kappa, raw, forced)`` of ``curvature="norm_ratio"`` (LARS)."""
  p_norm = _norm(partition, params)
  if cfg.weight_decay_convention == "optax":
    g_norm = _norm(partition, reg_grads)
    denominator = g_norm
  else:
    g_norm = _norm(partition, grads)
    denominator = g_norm + cfg.weight_decay * p_norm
  # Optax's convention: a layer with a zero norm gets ratio 1, so that
  # zero-initialised layers (biases) still move.
  forced = (p_norm == 0.0) | (g_norm == 0.0)
  kappa = jnp.where(forced, 0.0,
                    denominator / jnp.where(forced, 1.0, p_norm))
  raw = jnp.where(forced, 1.0, cfg.scale * p_norm / jnp.where(
      forced, 1.0, denominator))
  return kappa.astype(dtype), raw.astype(dtype), forced


def _hessian_medians(cfg: _Config, oracle, params, partition, key):
  """MCLR's ``kappa_l``: the layer median of ``|mean_k z_k * H z_k|``."""
  probes = elementwise_probes(key, params, cfg.num_probes)
  _, hz = jax.vmap(oracle, out_axes=(None, 0))(probes)

  def diagonal_estimate(z, w):
    dtype = _layers.stats_dtype(z.dtype, w.dtype)
    return jnp.mean(z.astype(dtype) * w.astype(dtype), axis=0)

  # Linear in H z, so averaged over the data-parallel axis before |.|.
  diagonal = jax.tree_util.tree_map(
      jnp.abs, _parallel.global_mean(
          jax.tree_util.tree_map(diagonal_estimate, probes, hz),
          cfg.axis_name))
  return _layer_medians(partition, diagonal)


def _measure_hessian(cfg: _Config, value_fn, grads, reg_grads, params,
                     state, partition) -> tuple:
  """``(kappa, oracle, M)``: ``M`` the exact ``(L, L)`` block matrix of
  the forms along the gradient's layers, or ``None``."""
  key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), state.count)
  oracle = _curvature.make_hvp(
      value_fn, params, method=cfg.hvp, grad=grads, fd_scale=cfg.fd_scale,
      transform=_NAME, axis_name=cfg.axis_name)
  if cfg.reduce == "median":
    return _hessian_medians(cfg, oracle, params, partition, key), oracle, None
  forms = _curvature.layer_quadratic_forms(
      oracle, reg_grads, partition, estimator=cfg.estimator,
      num_probes=cfg.num_probes, key=key, axis_name=cfg.axis_name)
  return (forms.curvature / partition.sq_norm(reg_grads), oracle,
          forms.matrix)


def _measure_secant(cfg: _Config, grads, params, state, partition):
  """``kappa_l`` from ``s = theta - theta_prev``, ``y = g - g_prev``; NaN
  (a fallback) on the warm-up step, which has no pair yet."""
  s = jax.tree_util.tree_map(lambda p, q: p.astype(q.dtype) - q, params,
                             state.prev_params)
  y = jax.tree_util.tree_map(lambda g, h: g.astype(h.dtype) - h, grads,
                             state.prev_grads)
  if cfg.reduce == "rayleigh":
    kappa = partition.inner(s, y) / partition.sq_norm(s)
  else:
    ratios = jax.tree_util.tree_map(
        lambda a, b: jnp.where(a != 0, b / jnp.where(a != 0, a, 1.0),
                               jnp.nan), s, y)
    kappa = _layer_medians(partition, ratios)
  has_prev = state.count > 0  # skipped steps do not count
  return jnp.where(has_prev, kappa, jnp.nan)


def _joint_factor(cfg: _Config, oracle, reg_grads, partition, lrs, matrix):
  """``t = min(1, b / |q|)`` along the combined step ``d = sum_l lr_l g_l``.

  ``b = <g, d>`` and ``q = d^T H d`` (weight decay included). ``q > 0``:
  ``t d`` is the minimiser of the quadratic model along ``d`` when that is
  shorter than ``d``. ``q < 0``: the model has no minimiser along ``d`` and
  ``|q|`` stands for ``q``, the saddle-free Newton step (Dauphin et al. 2014,
  arXiv 1406.2572: ``|H|`` for ``H``) on this line: the step stops
  where the second-order term is as large as the first-order one (``t = 1``
  there let the displacement bound alone set the step, and the loss rose).
  ``q`` comes from the exact block matrix when measured (free), else from
  one more Hessian-vector product. ``q = 0`` or non-finite: ``t = 1``.
  """
  sq = partition.sq_norm(reg_grads)
  b = jnp.sum(lrs * sq)
  if matrix is not None:
    q = lrs @ matrix.astype(lrs.dtype) @ lrs
  else:
    d = partition.scale(reg_grads, lrs)
    _, hd = oracle(d)
    q = _parallel.global_mean(jnp.sum(partition.inner(d, hd)), cfg.axis_name)
  q = jnp.abs(q + cfg.weight_decay * jnp.sum(lrs ** 2 * sq))
  ok = jnp.isfinite(q) & jnp.isfinite(b) & (q > 0) & (b > 0)
  return jnp.where(ok, jnp.minimum(1.0, b / jnp.where(ok, q, 1.0)),
                   1.0).astype(lrs.dtype)


def _measure(cfg: _Config, value_fn, grads, reg_grads, params, state,
             partition, limit) -> tuple:
  """A measuring step: ``(kappa, rates, accepted mask, joint factor)``,
  the rates through the shared safeguards."""
  dtype = state.lrs.dtype
  oracle = matrix = None
  if cfg.curvature == "norm_ratio":
    kappa, raw, forced = _norm_ratio(cfg, partition, params, grads,
                                     reg_grads, dtype)
  else:
    if cfg.curvature == "hessian":
      kappa, oracle, matrix = _measure_hessian(
          cfg, value_fn, grads, reg_grads, params, state, partition)
    else:
      kappa = _measure_secant(cfg, grads, params, state, partition)
    kappa = (kappa + cfg.weight_decay).astype(dtype)
    raw = (cfg.scale / kappa).astype(dtype)
    forced = jnp.zeros((partition.num_layers,), bool)
  valid = forced | _safeguards.usable(raw, kappa, cfg.curvature_floor)
  # CBLR clips to [min_lr, max_lr] and applies the bound after the average.
  lrs = _safeguards.safeguard(
      raw, valid, state.lrs, state.num_accepted, initial=cfg.initial_lr,
      lower=cfg.min_lr, upper=jnp.inf if cfg.max_lr is None else cfg.max_lr,
      ema=cfg.ema, limit=limit)
  if cfg.joint_step:
    factor = _joint_factor(cfg, oracle, reg_grads, partition, lrs, matrix)
  else:
    factor = jnp.ones([], dtype)
  return kappa, lrs, valid, factor


def _update(cfg: _Config, updates, state: ScaleByCurvatureLRState, params,
            value_fn):
  """One step: the orchestration of the functions above and the shared
  safeguards (:mod:`optax_layerwise._safeguards`)."""
  if cfg.curvature == "hessian":
    value_fn = _checks.require_value_fn(value_fn, transform=_NAME)
  partition = _safeguards.checked_layers(
      params, updates, cfg.layers, state.lrs.shape[0], transform=_NAME)
  reg_grads = _regularised(cfg, updates, params)
  limit = _trust_limit(cfg, partition, params, reg_grads)
  measured = _safeguards.is_measured(state.count, cfg.update_interval,
                                     cfg.static_interval)
  # A step that does not measure keeps the last rates and joint factor (no
  # fallback to initial_lr), bounded again by this step's limit.
  kappa, lrs, valid, factor = _safeguards.measure_or_reuse(
      measured,
      lambda _: _measure(cfg, value_fn, updates, reg_grads, params, state,
                         partition, limit),
      lambda _: (state.curvatures, state.lrs,
                 jnp.zeros((partition.num_layers,), bool), state.joint_scale),
      cfg.static_interval)
  lrs = _safeguards.bound(lrs, limit, lrs.dtype)
  num_accepted, num_fallbacks = _safeguards.counts(
      state.num_accepted, state.num_fallbacks, measured, valid)
  new_state = ScaleByCurvatureLRState(
      count=state.count + 1,
      lrs=lrs,
      curvatures=_safeguards.keep_finite(kappa, state.curvatures, measured,
                                         state.curvatures.dtype),
      num_accepted=num_accepted,
      num_fallbacks=num_fallbacks,
      num_skipped=state.num_skipped,
      joint_scale=factor.astype(state.joint_scale.dtype),
      prev_params=_layers.to_stats(params) if cfg.is_secant else None,
      prev_grads=_layers.to_stats(updates) if cfg.is_secant else None)
  return _nonfinite.skip_non_finite_step(
      updates, partition.scale(reg_grads, factor * lrs), new_state, state)


def scale_by_curvature_lr(
    *,
    curvature: str = "hessian",
    reduce: str = "rayleigh",
    scale: float = 1.0,
    estimator: Optional[str] = None,
    num_probes: Optional[int] = None,
    hvp: str = "forward_over_reverse",
    weight_decay: float = 0.0,
    weight_decay_convention: str = "optax",
    initial_lr: float = 1e-3,
    min_lr: float = 0.0,
    max_lr: Optional[float] = None,
    curvature_floor: float = 0.0,
    ema: float = 0.0,
    update_interval: int = 1,
    fd_scale: float = 1e-3,
    joint_step: Optional[bool] = None,
    max_relative_change: Optional[float] = 0.1,
    layers: _layers.LayerGrouping = None,
    seed: int = 0,
    axis_name: Optional[_parallel.AxisName] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Scales each layer's gradient by a learning rate fitted to its curvature.

  Implements the library's reading of CBLR and MCLR from Gao and Zhong (2020),
  "Study on the Large Batch Size Training of Neural Networks Based on the
  Second Order Gradient", arXiv 2012.08795 (only the abstract could be
  consulted): ``lr_l = scale / kappa_l`` with
  ``kappa_l = g_l^T H_ll g_l / ||g_l||^2`` (docs/curvature_lr.md), or the
  median of an elementwise curvature estimate (MCLR). LARS (You et al. 2017,
  arXiv 1708.03888) is ``curvature="norm_ratio"``.

  The incoming updates must be the gradient of the loss (clipping before it
  is fine; momentum goes *after* it, as in LARS). The output is ``lr_l *
  (g_l + weight_decay * theta_l)`` (positive); chain a negation, as
  :func:`cblr` and :func:`mclr` do.

  Args:
    curvature: ``"hessian"`` (needs ``value_fn``), ``"secant"`` or
      ``"norm_ratio"`` (both ignore ``value_fn``).
    reduce: ``"rayleigh"`` (CBLR) or ``"median"`` (MCLR; ``"hessian"`` with
      ``estimator="hutchinson"``, or ``"secant"``).
    scale: the multiplier in ``lr_l = scale / kappa_l`` (LARS's
      ``trust_coefficient`` for ``"norm_ratio"``).
    estimator: for ``"hessian"`` with ``"rayleigh"``: ``"hutchinson"`` (one
      Hessian-vector product a probe) or ``"exact"`` (one a layer, vmapped).
      ``None``: ``"exact"``, or ``"hutchinson"`` when ``num_probes`` is given
      or ``reduce="median"``. (One-probe Hutchinson quotients are dominated
      by the cross-layer blocks on real networks: see the docs.)
    num_probes: Hutchinson probes averaged per measurement (``None`` = 1). It
      sets an array shape: under :func:`optax.inject_hyperparams` list it in
      ``static_args`` when given.
    hvp: ``"forward_over_reverse"`` (exact) or ``"gradient_difference"`` (one
      extra gradient; see :func:`optax_layerwise._curvature.make_hvp`).
    weight_decay: L2 strength ``wd``: the gradient becomes ``g + wd theta``
      and ``kappa_l`` gains ``wd``.
    weight_decay_convention: for ``"norm_ratio"`` only: ``"optax"``
      (``kappa_l = ||g + wd theta||_l / ||theta_l||``, as ``optax.lars``) or
      ``"lars_paper"`` (``||g_l|| / ||theta_l|| + wd``, You et al. 2017).
    initial_lr: the rate of a layer with no accepted measurement yet, in
      particular the secant estimator's warm-up step (must then be > 0, or
      the iterate never moves and the secant never measures).
    min_lr: lower clip of accepted rates.
    max_lr: upper clip of accepted rates (``None``: no clip, as LARS).
      Recommended for ``"hessian"`` and ``"secant"`` on noisy mini-batches.
    curvature_floor: ``kappa_l <= curvature_floor`` (non-positive curvature
      by default) is rejected.
    ema: moving-average factor for accepted rates (0 = none).
    update_interval: measure every this many steps and reuse the last rates
      in between (``lax.cond``, so a Hessian measurement's cost amortises).
      May be traced (injected by :func:`optax.inject_hyperparams`), as may
      every other numeric argument but ``num_probes``.
    fd_scale: relative step of ``hvp="gradient_difference"``.
    joint_step: multiply every layer's rate by one factor ``t = min(1, <g, d>
      / |d^T H d|)``, ``d = sum_l lr_l g_l`` (the minimiser of the quadratic
      model along the combined step, saddle-free where ``d^T H d < 0``; the
      ratios between layers are kept).
      ``None``: on for ``"hessian"`` (free from the exact blocks, one more
      Hessian-vector product otherwise); needs ``"hessian"``.
    max_relative_change: bound ``lr_l <= max_relative_change * ||theta_l|| /
      ||g_l||`` (no layer moves by more than this fraction of its norm in a
      step; a layer with zero norm is not bounded). Default 0.1, as K-BFGS:
      1 let layers move by their whole norm and raised the loss of an LSTM
      and of transformers (docs/curvature_lr.md, "Defaults and why").
      ``None``: no bound.
      Ignored by ``"norm_ratio"``, which is that ratio.
    layers: the layer grouping (see :func:`optax_layerwise.group_layers`).
      ``optax.lars`` uses one trust ratio per leaf: pass
      ``layers=lambda path, _: jax.tree_util.keystr(path)`` to match it. (A
      callable must be listed in ``static_args`` of
      :func:`optax.inject_hyperparams`, which treats callables as schedules.)
    seed: seeds the Hutchinson probes (step ``k`` uses
      ``fold_in(PRNGKey(seed), k)``).
    axis_name: under ``jax.shard_map`` / ``jax.pmap``, the data-parallel
      axis: ``value_fn`` is then this device's loss and the ``"hessian"``
      statistics are averaged over the axis (CBLR: the ``L``-vectors of
      quadratic forms; MCLR: the elementwise diagonal estimate, before its
      absolute value and median), so all devices hold the same rates. The
      incoming gradient must already be the global one; ``"secant"`` and
      ``"norm_ratio"`` use only it and the params, and communicate nothing.
      ``None`` (default) under plain ``jax.jit``, sharded or not.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`; ``update`` needs
    ``params``, and ``value_fn`` for ``curvature="hessian"``.

  Raises:
    ValueError: an unknown or unsupported option (``"norm_ratio"`` has no
      elementwise estimate, so no ``"median"``; the median of the Hessian
      needs ``estimator="hutchinson"``).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_layerwise as olw
    >>> params = {'a': {'w': jnp.ones(3)}, 'b': {'w': jnp.ones(2)}}
    >>> loss = lambda p: (jnp.sum(p['a']['w'] ** 2)
    ...                   + 50 * jnp.sum(p['b']['w'] ** 2))
    >>> # Newton's step per block reaches 0, moving each block by its whole
    >>> # norm: more than the default bound (0.1 of it) allows.
    >>> tx = optax.chain(olw.scale_by_curvature_lr(
    ...     estimator='exact', max_relative_change=None), optax.scale(-1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
    ...                            value_fn=loss)
    >>> optax.apply_updates(params, updates)['b']['w']
    Array([0., 0.], dtype=float32)
  """
  estimator, static_interval, num_probes, joint_step = _check_args(
      curvature, reduce, estimator, num_probes, hvp, update_interval,
      weight_decay_convention, scale, initial_lr, min_lr, max_lr,
      weight_decay, ema, joint_step)
  cfg = _Config(
      curvature=curvature, reduce=reduce, scale=scale, estimator=estimator,
      num_probes=num_probes, hvp=hvp, weight_decay=weight_decay,
      weight_decay_convention=weight_decay_convention, initial_lr=initial_lr,
      min_lr=min_lr, max_lr=max_lr, curvature_floor=curvature_floor, ema=ema,
      update_interval=update_interval, static_interval=static_interval,
      fd_scale=fd_scale, joint_step=joint_step,
      max_relative_change=max_relative_change, layers=layers, seed=seed,
      axis_name=axis_name)
  return _checks.value_fn_transformation(cfg, _init, _update)


def _chain(reduce: str, learning_rate_scale: ScalarOrSchedule,
           momentum: float, nesterov: bool, **kwargs):
  """``chain(scale_by_curvature_lr, -learning_rate_scale, trace(momentum))``."""
  _checks.check_non_negative(
      learning_rate_scale, "learning_rate_scale",
      transform="cblr" if reduce == "rayleigh" else "mclr",
      why="It multiplies the descent step (the sign flip is built in); a "
      "negative value would climb the loss.")
  parts = [
      scale_by_curvature_lr(reduce=reduce, **kwargs),
      optax.scale_by_learning_rate(learning_rate_scale),
  ]
  # Only a Python 0 drops the stage: an array (inject_hyperparams passes
  # arrays to init and tracers to update) keeps it, so both see one shape.
  if not (isinstance(momentum, (int, float)) and momentum == 0):
    parts.append(optax.trace(decay=momentum, nesterov=nesterov))
  # A step the first stage skips is skipped by the momentum too.
  return _nonfinite.skip_aware_chain(*parts)


_SHARED_ARGS_DOC = """    scale: the multiplier in ``lr_l = scale / kappa_l`` (see
      :func:`scale_by_curvature_lr`, which documents every argument below).
    estimator: ``"hutchinson"`` or ``"exact"`` (``None``: exact for CBLR
      unless ``num_probes`` is given).
    num_probes: Hutchinson probes per measurement (``None`` = 1; list it in
      ``static_args`` of :func:`optax.inject_hyperparams` when given).
    hvp: ``"forward_over_reverse"`` or ``"gradient_difference"``.
    weight_decay_convention: ``"optax"`` or ``"lars_paper"``
      (``"norm_ratio"`` only).
    initial_lr: a layer's rate until it has an accepted measurement (and the
      secant warm-up step).
    min_lr: lower clip of the rates.
    max_lr: upper clip of the rates (``None``: none).
    curvature_floor: reject ``kappa_l <= curvature_floor``.
    ema: moving-average factor of the rates (0 = none).
    update_interval: measure every this many steps.
    fd_scale: relative step of the gradient difference.
    joint_step: one factor ``t <= 1`` on all rates, the quadratic model's
      (saddle-free) minimiser along the combined step (``None``: on for
      ``"hessian"``).
    max_relative_change: ``lr_l <= max_relative_change ||theta_l|| /
      ||g_l||`` (default 0.1; ``None``: no bound).
    layers: the layer grouping (a callable must be listed in ``static_args``
      of :func:`optax.inject_hyperparams`).
    seed: seeds the Hutchinson probes.
    axis_name: the data-parallel axis under ``jax.shard_map`` / ``jax.pmap``
      (curvature statistics are averaged over it; ``None`` under ``jax.jit``)."""


def cblr(
    learning_rate_scale: ScalarOrSchedule = 1.0,
    momentum: float = 0.0,
    *,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    curvature: str = "hessian",
    scale: float = 1.0,
    estimator: Optional[str] = None,
    num_probes: Optional[int] = None,
    hvp: str = "forward_over_reverse",
    weight_decay_convention: str = "optax",
    initial_lr: float = 1e-3,
    min_lr: float = 0.0,
    max_lr: Optional[float] = None,
    curvature_floor: float = 0.0,
    ema: float = 0.0,
    update_interval: int = 1,
    fd_scale: float = 1e-3,
    joint_step: Optional[bool] = None,
    max_relative_change: Optional[float] = 0.1,
    layers: _layers.LayerGrouping = None,
    seed: int = 0,
    axis_name: Optional[_parallel.AxisName] = None,
) -> optax.GradientTransformationExtraArgs:
  """Curvature-based layer-wise learning rates (CBLR) with momentum.

  Gao and Zhong (2020), arXiv 2012.08795, in the library's reading (see
  :func:`scale_by_curvature_lr`). Conventions follow LARS (You et al. 2017,
  Algorithm 1) and ``optax.lars``: weight decay is added to the gradient, the
  result is scaled by ``lr_l``, by ``-learning_rate_scale``, and only then
  accumulated by heavy-ball momentum::

      v <- momentum * v - learning_rate_scale * lr_l * (g_l + wd * theta_l)
      theta <- theta + v

  So ``cblr(lr, m, weight_decay=wd, curvature="norm_ratio", scale=tc,
  layers=<one layer per leaf>)`` is ``optax.lars(lr, wd, trust_coefficient=tc,
  momentum=m)`` (``weight_decay_convention="lars_paper"`` gives You et al.'s
  trust ratio ``tc ||theta|| / (||g|| + wd ||theta||)`` instead).

  Args:
    learning_rate_scale: a global multiplier of the per-layer rates, a float
      or an Optax schedule (warm-up, decay).
    momentum: heavy-ball momentum decay (default 0: a curvature step has its
      length; with momentum m, use learning_rate_scale about 1 - m).
    nesterov: Nesterov momentum.
    weight_decay: L2 strength (see :func:`scale_by_curvature_lr`).
    curvature: ``"hessian"`` (call ``update`` with ``value_fn``),
      ``"secant"`` or ``"norm_ratio"``.
{shared}

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_layerwise as olw
    >>> params = {{'a': {{'w': jnp.ones(3)}}, 'b': {{'w': jnp.ones(2)}}}}
    >>> loss = lambda p: (jnp.sum(p['a']['w'] ** 2)
    ...                   + 50 * jnp.sum(p['b']['w'] ** 2))
    >>> tx = olw.cblr(0.5, momentum=0.0, estimator='exact',
    ...               max_relative_change=None)  # no displacement bound
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
    ...                            value_fn=loss)
    >>> optax.apply_updates(params, updates)['b']['w']
    Array([0.5, 0.5], dtype=float32)
  """
  return _chain(
      "rayleigh", learning_rate_scale, momentum, nesterov,
      curvature=curvature, weight_decay=weight_decay, scale=scale,
      estimator=estimator, num_probes=num_probes, hvp=hvp,
      weight_decay_convention=weight_decay_convention, initial_lr=initial_lr,
      min_lr=min_lr, max_lr=max_lr, curvature_floor=curvature_floor, ema=ema,
      update_interval=update_interval, fd_scale=fd_scale,
      joint_step=joint_step, max_relative_change=max_relative_change,
      layers=layers, seed=seed, axis_name=axis_name)


def mclr(
    learning_rate_scale: ScalarOrSchedule = 1.0,
    momentum: float = 0.0,
    *,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    curvature: str = "hessian",
    scale: float = 1.0,
    estimator: Optional[str] = None,
    num_probes: Optional[int] = None,
    hvp: str = "forward_over_reverse",
    weight_decay_convention: str = "optax",
    initial_lr: float = 1e-3,
    min_lr: float = 0.0,
    max_lr: Optional[float] = None,
    curvature_floor: float = 0.0,
    ema: float = 0.0,
    update_interval: int = 1,
    fd_scale: float = 1e-3,
    joint_step: Optional[bool] = None,
    max_relative_change: Optional[float] = 0.1,
    layers: _layers.LayerGrouping = None,
    seed: int = 0,
    axis_name: Optional[_parallel.AxisName] = None,
) -> optax.GradientTransformationExtraArgs:
  """Median-curvature layer-wise learning rates (MCLR) with momentum.

  Gao and Zhong (2020), arXiv 2012.08795, in the library's reading: as
  :func:`cblr` (same momentum and weight-decay conventions), but ``kappa_l``
  is the median over layer ``l``'s entries of an elementwise curvature
  estimate (the Hutchinson diagonal ``|z * H z|`` for
  ``curvature="hessian"``, the secant ratios ``y_i / s_i`` for
  ``"secant"``), robust to a few extreme entries.

  Args:
    learning_rate_scale: a global multiplier of the per-layer rates, a float
      or an Optax schedule.
    momentum: heavy-ball momentum decay, after the scaling (default 0; with
      momentum m, use learning_rate_scale about 1 - m).
    nesterov: Nesterov momentum.
    weight_decay: L2 strength (see :func:`scale_by_curvature_lr`).
    curvature: ``"hessian"`` (call ``update`` with ``value_fn``) or
      ``"secant"``.
{shared}

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_layerwise as olw
    >>> params = {{'a': {{'w': jnp.ones(3)}}, 'b': {{'w': jnp.ones(2)}}}}
    >>> loss = lambda p: (jnp.sum(p['a']['w'] ** 2)
    ...                   + 50 * jnp.sum(p['b']['w'] ** 2))
    >>> tx = olw.mclr(0.5, momentum=0.0,
    ...               max_relative_change=None)  # no displacement bound
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
    ...                            value_fn=loss)
    >>> [round(float(lr), 4) for lr in state[0].lrs]  # 1 / median diag(H)
    [0.5, 0.01]
    >>> optax.apply_updates(params, updates)['b']['w']
    Array([0.5, 0.5], dtype=float32)
  """
  return _chain(
      "median", learning_rate_scale, momentum, nesterov,
      curvature=curvature, weight_decay=weight_decay, scale=scale,
      estimator=estimator, num_probes=num_probes, hvp=hvp,
      weight_decay_convention=weight_decay_convention, initial_lr=initial_lr,
      min_lr=min_lr, max_lr=max_lr, curvature_floor=curvature_floor, ema=ema,
      update_interval=update_interval, fd_scale=fd_scale,
      joint_step=joint_step, max_relative_change=max_relative_change,
      layers=layers, seed=seed, axis_name=axis_name)


cblr.__doc__ = cblr.__doc__.format(shared=_SHARED_ARGS_DOC)
mclr.__doc__ = mclr.__doc__.format(shared=_SHARED_ARGS_DOC)
