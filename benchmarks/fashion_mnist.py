"""Fashion-MNIST with the K-BFGS paper's MNIST autoencoder and Flax's default
initialisation (issue 12, item 5).

    python -m benchmarks.fashion_mnist            # 60k images, batch 1000, 10 epochs
    python -m benchmarks.fashion_mnist --quick    # 5000 images, 2 epochs (~1-2 min)

The model is the K-BFGS paper's MNIST autoencoder
(784-1000-500-250-30-250-500-1000-784, ReLU, linear code and output layers),
initialised with Flax's ``nn.Dense`` default (LeCun-normal kernels, zero
biases: ``weight_init="lecun"`` of :class:`benchmarks.models.Autoencoder`),
trained on ALL 60,000 Fashion-MNIST training images with batch 1000 for 10
epochs. The loss is the sigmoid cross-entropy summed over the 784 pixels and
averaged over the batch; the table shows the loss over the FULL training set
after each epoch (test loss over the 10,000 test images is in the JSON).

Methods (``--methods``, comma-separated):

* ``adam``: ``optax.adam`` tuned over ``--adam-grid`` (3e-4, 1e-3, 3e-3); the
  learning rate with the best final train loss is "tuned Adam", whose final
  loss is the target of the "to Adam's loss" columns.
* ``kbfgs``: ``olw.kbfgs()`` at its defaults (nothing passed).
* ``kbfgs-l``: ``olw.kbfgs(memory_size=100)`` (K-BFGS(L)), other defaults.
* ``layerwise-adamw``, ``layerwise-sgd``: ``olw.layerwise_adamw()``,
  ``olw.layerwise_sgd()`` at their defaults (no learning rate; every layer
  is a ``nn.Dense``, so ``precondition="auto"`` preconditions them all).
* ``layerwise-adamw-plain`` (and, on request, ``layerwise-sgd-plain``):
  the same with ``precondition=None`` (the paper's direction).
* ``adamw`` (optional): ``optax.adamw(lr, weight_decay=1e-4)`` tuned over
  ``--adamw-grid``. Not trained by default; its step is still timed side by
  side (``--time-only``, the layer-wise AdamW's second baseline).

Step times: after training, every method's compiled step (at the chosen
learning rate) is timed side by side in interleaved rounds in the same
process (:func:`benchmarks.timing.time_side_by_side`), 40 consecutive steps
per method and round (:data:`benchmarks.timing.AMORTISING_CALLS`: the
layer-wise aliases' measurement every 40 steps is amortised); the ratios are the
median over rounds of the per-round ratio to Adam (and to AdamW). Wall times
to the target are measured during training (excluding compilation and
evaluation) and, since methods trained at different moments on a shared
machine see different loads, also re-estimated as "steps to the target x
side-by-side step time" (the ``adj`` columns).

Runs are cached per method under ``<out>/runs/`` (``--cache-dir``; keyed
by the configuration); ``--reuse adam,layerwise-sgd`` loads those methods' cached
runs instead of training them again (their commit is kept in the JSON and
printed), so methods whose code does not change can be trained in an earlier
process. The side-by-side timing always runs in the current process.

Outputs in ``results/fashion_mnist/`` (``--out``): ``results.json`` (the
runner's schema, :func:`benchmarks.results.validate`, plus a
``"fashion_mnist"`` section with the table), ``loss_vs_epoch.png``,
``loss_vs_time.png`` (each a full-range log panel and a zoomed linear panel)
and ``step_sizes.png``. If ``kfac_jax.json`` (from
:mod:`benchmarks.kfac_jax_compare`, run in its own environment) is in the
output directory its row is printed under the table.

Data: Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist``) or ``--data-dir`` (any directory of
MNIST-format IDX files); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import pathlib
import sys
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import optax_layerwise as olw
from benchmarks import loop
from benchmarks import methods as methods_lib
from benchmarks import models
from benchmarks import results as results_lib
from benchmarks import runner
from benchmarks.data import DataUnavailableError
from benchmarks.experiments import Experiment, mnist_ae
from benchmarks.methods import Method
from benchmarks.report import aligned, format_number
from benchmarks.results import BenchmarkResult, MethodResult, Run, write_json
from benchmarks.run import csv_list, float_list, int_list
from benchmarks.summary import summarise
from benchmarks.timing import (AMORTISING_CALLS, Carried, time_side_by_side,
                               time_to_target)

__all__ = ["build_experiment", "run", "main", "format_fm_table",
           "TABLE_EPOCHS"]

ALL_METHODS = ("adam", "adamw", "kbfgs", "kbfgs-l", "layerwise-adamw",
               "layerwise-sgd", "layerwise-adamw-plain",
               "layerwise-sgd-plain")
DEFAULT_METHODS = ("adam", "kbfgs", "kbfgs-l", "layerwise-adamw",
                   "layerwise-sgd", "layerwise-adamw-plain")
ADAM_GRID = (3e-4, 1e-3, 3e-3)
ADAMW_GRID = (3e-4, 1e-3, 3e-3)
TABLE_EPOCHS = (1, 2, 3, 5, 10)
KBFGS_L_MEMORY = 100
FULL = dict(n_train=60_000, n_test=10_000, epochs=10, timing_rounds=5,
            timing_calls=AMORTISING_CALLS)
QUICK = dict(n_train=5000, n_test=1000, epochs=2, timing_rounds=3,
             timing_calls=2)

# K-BFGS at its defaults: nothing passed, so a change of the library's
# defaults (learning rate or step rule) is what runs.
REGISTRY: Dict[str, Method] = dict(
    methods_lib.registry(),
    kbfgs=Method("kbfgs", "K-BFGS (defaults)", lambda lr: olw.kbfgs()),
    **{"kbfgs-l": Method("kbfgs-l", f"K-BFGS(L) (memory {KBFGS_L_MEMORY})",
                         lambda lr: olw.kbfgs(memory_size=KBFGS_L_MEMORY))})


def kbfgs_defaults() -> Dict[str, str]:
  """``olw.kbfgs``'s keyword defaults and the numeric constants of its
  modules (the automatic row strides, the bfloat16 width, the ``H_g``
  floor), and whether this backend multiplies bfloat16 natively (the
  automatic ``precondition_dtype``): a change of any is a change of what
  ``olw.kbfgs()`` runs (a change of code is not seen: clear the cache after
  one)."""
  defaults = {k: repr(p.default)
              for k, p in inspect.signature(olw.kbfgs).parameters.items()
              if p.default is not inspect.Parameter.empty}
  # pylint: disable-next=protected-access
  for module in (olw._kbfgs, olw._bfgs):
    defaults.update({f"{module.__name__}.{name}": repr(getattr(module, name))
                     for name in dir(module) if name.isupper()
                     and isinstance(getattr(module, name), (int, float))})
  # The automatic precondition_dtype depends on the hardware.
  # pylint: disable-next=protected-access
  defaults["native_bfloat16"] = repr(olw._hardware.native_bfloat16(
      jax.default_backend()))
  return defaults


# --------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------


def build_experiment(*, data_dir: Optional[str] = None,
                     n_train: Optional[int] = 60_000,
                     n_test: Optional[int] = 10_000, batch_size: int = 1000,
                     widths: Sequence[int] = models.MNIST_AE_WIDTHS,
                     weight_init: str = "lecun") -> Experiment:
  """``mnist-ae`` on Fashion-MNIST (never the CURVES fallback) with the
  autoencoder initialised by ``weight_init`` (Flax's default: ``"lecun"``).

  Raises:
    DataUnavailableError: no Fashion-MNIST IDX files (the message says how to
      install them or point ``--data-dir`` at them).
  """
  exp = mnist_ae(dataset="fashion-mnist", data_dir=data_dir, n_train=n_train,
                 n_test=n_test, batch_size=batch_size, widths=widths)
  # The experiment's model uses the authors' (torch) init; only init_fn
  # depends on it (same module names, so loss_fn applies unchanged).
  model = models.Autoencoder(tuple(widths), weight_init=weight_init)

  @jax.jit
  def init_fn(key):
    return model.init(key, jnp.zeros((1, widths[0]), jnp.float32))["params"]

  name = "fashion-mnist-ae"
  return dataclasses.replace(
      exp, name=name, init_fn=init_fn,
      description=f"{exp.description}, {weight_init} init",
      info=dict(exp.info, weight_init=weight_init,
                init_note=("lecun: Flax nn.Dense default (LeCun-normal "
                           "kernels, zero biases)"
                           if weight_init == "lecun" else weight_init)))


# --------------------------------------------------------------------------
# Per-method cache of runs
# --------------------------------------------------------------------------


class _Cache:
  """Each method's finished entry as ``<dir>/<name>-<key>.json``, keyed by
  the configuration (and the method's grid; for K-BFGS also the library's
  defaults, :func:`kbfgs_defaults`), plus a ``.partial.json`` of an
  unfinished run, saved after every evaluation."""

  def __init__(self, directory: pathlib.Path, base_cfg: Dict[str, Any],
               grids: Dict[str, Sequence[float]]):
    self.dir, self.base_cfg, self.grids = directory, base_cfg, grids
    directory.mkdir(parents=True, exist_ok=True)

  def path(self, name: str, grid=None) -> pathlib.Path:
    grid = self.grids.get(name, ()) if grid is None else grid
    cfg = dict(self.base_cfg, grid=list(grid) or None, method=name)
    if name.startswith("kbfgs"):  # runs at the library's defaults
      cfg["kbfgs_defaults"] = kbfgs_defaults()
    key = hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode()
                       ).hexdigest()[:12]
    return self.dir / f"{name}-{key}.json"

  def partial(self, name: str) -> pathlib.Path:
    path = self.path(name)
    return path.with_name(path.stem + ".partial.json")

  def _read(self, path: pathlib.Path) -> MethodResult:
    return MethodResult.from_json(json.loads(path.read_text()))

  def load(self, name: str) -> Optional[MethodResult]:
    """The cached entry (whole, merged from single-LR grid runs, or
    partial), or ``None``."""
    if self.path(name).exists():
      entry = self._read(self.path(name))
      print(f"[reuse] {name}: {self.path(name)} (commit "
            f"{(entry.cached_from or {}).get('commit')})", flush=True)
      return entry
    merged = self._merge_grid(name)
    if merged is not None:
      print(f"[reuse] {name}: merged the single-LR cached runs of its grid "
            f"{list(self.grids[name])}", flush=True)
      return merged
    if self.partial(name).exists():
      entry = self._read(self.partial(name))
      print(f"[reuse] {name}: PARTIAL run {self.partial(name)} "
            f"({entry.reason})", flush=True)
      return entry
    print(f"[reuse] {name}: no cached run {self.path(name).name}; training "
          "it", flush=True)
    return None

  def _merge_grid(self, name: str) -> Optional[MethodResult]:
    """A tuned method's entry assembled from single-LR cached runs (one
    process per grid point, e.g. ``--adam-grid 3e-4``); the best final train
    loss wins, as in the runner."""
    paths = [self.path(name, [lr]) for lr in self.grids.get(name, ())]
    if not paths or not all(p.exists() for p in paths):
      return None
    parts = [self._read(p) for p in paths]
    best = min(parts, key=lambda p: p.runs[0].final_loss)
    return dataclasses.replace(
        best, grid=[g for p in parts for g in p.grid],
        cached_from=dict(best.cached_from or {},
                         merged_from=[p.cached_from for p in parts]))

  def store(self, name: str, entry: MethodResult, env: Dict[str, Any]):
    """Caches a finished entry and drops its partial file."""
    stored = dataclasses.replace(entry, cached_from=_provenance(env))
    write_json(self.path(name), stored.to_json())
    if self.partial(name).exists():
      self.partial(name).unlink()

  def partial_saver(self, name: str, epochs: int, env: Dict[str, Any]):
    """``on_eval`` callback saving an unfinished run after every
    evaluation, so that an interrupted long run still counts."""

    def save(run: Run) -> None:
      h = run.history
      if len(h.step) < 2:
        return
      done = h.epoch[-1]
      run = dataclasses.replace(run, num_steps=h.step[-1],
                                train_time_s=h.time_s[-1], status="ok")
      m = REGISTRY[name]
      entry = MethodResult(
          label=m.label, lr=run.lr if m.default_lr is not None else None,
          reason=f"partial: {done:g} of {epochs} epochs (interrupted)",
          runs=[run], cached_from=dict(_provenance(env), partial=True,
                                       epochs_done=done))
      write_json(self.partial(name), entry.to_json())

    return save


def _provenance(env: Dict[str, Any]) -> Dict[str, Any]:
  git = env.get("git", {})
  return {"commit": git.get("commit"),
          "library_modified": git.get("library_modified"),
          "date": env.get("date"), "jax": env.get("jax")}


# --------------------------------------------------------------------------
# Side-by-side step timing
# --------------------------------------------------------------------------


def _step_callables(exp: Experiment, lrs: Dict[str, Optional[float]],
                    seed: int, warmup: int = 2):
  """name -> zero-argument callable advancing that method's own training
  state by one compiled step on the first mini-batch."""
  params0 = exp.init_fn(jax.random.PRNGKey(seed))
  batch = {k: jnp.asarray(v[:exp.batch_size]) for k, v in exp.train.items()}
  calls = {}
  for name, lr in lrs.items():
    tx, reason = methods_lib.resolve(name, lr, REGISTRY)
    if tx is None:
      print(f"[timing] skip {name}: {reason}", flush=True)
      continue
    calls[name] = Carried(loop.make_step(exp.loss_fn, tx), params0,
                          tx.init(params0), batch)
    for _ in range(warmup):
      calls[name]()
  return calls


def _ratio_to(timing: Dict[str, dict], name: str, base: str) -> Optional[float]:
  if name not in timing or base not in timing:
    return None
  s = np.asarray(timing[name]["samples_ms"])
  b = np.asarray(timing[base]["samples_ms"])
  return float(np.median(s / b))


# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------


def _loss_at_epoch(run: dict, epoch: float) -> Optional[float]:
  h = run["history"]
  for e, l in zip(h["epoch"], h["train_loss"]):
    if abs(e - epoch) < 1e-9:
      return l
  return None


def _fmt(x, digits=4, missing="-"):
  return format_number(x, digits, missing)


def table_epochs(epochs: int) -> List[int]:
  cols = [e for e in TABLE_EPOCHS if e <= epochs]
  if epochs not in cols:
    cols.append(epochs)
  return cols


def fm_rows(results: Dict[str, Any]) -> List[Dict[str, Any]]:
  """One dict per method: losses per epoch, to-target numbers, ratios."""
  epochs = results["config"]["epochs"]
  spe = results["experiment"]["steps_per_epoch"]
  timing = results.get("fashion_mnist", {}).get("side_by_side") or {}
  target = results.get("target") or {}
  adam_s = adam_adj = None
  adam_entry = results["methods"].get("adam")
  if adam_entry and adam_entry.get("summary"):
    adam_s = adam_entry["summary"].get("time_to_target_s")
    ep = adam_entry["summary"].get("epochs_to_target")
    if ep is not None and "adam" in timing:
      adam_adj = ep * spe * timing["adam"]["median_ms"] / 1e3
  rows = []
  for name, e in results["methods"].items():
    s = e.get("summary") or {}
    run = next((r for r in e["runs"] if r["status"] == "ok"), None)
    row: Dict[str, Any] = {
        "method": name, "label": e.get("label", name), "lr": e.get("lr"),
        "tuned": e.get("tuned", False), "status": e["status"],
        "reason": e.get("reason"),
        "diverged": bool(run and run["diverged"]),
        "loss_at_epoch": {str(k): (_loss_at_epoch(run, k) if run else None)
                          for k in table_epochs(epochs)},
        "initial_loss": (run["history"]["train_loss"][0] if run else None),
        "final_test_loss": s.get("final_test_loss"),
        "epochs_to_target": s.get("epochs_to_target"),
        "time_to_target_s": s.get("time_to_target_s"),
        "train_time_s": s.get("train_time_s"),
        "step_ms_training": s.get("step_time_ms"),
        "cached_from": e.get("cached_from"),
    }
    row["time_to_target_ratio_adam"] = (
        row["time_to_target_s"] / adam_s
        if row["time_to_target_s"] is not None and adam_s else None)
    t = timing.get(name)
    row["step_ms_side_by_side"] = t["median_ms"] if t else None
    row["step_ratio_adam"] = t["ratio_median"] if t else None
    row["step_ratio_adamw"] = _ratio_to(timing, name, "adamw")
    adj = None
    if row["epochs_to_target"] is not None and t:
      adj = row["epochs_to_target"] * spe * t["median_ms"] / 1e3
    row["time_to_target_adj_s"] = adj
    row["time_to_target_adj_ratio_adam"] = (adj / adam_adj if adj and adam_adj
                                            else None)
    rows.append(row)
  # Timed-only methods (e.g. AdamW as a baseline of the step-time ratios).
  for name, t in timing.items():
    if name not in results["methods"]:
      rows.append({"method": name, "label": REGISTRY[name].label
                   if name in REGISTRY else name,
                   "lr": None, "tuned": False, "status": "timed only",
                   "reason": None, "diverged": False,
                   "loss_at_epoch": {str(k): None
                                     for k in table_epochs(epochs)},
                   "initial_loss": None, "final_test_loss": None,
                   "epochs_to_target": None, "time_to_target_s": None,
                   "train_time_s": None, "step_ms_training": None,
                   "cached_from": None, "time_to_target_ratio_adam": None,
                   "step_ms_side_by_side": t["median_ms"],
                   "step_ratio_adam": t["ratio_median"],
                   "step_ratio_adamw": _ratio_to(timing, name, "adamw"),
                   "time_to_target_adj_s": None,
                   "time_to_target_adj_ratio_adam": None})
  del target
  return rows


def format_fm_table(results: Dict[str, Any],
                    kfac: Optional[Dict[str, Any]] = None) -> str:
  """The printed table: rows = methods, columns = train loss after epochs
  1, 2, 3, 5, 10, epochs/seconds to tuned Adam's final loss and the
  step-time ratios."""
  epochs = results["config"]["epochs"]
  exp = results["experiment"]
  target = results.get("target") or {}
  rows = fm_rows(results)
  cols = table_epochs(epochs)
  head = (["method", "lr"] + [f"ep{k}" for k in cols]
          + ["ep->Adam", "s->Adam", "x Adam s", "adj s", "x Adam adj",
             "ms/step", "step x Adam", "step x AdamW", "status"])
  table = [head]
  for r in rows:
    if r["lr"] is not None:
      lr = f"{r['lr']:g}" + ("*" if r["tuned"] else "")
    else:
      lr = "-" if r["status"] == "timed only" else "default"
    status = r["status"]
    if r["diverged"]:
      status = "diverged"
    if r["cached_from"]:
      status += f" (cached, {r['cached_from'].get('commit') or '?'})"
      if r["cached_from"].get("partial"):
        status = (f"PARTIAL {r['cached_from'].get('epochs_done'):g} ep "
                  f"({r['cached_from'].get('commit') or '?'})")
    table.append(
        [r["method"], lr] + [_fmt(r["loss_at_epoch"][str(k)]) for k in cols]
        + [_fmt(r["epochs_to_target"], 3) if r["epochs_to_target"] is not None
           else ("-" if r["status"] == "timed only" else "not reached"),
           _fmt(r["time_to_target_s"], 4), _fmt(r["time_to_target_ratio_adam"], 3),
           _fmt(r["time_to_target_adj_s"], 4),
           _fmt(r["time_to_target_adj_ratio_adam"], 3),
           _fmt(r["step_ms_side_by_side"], 4), _fmt(r["step_ratio_adam"], 3),
           _fmt(r["step_ratio_adamw"], 3), status])
  if kfac:
    k = kfac_row(kfac, results, cols)
    table.append(k)
  lines = [
      f"\n{exp['name']}: {exp['description']}",
      f"  {exp.get('architecture')}  params={exp.get('num_params')}  "
      f"batch={exp['batch_size']}  train={exp['num_train']}  "
      f"steps/epoch={exp['steps_per_epoch']}  epochs={epochs}  "
      f"seed={results['config']['seeds'][0]}",
  ]
  if target:
    lines.append(f"  target = tuned Adam's final full-train loss "
                 f"{_fmt(target.get('train_loss'), 5)} (lr "
                 f"{_fmt(target.get('lr'))})")
  lines += aligned(table, right=lambda j, n: 1 < j < n - 1)
  lines.append(
      "  epN: full-training-set loss after epoch N; ep/s->Adam: first reach "
      "of tuned Adam's final loss (interpolated; s = measured training time "
      "excl. compile/eval); adj s: steps to it x side-by-side ms/step; "
      "ms/step and step x Adam/AdamW: interleaved side-by-side timing in "
      + ("one process (" + str(results.get("fashion_mnist", {}).get(
          "timing_from")) + ")"
         if results.get("fashion_mnist", {}).get("timing_from")
         else "this process")
      + " (median of per-round ratios).")
  notes = [f"  {r['method']}: {r['reason']}" for r in rows if r["reason"]]
  if notes:
    lines.append("  notes:")
    lines.extend(notes)
  for name, e in results["methods"].items():
    if e.get("grid"):
      cells = ", ".join(f"{g['lr']:g}: {_fmt(g['final_train_loss'])}"
                        + ("*" if g["lr"] == e["lr"] else "")
                        for g in e["grid"])
      lines.append(f"  {name} grid (final train loss; * chosen): {cells}")
  if kfac:
    lines.append(
        "  kfac-jax: run separately (benchmarks.kfac_jax_compare, its own "
        f"venv: jax {kfac.get('environment', {}).get('jax')}, kfac-jax "
        f"{kfac.get('environment', {}).get('kfac_jax')}); its wall times "
        "and step ratio are against optax.adam timed in that process.")
  return "\n".join(lines)


def kfac_row(kfac: Dict[str, Any], results: Dict[str, Any],
             cols: Sequence[int]) -> List[str]:
  """A table row for the kfac-jax JSON: same columns, our target re-applied
  to its history; "x Adam s" uses the Adam it trained in its own process
  (``--train-adam``) if any; "adj" uses its own side-by-side step times,
  Adam's being multiplied by our tuned Adam's steps to the target."""
  target = (results.get("target") or {}).get("train_loss")
  spe = results["experiment"]["steps_per_epoch"]
  h = kfac.get("history") or {}
  loss = dict(zip(h.get("epoch", []), h.get("train_loss", [])))
  ep = s = None
  if target is not None:
    ep, s = time_to_target(h.get("epoch", []), h.get("time_s", []),
                           h.get("train_loss", []), target)
  timing = kfac.get("side_by_side") or {}
  k, a = timing.get("kfac-jax") or {}, timing.get("adam") or {}
  adam_t = (kfac.get("adam") or {}).get("time_to_target_s")
  adam_ep = ((results["methods"].get("adam") or {}).get("summary")
             or {}).get("epochs_to_target")
  adj = ep * spe * k["median_ms"] / 1e3 if ep is not None and k else None
  adam_adj = (adam_ep * spe * a["median_ms"] / 1e3
              if adam_ep is not None and a else None)
  status = kfac.get("status", "?")
  if h.get("train_loss") and h["train_loss"][-1] is None:
    status = "diverged"
  return (["kfac-jax", "adaptive"] + [_fmt(loss.get(float(c))) for c in cols]
          + [_fmt(ep, 3) if ep is not None else "not reached", _fmt(s, 4),
             _fmt(s / adam_t, 3) if s is not None and adam_t else "-",
             _fmt(adj, 4), _fmt(adj / adam_adj, 3) if adj and adam_adj
             else "-", _fmt(k.get("median_ms"), 4),
             _fmt(k.get("ratio_median"), 3), "-",
             f"{status} (separate env)"])


# --------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------


def _zoom_limits(curves: List[np.ndarray]) -> Optional[tuple]:
  """y limits showing the later part of every curve: from just below the
  lowest loss to the highest loss after the first evaluation past 0."""
  lows, highs = [], []
  for y in curves:
    y = y[np.isfinite(y)]
    if len(y) >= 2:
      lows.append(y.min())
      highs.append(y[1])
  if not lows:
    return None
  lo, hi = min(lows), max(highs)
  hi = min(hi, lo * 1.25) if lo > 0 else hi
  pad = 0.03 * max(hi - lo, 1e-6)
  return lo - pad, hi + pad


def _side_by_side_ms(results: Dict[str, Any],
                     kfac: Optional[Dict[str, Any]]) -> Dict[str, float]:
  """Median ms per step of each method timed side by side in this process;
  kfac-jax's (timed against Adam in its own process) as its ratio to Adam
  times Adam's here. Empty without a side-by-side timing."""
  timing = (results.get("fashion_mnist") or {}).get("side_by_side") or {}
  ms = {name: t["median_ms"] for name, t in timing.items()
        if t.get("median_ms")}
  theirs = (kfac or {}).get("side_by_side") or {}
  if "adam" in ms and theirs.get("kfac-jax", {}).get("ratio_median"):
    ms["kfac-jax"] = ms["adam"] * theirs["kfac-jax"]["ratio_median"]
  return ms


def write_plots(results: Dict[str, Any], out: pathlib.Path,
                kfac: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
  """``loss_vs_epoch.png`` and ``loss_vs_time.png``, each a full-range log
  panel and a zoomed linear panel (the 205-240 region on the full run), plus
  the runner's ``step_sizes.png``."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.ticker  # pylint: disable=import-outside-toplevel
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from benchmarks import plots as plots_lib  # pylint: disable=import-outside-toplevel

  paths = dict(plots_lib.plot_results(results, out))  # step sizes etc.
  target = (results.get("target") or {}).get("train_loss")
  exp = results["experiment"]
  step_ms = _side_by_side_ms(results, kfac)
  series = plots_lib.loss_curves(results, step_ms=step_ms)
  history = (kfac or {}).get("history") or {}
  ep, t, l = plots_lib.loss_points(history, step_ms.get("kfac-jax"))
  if len(l) >= 2:
    series.append(("kfac-jax K-FAC, adaptive (own process)", "tab:green",
                   "-.", ep, t, l))
  time_label = ("steps x side-by-side step time (s)" if step_ms else
                "training wall time (s, excl. compile and eval)")
  for kind, xi, xlabel in (("loss_vs_epoch", 3, "epoch"),
                           ("loss_vs_time", 4, time_label)):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, zoom in zip(axes, (False, True)):
      plots_lib.plot_loss_curves(ax, series, xi == 4, xlabel, target,
                                 "tuned Adam final ({:.1f})")
      if zoom:
        lim = _zoom_limits([s[5] for s in series])
        if lim:
          ax.set_ylim(*lim)
        xmax = max((s[xi][-1] for s in series), default=1.0)
        xmin = min((s[xi][1] for s in series if len(s[xi]) > 1), default=0.0)
        ax.set_xlim(0.9 * xmin, xmax * 1.02)
        ax.set_title("zoom (linear y)", fontsize=9)
        ax.set_ylabel("train loss (full training set)")
      else:
        ax.set_yscale("log")
        fmt = matplotlib.ticker.ScalarFormatter()
        ax.yaxis.set_major_formatter(fmt)
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
            lambda v, _: f"{v:g}" if str(int(round(v)))[0] in "235" else ""))
        ax.set_ylabel("train loss (full training set, log)")
        ax.set_title(f"{exp['name']}: {exp.get('architecture')}, "
                     f"{exp.get('weight_init')} init, batch "
                     f"{exp['batch_size']}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    p = out / f"{kind}.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    paths[kind] = str(p)
  return paths


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help=f"smoke run: {QUICK['n_train']} images, "
                 f"{QUICK['epochs']} epochs, {QUICK['n_test']} test images")
  p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                 help="comma-separated, from: " + ", ".join(ALL_METHODS)
                 + " ('all' for every one)")
  p.add_argument("--epochs", type=int, default=None)
  p.add_argument("--n-train", type=int, default=None,
                 help="training images (default 60000; --quick 5000)")
  p.add_argument("--n-test", type=int, default=None)
  p.add_argument("--batch-size", type=int, default=1000)
  p.add_argument("--widths", type=int_list,
                 default=list(models.MNIST_AE_WIDTHS),
                 help="autoencoder widths (smoke tests shrink them)")
  p.add_argument("--init", default="lecun", choices=("lecun", "torch",
                                                      "glorot"),
                 help="weight init (default: Flax's, lecun)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--adam-grid", type=float_list, default=list(ADAM_GRID))
  p.add_argument("--adamw-grid", type=float_list, default=list(ADAMW_GRID))
  p.add_argument("--time-only", default="adamw",
                 help="methods timed side by side without training "
                 "(default adamw, the second baseline; '' for none)")
  p.add_argument("--timing-rounds", type=int, default=None)
  p.add_argument("--timing-calls", type=int, default=None)
  p.add_argument("--reuse", default="",
                 help="methods whose cached run (same configuration) is "
                 "loaded instead of trained ('all' for every one)")
  p.add_argument("--no-train", action="store_true",
                 help="train nothing: use the --reuse'd cached runs only "
                 "(methods without one are left out)")
  p.add_argument("--timing-from", default=None, metavar="RESULTS_JSON",
                 help="take the side-by-side step times from an earlier "
                 "results.json of this script instead of timing here")
  p.add_argument("--data-dir", default=None,
                 help="directory of Fashion-MNIST IDX files (default: "
                 "Debian's /usr/share/datasets/fashion-mnist)")
  p.add_argument("--out", default="results/fashion_mnist")
  p.add_argument("--cache-dir", default=None,
                 help="per-method run cache (default <out>/runs); several "
                 "processes may train different methods into one cache")
  p.add_argument("--no-plots", action="store_true")
  p.add_argument("--no-progress", action="store_true")
  return p


def _settings(args: argparse.Namespace) -> argparse.Namespace:
  """The arguments with the preset (--quick or the full run) filled in and
  the method lists parsed."""
  preset = QUICK if args.quick else FULL
  s = argparse.Namespace(**vars(args))
  for key in ("n_train", "n_test", "epochs", "timing_rounds", "timing_calls"):
    if getattr(s, key) is None:
      setattr(s, key, preset[key])
  s.methods = (list(ALL_METHODS) if args.methods.strip() == "all"
               else csv_list(args.methods))
  unknown = [m for m in s.methods if m not in ALL_METHODS]
  if unknown:
    raise SystemExit(f"error: unknown method(s) {unknown}; choose from "
                     f"{list(ALL_METHODS)}")
  s.reuse = (set(s.methods) if args.reuse.strip() == "all"
             else set(csv_list(args.reuse)))
  s.time_only = [m for m in csv_list(args.time_only) if m not in s.methods]
  s.progress = not args.no_progress
  s.grids = {"adam": tuple(args.adam_grid), "adamw": tuple(args.adamw_grid)}
  return s


def _experiment(s: argparse.Namespace) -> Experiment:
  try:
    return build_experiment(data_dir=s.data_dir, n_train=s.n_train,
                            n_test=s.n_test, batch_size=s.batch_size,
                            widths=s.widths, weight_init=s.init)
  except DataUnavailableError as e:
    print(f"error: {e}\nOn Debian/Ubuntu: `apt-get install "
          "dataset-fashion-mnist`, or pass --data-dir DIR.", file=sys.stderr)
    raise SystemExit(2) from e


def _benchmark(exp: Experiment, s: argparse.Namespace, methods: Sequence[str],
               **kw) -> BenchmarkResult:
  """The runner on ``methods`` with this script's fixed settings."""
  return runner.run_benchmark(
      exp, methods, registry=REGISTRY, seeds=[s.seed], epochs=s.epochs,
      reference="adam", evals_per_epoch=1, timing_rounds=0, out_dir=None,
      plots=False, progress=s.progress, verbose=False, **kw)


def _train(exp: Experiment, s: argparse.Namespace, name: str,
           cache: _Cache) -> MethodResult:
  """One method trained by the runner (grid-tuned if it has a grid), cached
  as soon as it is done so that a later process can --reuse it."""
  env = results_lib.environment()
  tune = name in s.grids
  part = _benchmark(exp, s, [name], tune=[name] if tune else [],
                    lr_grids={name: s.grids[name]} if tune else None,
                    on_eval=None if tune else cache.partial_saver(
                        name, s.epochs, env))
  entry = part.methods[name]
  if entry.status == "ok":
    cache.store(name, entry, part.environment)
  print(f"[done] {name}: final train loss "
        f"{_fmt(entry.summary.get('final_train_loss'))} ({entry.status})",
        flush=True)
  return entry


def _train_or_reuse(exp: Experiment, s: argparse.Namespace,
                    cache: _Cache) -> BenchmarkResult:
  """Every method's entry, from the cache (--reuse) or trained here."""
  cached = {n: e for n in s.methods if n in s.reuse
            for e in [cache.load(n)] if e is not None}
  if s.no_train:
    dropped = [m for m in s.methods if m not in cached]
    if dropped:
      print(f"[no-train] leaving out (no cached run): {dropped}", flush=True)
    s.methods = [m for m in s.methods if m in cached]
  result = _benchmark(exp, s, [])
  for name in s.methods:
    entry = cached.get(name) or _train(exp, s, name, cache)
    result.methods[name] = entry
    if entry.grid:
      result.config["lr_grids"][name] = [g.lr for g in entry.grid]
  result.config["methods"] = s.methods
  result.config["tune"] = [m for m in ("adam", "adamw") if m in s.methods]
  result.extra["fashion_mnist"] = {"reused": sorted(cached)}
  return summarise(result)


def _side_by_side(exp: Experiment, s: argparse.Namespace,
                  result: BenchmarkResult) -> Dict[str, dict]:
  """Every method's step at its chosen learning rate (timed-only ones, and
  Adam if not trained, at the registry's default: step time is LR-free),
  timed in interleaved rounds; or the times of --timing-from."""
  if s.timing_from:
    print(f"side-by-side step times from {s.timing_from}", flush=True)
    return json.loads(pathlib.Path(s.timing_from).read_text())[
        "fashion_mnist"]["side_by_side"]
  if s.timing_rounds <= 0:
    return {}
  lrs: Dict[str, Optional[float]] = {}
  for name in ["adam"] + [m for m in s.methods if m != "adam"] + s.time_only:
    e = result.methods.get(name)
    if (e is not None and e.status != "ok") or (
        e is None and name not in REGISTRY):
      continue
    lrs[name] = e.lr if e else REGISTRY[name].default_lr
  calls = _step_callables(exp, lrs, s.seed)
  if "adam" not in calls:
    return {}
  print(f"timing {len(calls)} steps side by side ({s.timing_rounds} rounds x "
        f"{s.timing_calls} calls): {', '.join(calls)}", flush=True)
  return time_side_by_side(calls, baseline="adam", rounds=s.timing_rounds,
                           calls_per_round=s.timing_calls,
                           progress=s.progress)


def _kfac(out: pathlib.Path, num_train: int) -> Optional[Dict[str, Any]]:
  """kfac_jax.json of the same training-set size, if in ``out``."""
  try:
    kfac = json.loads((out / "kfac_jax.json").read_text())
  except (OSError, ValueError):
    return None
  return kfac if kfac.get("config", {}).get("n_train") == num_train else None


def _fm_section(s: argparse.Namespace, result: BenchmarkResult,
                side: Dict[str, dict], kfac, out: pathlib.Path) -> None:
  """The ``fashion_mnist`` section of the JSON: timing, settings, table."""
  for name, t in side.items():
    if name in result.methods:
      result.methods[name].interleaved_step_time_ms = t["median_ms"]
  summarise(result)
  section = result.extra["fashion_mnist"]
  section.update(
      side_by_side=side, timing_rounds=s.timing_rounds,
      timing_from=s.timing_from, timing_calls_per_round=s.timing_calls,
      time_only=s.time_only, reused=section["reused"],
      kbfgs_signature_defaults=kbfgs_defaults(),
      kbfgs_l_memory_size=KBFGS_L_MEMORY, adam_grid=list(s.grids["adam"]),
      adamw_grid=list(s.grids["adamw"]), quick=bool(s.quick))
  section["table"] = fm_rows(result.to_json())
  if kfac:
    cols = table_epochs(s.epochs)
    section["kfac_jax"] = {
        "source": str(out / "kfac_jax.json"), "status": kfac.get("status"),
        "columns": (["method", "lr"] + [f"ep{k}" for k in cols]
                    + ["ep->Adam", "s->Adam", "x Adam s", "adj s",
                       "x Adam adj", "ms/step", "step x Adam",
                       "step x AdamW", "status"]),
        "row": kfac_row(kfac, result.to_json(), cols)}


def run(args: argparse.Namespace) -> BenchmarkResult:
  s = _settings(args)
  exp = _experiment(s)
  out = pathlib.Path(s.out)
  cache = _Cache(
      pathlib.Path(s.cache_dir) if s.cache_dir else out / "runs",
      dict(data=exp.info.get("data"), n_train=exp.num_train,
           n_test=exp.num_test, batch_size=exp.batch_size,
           widths=list(s.widths), init=s.init, epochs=s.epochs, seed=s.seed,
           evals_per_epoch=1), s.grids)
  result = _train_or_reuse(exp, s, cache)
  kfac = _kfac(out, exp.num_train)
  _fm_section(s, result, _side_by_side(exp, s, result), kfac, out)
  out.mkdir(parents=True, exist_ok=True)
  if not s.no_plots:
    try:
      result.plots = write_plots(result.to_json(), out, kfac)
    except Exception as e:  # pylint: disable=broad-except
      print(f"[warn] plotting failed: {type(e).__name__}: {e}", flush=True)
  result.write(out / "results.json")
  print(format_fm_table(result.to_json(), kfac), flush=True)
  print(f"\nResults: {out / 'results.json'}")
  for kind, p in result.plots.items():
    print(f"Plot ({kind}): {p}")
  return result


def main(argv: Optional[Sequence[str]] = None) -> BenchmarkResult:
  return run(build_parser().parse_args(argv))


if __name__ == "__main__":
  main()
