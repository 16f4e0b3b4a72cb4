"""Side-by-side step timing (interleaved rounds, medians, ratios), and the
wall time to a target loss.

This machine is shared and noisy, so methods are timed in interleaved rounds
(each round times every method once, in a rotating order) and compared by the
median over rounds of the per-round ratio to a baseline: a slow spell then
slows both sides of a ratio alike.
"""

from __future__ import annotations

import collections.abc
import itertools
import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from optax_layerwise import _step_size

__all__ = ["AMORTISING_CALLS", "Carried", "time_side_by_side",
           "time_to_target"]

#: Consecutive steps timed per method and round by the benchmarks: the
#: layer-wise aliases measure their curvature every 40 steps (the measuring
#: step costs about 3 of Adam's on the MNIST autoencoder; 15 before session
#: 14's one-layer-at-a-time derivatives), so a window of 40
#: holds exactly one measurement and its time is the amortised step. Windows
#: of 3 steps (the Fashion-MNIST benchmark until session 13) mostly missed
#: it, and the median over rounds then reported the step between
#: measurements (1.19x AdamW's instead of about 1.7x).
AMORTISING_CALLS = _step_size.DEFAULT_MEASUREMENT["update_interval"]


class Carried:
  """A zero-argument callable running one training step on its own carried
  ``params`` and ``state`` (advanced by every call) and returning the loss:
  what :func:`time_side_by_side` times.

  Args:
    step: ``(params, state, batch) -> (params, state, loss)``, such as
      :func:`benchmarks.loop.make_step`'s.
    params, state: the start.
    batches: one batch used by every call, or an iterator of batches.
  """

  def __init__(self, step: Callable, params: Any, state: Any, batches: Any):
    self.step, self.params, self.state = step, params, state
    self.batches = (batches if isinstance(batches, collections.abc.Iterator)
                    else itertools.repeat(batches))

  def __call__(self):
    self.params, self.state, loss = self.step(self.params, self.state,
                                              next(self.batches))
    return loss


def time_side_by_side(
    steps: Mapping[str, Callable[[], object]],
    *,
    baseline: str,
    rounds: int = 7,
    calls_per_round: int = 5,
    progress: bool = True,
) -> Dict[str, dict]:
  """Times zero-argument step callables in interleaved rounds.

  Each callable runs one (jitted, already compiled or compiled on its first
  call) training step and returns something to block on. One warm-up call
  per method is made first and not timed.

  Args:
    steps: name -> callable running one step.
    baseline: the name whose time is the denominator of the ratios.
    rounds: interleaved rounds; medians are over rounds.
    calls_per_round: consecutive calls timed together in a round.
    progress: show a tqdm progress bar.

  Returns:
    name -> ``{"median_ms", "min_ms", "ratio_median", "ratio_min",
    "samples_ms"}``: per-step milliseconds, and the ratio to the baseline
    (median over rounds of the per-round ratio, and the ratio of minima).
  """
  if baseline not in steps:
    raise ValueError(f"baseline {baseline!r} is not among {list(steps)}")
  names = list(steps)
  for name in names:  # compile + warm up
    jax.block_until_ready(steps[name]())
  samples = {name: [] for name in names}
  iterator = range(rounds)
  if progress:
    from tqdm.auto import tqdm
    iterator = tqdm(iterator, desc="timing rounds", leave=False)
  for r in iterator:
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      start = time.perf_counter()
      for _ in range(calls_per_round):
        out = steps[name]()
      jax.block_until_ready(out)
      samples[name].append(1e3 * (time.perf_counter() - start)
                           / calls_per_round)
  base = np.asarray(samples[baseline])
  results = {}
  for name in names:
    s = np.asarray(samples[name])
    results[name] = {
        "median_ms": float(np.median(s)),
        "min_ms": float(np.min(s)),
        "ratio_median": float(np.median(s / base)),
        "ratio_min": float(np.min(s) / np.min(base)),
        "samples_ms": [float(x) for x in s],
    }
  return results


def time_to_target(epochs: Sequence[float], times: Sequence[float],
                   losses: Sequence[Optional[float]], target: float
                   ) -> Tuple[Optional[float], Optional[float]]:
  """First (linearly interpolated) epoch and time at which loss <= target;
  ``(None, None)`` if never (or not before a ``None`` loss)."""
  prev = None
  for e, t, l in zip(epochs, times, losses):
    if l is None:
      return None, None
    if l <= target:
      if prev is None or prev[2] <= l:
        return e, t
      frac = (prev[2] - target) / (prev[2] - l)
      return (prev[0] + frac * (e - prev[0]), prev[1] + frac * (t - prev[1]))
    prev = (e, t, l)
  return None, None
