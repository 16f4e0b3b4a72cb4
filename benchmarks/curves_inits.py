"""Defaults on three initialisations of the CURVES autoencoder (issue 12).

Each transform, nothing tuned, for ``--steps`` steps (default 200, 10
epochs) on the K-BFGS paper's CURVES autoencoder (2000 synthetic curves,
batch 100, sigmoid cross-entropy summed over 784 pixels) from Flax's default
(LeCun normal), Glorot and the authors' (PyTorch) initialisation: the loss
at the start and over the last 20 steps, and whether every step was finite.
Prints a table and writes ``<out>/curves_inits.json``. About 5 minutes on 2
CPU cores.

    python -m benchmarks.curves_inits [--steps 200] [--out results/curves_inits]
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_layerwise as olw
from benchmarks import experiments
from benchmarks import models
from benchmarks.report import aligned

INITS = ("lecun", "glorot", "torch")
TRANSFORMS: Dict[str, Callable[[], optax.GradientTransformation]] = {
    "layerwise_adamw()": olw.layerwise_adamw,
    "layerwise_sgd()": olw.layerwise_sgd,
    "layerwise_adamw(precondition=None)": lambda: olw.layerwise_adamw(
        precondition=None),
    "kbfgs()": olw.kbfgs,
    "adam(1e-3)": lambda: optax.adam(1e-3),
}


def curves_autoencoder_run(tx, num_steps: int):
  """``run(init) -> (state, losses)``: ``tx`` for ``num_steps`` steps on the
  CURVES autoencoder (:func:`benchmarks.experiments.curves_ae`'s data and
  loss), one compilation for every ``weight_init`` of
  :class:`benchmarks.models.Autoencoder` (same shapes)."""
  exp = experiments.curves_ae(n_train=2000, n_test=10, batch_size=100)
  x = jnp.asarray(exp.train["x"], jnp.float32)
  batches = x.reshape(20, 100, -1)[jnp.arange(num_steps) % 20]

  def step(carry, xb):
    p, state = carry
    loss = lambda q: exp.loss_fn(q, {"x": xb})  # noqa: E731
    value, grads = jax.value_and_grad(loss)(p)
    updates, state = tx.update(grads, state, p, value_fn=loss)
    return (optax.apply_updates(p, updates), state), value

  train = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), batches))

  def run(init: str):
    params = models.Autoencoder(models.CURVES_AE_WIDTHS,
                                weight_init=init).init(
                                    jax.random.PRNGKey(0), x[:1])["params"]
    (_, state), losses = train(params)
    return state, np.asarray(losses)

  return run


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--out", default="results/curves_inits")
  args = parser.parse_args(argv)
  rows, results = [], {}
  for name, make in TRANSFORMS.items():
    run = curves_autoencoder_run(make(), args.steps)
    for init in INITS:
      _, losses = run(init)
      last = float(losses[-20:].mean())
      finite = bool(np.all(np.isfinite(losses)))
      results[f"{name} {init}"] = dict(start=float(losses[0]), last20=last,
                                       finite=finite)
      rows.append([name, init, f"{losses[0]:.1f}", f"{last:.1f}",
                   "yes" if finite else "NO"])
      print(f"{name} {init}: {losses[0]:.1f} -> {last:.1f}", flush=True)
  print("\n".join(aligned([["transform", "init", "loss at 0",
                            "mean of last 20", "all finite"]] + rows)))
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "curves_inits.json").write_text(json.dumps(
      dict(steps=args.steps, results=results), indent=1))
  print(f"Results: {out / 'curves_inits.json'}")
  return results


if __name__ == "__main__":
  main()
