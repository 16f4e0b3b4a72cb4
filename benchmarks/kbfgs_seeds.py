"""K-BFGS at its defaults over several seeds and initialisations: does it
ever diverge, and how fast does it reach tuned Adam's loss?

The task of :mod:`benchmarks.fashion_mnist` (the K-BFGS paper's MNIST
autoencoder on all 60,000 Fashion-MNIST images, batch 1000), trained with
``olw.kbfgs()`` and nothing passed, once per (initialisation, seed); the
seed sets both the initial parameters and the data order. Prints, per run,
the full-training-set loss after each epoch, the epochs to ``--target``
(tuned Adam's 10-epoch loss there, 221.5; interpolated between
evaluations, as in that benchmark's table), and the largest mini-batch loss
of the first 30 steps over the first one (an overshoot at the start shows
as a ratio above 1). Writes ``results/kbfgs_seeds/results.json`` and
``loss_vs_step.png``::

    python -m benchmarks.kbfgs_seeds [--seeds 0-9] [--inits lecun,glorot,torch]
        [--epochs 2] [--evals-per-epoch 1] [--h-g-init identity]
        [--memory-size 100] [--quick]

``--evals-per-epoch 10`` evaluates every 6 steps, so the epochs to the
target are read off the curve rather than interpolated between epoch ends
(which overstates them where the loss falls fast within the epoch).
``--h-g-init identity`` trains ``olw.kbfgs(h_g_init="identity")`` (the
paper's first ``H_g``) instead of the defaults, for a comparison;
``--memory-size p`` trains K-BFGS(L).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from benchmarks import fashion_mnist as fm
from benchmarks import models, plots, results as results_lib, runner, timing
from benchmarks.run import csv_list, int_list

import optax_layerwise as olw

#: Tuned Adam's 10-epoch loss on the full task (docs/benchmarks.md).
ADAM_10_EPOCH_LOSS = 221.5
EARLY_STEPS = 30


def parse_seeds(text: str) -> List[int]:
  """``"0-9"`` or ``"0,3,5"`` (or both, ``"0-2,7"``)."""
  seeds = []
  for part in csv_list(text):
    lo, _, hi = part.partition("-")
    seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
  return seeds


def run_summary(run: results_lib.Run, target: float) -> Dict[str, Any]:
  """Per-epoch losses, epochs to ``target``, the early peak of the batch
  loss over its first value, and whether the run diverged: a loss not
  finite, or a full-training-set loss above the initial one (a finite
  blow-up, such as 543 -> 1954 after an epoch). A diverged run has no
  epochs to ``target``."""
  h = run.history
  losses = np.asarray([np.nan if v is None else v for v in h.train_loss],
                      float)
  diverged = bool(run.diverged or not np.all(np.isfinite(losses))
                  or (len(losses) > 1 and np.max(losses[1:]) > losses[0]))
  epochs_to, _ = timing.time_to_target(h.epoch, h.time_s, h.train_loss,
                                       target)
  batch = np.asarray(run.batch_loss["loss"][:EARLY_STEPS], float)
  peak = (float(np.nanmax(batch) / batch[0])
          if len(batch) and np.isfinite(batch[0]) else None)
  whole = [i for i, e in enumerate(h.epoch) if float(e).is_integer()]
  return dict(seed=run.seed,
              train_loss=[h.train_loss[i] for i in whole],  # epoch ends
              evaluated=dict(epoch=list(h.epoch),
                             train_loss=list(h.train_loss)),
              epochs_to_target=None if diverged else epochs_to,
              early_peak_ratio=peak, diverged=diverged, status=run.status)


def train(init: str, seeds: Sequence[int], s: argparse.Namespace
          ) -> List[results_lib.Run]:
  """One default K-BFGS run per seed on ``init``'s autoencoder."""
  exp = fm.build_experiment(data_dir=s.data_dir, n_train=s.n_train,
                            n_test=s.n_test, batch_size=s.batch_size,
                            widths=s.widths, weight_init=init)
  if exp.steps_per_epoch % s.evals_per_epoch:
    raise SystemExit(f"--evals-per-epoch {s.evals_per_epoch} must divide the "
                     f"{exp.steps_per_epoch} steps of an epoch (the table "
                     "reads the loss at epoch ends).")
  registry = dict(fm.REGISTRY)
  if kbfgs_kwargs(s):
    registry["kbfgs"] = dataclasses.replace(
        registry["kbfgs"], label=f"K-BFGS ({describe(s)})",
        make=lambda lr: olw.kbfgs(**kbfgs_kwargs(s)))
  res = runner.run_benchmark(
      exp, ["kbfgs"], registry=registry, seeds=list(seeds),
      epochs=s.epochs, reference="kbfgs", evals_per_epoch=s.evals_per_epoch,
      timing_rounds=0, out_dir=None, plots=False, progress=not s.no_progress,
      verbose=False)
  return res.methods["kbfgs"].runs


def format_table(rows: List[Dict[str, Any]], epochs: int,
                 target: float) -> str:
  head = (f"{'init':<7}{'seed':>5}" + "".join(f"{f'ep {e}':>9}"
                                               for e in range(epochs + 1))
          + f"{f'ep to {target:g}':>12}{'peak/first':>12}  status")
  lines = [head, "-" * len(head)]
  fmt = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"
  for r in rows:
    losses = (r["train_loss"] + [None] * (epochs + 1))[:epochs + 1]
    lines.append(
        f"{r['init']:<7}{r['seed']:>5}" + "".join(f"{fmt(v):>9}"
                                                  for v in losses)
        + f"{fmt(r['epochs_to_target'], 2):>12}"
        + f"{fmt(r['early_peak_ratio'], 2):>12}  "
        + ("DIVERGED" if r["diverged"] else r["status"]))
  return "\n".join(lines)


def write_plot(runs: Dict[str, List[results_lib.Run]],
               path: pathlib.Path, title: str) -> None:
  """Mini-batch loss against steps, one line per run, coloured by init."""
  fig, ax = plots.plt.subplots(figsize=(7, 4.2))
  colors = {"lecun": "tab:red", "glorot": "tab:blue", "torch": "tab:green"}
  for init, init_runs in runs.items():
    for i, run in enumerate(init_runs):
      ax.plot(run.batch_loss["step"], run.batch_loss["loss"], lw=0.8,
              alpha=0.7, color=colors.get(init),
              label=f"{init} init ({len(init_runs)} seeds)" if i == 0
              else None)
  ax.axhline(ADAM_10_EPOCH_LOSS, color="k", ls=":", lw=0.8,
             label=f"tuned Adam, 10 epochs ({ADAM_10_EPOCH_LOSS:g})")
  ax.set_yscale("log")
  ax.set_xlabel("step (batch 1000; 60 steps = 1 epoch)")
  ax.set_ylabel("mini-batch loss")
  ax.set_title(f"{title}, Fashion-MNIST autoencoder")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plots.plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seeds", default="0-9", help="e.g. 0-9 or 0,3,5")
  p.add_argument("--inits", default="lecun,glorot,torch",
                 help="from lecun (Flax's default), glorot, torch")
  p.add_argument("--glorot-torch-seeds", default="0-2",
                 help="seeds for the inits other than lecun")
  p.add_argument("--epochs", type=int, default=2)
  p.add_argument("--n-train", type=int, default=60_000)
  p.add_argument("--n-test", type=int, default=1000)
  p.add_argument("--batch-size", type=int, default=1000)
  p.add_argument("--widths", type=int_list,
                 default=list(models.MNIST_AE_WIDTHS),
                 help="autoencoder widths (smoke tests shrink them)")
  p.add_argument("--target", type=float, default=ADAM_10_EPOCH_LOSS)
  p.add_argument("--evals-per-epoch", type=int, default=1,
                 help="full-training-set evaluations per epoch")
  p.add_argument("--h-g-init", default=None, choices=("identity",
                                                      "diagonal"),
                 help="pass h_g_init to olw.kbfgs (default: its default)")
  p.add_argument("--memory-size", type=int, default=None,
                 help="pass memory_size to olw.kbfgs (K-BFGS(L))")
  p.add_argument("--quick", action="store_true",
                 help="smoke run: 5000 images, 1 epoch, seed 0 of each init")
  p.add_argument("--data-dir", default=None)
  p.add_argument("--out", default=None,
                 help="default results/kbfgs_seeds, with _h_g_init_X for "
                 "--h-g-init X and _memory_size_P for --memory-size P")
  p.add_argument("--no-progress", action="store_true")
  return p


def kbfgs_kwargs(s: argparse.Namespace) -> Dict[str, Any]:
  """The ``olw.kbfgs`` arguments the command line sets (the rest default)."""
  given = dict(h_g_init=s.h_g_init, memory_size=s.memory_size)
  return {k: v for k, v in given.items() if v is not None}


def describe(s: argparse.Namespace) -> str:
  return ", ".join(f"{k}={v!r}" for k, v in kbfgs_kwargs(s).items())


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  s = build_parser().parse_args(argv)
  if s.quick:
    s.n_train, s.epochs, s.seeds, s.glorot_torch_seeds = 5000, 1, "0", "0"
  rows, runs = [], {}
  for init in csv_list(s.inits):
    seeds = parse_seeds(s.seeds if init == "lecun" else s.glorot_torch_seeds)
    runs[init] = train(init, seeds, s)
    rows += [dict(init=init, **run_summary(r, s.target)) for r in runs[init]]
    print(format_table(rows, s.epochs, s.target), flush=True)
  out = pathlib.Path(s.out or "results/kbfgs_seeds" + "".join(
      f"_{k}_{v}" for k, v in kbfgs_kwargs(s).items()))
  out.mkdir(parents=True, exist_ok=True)
  reached = [r["epochs_to_target"] for r in rows
             if r["epochs_to_target"] is not None]
  summary = dict(runs=len(rows), diverged=sum(r["diverged"] for r in rows),
                 failed=sum(r["status"] != "ok" for r in rows),
                 reached=len(reached),
                 epochs_to_target_mean=float(np.mean(reached))
                 if reached else None,
                 epochs_to_target_max=max(reached, default=None))
  print(f"\n{summary['diverged']} of {len(rows)} runs diverged, "
        f"{summary['failed']} failed; "
        f"{len(reached)} reached {s.target:g}"
        + (f" in {summary['epochs_to_target_mean']:.2f} epochs on average "
           f"(at most {summary['epochs_to_target_max']:.2f})"
           if reached else ""))
  results_lib.write_json(out / "results.json", dict(
      config=dict(vars(s)), kbfgs_defaults=fm.kbfgs_defaults(),
      environment=results_lib.environment(), summary=summary, rows=rows,
      batch_loss={f"{i}/{r.seed}": r.batch_loss for i, rs in runs.items()
                  for r in rs}))
  write_plot(runs, out / "loss_vs_step.png",
             f"olw.kbfgs({describe(s)})" if kbfgs_kwargs(s)
             else "olw.kbfgs() defaults")
  print(f"wrote {out / 'results.json'} and {out / 'loss_vs_step.png'}")
  return dict(summary=summary, rows=rows)


if __name__ == "__main__":
  main()
