"""Command line for every experiment.

    python -m benchmarks.run --experiment curves-ae \\
        --methods kbfgs,kbfgs-l,layerwise-sgd,layerwise-adamw,adam,sgd \\
        --tune adam,sgd --epochs 10 --seeds 0,1

Experiments: ``curves-ae``, ``mnist-ae``, ``digits-cnn``, ``gcn`` (see
:mod:`benchmarks.experiments`); methods: see :data:`benchmarks.methods.METHODS`
(``--methods all`` runs them all). Results go to ``results/<experiment>/``
(``results.json``, ``loss_vs_epoch.png``, ``loss_vs_time.png``,
``step_sizes.png``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional, Sequence

from benchmarks import methods as methods_lib
from benchmarks import runner
from benchmarks.data import DataUnavailableError
from benchmarks.experiments import EXPERIMENTS, build_experiment
from benchmarks.results import BenchmarkResult


def csv_list(s: str) -> List[str]:
  return [x.strip() for x in s.split(",") if x.strip()]


def float_list(s: str) -> List[float]:
  return [float(x) for x in csv_list(s)]


def int_list(s: str) -> List[int]:
  return [int(x) for x in csv_list(s)]


def _method_values(items: Optional[Sequence[str]], many: bool) -> Dict:
  """Parses repeated ``NAME=V[,V...]`` options."""
  out = {}
  for item in items or ():
    if "=" not in item:
      raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {item!r}")
    name, value = item.split("=", 1)
    out[name.strip()] = float_list(value) if many else float(value)
  return out


def build_parser(defaults: Optional[dict] = None,
                 description: str = __doc__) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      description=description,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--experiment", choices=sorted(EXPERIMENTS),
                 default="curves-ae")
  p.add_argument("--methods", type=str,
                 default=",".join(methods_lib.DEFAULT_METHODS),
                 help="comma-separated method names, or 'all'. Known: "
                 + ", ".join(methods_lib.METHODS))
  p.add_argument("--epochs", type=int, default=None,
                 help="epochs per run (default: the experiment's)")
  p.add_argument("--seeds", type=int_list, default=[0],
                 help="comma-separated seeds, e.g. 0,1,2")
  p.add_argument("--batch-size", type=int, default=None)
  p.add_argument("--n-train", type=int, default=None,
                 help="training examples (data-set experiments)")
  p.add_argument("--n-test", type=int, default=None)
  p.add_argument("--tune", type=str, default="adam,sgd",
                 help="methods whose LR is picked from a grid by final train "
                 "loss ('all': every method that has one; 'none': no tuning)")
  p.add_argument("--lr-grid", action="append", metavar="NAME=LR,LR,...",
                 help="grid for a tuned method (repeatable)")
  p.add_argument("--lr", action="append", metavar="NAME=LR",
                 help="fixed LR for an untuned method (repeatable)")
  p.add_argument("--reference", default="adam",
                 help="method whose final train loss is the target")
  p.add_argument("--evals-per-epoch", type=int, default=1)
  p.add_argument("--max-steps", type=int, default=None,
                 help="cap on steps per run (smoke tests)")
  p.add_argument("--timing-rounds", type=int, default=10,
                 help="after training, time every method's compiled step "
                 "round-robin for this many rounds (0: skip)")
  p.add_argument("--out", type=str, default=None,
                 help="output directory (default results/<experiment>)")
  p.add_argument("--no-plots", action="store_true")
  p.add_argument("--no-progress", action="store_true")
  g = p.add_argument_group("data and model sizes")
  g.add_argument("--dataset", type=str, default=None,
                 help="mnist-ae: auto|fashion-mnist|curves; digits-cnn: "
                 "digits|fashion-mnist")
  g.add_argument("--data-dir", type=str, default=None,
                 help="directory of MNIST-format IDX files")
  g.add_argument("--cache-dir", type=str, default=None,
                 help="cache generated CURVES here (.npz)")
  g.add_argument("--data-seed", type=int, default=None)
  g.add_argument("--widths", type=int_list, default=None,
                 help="autoencoder widths, input first, e.g. 784,64,8,64,784")
  g.add_argument("--hidden", type=int, default=None,
                 help="hidden width (digits-cnn dense, gcn)")
  g.add_argument("--num-nodes", type=int, default=None, help="gcn nodes")
  g.add_argument("--kbfgs-memory", type=int, default=methods_lib.KBFGS_MEMORY,
                 help="K-BFGS(L) memory p")
  if defaults:
    p.set_defaults(**defaults)
  return p


def run_from_args(args: argparse.Namespace) -> BenchmarkResult:
  registry = methods_lib.registry(kbfgs_memory=args.kbfgs_memory)
  methods = (list(registry) if args.methods.strip() == "all"
             else csv_list(args.methods))
  tune = [] if args.tune.strip() in ("", "none") else csv_list(args.tune)
  if tune == ["all"]:
    tune = [m for m in methods
            if m in registry and registry[m].default_lr is not None]
  try:
    exp = build_experiment(
        args.experiment, n_train=args.n_train, n_test=args.n_test,
        batch_size=args.batch_size, dataset=args.dataset,
        data_dir=args.data_dir, cache_dir=args.cache_dir,
        data_seed=args.data_seed, widths=args.widths, hidden=args.hidden,
        num_nodes=args.num_nodes)
  except DataUnavailableError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from e
  out = args.out or f"results/{args.experiment}"
  return runner.run_benchmark(
      exp, methods, registry=registry, seeds=args.seeds, epochs=args.epochs, tune=tune,
      lr_grids=_method_values(args.lr_grid, True),
      lrs=_method_values(args.lr, False), reference=args.reference,
      evals_per_epoch=args.evals_per_epoch, max_steps=args.max_steps,
      timing_rounds=args.timing_rounds,
      out_dir=out, plots=not args.no_plots, progress=not args.no_progress)


def main(argv: Optional[Sequence[str]] = None) -> BenchmarkResult:
  return run_from_args(build_parser().parse_args(argv))


if __name__ == "__main__":
  main()
