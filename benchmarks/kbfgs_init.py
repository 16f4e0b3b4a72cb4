"""K-BFGS's stability at lr 0.3 under three initialisations, with and without
the step bound ``max_relative_change`` (docs/kbfgs.md).

The CURVES autoencoder at batch 1000 on synthetic CURVES, the same data order
for every configuration. Prints the loss every 10 steps and writes
``results/kbfgs_init.json``::

    python -m benchmarks.kbfgs_init [--steps 80] [--n-train 8000]
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_layerwise as olw
from benchmarks import data, loop, models

CONFIGS = (("torch", None), ("torch", 0.1), ("lecun", None), ("lecun", 0.1),
           ("glorot", None), ("glorot", 0.1))


def run_one(weight_init, bound, images, *, steps, batch, lr=0.3, seed=0,
            widths=models.CURVES_AE_WIDTHS):
  """Losses of ``steps`` K-BFGS steps (NaN once the loss is not finite)."""
  model = models.Autoencoder(tuple(widths), weight_init=weight_init)
  params = model.init(jax.random.PRNGKey(seed), images[:1])["params"]

  def loss_fn(p, x):
    logits = model.apply({"params": p}, x)
    return optax.sigmoid_binary_cross_entropy(logits, x).sum(-1).mean()

  tx = olw.kbfgs(lr, max_relative_change=bound)
  batches = loop.shuffled_batches(images, batch, np.random.default_rng(seed))
  _, _, log = loop.train(loop.make_step(loss_fn, tx), params,
                         tx.init(params), batches, steps,
                         stop_at_divergence=False)
  return [v if np.isfinite(v) else float("nan") for v in log.losses]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=80)
  parser.add_argument("--batch", type=int, default=1000)
  parser.add_argument("--n-train", type=int, default=8000)
  parser.add_argument("--small", action="store_true",
                      help="a 784-32-6-32-784 model (smoke test)")
  parser.add_argument("--configs", default=None,
                      help="a subset of INIT/BOUND pairs, e.g. "
                      "torch/0.1,lecun/None (default: all six)")
  parser.add_argument("--out", default="results/kbfgs_init.json")
  args = parser.parse_args(argv)
  ds = data.make_curves(args.n_train, 100)
  images = jnp.asarray(ds.x_train.reshape(len(ds.x_train), -1))
  widths = (784, 32, 6, 32, 784) if args.small else models.CURVES_AE_WIDTHS
  results = {}
  print(f"{'init':<8}{'bound':>7}  loss every 10 steps")
  configs = CONFIGS
  if args.configs:
    configs = [c for c in CONFIGS if f"{c[0]}/{c[1]}" in args.configs.split(",")]
  for weight_init, bound in configs:
    losses = run_one(weight_init, bound, images, steps=args.steps,
                     batch=args.batch, widths=widths)
    results[f"{weight_init}/{bound}"] = dict(
        weight_init=weight_init, max_relative_change=bound, losses=losses)
    shown = " ".join(f"{v:9.4g}" for v in losses[::10] + losses[-1:])
    print(f"{weight_init:<8}{str(bound):>7}  {shown}", flush=True)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(steps=args.steps, batch=args.batch, lr=0.3,
                   widths=list(widths),
                   n_train=args.n_train, runs=results), f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
