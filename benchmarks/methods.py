"""The registry of optimisers the benchmarks compare: name -> factory.

A :class:`Method` builds its ``optax`` transform from a learning rate
(``None`` for the learning-rate-free methods) and carries the grid searched
when it is tuned. :func:`registry` returns a fresh name -> method dict
(K-BFGS(L)'s memory is a parameter); :data:`METHODS` is the default one.
:func:`resolve` builds a method's transform, or says why it cannot: a
method that fails to build is reported and skipped, never fatal.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Mapping, Optional, Tuple

import optax

import optax_layerwise as olw

__all__ = ["Method", "METHODS", "DEFAULT_METHODS", "KBFGS_MEMORY",
           "registry", "resolve"]

# K-BFGS(L) memory (the paper's p = 100 pairs); `--kbfgs-memory` changes it.
KBFGS_MEMORY = 100

DEFAULT_METHODS = ("kbfgs", "kbfgs-l", "layerwise-sgd", "layerwise-adamw",
                   "adam", "sgd")


@dataclasses.dataclass(frozen=True)
class Method:
  """A named optimiser the runner can build.

  Attributes:
    name: CLI name.
    label: display name.
    make: ``lr -> GradientTransformation`` (``lr`` is ``None`` for the
      learning-rate-free methods).
    default_lr: the learning rate without tuning (``None``: LR-free).
    lr_grid: the grid searched when the method is tuned.
  """
  name: str
  label: str
  make: Callable[[Optional[float]], optax.GradientTransformation]
  default_lr: Optional[float] = None
  lr_grid: Tuple[float, ...] = ()


_CURVATURE_GRID = (0.03, 0.1, 0.3, 1.0)


def registry(kbfgs_memory: int = KBFGS_MEMORY) -> Dict[str, Method]:
  """Every method the benchmarks know, by name (a fresh dict)."""
  methods = [
      Method("kbfgs", "K-BFGS", lambda lr: olw.kbfgs(learning_rate=lr), 0.3,
             _CURVATURE_GRID),
      Method("kbfgs-l", "K-BFGS(L)", lambda lr: olw.kbfgs(
          learning_rate=lr, memory_size=kbfgs_memory), 0.3, _CURVATURE_GRID),
      Method("layerwise-sgd", "layer-wise SGD-m",
             lambda lr: olw.layerwise_sgd()),
      Method("layerwise-adamw", "layer-wise AdamW",
             lambda lr: olw.layerwise_adamw()),
      # The same on the paper's direction, without the default input-side
      # H_a (precondition="auto" preconditions the layers a tap sees).
      Method("layerwise-sgd-plain", "layer-wise SGD-m (paper's direction)",
             lambda lr: olw.layerwise_sgd(precondition=None)),
      Method("layerwise-adamw-plain", "layer-wise AdamW (paper's direction)",
             lambda lr: olw.layerwise_adamw(precondition=None)),
      # CBLR / MCLR: the "lr" is `learning_rate_scale`, the global multiplier
      # of the per-layer curvature rates (1 = a Newton step along g_l).
      Method("cblr", "CBLR", lambda lr: olw.cblr(learning_rate_scale=lr), 1.0,
             _CURVATURE_GRID),
      Method("mclr", "MCLR", lambda lr: olw.mclr(learning_rate_scale=lr), 1.0,
             _CURVATURE_GRID),
      Method("adam", "Adam", optax.adam, 1e-3,
             (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)),
      Method("adamw", "AdamW", lambda lr: optax.adamw(lr, weight_decay=1e-4),
             1e-3, (1e-3, 3e-3, 1e-2, 3e-2)),
      Method("sgd", "SGD-m", lambda lr: optax.sgd(lr, momentum=0.9), 1e-2,
             (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)),
      Method("rmsprop", "RMSProp", optax.rmsprop, 1e-3,
             (3e-4, 1e-3, 3e-3, 1e-2)),
      Method("lars", "LARS", lambda lr: optax.lars(lr, momentum=0.9), 1.0,
             (0.3, 1.0, 3.0, 10.0)),
      Method("lamb", "LAMB", optax.lamb, 1e-3, (1e-3, 3e-3, 1e-2, 3e-2)),
  ]
  return {m.name: m for m in methods}


METHODS: Dict[str, Method] = registry()


def resolve(name: str, lr: Optional[float] = None,
            methods: Optional[Mapping[str, Method]] = None):
  """Builds method ``name``'s transform at ``lr`` (``None``: its default).

  Returns:
    ``(tx, None)`` on success, ``(None, reason)`` if the method is unknown or
    building it raised or returned something that is not a transform.
  """
  methods = METHODS if methods is None else methods
  if name not in methods:
    return None, f"unknown method {name!r}; known: {', '.join(methods)}"
  m = methods[name]
  try:
    tx = m.make(lr if lr is not None else m.default_lr)
  except Exception as e:  # pylint: disable=broad-except
    return None, f"building {name!r} failed: {type(e).__name__}: {e}"
  if not isinstance(tx, optax.GradientTransformation):
    return None, (f"{name!r} built a {type(tx).__name__}, not an optax "
                  "GradientTransformation")
  return optax.with_extra_args_support(tx), None
