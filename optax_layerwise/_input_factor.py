"""Input-side Kronecker preconditioning: K-BFGS's ``H_a`` on its own.

K-BFGS (Goldfarb, Ren and Bahamou, arXiv 2006.08877, section 3) preconditions
a layer ``h = a @ W + b`` by ``H_a M H_g``. :func:`precondition_by_inputs`
keeps the input side only (docs/step_sizes.md, "Input-side
preconditioning")::

    A   <- beta A + (1 - beta) mean_i abar_i abar_i^T,   abar_i = [a_i; 1]
    H_a  = (A + sqrt(damping) I)^{-1}
    u_l <- H_a [U_W; U_b]                  (the layer's updates as a matrix)

``A`` is K-FAC's input factor (Martens and Grosse, arXiv 1503.05671) and the
damping is K-BFGS's Levenberg-Marquardt ``sqrt(lambda)``; ``A`` and ``H_a``
are refreshed every ``update_interval`` steps from one tapped pass
(:mod:`optax_layerwise._taps`, no weight-gradient products; ``A`` from
every 4th row of large calls, as K-BFGS forms it). ``A`` is kept as its
diagonal blocks of at most ``block_size`` (256) inputs
(:mod:`optax_layerwise._blocks`), so the per-step cost is one
``(n, s, s)`` by ``(n, s, d_out)`` batched product per layer, ``n s ~ k``
(bfloat16 inputs where K-BFGS takes them). The output side is left to a
per-layer scalar: under
:func:`optax_layerwise.scale_by_layerwise_step_size` (the aliases'
``precondition="inputs"``) that scalar is the step ``alpha_l`` measured
along the preconditioned direction.

Leaves of layers the tap does not see (norm scales, embeddings, layers of
unsupported kinds) pass through unchanged. A refresh whose statistics or
incoming updates are not finite keeps the last factors and is counted in
``num_skipped_refreshes``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_layerwise import _blocks
from optax_layerwise import _checks
from optax_layerwise import _coverage
from optax_layerwise import _kbfgs
from optax_layerwise import _layer_kinds
from optax_layerwise import _layer_matrices as _lm
from optax_layerwise import _layers
from optax_layerwise import _nonfinite
from optax_layerwise import _parallel
from optax_layerwise import _taps

__all__ = ["PreconditionByInputsState", "precondition_by_inputs"]

_NAME = "precondition_by_inputs"
#: ``A`` from every 4th row of calls with at least 256 rows, at least 64
#: rows kept: K-BFGS's automatic sampling (``input_factor_row_stride=None``).
ROWS = _kbfgs.AUTO_INPUT_FACTOR_ROWS
#: ``A`` kept as diagonal blocks of at most 256 inputs (docs/step_sizes.md,
#: "Input-side preconditioning"): on the Fashion-MNIST autoencoder the same
#: losses as the whole ``A`` (228.1 against 228.2 after 2 epochs), 128 a
#: little behind (229.9); the 785- and 1001-input layers cost a quarter.
BLOCK_SIZE = 256
#: ``A`` and ``H_a`` refreshed every 20 steps (one tapped pass and a Cholesky
#: inverse per block). Every 40 (with the aliases' step-size measurement)
#: cut the step from about 1.53x to 1.46x AdamW's, but took 2.85 epochs to
#: tuned Adam's Fashion-MNIST loss instead of 2.61: more wall time
#: (docs/step_sizes.md, "Input-side preconditioning").
UPDATE_INTERVAL = 20
#: ``lambda``: ``sqrt(lambda) I`` is added to ``A`` (K-BFGS's default).
DAMPING = 0.3
#: ``beta`` of ``A``'s moving average, per refresh.
STAT_DECAY = 0.8


class PreconditionByInputsState(NamedTuple):
  """State of :func:`precondition_by_inputs`; all shapes are fixed.

  Attributes:
    count: steps taken (int32); ``A`` is refreshed when ``count %
      update_interval == 0``.
    factors: per layer (find order of
      :func:`optax_layerwise.kbfgs_layer_names`), the running ``A``'s
      diagonal blocks, ``(n, s, s)`` (``(1, k, k)`` unblocked), ``k = d_in +
      1`` with a bias; float32 (float64 for float64 params).
    inverses: per layer, the blocks of ``H_a = (A + sqrt(damping) I)^{-1}``
      in the product's input dtype (bfloat16 where K-BFGS multiplies in it,
      else ``A``'s); ``I`` until the first refresh that tapped the layer.
    num_skipped_refreshes: refreshes whose statistics or incoming updates
      were not finite (the factors were kept), int32.
  """
  # Kept finite here (see above), so a skipping alias neither checks nor
  # restores them (:func:`optax_layerwise._nonfinite.skip_non_finite_step`).
  GUARDED_FIELDS = ("factors", "inverses")

  count: jax.Array
  factors: tuple
  inverses: tuple
  num_skipped_refreshes: jax.Array


@dataclasses.dataclass(frozen=True)
class _Config:
  sqrt_damping: Any
  stat_decay: Any
  update_interval: Any
  block_size: Optional[int]
  select: Any
  axis_name: Optional[_parallel.AxisName]
  require_layer: bool = True  # False: no tapped layer passes all through
  name: str = _NAME  # the transform named in errors


def _product_dtype(spec, factor_dtype):
  return _lm.precondition_dtype(None, spec, factor_dtype)


def _init(cfg: _Config, params) -> PreconditionByInputsState:
  _layers.check_params(params, transform=cfg.name)
  leaves = jax.tree_util.tree_leaves(params)
  specs = _layer_kinds.find_kernels(params, cfg.select)
  dtypes = [_layers.stats_dtype(leaves[s.kernel_index].dtype) for s in specs]
  return PreconditionByInputsState(
      count=jnp.zeros([], jnp.int32),
      factors=tuple(_blocks.identity(s.k, cfg.block_size, d)
                    for s, d in zip(specs, dtypes)),
      inverses=tuple(_blocks.identity(s.k, cfg.block_size,
                                      _product_dtype(s, d))
                     for s, d in zip(specs, dtypes)),
      num_skipped_refreshes=jnp.zeros([], jnp.int32))


def _refreshed(cfg: _Config, value_fn, params, specs, state, updates):
  """``(factors, inverses, finite)`` from one tapped pass at ``params``;
  ``finite`` also needs finite incoming ``updates`` (a skipped step)."""
  taps = _taps.tap_dense_layers(
      value_fn, params, kernels={s.kernel_index: s.d_out for s in specs},
      second_moment=True, with_grads=False, axis_name=cfg.axis_name,
      second_moment_stride=ROWS)
  first = state.count == 0
  factors, inverses = [], []
  finite = _nonfinite.tree_all_finite(updates)
  for spec, old, old_inverse in zip(specs, state.factors, state.inverses):
    tap = _lm.layer_tap(taps, spec, cfg.name)
    if tap is None:  # not tapped: its factors are kept (I from init)
      factors.append(old)
      inverses.append(old_inverse)
      continue
    batch = _blocks.diagonal_blocks(
        _lm.homogeneous(spec, tap)[1].astype(old.dtype), cfg.block_size)
    a = _lm.averaged(old, batch, cfg.stat_decay, first)
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    factors.append(a)
    inverse = _blocks.spd_inverse(a + cfg.sqrt_damping * eye)
    finite = finite & _nonfinite.tree_all_finite((a, inverse))
    inverses.append(inverse.astype(old_inverse.dtype))
  return tuple(factors), tuple(inverses), finite


def _factors(cfg: _Config, value_fn, params, specs, state, updates) -> tuple:
  """``(factors, inverses, num_skipped_refreshes)``: refreshed every
  ``update_interval`` steps (under :func:`jax.lax.cond`), else kept."""
  def refresh(_):
    factors, inverses, finite = _refreshed(cfg, value_fn, params, specs,
                                           state, updates)
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    return (jax.tree_util.tree_map(keep, factors, state.factors),
            jax.tree_util.tree_map(keep, inverses, state.inverses),
            state.num_skipped_refreshes + (~finite).astype(jnp.int32))

  def keep(_):
    return state.factors, state.inverses, state.num_skipped_refreshes

  return jax.lax.cond(state.count % cfg.update_interval == 0, refresh, keep,
                      None)


def _precondition(updates, specs, factors, inverses, tapped):
  """``H_a [U_W; U_b]`` for every tapped layer (``H_a``'s dtype for the
  inputs, ``A``'s for the accumulation and the result); other leaves
  unchanged (not multiplied by their ``I``, which may round to bfloat16)."""
  leaves, treedef = jax.tree_util.tree_flatten(updates)
  out = list(leaves)
  for spec, a, h_a in zip(specs, factors, inverses):
    if spec.kernel_index not in tapped:
      continue
    _lm.set_matrix(out, spec, _blocks.multiply(
        h_a, _lm.matrix(leaves, spec), a.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def _tapped_kernels(value_fn, params, select, *, strict: bool,
                    name: str) -> tuple:
  """``(specs, kernel indices a tapped pass sees)``, known while tracing
  (:func:`jax.eval_shape`). ``strict``: no tapped layer raises, and so does
  a call the tap cannot read; else that call leaves every layer
  unpreconditioned, with a warning."""
  specs = _layer_kinds.find_kernels(params, select)
  try:
    traced = _coverage.traced_taps(value_fn, params, specs)
  except _taps.UntappableLayer as err:
    if strict:
      raise
    warnings.warn(
        f"{name}: precondition='auto' preconditions no layer of this "
        f"model: {err} Pass precondition=None to silence this warning.",
        stacklevel=2)
    return specs, frozenset()
  if not traced.layers and strict:
    raise _taps.no_tappable_layer_error(name, traced.num_untapped_calls)
  return specs, frozenset(traced.layers)


def tapped_leaves(value_fn, params) -> frozenset:
  """Flatten-order indices of the kernels and biases that
  :func:`precondition_where_tapped` multiplies by ``H_a`` (empty where it
  preconditions nothing): the aliases' per-layer bound reads them."""
  with warnings.catch_warnings():  # warned once, by the preconditioner
    warnings.simplefilter("ignore")
    specs, tapped = _tapped_kernels(value_fn, params, None, strict=False,
                                    name=_NAME)
  return frozenset(
      index for s in specs if s.kernel_index in tapped
      for index in (s.kernel_index, s.bias_index) if index is not None)


def _update(cfg: _Config, updates, state, params, value_fn):
  value_fn = _checks.checked_value_fn(
      _checks.require_value_fn(value_fn, transform=cfg.name), cfg.name)
  _layers.check_params(params, transform=cfg.name)
  specs, tapped = _tapped_kernels(value_fn, params, cfg.select,
                                  strict=cfg.require_layer, name=cfg.name)
  if len(specs) != len(state.factors):
    raise ValueError(
        f"{cfg.name}: the params have {len(specs)} layers but the state was "
        f"initialised for {len(state.factors)}; call init with these params.")
  if not tapped:
    return updates, state._replace(count=state.count + 1)
  factors, inverses, num_skipped = _factors(cfg, value_fn, params, specs,
                                            state, updates)
  new_state = PreconditionByInputsState(
      count=state.count + 1, factors=factors, inverses=inverses,
      num_skipped_refreshes=num_skipped)
  return (_precondition(updates, specs, factors, inverses, tapped),
          new_state)


def precondition_by_inputs(
    *,
    damping: float = DAMPING,
    stat_decay: float = STAT_DECAY,
    update_interval: int = UPDATE_INTERVAL,
    block_size: Optional[int] = BLOCK_SIZE,
    dense_layers=None,
    axis_name: Optional[_parallel.AxisName] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Multiplies each layer's updates by its inverse input factor ``H_a``.

  K-BFGS's input side alone (Goldfarb, Ren and Bahamou, arXiv 2006.08877,
  section 3; K-FAC's ``A``, Martens and Grosse, arXiv 1503.05671): for a
  layer ``h = a @ W + b`` the updates' matrix ``[U_W; U_b]`` becomes
  ``(A + sqrt(damping) I)^{-1} [U_W; U_b]``, ``A`` the running mean of
  ``[a; 1] [a; 1]^T`` over the rows of the mini-batch. Layers are found as
  :func:`optax_layerwise.kbfgs` finds them (dense, ``DenseGeneral``,
  einsum, convolution and LSTM kinds, scanned stacks); every other leaf
  passes through. The scale on the output side is left to what follows:
  :func:`optax_layerwise.layerwise_sgd` and
  :func:`optax_layerwise.layerwise_adamw` with ``precondition="inputs"``
  measure a step per layer along the preconditioned direction.

  Args:
    damping: ``lambda``; ``sqrt(lambda) I`` is added to ``A`` before the
      inverse (K-BFGS's Levenberg-Marquardt damping; K-BFGS's default).
    stat_decay: ``beta`` of ``A``'s moving average, per refresh (the first
      refresh takes the mini-batch's ``A`` as is).
    update_interval: refresh ``A`` and ``H_a`` every this many steps (one
      forward and activation-backward pass and one Cholesky per block).
    block_size: keep ``A`` as its diagonal blocks of at most this size
      (``k`` cut into equal consecutive blocks, Shampoo's blocking, arXiv
      2002.09018): a layer with ``k`` inputs costs ``k s`` instead of
      ``k^2`` per output per step. ``None`` keeps the whole ``A``.
    dense_layers: which kernels to precondition, as in
      :func:`optax_layerwise.kbfgs`.
    axis_name: under ``jax.shard_map`` / ``jax.pmap``, the data-parallel
      axis over which ``A`` is averaged; ``None`` under ``jax.jit``.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` whose ``update`` needs
    ``params`` and the keyword argument ``value_fn`` (the mini-batch loss).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_layerwise as olw
    >>> x = jnp.array([[1.0, 0.0], [1.0, 2.0]])
    >>> params = {'l': {'kernel': jnp.ones((2, 1)), 'bias': jnp.zeros(1)}}
    >>> loss = lambda p: jnp.mean(olw.dense(x, p['l']['kernel'],
    ...                                     p['l']['bias']) ** 2)
    >>> tx = olw.precondition_by_inputs(damping=1.0)
    >>> state = tx.init(params)
    >>> u, state = tx.update(jax.grad(loss)(params), state, params,
    ...                      value_fn=loss)
    >>> state.factors[0][0]  # mean of [a; 1] [a; 1]^T, one block
    Array([[1., 1., 1.],
           [1., 2., 1.],
           [1., 1., 1.]], dtype=float32)
  """
  return _checks.value_fn_transformation(
      _checked_config(damping, stat_decay, update_interval, block_size,
                      dense_layers, axis_name), _init, _update)


def precondition_where_tapped(axis_name=None, *, transform: str = _NAME):
  """:func:`precondition_by_inputs` with its defaults, except that a model
  with no tapped layer (e.g. plain ``x @ w``) passes through unchanged
  instead of raising: the aliases' ``precondition="auto"``. Errors name
  ``transform``."""
  cfg = _checked_config(DAMPING, STAT_DECAY, UPDATE_INTERVAL, BLOCK_SIZE,
                        None, axis_name)
  return _checks.value_fn_transformation(
      dataclasses.replace(cfg, require_layer=False, name=transform), _init,
      _update)


def _checked_config(damping, stat_decay, update_interval, block_size,
                    dense_layers, axis_name) -> _Config:
  """The :class:`_Config` of the arguments, with clear errors for bad ones."""
  _checks.check_non_negative(
      damping, "damping", transform=_NAME,
      why="sqrt(damping) I keeps A + sqrt(damping) I invertible.")
  if _checks.concrete_float(damping) == 0:
    raise ValueError(
        f"{_NAME}: damping must be > 0: A from a mini-batch with fewer "
        "rows than inputs is singular, and every refresh would fail. Use a "
        "small positive value for little damping.")
  _checks.check_decay(stat_decay, "stat_decay", transform=_NAME,
                      why="0 keeps only the latest mini-batch's A.")
  interval = _checks.concrete_int(update_interval)
  if interval is not None and interval < 1:
    raise ValueError(f"{_NAME}: update_interval must be >= 1, got "
                     f"{update_interval}.")
  _blocks.check_block_size(block_size, _NAME)
  return _Config(sqrt_damping=damping ** 0.5, stat_decay=stat_decay,
                 update_interval=update_interval, block_size=block_size,
                 select=dense_layers, axis_name=axis_name)
