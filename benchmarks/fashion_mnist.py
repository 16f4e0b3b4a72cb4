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
  ``olw.layerwise_sgd()`` at their defaults (no learning rate).
* ``adamw`` (optional): ``optax.adamw(lr, weight_decay=1e-4)`` tuned over
  ``--adamw-grid``. Not trained by default; its step is still timed side by
  side (``--time-only``, the layer-wise AdamW's second baseline).

Step times: after training, every method's compiled step (at the chosen
learning rate) is timed side by side in interleaved rounds in the same
process (:func:`benchmarks.timing.time_side_by_side`); the ratios are the
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
runner's schema, :func:`benchmarks.runner.validate_results`, plus a
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
import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import os
import pathlib
import sys
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import models
from benchmarks import runner
from benchmarks.data import DataUnavailableError
from benchmarks.experiments import Experiment, mnist_ae
from benchmarks.timing import time_side_by_side

__all__ = ["build_experiment", "run", "main", "format_fm_table",
           "TABLE_EPOCHS"]

ALL_METHODS = ("adam", "adamw", "kbfgs", "kbfgs-l", "layerwise-adamw",
               "layerwise-sgd")
DEFAULT_METHODS = ("adam", "kbfgs", "kbfgs-l", "layerwise-adamw",
                   "layerwise-sgd")
ADAM_GRID = (3e-4, 1e-3, 3e-3)
ADAMW_GRID = (3e-4, 1e-3, 3e-3)
TABLE_EPOCHS = (1, 2, 3, 5, 10)
KBFGS_L_MEMORY = 100
FULL = dict(n_train=60_000, n_test=10_000, epochs=10, timing_rounds=7,
            timing_calls=3)
QUICK = dict(n_train=5000, n_test=1000, epochs=2, timing_rounds=3,
             timing_calls=2)

# K-BFGS at its defaults: nothing passed, so a change of the library's
# defaults (learning rate or step rule) is what runs.
_KBFGS_METHODS = {
    "kbfgs": runner.Method("kbfgs", "K-BFGS (defaults)", "optax_layerwise",
                           "kbfgs", lambda c, lr: c()),
    "kbfgs-l": runner.Method(
        "kbfgs-l", f"K-BFGS(L) (memory {KBFGS_L_MEMORY})", "optax_layerwise",
        "kbfgs", lambda c, lr: c(memory_size=KBFGS_L_MEMORY)),
}


@contextlib.contextmanager
def _kbfgs_at_defaults():
  """Swaps the runner's ``kbfgs``/``kbfgs-l`` (which pass lr 0.3) for the
  library defaults, restoring them afterwards."""
  saved = {k: runner.METHODS[k] for k in _KBFGS_METHODS if k in runner.METHODS}
  runner.METHODS.update(_KBFGS_METHODS)
  try:
    yield
  finally:
    for k in _KBFGS_METHODS:
      runner.METHODS.pop(k, None)
    runner.METHODS.update(saved)


def _kbfgs_defaults() -> Dict[str, str]:
  try:
    import optax_layerwise as olw  # pylint: disable=import-outside-toplevel
    return {k: repr(p.default)
            for k, p in inspect.signature(olw.kbfgs).parameters.items()
            if p.default is not inspect.Parameter.empty}
  except Exception as e:  # pylint: disable=broad-except  # pragma: no cover
    return {"error": f"{type(e).__name__}: {e}"}


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


def _cache_key(name: str, cfg: Dict[str, Any]) -> str:
  blob = json.dumps(dict(cfg, method=name), sort_keys=True, default=str)
  return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _cache_path(cache_dir: pathlib.Path, name: str, cfg) -> pathlib.Path:
  return cache_dir / f"{name}-{_cache_key(name, cfg)}.json"


def _method_cfg(name: str, base: Dict[str, Any], grids) -> Dict[str, Any]:
  return dict(base, grid=list(grids.get(name, ())) or None)


def _partial_path(path: pathlib.Path) -> pathlib.Path:
  return path.with_name(path.stem + ".partial.json")


def _partial_saver(name: str, path: pathlib.Path, epochs: int, env: dict):
  """``on_eval`` callback saving an unfinished run after every evaluation,
  so that an interrupted long run still counts (marked partial)."""

  def save(run: Dict[str, Any]) -> None:
    r = {k: v for k, v in run.items() if not k.startswith("_")}
    h = r["history"]
    if len(h["step"]) < 2:
      return
    done = h["epoch"][-1]
    r = dict(r, num_steps=h["step"][-1], train_time_s=h["time_s"][-1],
             status="ok")
    m = runner.METHODS[name]
    entry = {
        "label": m.label, "status": "ok",
        "reason": f"partial: {done:g} of {epochs} epochs (interrupted)",
        "lr": run["lr"] if m.default_lr is not None else None,
        "tuned": False, "grid": [], "runs": [r], "summary": {},
        "cached_from": {"commit": env.get("git", {}).get("commit"),
                        "library_modified": env.get("git", {}).get(
                            "library_modified"),
                        "jax": env.get("jax"), "partial": True,
                        "epochs_done": done}}
    path.write_text(json.dumps(runner._json_safe(entry), indent=1))  # pylint: disable=protected-access

  return save


def _merge_grid(cache_dir: pathlib.Path, name: str, base_cfg: Dict[str, Any],
                grid: Sequence[float]) -> Optional[dict]:
  """A tuned method's entry assembled from single-LR cached runs (one
  process per grid point, e.g. ``--adam-grid 3e-4``), or ``None`` if a grid
  point has no cached run. The best final train loss wins, as in the
  runner."""
  parts = []
  for lr in grid:
    path = _cache_path(cache_dir, name, dict(base_cfg, grid=[lr]))
    if not path.exists():
      return None
    parts.append(json.loads(path.read_text()))
  best = min(range(len(parts)), key=lambda i: runner._final_loss(  # pylint: disable=protected-access
      parts[i]["runs"][0]))
  entry = dict(parts[best])
  entry["grid"] = [g for p in parts for g in p["grid"]]
  entry["cached_from"] = dict(parts[best].get("cached_from") or {},
                              merged_from=[p.get("cached_from")
                                           for p in parts])
  return entry


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
    tx, reason = runner.resolve_method(name, lr)
    if tx is None:
      print(f"[timing] skip {name}: {reason}", flush=True)
      continue
    fn = jax.jit(runner._make_step(exp.loss_fn, tx))  # pylint: disable=protected-access
    box = [params0, tx.init(params0)]
    for _ in range(warmup):
      p, s, _ = fn(box[0], box[1], batch)
      box[:] = [p, s]

    def call(fn=fn, box=box):
      p, s, loss = fn(box[0], box[1], batch)
      box[:] = [p, s]
      return loss

    calls[name] = call
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
  return runner.format_number(x, digits, missing)


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
      rows.append({"method": name, "label": runner.METHODS[name].label
                   if name in runner.METHODS else name,
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
  widths = [max(len(str(r[i])) for r in table) for i in range(len(head))]
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
  for i, r in enumerate(table):
    lines.append("  " + "  ".join(str(c).rjust(w) if 1 < j < len(r) - 1
                                  else str(c).ljust(w)
                                  for j, (c, w) in enumerate(zip(r, widths))))
    if i == 0:
      lines.append("  " + "  ".join("-" * w for w in widths))
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
    prev = None
    for e, t, l in zip(h.get("epoch", []), h.get("time_s", []),
                       h.get("train_loss", [])):
      if l is None:
        break
      if l <= target:
        if prev is None or prev[2] <= l:
          ep, s = e, t
        else:
          f = (prev[2] - target) / (prev[2] - l)
          ep, s = prev[0] + f * (e - prev[0]), prev[1] + f * (t - prev[1])
        break
      prev = (e, t, l)
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
  series = []
  for name, e in results["methods"].items():
    run = next((r for r in e["runs"] if r["status"] == "ok"), None)
    if run is None:
      continue
    h = run["history"]
    pts = [(ep, t, l) for ep, t, l in zip(h["epoch"], h["time_s"],
                                          h["train_loss"]) if l is not None]
    if not pts:
      continue
    ep, t, l = (np.asarray(v, float) for v in zip(*pts))
    color, ls = plots_lib._STYLE.get(name, (None, "-"))  # pylint: disable=protected-access
    lr = f", lr {e['lr']:g}" if e.get("lr") is not None else ""
    series.append((f"{e['label']}{lr}", color, ls, ep, t, l))
  kh = (kfac or {}).get("history") or {}
  pts = [(ep, t, l) for ep, t, l in zip(kh.get("epoch", []),
                                        kh.get("time_s", []),
                                        kh.get("train_loss", []))
         if l is not None]
  if len(pts) >= 2:
    ep, t, l = (np.asarray(v, float) for v in zip(*pts))
    series.append(("kfac-jax K-FAC, adaptive (own process)", "tab:green",
                   "-.", ep, t, l))
  for kind, xi, xlabel in (("loss_vs_epoch", 3, "epoch"),
                           ("loss_vs_time", 4,
                            "training wall time (s, excl. compile and eval)")):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, zoom in zip(axes, (False, True)):
      for label, color, ls, *xs in series:
        x, y = xs[xi - 3], xs[2]
        ax.plot(x, y, color=color, ls=ls, marker="o", ms=3, lw=1.5,
                label=label)
      if target is not None:
        ax.axhline(target, color="k", ls=":", lw=0.8,
                   label=f"tuned Adam final ({target:.1f})")
      ax.set_xlabel(xlabel)
      ax.grid(True, which="both", alpha=0.3)
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


def _csv(s: str) -> List[str]:
  return [x.strip() for x in s.split(",") if x.strip()]


def _floats(s: str) -> List[float]:
  return [float(x) for x in _csv(s)]


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
  p.add_argument("--widths", type=lambda s: [int(x) for x in _csv(s)],
                 default=list(models.MNIST_AE_WIDTHS),
                 help="autoencoder widths (smoke tests shrink them)")
  p.add_argument("--init", default="lecun", choices=("lecun", "torch",
                                                      "glorot"),
                 help="weight init (default: Flax's, lecun)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--adam-grid", type=_floats, default=list(ADAM_GRID))
  p.add_argument("--adamw-grid", type=_floats, default=list(ADAMW_GRID))
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


def run(args: argparse.Namespace) -> Dict[str, Any]:
  preset = QUICK if args.quick else FULL
  n_train = args.n_train if args.n_train is not None else preset["n_train"]
  n_test = args.n_test if args.n_test is not None else preset["n_test"]
  epochs = args.epochs if args.epochs is not None else preset["epochs"]
  rounds = (args.timing_rounds if args.timing_rounds is not None
            else preset["timing_rounds"])
  calls = (args.timing_calls if args.timing_calls is not None
           else preset["timing_calls"])
  methods = (list(ALL_METHODS) if args.methods.strip() == "all"
             else _csv(args.methods))
  unknown = [m for m in methods if m not in ALL_METHODS]
  if unknown:
    raise SystemExit(f"error: unknown method(s) {unknown}; choose from "
                     f"{list(ALL_METHODS)}")
  reuse = (set(methods) if args.reuse.strip() == "all"
           else set(_csv(args.reuse)))
  time_only = [m for m in _csv(args.time_only) if m not in methods]
  progress = not args.no_progress
  try:
    exp = build_experiment(data_dir=args.data_dir, n_train=n_train,
                           n_test=n_test, batch_size=args.batch_size,
                           widths=args.widths, weight_init=args.init)
  except DataUnavailableError as e:
    print(f"error: {e}\nOn Debian/Ubuntu: `apt-get install "
          "dataset-fashion-mnist`, or pass --data-dir DIR.", file=sys.stderr)
    raise SystemExit(2) from e

  out = pathlib.Path(args.out)
  cache_dir = pathlib.Path(args.cache_dir) if args.cache_dir else out / "runs"
  cache_dir.mkdir(parents=True, exist_ok=True)
  grids = {"adam": tuple(args.adam_grid), "adamw": tuple(args.adamw_grid)}
  base_cfg = dict(data=exp.info.get("data"), n_train=exp.num_train,
                  n_test=exp.num_test, batch_size=exp.batch_size,
                  widths=list(args.widths), init=args.init, epochs=epochs,
                  seed=args.seed, evals_per_epoch=1)

  with _kbfgs_at_defaults():
    cached: Dict[str, dict] = {}
    for name in methods:
      path = _cache_path(cache_dir, name, _method_cfg(name, base_cfg, grids))
      if name in reuse:
        if path.exists():
          cached[name] = json.loads(path.read_text())
          print(f"[reuse] {name}: {path} (commit "
                f"{cached[name].get('cached_from', {}).get('commit')})",
                flush=True)
        elif name in grids and _merge_grid(cache_dir, name, base_cfg,
                                           grids[name]) is not None:
          cached[name] = _merge_grid(cache_dir, name, base_cfg, grids[name])
          print(f"[reuse] {name}: merged the single-LR cached runs of its "
                f"grid {list(grids[name])}", flush=True)
        elif _partial_path(path).exists():
          cached[name] = json.loads(_partial_path(path).read_text())
          print(f"[reuse] {name}: PARTIAL run {_partial_path(path)} "
                f"({cached[name]['reason']})", flush=True)
        else:
          print(f"[reuse] {name}: no cached run {path.name}; training it",
                flush=True)
    if args.no_train:
      dropped = [m for m in methods if m not in cached]
      if dropped:
        print(f"[no-train] leaving out (no cached run): {dropped}",
              flush=True)
      methods = [m for m in methods if m in cached]
    to_train = [m for m in methods if m not in cached]
    # One runner call per method, each cached as soon as it is done (a
    # later process can --reuse it even if this one is interrupted).
    results = runner.run_benchmark(
        exp, [], seeds=[args.seed], epochs=epochs, reference="adam",
        evals_per_epoch=1, timing_rounds=0, out_dir=None, plots=False,
        progress=progress, verbose=False)
    env = results["environment"]
    trained: Dict[str, dict] = {}
    for name in to_train:
      tune = [name] if name in grids else []
      path = _cache_path(cache_dir, name, _method_cfg(name, base_cfg, grids))
      part = runner.run_benchmark(
          exp, [name], seeds=[args.seed], epochs=epochs, tune=tune,
          lr_grids={name: grids[name]} if tune else None, reference="adam",
          evals_per_epoch=1, timing_rounds=0, out_dir=None, plots=False,
          progress=progress, verbose=False,
          on_eval=None if tune else _partial_saver(
              name, _partial_path(path), epochs, env))
      entry = trained[name] = part["methods"][name]
      results["config"]["lr_grids"].update(part["config"]["lr_grids"])
      entry["cached_from"] = None
      if entry["status"] == "ok":
        stored = dict(entry, cached_from={
            "commit": env.get("git", {}).get("commit"),
            "library_modified": env.get("git", {}).get("library_modified"),
            "date": part["environment"].get("date"), "jax": env.get("jax")})
        path.write_text(json.dumps(runner._json_safe(stored), indent=1))  # pylint: disable=protected-access
        if _partial_path(path).exists():
          _partial_path(path).unlink()
      print(f"[done] {name}: final train loss "
            f"{_fmt((entry.get('summary') or {}).get('final_train_loss'))}"
            f" ({entry['status']})", flush=True)
    ordered = {}
    for name in methods:
      ordered[name] = cached.get(name) or trained[name]
      if name in cached:
        for g in ordered[name].get("grid", ()):
          results["config"]["lr_grids"].setdefault(name, []).append(g["lr"])
    results["methods"] = ordered
    results["config"]["methods"] = methods
    results["config"]["tune"] = [m for m in ("adam", "adamw") if m in methods]
    runner.summarise_results(results)

    # Side-by-side step timing of every method at its chosen LR.
    side = {}
    if args.timing_from:
      side = json.loads(pathlib.Path(args.timing_from).read_text())[
          "fashion_mnist"]["side_by_side"]
      print(f"side-by-side step times from {args.timing_from}", flush=True)
    elif rounds > 0:
      lrs: Dict[str, Optional[float]] = {}
      for name in (["adam"] + [m for m in methods if m != "adam"]
                   + time_only):
        e = results["methods"].get(name)
        if e is not None and e["status"] != "ok":
          continue
        if e is None and name not in runner.METHODS:
          continue
        # Trained methods at their chosen LR; timed-only ones (and Adam if
        # not trained) at the runner's default LR (step time is LR-free).
        lrs[name] = e.get("lr") if e else runner.METHODS[name].default_lr
      calls_fns = _step_callables(exp, lrs, args.seed)
      if "adam" in calls_fns:
        print(f"timing {len(calls_fns)} steps side by side ({rounds} "
              f"rounds x {calls} calls): {', '.join(calls_fns)}", flush=True)
        side = time_side_by_side(calls_fns, baseline="adam", rounds=rounds,
                                 calls_per_round=calls, progress=progress)
    for name, t in side.items():
      if name in results["methods"]:
        results["methods"][name]["interleaved_step_time_ms"] = t["median_ms"]
    runner.summarise_results(results)
    results["fashion_mnist"] = {
        "side_by_side": side, "timing_rounds": rounds,
        "timing_from": args.timing_from,
        "timing_calls_per_round": calls,
        "time_only": time_only, "reused": sorted(cached),
        "kbfgs_signature_defaults": _kbfgs_defaults(),
        "kbfgs_l_memory_size": KBFGS_L_MEMORY,
        "adam_grid": list(grids["adam"]), "adamw_grid": list(grids["adamw"]),
        "quick": bool(args.quick),
    }
    results["fashion_mnist"]["table"] = fm_rows(results)

  kfac = None
  kpath = out / "kfac_jax.json"
  if kpath.exists():
    try:
      kfac = json.loads(kpath.read_text())
      if kfac.get("config", {}).get("n_train") != exp.num_train:
        kfac = None
    except (OSError, ValueError):
      kfac = None
  if kfac:
    cols = table_epochs(epochs)
    results["fashion_mnist"]["kfac_jax"] = {
        "source": str(kpath), "status": kfac.get("status"),
        "columns": (["method", "lr"] + [f"ep{k}" for k in cols]
                    + ["ep->Adam", "s->Adam", "x Adam s", "adj s",
                       "x Adam adj", "ms/step", "step x Adam",
                       "step x AdamW", "status"]),
        "row": kfac_row(kfac, results, cols)}
  out.mkdir(parents=True, exist_ok=True)
  if not args.no_plots:
    try:
      results["plots"] = write_plots(results, out, kfac)
    except Exception as e:  # pylint: disable=broad-except
      print(f"[warn] plotting failed: {type(e).__name__}: {e}", flush=True)
  path = out / "results.json"
  with open(path, "w") as f:
    json.dump(runner._json_safe(results), f, indent=1, allow_nan=False)  # pylint: disable=protected-access
  results["json"] = str(path)
  print(format_fm_table(results, kfac), flush=True)
  print(f"\nResults: {path}")
  for kind, p in results.get("plots", {}).items():
    print(f"Plot ({kind}): {p}")
  return results


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  return run(build_parser().parse_args(argv))


if __name__ == "__main__":
  main()
