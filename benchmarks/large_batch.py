"""Large-batch training: SGD-m vs LARS vs CBLR vs MCLR at batch 256 and 4096.

Gao and Zhong (arXiv 2012.08795) argue that large batches fail in part
because layers see very different curvature, and propose per-layer learning
rates fitted to it (CBLR, MCLR; LARS is a special case). This script trains the
same MLP classifier with each method at a small and a large batch for the
same number of epochs (so the large batch takes 16x fewer steps) and reports
the final train loss and test accuracy.

Data: a deterministic synthetic 10-class problem generated here (no
download): 32-dimensional anisotropic Gaussian inputs labelled by a random
tanh "teacher" MLP, with 5% label noise; 32768 train, 4096 validation and 8192
test examples, so that batch 4096 is an eighth of an epoch. Model: a ReLU
MLP 32-128-128-10 with softmax cross-entropy.

Protocol: every method uses heavy-ball momentum 0.9 and a cosine decay of its
global learning-rate scale, and gets a small grid of that scale (3 or 4
values, placed per method since the scales mean different things); the value
with the best validation accuracy is reported. LARS is ``optax.lars`` with
``trust_coefficient=1`` (so the grid is the relative step per layer). CBLR
and MCLR use the Hessian curvature (forward-over-reverse; CBLR with the exact
per-layer quotients, 3 products a measurement, MCLR with 4 Hutchinson
probes), measured every 4 steps, smoothed by an EMA, with a safety clip
``max_lr`` that does not bind.

Run from the repository root::

    python -m benchmarks.large_batch            # a few minutes on 2 cores
    python -m benchmarks.large_batch --quick    # a smoke run

Writes ``results/large_batch.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_layerwise as olw
from benchmarks import loop

try:
  from tqdm import tqdm
except ImportError:  # tqdm is in the bench extra; fall back to no bar
  tqdm = None

NUM_CLASSES = 10
DIM = 32
SIZES = (DIM, 128, 128, NUM_CLASSES)


# ---------------------------------------------------------------- the data ---


def make_data(n_train=32768, n_val=4096, n_test=8192, seed=0, noise=0.05):
  """Teacher-labelled anisotropic Gaussian inputs; float32 X, int32 y."""
  rng = np.random.default_rng(seed)
  scales = np.geomspace(3.0, 0.1, DIM)  # anisotropic inputs: ill-conditioned
  rotation = np.linalg.qr(rng.normal(size=(DIM, DIM)))[0]
  w1 = rng.normal(size=(DIM, 64)) / np.sqrt(DIM) * 2.0
  w2 = rng.normal(size=(64, NUM_CLASSES)) / np.sqrt(64) * 3.0
  n = n_train + n_val + n_test
  x = (rng.normal(size=(n, DIM)) * scales) @ rotation
  logits = np.tanh(x @ rotation.T / scales @ w1) @ w2
  y = np.argmax(logits, axis=1)
  flip = rng.random(n) < noise
  y[flip] = rng.integers(0, NUM_CLASSES, size=flip.sum())
  x, y = x.astype(np.float32), y.astype(np.int32)
  split = np.cumsum([n_train, n_val])
  return dict(zip(("train", "val", "test"),
                  zip(np.split(x, split), np.split(y, split))))


# --------------------------------------------------------------- the model ---


def init_params(key):
  params = {}
  for i, (m, n) in enumerate(zip(SIZES[:-1], SIZES[1:])):
    key, sub = jax.random.split(key)
    params[f"dense{i}"] = {
        "kernel": jax.random.normal(sub, (m, n)) * np.sqrt(2.0 / m),
        "bias": jnp.zeros((n,)),
    }
  return params


def logits_fn(params, x):
  h = x
  for i in range(len(SIZES) - 1):
    layer = params[f"dense{i}"]
    h = h @ layer["kernel"] + layer["bias"]
    if i < len(SIZES) - 2:
      h = jax.nn.relu(h)
  return h


def loss_fn(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_fn(params, x), y).mean()


@jax.jit
def evaluate(params, x, y):
  logits = logits_fn(params, x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, jnp.mean(jnp.argmax(logits, -1) == y)


# ------------------------------------------------------------- the methods ---


def make_optimizer(method: str, scale: float, total_steps: int):
  schedule = optax.cosine_decay_schedule(scale, total_steps)
  if method == "sgdm":
    return optax.sgd(schedule, momentum=0.9)
  if method == "lars":
    return optax.lars(schedule, trust_coefficient=1.0, momentum=0.9)
  # max_lr is a safety clip only: it must not bind in normal operation, or
  # the method degenerates to SGD-m with lr = scale * max_lr.
  # Curvature is re-measured every 4 steps (the library's update_interval),
  # which amortises the Hessian-vector products and MCLR's per-layer sorts.
  common = dict(momentum=0.9, ema=0.9, max_lr=100.0, initial_lr=1e-2,
                update_interval=4)
  if method == "cblr":  # L = 3 layers: the exact quotients cost 3 HVPs
    return olw.cblr(schedule, curvature="hessian", estimator="exact",
                    **common)
  if method == "mclr":
    return olw.mclr(schedule, curvature="hessian", num_probes=4, **common)
  raise ValueError(method)


GRIDS = {
    "sgdm": (0.03, 0.1, 0.3, 1.0),
    "lars": (0.003, 0.01, 0.03, 0.1),
    "cblr": (0.1, 0.3, 1.0),
    "mclr": (0.003, 0.01, 0.03, 0.1),
}
LABELS = {"sgdm": "SGD-m", "lars": "LARS", "cblr": "CBLR", "mclr": "MCLR"}


@functools.partial(jax.jit, static_argnames=("batch_size",))
def epoch_batches(key, x, y, *, batch_size):
  """One epoch of shuffled mini-batches, stacked for a scanned step."""
  steps = x.shape[0] // batch_size
  perm = jax.random.permutation(key, x.shape[0])[:steps * batch_size]
  return (x[perm].reshape(steps, batch_size, -1),
          y[perm].reshape(steps, batch_size))


def run(method, scale, batch_size, epochs, data, seed=0):
  start = time.perf_counter()
  x, y = (jnp.asarray(a) for a in data["train"])
  total_steps = epochs * (x.shape[0] // batch_size)
  tx = make_optimizer(method, scale, total_steps)
  params = init_params(jax.random.PRNGKey(seed))
  key = jax.random.PRNGKey(seed + 1)
  batches = (epoch_batches(jax.random.fold_in(key, epoch), x, y,
                           batch_size=batch_size) for epoch in range(epochs))
  # One call per epoch: the epoch's steps under one jax.lax.scan.
  step = loop.make_step(lambda p, b: loss_fn(p, *b), tx, scan=True)
  params, opt_state, _ = loop.train(step, params, tx.init(params), batches,
                                    epochs, stop_at_divergence=False)
  train_loss, train_acc = evaluate(params, x, y)
  val_loss, val_acc = evaluate(params, *map(jnp.asarray, data["val"]))
  test_loss, test_acc = evaluate(params, *map(jnp.asarray, data["test"]))
  jax.block_until_ready((params, opt_state, test_acc))  # dispatch is async
  seconds = time.perf_counter() - start
  finite = bool(np.isfinite(float(train_loss)))
  extra = {}
  if method in ("cblr", "mclr"):  # the per-layer diagnostics of the state
    inner = opt_state[0]
    extra = {"final_layer_lrs": np.asarray(inner.lrs).tolist(),
             "final_layer_curvatures": np.asarray(inner.curvatures).tolist(),
             "layer_fallbacks": np.asarray(inner.num_fallbacks).tolist()}
  return {
      "method": method, "scale": scale, "batch_size": batch_size,
      "epochs": epochs, "steps": total_steps,
      "train_loss": float(train_loss) if finite else None,
      "train_acc": float(train_acc), "val_acc": float(val_acc),
      "test_loss": float(test_loss) if finite else None,
      "test_acc": float(test_acc), "seconds": seconds, **extra,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument("--batch-sizes", type=int, nargs="+",
                      default=[256, 4096])
  parser.add_argument("--methods", nargs="+", default=list(GRIDS))
  parser.add_argument("--quick", action="store_true",
                      help="2 epochs, one grid value per method (smoke run)")
  parser.add_argument("--out", default="results/large_batch.json")
  args = parser.parse_args(argv)

  data = make_data()
  grids = {m: GRIDS[m] for m in args.methods}
  epochs = args.epochs
  if args.quick:
    epochs = 2
    grids = {m: g[len(g) // 2:len(g) // 2 + 1] for m, g in grids.items()}
  jobs = [(m, s, b) for b in args.batch_sizes for m, g in grids.items()
          for s in g]
  bar = tqdm(jobs, desc="runs", unit="run") if tqdm else jobs
  runs = []
  for method, scale, batch_size in bar:
    if tqdm:
      bar.set_postfix_str(f"{method} b={batch_size} lr={scale}")
    runs.append(run(method, scale, batch_size, epochs, data))

  best = {}
  for r in runs:
    k = (r["method"], r["batch_size"])
    if k not in best or r["val_acc"] > best[k]["val_acc"]:
      best[k] = r
  header = (f"{'method':8s} {'batch':>6s} {'steps':>6s} {'lr scale':>9s} "
            f"{'train loss':>11s} {'test acc':>9s} {'s/run':>7s}")
  lines = [header, "-" * len(header)]
  for b in args.batch_sizes:
    for m in grids:
      r = best[(m, b)]
      loss = "diverged" if r["train_loss"] is None else f"{r['train_loss']:.4f}"
      lines.append(f"{LABELS[m]:8s} {b:6d} {r['steps']:6d} {r['scale']:9g} "
                   f"{loss:>11s} {r['test_acc']:9.4f} {r['seconds']:7.1f}")
  table = "\n".join(lines)
  print(f"\nBest of each grid by validation accuracy, {epochs} epochs "
        f"({len(data['train'][0])} train examples):\n{table}")

  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({
      "description": "MLP 32-128-128-10 on a synthetic teacher-labelled "
                     "10-class set; best lr scale by validation accuracy.",
      "epochs": epochs, "jax": jax.__version__, "optax": optax.__version__,
      "best": [best[(m, b)] for b in args.batch_sizes for m in grids],
      "runs": runs, "table": table,
  }, indent=2))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
