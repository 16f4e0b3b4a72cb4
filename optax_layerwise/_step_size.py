"""Layer-wise adaptive step sizes (Bahamou and Goldfarb, arXiv 2305.13664).

For a first-order direction ``d`` (SGD momentum, Adam's ``m / sqrt(v)``), each
layer ``l`` takes the step that minimises the quadratic model of the loss
along ``d_l`` alone (docs/step_sizes.md, "Algorithm")::

    b_l = <g, d>_l,   q_l = d_l^T H_ll d_l,   alpha_l = b_l / q_l,
    update_l = alpha_l * d_l          (negated by the alias's learning-rate stage)

so no learning rate is tuned. ``q_l`` is measured matrix-free along the
diagonal Hessian block (see :mod:`optax_layerwise._curvature`); the aliases
measure every block exactly (forward-over-forward) every 40 steps (the
paper's one-probe Hutchinson estimate every step is an option), optionally
along a direction preconditioned by K-BFGS's input factor
(:mod:`optax_layerwise._input_factor`).

Calling convention: :func:`scale_by_layerwise_step_size` *wraps* the
first-order transform that makes the direction (``direction=optax.trace(0.9)``
or ``optax.scale_by_adam()``), so its incoming updates are the gradient ``g``;
it needs the params and the mini-batch loss ``value_fn``.

Safeguards (the library's reading; the paper's own could not be consulted):
a layer whose measurement is unusable (``b_l <= 0``, ``q_l <= curvature_floor
* ||d_l||^2``, or non-finite) keeps its last accepted step (``initial_step``
until it has one); accepted steps are clipped to ``[0, max_step]`` and
optionally smoothed by an exponential moving average; ``update_interval``
re-measures only every k steps under ``lax.cond``. A non-finite gradient or
direction skips the whole step (zero update, state unchanged but
``num_skipped``; ``count`` does not advance, so the run continues as one that
never saw the bad batch); a non-finite measurement (NaN loss or
Hessian-vector product) makes the affected layers fall back, counted in
``num_fallbacks``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from optax_layerwise import _checks
from optax_layerwise import _curvature
from optax_layerwise import _input_factor
from optax_layerwise import _layers
from optax_layerwise import _nonfinite
from optax_layerwise import _parallel
from optax_layerwise import _safeguards

PyTree = Any
ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]

__all__ = [
    "ScaleByLayerwiseStepSizeState",
    "scale_by_layerwise_step_size",
    "layerwise_sgd",
    "layerwise_adamw",
]

_NAME = "scale_by_layerwise_step_size"
HVP_METHODS = _curvature.HVP_METHODS + ("secant", "forward_over_forward")
# The aliases' measurement (docs/step_sizes.md, "Measured cost"): the exact
# per-layer blocks, as second directional derivatives (forward-over-forward,
# one layer at a time: the same numbers as forward-over-reverse, about 2.7
# gradients per measurement against 18 on the MNIST autoencoder), every 40
# steps (no rejected curvature on the ReLU autoencoders: the blocks are
# Gauss-Newton blocks). The paper's one-probe Hutchinson every step cost 3.3x
# the base optimizer and rejected about 40 % of its measurements.
DEFAULT_MEASUREMENT = dict(estimator="exact", hvp="forward_over_forward",
                           update_interval=40)
# Giving `num_probes` asks for the paper's Hutchinson measurement.
PAPER_MEASUREMENT = dict(estimator="hutchinson", hvp="forward_over_reverse",
                         update_interval=1)
# The aliases' averaging of accepted steps (docs/step_sizes.md, "Averaging
# the steps"): a fresh measurement's step overshot for a few steps after
# each re-measurement; averaged, the Fashion-MNIST autoencoder ended 10
# epochs 3-16 lower (AdamW, three seeds; SGD-m, two).
ALIAS_EMA = 0.9
# The aliases' `precondition` choices (docs/step_sizes.md, "Input-side
# preconditioning"): None, the paper's first-order direction; "inputs",
# that direction computed from K-BFGS's input-side H_a times the gradient
# (an error if no layer is tapped); "auto" (default), "inputs" on the
# layers a tapped pass sees and the paper's direction on the others.
PRECONDITIONS = ("auto", None, "inputs")
# The aliases' displacement bound for max_relative_change="auto", by
# `precondition` (docs/step_sizes.md): the preconditioned direction moved
# faster with twice the bound (Fashion-MNIST autoencoder: tuned Adam's
# 10-epoch loss at epoch 2.6 against 3.6 with 0.01); the plain one spiked.
# With the input factor ("auto", "inputs") each layer's bound follows from
# whether it is preconditioned (a layer group all of whose leaves are).
AUTO_BOUNDS = {None: 0.01, "inputs": 0.02}


class _BoundWhereTapped(NamedTuple):
  """``max_relative_change`` per layer: ``tapped`` for a layer whose every
  leaf the input factor preconditions (``precondition="auto"`` or
  ``"inputs"``), ``plain`` for the others; resolved while tracing."""
  tapped: float
  plain: float

  def per_layer(self, value_fn, params, partition) -> jax.Array:
    tapped = _input_factor.tapped_leaves(
        _checks.checked_value_fn(value_fn, _NAME), params)
    return jnp.asarray([
        self.tapped if tapped.issuperset(partition.leaf_indices(layer))
        else self.plain for layer in range(partition.num_layers)])


def _measurement(num_probes, coupled, axis_name, **given) -> dict:
  """The aliases' ``estimator``, ``hvp``, ``update_interval``: each one given
  (not ``None``) is kept; the others are :data:`DEFAULT_MEASUREMENT`'s, or
  :data:`PAPER_MEASUREMENT`'s when ``num_probes`` is given; ``hvp`` is
  forward-over-reverse where forward-over-forward cannot serve (another
  estimator, ``coupled``, or an ``axis_name``)."""
  base = DEFAULT_MEASUREMENT if num_probes is None else PAPER_MEASUREMENT
  chosen = {k: base[k] if v is None else v for k, v in given.items()}
  if given["hvp"] is None and (coupled or chosen["estimator"] != "exact"
                               or axis_name is not None):
    chosen["hvp"] = "forward_over_reverse"
  return chosen


def _secant_scales(last_steps: jax.Array, upper: jax.Array) -> jax.Array:
  """The per-layer step at which ``hvp="secant"`` measures: the last step
  ``alpha_l``, or this step's upper bound for a layer that has none (> 0)."""
  scales = jnp.where(last_steps > 0, last_steps, upper)
  return jnp.where((scales > 0) & jnp.isfinite(scales), scales, 1.0)


class ScaleByLayerwiseStepSizeState(NamedTuple):
  """State of :func:`scale_by_layerwise_step_size`; all shapes are fixed.

  Attributes:
    count: steps taken (int32; a skipped step does not count); seeds the
      Hutchinson probes and the ``update_interval`` schedule.
    direction_state: the wrapped direction transform's state, run in the
      statistics dtype (float32 for bfloat16 / float16 params: Adam's second
      moment would overflow or underflow in float16).
    step_sizes: per-layer steps ``alpha_l`` applied last, ``(L,)``; float32
      (float64 for float64 params, see :func:`optax_layerwise._layers.stats_dtype`).
    decreases: last measured ``b_l = <g, d>_l``, ``(L,)``.
    curvatures: last measured ``q_l ~ d_l^T H_ll d_l``, ``(L,)``.
    num_accepted: per layer, measurements accepted, ``(L,)`` int32.
    num_fallbacks: per layer, measurements rejected by the safeguards,
      ``(L,)`` int32.
    num_skipped: steps skipped for a non-finite gradient or direction (int32).
  """
  count: jax.Array
  direction_state: optax.OptState
  step_sizes: jax.Array
  decreases: jax.Array
  curvatures: jax.Array
  num_accepted: jax.Array
  num_fallbacks: jax.Array
  num_skipped: jax.Array


def _coupled_steps(matrix: jax.Array, decrease: jax.Array,
                   damping: float) -> jax.Array:
  """Solves the ``L x L`` subspace Newton system ``(M + damping I) a = b``.

  Returns NaN where the damped matrix is not positive definite, so the
  caller's safeguards fall back per layer.
  """
  damped = matrix + damping * jnp.eye(matrix.shape[0], dtype=matrix.dtype)
  chol = jnp.linalg.cholesky(damped)
  steps = jax.scipy.linalg.cho_solve((chol, True), decrease)
  return jnp.where(jnp.all(jnp.isfinite(chol)), steps, jnp.nan)


@dataclasses.dataclass(frozen=True)
class _Config:
  """The checked arguments (numbers may be traced when injected)."""
  direction: optax.GradientTransformationExtraArgs
  estimator: str
  num_probes: int
  hvp: str
  max_step: Any
  max_relative_change: Any
  initial_step: Any
  ema: Any
  update_interval: Any
  static_interval: Optional[int]
  coupled: bool
  coupled_damping: Any
  curvature_floor: Any
  fd_scale: Any
  layers: _layers.LayerGrouping
  seed: Any
  axis_name: Optional[_parallel.AxisName]


def _check_args(estimator, hvp, update_interval, num_probes, coupled,
                max_step, initial_step, coupled_damping, ema,
                max_relative_change, axis_name) -> tuple:
  """Clear errors for bad arguments; returns ``(static_interval,
  num_probes)`` (see :func:`optax_layerwise._curvature.check_measurement_args`).
  Values injected by :func:`optax.inject_hyperparams` arrive traced and are
  not checked."""
  static_interval, num_probes = _curvature.check_measurement_args(
      estimator, hvp, update_interval, num_probes, hvp_methods=HVP_METHODS)
  if coupled and estimator != "exact":
    raise ValueError("coupled=True needs the full L x L layer matrix: use "
                     "estimator='exact'.")
  if hvp == "forward_over_forward" and (coupled or estimator != "exact"):
    raise ValueError(
        f"{_NAME}: hvp='forward_over_forward' gives the diagonal blocks "
        "alone: use it with estimator='exact' and coupled=False, or pass "
        "hvp='forward_over_reverse'.")
  if hvp == "forward_over_forward" and axis_name is not None:
    raise ValueError(
        f"{_NAME}: hvp='forward_over_forward' is not supported with "
        "axis_name (the forward tangent of a pmean-ed loss is already the "
        "mean over devices): pass hvp='forward_over_reverse'.")
  for name, value, why in (
      ("max_step", max_step, "It caps each layer's step alpha_l (the "
       "learning rate); a negative step would climb the loss."),
      ("initial_step", initial_step, "It is a layer's step before its first "
       "accepted measurement; 0 (the default) is the safe choice."),
      ("coupled_damping", coupled_damping, "It adds damping * I to the "
       "coupled L x L system; use 0 for none.")):
    _checks.check_non_negative(value, name, transform=_NAME, why=why)
  _checks.check_decay(ema, "ema", transform=_NAME,
                         why="0 for no averaging; 1 would freeze the steps.")
  if max_relative_change is not None and not isinstance(
      max_relative_change, _BoundWhereTapped):
    _checks.check_non_negative(
        max_relative_change, "max_relative_change", transform=_NAME,
        why="It bounds how far a layer moves relative to its norm; pass None "
        "to remove the bound.")
  return static_interval, num_probes


def _init(cfg: _Config, params) -> ScaleByLayerwiseStepSizeState:
  # Bad params fail here, at the first call (masked, integer, complex).
  _layers.check_params(params, transform=_NAME)
  num_layers = _layers.group_layers(params, cfg.layers).num_layers
  # Functions, not arrays: every state leaf its own buffer, so that a
  # jitted step may donate the state.
  dtype = _layers.tree_stats_dtype(params)
  zeros = lambda: jnp.zeros((num_layers,), dtype)
  counts = lambda: jnp.zeros((num_layers,), jnp.int32)
  return ScaleByLayerwiseStepSizeState(
      count=jnp.zeros([], jnp.int32),
      direction_state=cfg.direction.init(_layers.to_stats(params)),
      step_sizes=zeros() + cfg.initial_step,
      decreases=zeros(),
      curvatures=zeros(),
      num_accepted=counts(),
      num_fallbacks=counts(),
      num_skipped=jnp.zeros([], jnp.int32))


def _direction(cfg: _Config, updates, state, params, value_fn,
               extra_args) -> tuple:
  """``(d, direction_state)``: the direction runs in the statistics dtype
  (it gets ``value_fn`` too, for
  :func:`optax_layerwise.precondition_by_inputs`);
  ``d`` goes back to the params' dtypes (it is the tangent of the
  Hessian-vector products)."""
  d, direction_state = cfg.direction.update(
      _layers.to_stats(updates), state.direction_state,
      _layers.to_stats(params), value_fn=value_fn, **extra_args)
  d = jax.tree_util.tree_map(lambda x, p: x.astype(p.dtype), d, params)
  return d, direction_state


def _upper(cfg: _Config, partition, params, sq_norm, value_fn) -> jax.Array:
  """This step's upper clip: ``max_step``, and the displacement bound
  ``max_relative_change ||theta_l|| / ||d_l||`` when given."""
  upper = jnp.asarray(cfg.max_step)
  bound = cfg.max_relative_change
  if isinstance(bound, _BoundWhereTapped):
    bound = bound.per_layer(value_fn, params, partition)
  if bound is not None:  # bounds every path
    upper = jnp.minimum(upper, _layers.trust_ratio(
        partition.sq_norm(params), sq_norm, bound))
  return upper


def _measure(cfg: _Config, value_fn, params, grads, d, partition, state,
             upper) -> tuple:
  """``(b, q, raw)``: ``b_l = <g, d>_l``, ``q_l ~ d_l^T H_ll d_l`` and the
  proposed steps ``b_l / q_l`` (or the coupled system's solution)."""
  if cfg.hvp == "forward_over_forward":
    try:
      forms = _curvature.layer_curvatures_forward(
          value_fn, params, d, partition, transform=_NAME)
      return forms.decrease, forms.curvature, forms.decrease / forms.curvature
    except NotImplementedError as err:  # e.g. a jax.custom_vjp in value_fn
      warnings.warn(
          f"{_NAME}: value_fn cannot be differentiated forward-over-forward "
          f"({err}); measuring with hvp='forward_over_reverse' instead. Pass "
          "it to silence this warning.", stacklevel=2)
      cfg = dataclasses.replace(cfg, hvp="forward_over_reverse")
  secant = cfg.hvp == "secant"
  oracle = _curvature.make_hvp(
      value_fn, params, method="gradient_difference" if secant else cfg.hvp,
      grad=grads, fd_scale=cfg.fd_scale, step=-1.0 if secant else None,
      transform=_NAME, axis_name=cfg.axis_name)
  key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), state.count)
  forms = _curvature.layer_quadratic_forms(
      oracle, d, partition, estimator=cfg.estimator,
      num_probes=cfg.num_probes, key=key, axis_name=cfg.axis_name,
      tangent_scales=(_secant_scales(state.step_sizes, upper) if secant
                      else None))
  if cfg.coupled:
    raw = _coupled_steps(forms.matrix, forms.decrease, cfg.coupled_damping)
    diagonal = forms.decrease / forms.curvature
    raw = jnp.where(jnp.all(jnp.isfinite(raw)), raw, diagonal)
  else:
    raw = forms.decrease / forms.curvature
  return forms.decrease, forms.curvature, raw


def _update(cfg: _Config, updates, state: ScaleByLayerwiseStepSizeState,
            params, value_fn, extra_args):
  """One step: the orchestration of the functions above and the shared
  safeguards (:mod:`optax_layerwise._safeguards`)."""
  value_fn = _checks.require_value_fn(value_fn, transform=_NAME)
  partition = _safeguards.checked_layers(
      params, updates, cfg.layers, state.step_sizes.shape[0], transform=_NAME)
  d, direction_state = _direction(cfg, updates, state, params, value_fn,
                                  extra_args)
  sq_norm = partition.sq_norm(d)
  upper = _upper(cfg, partition, params, sq_norm, value_fn)
  # Measured every update_interval steps (and every step of the first one
  # while a layer has no accepted step); a reused step falls back.
  measured = _safeguards.is_measured(
      state.count, cfg.update_interval, cfg.static_interval,
      num_accepted=state.num_accepted)
  b, q, raw = _safeguards.measure_or_reuse(
      measured,
      lambda _: _measure(cfg, value_fn, params, updates, d, partition, state,
                         upper),
      lambda _: (state.decreases, state.curvatures, state.step_sizes),
      cfg.static_interval)
  valid = (measured & _safeguards.usable(raw, q, cfg.curvature_floor * sq_norm)
           & (b > 0))
  # The step sizes clip to the bound too, before the moving average.
  step_sizes = _safeguards.safeguard(
      raw, valid, state.step_sizes, state.num_accepted,
      initial=cfg.initial_step, lower=0.0, upper=upper, ema=cfg.ema,
      limit=None if cfg.max_relative_change is None else upper)
  dtype = state.step_sizes.dtype
  num_accepted, num_fallbacks = _safeguards.counts(
      state.num_accepted, state.num_fallbacks, measured, valid)
  new_state = ScaleByLayerwiseStepSizeState(
      count=state.count + 1,
      direction_state=direction_state,
      step_sizes=step_sizes,
      decreases=_safeguards.keep_finite(b, state.decreases, measured, dtype),
      curvatures=_safeguards.keep_finite(q, state.curvatures, measured, dtype),
      num_accepted=num_accepted,
      num_fallbacks=num_fallbacks,
      num_skipped=state.num_skipped)
  return _nonfinite.skip_non_finite_step(
      updates, partition.scale(d, step_sizes), new_state, state)


def scale_by_layerwise_step_size(
    direction: Optional[optax.GradientTransformation] = None,
    *,
    estimator: str = "hutchinson",
    num_probes: Optional[int] = None,
    hvp: str = "forward_over_reverse",
    max_step: float = 1.0,
    max_relative_change: Optional[float] = None,
    initial_step: float = 0.0,
    ema: float = 0.0,
    update_interval: int = 1,
    coupled: bool = False,
    coupled_damping: float = 0.0,
    curvature_floor: float = 1e-8,
    fd_scale: float = 1e-3,
    layers: _layers.LayerGrouping = None,
    seed: int = 0,
    axis_name: Optional[_parallel.AxisName] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Scales a first-order direction by per-layer curvature step sizes.

  Implements the layer-wise step sizes of Bahamou and Goldfarb (2023),
  "Layer-wise Adaptive Step-Sizes for Stochastic First-Order Methods for
  Deep Learning", arXiv 2305.13664: ``alpha_l = <g, d>_l / (d_l^T H_ll d_l)``.

  The incoming updates must be the gradient of ``value_fn`` (clipping before
  it is fine); ``direction`` turns them into ``d``. The output is
  ``alpha_l * d_l`` (positive); chain a negation, as :func:`layerwise_sgd`
  and :func:`layerwise_adamw` do.

  Args:
    direction: the first-order transform making ``d`` from the gradient, e.g.
      ``optax.trace(0.9)`` or ``optax.scale_by_adam()``; ``None`` uses
      ``d = g``. It is called with the keyword ``value_fn`` too, so it may
      need curvature, e.g. ``optax.chain(precondition_by_inputs(),
      optax.trace(0.9))``.
    estimator: ``"hutchinson"`` (one product per probe, the paper's; with
      one probe ``q_l`` carries the cross-layer terms ``e_l e_m M_lm`` as
      noise, so its sign is often wrong), ``"exact"`` (one product per layer,
      vmapped: the diagonal blocks ``M_ll``) or ``"row"`` (one product along
      the whole ``d``, deterministic, but ``q_l = M_ll + sum_{m != l} M_lm``
      is not the paper's diagonal block and is often negative on ReLU nets).
    num_probes: Hutchinson probes averaged per measurement (``None`` = 1).
      It sets an array shape, so under :func:`optax.inject_hyperparams` it
      must be listed in ``static_args`` when given.
    hvp: ``"forward_over_reverse"`` (exact ``jax.jvp`` of ``jax.grad``, about
      two gradients per product), ``"gradient_difference"`` (one gradient at
      a tiny ``fd_scale`` step; see
      :func:`optax_layerwise._curvature.make_hvp`) or ``"secant"`` (one
      gradient at the step itself: layer ``l``'s tangent is scaled by its
      last step ``alpha_l``, or this step's bound before it has one, and
      ``H (s d) ~ g - grad f(theta - s d)``, the secant curvature between
      ``theta`` and where the step lands; the forms are divided back by
      ``s``, see :func:`optax_layerwise._curvature.layer_quadratic_forms`),
      or ``"forward_over_forward"`` (``estimator="exact"`` only, not
      ``coupled``, no ``axis_name``: ``q_l`` as the second directional
      derivative ``d^2/dt^2 f(theta + t d^(l))``, ``jax.jvp`` of
      ``jax.jvp``; the same numbers as forward-over-reverse without its
      backward passes, the aliases' default; a ``value_fn`` JAX cannot
      differentiate forward (a ``jax.custom_vjp``) falls back to
      forward-over-reverse with a warning; see
      :func:`optax_layerwise._curvature.layer_curvatures_forward`).
    max_step: upper clip of each accepted ``alpha_l``.
    max_relative_change: if set, also bounds the displacement of each layer,
      ``alpha_l ||d_l|| <= max_relative_change * ||theta_l||`` on every path
      (measured, averaged, fallback or reused steps; a trust ratio as in
      LARS; layers with ``theta_l = 0`` get only ``max_step``). ``None``
      here, the paper's rule; :func:`layerwise_sgd` and
      :func:`layerwise_adamw` default to 0.01, 0.02 on the layers their
      input factor preconditions. A ``scale`` after this
      transform multiplies the move too.
      ``max_step`` bounds ``alpha_l``, not how far a layer moves: when the
      model's curvature along ``d_l`` is tiny (e.g. a ReLU layer whose
      activation pattern is about to change), ``b_l / q_l`` can move a layer
      by many times its norm.
    initial_step: the step of a layer whose measurements were all rejected so
      far (``max_step`` would be bolder; 0 is the safe default because a
      rejected first measurement may mean ``d_l`` is not a descent direction).
    ema: moving-average factor for accepted steps (0 = none).
    update_interval: measure curvature every this many steps and reuse the
      last steps in between (``lax.cond``, so the extra cost amortises); in
      the first interval, also every step while a layer has no accepted
      step. May be traced (e.g. injected by :func:`optax.inject_hyperparams`).
    coupled: solve the ``L x L`` subspace Newton system that also uses the
      cross-layer blocks (beyond the paper; needs ``estimator="exact"``).
    coupled_damping: ``damping`` of the coupled system.
    curvature_floor: ``q_l <= curvature_floor * ||d_l||^2`` is rejected.
    fd_scale: relative step of ``hvp="gradient_difference"``.
    layers: the layer grouping (see :func:`optax_layerwise.group_layers`).
    seed: seeds the Hutchinson probes (probe ``k`` uses
      ``fold_in(PRNGKey(seed), k)``).
    axis_name: under ``jax.shard_map`` / ``jax.pmap``, the data-parallel
      axis: ``value_fn`` is then this device's loss, and ``b_l``, ``q_l`` are
      averaged over the axis (one all-reduce of a few ``L`` numbers), so all
      devices take the same steps. The incoming gradient must already be the
      global one (see ``docs/distributed.md``). ``None`` (default) under
      plain ``jax.jit``, sharded or not.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` whose ``update`` needs
    ``params`` and the keyword argument ``value_fn``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_layerwise as olw
    >>> params = {'a': {'w': jnp.ones(3)}, 'b': {'w': jnp.ones(2)}}
    >>> loss = lambda p: jnp.sum(p['a']['w'] ** 2) + 10 * jnp.sum(p['b']['w'] ** 2)
    >>> tx = optax.chain(olw.scale_by_layerwise_step_size(estimator='exact'),
    ...                  optax.scale(-1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
    ...                            value_fn=loss)
    >>> optax.apply_updates(params, updates)['b']['w']
    Array([0., 0.], dtype=float32)
  """
  static_interval, num_probes = _check_args(
      estimator, hvp, update_interval, num_probes, coupled, max_step,
      initial_step, coupled_damping, ema, max_relative_change, axis_name)
  cfg = _Config(
      direction=optax.with_extra_args_support(
          direction if direction is not None else optax.identity()),
      estimator=estimator, num_probes=num_probes, hvp=hvp, max_step=max_step,
      max_relative_change=max_relative_change, initial_step=initial_step,
      ema=ema, update_interval=update_interval,
      static_interval=static_interval, coupled=coupled,
      coupled_damping=coupled_damping, curvature_floor=curvature_floor,
      fd_scale=fd_scale, layers=layers, seed=seed, axis_name=axis_name)

  def init_fn(params):
    return _init(cfg, params)

  def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
    return _update(cfg, updates, state, params, value_fn, extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_alias_args(name: str, scale, weight_decay) -> None:
  _checks.check_non_negative(
      scale, "scale", transform=name,
      why="It multiplies the per-layer steps (the sign flip is built in); a "
      "negative value would climb the loss.")
  _checks.check_non_negative(weight_decay, "weight_decay", transform=name,
                                why="Use 0 for no weight decay.")


def _bound(max_relative_change, precondition):
  """The aliases' ``max_relative_change``, ``"auto"`` resolved."""
  if isinstance(max_relative_change, str):
    if max_relative_change != "auto":
      raise ValueError("max_relative_change must be a number, None or "
                       f"'auto', got {max_relative_change!r}.")
    if precondition is None:
      return AUTO_BOUNDS[None]
    return _BoundWhereTapped(tapped=AUTO_BOUNDS["inputs"],
                             plain=AUTO_BOUNDS[None])
  return max_relative_change


def _preconditioned(name: str, precondition, direction: tuple, axis_name):
  """``chain(*direction)``, after ``precondition_by_inputs`` when
  ``precondition="inputs"`` (or its lenient form for ``"auto"``)."""
  _checks.check_one_of(precondition, "precondition", PRECONDITIONS,
                       transform=name)
  if precondition == "inputs":
    direction = (_input_factor.precondition_by_inputs(axis_name=axis_name),
                 ) + direction
  elif precondition == "auto":
    direction = (_input_factor.precondition_where_tapped(  # errors name
        axis_name, transform=_NAME),) + direction  # the stage, as the rest
  return optax.chain(*direction)


def _with_step_sizes(direction, scale, **step_size_kwargs):
  """``chain(scale_by_layerwise_step_size(direction), -scale)``."""
  return _nonfinite.skip_aware_chain(
      scale_by_layerwise_step_size(direction, **step_size_kwargs),
      optax.scale_by_learning_rate(scale))


_SHARED_ARGS_DOC = """    precondition: ``"auto"`` (default), ``"inputs"`` or ``None`` (the
      paper's direction). ``"inputs"``: the direction is computed from the
      gradient multiplied, layer by layer, by K-BFGS's input-side factor
      ``H_a = (A + sqrt(0.3) I)^{-1}`` (:func:`precondition_by_inputs`,
      refreshed every 20 steps), and ``alpha_l`` is measured along it; on
      the Fashion-MNIST autoencoder it reached tuned Adam's loss in fewer
      epochs and less time (``docs/step_sizes.md``, "Input-side
      preconditioning"); it raises if no layer is tapped. ``"auto"``: the
      same on the layers a tapped pass sees (Flax ``Dense``, ``Conv``,
      ``DenseGeneral``, :func:`optax_layerwise.dense`, ...; see
      :func:`optax_layerwise.kbfgs_coverage`) and the paper's direction on
      the others (e.g. plain ``x @ w``, norm scales, embeddings); a call
      the tap cannot read (one kernel with two biases) leaves every layer
      unpreconditioned, with a warning.
    estimator: ``"exact"``, ``"hutchinson"`` (the paper's) or ``"row"`` (see
      :func:`scale_by_layerwise_step_size`, which documents every argument
      below). ``None``: ``"exact"``, or ``"hutchinson"`` when ``num_probes``
      is given.
    num_probes: Hutchinson probes per measurement (list it in
      ``static_args`` of :func:`optax.inject_hyperparams` when given).
      Giving it selects the paper's measurement for ``estimator`` and
      ``update_interval`` when they are ``None`` (``"hutchinson"``, 1).
    hvp: ``None``: ``"forward_over_forward"`` (the exact diagonal blocks as
      second directional derivatives) for the exact estimator without
      ``coupled`` or ``axis_name``, else ``"forward_over_reverse"`` (the
      exact Hessian-vector product);
      ``"secant"`` (one gradient per product, at the last step) or
      ``"gradient_difference"``. The default measurement (the ``L`` exact
      blocks every 40 steps) costs about 2.7 gradients on the MNIST
      autoencoder (``L = 8``; 18 forward-over-reverse), about 1.2-1.36x
      the base optimizer's step amortised (``docs/step_sizes.md``), and
      rejected no curvature there.
    max_step: upper clip of each per-layer step.
    max_relative_change: bounds each layer's displacement,
      ``alpha_l ||d_l|| <= max_relative_change * ||theta_l||``; ``"auto"``
      (default): 0.02 on a layer preconditioned by ``H_a`` (every leaf of
      it), 0.01 on the others, decided while tracing; ``None`` for
      the paper's rule alone. Without it, accurate curvature estimates
      diverged on a deep ReLU autoencoder (docs/step_sizes.md).
    initial_step: a layer's step until it has an accepted measurement.
    ema: moving-average factor of the accepted steps, ``alpha_l <- ema
      alpha_l + (1 - ema) alpha_new`` (a layer's first accepted step is
      taken as is); 0.9 by default (``scale_by_layerwise_step_size``: 0,
      the paper's rule), which removed the overshoot after each
      re-measurement (``docs/step_sizes.md``).
    update_interval: measure curvature every this many steps (``None``: 40,
      or 1 when ``num_probes`` is given).
    coupled: solve the ``L x L`` subspace Newton system (exact only).
    coupled_damping: its damping.
    curvature_floor: reject ``q_l <= curvature_floor * ||d_l||^2``.
    fd_scale: relative step of the gradient difference.
    layers: the layer grouping (a callable must be listed in ``static_args``
      of :func:`optax.inject_hyperparams`, which treats callables as
      schedules).
    seed: seeds the Hutchinson probes.
    axis_name: the data-parallel axis under ``jax.shard_map`` / ``jax.pmap``
      (curvature statistics are averaged over it; ``None`` under ``jax.jit``)."""


def layerwise_sgd(
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    scale: ScalarOrSchedule = 1.0,
    precondition: Optional[str] = "auto",
    estimator: Optional[str] = None,
    num_probes: Optional[int] = None,
    hvp: Optional[str] = None,
    max_step: float = 1.0,
    max_relative_change: Union[float, None, str] = "auto",
    initial_step: float = 0.0,
    ema: float = ALIAS_EMA,
    update_interval: Optional[int] = None,
    coupled: bool = False,
    coupled_damping: float = 0.0,
    curvature_floor: float = 1e-8,
    fd_scale: float = 1e-3,
    layers: _layers.LayerGrouping = None,
    seed: int = 0,
    axis_name: Optional[_parallel.AxisName] = None,
) -> optax.GradientTransformationExtraArgs:
  """SGD with momentum and layer-wise curvature step sizes, no learning rate.

  Bahamou and Goldfarb (2023), arXiv 2305.13664. The direction is
  ``d = trace(g) + weight_decay * theta`` (optax's ``trace`` momentum buffer
  plus decoupled weight decay, SGDW-style), and layer ``l`` moves by
  ``-scale * alpha_l * d_l`` with ``alpha_l = <g, d>_l / d_l^T H_ll d_l``.

  Args:
    momentum: the momentum decay of :func:`optax.trace` (0 for plain SGD).
    nesterov: Nesterov momentum.
    weight_decay: decoupled weight decay added to the direction, so it is
      scaled by the per-layer step like the rest of the direction.
    scale: a global multiplier (or schedule) of the steps, default 1.
{shared}

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`; call ``update`` with
    ``params`` and ``value_fn``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_layerwise as olw
    >>> params = {{'w': jnp.ones(4)}}
    >>> loss = lambda p: jnp.sum((p['w'] - 3.0) ** 2)
    >>> tx = olw.layerwise_sgd(momentum=0.0, max_step=10.0,
    ...                        max_relative_change=None)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
    ...                            value_fn=loss)
    >>> optax.apply_updates(params, updates)['w']
    Array([3., 3., 3., 3.], dtype=float32)
  """
  _check_alias_args("layerwise_sgd", scale, weight_decay)
  direction = _preconditioned(
      "layerwise_sgd", precondition,
      (optax.trace(decay=momentum, nesterov=nesterov),
       optax.add_decayed_weights(weight_decay)), axis_name)
  return _with_step_sizes(
      direction, scale, num_probes=num_probes,
      **_measurement(num_probes, coupled, axis_name, estimator=estimator,
                     hvp=hvp, update_interval=update_interval),
      max_step=max_step,
      max_relative_change=_bound(max_relative_change, precondition),
      initial_step=initial_step, ema=ema, coupled=coupled,
      coupled_damping=coupled_damping, curvature_floor=curvature_floor,
      fd_scale=fd_scale, layers=layers, seed=seed, axis_name=axis_name)


def layerwise_adamw(
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    scale: ScalarOrSchedule = 1.0,
    precondition: Optional[str] = "auto",
    estimator: Optional[str] = None,
    num_probes: Optional[int] = None,
    hvp: Optional[str] = None,
    max_step: float = 0.1,
    max_relative_change: Union[float, None, str] = "auto",
    initial_step: float = 0.0,
    ema: float = ALIAS_EMA,
    update_interval: Optional[int] = None,
    coupled: bool = False,
    coupled_damping: float = 0.0,
    curvature_floor: float = 1e-8,
    fd_scale: float = 1e-3,
    layers: _layers.LayerGrouping = None,
    seed: int = 0,
    axis_name: Optional[_parallel.AxisName] = None,
) -> optax.GradientTransformationExtraArgs:
  """AdamW with layer-wise curvature step sizes, no learning rate.

  Bahamou and Goldfarb (2023), arXiv 2305.13664. The direction is AdamW's
  ``d = m_hat / (sqrt(v_hat) + eps) + weight_decay * theta`` (decoupled
  weight decay, as in :func:`optax.adamw`, where it is multiplied by the
  learning rate: here by ``alpha_l``), and layer ``l`` moves by
  ``-scale * alpha_l * d_l``. ``max_step`` defaults to 0.1 because Adam's
  direction has entries of order 1.

  Args:
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    weight_decay: decoupled weight decay.
    scale: a global multiplier (or schedule) of the steps, default 1.
{shared}

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`; call ``update`` with
    ``params`` and ``value_fn``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_layerwise as olw
    >>> params = {{'w': jnp.ones(4)}}
    >>> loss = lambda p: jnp.sum((p['w'] - 3.0) ** 2)
    >>> tx = olw.layerwise_adamw(weight_decay=0.0, max_step=10.0,
    ...                          max_relative_change=None)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
    ...                            value_fn=loss)
    >>> optax.apply_updates(params, updates)['w']
    Array([3., 3., 3., 3.], dtype=float32)
    >>> state[0].step_sizes.round(3)  # alpha_l; Adam's first d is sign(g)
    Array([2.], dtype=float32)
  """
  _check_alias_args("layerwise_adamw", scale, weight_decay)
  direction = _preconditioned(
      "layerwise_adamw", precondition,
      (optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
       optax.add_decayed_weights(weight_decay)), axis_name)
  return _with_step_sizes(
      direction, scale, num_probes=num_probes,
      **_measurement(num_probes, coupled, axis_name, estimator=estimator,
                     hvp=hvp, update_interval=update_interval),
      max_step=max_step,
      max_relative_change=_bound(max_relative_change, precondition),
      initial_step=initial_step, ema=ema, coupled=coupled,
      coupled_damping=coupled_damping, curvature_floor=curvature_floor,
      fd_scale=fd_scale, layers=layers, seed=seed, axis_name=axis_name)


layerwise_sgd.__doc__ = layerwise_sgd.__doc__.format(shared=_SHARED_ARGS_DOC)
layerwise_adamw.__doc__ = layerwise_adamw.__doc__.format(
    shared=_SHARED_ARGS_DOC)
