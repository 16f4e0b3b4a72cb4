"""The main benchmark: the first thing to run.

    python -m benchmarks.main                 # 2-4 minutes on 2 CPU cores
    python -m benchmarks.main --paper-scale   # 20k/10k CURVES, batch 1000, 20 epochs

Trains the K-BFGS paper's CURVES autoencoder
(784-400-200-100-50-25-6-25-50-100-200-400-784, ReLU, linear code and output
layers, sigmoid cross-entropy summed over pixels) on synthetic CURVES
(generated, nothing downloaded) with K-BFGS, K-BFGS(L), layer-wise SGD-m and
layer-wise AdamW (no learning rate), against Adam, AdamW and SGD-m each tuned
over a learning-rate grid. Prints a table (final train/test loss, epochs and
wall-clock seconds to reach tuned Adam's final train loss, per-step time and
its ratio to Adam's) and writes ``results/main/results.json`` and the plots
``results/main/loss_vs_epoch.png``, ``loss_vs_time.png``,
``step_sizes.png``.

Every flag of ``python -m benchmarks.run`` works here too (``--epochs``,
``--n-train``, ``--methods``, ``--seeds``, ``--lr-grid adam=...``, ...).
Methods whose constructor is not in ``optax_layerwise`` yet are listed as
unavailable and skipped.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from benchmarks import run
from benchmarks.results import BenchmarkResult

# Sized for a few minutes on 2 CPU cores (measured: docs/benchmarks.md).
# K-BFGS runs at its default (the authors') learning rate 0.3 and the
# layer-wise methods have none: none of them is tuned. Adam, AdamW and SGD-m
# are each tuned over a 4-point grid.
QUICK = dict(
    experiment="curves-ae", n_train=8000, n_test=2000, batch_size=250,
    epochs=8, evals_per_epoch=2, tune="adam,adamw,sgd",
    lr_grid=["adam=1e-3,3e-3,1e-2,3e-2", "adamw=1e-3,3e-3,1e-2,3e-2",
             "sgd=3e-4,1e-3,3e-3,1e-2"],
    out="results/main", cache_dir="results/cache",
    methods="kbfgs,kbfgs-l,layerwise-sgd,layerwise-adamw,adam,adamw,sgd")
PAPER = dict(n_train=20_000, n_test=10_000, batch_size=1000, epochs=20,
             evals_per_epoch=1,
             lr_grid=["adam=1e-4,3e-4,1e-3,3e-3,1e-2",
                      "adamw=1e-4,3e-4,1e-3,3e-3,1e-2",
                      "sgd=1e-3,3e-3,1e-2,3e-2,1e-1"])


def main(argv: Optional[Sequence[str]] = None) -> BenchmarkResult:
  argv = list(sys.argv[1:] if argv is None else argv)
  defaults = dict(QUICK)
  if "--paper-scale" in argv:
    argv.remove("--paper-scale")
    defaults.update(PAPER)
  parser = run.build_parser(defaults, description=__doc__)
  parser.add_argument("--paper-scale", action="store_true",
                      help="20k train / 10k test, batch 1000, 20 epochs, "
                      "5-point LR grids (about an hour or more on 2 cores)")
  args = parser.parse_args(argv)
  # A user --lr-grid NAME=... is appended after the defaults and wins.
  return run.run_from_args(args)


if __name__ == "__main__":
  main()
