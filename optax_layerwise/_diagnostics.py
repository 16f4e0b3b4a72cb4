"""One flat, loggable dict from any optimizer state of this library.

Every state keeps its diagnostics as small arrays of fixed shape: scalar
counters (``count``, ``num_skipped``) and per-layer vectors (``step_sizes``,
``curvatures``, ``num_fallbacks``, ...). :func:`diagnostics` walks a whole
optimizer state (chains, :func:`optax.inject_hyperparams`, any nesting of
tuples, lists, dicts and NamedTuples), takes those arrays from this
library's states and the injected hyperparameters, and names them
``"<transform>/<field>"`` and ``"<transform>/<field>/<layer>"``.
"""

from __future__ import annotations

import re

from typing import Any, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp

from optax_layerwise import _curvature_lr
from optax_layerwise import _input_factor
from optax_layerwise import _kbfgs
from optax_layerwise import _step_size

PyTree = Any

__all__ = ["diagnostics"]

# This library's state types and their short names in the keys.
_STATES = {
    _step_size.ScaleByLayerwiseStepSizeState: "step_size",
    _curvature_lr.ScaleByCurvatureLRState: "curvature_lr",
    _kbfgs.KBFGSState: "kbfgs",
    _input_factor.PreconditionByInputsState: "precondition_by_inputs",
}


def _is_small_array(value) -> bool:
  return isinstance(value, (jax.Array, jnp.ndarray)) and value.ndim <= 1 and (
      jnp.issubdtype(value.dtype, jnp.number)
      or jnp.issubdtype(value.dtype, jnp.bool_))


def _walk(state, depth: int = 0) -> Iterator[tuple]:
  """Yields ``(kind, namedtuple)`` for this library's states and injected
  hyperparameters found anywhere in ``state``."""
  if depth > 32:
    return
  name = _STATES.get(type(state))
  if name is not None:
    yield name, state
  elif hasattr(state, "hyperparams") and isinstance(state.hyperparams, dict):
    yield "hyperparams", state.hyperparams
  children = (state._asdict().values() if hasattr(state, "_asdict")
              else state.values() if isinstance(state, dict)
              else state if isinstance(state, (tuple, list)) else ())
  for child in children:
    yield from _walk(child, depth + 1)


def _layer_label(name: str) -> str:
  """``"['encoder']['dense_0']"`` -> ``"encoder/dense_0"``; a slice of a
  scanned stack ``"['stack']['Dense_0'][1]"`` -> ``"stack/Dense_0/1"``."""
  parts = re.findall(r"\[([^\]]*)\]", name)
  return "/".join(p.strip("'\"") for p in parts) or name


def diagnostics(opt_state: PyTree,
                layer_names: Optional[Sequence[str]] = None) -> dict:
  """The diagnostics of an optimizer state as a flat ``{name: array}`` dict.

  Scalars become ``"<transform>/<field>"`` (e.g. ``"kbfgs/num_skipped"``);
  per-layer vectors one entry per layer, ``"<transform>/<field>/<layer>"``,
  the layer being its name from ``layer_names`` when their number matches,
  else its index. Injected hyperparameters appear as
  ``"hyperparams/<name>"``. The same counter means the same thing in every
  state (docs/guides/logging.md). Works inside :func:`jax.jit`; on the host,
  ``jax.device_get`` it and hand it to any metrics writer.

  Args:
    opt_state: the state of a transform of this library, or of any chain or
      wrapper containing some.
    layer_names: the layers' names, e.g. ``olw.group_layers(params).labels``
      (step sizes, CBLR) or ``olw.kbfgs_layer_names(params)`` (K-BFGS).

  Returns:
    A dict of scalar arrays, in a fixed order.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_layerwise as olw
    >>> params = {'l': {'kernel': jnp.ones((2, 1)), 'bias': jnp.zeros(1)}}
    >>> tx = optax.inject_hyperparams(olw.kbfgs)(learning_rate=0.1)
    >>> logs = olw.diagnostics(tx.init(params), olw.kbfgs_layer_names(params))
    >>> round(float(logs['hyperparams/learning_rate']), 6)
    0.1
    >>> [k for k in logs if k.startswith('kbfgs/')][:4]
    ['kbfgs/count', 'kbfgs/num_powell/l', 'kbfgs/num_lm/l', 'kbfgs/num_skipped_h_g/l']
  """
  out = {}
  for kind, node in _walk(opt_state):
    fields = node.items() if isinstance(node, dict) else (
        node._asdict().items())
    for field, value in fields:
      if not _is_small_array(value):
        continue
      key = f"{kind}/{field}"
      if value.ndim == 0:
        out[key] = value
        continue
      names = ([_layer_label(n) for n in layer_names]
               if layer_names is not None and len(layer_names) == len(value)
               else [str(i) for i in range(len(value))])
      for i, layer in enumerate(names):
        out[f"{key}/{layer}"] = value[i]
  return out
