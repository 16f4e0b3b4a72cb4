"""K-BFGS at its defaults on a CNN and on a small transformer language model,
against AdamW tuned over a learning-rate grid (issue 13).

    python -m benchmarks.kbfgs_models            # both models (~18 min on 2 shared cores)
    python -m benchmarks.kbfgs_models --quick    # tiny smoke run (~2 min)
    python -m benchmarks.kbfgs_models --models lm --kbfgs-memory 0
    python -m benchmarks.kbfgs_models --models cnn --methods adamw --adamw-grid 0.03
    python -m benchmarks.kbfgs_models --report   # re-print the saved tables (and Markdown)

Models (Flax linen, :mod:`benchmarks.models`):

* ``cnn``: :class:`benchmarks.models.CNN` (Conv 3x3 16 - avg-pool - Conv 3x3
  32 - avg-pool - Dense 64 - Dense 10) on the first ``--cnn-train`` Fashion-MNIST
  training images (Debian's ``dataset-fashion-mnist``; nothing downloaded),
  batch 128, softmax cross-entropy.
* ``lm``: :class:`benchmarks.models.CharTransformer` (byte embedding and
  learned positions, 2 pre-LayerNorm blocks of
  ``nn.MultiHeadDotProductAttention`` + GELU MLP, untied ``Dense(256)``
  head) on the Python standard library's own top-level ``.py`` files
  (:func:`benchmarks.data.load_stdlib_corpus`: sorted, concatenated, cut at
  ``--lm-bytes``; the last 10 % held out), windows of 64 bytes, batch 32,
  next-byte cross-entropy (nats per byte).

The loss compared is the mean cross-entropy over the WHOLE training split,
evaluated at the start and after every ``1 / --cnn-evals`` (``--lm-evals``)
epoch (the held-out loss is reported next to it).

Methods: ``kbfgs`` = ``olw.kbfgs()`` (nothing passed, nothing tuned),
``kbfgs-l`` = ``olw.kbfgs(memory_size=p)`` (``--kbfgs-memory``, 0 leaves it
out), ``adamw`` = ``optax.adamw(lr)`` (weight decay 1e-4, Optax's default)
over ``--adamw-grid``; the grid point with the lowest final training loss
is "tuned AdamW", whose final loss is the target. On request (not run by
default): ``layerwise-adamw``, ``layerwise-sgd`` (the aliases' defaults,
no learning rate) and ``layerwise-adamw-plain``, ``layerwise-sgd-plain``
(``precondition=None``), e.g.
``--methods adamw,layerwise-adamw,layerwise-adamw-plain``.

Reported per model and method (:mod:`benchmarks.runner` trains and
summarises; nothing here re-implements it):

* final training and held-out losses;
* epochs and measured seconds (training only: no compilation, no
  evaluation) to first reach tuned AdamW's final loss (interpolated between
  evaluations), and "adj s": those epochs x steps per epoch x the
  side-by-side step time, which removes the load differences between runs
  trained at different moments on a shared machine;
* the step-time ratio to AdamW: every method's compiled step timed in
  interleaved rounds in one process after training
  (:func:`benchmarks.timing.time_side_by_side`, median of per-round ratios);
* the optimizer state's bytes (the leaves of ``tx.init(params)``), their
  ratio to AdamW's, and the bytes predicted by the formula of
  docs/kbfgs.md, "State memory per kind" (:func:`state_bytes_formula`), so
  that the formula is checked on every run;
* ``olw.kbfgs_coverage``'s preconditioned fraction of the parameters.

Outputs under ``results/kbfgs_models/<model>/`` (``--out``):
``results.json`` (the runner's schema plus a ``kbfgs_models`` section),
``loss_zoom.png`` (loss vs epochs and vs wall time, each as a full log panel
and a zoomed linear panel), and the runner's ``loss_vs_epoch.png``,
``loss_vs_time.png``, ``step_sizes.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_layerwise as olw
from optax_layerwise import _blocks
from optax_layerwise import _kbfgs
from benchmarks import data as data_lib
from benchmarks import loop
from benchmarks import methods as methods_lib
from benchmarks import models
from benchmarks import runner
from benchmarks.data import DataUnavailableError
from benchmarks.experiments import Experiment, digits_cnn
from benchmarks.experiments import softmax_cross_entropy_fns
from benchmarks.methods import Method
from benchmarks.report import aligned, format_number
from benchmarks.results import BenchmarkResult
from benchmarks.run import csv_list, float_list
from benchmarks.summary import summarise
from benchmarks.timing import AMORTISING_CALLS, Carried, time_side_by_side

__all__ = ["cnn_experiment", "lm_experiment", "state_bytes",
           "state_bytes_formula", "layer_dims", "run_model", "main"]

ADAMW_GRID = (3e-4, 1e-3, 3e-3, 1e-2)
KBFGS_MEMORY = 20
MODELS = ("cnn", "lm")
FULL = dict(cnn_train=12_000, cnn_test=10_000, cnn_epochs=5,
            cnn_channels=(16, 32), cnn_hidden=64, cnn_batch=128,
            lm_bytes=400_000, lm_epochs=3, lm_dim=64, lm_heads=4,
            lm_blocks=2, lm_seq=64, lm_batch=32, timing_rounds=7,
            timing_calls=3, cnn_evals=2, lm_evals=1)
QUICK = dict(cnn_train=512, cnn_test=256, cnn_epochs=2, cnn_channels=(4, 8),
             cnn_hidden=16, cnn_batch=64, lm_bytes=24_000, lm_epochs=2,
             lm_dim=16, lm_heads=2, lm_blocks=1, lm_seq=32, lm_batch=16,
             timing_rounds=2, timing_calls=2, cnn_evals=1, lm_evals=1)


#: The layer-wise aliases this benchmark can also run (``--methods``).
LAYERWISE = ("layerwise-adamw", "layerwise-sgd", "layerwise-adamw-plain",
             "layerwise-sgd-plain")


def registry(kbfgs_memory: int) -> Dict[str, Method]:
  """AdamW and K-BFGS at its defaults (nothing passed: a change of the
  library's defaults is what runs), plus K-BFGS(L) with memory ``p``, and
  on request the layer-wise aliases (:mod:`benchmarks.methods`' rows)."""
  base = methods_lib.registry()
  out = {
      "adamw": dataclasses.replace(base["adamw"], label="AdamW",
                                   make=optax.adamw, lr_grid=ADAMW_GRID),
      "kbfgs": Method("kbfgs", "K-BFGS (defaults)", lambda lr: olw.kbfgs()),
  }
  out.update({name: base[name] for name in LAYERWISE})
  if kbfgs_memory:
    out["kbfgs-l"] = Method(
        "kbfgs-l", f"K-BFGS(L) (memory {kbfgs_memory})",
        lambda lr: olw.kbfgs(memory_size=kbfgs_memory))
  return out


# --------------------------------------------------------------------------
# The experiments
# --------------------------------------------------------------------------


def cnn_experiment(*, n_train: int, n_test: int, batch_size: int,
                   channels: Sequence[int], hidden: int,
                   data_dir: Optional[str] = None) -> Experiment:
  """:func:`benchmarks.experiments.digits_cnn` on Fashion-MNIST, the first
  ``n_train`` training and ``n_test`` test images."""
  exp = digits_cnn(dataset="fashion-mnist", data_dir=data_dir,
                   n_train=n_train, batch_size=batch_size,
                   channels=tuple(channels), hidden=hidden)
  return dataclasses.replace(
      exp, name="fashion-mnist-cnn",
      description=exp.description.replace(
          f"{len(exp.test['x'])} test", f"{min(n_test, len(exp.test['x']))} "
          "test"),
      test={k: v[:n_test] for k, v in exp.test.items()})


def lm_experiment(*, max_bytes: int, seq_len: int, batch_size: int, dim: int,
                  heads: int, num_blocks: int) -> Experiment:
  """A byte-level transformer LM on the standard library's source files."""
  corpus = data_lib.load_stdlib_corpus(max_bytes, seq_len=seq_len)
  model = models.CharTransformer(vocab=256, dim=dim, heads=heads,
                                 num_blocks=num_blocks, max_len=seq_len)
  loss_fn, metrics_fn = softmax_cross_entropy_fns(model)  # token means

  @jax.jit
  def init_fn(key):
    return model.init(key, jnp.zeros((1, seq_len), jnp.int32))["params"]

  return Experiment(
      name="stdlib-char-lm", description=f"byte-level transformer LM on "
      f"{corpus.name}", init_fn=init_fn, loss_fn=loss_fn,
      metrics_fn=metrics_fn, train={"x": corpus.x_train, "y": corpus.y_train},
      test={"x": corpus.x_test, "y": corpus.y_test},
      batch_size=min(batch_size, len(corpus.x_train)), default_epochs=3,
      info={"architecture": f"transformer d{dim} h{heads} x{num_blocks} "
            f"blocks, MLP {4 * dim}, vocab 256, context {seq_len}, untied "
            "head", "data": corpus.name, "files": list(corpus.files),
            "loss": "next-byte softmax cross-entropy (nats), token mean"})


# --------------------------------------------------------------------------
# Optimizer-state memory: measured, and the formula of docs/kbfgs.md
# --------------------------------------------------------------------------


def state_bytes(state) -> int:
  """Bytes of an optimizer state (arrays or ``jax.ShapeDtypeStruct``s): the
  sum over its leaves of size x item size."""
  return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                 for x in jax.tree_util.tree_leaves(state)))


def layer_dims(coverage, params) -> List[Dict[str, Any]]:
  """Per preconditioned layer, from ``olw.kbfgs_coverage``'s kinds and the
  params' shapes alone: ``d_in`` (contracted size: ``prod(window) c_in`` for
  a convolution), ``d_out`` (output size, that of the bias if any) and
  whether it has a bias."""
  shapes = {leaf.path: leaf.shape for leaf in coverage.leaves}
  out = []
  for leaf in coverage.leaves:
    if leaf.kind is None or not leaf.path.endswith("['kernel']"):
      continue
    bias = shapes.get(leaf.path[:-len("['kernel']")] + "['bias']")
    size = math.prod(leaf.shape)
    if leaf.kind == "conv":
      d_out = leaf.shape[-1]
    elif bias is not None:  # dense / einsum: the bias has the output axes
      d_out = math.prod(bias)
    else:
      d_out = leaf.shape[-1]
    out.append({"layer": leaf.path[:-len("['kernel']")], "kind": leaf.kind,
                "shape": list(leaf.shape), "d_in": size // d_out,
                "d_out": d_out, "bias": bias is not None})
  del params
  return out


def state_bytes_formula(dims: List[Dict[str, Any]], num_params: int,
                        num_leaves: int, memory_size: Optional[int] = None,
                        float_bytes: int = 4,
                        block_size: Optional[int] = _kbfgs.BLOCK_SIZE
                        ) -> Dict[str, int]:
  """K-BFGS's state bytes by the formula of docs/kbfgs.md, "State memory
  per kind" (float32 statistics, int32 counters, one bool per leaf).

  Per layer, with ``k = d_in + 1`` (``d_in`` without a bias): ``A`` and
  ``H_a``, ``2 n s^2`` (``n`` blocks of ``s``, :func:`_blocks.layout`;
  ``2 k^2`` for ``k <= block_size``, the default's 1024);
  ``s`` and ``y``, ``2 d_out``; ``H_g``: ``d_out^2`` floats, or for
  K-BFGS(L) ``2 p d_out + 2 p^2 + p + d_out`` floats plus one int32; nine
  per-layer scalars (three floats, six int32 counters). Plus the
  momentum (``P`` floats), ``count`` and ``num_skipped`` (int32) and the
  ``preconditioned`` flags (one byte per params leaf).
  """
  floats, ints = num_params, 2
  per_layer = []
  for d in dims:
    k, n = d["d_in"] + d["bias"], d["d_out"]
    if memory_size:
      p = memory_size
      h_g, h_g_ints = 2 * p * n + 2 * p * p + p + n, 1
    else:
      h_g, h_g_ints = n * n, 0
    blocks, size = _blocks.layout(k, block_size)
    layer_floats = 2 * blocks * size * size + h_g + 2 * n + 3
    layer_ints = 6 + h_g_ints
    per_layer.append((layer_floats + layer_ints) * float_bytes)
    floats += layer_floats
    ints += layer_ints
  return {"bytes": (floats + ints) * float_bytes + num_leaves,
          "factor_bytes": int(sum(per_layer)),
          "momentum_bytes": num_params * float_bytes}


def memory_report(exp: Experiment, reg: Dict[str, Method], seed: int,
                  memory_size: int) -> Dict[str, Any]:
  """Per method: measured state bytes (and ratio to AdamW's); for K-BFGS
  the formula's bytes, the per-layer dims and the coverage fraction."""
  # Shapes only (jax.eval_shape): the bytes are those of tx.init(params).
  params = jax.eval_shape(exp.init_fn, jax.random.PRNGKey(seed))
  batch = {k: jnp.asarray(v[:exp.batch_size]) for k, v in exp.train.items()}
  coverage = olw.kbfgs_coverage(lambda p: exp.loss_fn(p, batch), params)
  dims = layer_dims(coverage, params)
  num_params = int(sum(math.prod(x.shape)
                       for x in jax.tree_util.tree_leaves(params)))
  num_leaves = len(jax.tree_util.tree_leaves(params))
  out: Dict[str, Any] = {
      "num_params": num_params, "params_bytes": state_bytes(params),
      "coverage_fraction": coverage.fraction,
      "coverage": [{"path": l.path, "shape": list(l.shape), "kind": l.kind,
                    "reason": l.reason} for l in coverage.leaves],
      "layers": dims, "methods": {}}
  for name in reg:
    tx, reason = methods_lib.resolve(name, None, reg)
    if tx is None:
      out["methods"][name] = {"error": reason}
      continue
    entry = {"state_bytes": state_bytes(jax.eval_shape(tx.init, params))}
    if name.startswith("kbfgs"):
      entry["formula"] = state_bytes_formula(
          dims, num_params, num_leaves,
          memory_size if name == "kbfgs-l" else None)
    out["methods"][name] = entry
  adamw = out["methods"].get("adamw", {}).get("state_bytes")
  for entry in out["methods"].values():
    if "state_bytes" in entry:
      entry["ratio_adamw"] = entry["state_bytes"] / adamw if adamw else None
  return out


# --------------------------------------------------------------------------
# Side-by-side step timing
# --------------------------------------------------------------------------


def side_by_side(exp: Experiment, reg: Dict[str, Method],
                 result: BenchmarkResult, seed: int, rounds: int, calls: int,
                 progress: bool) -> Dict[str, dict]:
  """Every trained method's compiled step at its chosen learning rate (from
  the same initial params, on the first mini-batch), timed in interleaved
  rounds; AdamW is the baseline."""
  params = exp.init_fn(jax.random.PRNGKey(seed))
  batch = {k: jnp.asarray(v[:exp.batch_size]) for k, v in exp.train.items()}
  steps = {}
  for name, e in result.methods.items():
    tx, _ = methods_lib.resolve(name, e.lr, reg)
    if tx is None or e.status != "ok":
      continue
    steps[name] = Carried(loop.make_step(exp.loss_fn, tx), params,
                          tx.init(params), batch)
    steps[name]()  # compile and warm up (time_side_by_side warms up again)
  if "adamw" not in steps or rounds <= 0:
    return {}
  return time_side_by_side(steps, baseline="adamw", rounds=rounds,
                           calls_per_round=calls, progress=progress)


# --------------------------------------------------------------------------
# The table and the plot
# --------------------------------------------------------------------------


def _fmt(x, digits=4):
  return format_number(x, digits)


def _mb(b):
  return "-" if b is None else f"{b / 2**20:.3g} MiB"


def rows(results: Dict[str, Any]) -> List[Dict[str, Any]]:
  """One dict per method: losses, to-target numbers, ratios, memory."""
  sec = results["kbfgs_models"]
  timing, memory = sec["side_by_side"], sec["memory"]["methods"]
  spe = results["experiment"]["steps_per_epoch"]
  adamw_s = ((results["methods"].get("adamw") or {}).get("summary")
             or {}).get("time_to_target_s")
  out = []
  for name, e in results["methods"].items():
    s = e.get("summary") or {}
    t = timing.get(name) or {}
    ep = s.get("epochs_to_target")
    adj = (ep * spe * t["median_ms"] / 1e3
           if ep is not None and t.get("median_ms") else None)
    mem = memory.get(name) or {}
    out.append({
        "method": name, "label": e["label"], "lr": e["lr"],
        "tuned": e["tuned"], "status": e["status"], "reason": e["reason"],
        "diverged": bool(s.get("num_diverged")),
        "final_train_loss": s.get("final_train_loss"),
        "final_test_loss": s.get("final_test_loss"),
        "epochs_to_target": ep, "time_to_target_s": s.get("time_to_target_s"),
        "time_to_target_ratio_adamw": (
            s["time_to_target_s"] / adamw_s
            if s.get("time_to_target_s") is not None and adamw_s else None),
        "time_to_target_adj_s": adj,
        "train_time_s": s.get("train_time_s"),
        "step_ms_side_by_side": t.get("median_ms"),
        "step_ratio_adamw": t.get("ratio_median"),
        "state_bytes": mem.get("state_bytes"),
        "state_ratio_adamw": mem.get("ratio_adamw"),
        "formula_bytes": (mem.get("formula") or {}).get("bytes"),
    })
  return out


def format_table(results: Dict[str, Any]) -> str:
  """The printed table of one model."""
  exp, sec = results["experiment"], results["kbfgs_models"]
  target = results.get("target") or {}
  head = ["method", "lr", "train loss", "held-out", "ep->AdamW",
          "s->AdamW", "x AdamW s", "adj s", "ms/step", "step x AdamW",
          "state", "state x AdamW", "formula", "status"]
  table = [head]
  for r in sec["table"]:
    lr = (f"{r['lr']:g}" + ("*" if r["tuned"] else "")
          if r["lr"] is not None else "default")
    status = "diverged" if r["diverged"] else r["status"]
    reached = r["epochs_to_target"] is not None
    formula = "-"
    if r["formula_bytes"] is not None:
      formula = ("= measured" if r["formula_bytes"] == r["state_bytes"]
                 else f"{r['formula_bytes']} B (measured "
                 f"{r['state_bytes']} B)")
    table.append([
        r["method"], lr, _fmt(r["final_train_loss"]),
        _fmt(r["final_test_loss"]),
        _fmt(r["epochs_to_target"], 3) if reached else "not reached",
        _fmt(r["time_to_target_s"], 3), _fmt(r["time_to_target_ratio_adamw"],
                                             3),
        _fmt(r["time_to_target_adj_s"], 3), _fmt(r["step_ms_side_by_side"], 3),
        _fmt(r["step_ratio_adamw"], 3), _mb(r["state_bytes"]),
        _fmt(r["state_ratio_adamw"], 3), formula, status])
  mem = sec["memory"]
  lines = [
      f"\n{exp['name']}: {exp['description']}",
      f"  {exp.get('architecture')}  params={exp['num_params']}  "
      f"batch={exp['batch_size']}  train={exp['num_train']}  "
      f"steps/epoch={exp['steps_per_epoch']}  epochs="
      f"{results['config']['epochs']}  seed={results['config']['seeds'][0]}",
      f"  target = tuned AdamW's final full-training-set loss "
      f"{_fmt(target.get('train_loss'), 5)} (lr {_fmt(target.get('lr'))})"
      if target else "  target: none (AdamW did not run)",
      f"  K-BFGS preconditions {100 * mem['coverage_fraction']:.1f}% of the "
      "parameters (olw.kbfgs_coverage); the rest take the momentum fallback",
  ]
  lines += aligned(table, right=lambda j, n: 1 < j < n - 2)
  lines.append(
      "  train loss: over the whole training split; ep/s->AdamW: first "
      "reach of tuned AdamW's final loss (interpolated; s = measured "
      "training time, excl. compile/eval); adj s: epochs to it x steps/epoch "
      "x side-by-side ms/step; ms/step, step x AdamW: interleaved "
      "side-by-side timing in this process (median of per-round ratios); "
      "state: bytes of tx.init(params)'s leaves; formula: docs/kbfgs.md, "
      "'State memory per kind'.")
  for name, e in results["methods"].items():
    if e.get("grid"):
      lines.append(f"  {name} grid (final train loss; * chosen): " + ", ".join(
          f"{g['lr']:g}: {_fmt(g['final_train_loss'])}"
          + (" (diverged)" if g["diverged"] else "")
          + ("*" if g["lr"] == e["lr"] else "") for g in e["grid"]))
    if e.get("reason"):
      lines.append(f"  {name}: {e['reason']}")
  lines.append("  K-BFGS layers (d_in x d_out, bias): " + ", ".join(
      f"{d['layer']} {d['kind']} {d['d_in']}x{d['d_out']}"
      + ("+b" if d["bias"] else "") for d in mem["layers"]))
  for name, m in mem["methods"].items():
    if "formula" in m:
      f = m["formula"]
      lines.append(
          f"  {name} state: measured {m['state_bytes']} B, formula "
          f"{f['bytes']} B (momentum {f['momentum_bytes']} B, factors and "
          f"per-layer scalars {f['factor_bytes']} B, counters and flags "
          f"{f['bytes'] - f['momentum_bytes'] - f['factor_bytes']} B)"
          + ("" if f["bytes"] == m["state_bytes"] else "  MISMATCH"))
  return "\n".join(lines)


def markdown_table(results: Dict[str, Any]) -> str:
  """The table of one model in Markdown (docs/benchmarks.md)."""
  sec = results["kbfgs_models"]
  head = ["method", "LR", "final train loss", "held-out loss",
          "epochs to AdamW's final", "seconds to it (measured / adj)",
          "step time / AdamW's", "state bytes / AdamW's", "formula = measured"]
  out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in sec["table"]:
    lr = (f"{r['lr']:g}" + (" (tuned)" if r["tuned"] else "")
          if r["lr"] is not None else "default")
    loss = _fmt(r["final_train_loss"])
    if r["diverged"] or r["status"] != "ok":
      loss = f"{'diverged' if r['diverged'] else r['status']}"
    reached = r["epochs_to_target"] is not None
    out.append("| " + " | ".join([
        f"{r['label']}", lr, loss, _fmt(r["final_test_loss"]),
        _fmt(r["epochs_to_target"], 3) if reached else
        f"not reached (final {_fmt(r['final_train_loss'])})",
        (f"{_fmt(r['time_to_target_s'], 3)} / "
         f"{_fmt(r['time_to_target_adj_s'], 3)}") if reached else "–",
        _fmt(r["step_ratio_adamw"], 3),
        f"{_mb(r['state_bytes'])}, {_fmt(r['state_ratio_adamw'], 3)}x",
        "–" if r["formula_bytes"] is None else (
            "yes" if r["formula_bytes"] == r["state_bytes"] else
            f"no ({r['formula_bytes']} B)")]) + " |")
  return "\n".join(out)


def write_zoom_plot(results: Dict[str, Any], out: pathlib.Path) -> str:
  """``loss_zoom.png``: training loss vs epochs and vs training wall time,
  each as a full-range log panel and a linear panel zoomed on the later
  part of the curves (where the methods differ)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from benchmarks import plots as plots_lib  # pylint: disable=import-outside-toplevel

  target = (results.get("target") or {}).get("train_loss")
  series = plots_lib.loss_curves(results, min_points=2)
  fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
  exp = results["experiment"]
  for row, (xi, xlabel) in enumerate(((0, "epoch"), (1, "training wall time "
                                      "(s, excl. compile and eval)"))):
    for ax, zoom in zip(axes[row], (False, True)):
      plots_lib.plot_loss_curves(ax, series, xi == 1, xlabel, target,
                                 "tuned AdamW final ({:.4g})")
      if zoom and series:
        # From the lowest loss to the highest final loss (or the target),
        # so that every curve's end and the target line are in view.
        lo = min(float(np.min(x[5])) for x in series)
        hi = max([float(x[5][-1]) for x in series]
                 + ([target] if target is not None else []))
        span = max(hi - lo, 1e-3 * abs(hi))
        ax.set_ylim(lo - 0.1 * span, hi + 0.8 * span)
        ax.set_title("zoom on the final losses (linear y)", fontsize=9)
        ax.set_ylabel("training loss (whole training split)")
      else:
        ax.set_yscale("log")
        ax.set_ylabel("training loss (whole training split, log)")
        ax.set_title(f"{exp['name']}: {exp.get('architecture')}", fontsize=9)
        ax.legend(fontsize=7)
  fig.tight_layout()
  path = out / "loss_zoom.png"
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return str(path)


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def run_model(exp: Experiment, s: argparse.Namespace, epochs: int,
              evals_per_epoch: int, out: pathlib.Path) -> BenchmarkResult:
  """Trains every method on ``exp`` with the runner, times the steps side by
  side, measures the state memory, writes the JSON and plots."""
  reg = {k: v for k, v in registry(s.kbfgs_memory).items()
         if k in s.methods}
  start = time.perf_counter()
  result = runner.run_benchmark(
      exp, list(reg), registry=reg, seeds=[s.seed], epochs=epochs,
      tune=["adamw"], lr_grids={"adamw": tuple(s.adamw_grid)},
      reference="adamw", evals_per_epoch=evals_per_epoch,
      max_steps=s.max_steps, timing_rounds=0, out_dir=None, plots=False,
      progress=s.progress, verbose=False)
  side = side_by_side(exp, reg, result, s.seed, s.timing_rounds,
                      s.timing_calls, s.progress)
  for name, t in side.items():
    result.methods[name].interleaved_step_time_ms = t["median_ms"]
  summarise(result)
  section = {
      "side_by_side": side, "timing_rounds": s.timing_rounds,
      "timing_calls_per_round": s.timing_calls,
      "memory": memory_report(exp, reg, s.seed, s.kbfgs_memory),
      "kbfgs_memory_size": s.kbfgs_memory, "adamw_grid": list(s.adamw_grid),
      "quick": bool(s.quick), "wall_time_s": time.perf_counter() - start,
      "loss": exp.info.get("loss")}
  result.extra["kbfgs_models"] = section
  section["table"] = rows(result.to_json())
  out.mkdir(parents=True, exist_ok=True)
  if not s.no_plots:
    try:
      from benchmarks import plots as plots_lib  # pylint: disable=import-outside-toplevel
      result.plots = plots_lib.plot_results(result.to_json(), out)
      result.plots["loss_zoom"] = write_zoom_plot(result.to_json(), out)
    except Exception as e:  # pylint: disable=broad-except
      print(f"[warn] plotting failed: {type(e).__name__}: {e}", flush=True)
  result.write(out / "results.json")
  print(format_table(result.to_json()), flush=True)
  print(f"  ({section['wall_time_s']:.0f} s)\n  Results: {out / 'results.json'}")
  for kind, p in result.plots.items():
    print(f"  Plot ({kind}): {p}")
  return result


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="tiny smoke run (small data, models and epochs)")
  p.add_argument("--models", default=",".join(MODELS),
                 help="comma-separated, from: " + ", ".join(MODELS))
  p.add_argument("--methods", default="adamw,kbfgs,kbfgs-l",
                 help="comma-separated subset of adamw, kbfgs, kbfgs-l")
  p.add_argument("--adamw-grid", type=float_list, default=list(ADAMW_GRID))
  p.add_argument("--kbfgs-memory", type=int, default=KBFGS_MEMORY,
                 help="K-BFGS(L) memory p (0: no K-BFGS(L) run)")
  p.add_argument("--seed", type=int, default=0)
  for key in FULL:
    if key in ("cnn_channels",):
      continue
    p.add_argument("--" + key.replace("_", "-"), type=int, default=None,
                   help=f"default {FULL[key]} (--quick: {QUICK[key]})")
  p.add_argument("--max-steps", type=int, default=None,
                 help="cap on the steps of every run (smoke tests)")
  p.add_argument("--data-dir", default=None,
                 help="Fashion-MNIST IDX directory (default: Debian's "
                 "/usr/share/datasets/fashion-mnist)")
  p.add_argument("--out", default="results/kbfgs_models")
  p.add_argument("--no-plots", action="store_true")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--report", action="store_true",
                 help="train nothing: re-print the tables (and Markdown) "
                 "and redraw loss_zoom.png from the results.json files "
                 "under --out")
  return p


def settings(args: argparse.Namespace) -> argparse.Namespace:
  """The arguments with the preset (--quick or full) filled in."""
  preset = dict(QUICK if args.quick else FULL)
  if not args.quick and set(csv_list(args.methods)) & set(LAYERWISE):
    # Their curvature is measured every 40 steps: 3 calls a round would
    # time the cheap steps only (1.26x AdamW's on the CNN, 1.45x amortised).
    preset["timing_calls"] = AMORTISING_CALLS
  s = argparse.Namespace(**vars(args))
  for key, value in preset.items():
    if getattr(s, key, None) is None:
      setattr(s, key, value)
  s.models = csv_list(args.models)
  unknown = [m for m in s.models if m not in MODELS]
  if unknown:
    raise SystemExit(f"error: unknown model(s) {unknown}; choose from "
                     f"{list(MODELS)}")
  s.methods = csv_list(args.methods)
  known = registry(s.kbfgs_memory)
  unknown = [m for m in s.methods if m not in known]
  if unknown:
    raise SystemExit(f"error: unknown method(s) {unknown}; choose from "
                     f"{list(known)}")
  s.progress = not args.no_progress
  return s


def report(out: pathlib.Path, plots: bool = True) -> None:
  """Re-prints (and re-plots) the results.json files under ``out``, with
  the Markdown tables of docs/benchmarks.md."""
  for sub in ("cnn", "char_lm"):
    path = out / sub / "results.json"
    if not path.exists():
      continue
    results = json.loads(path.read_text())
    if plots:
      write_zoom_plot(results, path.parent)
    print(format_table(results))
    print()
    print(markdown_table(results))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, BenchmarkResult]:
  s = settings(build_parser().parse_args(argv))
  out = pathlib.Path(s.out)
  if s.report:
    report(out, plots=not s.no_plots)
    return {}
  results = {}
  for name in s.models:
    if name == "cnn":
      try:
        exp = cnn_experiment(n_train=s.cnn_train, n_test=s.cnn_test,
                             batch_size=s.cnn_batch, channels=s.cnn_channels,
                             hidden=s.cnn_hidden, data_dir=s.data_dir)
      except DataUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
      results[name] = run_model(exp, s, s.cnn_epochs, s.cnn_evals,
                                out / "cnn")
    else:
      exp = lm_experiment(max_bytes=s.lm_bytes, seq_len=s.lm_seq,
                          batch_size=s.lm_batch, dim=s.lm_dim,
                          heads=s.lm_heads, num_blocks=s.lm_blocks)
      results[name] = run_model(exp, s, s.lm_epochs, s.lm_evals,
                                out / "char_lm")
  return results


if __name__ == "__main__":
  main()
