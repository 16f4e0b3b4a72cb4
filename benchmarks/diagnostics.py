"""Per-layer diagnostics and counters read from any optimiser state.

The benchmarks plot the per-layer step sizes (``step_sizes``) or learning
rates (``lrs``) a state carries and print its ``num_*`` counters; both are
found by walking the (nested tuples, lists, dicts of) NamedTuple states, so
chains and wrappers need no special case.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Tuple

import jax
import numpy as np

import optax_layerwise as olw

__all__ = ["find_diagnostics", "find_counters", "layer_labels"]

FIELDS = ("step_sizes", "lrs", "learning_rates")


def _namedtuple_fields(state, depth=0) -> Iterator[Tuple[Any, str, Any]]:
  """Yields ``(namedtuple, field_name, value)`` for every NamedTuple field
  in a state, depth first."""
  if depth > 20:
    return
  fields = getattr(state, "_fields", None)
  if fields is not None:
    for f in fields:
      value = getattr(state, f)
      yield state, f, value
      yield from _namedtuple_fields(value, depth + 1)
  elif isinstance(state, (tuple, list)):
    for y in state:
      yield from _namedtuple_fields(y, depth + 1)
  elif isinstance(state, dict):
    for y in state.values():
      yield from _namedtuple_fields(y, depth + 1)


def find_diagnostics(state) -> Dict[str, jax.Array]:
  """The per-layer vectors of a state: for each name in :data:`FIELDS`, the
  first 1-D field so named (``layerwise_sgd``: the step sizes of the
  chain's first element)."""
  found: Dict[str, jax.Array] = {}
  for _, f, v in _namedtuple_fields(state):
    if f in FIELDS and getattr(v, "ndim", None) == 1:
      found.setdefault(f, v)
  return found


def find_counters(state) -> Dict[str, Any]:
  """Values of the ``num_*`` counters (fallbacks, skipped updates, damping
  events, ...) of every NamedTuple in a state, keyed ``Type.field``, as
  ints or per-layer lists."""
  found: Dict[str, Any] = {}
  for owner, f, v in _namedtuple_fields(state):
    if (f.startswith("num_") and hasattr(v, "dtype")
        and getattr(v, "ndim", 2) <= 1):
      key = f"{type(owner).__name__}.{f}"
      if key not in found:
        a = np.asarray(v)
        found[key] = a.tolist() if a.ndim else int(a)
  return found


def layer_labels(params, n: int) -> List[str]:
  """``n`` layer names of ``params`` (``olw.group_layers``'s, as paths), or
  ``layer i`` if they do not number ``n``."""
  try:
    labels = olw.group_layers(params).labels
    if len(labels) == n:
      return [str(l).replace("['", "").replace("']", "").replace("][", "/")
              for l in labels]
  except Exception:  # pylint: disable=broad-except
    pass
  return [f"layer {i}" for i in range(n)]
