"""Data-parallel training of the CURVES autoencoder over all local devices.

Trains the K-BFGS paper's CURVES autoencoder (784-400-200-100-50-25-6-25-50-
100-200-400-784, synthetic CURVES, sigmoid cross-entropy) with the global
batch split over every local device, and prints the loss per epoch and the
step time. On a CPU, fake devices make it runnable anywhere::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python -m benchmarks.data_parallel

Two ways to run the same optimiser (``--mode shard_map`` (default),
``jit``, or ``both``):

* ``shard_map``: per-device code under :func:`jax.shard_map`; the
  gradient is that of the ``pmean``-ed loss, ``value_fn`` is the device's
  own loss, and the transform gets ``axis_name="data"`` so it averages its
  curvature statistics over the devices.
* ``jit``: the unchanged single-device step under :func:`jax.jit`, with
  the batch sharded over the mesh (``NamedSharding``) and params and state
  replicated; XLA inserts the collectives, ``axis_name`` stays ``None``.

After training, the largest difference between the devices' copies of the
optimiser state is printed (it is 0: every device holds the same state).
See ``docs/distributed.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_layerwise as olw
from benchmarks import experiments
from benchmarks import loop
from benchmarks import models

AX = "data"

# name -> (label, constructor of the transform for an axis name)
METHODS = {
    "kbfgs": ("K-BFGS", lambda ax: olw.kbfgs(0.3, axis_name=ax)),
    "kbfgs-l": ("K-BFGS(L), p=20",
                lambda ax: olw.kbfgs(0.3, memory_size=20, axis_name=ax)),
    "layerwise-sgd": ("layer-wise SGD-m",
                      lambda ax: olw.layerwise_sgd(axis_name=ax)),
    "layerwise-adamw": ("layer-wise AdamW",
                        lambda ax: olw.layerwise_adamw(axis_name=ax)),
    "cblr": ("CBLR", lambda ax: olw.cblr(0.1, max_lr=1.0, axis_name=ax)),
    "mclr": ("MCLR", lambda ax: olw.mclr(0.1, max_lr=1.0, axis_name=ax)),
}
MODES = ("shard_map", "jit")
SMOKE_WIDTHS = (784, 32, 8, 32, 784)


def _step_fns(loss_fn, tx, mesh, mode: str):
  """The jitted train step ``(params, state, batch) -> (params, state, loss)``.

  ``shard_map``: per device, the gradient of the ``pmean``-ed loss (the
  global gradient: shard_map sums the cotangents over the axis) and
  ``value_fn`` the device's own loss; ``jit``: the single-device step,
  unchanged.
  """
  if mode == "jit":
    return loop.make_step(loss_fn, tx, donate=True)
  return jax.jit(jax.shard_map(loop.step_fn(loss_fn, tx, axis_name=AX),
                               mesh=mesh, in_specs=(P(), P(), P(AX)),
                               out_specs=(P(), P(), P())),
                 donate_argnums=(0, 1))


def state_spread(tree) -> float:
  """Largest difference between the devices' copies of a replicated pytree."""
  spread = 0.0
  for leaf in jax.tree_util.tree_leaves(tree):
    shards = [np.asarray(s.data, np.float64) for s in leaf.addressable_shards]
    for other in shards[1:]:
      if other.size:
        spread = max(spread, float(np.max(np.abs(other - shards[0]))))
  return spread


def train(exp, method: str, mode: str, mesh, *, epochs: int, seed: int = 0,
          log=print) -> Dict[str, Any]:
  """Trains ``exp`` with ``method`` data-parallel; returns the history."""
  label, make = METHODS[method]
  tx = make(AX if mode == "shard_map" else None)
  replicated = NamedSharding(mesh, P())
  batched = NamedSharding(mesh, P(AX))
  with jax.set_mesh(mesh):
    params = jax.device_put(exp.init_fn(jax.random.PRNGKey(seed)), replicated)
    state = jax.jit(tx.init, out_shardings=replicated)(params)
    step = _step_fns(exp.loss_fn, tx, mesh, mode)
    bs = exp.batch_size
    first = {"x": jax.device_put(exp.train["x"][:bs], batched)}
    t0 = time.perf_counter()
    compiled = step.lower(params, state, first).compile()
    compile_s = time.perf_counter() - t0
    batches = loop.shuffled_batches(
        exp.train, bs, np.random.default_rng(seed),
        take=lambda data, idx: {k: jax.device_put(v[idx], batched)
                                for k, v in data.items()})
    history: List[Dict[str, Any]] = []
    for epoch in range(1, epochs + 1):
      params, state, steps = loop.train(compiled, params, state, batches,
                                        exp.steps_per_epoch,
                                        stop_at_divergence=False)
      history.append({"epoch": epoch,
                      "train_loss": float(np.mean(steps.losses)),
                      "step_ms": 1e3 * statistics.median(steps.seconds)})
      log(f"  {label:18s} {mode:9s} epoch {epoch:2d}  train loss "
          f"{history[-1]['train_loss']:9.3f}  step {history[-1]['step_ms']:8.1f}"
          " ms")
  return {"method": method, "label": label, "mode": mode,
          "compile_s": compile_s, "history": history,
          "state_spread": state_spread(state),
          "finite": bool(all(np.isfinite(h["train_loss"]) for h in history))}


def format_table(runs: Sequence[Dict[str, Any]], num_devices: int) -> str:
  lines = [f"CURVES autoencoder, data-parallel over {num_devices} devices",
           f"{'method':18s} {'mode':9s} {'epoch':>5s} {'train loss':>11s} "
           f"{'step ms':>9s} {'compile s':>9s} {'state spread':>12s}"]
  for run in runs:
    for h in run["history"]:
      lines.append(
          f"{run['label']:18s} {run['mode']:9s} {h['epoch']:5d} "
          f"{h['train_loss']:11.3f} {h['step_ms']:9.1f} "
          f"{run['compile_s']:9.1f} {run['state_spread']:12.2e}")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  parser = argparse.ArgumentParser(
      description="Data-parallel CURVES autoencoder with K-BFGS and "
      "layer-wise step sizes over all local devices.")
  parser.add_argument("--methods", default="kbfgs,layerwise-sgd",
                      help=f"comma-separated, from {', '.join(METHODS)}")
  parser.add_argument("--mode", default="shard_map",
                      choices=MODES + ("both",),
                      help="per-device code with axis_name, the unchanged "
                      "step under a sharded jit, or both (same losses)")
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--n-train", type=int, default=2048)
  parser.add_argument("--batch-size", type=int, default=256,
                      help="global batch (rounded down to a multiple of the "
                      "device count)")
  parser.add_argument("--widths", default="curves",
                      help="'curves' (the paper's) or e.g. 784,64,8,64,784")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes for the test suite: K-BFGS under "
                      "shard_map and layer-wise SGD under jit, one epoch")
  args = parser.parse_args(argv)
  if args.smoke:
    args.epochs, args.n_train, args.batch_size = 1, 128, 32
    args.widths = ",".join(map(str, SMOKE_WIDTHS))
  widths = (models.CURVES_AE_WIDTHS if args.widths == "curves"
            else tuple(int(w) for w in args.widths.split(",")))
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
  modes = MODES if args.mode == "both" else (args.mode,)
  plan = [(m, mode) for m in methods for mode in modes]
  if args.smoke:
    plan = [("kbfgs", "shard_map"), ("layerwise-sgd", "jit")]

  devices = jax.devices()
  n = len(devices)
  batch_size = max(n, args.batch_size // n * n)
  mesh = jax.make_mesh((n,), (AX,))
  exp = experiments.curves_ae(n_train=args.n_train, n_test=n,
                              batch_size=batch_size, widths=widths)
  print(f"{n} {devices[0].platform} devices; CURVES autoencoder "
        f"{'-'.join(map(str, widths))}; global batch {batch_size} "
        f"({batch_size // n} a device), {exp.steps_per_epoch} steps/epoch")
  runs = [train(exp, m, mode, mesh, epochs=args.epochs, seed=args.seed)
          for m, mode in plan]
  print(format_table(runs, n))
  return {"num_devices": n, "widths": list(widths), "batch_size": batch_size,
          "runs": runs}


if __name__ == "__main__":
  main()
