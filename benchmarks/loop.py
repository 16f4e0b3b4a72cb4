"""The one training loop of the benchmarks.

* :func:`step_fn` / :func:`make_step`: the training step ``(params, state,
  batch) -> (params, state, loss)``: loss and gradient, ``tx.update`` with
  ``value_fn`` (the mini-batch loss, which plain Optax transforms ignore),
  apply. ``scan=True`` gives a step over a stack of batches
  (``jax.lax.scan``) returning every step's loss; ``axis_name`` the
  per-device step of ``shard_map`` data parallelism.
* :func:`shuffled_batches`: mini-batches in a fresh permutation every epoch.
* :func:`train`: drives a compiled step: every call timed to completion,
  stop on a non-finite loss, ``on_step`` / ``on_eval`` hooks, a progress bar.
* :class:`Evaluator`: an experiment's metrics over a whole split.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import jax
import numpy as np
import optax

__all__ = ["step_fn", "make_step", "shuffled_batches", "Log", "train",
           "Evaluator"]

LossFn = Callable[[Any, Any], jax.Array]  # (params, batch) -> scalar


def step_fn(loss_fn: LossFn, tx: optax.GradientTransformation, *,
            axis_name: Optional[str] = None, scan: bool = False) -> Callable:
  """The (un-jitted) training step of ``tx`` on ``loss_fn(params, batch)``.

  Args:
    loss_fn: the mean mini-batch loss.
    tx: any Optax transform; curvature-aware ones get ``value_fn``.
    axis_name: under ``shard_map``: the gradient is that of the loss averaged
      over this axis (``value_fn`` stays the device's own loss).
    scan: the step takes a stack of batches (leading axis) and returns the
      loss of every step.
  """
  tx = optax.with_extra_args_support(tx)

  def step(params, state, batch):
    value_fn = lambda p: loss_fn(p, batch)  # noqa: E731
    objective = value_fn if axis_name is None else (
        lambda p: jax.lax.pmean(value_fn(p), axis_name))
    loss, grads = jax.value_and_grad(objective)(params)
    updates, state = tx.update(grads, state, params, value_fn=value_fn)
    return optax.apply_updates(params, updates), state, loss

  if not scan:
    return step

  def scanned(params, state, batches):
    def body(carry, batch):
      params, state, loss = step(*carry, batch)
      return (params, state), loss
    (params, state), losses = jax.lax.scan(body, (params, state), batches)
    return params, state, losses

  return scanned


def make_step(loss_fn: LossFn, tx: optax.GradientTransformation, *,
              scan: bool = False, donate: bool = False) -> Callable:
  """:func:`step_fn` under :func:`jax.jit` (``donate``: params and state)."""
  return jax.jit(step_fn(loss_fn, tx, scan=scan),
                 donate_argnums=(0, 1) if donate else ())


@jax.jit
def _take(arrays, idx):
  return jax.tree_util.tree_map(lambda a: a[idx], arrays)


def shuffled_batches(data: Any, batch_size: int, rng: np.random.Generator,
                     take: Callable[[Any, np.ndarray], Any] = _take
                     ) -> Iterator[Any]:
  """Endless mini-batches of ``data`` (arrays with a leading example axis).

  Each epoch draws a permutation from ``rng``; batch ``k`` is
  ``take(data, perm[k * batch_size:(k + 1) * batch_size])`` (default: a
  jitted gather on device); the last partial batch is dropped.
  """
  n = len(jax.tree_util.tree_leaves(data)[0])
  per_epoch = max(1, n // batch_size)
  while True:
    perm = rng.permutation(n)
    for k in range(per_epoch):
      yield take(data, perm[k * batch_size:(k + 1) * batch_size])


@dataclasses.dataclass
class Log:
  """What :func:`train` measured: every step's mini-batch loss and every
  call's seconds (compilation and the hooks excluded)."""
  losses: List[float] = dataclasses.field(default_factory=list)
  seconds: List[float] = dataclasses.field(default_factory=list)
  diverged: bool = False

  @property
  def elapsed(self) -> float:
    return float(sum(self.seconds))


def _bar(total: int, desc: Optional[str]):
  if desc is None:
    return None
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, leave=False, dynamic_ncols=True, desc=desc,
              file=sys.stderr)


def train(step: Callable, params: Any, state: Any, batches: Iterator[Any],
          num_steps: int, *, eval_every: int = 0,
          on_step: Optional[Callable[..., None]] = None,
          on_eval: Optional[Callable[..., Optional[float]]] = None,
          progress: Optional[str] = None, log: Optional[Log] = None,
          stop_at_divergence: bool = True):
  """Runs ``num_steps`` calls of a compiled ``step`` on ``batches``.

  Args:
    step: ``(params, state, batch) -> (params, state, loss)`` (a scanned
      step's ``loss`` is a vector: one call, several steps).
    params, state: the start.
    batches: an iterator of batches (one per call).
    num_steps: calls to make.
    eval_every: ``on_eval`` runs every this many calls and after the last
      (0: after the last only).
    on_step: ``on_step(k, params, state, loss)`` after call ``k`` (from 1).
    on_eval: ``on_eval(k, params, state, elapsed_s) -> loss or None``; a
      non-finite returned loss counts as divergence and stops the loop.
    progress: the progress bar's description (``None``: no bar).
    log: a :class:`Log` to append to (kept if the step raises).
    stop_at_divergence: stop at the first non-finite loss (else only mark
      ``log.diverged`` and go on: the transform may skip such steps).

  Returns:
    ``(params, state, log)``.
  """
  log = Log() if log is None else log
  bar = _bar(num_steps, progress)
  try:
    for k in range(1, num_steps + 1):
      batch = jax.block_until_ready(next(batches))
      start = time.perf_counter()
      params, state, loss = step(params, state, batch)
      loss = np.ravel(jax.block_until_ready(loss)).astype(float)
      log.seconds.append(time.perf_counter() - start)
      log.losses.extend(loss.tolist())
      if on_step is not None:
        on_step(k, params, state, float(loss[-1]))
      if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss[-1]:.4g}", refresh=False)
      if not np.all(np.isfinite(loss)):
        log.diverged = True
        if stop_at_divergence:
          break
      if on_eval is not None and (k == num_steps or (
          eval_every and k % eval_every == 0)):
        monitored = on_eval(k, params, state, log.elapsed)
        if monitored is not None and not math.isfinite(monitored):
          log.diverged = True
          break
  finally:
    if bar is not None:
      bar.close()
  return params, state, log


class Evaluator:
  """Jitted evaluation of an experiment's metrics over a whole split.

  ``metrics_fn(params, batch) -> {name: (sum, count)}`` is summed over
  chunks of ``chunk`` examples (the whole split at once if ``full_batch``).
  """

  def __init__(self, metrics_fn: Callable, full_batch: bool = False,
               chunk: int = 2000):
    self.fn = jax.jit(metrics_fn)
    self.full_batch = full_batch
    self.chunk = chunk

  def __call__(self, params, split) -> Dict[str, float]:
    if split is None:
      return {}
    if self.full_batch:
      parts = [self.fn(params, split)]
    else:
      n = len(jax.tree_util.tree_leaves(split)[0])
      parts = [self.fn(params, jax.tree_util.tree_map(
          lambda a, i=i: a[i:i + self.chunk], split))
               for i in range(0, n, self.chunk)]
    out = {}
    for name in parts[0]:
      total = sum(float(p[name][0]) for p in parts)
      count = sum(float(p[name][1]) for p in parts)
      out[name] = total / max(count, 1.0)
    return out
