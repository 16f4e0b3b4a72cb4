"""PNG plots of a results dict (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import pathlib
from typing import Any, Dict, List, Optional, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

__all__ = ["plot_results", "loss_points", "loss_curves", "plot_loss_curves"]

_STYLE = {
    "kbfgs": ("tab:red", "-"),
    "kbfgs-l": ("tab:red", "--"),
    "layerwise-sgd": ("tab:blue", "-"),
    "layerwise-adamw": ("tab:cyan", "-"),
    "layerwise-sgd-plain": ("tab:blue", "--"),
    "layerwise-adamw-plain": ("tab:cyan", "--"),
    "cblr": ("tab:purple", "-"),
    "mclr": ("tab:purple", "--"),
    "adam": ("black", "-"),
    "adamw": ("gray", "-"),
    "sgd": ("tab:orange", "-"),
    "rmsprop": ("tab:green", "-"),
    "lars": ("tab:brown", "-"),
    "lamb": ("tab:pink", "-"),
}


def _ok_methods(results):
  for name, e in results["methods"].items():
    runs = [r for r in e["runs"] if r["status"] == "ok"]
    if runs:
      yield name, e, runs


def _label(name, e):
  lr = f", lr={e['lr']:g}" if e.get("lr") is not None else ""
  return f"{e['label']}{lr}"


def _xy(run, xkey, ykey):
  h = run["history"]
  pts = [(x, y) for x, y in zip(h[xkey], h[ykey]) if y is not None]
  if not pts:
    return np.zeros(0), np.zeros(0)
  x, y = zip(*pts)
  return np.asarray(x, float), np.asarray(y, float)


def loss_points(history: Dict[str, Any], step_ms: Optional[float] = None
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(epochs, times_s, train_losses)`` of a run's ``history`` at the points
  where the training loss was recorded (float arrays, empty without any).
  With ``step_ms`` the times are the steps taken times ``step_ms`` instead
  of the run's measured clock (which a run trained in another process,
  under another load, does not share), when the history counts its
  steps."""
  clock = history.get("time_s", [])
  steps = history.get("step", [])
  if step_ms is not None and len(steps) == len(clock):
    clock = [k * step_ms / 1e3 for k in steps]
  pts = [(ep, t, l) for ep, t, l in zip(history.get("epoch", []), clock,
                                        history.get("train_loss", []))
         if l is not None]
  if not pts:
    return np.zeros(0), np.zeros(0), np.zeros(0)
  ep, t, l = (np.asarray(v, float) for v in zip(*pts))
  return ep, t, l


Curve = Tuple[str, Optional[str], str, np.ndarray, np.ndarray, np.ndarray]


def loss_curves(results: Dict[str, Any], min_points: int = 1,
                step_ms: Optional[Dict[str, float]] = None) -> List[Curve]:
  """Per method with an ``ok`` run, the training-loss curve of its first one:
  ``(label, color, linestyle, epochs, times_s, losses)`` (the label with the
  learning rate, ``", lr 0.01"``; the method's colour and line style);
  methods with fewer than ``min_points`` recorded losses are left out.
  ``step_ms``: method -> ms per step, for :func:`loss_points`."""
  curves = []
  for name, e in results["methods"].items():
    run = next((r for r in e["runs"] if r["status"] == "ok"), None)
    if run is None:
      continue
    ep, t, l = loss_points(run["history"], (step_ms or {}).get(name))
    if len(l) < max(min_points, 1):
      continue
    color, ls = _STYLE.get(name, (None, "-"))
    lr = f", lr {e['lr']:g}" if e.get("lr") is not None else ""
    curves.append((f"{e['label']}{lr}", color, ls, ep, t, l))
  return curves


def plot_loss_curves(ax, curves: List[Curve], by_time: bool, xlabel: str,
                     target: Optional[float] = None,
                     target_label: str = "target ({:g})") -> None:
  """Draws :func:`loss_curves` on ``ax`` against epochs (or wall time,
  ``by_time``) with markers, a dotted line at ``target`` (when not None)
  labelled ``target_label.format(target)``, the x label and a grid."""
  for label, color, ls, ep, t, l in curves:
    ax.plot(t if by_time else ep, l, color=color, ls=ls, marker="o", ms=3,
            lw=1.5, label=label)
  if target is not None:
    ax.axhline(target, color="k", ls=":", lw=0.8,
               label=target_label.format(target))
  ax.set_xlabel(xlabel)
  ax.grid(True, which="both", alpha=0.3)


def _loss_axes(ax, results, xkey, ykey, xlabel, ylabel, target=True):
  positive = True
  for name, e, runs in _ok_methods(results):
    color, ls = _STYLE.get(name, (None, "-"))
    for i, run in enumerate(runs):
      x, y = _xy(run, xkey, ykey)
      if len(x) == 0:
        continue
      positive &= bool(np.all(y >= 0))
      if ykey != "test_accuracy":
        y = np.maximum(y, 1e-12)  # an exact 0 loss still shows on log axes
      ax.plot(x, y, color=color, ls=ls, lw=1.5 if i == 0 else 0.8,
              alpha=1.0 if i == 0 else 0.5,
              label=_label(name, e) if i == 0 else None)
  t = results.get("target")
  if target and t and t.get("train_loss") is not None:
    ax.axhline(t["train_loss"], color="k", ls=":", lw=0.8,
               label=f"target ({t['method']} final)")
  if positive and ax.lines and ykey != "test_accuracy":
    ax.set_yscale("log")
  if ykey == "train_loss":
    # Keep diverging runs from squashing the others: cap the axis at a few
    # times the largest initial loss.
    starts = [r["history"]["train_loss"][0] for _, _, runs in
              _ok_methods(results) for r in runs
              if r["history"]["train_loss"]
              and r["history"]["train_loss"][0] is not None]
    if starts:
      lo, hi = ax.get_ylim()
      ax.set_ylim(lo, min(hi, 3.0 * max(starts)))
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(True, which="both", alpha=0.3)


def _title(results, what):
  exp = results["experiment"]
  return f"{exp['name']}: {what}\n{exp.get('architecture', '')}, {exp.get('data', '')}"


def plot_results(results: Dict[str, Any], out_dir) -> Dict[str, str]:
  """Writes ``loss_vs_epoch.png``, ``loss_vs_time.png`` and, when some method
  logged per-layer step sizes, ``step_sizes.png``; returns their paths."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths: Dict[str, str] = {}
  has_acc = any(
      any(a is not None for a in r["history"]["test_accuracy"])
      for _, _, runs in _ok_methods(results) for r in runs)

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  _loss_axes(axes[0], results, "epoch", "train_loss", "epoch",
             "train loss (full training set)")
  axes[0].set_title(_title(results, "train loss vs epochs"), fontsize=9)
  if has_acc:
    _loss_axes(axes[1], results, "epoch", "test_accuracy", "epoch",
               "test accuracy", target=False)
    axes[1].set_yscale("linear")
  else:
    _loss_axes(axes[1], results, "epoch", "test_loss", "epoch", "test loss",
               target=False)
  axes[1].set_title("test metric vs epochs", fontsize=9)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  p = out / "loss_vs_epoch.png"
  fig.savefig(p, dpi=90)
  plt.close(fig)
  paths["loss_vs_epoch"] = str(p)

  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  _loss_axes(ax, results, "time_s", "train_loss",
             "wall-clock training time (s, excl. compile and eval)",
             "train loss (full training set)")
  ax.set_title(_title(results, "train loss vs time"), fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  p = out / "loss_vs_time.png"
  fig.savefig(p, dpi=90)
  plt.close(fig)
  paths["loss_vs_time"] = str(p)

  diag = [(name, e, runs[0]) for name, e, runs in _ok_methods(results)
          if runs[0]["diagnostics"]]
  if diag:
    ncols = min(3, len(diag))
    nrows = -(-len(diag) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.2 * nrows),
                             squeeze=False)
    for ax in axes.flat[len(diag):]:
      ax.axis("off")
    for ax, (name, e, run) in zip(axes.flat, diag):
      field, d = next(iter(run["diagnostics"].items()))
      values = np.asarray([[np.nan if v is None else v for v in row]
                           for row in d["values"]], float)
      steps = np.asarray(d["step"], float)
      n = values.shape[1] if values.ndim == 2 else 0
      colors = plt.cm.viridis(np.linspace(0, 0.95, max(n, 1)))
      for j in range(n):
        ax.plot(steps, values[:, j], color=colors[j], lw=1,
                label=d["labels"][j])
      if np.nanmin(np.where(values > 0, values, np.nan), initial=np.inf) < np.inf:
        ax.set_yscale("log")
      ax.set_xlabel("step")
      ax.set_ylabel(f"per-layer {field.replace('_', ' ')}")
      ax.set_title(f"{e['label']} (seed {run['seed']})", fontsize=9)
      ax.grid(True, which="both", alpha=0.3)
      ax.legend(fontsize=6, ncol=2 if n > 8 else 1)
    fig.suptitle(_title(results, "layer-wise step sizes"), fontsize=9)
    fig.tight_layout()
    p = out / "step_sizes.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    paths["step_sizes"] = str(p)
  return paths
