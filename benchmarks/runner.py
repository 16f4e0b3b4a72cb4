"""One runner for every benchmark: methods by name, seeds, LR grids, outputs.

Methods are looked up by name in :data:`METHODS`. The ``optax_layerwise``
constructors are resolved lazily (``getattr`` on the module when a run
starts), so a method whose constructor does not exist yet, or fails to build
or to run, is reported as unavailable/failed with the reason and skipped:
it never stops the other runs.

For each method the runner trains from the same initial params and the same
data order (per seed), with the whole train step (gradient, ``tx.update``
with ``value_fn``, apply) under one :func:`jax.jit`. Wall time excludes
compilation (ahead-of-time compile plus one discarded warm-up step) and
evaluation; every step is timed to completion (``block_until_ready``).

Outputs (:func:`run_benchmark`): a printed table, ``results.json``, and PNG
plots (train loss vs epochs, vs wall-clock time, per-layer step sizes of the
layer-wise methods).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.experiments import Experiment

__all__ = ["Method", "METHODS", "DEFAULT_METHODS", "SCHEMA_VERSION",
           "resolve_method", "run_single", "run_benchmark", "format_table",
           "summarise_results", "validate_results"]

SCHEMA_VERSION = 1

# --------------------------------------------------------------------------
# The method registry
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
  """A named optimiser the runner can build.

  Attributes:
    name: CLI name.
    label: display name.
    module: ``"optax"`` or ``"optax_layerwise"``: where ``attr`` is looked up
      (lazily, when the method is resolved).
    attr: the constructor's attribute name in ``module``.
    build: ``(constructor, lr) -> GradientTransformation``; ``lr`` is
      ``None`` for learning-rate-free methods.
    default_lr: the learning rate without tuning (``None``: LR-free).
    lr_grid: the grid searched when the method is tuned.
    layerwise: whether the state carries per-layer step sizes to plot.
  """
  name: str
  label: str
  module: str
  attr: str
  build: Callable[[Callable, Optional[float]], Any]
  default_lr: Optional[float] = None
  lr_grid: tuple = ()
  layerwise: bool = False


# K-BFGS(L) memory (the paper's p = 100 pairs); `--kbfgs-memory` changes it.
KBFGS_MEMORY = 100


def _kbfgs_l(ctor, lr):
  return ctor(learning_rate=lr, memory_size=KBFGS_MEMORY)


METHODS: Dict[str, Method] = {m.name: m for m in [
    Method("kbfgs", "K-BFGS", "optax_layerwise", "kbfgs",
           lambda c, lr: c(learning_rate=lr), 0.3, (0.03, 0.1, 0.3, 1.0)),
    Method("kbfgs-l", "K-BFGS(L)", "optax_layerwise", "kbfgs", _kbfgs_l,
           0.3, (0.03, 0.1, 0.3, 1.0)),
    Method("layerwise-sgd", "layer-wise SGD-m", "optax_layerwise",
           "layerwise_sgd", lambda c, lr: c(), layerwise=True),
    Method("layerwise-adamw", "layer-wise AdamW", "optax_layerwise",
           "layerwise_adamw", lambda c, lr: c(), layerwise=True),
    # CBLR / MCLR: the "lr" is `learning_rate_scale`, the global multiplier
    # of the per-layer curvature rates (1 = a Newton step along g_l).
    Method("cblr", "CBLR", "optax_layerwise", "cblr",
           lambda c, lr: c(learning_rate_scale=lr), 1.0,
           (0.03, 0.1, 0.3, 1.0), layerwise=True),
    Method("mclr", "MCLR", "optax_layerwise", "mclr",
           lambda c, lr: c(learning_rate_scale=lr), 1.0,
           (0.03, 0.1, 0.3, 1.0), layerwise=True),
    Method("adam", "Adam", "optax", "adam", lambda c, lr: c(lr), 1e-3,
           (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)),
    Method("adamw", "AdamW", "optax", "adamw",
           lambda c, lr: c(lr, weight_decay=1e-4), 1e-3,
           (1e-3, 3e-3, 1e-2, 3e-2)),
    Method("sgd", "SGD-m", "optax", "sgd",
           lambda c, lr: c(lr, momentum=0.9), 1e-2,
           (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)),
    Method("rmsprop", "RMSProp", "optax", "rmsprop", lambda c, lr: c(lr),
           1e-3, (3e-4, 1e-3, 3e-3, 1e-2)),
    Method("lars", "LARS", "optax", "lars",
           lambda c, lr: c(lr, momentum=0.9), 1.0, (0.3, 1.0, 3.0, 10.0)),
    Method("lamb", "LAMB", "optax", "lamb", lambda c, lr: c(lr), 1e-3,
           (1e-3, 3e-3, 1e-2, 3e-2)),
]}

DEFAULT_METHODS = ("kbfgs", "kbfgs-l", "layerwise-sgd", "layerwise-adamw",
                   "adam", "sgd")


def resolve_method(name: str, lr: Optional[float] = None):
  """Builds method ``name``'s transform, or explains why it cannot.

  Returns:
    ``(tx, None)`` on success, ``(None, reason)`` if the method is unknown,
    its constructor is not (yet) in its module, or building it raised.
  """
  if name not in METHODS:
    return None, f"unknown method {name!r}; known: {', '.join(METHODS)}"
  m = METHODS[name]
  try:
    module = __import__(m.module)
  except ImportError as e:  # pragma: no cover
    return None, f"cannot import {m.module}: {e}"
  ctor = getattr(module, m.attr, None)
  if ctor is None:
    return None, (f"`{m.module}.{m.attr}` does not exist in this checkout "
                  "(not implemented yet)")
  try:
    tx = m.build(ctor, lr if lr is not None else m.default_lr)
  except Exception as e:  # pylint: disable=broad-except
    return None, f"building `{m.module}.{m.attr}` failed: {type(e).__name__}: {e}"
  if not isinstance(tx, optax.GradientTransformation):
    return None, (f"`{m.module}.{m.attr}` returned {type(tx).__name__}, not an "
                  "optax GradientTransformation")
  return optax.with_extra_args_support(tx), None


# --------------------------------------------------------------------------
# Diagnostics read from the optimiser state
# --------------------------------------------------------------------------

_DIAG_FIELDS = ("step_sizes", "lrs", "learning_rates")


def _namedtuple_fields(state, depth=0):
  """Yields ``(namedtuple, field_name, value)`` for every NamedTuple field
  in a (nested tuples, lists, dicts of) optimizer state, depth first."""
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


def _find_diagnostics(state) -> Dict[str, jax.Array]:
  """Finds per-layer vectors (``step_sizes``, ``lrs``, ...) in a state.

  Walks the (nested tuples of) NamedTuple states; the first 1-D field with
  one of the names in ``_DIAG_FIELDS`` wins. For ``layerwise_sgd`` this is
  the ``ScaleByLayerwiseStepSizeState.step_sizes`` of the chain's first
  element.
  """
  found: Dict[str, jax.Array] = {}
  for _, f, v in _namedtuple_fields(state):
    if f in _DIAG_FIELDS and getattr(v, "ndim", None) == 1:
      found.setdefault(f, v)
  return found


def _find_counters(state) -> Dict[str, Any]:
  """Final values of the ``num_*`` counters (fallbacks, skipped updates,
  damping events, ...) of every NamedTuple in a state, as lists/ints."""
  found: Dict[str, Any] = {}
  for owner, f, v in _namedtuple_fields(state):
    if f.startswith("num_") and hasattr(v, "dtype") and getattr(
        v, "ndim", 2) <= 1:
      key = f"{type(owner).__name__}.{f}"
      if key not in found:
        a = np.asarray(v)
        found[key] = a.tolist() if a.ndim else int(a)
  return found


def _layer_labels(params, n: int) -> List[str]:
  try:
    import optax_layerwise as olw  # pylint: disable=import-outside-toplevel
    labels = olw.group_layers(params).labels
    if len(labels) == n:
      return [str(l).replace("['", "").replace("']", "").replace("][", "/")
              for l in labels]
  except Exception:  # pylint: disable=broad-except
    pass
  return [f"layer {i}" for i in range(n)]


# --------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------


def _finite(x) -> Optional[float]:
  x = float(x)
  return x if math.isfinite(x) else None


class _Evaluator:
  """Jitted evaluation of an experiment's metrics over a whole split."""

  def __init__(self, exp: Experiment, chunk: int = 2000):
    self.exp = exp
    self.chunk = chunk
    self.fn = jax.jit(exp.metrics_fn)

  def __call__(self, params, split) -> Dict[str, float]:
    if split is None:
      return {}
    if self.exp.full_batch:
      parts = [self.fn(params, split)]
    else:
      n = next(iter(split.values())).shape[0]
      parts = [self.fn(params, {k: v[i:i + self.chunk]
                                for k, v in split.items()})
               for i in range(0, n, self.chunk)]
    out = {}
    for name in parts[0]:
      total = sum(float(p[name][0]) for p in parts)
      count = sum(float(p[name][1]) for p in parts)
      out[name] = total / max(count, 1.0)
    return out


@jax.jit
def _take(arrays, idx):
  return jax.tree_util.tree_map(lambda a: a[idx], arrays)


def _make_step(loss_fn, tx):

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(
        grads, opt_state, params, value_fn=lambda p: loss_fn(p, batch))
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def run_single(exp: Experiment, method: str, *, lr: Optional[float] = None,
               seed: int = 0, epochs: Optional[int] = None,
               evals_per_epoch: int = 1, max_steps: Optional[int] = None,
               diag_points: int = 200, progress: bool = True,
               device_data: Optional[dict] = None,
               keep_step: bool = False,
               on_eval: Optional[Callable[[Dict[str, Any]], None]] = None
               ) -> Dict[str, Any]:
  """Trains ``exp`` with one method, learning rate and seed.

  Args:
    exp: the experiment.
    method: a key of :data:`METHODS`.
    lr: learning rate (``None``: the method's default).
    seed: seeds the initial params and the data order.
    epochs: epochs (``None``: the experiment's default).
    evals_per_epoch: how often per epoch the full train/test metrics are
      evaluated (plus once at initialisation).
    max_steps: stop after this many steps in total (smoke tests).
    diag_points: about how many times the per-layer diagnostics are read.
    progress: show a tqdm bar.
    device_data: the experiment's splits already on device (reused across
      runs).
    keep_step: also return, under the key ``"_step"``, the compiled step and
      its inputs after the warm-up step, for :func:`interleaved_step_times`
      (not JSON: pop it before saving).
    on_eval: called with the (partial) result dict after every evaluation,
      e.g. to save progress of a long run.

  Returns:
    A JSON-ready dict (see :func:`validate_results` for the schema).
  """
  m = METHODS.get(method)
  lr = lr if lr is not None else (m.default_lr if m else None)
  epochs = exp.default_epochs if epochs is None else int(epochs)
  out: Dict[str, Any] = {
      "method": method, "lr": lr, "seed": int(seed), "status": "ok",
      "reason": None, "diverged": False, "epochs": epochs,
      "num_steps": 0, "compile_time_s": None, "train_time_s": 0.0,
      "step_time_ms": None,
      "history": {"epoch": [], "step": [], "time_s": [], "train_loss": [],
                  "test_loss": [], "test_accuracy": []},
      "batch_loss": {"step": [], "loss": []},
      "diagnostics": {}, "counters": {},
  }
  tx, reason = resolve_method(method, lr)
  if tx is None:
    out.update(status="unavailable", reason=reason)
    return out

  if device_data is None:
    device_data = {"train": jax.device_put(exp.train),
                   "test": None if exp.test is None else jax.device_put(
                       exp.test)}
  train, test = device_data["train"], device_data["test"]
  evaluate = device_data.get("evaluator") or _Evaluator(exp)
  steps_per_epoch = exp.steps_per_epoch
  total_steps = epochs * steps_per_epoch
  if max_steps is not None:
    total_steps = min(total_steps, int(max_steps))
  eval_every = max(1, steps_per_epoch // max(1, int(evals_per_epoch)))
  diag_every = max(1, total_steps // max(1, int(diag_points)))
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1]))
  take = _take

  def batch_at(step_in_epoch, perm):
    if exp.full_batch:
      return train
    idx = perm[step_in_epoch * exp.batch_size:(step_in_epoch + 1)
               * exp.batch_size]
    return take(train, jnp.asarray(idx))

  hist = out["history"]

  def record_eval(params, step, elapsed):
    tr = evaluate(params, train)
    te = evaluate(params, test)
    hist["epoch"].append(step / steps_per_epoch)
    hist["step"].append(int(step))
    hist["time_s"].append(float(elapsed))
    hist["train_loss"].append(_finite(tr["loss"]))
    hist["test_loss"].append(_finite(te["loss"]) if te else None)
    hist["test_accuracy"].append(
        _finite(te["accuracy"]) if te and "accuracy" in te else None)
    if on_eval is not None:
      on_eval(out)
    return tr["loss"]

  diag_hist: Dict[str, Dict[str, list]] = {}

  def record_diag(opt_state, step, params):
    for field, vec in _find_diagnostics(opt_state).items():
      d = diag_hist.setdefault(field, {
          "labels": _layer_labels(params, int(vec.shape[0])), "step": [],
          "values": []})
      d["step"].append(int(step))
      d["values"].append([_finite(v) for v in np.asarray(vec)])

  step_times: List[float] = []
  bar = None
  try:
    params = exp.init_fn(jax.random.PRNGKey(int(seed)))
    opt_state = tx.init(params)
    perm = rng.permutation(exp.num_train) if not exp.full_batch else None
    first = batch_at(0, perm)
    t0 = time.perf_counter()
    step_fn = jax.jit(_make_step(exp.loss_fn, tx)).lower(
        params, opt_state, first).compile()
    out["compile_time_s"] = time.perf_counter() - t0
    # Warm-up on the same inputs; the result is discarded (pure function),
    # or kept as the starting point of the interleaved timing.
    warm = jax.block_until_ready(step_fn(params, opt_state, first))
    if keep_step:
      out["_step"] = (step_fn, (warm[0], warm[1], first))
    del warm

    record_eval(params, 0, 0.0)
    record_diag(opt_state, 0, params)
    if progress:
      from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
      bar = tqdm(total=total_steps, leave=False, dynamic_ncols=True,
                 desc=f"{exp.name} {method} lr={lr} seed={seed}",
                 file=sys.stderr)
    elapsed = 0.0
    step = 0
    loss = float("nan")
    for epoch in range(epochs):
      if step >= total_steps:
        break
      if epoch > 0 and not exp.full_batch:
        perm = rng.permutation(exp.num_train)
      for k in range(steps_per_epoch):
        if step >= total_steps:
          break
        batch = batch_at(k, perm)
        jax.block_until_ready(batch)
        t = time.perf_counter()
        params, opt_state, loss_arr = step_fn(params, opt_state, batch)
        loss_arr.block_until_ready()
        dt = time.perf_counter() - t
        step_times.append(dt)
        elapsed += dt
        step += 1
        loss = float(loss_arr)
        out["batch_loss"]["step"].append(step)
        out["batch_loss"]["loss"].append(_finite(loss))
        if step % diag_every == 0:
          record_diag(opt_state, step, params)
        if bar is not None:
          bar.update(1)
          if step % 5 == 0:
            bar.set_postfix(loss=f"{loss:.4g}")
        if not math.isfinite(loss):
          out["diverged"] = True
          break
        if step % eval_every == 0 or step == total_steps:
          train_loss = record_eval(params, step, elapsed)
          if not math.isfinite(train_loss):
            out["diverged"] = True
            break
      if out["diverged"]:
        break
    if hist["step"][-1] != step and not out["diverged"]:
      record_eval(params, step, elapsed)
    out["counters"] = _find_counters(opt_state)
    if out["diverged"] and hist["step"][-1] != step:
      hist["epoch"].append(step / steps_per_epoch)
      hist["step"].append(step)
      hist["time_s"].append(elapsed)
      hist["train_loss"].append(None)
      hist["test_loss"].append(None)
      hist["test_accuracy"].append(None)
  except Exception as e:  # pylint: disable=broad-except
    tb = traceback.format_exc(limit=4)
    out.update(status="failed", reason=f"{type(e).__name__}: {e}"[:2000],
               traceback=tb[-4000:])
  finally:
    if bar is not None:
      bar.close()
  out["num_steps"] = len(step_times)
  out["train_time_s"] = float(sum(step_times))
  if step_times:
    ms = np.asarray(step_times) * 1e3
    out["step_time_ms"] = {"median": float(np.median(ms)),
                           "mean": float(ms.mean()),
                           "p10": float(np.percentile(ms, 10)),
                           "p90": float(np.percentile(ms, 90))}
  out["diagnostics"] = diag_hist
  try:
    out["load_average_at_end"] = list(os.getloadavg())
  except OSError:  # pragma: no cover
    pass
  return out


# --------------------------------------------------------------------------
# Many runs: tuning, summaries, outputs
# --------------------------------------------------------------------------


def _final_loss(run) -> float:
  if run["status"] != "ok" or run["diverged"]:
    return math.inf
  losses = [l for l in run["history"]["train_loss"] if l is not None]
  return losses[-1] if losses else math.inf


def _time_to_target(run, target: float):
  """First (interpolated) epoch and wall time at which train loss <= target."""
  h = run["history"]
  prev = None
  for e, t, l in zip(h["epoch"], h["time_s"], h["train_loss"]):
    if l is None:
      return None, None
    if l <= target:
      if prev is None or prev[2] <= l:
        return e, t
      frac = (prev[2] - target) / (prev[2] - l)
      return (prev[0] + frac * (e - prev[0]), prev[1] + frac * (t - prev[1]))
    prev = (e, t, l)
  return None, None


def _mean_std(xs):
  xs = [x for x in xs if x is not None and math.isfinite(x)]
  if not xs:
    return None, None
  return float(np.mean(xs)), float(np.std(xs))


def interleaved_step_times(steps: Dict[str, tuple], *, rounds: int = 10,
                           steps_per_round: int = 5) -> Dict[str, float]:
  """Median per-step time (ms) of compiled steps timed round-robin.

  Each round times ``steps_per_round`` consecutive steps of every method,
  starting again from the kept post-warm-up inputs, so a load spike from
  another process hits every method alike: the ratios are the robust ones.

  Args:
    steps: method -> ``(compiled_step, (params, opt_state, batch))``.
    rounds: rounds (the median is over rounds).
    steps_per_round: steps per method per round.
  """
  per_round: Dict[str, list] = {name: [] for name in steps}
  for _ in range(int(rounds)):
    for name, (fn, (params, state, batch)) in steps.items():
      p, st = params, state
      t = time.perf_counter()
      for _ in range(int(steps_per_round)):
        p, st, loss = fn(p, st, batch)
      jax.block_until_ready(loss)
      per_round[name].append((time.perf_counter() - t) / steps_per_round)
  return {name: float(np.median(v)) * 1e3 for name, v in per_round.items()}


def _step_ms(entry: Dict[str, Any], stat: str = "median") -> Optional[float]:
  """Median over a method's runs, grid runs included, of each run's median
  (or other ``stat``) step time: every learning rate costs the same per
  step, so the grid runs make the estimate robust to load spikes on a
  shared machine."""
  times = [r["step_time_ms"][stat] for r in entry["runs"]
           if r["status"] == "ok" and r["step_time_ms"]]
  seen_lr_seed0 = {r["lr"] for r in entry["runs"] if r["seed"] ==
                   (entry["runs"][0]["seed"] if entry["runs"] else None)}
  key = "step_time_ms" if stat == "median" else f"step_time_{stat}_ms"
  times += [g[key] for g in entry.get("grid", ())
            if g.get(key) and g["lr"] not in seen_lr_seed0]
  return float(np.median(times)) if times else None


def _summarise(runs: List[dict], target: Optional[float],
               ref_step_ms: Optional[float],
               step_ms: Optional[float] = None) -> Dict[str, Any]:
  ok = [r for r in runs if r["status"] == "ok"]
  finals = [_final_loss(r) for r in ok]
  mean, std = _mean_std(finals)
  test_losses = [r["history"]["test_loss"][-1] for r in ok
                 if r["history"]["test_loss"]]
  accs = [r["history"]["test_accuracy"][-1] for r in ok
          if r["history"]["test_accuracy"]]
  if step_ms is None:
    steps = [r["step_time_ms"]["median"] for r in ok if r["step_time_ms"]]
    step_ms = float(np.median(steps)) if steps else None
  s = {
      "num_runs": len(runs), "num_ok": len(ok),
      "num_diverged": sum(bool(r["diverged"]) for r in ok),
      "final_train_loss": mean, "final_train_loss_std": std,
      "final_test_loss": _mean_std(test_losses)[0],
      "final_test_accuracy": _mean_std(accs)[0],
      "step_time_ms": step_ms,
      "step_time_ratio": (step_ms / ref_step_ms
                          if step_ms and ref_step_ms else None),
      "train_time_s": _mean_std([r["train_time_s"] for r in ok])[0],
      "compile_time_s": _mean_std([r["compile_time_s"] for r in ok])[0],
      "epochs_to_target": None, "time_to_target_s": None,
      "reached_target": None,
  }
  if target is not None and ok:
    hits = [_time_to_target(r, target) for r in ok]
    reached = [h for h in hits if h[0] is not None]
    s["reached_target"] = f"{len(reached)}/{len(ok)}"
    if reached:
      s["epochs_to_target"] = float(np.mean([h[0] for h in reached]))
      s["time_to_target_s"] = float(np.mean([h[1] for h in reached]))
  return s


def summarise_results(results: Dict[str, Any]) -> Dict[str, Any]:
  """(Re)computes the target and every method's summary from the runs.

  The target is the reference method's mean final train loss; step-time
  ratios divide by the reference's step time (median and 10th percentile,
  the latter less sensitive to other processes on a shared machine).
  """
  reference = results["config"]["reference"]
  ref = results["methods"].get(reference)
  ref_runs = [r for r in (ref or {}).get("runs", []) if r["status"] == "ok"]
  target = ref_ms = ref_p10 = None
  results["target"] = None
  if ref_runs:
    target = _mean_std([_final_loss(r) for r in ref_runs])[0]
    ref_ms = _step_ms(ref)
    ref_p10 = _step_ms(ref, "p10")
    results["target"] = {"method": reference, "train_loss": target,
                         "lr": ref.get("lr"), "step_time_ms": ref_ms,
                         "step_time_p10_ms": ref_p10}
  for entry in results["methods"].values():
    if entry["runs"]:
      s = _summarise(entry["runs"], target, ref_ms, _step_ms(entry))
      p10 = _step_ms(entry, "p10")
      s["step_time_p10_ms"] = p10
      s["step_time_ratio_p10"] = p10 / ref_p10 if p10 and ref_p10 else None
      inter = entry.get("interleaved_step_time_ms")
      ref_inter = (ref or {}).get("interleaved_step_time_ms")
      s["interleaved_step_time_ms"] = inter
      s["step_time_ratio_interleaved"] = (inter / ref_inter
                                          if inter and ref_inter else None)
      entry["summary"] = s
  return results


def _environment() -> Dict[str, Any]:
  import flax  # pylint: disable=import-outside-toplevel
  try:
    import optax_layerwise as olw  # pylint: disable=import-outside-toplevel
    olw_version = getattr(olw, "__version__", "?")
  except ImportError:  # pragma: no cover
    olw_version = None
  try:
    load = os.getloadavg()
  except OSError:  # pragma: no cover
    load = None
  git = {}
  try:
    import subprocess  # pylint: disable=import-outside-toplevel
    root = pathlib.Path(__file__).resolve().parent.parent
    git["commit"] = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
        text=True, timeout=5, check=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "optax_layerwise"], cwd=root,
        capture_output=True, text=True, timeout=5, check=True).stdout
    git["library_modified"] = bool(dirty.strip())
  except Exception:  # pylint: disable=broad-except
    pass
  return {
      "git": git,
      "jax": jax.__version__, "optax": optax.__version__,
      "flax": flax.__version__, "optax_layerwise": olw_version,
      "python": platform.python_version(), "platform": platform.platform(),
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "cpu_count": os.cpu_count(), "load_average_at_start": load,
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
  }


def _log(msg: str, progress: bool) -> None:
  if progress:
    try:
      from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
      tqdm.write(msg)
      return
    except ImportError:  # pragma: no cover
      pass
  print(msg, flush=True)


def run_benchmark(exp: Experiment, methods: Sequence[str], *,
                  seeds: Sequence[int] = (0,), epochs: Optional[int] = None,
                  tune: Sequence[str] = (),
                  lr_grids: Optional[Dict[str, Sequence[float]]] = None,
                  lrs: Optional[Dict[str, float]] = None,
                  reference: str = "adam", evals_per_epoch: int = 1,
                  max_steps: Optional[int] = None,
                  timing_rounds: int = 10,
                  out_dir: Optional[str] = None, plots: bool = True,
                  progress: bool = True, verbose: bool = True,
                  on_eval: Optional[Callable[[Dict[str, Any]], None]] = None
                  ) -> Dict[str, Any]:
  """Runs ``methods`` on ``exp`` and writes the table, JSON and plots.

  Args:
    exp: the experiment.
    methods: names from :data:`METHODS` (unknown or unavailable ones are
      reported and skipped).
    seeds: one run per seed at the chosen learning rate.
    epochs: epochs per run (``None``: the experiment's default).
    tune: methods whose learning rate is picked from a grid (by the final
      full train loss of the first seed).
    lr_grids: grids overriding :attr:`Method.lr_grid`.
    lrs: fixed learning rates overriding :attr:`Method.default_lr`.
    reference: the method whose final train loss is the target of the
      "epochs/time to target" columns and whose step time is the
      denominator of the ratios (if it ran).
    evals_per_epoch: full-split evaluations per epoch.
    max_steps: cap on the steps of every run (smoke tests).
    timing_rounds: after training, time the compiled steps of all methods
      round-robin for this many rounds of 5 steps (0: skip); the table's
      "x ref" column uses these ratios when present.
    out_dir: where ``results.json`` and the PNGs go (``None``: nowhere).
    plots: write the PNG plots.
    progress: tqdm bars.
    verbose: print the table and the paths.
    on_eval: passed to :func:`run_single` (progress of long runs).

  Returns:
    The results dict that is also written to ``results.json``.
  """
  lr_grids = dict(lr_grids or {})
  lrs = dict(lrs or {})
  seeds = [int(s) for s in seeds]
  epochs = exp.default_epochs if epochs is None else int(epochs)
  methods = list(dict.fromkeys(methods))
  results: Dict[str, Any] = {
      "schema_version": SCHEMA_VERSION,
      "experiment": dict(
          exp.info, name=exp.name, description=exp.description,
          num_train=exp.num_train, num_test=exp.num_test,
          batch_size=exp.batch_size, steps_per_epoch=exp.steps_per_epoch,
          num_params=None),
      "config": {"methods": methods, "seeds": seeds, "epochs": epochs,
                 "tune": list(tune), "lr_grids": {}, "reference": reference,
                 "timing_rounds": timing_rounds,
                 "evals_per_epoch": evals_per_epoch, "max_steps": max_steps},
      "environment": _environment(),
      "target": None,
      "methods": {},
      "plots": {},
  }
  try:
    params0 = exp.init_fn(jax.random.PRNGKey(0))
    results["experiment"]["num_params"] = int(sum(
        np.size(x) for x in jax.tree_util.tree_leaves(params0)))
  except Exception:  # pylint: disable=broad-except  # pragma: no cover
    pass
  device_data = {"train": jax.device_put(exp.train),
                 "test": None if exp.test is None else jax.device_put(
                     exp.test),
                 "evaluator": _Evaluator(exp)}
  kept_steps: Dict[str, tuple] = {}

  for name in methods:
    m = METHODS.get(name)
    entry: Dict[str, Any] = {
        "label": m.label if m else name, "status": "ok", "reason": None,
        "lr": None, "tuned": False, "grid": [], "runs": [], "summary": {}}
    results["methods"][name] = entry
    tx, reason = resolve_method(name) if m else (None, None)
    if m is None or tx is None:
      entry.update(status="unavailable",
                   reason=reason or f"unknown method {name!r}")
      _log(f"[skip] {name}: {entry['reason']}", progress)
      continue
    common = dict(epochs=epochs, evals_per_epoch=evals_per_epoch,
                  on_eval=on_eval,
                  max_steps=max_steps, progress=progress,
                  device_data=device_data, keep_step=timing_rounds > 0)
    lr = lrs.get(name, m.default_lr)
    grid_runs = []
    if name in tune and m.default_lr is not None:
      grid = tuple(lr_grids.get(name, m.lr_grid))
      results["config"]["lr_grids"][name] = list(grid)
      for g in grid:
        run = run_single(exp, name, lr=g, seed=seeds[0], **common)
        grid_runs.append(run)
        entry["grid"].append({"lr": g, "status": run["status"],
                              "diverged": run["diverged"],
                              "final_train_loss": _finite(_final_loss(run)),
                              "step_time_ms": (run["step_time_ms"] or {}).get(
                                  "median"),
                              "step_time_p10_ms": (run["step_time_ms"]
                                                   or {}).get("p10")})
        _log(f"  {name} lr={g:g}: final train loss "
             f"{format_number(_final_loss(run))}{' (diverged)' if run['diverged'] else ''}"
             f"{' ' + run['status'] + ': ' + str(run['reason']) if run['status'] != 'ok' else ''}",
             progress)
      best = min(range(len(grid)), key=lambda i: _final_loss(grid_runs[i]))
      lr = grid[best]
      entry.update(tuned=True)
      runs = [grid_runs[best]] + [
          run_single(exp, name, lr=lr, seed=s, **common) for s in seeds[1:]]
    else:
      runs = [run_single(exp, name, lr=lr, seed=s, **common) for s in seeds]
    entry["lr"] = lr if m.default_lr is not None else None
    if runs[0].get("_step") is not None and runs[0]["status"] == "ok":
      kept_steps[name] = runs[0]["_step"]
    for r in runs + (grid_runs if entry["tuned"] else []):
      r.pop("_step", None)
    entry["runs"] = runs
    statuses = {r["status"] for r in runs}
    if statuses == {"unavailable"} or statuses == {"failed"}:
      entry["status"] = runs[0]["status"]
      entry["reason"] = runs[0]["reason"]
      _log(f"[{entry['status']}] {name}: {entry['reason']}", progress)
    elif "failed" in statuses:
      entry["reason"] = "; ".join(sorted({str(r["reason"]) for r in runs
                                          if r["status"] == "failed"}))

  if kept_steps and timing_rounds > 0:
    _log(f"timing {len(kept_steps)} compiled steps round-robin "
         f"({timing_rounds} rounds x 5 steps)", progress)
    try:
      inter = interleaved_step_times(kept_steps, rounds=timing_rounds)
      for name, ms in inter.items():
        results["methods"][name]["interleaved_step_time_ms"] = ms
    except Exception as e:  # pylint: disable=broad-except
      _log(f"[warn] interleaved timing failed: {type(e).__name__}: {e}",
           progress)
  kept_steps.clear()
  summarise_results(results)

  if out_dir is not None:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if plots:
      try:
        from benchmarks import plots as plots_lib  # pylint: disable=import-outside-toplevel
        results["plots"] = plots_lib.plot_results(results, out)
      except Exception as e:  # pylint: disable=broad-except
        _log(f"[warn] plotting failed: {type(e).__name__}: {e}", progress)
    path = out / "results.json"
    with open(path, "w") as f:
      json.dump(_json_safe(results), f, indent=1, allow_nan=False)
    results["json"] = str(path)
  if verbose:
    print(format_table(results), flush=True)
    if out_dir is not None:
      print(f"\nResults: {results['json']}")
      for kind, p in results["plots"].items():
        print(f"Plot ({kind}): {p}")
  return results


def _json_safe(x):
  """Non-finite floats -> None, tuples -> lists, NumPy scalars -> Python."""
  if isinstance(x, dict):
    return {str(k): _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  if isinstance(x, (np.floating, float)):
    return float(x) if math.isfinite(x) else None
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.bool_):
    return bool(x)
  return x


def format_number(x, digits=4, missing="-") -> str:
  """A short number for tables: ``missing`` for None, ``inf`` for non-finite."""
  if x is None:
    return missing
  if isinstance(x, float) and not math.isfinite(x):
    return "inf"
  return f"{x:.{digits}g}"


def format_table(results: Dict[str, Any]) -> str:
  """The human-readable summary table of a results dict."""
  exp = results["experiment"]
  target = results.get("target")
  lines = [
      f"\n{exp['name']}: {exp['description']}",
      f"  {exp.get('architecture', '')}  params={exp.get('num_params')}  "
      f"batch={exp['batch_size']}  steps/epoch={exp['steps_per_epoch']}  "
      f"epochs={results['config']['epochs']}  seeds={results['config']['seeds']}",
  ]
  if target:
    lines.append(f"  target = {target['method']}'s final train loss "
                 f"{format_number(target['train_loss'])} (lr {format_number(target['lr'])})")
  has_acc = any((e.get("summary") or {}).get("final_test_accuracy") is not None
                for e in results["methods"].values())
  header = ["method", "lr", "train loss", "test loss"]
  if has_acc:
    header.append("test acc")
  header += ["ep->target", "s->target", "ms/step", "x ref", "train s",
             "status"]
  rows = [header]
  for name, e in results["methods"].items():
    s = e.get("summary") or {}
    m = METHODS.get(name)
    if e["lr"] is not None:
      lr = f"{e['lr']:g}" + ("*" if e["tuned"] else "")
    else:
      lr = "auto" if m and m.default_lr is None else "-"
    loss = format_number(s.get("final_train_loss"))
    if s.get("final_train_loss_std") and s.get("num_ok", 0) > 1:
      loss += f"±{s['final_train_loss_std']:.2g}"
    status = e["status"]
    if status == "ok" and s.get("num_diverged"):
      status = f"diverged {s['num_diverged']}/{s['num_ok']}"
    if status == "ok" and s.get("reached_target") and target:
      status = f"ok, reached {s['reached_target']}"
    row = [name, lr, loss, format_number(s.get("final_test_loss"))]
    if has_acc:
      acc = s.get("final_test_accuracy")
      row.append("-" if acc is None else f"{100 * acc:.1f}%")
    row += [format_number(s.get("epochs_to_target"), 3),
            format_number(s.get("time_to_target_s"), 3), format_number(s.get("step_time_ms"), 3),
            format_number(s.get("step_time_ratio_interleaved")
                 or s.get("step_time_ratio"), 3),
            format_number(s.get("train_time_s"), 3),
            status]
    rows.append(row)
  widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
  for i, r in enumerate(rows):
    lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    if i == 0:
      lines.append("  " + "  ".join("-" * w for w in widths))
  inter = any((e.get("summary") or {}).get("step_time_ratio_interleaved")
              for e in results["methods"].values())
  lines.append(
      "  ms/step: median step time during training (excl. compile/eval); "
      "x ref: step time / the reference's"
      + (", timed round-robin after training" if inter else "")
      + "; ep/s->target: first reach of the target (interpolated)")
  notes = [f"  {n}: {e['reason']}" for n, e in results["methods"].items()
           if e["status"] != "ok" or e.get("reason")]
  if notes:
    lines.append("  not run / failed:")
    lines.extend(notes)
  counters = [(n, e["runs"][0]) for n, e in results["methods"].items()
              if e["runs"] and e["runs"][0].get("counters")]
  if counters:
    lines.append("  optimiser-state counters at the end of the first run "
                 "(per layer where a list):")
    for n, r in counters:
      cells = []
      for k, v in r["counters"].items():
        short = k.split(".")[-1]
        if isinstance(v, list):
          cells.append(f"{short}={'/'.join(str(x) for x in v)}")
        else:
          cells.append(f"{short}={v}")
      lines.append(f"    {n} ({r['num_steps']} steps): " + ", ".join(cells))
  grids = [(n, e["grid"]) for n, e in results["methods"].items() if e["grid"]]
  if grids:
    lines.append("  LR grids (final train loss, seed "
                 f"{results['config']['seeds'][0]}; * = chosen):")
    for n, grid in grids:
      cells = ", ".join(f"{g['lr']:g}: {format_number(g['final_train_loss'])}"
                        + ("*" if g["lr"] == results["methods"][n]["lr"] else "")
                        for g in grid)
      lines.append(f"    {n}: {cells}")
  return "\n".join(lines)


# --------------------------------------------------------------------------
# Schema check (used by the tests; handy for downstream tools)
# --------------------------------------------------------------------------

_RUN_KEYS = {"method", "lr", "seed", "status", "reason", "diverged", "epochs",
             "num_steps", "compile_time_s", "train_time_s", "step_time_ms",
             "history", "batch_loss", "diagnostics", "counters"}
_HISTORY_KEYS = {"epoch", "step", "time_s", "train_loss", "test_loss",
                 "test_accuracy"}
_SUMMARY_KEYS = {"num_runs", "num_ok", "num_diverged", "final_train_loss",
                 "final_train_loss_std", "final_test_loss",
                 "final_test_accuracy", "step_time_ms", "step_time_ratio",
                 "train_time_s", "compile_time_s", "epochs_to_target",
                 "time_to_target_s", "reached_target"}


def validate_results(results: Dict[str, Any]) -> None:
  """Raises ``ValueError`` if ``results`` does not follow the JSON schema."""

  def need(d, keys, where):
    missing = set(keys) - set(d)
    if missing:
      raise ValueError(f"{where}: missing keys {sorted(missing)}")

  need(results, {"schema_version", "experiment", "config", "environment",
                 "target", "methods", "plots"}, "results")
  if results["schema_version"] != SCHEMA_VERSION:
    raise ValueError(f"schema_version {results['schema_version']}")
  need(results["experiment"], {"name", "description", "num_train",
                               "batch_size", "steps_per_epoch", "num_params"},
       "experiment")
  need(results["config"], {"methods", "seeds", "epochs", "tune", "reference"},
       "config")
  for name, e in results["methods"].items():
    need(e, {"label", "status", "reason", "lr", "tuned", "grid", "runs",
             "summary"}, f"methods.{name}")
    if e["status"] not in ("ok", "unavailable", "failed"):
      raise ValueError(f"methods.{name}.status = {e['status']!r}")
    if e["status"] != "ok" and not e["reason"]:
      raise ValueError(f"methods.{name}: status {e['status']} without reason")
    if e["runs"]:
      need(e["summary"], _SUMMARY_KEYS, f"methods.{name}.summary")
    for i, r in enumerate(e["runs"]):
      need(r, _RUN_KEYS, f"methods.{name}.runs[{i}]")
      need(r["history"], _HISTORY_KEYS, f"methods.{name}.runs[{i}].history")
      n = len(r["history"]["step"])
      for k in _HISTORY_KEYS:
        if len(r["history"][k]) != n:
          raise ValueError(f"methods.{name}.runs[{i}].history.{k}: length "
                           f"{len(r['history'][k])} != {n}")
      if r["status"] == "ok" and n < 2:
        raise ValueError(f"methods.{name}.runs[{i}]: fewer than 2 evaluations")
      for field, d in r["diagnostics"].items():
        need(d, {"labels", "step", "values"},
             f"methods.{name}.runs[{i}].diagnostics.{field}")
        if any(len(v) != len(d["labels"]) for v in d["values"]):
          raise ValueError(f"methods.{name}.runs[{i}].diagnostics.{field}: "
                           "a row's length differs from the labels'")
