"""The per-layer safeguard pipeline of the layer-wise step sizes and CBLR/MCLR.

Both :func:`optax_layerwise.scale_by_layerwise_step_size` (``alpha_l``) and
:func:`optax_layerwise.scale_by_curvature_lr` (``lr_l``) turn a measured,
per-layer proposal ``raw_l`` (a quotient of curvature statistics) into the
value they apply, through the same steps (docs/step_sizes.md and
docs/curvature_lr.md, "Safeguards"):

1. **measure or reuse** (:func:`is_measured`, :func:`measure_or_reuse`):
   measure every ``update_interval`` steps under ``lax.cond``, so the cost of
   a measurement amortises; reuse the last values in between;
2. **mask** (:func:`usable`): a proposal is usable when it and its curvature
   are finite and the curvature is above a floor;
3. **clip** to ``[lower, upper]``, **smooth** by an exponential moving
   average once the layer has an accepted value, and **fall back** to the
   last accepted value (the initial one before any) where the proposal is
   unusable (:func:`accept`);
4. **bound** the displacement (:func:`bound`): ``min(value_l, limit_l)``;
5. **count** (:func:`counts`): ``num_accepted`` and ``num_fallbacks`` per
   layer; diagnostics keep their last finite value (:func:`keep_finite`).

The transforms differ in a few details, which are arguments here rather than
copies: which steps measure (the step sizes also measure every step of the
first interval while a layer has nothing accepted), what is clipped (the
step sizes clip to ``[0, min(max_step, bound)]`` before smoothing; CBLR clips
to ``[min_lr, max_lr]`` and bounds after) and what a reused step applies (see
the transforms' ``_update``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from optax_layerwise import _layers

PyTree = Any

__all__ = ["checked_layers", "is_measured", "measure_or_reuse", "usable",
           "accept", "bound", "safeguard", "counts", "keep_finite"]


def checked_layers(params: PyTree, updates: PyTree, layers, num_layers: int,
                   *, transform: str) -> _layers.Layers:
  """The layer grouping of ``params``, checked against the updates and state.

  Raises a ``ValueError`` naming ``transform`` when the params are not
  usable, the updates do not have their structure, or the state (built for
  ``num_layers`` layers) belongs to other params.
  """
  _layers.check_params(params, transform=transform)
  partition = _layers.group_layers(params, layers)
  partition.check_structure(updates,
                            f"{transform}: the updates (gradients)")
  if partition.num_layers != num_layers:
    raise ValueError(
        f"{transform}: the params have {partition.num_layers} layers but the "
        f"state was built for {num_layers}; re-run init.")
  return partition


def is_measured(count: jax.Array, update_interval, static_interval,
                num_accepted: Optional[jax.Array] = None) -> jax.Array:
  """Whether this step measures: every ``update_interval`` steps.

  ``static_interval`` is ``update_interval`` when it is a concrete int (1:
  every step, no ``lax.cond``), else ``None``. Given ``num_accepted``, also
  every step of the first interval while a layer has no accepted value (a
  rejected first measurement would otherwise leave it at the initial value
  for a whole interval).
  """
  if static_interval == 1:
    return jnp.asarray(True)
  measured = count % update_interval == 0
  if num_accepted is not None:
    measured = measured | (jnp.any(num_accepted == 0)
                           & (count < update_interval))
  return measured


def measure_or_reuse(measured: jax.Array, measure: Callable[[Any], Any],
                     reuse: Callable[[Any], Any], static_interval):
  """``measure(None)`` where ``measured``, else ``reuse(None)``.

  A ``lax.cond``, so a step that reuses does not pay for the measurement;
  with ``static_interval == 1`` simply ``measure(None)``.
  """
  if static_interval == 1:
    return measure(None)
  return jax.lax.cond(measured, measure, reuse, None)


def usable(raw: jax.Array, curvature: jax.Array, floor) -> jax.Array:
  """Per layer: ``raw`` and ``curvature`` finite, ``curvature > floor``."""
  return jnp.isfinite(raw) & jnp.isfinite(curvature) & (curvature > floor)


def accept(raw: jax.Array, valid: jax.Array, previous: jax.Array,
           num_accepted: jax.Array, *, initial, lower, upper,
           ema) -> jax.Array:
  """Clips, smooths and falls back, per layer.

  Where ``valid``: ``raw`` clipped to ``[lower, upper]`` (NaN read as 0),
  averaged with ``previous`` by ``ema`` once the layer has an accepted value
  (``num_accepted > 0``). Elsewhere: ``previous``, or ``initial`` before the
  layer has an accepted value. No cast: see :func:`bound`.
  """
  seen = num_accepted > 0
  clipped = jnp.clip(jnp.nan_to_num(raw), lower, upper)
  smoothed = jnp.where(seen, ema * previous + (1.0 - ema) * clipped, clipped)
  fallback = jnp.where(seen, previous, initial)
  return jnp.where(valid, smoothed, fallback)


def bound(values: jax.Array, limit: Optional[jax.Array],
          dtype) -> jax.Array:
  """``min(values, limit)`` in ``dtype`` (``limit=None``: the cast alone).

  ``limit`` is the displacement bound (``max_relative_change``); it applies
  on every path: measured, averaged, fallback or reused values.
  """
  values = values.astype(dtype)
  if limit is None:
    return values
  return jnp.minimum(values, limit).astype(dtype)


def safeguard(raw: jax.Array, valid: jax.Array, previous: jax.Array,
              num_accepted: jax.Array, *, initial, lower, upper, ema,
              limit: Optional[jax.Array] = None) -> jax.Array:
  """:func:`accept` then :func:`bound`, in ``previous``'s dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_layerwise import _safeguards
    >>> raw = jnp.array([0.5, 5.0, jnp.nan])
    >>> valid = jnp.array([True, True, False])
    >>> previous = jnp.array([0.1, 0.2, 0.3])
    >>> num_accepted = jnp.array([0, 2, 1])
    >>> _safeguards.safeguard(raw, valid, previous, num_accepted,
    ...                       initial=0.0, lower=0.0, upper=1.0, ema=0.5)
    Array([0.5, 0.6, 0.3], dtype=float32)
  """
  values = accept(raw, valid, previous, num_accepted, initial=initial,
                  lower=lower, upper=upper, ema=ema)
  return bound(values, limit, previous.dtype)


def counts(num_accepted: jax.Array, num_fallbacks: jax.Array,
           measured: jax.Array, valid: jax.Array) -> tuple:
  """``(num_accepted, num_fallbacks)`` after this step: a measured layer
  whose proposal is not ``valid`` is a fallback; a reused one is neither."""
  return (num_accepted + valid.astype(jnp.int32),
          num_fallbacks + (measured & ~valid).astype(jnp.int32))


def keep_finite(new: jax.Array, old: jax.Array, measured: jax.Array,
                dtype) -> jax.Array:
  """A diagnostic: ``new`` where measured and finite, else ``old``; a
  non-finite measurement (NaN loss or Hessian-vector product) is a fallback
  and leaves the last finite value."""
  return jnp.where(measured & jnp.isfinite(new), new, old).astype(dtype)
