"""Runs methods on an experiment: learning-rate grids, seeds, timing, outputs.

For each method (by name, from a :mod:`benchmarks.methods` registry) the
runner trains from the same initial params and the same data order (per
seed) with the shared loop (:mod:`benchmarks.loop`: the whole step under one
:func:`jax.jit`). Wall time excludes compilation (ahead-of-time compile plus
one discarded warm-up step) and evaluation; every step is timed to
completion. A method that cannot be built, or fails, is reported with the
reason and skipped: it never stops the other runs. After training, the
methods' compiled steps are timed side by side (:mod:`benchmarks.timing`).

Outputs (:func:`run_benchmark`): a :class:`~benchmarks.results.BenchmarkResult`,
a printed table, ``results.json`` and PNG plots (train loss vs epochs, vs
wall-clock time, per-layer step sizes of the layer-wise methods).
"""

from __future__ import annotations

import itertools
import os
import pathlib
import time
import traceback
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from benchmarks import loop
from benchmarks import methods as methods_lib
from benchmarks import report
from benchmarks.diagnostics import find_counters, find_diagnostics, layer_labels
from benchmarks.experiments import Experiment
from benchmarks.methods import METHODS, Method
from benchmarks.results import (BenchmarkResult, GridPoint, MethodResult, Run,
                                environment, finite)
from benchmarks.results import validate as validate_results  # docs cite it
from benchmarks.summary import summarise
from benchmarks.timing import AMORTISING_CALLS, Carried, time_side_by_side

__all__ = ["run_single", "run_benchmark", "validate_results"]

Timer = Callable[[], Any]


class DeviceData:
  """An experiment's splits on device and their evaluator, shared by runs."""

  def __init__(self, exp: Experiment):
    self.train = jax.device_put(exp.train)
    self.test = None if exp.test is None else jax.device_put(exp.test)
    self.evaluate = loop.Evaluator(exp.metrics_fn, exp.full_batch)


class _Recorder:
  """Fills a :class:`Run` from the training loop's hooks."""

  def __init__(self, run: Run, exp: Experiment, data: DeviceData,
               diag_every: int, on_eval: Optional[Callable[[Run], None]]):
    self.run, self.exp, self.data = run, exp, data
    self.diag_every, self.on_eval = diag_every, on_eval

  def evaluate(self, step, params, state, elapsed) -> float:
    del state
    train = self.data.evaluate(params, self.data.train)
    test = self.data.evaluate(params, self.data.test)
    self.run.history.append(step / self.exp.steps_per_epoch, step, elapsed,
                            train["loss"], test.get("loss"),
                            test.get("accuracy"))
    if self.on_eval is not None:
      self.on_eval(self.run)
    return train["loss"]

  def on_step(self, step, params, state, loss) -> None:
    self.run.batch_loss["step"].append(step)
    self.run.batch_loss["loss"].append(finite(loss))
    if step % self.diag_every == 0:
      self.diagnose(step, params, state)

  def diagnose(self, step, params, state) -> None:
    for field, vec in find_diagnostics(state).items():
      d = self.run.diagnostics.setdefault(field, {
          "labels": layer_labels(params, int(vec.shape[0])), "step": [],
          "values": []})
      d["step"].append(int(step))
      d["values"].append([finite(v) for v in np.asarray(vec)])

  def finish(self, log: loop.Log, state) -> None:
    self.run.counters = find_counters(state)
    h = self.run.history
    if log.diverged:
      self.run.diverged = True
      steps = len(log.seconds)
      if h.step[-1] != steps:
        h.append(steps / self.exp.steps_per_epoch, steps, log.elapsed, None)


def _start(exp: Experiment, tx, data: DeviceData, seed: int, run: Run):
  """Initial params and state, the batches, the compiled step (compile time
  in ``run``) and a timer of it starting after one warm-up step."""
  params = exp.init_fn(jax.random.PRNGKey(seed))
  state = tx.init(params)
  rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
  batches = (itertools.repeat(data.train) if exp.full_batch else
             loop.shuffled_batches(data.train, exp.batch_size, rng))
  first = next(batches)
  start = time.perf_counter()
  step = loop.make_step(exp.loss_fn, tx).lower(params, state, first).compile()
  run.compile_time_s = time.perf_counter() - start
  warm = jax.block_until_ready(step(params, state, first))
  timer = Carried(step, warm[0], warm[1], first)
  return step, params, state, itertools.chain([first], batches), timer


def run_single(exp: Experiment, method: str, *,
               methods: Optional[Mapping[str, Method]] = None,
               lr: Optional[float] = None, seed: int = 0,
               epochs: Optional[int] = None, evals_per_epoch: int = 1,
               max_steps: Optional[int] = None, diag_points: int = 200,
               progress: bool = True, data: Optional[DeviceData] = None,
               on_eval: Optional[Callable[[Run], None]] = None
               ) -> Tuple[Run, Optional[Timer]]:
  """Trains ``exp`` with one method, learning rate and seed.

  Args:
    exp: the experiment.
    method: a name in ``methods`` (default :data:`~benchmarks.methods.METHODS`).
    lr: learning rate (``None``: the method's default).
    seed: seeds the initial params and the data order.
    epochs: epochs (``None``: the experiment's default).
    evals_per_epoch: full train/test evaluations per epoch (plus one at
      initialisation).
    max_steps: stop after this many steps in total (smoke tests).
    diag_points: about how many times the per-layer diagnostics are read.
    progress: show a progress bar.
    data: the experiment's :class:`DeviceData` (reused across runs).
    on_eval: called with the (partial) run after every evaluation, e.g. to
      save the progress of a long run.

  Returns:
    The run, and a zero-argument callable advancing its compiled step from
    the warm-up's output (for side-by-side timing; ``None`` if no step
    compiled).
  """
  methods = METHODS if methods is None else methods
  m = methods.get(method)
  lr = lr if lr is not None else (m.default_lr if m else None)
  epochs = exp.default_epochs if epochs is None else int(epochs)
  run = Run(method=method, lr=lr, seed=int(seed), epochs=epochs)
  tx, reason = methods_lib.resolve(method, lr, methods)
  if tx is None:
    run.status, run.reason = "unavailable", reason
    return run, None
  data = data or DeviceData(exp)
  total = epochs * exp.steps_per_epoch
  total = total if max_steps is None else min(total, int(max_steps))
  rec = _Recorder(run, exp, data, max(1, total // max(1, diag_points)),
                  on_eval)
  log, timer = loop.Log(), None
  try:
    step, params, state, batches, timer = _start(exp, tx, data, seed, run)
    rec.evaluate(0, params, state, 0.0)
    rec.diagnose(0, params, state)
    _, state, log = loop.train(
        step, params, state, batches, total, log=log,
        eval_every=max(1, exp.steps_per_epoch // max(1, evals_per_epoch)),
        on_step=rec.on_step, on_eval=rec.evaluate,
        progress=f"{exp.name} {method} lr={lr} seed={seed}" if progress
        else None)
    rec.finish(log, state)
  except Exception as e:  # pylint: disable=broad-except
    run.status, run.reason = "failed", f"{type(e).__name__}: {e}"[:2000]
    run.traceback = traceback.format_exc(limit=4)[-4000:]
  run.set_step_times(log.seconds)
  run.load_average_at_end = list(os.getloadavg())
  return run, timer


def _log(msg: str, progress: bool) -> None:
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    tqdm.write(msg)
  else:
    print(msg, flush=True)


def _grid_line(name: str, run: Run) -> str:
  diverged = " (diverged)" if run.diverged else ""
  failed = f" {run.status}: {run.reason}" if run.status != "ok" else ""
  return (f"  {name} lr={run.lr:g}: final train loss "
          f"{report.format_number(finite(run.final_loss))}{diverged}{failed}")


def _set_status(entry: MethodResult, name: str, progress: bool) -> None:
  statuses = {r.status for r in entry.runs}
  if statuses in ({"unavailable"}, {"failed"}):
    entry.status, entry.reason = entry.runs[0].status, entry.runs[0].reason
    _log(f"[{entry.status}] {name}: {entry.reason}", progress)
  elif "failed" in statuses:
    entry.reason = "; ".join(sorted({str(r.reason) for r in entry.runs
                                     if r.status == "failed"}))


def _run_method(exp: Experiment, name: str, methods: Mapping[str, Method],
                seeds: Sequence[int], lr: Optional[float],
                grid: Optional[Sequence[float]], progress: bool,
                **run_kw) -> Tuple[MethodResult, Optional[Timer]]:
  """A method's runs: its grid on the first seed (if ``grid``), then every
  seed at the chosen (or given) learning rate."""
  m = methods.get(name)
  entry = MethodResult(label=m.label if m else name)
  tx, reason = methods_lib.resolve(name, None, methods)
  if tx is None:
    entry.status, entry.reason = "unavailable", reason
    _log(f"[skip] {name}: {reason}", progress)
    return entry, None
  train = lambda lr, seed: run_single(exp, name, methods=methods, lr=lr,  # noqa: E731
                                      seed=seed, progress=progress, **run_kw)
  if grid:
    tried = []
    for g in grid:
      tried.append(train(g, seeds[0]))
      entry.grid.append(GridPoint.of(tried[-1][0]))
      _log(_grid_line(name, tried[-1][0]), progress)
    best = min(range(len(grid)), key=lambda i: tried[i][0].final_loss)
    lr, first = grid[best], tried[best]
    entry.tuned = True
    del tried
  else:
    first = train(lr, seeds[0])
  entry.runs = [first[0]] + [train(lr, s)[0] for s in seeds[1:]]
  entry.lr = lr if m.default_lr is not None else None
  _set_status(entry, name, progress)
  return entry, first[1] if entry.runs[0].status == "ok" else None


def _time_side_by_side(result: BenchmarkResult, timers: Dict[str, Timer],
                       rounds: int, progress: bool) -> None:
  """Each method's compiled step timed round-robin (``AMORTISING_CALLS``
  steps a round, so a step measured every 40 is amortised)."""
  if not timers or rounds <= 0:
    return
  _log(f"timing {len(timers)} compiled steps round-robin ({rounds} rounds x "
       f"{AMORTISING_CALLS} steps)", progress)
  reference = result.config["reference"]
  try:
    times = time_side_by_side(
        timers, baseline=reference if reference in timers else next(
            iter(timers)), rounds=rounds, calls_per_round=AMORTISING_CALLS,
        progress=False)
  except Exception as e:  # pylint: disable=broad-except
    _log(f"[warn] interleaved timing failed: {type(e).__name__}: {e}",
         progress)
    return
  for name, t in times.items():
    result.methods[name].interleaved_step_time_ms = t["median_ms"]


def _experiment_info(exp: Experiment) -> Dict[str, Any]:
  params = jax.eval_shape(exp.init_fn, jax.random.PRNGKey(0))
  return dict(exp.info, name=exp.name, description=exp.description,
              num_train=exp.num_train, num_test=exp.num_test,
              batch_size=exp.batch_size, steps_per_epoch=exp.steps_per_epoch,
              num_params=int(sum(np.prod(x.shape) for x in
                                 jax.tree_util.tree_leaves(params))))


def write_outputs(result: BenchmarkResult, out_dir, *, plots: bool = True,
                  progress: bool = False) -> pathlib.Path:
  """Writes the PNG plots (if ``plots``) and ``results.json`` into
  ``out_dir``; returns the JSON's path."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  if plots:
    try:
      from benchmarks import plots as plots_lib  # pylint: disable=import-outside-toplevel
      result.plots = plots_lib.plot_results(result.to_json(), out)
    except Exception as e:  # pylint: disable=broad-except
      _log(f"[warn] plotting failed: {type(e).__name__}: {e}", progress)
  result.write(out / "results.json")
  return out / "results.json"


def run_benchmark(exp: Experiment, methods: Sequence[str], *,
                  registry: Optional[Mapping[str, Method]] = None,
                  seeds: Sequence[int] = (0,), epochs: Optional[int] = None,
                  tune: Sequence[str] = (),
                  lr_grids: Optional[Dict[str, Sequence[float]]] = None,
                  lrs: Optional[Dict[str, float]] = None,
                  reference: str = "adam", evals_per_epoch: int = 1,
                  max_steps: Optional[int] = None, timing_rounds: int = 10,
                  out_dir: Optional[str] = None, plots: bool = True,
                  progress: bool = True, verbose: bool = True,
                  on_eval: Optional[Callable[[Run], None]] = None
                  ) -> BenchmarkResult:
  """Runs ``methods`` on ``exp`` and writes the table, JSON and plots.

  Args:
    exp: the experiment.
    methods: names in ``registry`` (unknown or unavailable ones are reported
      and skipped).
    registry: the methods by name (default :data:`~benchmarks.methods.METHODS`).
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
    progress: progress bars.
    verbose: print the table and the paths.
    on_eval: passed to :func:`run_single` (progress of long runs).
  """
  registry = METHODS if registry is None else registry
  lr_grids, lrs = dict(lr_grids or {}), dict(lrs or {})
  seeds = [int(s) for s in seeds]
  epochs = exp.default_epochs if epochs is None else int(epochs)
  methods = list(dict.fromkeys(methods))
  result = BenchmarkResult(
      experiment=_experiment_info(exp), environment=environment(),
      config={"methods": methods, "seeds": seeds, "epochs": epochs,
              "tune": list(tune), "lr_grids": {}, "reference": reference,
              "timing_rounds": timing_rounds,
              "evals_per_epoch": evals_per_epoch, "max_steps": max_steps})
  data, timers = DeviceData(exp), {}
  for name in methods:
    m = registry.get(name)
    grid = None
    if m is not None and name in tune and m.default_lr is not None:
      grid = tuple(lr_grids.get(name, m.lr_grid))
      result.config["lr_grids"][name] = list(grid)
    entry, timer = _run_method(
        exp, name, registry, seeds, lrs.get(name, m and m.default_lr), grid,
        progress, epochs=epochs, evals_per_epoch=evals_per_epoch,
        max_steps=max_steps, data=data, on_eval=on_eval)
    result.methods[name] = entry
    if timer is not None and timing_rounds > 0:
      timers[name] = timer
  _time_side_by_side(result, timers, timing_rounds, progress)
  timers.clear()
  summarise(result)
  if out_dir is not None:
    path = write_outputs(result, out_dir, plots=plots, progress=progress)
  if verbose:
    print(report.format_table(result.to_json()), flush=True)
    if out_dir is not None:
      print(f"\nResults: {path}")
      for kind, p in result.plots.items():
        print(f"Plot ({kind}): {p}")
  return result
