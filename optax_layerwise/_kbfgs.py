"""K-BFGS and K-BFGS(L) (Goldfarb, Ren and Bahamou, NeurIPS 2020).

Block-diagonal quasi-Newton with one block per layer ``h = a @ W + b`` (a
dense layer, or any layer kind written as one over rows:
:mod:`optax_layerwise._layer_kinds`),
each block approximated by a Kronecker product whose two small factors keep
their inverses by BFGS: ``H_a`` (input side, ``(d_in+1)^2``) and ``H_g``
(pre-activation side, ``d_out^2``, or the L-BFGS operator of the last ``p``
pairs for K-BFGS(L)). The step for layer ``l`` is ``-lr * H_a M_l H_g`` with
``M_l`` the momentum of the regularised gradient of ``[W; b]``.

The algorithm follows docs/kbfgs.md, "Algorithm" (the paper, arXiv 2006.08877,
as implemented in the authors' public code
renyiryry/kbfgs_neurips2020_public, rewritten for Flax's ``(d_in, d_out)``
kernel layout). Per step, on the mini-batch of ``value_fn``:

1. Tapped pass at ``theta`` (:mod:`optax_layerwise._taps`): per layer the mean
   homogeneous input ``abar``, ``A_batch = mean_i at_i at_i^T``, ``mean h`` and
   ``mean gh`` (``gh_i = n dL/dh_i``). ``A <- A_batch`` on the first step,
   else ``A <- beta A + (1 - beta) A_batch``; on the first step ``H_a <- (A +
   sqrt(lambda) I)^-1`` (the only explicit inverse) and, for K-BFGS by
   default (ours), ``H_g <- diag(1 / (D + 0.1))`` from the output gradients'
   second moment ``D`` (``I`` from ``init``, the paper's start).
2. ``M <- mu M + (1 - mu) (g + tau theta)`` for every leaf.
3. ``delta_l = -lr H_a M_l H_g`` for tapped layers; other leaves (norm scales,
   embeddings, ...) take the fallback ``-lr M``.
4. Second tapped pass on the same mini-batch at ``theta + delta``
   (``pair="secant"``) or the directional derivatives along ``delta``
   (``pair="tangent"``): ``s <- beta s + (1 - beta)(mean h+ - mean h)``,
   ``y <- beta y + (1 - beta)(mean gh+ - mean gh)``.
5. Double damping of ``(s, y)`` (Powell with ``mu1``, then
   Levenberg-Marquardt with ``mu2 = sqrt(lambda)``).
6. BFGS update of ``H_g`` (or append to the L-BFGS memory), skipped when
   ``s^T y <= 1e-4 s^T s ||mean gh||`` or non-finite.
7. ``H_a`` by Hessian action: ``s_a = H_a abar``, ``y_a = (A + sqrt(lambda) I)
   s_a``, BFGS update with the same skip rule (``||abar||`` in place of
   ``||mean gh||``, as in the authors' code).

``A`` and ``H_a`` are kept as their diagonal blocks of at most ``block_size``
inputs (ours, Shampoo's blocking, :mod:`optax_layerwise._blocks`; one block,
the paper's factor, for ``k <= block_size``): steps 1, 3 and 7 act on each
block on its own, step 7 with the block's slice of ``abar``.

A whole step is skipped (zero update, state unchanged but for
``num_skipped`` and ``preconditioned``, which reports the leaves the step
would have preconditioned; ``count`` does not advance) when the gradient, the
tapped statistics (a NaN loss from ``value_fn``) or the step itself are not
finite;
a non-finite pair from the second pass skips that layer's ``s, y, H_g``
update and is counted in ``num_skipped_h_g``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_layerwise import _bfgs
from optax_layerwise import _blocks
from optax_layerwise import _checks
from optax_layerwise import _layer_kinds
from optax_layerwise import _layer_matrices as _lm
from optax_layerwise import _layers
from optax_layerwise import _nonfinite
from optax_layerwise import _parallel
from optax_layerwise import _row_samples
from optax_layerwise import _taps

PyTree = Any
ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]

__all__ = ["KBFGSLayerState", "KBFGSState", "kbfgs"]

_NAME = "kbfgs"
PAIRS = ("secant", "tangent")
STEP_RULES = ("layerwise", "fixed")
H_G_INITS = ("diagonal", "identity")
#: ``h_g_init="diagonal"``: ``H_g``'s first value ``diag(1 / (D + delta))``,
#: ``D`` the output gradients' second moment normalised to mean 1.
H_G_INIT_DAMPING = 0.1
UNSEEN = ("no tapped call: not called, called on a cast or copy of the "
           "params leaf, or inside a transform the tap cannot see through "
           "(jax.lax.scan, nnx.scan; docs/kbfgs.md 'Layer kinds')")


class KBFGSLayerState(NamedTuple):
  """The Kronecker factors of one layer (statistics dtype).

  Attributes:
    a: ``(n, s, s)`` the diagonal blocks of the running ``A = mean a a^T``
      (``k = d_in + 1`` inputs with a bias, in ``n`` blocks of ``s``:
      :func:`optax_layerwise._blocks.layout`; ``(1, k, k)`` for ``k <=
      block_size``).
    h_a: ``(n, s, s)`` ``H_a ~ (A + sqrt(lambda) I)^-1``, block by block.
    h_g: ``(d_out, d_out)`` ``H_g`` (K-BFGS), or the
      :class:`optax_layerwise._bfgs.LBFGSMemory` of the last ``p`` pairs
      (K-BFGS(L)).
    s: ``(d_out,)`` smoothed pre-activation change (before damping).
    y: ``(d_out,)`` smoothed pre-activation-gradient change (before damping).
  """
  a: jax.Array
  h_a: jax.Array
  h_g: Union[jax.Array, _bfgs.LBFGSMemory]
  s: jax.Array
  y: jax.Array


class KBFGSState(NamedTuple):
  """State of :func:`kbfgs`; shapes and dtypes are fixed across steps.

  Per-layer vectors have one entry per layer with factors, in the order of
  :func:`kbfgs_layer_names`.

  Attributes:
    count: accepted steps (int32); indexes learning-rate schedules.
    momentum: ``M``, the momentum of the regularised gradient (params'
      structure, statistics dtype).
    layers: one :class:`KBFGSLayerState` per layer with factors.
    preconditioned: params' structure, bool scalars: ``True`` for the leaves
      (kernel and bias) the last step preconditioned; ``False`` for leaves
      that took the fallback ``-lr M``.
    num_powell: per layer, steps on which Powell damping fired (int32).
    num_lm: per layer, steps on which Levenberg-Marquardt damping fired.
    num_skipped_h_g: per layer, ``H_g`` updates skipped (skip rule,
      non-finite pair, or ``H_g`` reset: the floor, a step that measures
      nothing).
    num_skipped_h_a: per layer, ``H_a`` refreshes in which a block's update
      was skipped (blocks with a zero slice of ``abar`` aside).
    num_skipped: whole steps skipped for a non-finite gradient, tapped
      statistics or step (int32 scalar).
    step_sizes: per layer, the multiple ``t_l`` of the trial step
      ``delta_l = -lr H_a M_l H_g`` applied last (``step_rule="layerwise"``;
      1 with ``step_rule="fixed"``).
    decreases: per layer, the last measured ``b_l = <g, delta>_l`` (0 with
      ``step_rule="fixed"``).
    curvatures: per layer, the last measured ``q_l = <delta_l, g(theta +
      delta) - g(theta)>_l`` (0 with ``step_rule="fixed"``).
    num_accepted: per layer, steps whose measurement of ``t_l`` was
      accepted.
    num_fallbacks: per layer, steps whose measurement was rejected
      (``q_l <= 0``, ``b_l >= 0`` or non-finite), which reused the last
      accepted ``t_l``.
  """
  count: jax.Array
  momentum: PyTree
  layers: tuple
  preconditioned: PyTree
  num_powell: jax.Array
  num_lm: jax.Array
  num_skipped_h_g: jax.Array
  num_skipped_h_a: jax.Array
  num_skipped: jax.Array
  step_sizes: jax.Array
  decreases: jax.Array
  curvatures: jax.Array
  num_accepted: jax.Array
  num_fallbacks: jax.Array


Spec = _layer_kinds.LayerSpec


def kbfgs_layer_names(params: PyTree, dense_layers=None) -> tuple:
  """Names of the layers :func:`kbfgs` keeps Kronecker factors for.

  The order is that of the per-layer vectors and ``layers`` of
  :class:`KBFGSState`.

  Args:
    params: the params (or their shapes), as given to ``tx.init``.
    dense_layers: the ``dense_layers`` predicate given to :func:`kbfgs`.

  Returns:
    A tuple of key-path strings of the layers' parent nodes.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_layerwise as olw
    >>> params = {'l1': {'kernel': jnp.ones((4, 8)), 'bias': jnp.zeros(8)},
    ...           'norm': {'scale': jnp.ones(8)},
    ...           'l2': {'kernel': jnp.ones((8, 1))}}
    >>> olw.kbfgs_layer_names(params)  # 'norm' takes the momentum fallback
    ("['l1']", "['l2']")
  """
  return tuple(spec.name
               for spec in _layer_kinds.find_kernels(params, dense_layers))


def _layer_dot(a_leaves, b_leaves, spec: Spec, dtype) -> jax.Array:
  """``<a, b>_l`` over the kernel and bias of one layer."""
  return sum(jnp.vdot(_lm.part(a_leaves, i, spec).astype(dtype),
                      _lm.part(b_leaves, i, spec).astype(dtype))
             for i in _lm.layer_indices(spec))


def _layer_tap(taps: _taps.TapResult, spec: Spec):
  return _lm.layer_tap(taps, spec, _NAME)


def _key(spec: Spec) -> tuple:
  """A sortable key of one layer (a pytree dict key)."""
  return (spec.kernel_index,) + spec.slice


def _step_scales(decrease: jax.Array, curvature: jax.Array,
                 previous: jax.Array, limit: jax.Array,
                 max_step_scale) -> tuple[jax.Array, jax.Array]:
  """Per-layer multiples ``t_l`` of the trial step, and which were measured.

  Seed 000's rule (the minimiser of the quadratic model along a layer's own
  direction, Bahamou and Goldfarb, arXiv 2305.13664) applied to K-BFGS's
  step: ``t_l = -b_l / q_l`` with ``b_l = <g, delta>_l`` and the secant
  curvature ``q_l = <delta_l, g(theta + delta) - g(theta)>_l``
  (docs/kbfgs.md, "Per-layer step"). A measurement with ``q_l <= 0``,
  ``b_l >= 0`` (not a descent direction) or a non-finite value is rejected
  and the layer reuses ``previous``; accepted ones are clipped to
  ``[0, max_step_scale]``; every ``t_l`` is then capped by ``limit`` (the
  displacement bound, ``inf`` without one).
  """
  valid = (jnp.isfinite(decrease) & jnp.isfinite(curvature)
           & (curvature > 0) & (decrease < 0))
  raw = -decrease / jnp.where(valid, curvature, 1.0)
  scales = jnp.where(valid, jnp.clip(raw, 0.0, max_step_scale), previous)
  return jnp.minimum(scales, limit), valid


@dataclasses.dataclass(frozen=True)
class _Config:
  """The checked hyperparameters (some may be traced when injected)."""
  learning_rate: Any
  sqrt_damping: Any
  momentum: Any
  weight_decay: Any
  beta: Any
  mu1: Any
  mu2: Any
  skip_tol: Any
  max_relative_change: Any
  layerwise: bool
  diagonal_h_g: bool
  max_step_scale: Any
  input_factor_interval: Any
  step_size_interval: Any
  block_size: Optional[int]
  input_factor_rows: Any  # _row_samples.Sampling
  step_size_rows: Any  # _row_samples.Sampling
  pair: str
  h_g: Any  # _bfgs.DenseInverse or _bfgs.LimitedMemory
  precondition_dtype: Any
  select: Any
  axis_name: Any

  def lr(self, count):
    rate = self.learning_rate
    return rate(count) if callable(rate) else rate

  def measure(self, count):
    """Whether the per-layer step's ``t_l`` is measured at this step."""
    if not self.layerwise:
      return False
    if _checks.concrete_int(self.step_size_interval) == 1:
      return True
    return count % self.step_size_interval == 0

  def refresh(self, count):
    """Whether ``A`` and ``H_a`` are refreshed at this step."""
    if _checks.concrete_int(self.input_factor_interval) == 1:
      return True
    return count % self.input_factor_interval == 0

  def sampled_grads(self):
    """The rows of the sampled gradients behind ``q_l`` (``None``: ``q_l``
    from the params gradients)."""
    if (self.layerwise and self.pair == "secant"
        and self.step_size_rows.stride > 1):
      return self.step_size_rows
    return None


class _Start(NamedTuple):
  """K-BFGS's diagonal start: ``H_g`` is ``diag(w)`` when ``first``."""
  first: jax.Array
  w: jax.Array


class _Work(NamedTuple):
  """One layer's input-side quantities, computed once per step, whether
  this is the first step (``H_a`` is then inverted: :func:`_with_h_a`),
  and the diagonal start of ``H_g`` (``None`` without one)."""
  abar: jax.Array
  a_batch: jax.Array
  first: jax.Array
  start: Optional[_Start] = None


# --- Phase 1: the tapped pass at theta -------------------------------------


def _tap(cfg: _Config, value_fn, params, specs, *, second_moment,
         with_grads=None, squares=False):
  """The tapped pass; ``squares``: with the output gradients' second
  moments for ``h_g_init="diagonal"`` (from the rows ``A``'s are)."""
  return _taps.tap_dense_layers(
      value_fn, params, kernels={s.kernel_index: s.d_out for s in specs},
      second_moment=second_moment,
      with_grads=cfg.layerwise if with_grads is None else with_grads,
      axis_name=cfg.axis_name, local_grads=True,
      second_moment_stride=cfg.input_factor_rows,
      sampled_grads=cfg.sampled_grads(),
      output_second_moment=cfg.input_factor_rows if (
          squares and cfg.diagonal_h_g) else None)


def _second_tap(cfg: _Config, value_fn, params, specs, measure, full_grads):
  """The tap of the pair's pass; its params gradient (for the ``q_l`` of
  layers without sampled gradients, ``full_grads``) only when ``measure`` (a
  traced bool: under :func:`jax.lax.cond`, zeros otherwise, so skipped
  steps cost no weight-gradient products; the sampled gradients' products,
  1/14 of them by default on calls of 883 rows or more, are formed on every
  step)."""
  if not (cfg.layerwise and full_grads):
    return _tap(cfg, value_fn, params, specs, second_moment=False,
                with_grads=False)
  if isinstance(measure, bool):
    return _tap(cfg, value_fn, params, specs, second_moment=False,
                with_grads=measure)

  def without_grads(p):
    res = _tap(cfg, value_fn, p, specs, second_moment=False,
               with_grads=False)
    # Per-device like the other branch's gradient (under shard_map).
    zeros = _parallel.local_params(
        jax.tree_util.tree_map(jnp.zeros_like, p), cfg.axis_name)
    return dataclasses.replace(res, grads=zeros)

  return jax.lax.cond(
      measure, lambda p: _tap(cfg, value_fn, p, specs, second_moment=False,
                              with_grads=True), without_grads, params)


def _tapped_layers(specs: tuple, taps: _taps.TapResult) -> tuple:
  """The layers the tap saw, checked against the params; warns on the rest."""
  if not taps.layers:
    raise _taps.no_tappable_layer_error(_NAME, taps.num_untapped_calls)
  reasons = dict(taps.unsupported)
  untapped = [f"{s.name} ({reasons.get(s.kernel_index, UNSEEN)})"
              for s in specs if s.kernel_index not in taps.layers]
  if untapped:
    warnings.warn(
        f"{_NAME}: no tapped call used the kernel(s) {untapped}; they take "
        "the fallback -lr * momentum. Exclude them with `dense_layers` to "
        "save their state memory.", stacklevel=3)
  for spec in specs:
    tap = _layer_tap(taps, spec)
    if tap is None:
      continue
    if tap.bias_index != spec.bias_index:
      raise ValueError(
          f"{_NAME}: the layer {spec.name} was called with bias leaf "
          f"{tap.bias_index} but its params have bias leaf "
          f"{spec.bias_index} (None = no bias). Call the layer with its own "
          "`bias` sibling leaf, or none if it has none.")
    if tap.input_mean.shape != (spec.d_in,):
      raise ValueError(
          f"{_NAME}: the layer {spec.name} was called with inputs of shape "
          f"{tap.input_mean.shape} per row (leading axes: the slices of a "
          "kernel stacked by nn.scan) but its kernel was read as "
          f"({spec.d_in}, {spec.d_out}). Pass a `dense_layers` predicate "
          "returning, for this leaf, the number of contracted leading "
          "kernel axes, or (stacked axes, contracted axes) for a stack.")
  return tuple(s for s in specs if s.kernel_index in taps.layers)


def _preconditioned(treedef, num_leaves: int, tapped: tuple):
  flags = [False] * num_leaves
  for spec in tapped:
    for i in _lm.layer_indices(spec):
      flags[i] = True
  return jax.tree_util.tree_unflatten(treedef,
                                      [jnp.asarray(f) for f in flags])


# --- Phases 2-3: momentum and the preconditioned trial step ----------------


def _momentum(cfg: _Config, grad_leaves, leaves, mom_leaves) -> list:
  """``M <- mu M + (1 - mu) (g + tau theta)`` for every leaf."""
  new = []
  for g, p, m in zip(grad_leaves, leaves, mom_leaves):
    g_reg = g.astype(m.dtype) + cfg.weight_decay * p.astype(m.dtype)
    new.append(cfg.momentum * m + (1.0 - cfg.momentum) * g_reg)
  return new


def _input_factor(cfg: _Config, spec: Spec, ls: KBFGSLayerState, tap,
                  first) -> _Work:
  """``abar``, ``A_batch``'s blocks, ``first`` and ``H_g``'s diagonal
  start."""
  # The tap's statistics dtype is the widest of all layers': cast to this
  # layer's (float32 factors next to a float64 layer, say).
  abar, a_batch = (x.astype(ls.a.dtype) for x in _lm.homogeneous(spec, tap))
  # The blocks' size from the state (block_size may arrive traced from
  # optax.inject_hyperparams; _blocks.layout(k, s) gives back (n, s)).
  a_batch = _blocks.diagonal_blocks(a_batch, ls.a.shape[-1])
  start = _diagonal_start(tap, ls.s.dtype) if cfg.diagonal_h_g else None
  return _Work(abar, a_batch, first,
               None if start is None else _Start(first, start))


def _with_h_a(cfg: _Config, ls: KBFGSLayerState, work: _Work, fn):
  """``fn(H_a)`` with this step's ``H_a``: ``(A_batch + sqrt(lambda) I)^-1``
  on the first step (the only explicit inverse), else the state's. ``fn``
  runs inside both branches of the :func:`jax.lax.cond`: a cond that
  returned ``H_a`` itself would copy the state's on every step (its output
  cannot alias the jitted step's argument). Under :func:`jax.vmap` with a
  batched step count the cond becomes a select, which runs both branches
  (the inverse on every step)."""
  def inverted(_, a):
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    return fn(_blocks.spd_inverse(a + cfg.sqrt_damping * eye))
  return jax.lax.cond(work.first, inverted, lambda h, _: fn(h), ls.h_a,
                      work.a_batch)


def _diagonal_start(tap, dtype) -> Optional[jax.Array]:
  """``w = 1 / (D + delta)``, ``H_g``'s first value ``diag(w)`` (ours,
  ``h_g_init="diagonal"``; docs/kbfgs.md "The first H_g"): ``D`` the
  layer's ``mean_i gh_i * gh_i`` normalised to mean 1, ``delta =
  H_G_INIT_DAMPING``; the diagonal of the Gauss-Newton (Fisher) factor
  that ``H_g`` approximates the inverse of, up to a scale the per-layer
  step absorbs (with ``step_rule="fixed"`` only ``max_relative_change``
  bounds it: units with ``D ~ 0`` get 10). Ones if ``D`` is zero or not
  finite; ``None`` if the layer has no such statistic (nested calls)."""
  second = tap.output_grad_second_moment
  if second is None:
    return None
  second = second.astype(dtype)
  mean = jnp.mean(second)
  usable = (mean > 0) & _nonfinite.tree_all_finite(second)
  diagonal = 1.0 / (second / jnp.where(usable, mean, 1.0) + H_G_INIT_DAMPING)
  return jnp.where(usable, diagonal, 1.0)


def _h_g_apply(cfg: _Config, ls: KBFGSLayerState, start: Optional[_Start],
               v: jax.Array, dtype=None) -> jax.Array:
  """``H_g v`` (rows: ``v H_g``), from the diagonal start on its step."""
  if start is None:
    return cfg.h_g.apply(ls.h_g, v, dtype=dtype)
  return cfg.h_g.apply_started(ls.h_g, start.first, start.w, v, dtype=dtype)


def _damped_a_action(cfg: _Config, ls: KBFGSLayerState, work: _Work, first,
                     refresh):
  """``v -> (A + sqrt(lambda) I) v`` with this step's ``A``, block by block
  (``v`` ``(n, s)``), by matrix-vector products: the matrix is not
  formed."""
  return lambda v: (_lm.averaged(_blocks.matvec(ls.a, v),
                                 _blocks.matvec(work.a_batch, v), cfg.beta,
                                 first, refresh)
                    + cfg.sqrt_damping * v)


#: ``block_size="auto"``: ``A`` and ``H_a`` in blocks of at most 1024
#: inputs, the whole factor for narrower layers (docs/kbfgs.md, "Input
#: factor in blocks").
BLOCK_SIZE = 1024

#: Automatic ``precondition_dtype``
#: (:func:`optax_layerwise._layer_matrices.precondition_dtype`).
BF16_MIN_WIDTH = _lm.BF16_MIN_WIDTH


def _trial_step(cfg: _Config, spec: Spec, ls: KBFGSLayerState, work: _Work,
                mom_leaves, leaves, lr):
  """``delta_l = -lr H_a M_l H_g``, bounded; and the cap on ``t_l``."""
  dtype = _lm.precondition_dtype(cfg.precondition_dtype, spec,
                                 ls.h_a.dtype)
  m = _lm.matrix(mom_leaves, spec)
  h_a_m = _with_h_a(cfg, ls, work, lambda h: _blocks.multiply(
      h if dtype is None else h.astype(dtype), m, ls.h_a.dtype))
  step = -lr * _h_g_apply(cfg, ls, work.start, h_a_m, dtype)
  if cfg.max_relative_change is None:
    return step, jnp.asarray(jnp.inf, step.dtype)
  theta_sq = _layer_dot(leaves, leaves, spec, step.dtype)
  ratio = _layers.trust_ratio(theta_sq, jnp.sum(jnp.square(step)),
                              cfg.max_relative_change)
  # The per-layer multiple t_l may not push the move past the bound: the
  # shortened step sits on it (ratio 1), a shorter one has room.
  return step * jnp.minimum(1.0, ratio), jnp.maximum(ratio, 1.0)


# --- Phase 4: the pair, at theta + delta or along delta ---------------------


class _GradChange(NamedTuple):
  """``g(theta + delta) - g(theta)`` for ``q_l``: per layer ``{key: (W's,
  b's)}`` from the sampled rows where both passes have them, else the
  params gradients' leaves (``None`` if no layer needs them)."""
  sampled: dict
  full: Optional[list]


def _curvature(change: _GradChange, trial, spec: Spec, dtype) -> jax.Array:
  """``q_l = <delta_l, g(theta + delta) - g(theta)>_l``."""
  sampled = change.sampled.get(_key(spec))
  if sampled is None:
    return _layer_dot(change.full, trial, spec, dtype)
  # A sampled layer is called directly (no stacked slice): its (W, b)
  # gradients stand in for the leaves.
  return _layer_dot(dict(zip((spec.kernel_index, spec.bias_index), sampled)),
                    trial, spec, dtype)


def _measure_pair(cfg: _Config, value_fn, params, updates, tapped, taps,
                  measure):
  """Per layer ``(mean h, mean g_h)`` changes, and the gradient's change
  (``None`` unless the step is per layer)."""
  if cfg.pair == "secant":
    shifted = jax.tree_util.tree_map(
        lambda p, u: jnp.asarray(p + u).astype(jnp.asarray(p).dtype),
        params, updates)
    full = any(_layer_tap(taps, s).sampled_grad is None for s in tapped)
    plus = _second_tap(cfg, value_fn, shifted, tapped, measure, full)
    pairs = {}
    for spec in tapped:
      before, after = _layer_tap(taps, spec), _layer_tap(plus, spec)
      if after is None:
        raise ValueError(f"{_NAME}: the layer {spec.name} was tapped at "
                         "theta but not at theta + delta; value_fn must "
                         "call the same layers for all params.")
      pairs[_key(spec)] = (after.output_mean - before.output_mean,
                           after.output_grad - before.output_grad)
    if not cfg.layerwise:
      return pairs, None
    sampled = {}
    for spec in tapped:
      before, after = _layer_tap(taps, spec), _layer_tap(plus, spec)
      if before.sampled_grad is not None:
        sampled[_key(spec)] = tuple(a - b for a, b in zip(
            after.sampled_grad, before.sampled_grad))
    return pairs, _GradChange(sampled, None if plus.grads is None else [
        a - b for a, b in zip(jax.tree_util.tree_leaves(plus.grads),
                              jax.tree_util.tree_leaves(taps.grads))])

  def means(p):
    res = _second_tap(cfg, value_fn, p, tapped, measure, True)
    layer_taps = {_key(s): _layer_tap(res, s) for s in tapped}
    return {k: (t.output_mean, t.output_grad)
            for k, t in layer_taps.items()}, res.grads

  # The tangent of the gradient is the Hessian-vector product H delta.
  _, (pairs, hess_delta) = jax.jvp(means, (params,), (updates,))
  grad_change = None if not cfg.layerwise else _GradChange(
      {}, jax.tree_util.tree_leaves(hess_delta))
  return pairs, grad_change


# --- Phase 5: the per-layer step -------------------------------------------


def _layer_steps(cfg: _Config, state: KBFGSState, rows: list, specs: tuple,
                 grad0, grad_change, trial, limits, measure):
  """``t_l`` for the tapped layers (rows of the per-layer vectors); returns
  the new ``(step_sizes, decreases, curvatures, measured)``. Off the
  ``step_size_interval`` (``measure`` false) every layer reuses its last
  ``t_l``, still capped by the displacement bound."""
  dtype = state.step_sizes.dtype
  b = jnp.stack([_layer_dot(grad0, trial, specs[r], dtype) for r in rows])
  q = jnp.stack([_curvature(grad_change, trial, specs[r], dtype)
                 for r in rows])
  # The gradients are this device's (local_grads): b and q are linear in
  # them, so one all-reduce of 2 L numbers gives the global ones.
  b, q = _parallel.global_mean(jnp.stack([b, q]), cfg.axis_name)
  index = jnp.asarray(rows)
  limit = jnp.stack([limits[r] for r in rows]).astype(dtype)
  q = jnp.where(measure, q, jnp.nan)  # not measured: reuse the last t_l
  scales, valid = _step_scales(b, q, state.step_sizes[index], limit,
                               cfg.max_step_scale)
  keep = lambda new, old: jnp.where(jnp.isfinite(new), new, old[index])
  return (state.step_sizes.at[index].set(scales.astype(dtype)),
          state.decreases.at[index].set(keep(b, state.decreases)),
          state.curvatures.at[index].set(keep(q, state.curvatures)),
          jnp.zeros(state.step_sizes.shape, bool).at[index].set(valid))


# --- Phases 6-7: damping and the factor updates -----------------------------


def _step_motion(updates, leaves, spec: Spec) -> tuple:
  """``(nonzero, moved)``: whether the layer's step is nonzero, and whether
  it changes any of its params (an entry more than half their float
  spacing)."""
  nonzero, moved = [], []
  for i in _lm.layer_indices(spec):
    u, p = _lm.part(updates, i, spec), _lm.part(leaves, i, spec)
    nonzero.append(jnp.any(u != 0))
    moved.append(jnp.any((p + u).astype(p.dtype) != p))
  return jnp.any(jnp.stack(nonzero)), jnp.any(jnp.stack(moved))


def _measures_nothing(motion: tuple, s_bar, pair_ok) -> jax.Array:
  """Whether the layer's trial steps measure nothing, so that nothing would
  ever change its ``H_g`` (ours; docs/kbfgs.md, "When H_g collapses: the
  floor and the reset"): a nonzero step that leaves its params unchanged
  (below their float spacing: the pair at ``theta + delta`` is zero, BFGS
  skips it and ``q_l`` is rejected), or one that moves them only because
  ``t_l`` scales it while the smoothed ``s_bar`` of a finite pair is
  exactly zero (the trial steps' pairs have been zero for as long as
  ``beta^n`` takes to underflow: about 900 steps in float32 at ``beta =
  0.9``). Both froze two-layer Rosenbrock in float32."""
  nonzero, moved = motion
  return nonzero & (~moved | (pair_ok & jnp.all(s_bar == 0)))


def _update_factors(cfg: _Config, ls: KBFGSLayerState, work: _Work, tap,
                    pair, first, refresh, take, motion):
  """Double damping, BFGS of ``H_g`` and the Hessian-action BFGS of
  ``H_a``; returns the layer's new state and its (powell, lm, skipped,
  skipped_a) flags. ``take`` false (a skipped step) returns ``ls`` and no
  flags: the selections sit inside the updates' own elementwise passes, so
  a step costs no extra copy of the factors. A layer whose steps measure
  nothing (``motion``: :func:`_step_motion`; :func:`_measures_nothing`)
  has ``H_g`` reset to ``I``, counted as a skipped update."""
  s_new, y_new = (x.astype(ls.s.dtype) for x in pair)
  pair_ok = _nonfinite.tree_all_finite((s_new, y_new)) & take
  # A skipped first step leaves H_g at I (the diagonal start is redone).
  start = None if work.start is None else work.start._replace(
      first=work.start.first & take)
  beta = cfg.beta
  s_bar = jnp.where(pair_ok, beta * ls.s + (1.0 - beta) * s_new, ls.s)
  y_bar = jnp.where(pair_ok, beta * ls.y + (1.0 - beta) * y_new, ls.y)
  hy = _h_g_apply(cfg, ls, start, y_bar)
  s_d, y_d, powell, lm = _bfgs.double_damping(s_bar, y_bar, hy, mu1=cfg.mu1,
                                              mu2=cfg.mu2)
  h_g = ls.h_g if start is None else cfg.h_g.start(  # fused into the
      ls.h_g, start.first, start.w)                  # update's pass
  h_g, updated = cfg.h_g.update(
      h_g, s_d, y_d, hy=_h_g_apply(cfg, ls, start, y_d),
      grad_norm=jnp.linalg.norm(tap.output_grad).astype(ls.s.dtype),
      skip_tol=cfg.skip_tol, valid=pair_ok)
  lost = _measures_nothing(motion, s_bar, pair_ok) & take
  h_g = cfg.h_g.reset_where(h_g, lost)
  h_a, updated_a = _update_h_a(cfg, ls, work, first, refresh, take)
  refresh = refresh & take
  new = KBFGSLayerState(
      a=jnp.where(take, _lm.averaged(ls.a, work.a_batch, cfg.beta, first,
                                     refresh),
                  ls.a),
      h_a=h_a, h_g=h_g, s=s_bar, y=y_bar)
  flags = (powell & pair_ok, lm & pair_ok, take & (~updated | lost),
           refresh & ~updated_a)
  return new, flags


def _update_h_a(cfg: _Config, ls: KBFGSLayerState, work: _Work, first,
                refresh, take):
  """``H_a``'s Hessian-action BFGS update, block by block, each with its
  slice of ``abar`` in the pair and the skip rule; ``updated``: no block
  skipped (a block with a zero slice of ``abar`` has no pair: not a
  skip). A skipped step (``take`` false) keeps the state's ``H_a``, also on
  the first step."""
  abar = _blocks.vector(work.abar, ls.a.shape[-1])
  norms = jnp.linalg.norm(abar, axis=-1)
  update = lambda h, s, y, g: _bfgs.bfgs_inverse_update(  # noqa: E731
      h, s, y, grad_norm=g, skip_tol=cfg.skip_tol, valid=refresh & take)

  def updated_h_a(h_a):
    s_a, y_a = _bfgs.hessian_action_pair(
        h_a, _damped_a_action(cfg, ls, work, first, refresh), abar,
        matvec=_blocks.matvec)
    new, updated = jax.vmap(update)(h_a, s_a, y_a, norms)
    return jnp.where(take, new, ls.h_a), updated

  h_a, updated = _with_h_a(cfg, ls, work, updated_h_a)
  return h_a, jnp.all(updated | (norms == 0))


def _counts(flags: dict, num: int) -> tuple:
  """Per-layer int32 vectors of the four flags, from ``{row: flags}`` of the
  tapped layers (False for the other rows)."""
  false = (jnp.asarray(False),) * 4
  rows = [flags.get(r, false) for r in range(num)]
  if not rows:
    return (jnp.zeros((0,), jnp.int32),) * 4
  return tuple(jnp.stack([row[i] for row in rows]).astype(jnp.int32)
               for i in range(4))


def _check_precondition_dtype(dtype) -> None:
  if dtype is None:
    return
  try:
    valid = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
  except TypeError:
    valid = False
  if not valid:
    raise ValueError(
        f"{_NAME}: precondition_dtype must be a floating dtype (jnp.bfloat16, "
        f"jnp.float32, ...) or None (automatic), got {dtype!r}.")


def _h_g_init(h_g_init: str) -> bool:
  """Whether ``H_g`` starts from the diagonal (the default)."""
  _checks.check_one_of(h_g_init, "h_g_init", H_G_INITS, transform=_NAME)
  return h_g_init == "diagonal"


def _check_args(learning_rate, damping, mu1, mu2, momentum, stat_decay,
                weight_decay, max_relative_change, memory_size, pair,
                step_rule, max_step_scale, input_factor_interval,
                step_size_interval, row_strides) -> None:
  """Clear errors for bad hyperparameters. Values injected by
  :func:`optax.inject_hyperparams` arrive traced and are not checked."""
  lr_value = None if callable(learning_rate) else _checks.concrete_float(
      learning_rate)
  if lr_value is not None and lr_value < 0:
    raise ValueError(f"{_NAME}: learning_rate must be >= 0, got "
                     f"{learning_rate}. kbfgs returns the descent step "
                     "-lr * H_a M H_g itself: pass a positive rate.")
  damping_value = _checks.concrete_float(damping)
  if damping_value is not None and not damping_value > 0:
    raise ValueError(f"{_NAME}: damping must be > 0 (A is damped by "
                     f"sqrt(damping) I), got {damping}.")
  if mu2 is None and damping_value is not None and damping_value >= 1:
    raise ValueError(
        f"{_NAME}: damping={damping} gives mu2 = sqrt(damping) >= 1; pass "
        "mu2 in (0, 1) explicitly for damping >= 1.")
  for name, value in (("mu2", mu2), ("mu1", mu1)):
    number = _checks.concrete_float(value)
    if number is not None and not 0 < number < 1:
      raise ValueError(f"{_NAME}: {name} must lie in (0, 1), got {value}.")
  for name, value in (("momentum", momentum), ("stat_decay", stat_decay)):
    _checks.check_decay(value, name, transform=_NAME)
  weight_decay_value = _checks.concrete_float(weight_decay)
  if weight_decay_value is not None and weight_decay_value < 0:
    raise ValueError(f"{_NAME}: weight_decay must be >= 0, got "
                     f"{weight_decay}.")
  if max_relative_change is not None:
    _checks.check_non_negative(
        max_relative_change, "max_relative_change", transform=_NAME,
        why="It bounds each layer's step relative to its norm; pass None to "
        "remove the bound.")
  _check_memory_size(memory_size)
  _checks.check_one_of(pair, "pair", PAIRS, transform=_NAME)
  _checks.check_one_of(step_rule, "step_rule", STEP_RULES, transform=_NAME)
  _checks.check_non_negative(
      max_step_scale, "max_step_scale", transform=_NAME,
      why="It caps the per-layer multiple t_l of the trial step.")
  for name, value in (("input_factor_interval", input_factor_interval),
                      ("step_size_interval", step_size_interval)):
    interval = _checks.concrete_int(value)
    if interval is not None and (
        isinstance(value, bool) or interval != value or interval < 1):
      raise ValueError(f"{_NAME}: {name} must be an integer >= 1, got "
                       f"{value!r}.")
  for name, value in row_strides.items():
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(
          f"{_NAME}: {name} must be a Python int >= 1 (it sets the shapes "
          f"of the sampled rows; under optax.inject_hyperparams list it in "
          f"static_args), got {value!r}.")


#: Automatic row strides (``None``): ``A`` from every 4th row, ``q_l``'s
#: gradients from every 14th, on calls with at least ``AUTO_MIN_ROWS`` rows,
#: each stride lowered to keep ``AUTO_MIN_SAMPLE`` rows in the sample
#: (and raised to be coprime with the rows per example, _row_samples).
AUTO_INPUT_FACTOR_ROW_STRIDE = 4
AUTO_STEP_SIZE_ROW_STRIDE = 14
AUTO_MIN_ROWS = 256
AUTO_MIN_SAMPLE = 64


def _sampling(given: Optional[int], auto: int) -> _row_samples.Sampling:
  """A given stride applies to every call; the automatic one to calls of at
  least ``AUTO_MIN_ROWS`` rows, lowered to keep ``AUTO_MIN_SAMPLE`` rows."""
  if given is None:
    return _row_samples.Sampling(auto, AUTO_MIN_ROWS, AUTO_MIN_SAMPLE)
  return _row_samples.Sampling(given)


#: ``A``'s automatic row sampling (``input_factor_row_stride=None``), shared
#: with :mod:`optax_layerwise._input_factor`.
AUTO_INPUT_FACTOR_ROWS = _sampling(None, AUTO_INPUT_FACTOR_ROW_STRIDE)


def _check_memory_size(memory_size) -> None:
  if memory_size is None:
    return
  if _checks.concrete_int(memory_size) is None:
    raise ValueError(
        f"{_NAME}: memory_size sets the shape of the L-BFGS state and must be "
        "a Python int. With optax.inject_hyperparams, pass "
        "static_args=('memory_size',).")
  if (isinstance(memory_size, bool) or int(memory_size) != memory_size
      or memory_size < 1):
    raise ValueError(f"{_NAME}: memory_size must be None (K-BFGS) or an "
                     f"integer >= 1 (K-BFGS(L)), got {memory_size!r}.")


def _sqrt(value):
  number = _checks.concrete_float(value)
  return jnp.sqrt(value) if number is None else math.sqrt(number)


def _init_layer(spec: Spec, kernel, h_g_factor,
                block_size) -> KBFGSLayerState:
  dtype = _layers.stats_dtype(kernel.dtype)
  eye = _blocks.identity(spec.k, block_size, dtype)
  return KBFGSLayerState(
      a=jnp.zeros_like(eye), h_a=eye,
      h_g=h_g_factor.init(spec.d_out, dtype),
      s=jnp.zeros((spec.d_out,), dtype), y=jnp.zeros((spec.d_out,), dtype))


def _block_size(block_size):
  """``block_size`` checked, as a Python int (``"auto"``: ``BLOCK_SIZE``,
  a string so that optax.inject_hyperparams leaves it static; an injected
  int arrives as an array); a traced one is kept (only ``init`` needs it)."""
  if isinstance(block_size, str) and block_size == "auto":
    return BLOCK_SIZE
  if isinstance(block_size, jax.core.Tracer):
    return block_size
  if isinstance(block_size, (jax.Array, np.ndarray, np.generic)) and (
      jnp.ndim(block_size) == 0
      and jnp.issubdtype(jnp.result_type(block_size), jnp.integer)):
    block_size = int(block_size)
  _blocks.check_block_size(block_size, _NAME)
  return block_size


def _init(cfg: _Config, params) -> KBFGSState:
  _layers.check_params(params, transform=_NAME)
  if not (cfg.block_size is None or isinstance(cfg.block_size, int)):
    raise ValueError(
        f"{_NAME}: block_size sets the shapes of the state and must be a "
        "Python int or None at init. With optax.inject_hyperparams, pass "
        "static_args=('block_size',).")
  leaves, treedef = jax.tree_util.tree_flatten(params)
  specs = _layer_kinds.find_kernels(params, cfg.select)
  num = len(specs)
  # Distinct buffers everywhere, so the state can be donated to jax.jit.
  counts = lambda: jnp.zeros((num,), jnp.int32)
  stats = lambda: jnp.zeros((num,), _layers.tree_stats_dtype(params))
  return KBFGSState(
      count=jnp.zeros([], jnp.int32),
      momentum=jax.tree_util.tree_unflatten(treedef, [
          jnp.zeros(jnp.shape(x), _layers.stats_dtype(x.dtype))
          for x in leaves]),
      layers=tuple(_init_layer(s, leaves[s.kernel_index], cfg.h_g,
                               cfg.block_size) for s in specs),
      preconditioned=jax.tree_util.tree_unflatten(
          treedef, [jnp.zeros([], bool) for _ in leaves]),
      num_powell=counts(), num_lm=counts(), num_skipped_h_g=counts(),
      num_skipped_h_a=counts(), num_skipped=jnp.zeros([], jnp.int32),
      step_sizes=stats() + 1.0, decreases=stats(), curvatures=stats(),
      num_accepted=counts(), num_fallbacks=counts())


def _update(cfg: _Config, updates, state: KBFGSState, params, value_fn):
  """One K-BFGS step: the orchestration of the phases above."""
  value_fn = _checks.checked_value_fn(
      _checks.require_value_fn(value_fn, transform=_NAME), _NAME)
  _layers.check_params(params, transform=_NAME)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  grad_leaves = _layers.flatten_like(
      updates, treedef, f"{_NAME}: the updates (gradients)")
  specs = _layer_kinds.find_kernels(params, cfg.select)
  if len(specs) != len(state.layers):
    raise ValueError(f"{_NAME}: the params have {len(specs)} layers with "
                     f"factors but the state was built for "
                     f"{len(state.layers)}; re-run init.")
  # 1. Tapped pass at theta; A and H_a refreshed every input_factor_interval.
  refresh, first = cfg.refresh(state.count), state.count == 0
  taps = _tap(cfg, value_fn, params, specs, second_moment=refresh,
              squares=True)
  tapped = _tapped_layers(specs, taps)
  rows = [r for r, spec in enumerate(specs) if spec in tapped]
  finite = (_nonfinite.tree_all_finite(grad_leaves)
            & _statistics_finite(taps))
  # 2-3. Momentum, and the trial step: preconditioned, or -lr M elsewhere.
  lr = cfg.lr(state.count)
  new_mom = _momentum(cfg, grad_leaves, leaves,
                      jax.tree_util.tree_leaves(state.momentum))
  trial = [(-lr * m).astype(m.dtype) for m in new_mom]
  work, limits = {}, {}
  for r in rows:
    spec, ls = specs[r], state.layers[r]
    work[r] = _input_factor(cfg, spec, ls, _layer_tap(taps, spec), first)
    step, limits[r] = _trial_step(cfg, spec, ls, work[r], new_mom, leaves,
                                  lr)
    _lm.set_matrix(trial, spec, step)
  out = [d.astype(p.dtype) for d, p in zip(trial, leaves)]
  # 4. The pair (zero for a zero step, which has none in exact arithmetic:
  # the recomputed pass may differ by round-off, and BFGS would take it).
  measure = cfg.measure(state.count)
  pairs, grad_change = _measure_pair(
      cfg, value_fn, params, jax.tree_util.tree_unflatten(treedef, out),
      tapped, taps, measure)
  zero_step = ~jnp.any(jnp.stack([jnp.max(jnp.abs(u), initial=0) > 0
                                   for u in out]))
  pairs = {i: tuple(jnp.where(zero_step, jnp.zeros_like(v), v) for v in sy)
           for i, sy in pairs.items()}
  # 5. The per-layer step (ours): t_l times the trial step.
  scales = (state.step_sizes, state.decreases, state.curvatures,
            jnp.zeros(state.step_sizes.shape, bool))
  if cfg.layerwise and rows:
    scales = _layer_steps(cfg, state, rows, specs,
                          jax.tree_util.tree_leaves(taps.grads), grad_change,
                          trial, limits, measure)
    for r in rows:
      for i in _lm.layer_indices(specs[r]):
        _lm.set_part(out, i, specs[r],
                     scales[0][r] * _lm.part(trial, i, specs[r]))
  # The step in the params' dtypes, after the per-layer scaling (t_l * inf
  # and 0 * inf are not finite either).
  finite = finite & _nonfinite.tree_all_finite(out)
  # 6-7. Damping and the factor updates; a non-finite step skips it all.
  new_layers, flags = list(state.layers), {}
  for r in rows:
    new_layers[r], flags[r] = _update_factors(
        cfg, state.layers[r], work[r], _layer_tap(taps, specs[r]),
        pairs[_key(specs[r])], first, refresh, finite,
        _step_motion(out, leaves, specs[r]))
  new_state = _next_state(
      cfg, state, finite, new_mom=new_mom, treedef=treedef,
      layers=tuple(new_layers), flags=_counts(flags, len(specs)),
      scales=scales, measure=measure, rows=rows,
      preconditioned=_preconditioned(treedef, len(leaves), tapped))
  new_updates = jax.tree_util.tree_unflatten(
      treedef, [jnp.where(finite, u, jnp.zeros_like(u)) for u in out])
  return new_updates, new_state


def _statistics_finite(taps: _taps.TapResult) -> jax.Array:
  """The loss and the tapped statistics are finite. A second moment is
  checked on its diagonal: by Cauchy-Schwarz an entry of ``mean a a^T`` is
  bounded by its row's and column's diagonal entries, and a NaN input makes
  its diagonal entry NaN (``O(d)`` instead of a pass over ``(d, d)``)."""
  parts = [taps.loss]
  for tap in taps.layers.values():
    parts += [tap.input_mean, tap.output_mean, tap.output_grad]
    if tap.input_second_moment is not None:
      parts.append(jnp.diagonal(tap.input_second_moment, axis1=-2, axis2=-1))
  return _nonfinite.tree_all_finite(parts)


def _next_state(cfg: _Config, state: KBFGSState, take, *, new_mom, treedef,
                layers, flags, scales, measure, rows, preconditioned):
  """The state after a step: the new one when ``take``, else the old one
  with ``num_skipped`` incremented (the factors are selected inside their
  updates, :func:`_update_factors`)."""
  keep = lambda new, old: jax.tree_util.tree_map(
      lambda a, b: jnp.where(take, a, b), new, old)
  powell, lm, skipped, skipped_a = flags
  step_sizes, decreases, curvatures, measured = scales
  measured = measured & take
  num = state.step_sizes.shape[0]
  has_work = jnp.asarray([r in rows for r in range(num)], bool)
  fallbacks = has_work & measure & ~measured & take
  return state._replace(
      count=state.count + take.astype(state.count.dtype),
      momentum=keep(jax.tree_util.tree_unflatten(treedef, new_mom),
                    state.momentum),
      layers=layers, preconditioned=preconditioned,
      num_powell=state.num_powell + powell,
      num_lm=state.num_lm + lm,
      num_skipped_h_g=state.num_skipped_h_g + skipped,
      num_skipped_h_a=state.num_skipped_h_a + skipped_a,
      num_skipped=state.num_skipped + (~take).astype(jnp.int32),
      step_sizes=keep(step_sizes, state.step_sizes),
      decreases=keep(decreases, state.decreases),
      curvatures=keep(curvatures, state.curvatures),
      num_accepted=state.num_accepted + measured.astype(jnp.int32),
      num_fallbacks=state.num_fallbacks + (
          fallbacks.astype(jnp.int32) if cfg.layerwise else 0))


def kbfgs(
    learning_rate: ScalarOrSchedule = 0.3,
    *,
    damping: float = 0.3,
    momentum: float = 0.9,
    weight_decay: float = 1e-5,
    stat_decay: float = 0.9,
    memory_size: Optional[int] = None,
    pair: str = "secant",
    mu1: float = _bfgs.POWELL_MU1,
    mu2: Optional[float] = None,
    skip_tol: float = _bfgs.SKIP_TOL,
    lbfgs_gamma: Union[float, str] = 1.0,
    h_g_init: str = "diagonal",
    max_relative_change: Optional[float] = 0.05,
    step_rule: str = "layerwise",
    max_step_scale: float = 10.0,
    input_factor_interval: int = 1,
    step_size_interval: int = 1,
    input_factor_row_stride: Optional[int] = None,
    step_size_row_stride: Optional[int] = None,
    block_size: Union[int, str, None] = "auto",
    precondition_dtype: Optional[Any] = None,
    dense_layers: Optional[Callable[[tuple, Any], bool]] = None,
    axis_name: Optional[_parallel.AxisName] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""K-BFGS / K-BFGS(L): Kronecker-factored BFGS for dense and conv layers.

  Goldfarb, Ren and Bahamou, "Practical Quasi-Newton Methods for Training
  Deep Neural Networks", NeurIPS 2020, arXiv 2006.08877 (docs/kbfgs.md,
  "Algorithm"). Each layer ``h = a @ W + b`` (``W`` the kernel as a
  ``(d_in, d_out)`` matrix) moves by
  ``delta = -lr * H_a M H_g``, ``M`` being the momentum of ``grad + tau *
  theta`` for ``[W; b]``, ``H_a ~ (A + sqrt(lambda) I)^-1`` and ``H_g`` a BFGS
  (or, with ``memory_size=p``, L-BFGS) approximation of the inverse
  pre-activation Hessian, damped by Powell + Levenberg-Marquardt "double
  damping". Other leaves move by ``-lr * M``.

  This is a complete optimizer, meant as the **last** stage of a chain: its
  secant pair is measured at ``theta + delta`` with the very step it returns,
  so nothing may rescale its output (transforms of the gradient before it,
  such as :func:`optax.clip_by_global_norm`, are fine). It needs the params
  and the mini-batch loss ``value_fn``::

      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params,
                                     value_fn=lambda p: loss_fn(p, batch))
      params = optax.apply_updates(params, updates)

  ``value_fn`` is re-run with its layers tapped (Flax linen ``nn.Dense``,
  ``nn.DenseGeneral``, ``nn.Einsum``, ``nn.Conv``; Flax NNX ``nnx.Linear``,
  ``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.Conv``;
  :func:`optax_layerwise.dense` in plain JAX), once at ``theta`` and once at
  ``theta + delta``. Put the gradient computation and ``tx.update`` in the
  same ``jax.jit``: XLA then shares the forward and backward pass of the tap
  at ``theta`` with the gradient's (so K-BFGS costs one extra
  forward-backward pass, the second one, plus its matrix products).

  Args:
    learning_rate: ``lr``, a scalar or an Optax schedule of the step count.
    damping: ``lambda``; ``A`` is damped by ``sqrt(lambda) I`` and
      Levenberg-Marquardt damping uses ``mu2 = sqrt(lambda)``.
    momentum: momentum ``mu`` of the gradient.
    weight_decay: L2 coefficient ``tau`` added to the gradient (``g + tau
      theta``, all leaves).
    stat_decay: ``beta``, decay of the moving averages of ``A``, ``s``, ``y``.
    memory_size: ``None`` for K-BFGS (dense ``H_g``); an integer ``p >= 1``
      for K-BFGS(L) (the last ``p`` pairs; the paper uses 100). It sets
      the state's shape: under :func:`optax.inject_hyperparams` list it in
      ``static_args`` when given (every other numeric argument may be
      injected).
    pair: ``"secant"`` (the paper: a second pass on the same mini-batch at
      ``theta + delta``) or ``"tangent"`` (ours: the directional derivatives
      of ``mean h`` and ``mean gh`` along ``delta``, one ``jax.jvp``;
      independent of the step length, about twice the cost).
    mu1: Powell damping threshold (0.2).
    mu2: Levenberg-Marquardt threshold, ``sqrt(damping)`` by default; must lie
      in ``(0, 1)``.
    skip_tol: tolerance of the BFGS skip rule (1e-4).
    lbfgs_gamma: the scale of K-BFGS(L)'s initial matrix ``gamma W`` (1),
      or ``"scaled"`` for ``gamma = s^T y / y^T W y`` of the newest pair
      (Nocedal and Wright, eq. (7.20); docs/kbfgs.md says when it helps);
      ``W`` is ``h_g_init``'s matrix.
    h_g_init: ``H_g``'s first value. ``"diagonal"`` (ours, the default):
      ``diag(1 / (D + 0.1))`` with ``D`` the first mini-batch's ``mean_i
      gh_i * gh_i`` per output unit (the diagonal of the Gauss-Newton factor
      ``H_g`` approximates the inverse of), normalised to mean 1 and taken
      from the rows ``A``'s second moment is; K-BFGS(L) uses it as its
      initial matrix ``lbfgs_gamma * diag(w)`` (Byrd, Nocedal and Schnabel
      1994, eq. (2.17)). Layers called inside ``nn.scan`` / ``nn.RNN`` /
      ``nn.remat`` start from ``I``. On Fashion-MNIST it cut the epochs to
      tuned Adam's loss from 1.17-1.23 to 1.13-1.15 for K-BFGS, and for
      K-BFGS(L) from 1.17-1.24 to 1.12-1.15 (Glorot: 1.31-1.42 to
      1.19-1.32; three seeds each; docs/kbfgs.md, "The first H_g").
      ``"identity"``: the paper's ``I`` (``lbfgs_gamma * I``). Resets of
      ``H_g`` go to ``I`` either way.
    max_relative_change: bounds each dense layer's step (ours, not the
      paper's): ``delta_l`` is shortened to ``||delta_l|| <= rho ||[W; b]||``
      (default ``rho = 0.05``). While ``H_g`` still sits at its initial ``I``
      (the paper's start; the diagonal start sets it per unit),
      the first steps can be far too long for networks initialised with
      larger weights than the authors' (PyTorch's ``U(+-1/sqrt(fan_in))``):
      at lr 0.3 on the CURVES autoencoder, Flax's default LeCun-normal init
      diverged to NaN within 10 steps without it, and trained with it; with
      the authors' init the bound (0.1 then) changed the loss after 80
      steps by 0.1%. On Fashion-MNIST (MNIST autoencoder, five seeds) 0.05
      reached tuned Adam's loss in 1.35 epochs on average against 0.1's
      1.47. ``None`` gives the paper's algorithm exactly. Layers whose params
      are all zero are not bounded.
    step_rule: ``"layerwise"`` (default; ours, docs/kbfgs.md "Per-layer
      step"): each dense layer takes ``t_l`` times the trial step
      ``delta_l = -lr H_a M_l H_g``, with ``t_l = -b_l / q_l`` the minimiser
      of the quadratic model along ``delta_l`` (Bahamou and Goldfarb,
      arXiv 2305.13664), ``b_l = <g, delta>_l`` and the secant curvature
      ``q_l = <delta_l, g(theta + delta) - g(theta)>_l`` from the params
      gradients of the two tapped passes (``pair="tangent"``: the exact
      ``<delta_l, (H delta)_l>``). A rejected measurement (``q_l <= 0``,
      ``b_l >= 0``, non-finite) reuses the last ``t_l``. ``lr`` then sets
      the length of the trial step at which the pair and ``q_l`` are
      measured, and matters much less. ``"fixed"``: the paper's step
      ``delta`` itself.
    max_step_scale: upper clip of an accepted ``t_l`` (10).
    input_factor_interval: refresh the input-side factor (``A`` from the
      tapped inputs' second moment, ``O(n d_in^2)``, and the ``H_a`` update)
      every this many steps (ours; kfac-jax's ``curvature_update_period``
      plays the same role). 1 is the paper.
    step_size_interval: with ``step_rule="layerwise"``, measure ``q_l``
      (hence ``t_l``) every this many steps and reuse the last ``t_l`` in
      between (ours). The off steps skip the weight-gradient products of the
      second pass (under :func:`jax.lax.cond`). 1 (default) measures every
      step. 2 cut the step time by 5 % on the MNIST autoencoder (batch
      1000) at the same loss per epoch, but a reused ``t_l`` can overshoot
      when the step direction turns fast: K-BFGS(L) diverged on one-layer
      Rosenbrock with 2, and K-BFGS on two-layer Rosenbrock with 4
      (docs/kbfgs.md, "Per-layer step").
    input_factor_row_stride: form ``A_batch`` (``O(n d_in^2)``) from every
      this-many-th row of each layer call, scaled to all ``n`` rows (ours;
      :mod:`optax_layerwise._row_samples`); with a bias, ``A_batch``'s
      ``abar`` column is the sampled rows' mean, so it stays positive
      semi-definite. ``None`` (default): 4 on calls of at least
      ``AUTO_MIN_ROWS`` (256) rows, lowered to keep at least
      ``AUTO_MIN_SAMPLE`` (64) rows, all rows on smaller calls; an int:
      that stride on every call (1: all rows, the paper). Calls inside
      ``nn.scan`` / ``nn.RNN`` use all rows. A Python int (it sets shapes):
      under :func:`optax.inject_hyperparams` list it in ``static_args``.
    step_size_row_stride: with ``step_rule="layerwise"`` and the secant
      pair, estimate ``q_l``'s gradients at ``theta`` and ``theta + delta``
      from the same every this-many-th row of each call (ours): the second
      pass then skips its weight-gradient products. ``None`` (default): 14
      on calls of at least 256 rows, lowered to keep at least 64 rows (every
      4th of 256), all rows on smaller calls; 1: both params gradients
      (exact). Either stride is raised on a call to the next one coprime
      with its rows per example (the positions of a sequence or
      image), so that the sample takes every position. Layers called inside
      ``nn.scan`` / ``nn.RNN`` take the params gradients. On the MNIST
      autoencoder (batch 1000) sampling cut the step from 2.75x to 2.37x
      Adam's (strides 2 / 7, fastest round), and 4 / 14 from 2.61x to 2.46x
      (median of 8 rounds), at the same loss per epoch within the spread of
      seeds (docs/kbfgs.md, "Row-sampled statistics"). Under
      ``shard_map`` each device samples its own rows (one device's sample
      when each device's rows are a multiple of the stride); under
      ``jax.jit`` with the batch sharded over an explicit mesh, a call is
      sampled when each shard's rows are a multiple of the stride, else all
      its rows are used. The automatic strides' 256-row threshold and
      64-row floor count each device's rows under ``shard_map``.
    block_size: keep ``A`` and ``H_a`` as their diagonal blocks of at most
      this many inputs (ours; Shampoo's blocking, Anil et al., arXiv
      2002.09018, section 3.4): a layer's ``k`` inputs are cut into ``n =
      ceil(k / block_size)`` consecutive blocks of equal size (the last one
      padded), each block is averaged, inverted on the first step and
      BFGS-updated with its slice of ``abar`` on its own, and the
      off-diagonal blocks are dropped. ``H_a M`` then costs ``k^2 d_out /
      n`` and the ``H_a`` update ``k^2 / n``. ``"auto"`` (default): 1024
      (``BLOCK_SIZE``), a string so that :func:`optax.inject_hyperparams`
      leaves it static; a Python int (it sets the state's shapes: under
      ``inject_hyperparams`` list it in ``static_args``), or ``None``: the
      whole factor (the paper), which is also what any layer with ``k <=
      block_size`` gets. On the Fashion-MNIST autoencoder 512 cut the step
      from 2.39x to 2.32x Adam's but cost about 2 loss units in epoch 1
      (docs/kbfgs.md, "Input factor in blocks").
    precondition_dtype: the dtype the inputs of the products ``H_a M`` and
      ``(H_a M) H_g`` that form the step are cast to, accumulated in the
      factors' dtype (ours). ``None`` (default): bfloat16 for float32
      factors when both are at least ``BF16_MIN_WIDTH`` (128) wide and the
      backend multiplies bfloat16 natively (TPUs, GPUs from Ampere on,
      Linux x86 CPUs listing ``avx512_bf16`` or ``amx_bf16``; decided per
      process from ``jax.default_backend()``), else the factors' own dtype
      (float64 factors, for float64 params under ``jax_enable_x64``, are
      never rounded by default). The statistics and factors stay in their
      dtype; only the step is rounded: on the MNIST autoencoder its layers'
      steps moved by 0.4-7 % (relative norm of the difference) and the loss
      after two epochs by 0.02 %, while the products, a third of K-BFGS's
      extra work, ran ~3x faster on a CPU with bfloat16 matrix units (step
      2.95x -> 2.70x Adam's, docs/kbfgs.md "Cost"; on TPU JAX's default
      precision for float32 products is one bfloat16 pass) and 1.3-1.7x
      slower on an AVX2 CPU without them. ``jnp.float32``: exact products
      for float32 factors.
    dense_layers: which kernels get Kronecker factors: a predicate ``(path,
      leaf) -> bool | int`` on key paths; an ``int`` (not ``bool``) gives the
      number of contracted leading kernel axes, overriding the guess.
      Default: every kernel (2-D float leaf but biases, or leaf named
      ``kernel`` of higher rank: convolutions, ``DenseGeneral``) whose key
      does not contain ``"embed"``; a sibling ``bias`` (or ``b``) of the
      output axes' shape is its bias. Layer kinds, how kernels are found and
      what falls back: docs/kbfgs.md, "Layer kinds";
      :func:`optax_layerwise.kbfgs_coverage` reports it for a model.
      A callable: under :func:`optax.inject_hyperparams` (which treats
      callables as schedules) list it in ``static_args``.
    axis_name: under ``jax.shard_map`` / ``jax.pmap``, the data-parallel
      axis: ``value_fn`` is then this device's loss, and the tapped
      statistics (``abar``, ``A_batch``, ``mean h``, ``mean gh``, and the
      pair ``s, y``) are averaged over the axis before any nonlinear use, so
      all devices hold identical factors (per dense layer and step,
      ``d_in^2 + d_in + 4 d_out`` numbers in two all-reduces, and the
      per-layer step's ``b_l, q_l`` in a third; see
      ``docs/distributed.md``). The incoming gradient must already be the
      global one. ``None`` (default) under plain ``jax.jit``, sharded or not.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` with state
    :class:`KBFGSState`.

  Raises:
    ValueError: a bad hyperparameter (at construction), or at ``update``:
      no ``value_fn``, no params, no tappable dense layer.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_layerwise as olw
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (32, 4))
    >>> t = jnp.sin(x[:, :1])
    >>> k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    >>> params = {'l1': {'kernel': jax.random.normal(k1, (4, 8)) / 2,
    ...                  'bias': jnp.zeros(8)},
    ...           'l2': {'kernel': jax.random.normal(k2, (8, 1)) / 3}}
    >>> def loss_fn(p):
    ...   h = jnp.tanh(olw.dense(x, p['l1']['kernel'], p['l1']['bias']))
    ...   return jnp.mean((olw.dense(h, p['l2']['kernel']) - t) ** 2)
    >>> tx = olw.kbfgs(0.1)
    >>> state = tx.init(params)
    >>> @jax.jit  # gradient and update in one jit: XLA shares the tap's pass
    ... def step(params, state):
    ...   grads = jax.grad(loss_fn)(params)
    ...   updates, state = tx.update(grads, state, params, value_fn=loss_fn)
    ...   return optax.apply_updates(params, updates), state
    >>> params, state = step(params, state)
    >>> bool(state.preconditioned['l1']['kernel'])
    True
    >>> olw.kbfgs_layer_names(params), state.layers[0].h_a.shape  # d_in + 1
    (("['l1']", "['l2']"), (1, 5, 5))
  """
  _check_args(learning_rate, damping, mu1, mu2, momentum, stat_decay,
              weight_decay, max_relative_change, memory_size, pair, step_rule,
              max_step_scale, input_factor_interval, step_size_interval,
              {"input_factor_row_stride": input_factor_row_stride,
               "step_size_row_stride": step_size_row_stride})
  _check_precondition_dtype(precondition_dtype)
  block_size = _block_size(block_size)
  h_g = _bfgs.DenseInverse() if memory_size is None else _bfgs.LimitedMemory(
      int(memory_size), lbfgs_gamma)
  cfg = _Config(
      learning_rate=learning_rate, sqrt_damping=_sqrt(damping),
      momentum=momentum, weight_decay=weight_decay, beta=stat_decay, mu1=mu1,
      mu2=_sqrt(damping) if mu2 is None else mu2, skip_tol=skip_tol,
      max_relative_change=max_relative_change,
      layerwise=step_rule == "layerwise", max_step_scale=max_step_scale,
      diagonal_h_g=_h_g_init(h_g_init),
      input_factor_interval=input_factor_interval,
      step_size_interval=step_size_interval, block_size=block_size,
      input_factor_rows=_sampling(input_factor_row_stride,
                                  AUTO_INPUT_FACTOR_ROW_STRIDE),
      step_size_rows=_sampling(step_size_row_stride,
                               AUTO_STEP_SIZE_ROW_STRIDE),
      pair=pair, h_g=h_g,
      precondition_dtype=precondition_dtype,
      select=dense_layers, axis_name=axis_name)

  return _checks.value_fn_transformation(cfg, _init, _update)
