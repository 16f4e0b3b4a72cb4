"""Large-batch helpers (Gao and Zhong, arXiv 2012.08795).

The paper improves large-batch generalisation with two data-side methods
next to CBLR: scheduling the batch size and discarding small-loss samples
(docs/curvature_lr.md; the paper's own schedules could not be consulted,
these are the library's):

* :func:`batch_size_schedule`: a host-side function ``step -> batch size``
  (constant, piecewise constant with factors at milestones, or a linear ramp),
  usable with any data pipeline. Batch size is an array shape, so it is a
  Python ``int``; every distinct size compiles the jitted step once, hence
  the ``multiple_of`` rounding.
* :func:`small_loss_weights`: per-example weights that drop the given
  fraction of smallest-loss examples, jit- and vmap-safe with a static output
  shape; non-finite losses are always dropped and counted.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from optax_layerwise import _checks

__all__ = ["batch_size_schedule", "small_loss_weights", "SmallLossWeights"]


def batch_size_schedule(
    init_batch_size: int,
    *,
    boundaries_and_factors: Optional[Mapping[int, float]] = None,
    end_batch_size: Optional[int] = None,
    transition_begin: int = 0,
    transition_steps: Optional[int] = None,
    max_batch_size: Optional[int] = None,
    multiple_of: int = 1,
) -> Callable[[int], int]:
  """Returns ``schedule(step) -> batch size`` (a Python ``int``).

  Three kinds, as Optax's learning-rate schedules:

  * constant: only ``init_batch_size``;
  * milestones (``optax.piecewise_constant_schedule``'s convention): the size
    is multiplied by ``factor`` once ``step >= boundary``, for every
    ``boundary: factor`` in ``boundaries_and_factors``;
  * linear ramp (``optax.linear_schedule``'s convention): from
    ``init_batch_size`` at ``transition_begin`` to ``end_batch_size`` after a
    further ``transition_steps`` steps, then constant.

  The value is rounded to the nearest multiple of ``multiple_of`` (e.g. the
  device count, or a coarse grid so the ramp compiles few shapes), capped at
  ``max_batch_size`` (e.g. the data-set size) and at least ``multiple_of``.

  Args:
    init_batch_size: the batch size at step 0.
    boundaries_and_factors: ``{step: factor}`` milestones.
    end_batch_size: the batch size at the end of a linear ramp.
    transition_begin: the step the ramp starts at.
    transition_steps: the ramp's length in steps.
    max_batch_size: an upper cap.
    multiple_of: round to a multiple of this.

  Returns:
    A function of the step (an ``int`` or a concrete scalar array; not for
    use inside ``jax.jit``, since the batch size is a shape).

  Raises:
    ValueError: both kinds at once, a ramp without its length, or
      non-positive sizes.

  Example:
    >>> import optax_layerwise as olw
    >>> sched = olw.batch_size_schedule(256, boundaries_and_factors={100: 4,
    ...                                                              200: 4})
    >>> [sched(0), sched(100), sched(250)]
    [256, 1024, 4096]
    >>> ramp = olw.batch_size_schedule(256, end_batch_size=4096,
    ...                                transition_steps=100, multiple_of=256)
    >>> [ramp(0), ramp(50), ramp(1000)]
    [256, 2304, 4096]
  """
  if int(init_batch_size) < 1:
    raise ValueError(f"init_batch_size must be >= 1, got {init_batch_size}.")
  if int(multiple_of) < 1:
    raise ValueError(f"multiple_of must be >= 1, got {multiple_of}.")
  ramp = end_batch_size is not None or transition_steps is not None
  if ramp and boundaries_and_factors is not None:
    raise ValueError("Give either `boundaries_and_factors` (milestones) or "
                     "`end_batch_size` and `transition_steps` (a ramp), not "
                     "both.")
  if ramp and (end_batch_size is None or transition_steps is None
               or int(transition_steps) < 1 or int(end_batch_size) < 1):
    raise ValueError("A linear ramp needs `end_batch_size >= 1` and "
                     "`transition_steps >= 1`.")
  milestones = sorted((int(b), float(f)) for b, f in
                      (boundaries_and_factors or {}).items())
  if any(f <= 0 for _, f in milestones):
    raise ValueError("Milestone factors must be > 0.")
  if max_batch_size is not None and int(max_batch_size) < 1:
    raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}.")
  multiple_of = int(multiple_of)

  def schedule(step) -> int:
    step = int(step)
    if ramp:
      frac = min(max(step - int(transition_begin), 0) / int(transition_steps),
                 1.0)
      size = init_batch_size + frac * (end_batch_size - init_batch_size)
    else:
      size = float(init_batch_size)
      for boundary, factor in milestones:
        if step >= boundary:
          size *= factor
    size = max(multiple_of,
               math.floor(size / multiple_of + 0.5) * multiple_of)  # half up
    if max_batch_size is not None:
      size = min(size, int(max_batch_size))
    return int(size)

  return schedule


class SmallLossWeights(NamedTuple):
  """The result of :func:`small_loss_weights`.

  Attributes:
    weights: ``(n,)`` float32, ``n / num_kept`` on kept examples and 0 on
      dropped ones (all 0 if none is kept), so ``mean(weights * losses)`` is
      the mean loss of the kept examples. No gradient flows through them.
    num_dropped: examples dropped in all (int32): the smallest-loss ones plus
      the non-finite ones.
    num_nonfinite: examples dropped for a NaN or infinite loss (int32). Report
      or act on it: a non-finite loss is never kept, never silently.
  """
  weights: jax.Array
  num_dropped: jax.Array
  num_nonfinite: jax.Array

  def mean(self, losses: jax.Array) -> jax.Array:
    """``mean(weights * losses)`` with dropped entries exactly zero.

    ``0 * nan`` is ``nan``, so a plain ``jnp.mean(weights * losses)`` is NaN
    when a non-finite loss was dropped; this is the safe form. (Its gradient
    can still be NaN if the loss's own backward pass is: ``where`` sends a
    zero cotangent, and ``0 * inf`` is NaN. The library's transforms skip a
    step whose gradient is not finite.)
    """
    kept = self.weights > 0
    return jnp.mean(self.weights * jnp.where(kept, losses, 0))


def small_loss_weights(
    per_example_losses: jax.Array,
    fraction: Union[float, jax.Array],
    *,
    axis_name: Optional[Union[str, tuple]] = None,
) -> SmallLossWeights:
  """Weights that drop the ``fraction`` of examples with the smallest loss.

  Gao and Zhong (2020), arXiv 2012.08795, "discarding small-loss samples"
  (the library's reading): the examples the model already fits well carry
  little signal in a large batch, so the loss to differentiate is the mean
  over the rest.

  Exactly ``k = floor(fraction * n)`` of the finite losses are dropped, the
  ``k`` smallest; ties are broken by position (the earlier example is
  dropped first), so the count is exact. Every non-finite loss (NaN, +-inf) is
  dropped as well and counted in ``num_nonfinite``. ``fraction`` may be a
  traced scalar (e.g. a schedule's value); the output shape is ``(n,)``
  whatever it is. Works under ``jax.jit`` and ``jax.vmap`` (map over a
  leading batch axis of ``per_example_losses``).

  Args:
    per_example_losses: ``(n,)`` losses of one mini-batch.
    fraction: in ``[0, 1]``, the share of examples to drop.
    axis_name: under ``jax.shard_map`` / ``jax.pmap`` with the batch split
      over this axis: ``per_example_losses`` are this device's, the
      selection is made over the global batch (the losses are gathered by
      one all-reduce of the global batch's losses) and this device's slice
      of the global weights is returned, so that the ``pmean`` over the axis
      of ``mean(weights * losses)`` (and of its gradient) is the mean loss of
      the kept examples of the whole batch. The counts are global.

  Returns:
    A :class:`SmallLossWeights` ``(weights, num_dropped, num_nonfinite)``.

  Raises:
    ValueError: the losses are not one-dimensional, or a concrete
      ``fraction`` is outside ``[0, 1]``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_layerwise as olw
    >>> losses = jnp.array([0.1, 2.0, jnp.nan, 0.5, 1.0])
    >>> sel = olw.small_loss_weights(losses, 0.2)   # drops 1 finite loss
    >>> [round(w, 4) for w in sel.weights.tolist()]   # n / num_kept = 5 / 3
    [0.0, 1.6667, 0.0, 1.6667, 1.6667]
    >>> int(sel.num_dropped), int(sel.num_nonfinite)
    (2, 1)
    >>> float(sel.mean(losses))   # (2.0 + 0.5 + 1.0) / 3
    1.1666666269302368
  """
  losses = jnp.asarray(per_example_losses)
  if losses.ndim != 1:
    raise ValueError(
        "small_loss_weights takes the (n,) per-example losses of one batch, "
        f"got shape {losses.shape}; use jax.vmap for a batch of batches.")
  if jnp.ndim(fraction) != 0:
    raise ValueError(f"fraction must be a scalar, got shape "
                     f"{jnp.shape(fraction)}.")
  value = _checks.concrete_float(fraction)  # None if traced: clipped below
  if value is not None and not 0.0 <= value <= 1.0:
    raise ValueError(f"fraction must be in [0, 1], got {fraction}.")
  if axis_name is not None:
    # Gathered by a psum of one-hot slots: its result is replicated (also in
    # shard_map's type system), so the counts are too.
    local_n = losses.shape[0]
    start = jax.lax.axis_index(axis_name) * local_n
    slots = jnp.zeros((jax.lax.axis_size(axis_name) * local_n,), jnp.float32)
    everything = jax.lax.psum(jax.lax.dynamic_update_slice_in_dim(
        slots, jax.lax.stop_gradient(losses).astype(jnp.float32), start, 0),
                              axis_name)
    selection = small_loss_weights(everything, fraction)
    return selection._replace(weights=jax.lax.dynamic_slice_in_dim(
        selection.weights, start, local_n))
  n = losses.shape[0]
  losses = jax.lax.stop_gradient(losses).astype(jnp.float32)
  finite = jnp.isfinite(losses)
  # The 1e-6 absorbs binary round-off (0.29 * 100 = 28.999999999999996).
  num_drop = jnp.clip(jnp.floor(
      jnp.asarray(fraction, jnp.float32) * n + 1e-6), 0, n).astype(jnp.int32)
  # Non-finite losses sort last; a stable sort ranks ties by position.
  order = jnp.argsort(jnp.where(finite, losses, jnp.inf), stable=True)
  rank = jnp.zeros((n,), jnp.int32).at[order].set(
      jnp.arange(n, dtype=jnp.int32))
  kept = finite & (rank >= num_drop)
  num_kept = jnp.sum(kept, dtype=jnp.int32)
  weights = jnp.where(kept, n / jnp.maximum(num_kept, 1).astype(jnp.float32),
                      0.0).astype(jnp.float32)
  num_nonfinite = jnp.sum(~finite, dtype=jnp.int32)
  return SmallLossWeights(weights, jnp.int32(n) - num_kept, num_nonfinite)

