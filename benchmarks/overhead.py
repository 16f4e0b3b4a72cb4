"""Cost, fallbacks and loss of the layer-wise step sizes against their bases.

Trains, then times side by side in one run (interleaved rounds, see
:mod:`benchmarks.timing`), the full jitted training step (loss and gradient,
optimizer update, apply; the step of ``benchmarks/kbfgs_overhead.py``) of

* ``optax.sgd(lr, momentum=0.9)`` and ``optax.adamw(lr)`` (the bases),
* ``olw.layerwise_sgd`` / ``olw.layerwise_adamw`` with the current default
  measurement and with the previous one (one Hutchinson probe, exact
  forward-over-reverse product, every step),
* a few other measurements of ``q_l`` for layer-wise SGD-m (the every-step
  exact ones, 8-15x, are timed but not trained),

on the K-BFGS paper's MNIST autoencoder (784-1000-500-250-30-250-500-1000-784,
ReLU, sigmoid cross-entropy summed over pixels) at batch 1000, on
Fashion-MNIST when installed (else synthetic CURVES). Each method first trains
``--train-steps`` steps on the same mini-batch sequence; the table reports the
step-time ratio to its base (median over rounds of the per-round ratio), the
fraction of measured layer-steps rejected by the safeguards
(``num_fallbacks``), and the mean training loss of the last 20 steps. It also
measures the accuracy of each curvature estimate of ``q_l`` against the exact
diagonal block ``d_l^T H_ll d_l`` (forward-over-reverse). Prints tables and
writes JSON.

    python -m benchmarks.overhead [--arch mnist|curves] [--train-steps 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_layerwise as olw
from benchmarks import data
from benchmarks import loop
from benchmarks import models
from benchmarks.timing import Carried, time_side_by_side
from optax_layerwise import _curvature
from optax_layerwise import _layers

ARCHS = {"curves": models.CURVES_AE_WIDTHS, "mnist": models.MNIST_AE_WIDTHS}
OLD_DEFAULT = dict(estimator="hutchinson", hvp="forward_over_reverse",
                   update_interval=1)

SGD, ADAMW = "sgd-m (base, lr 1e-4)", "adamw (base, lr 1e-3)"
# name -> (optimizer factory, name of its base, trained before timing?).
# Untrained rows (every-step exact products, 8-15x) are timed only.
METHODS = {
    SGD: (lambda: optax.sgd(1e-4, momentum=0.9), None, True),
    ADAMW: (lambda: optax.adamw(1e-3), None, True),
    "layerwise_sgd: default": (olw.layerwise_sgd, SGD, True),
    "layerwise_sgd: old default": (
        lambda: olw.layerwise_sgd(**OLD_DEFAULT), SGD, True),
    "layerwise_adamw: default": (olw.layerwise_adamw, ADAMW, True),
    "layerwise_adamw: old default": (
        lambda: olw.layerwise_adamw(**OLD_DEFAULT), ADAMW, True),
    "sgd: hutchinson x4, secant, interval 8": (
        lambda: olw.layerwise_sgd(estimator="hutchinson", hvp="secant",
                                  num_probes=4, update_interval=8), SGD, True),
    "sgd: row, secant, interval 2": (
        lambda: olw.layerwise_sgd(estimator="row", hvp="secant",
                                  update_interval=2), SGD, True),
    "sgd: exact, secant, interval 20": (
        lambda: olw.layerwise_sgd(hvp="secant", update_interval=20), SGD,
        True),
    "adamw: exact, secant, interval 20": (
        lambda: olw.layerwise_adamw(hvp="secant", update_interval=20), ADAMW,
        True),
    "sgd: exact, jvp, interval 20": (
        lambda: olw.layerwise_sgd(update_interval=20), SGD, True),
    "sgd: exact, secant, interval 1": (
        lambda: olw.layerwise_sgd(hvp="secant", update_interval=1), SGD,
        False),
    "sgd: exact, jvp, interval 1": (
        lambda: olw.layerwise_sgd(hvp="forward_over_reverse",
                                  update_interval=1), SGD, False),
}
QUICK = (SGD, ADAMW, "layerwise_sgd: default", "layerwise_sgd: old default",
         "layerwise_adamw: default", "layerwise_adamw: old default")


def _problem(arch: str, batch: int, seed: int):
  """Params, ``loss(params, x)`` and the training images (float32)."""
  widths = ARCHS[arch]
  try:
    x = data.load_fashion_mnist(None).x_train if arch == "mnist" else None
    name = "Fashion-MNIST"
  except data.DataUnavailableError:
    x = None
  if x is None:
    x = data.make_curves(n_train=20 * batch, n_test=1, seed=seed).x_train
    name = "synthetic CURVES"
  x = np.asarray(x, np.float32).reshape(len(x), -1)
  model = models.Autoencoder(widths)
  params = model.init(jax.random.PRNGKey(seed), jnp.asarray(x[:1]))

  def loss(p, xb):
    logits = model.apply(p, xb)
    return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, xb),
                            -1))

  return params, loss, x, name


def _batches(x: np.ndarray, batch: int, seed: int):
  """An endless iterator of device mini-batches, reshuffled every epoch."""
  return loop.shuffled_batches(x, batch, np.random.default_rng(seed),
                               take=lambda a, idx: jnp.asarray(a[idx]))


def _trainer(tx, params, loss, x, batch, seed) -> Carried:
  """A zero-argument callable running one jitted step on carried state."""
  return Carried(loop.make_step(loss, tx), params, tx.init(params),
                 _batches(x, batch, seed))


def _train(trainer: Carried, steps: int) -> list:
  """``steps`` steps of a trainer; their losses."""
  trainer.params, trainer.state, log = loop.train(
      trainer.step, trainer.params, trainer.state, trainer.batches, steps,
      stop_at_divergence=False)
  return log.losses


def _fallback_fraction(state) -> float:
  """Rejected / measured layer-steps of a layer-wise state (NaN for a base)."""
  head = state[0] if isinstance(state, tuple) and state else state
  if not hasattr(head, "num_fallbacks"):
    return float("nan")
  fallbacks = float(np.sum(head.num_fallbacks))
  return fallbacks / max(1.0, fallbacks + float(np.sum(head.num_accepted)))


def estimator_accuracy(params, loss, x, batch: int, seed: int,
                       num_points: int = 4, rho: float = 0.01) -> dict:
  """Each estimate of ``q_l`` against the exact ``d_l^T H_ll d_l``.

  At ``num_points`` points 25 steps apart along a layer-wise SGD-m run, with
  ``d`` its momentum direction, compares (per layer) the exact diagonal block
  (forward-over-reverse, ``estimator="exact"``) with: one Hutchinson probe,
  the row ``<d_l, H d>`` (forward-over-reverse), the exact block by the
  ``fd_scale`` gradient difference, and by the secant at the step (``s_l``
  = the displacement bound ``rho ||theta_l|| / ||d_l||``). Reports the median
  relative error and the fraction of estimates with ``q_l <= 0`` (rejected).
  """
  layers = olw.group_layers(params)

  @jax.jit
  def forms(p, d, xb, key):
    value_fn = lambda q: loss(q, xb)
    g = jax.grad(value_fn)(p)
    jvp = _curvature.make_hvp(value_fn, p)
    fd = _curvature.make_hvp(value_fn, p, method="gradient_difference", grad=g)
    secant = _curvature.make_hvp(value_fn, p, method="gradient_difference",
                                 grad=g, step=-1.0)
    scales = _layers.trust_ratio(layers.sq_norm(p), layers.sq_norm(d),
                                     rho)
    q = lambda hvp, est, **kw: _curvature.layer_quadratic_forms(
        hvp, d, layers, estimator=est, key=key, **kw).curvature
    return {"exact, jvp": q(jvp, "exact"),
            "hutchinson x1, jvp": q(jvp, "hutchinson"),
            "row, jvp": q(jvp, "row"),
            "exact, gradient difference": q(fd, "exact"),
            "exact, secant": q(secant, "exact", tangent_scales=scales),
            "row, secant": q(secant, "row", tangent_scales=scales)}

  trainer = _trainer(olw.layerwise_sgd(), params, loss, x, batch, seed)
  batches = _batches(x, batch, seed + 1)
  samples = {}
  for point in range(num_points):
    _train(trainer, 25)
    d = optax.tree.get(trainer.state[0].direction_state, "trace")
    out = forms(trainer.params, d, next(batches),
                jax.random.PRNGKey(point))
    for name, value in out.items():
      samples.setdefault(name, []).append(np.asarray(value))
  exact = np.concatenate(samples["exact, jvp"])
  result = {}
  for name, values in samples.items():
    values = np.concatenate(values)
    rel = np.abs(values - exact) / np.maximum(np.abs(exact), 1e-30)
    result[name] = {"median_rel_error": float(np.median(rel)),
                    "frac_non_positive": float(np.mean(values <= 0)),
                    "num_layer_samples": int(values.size)}
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--arch", choices=sorted(ARCHS), default="mnist")
  parser.add_argument("--batch", type=int, default=1000)
  parser.add_argument("--train-steps", type=int, default=200,
                      help="training steps of each method before timing")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--calls", type=int, default=5,
                      help="steps timed together in each round")
  parser.add_argument("--quick", action="store_true",
                      help="only the bases and the default / old default")
  parser.add_argument("--no-accuracy", action="store_true")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="results/overhead.json")
  args = parser.parse_args(argv)

  params, loss, x, data_name = _problem(args.arch, args.batch, args.seed)
  names = QUICK if args.quick else tuple(METHODS)
  runs = {}
  summary = {}
  for name in names:
    make, _, trained = METHODS[name]
    runs[name] = _trainer(make(), params, loss, x, args.batch, args.seed)
    losses = _train(runs[name], args.train_steps if trained else 0)
    summary[name] = {
        "final_loss": float(np.mean(losses[-20:])) if trained else None,
        "fallback_fraction": _fallback_fraction(runs[name].state)}
    if trained:
      print(f"  trained {name}: loss {summary[name]['final_loss']:.2f}, "
            f"fallbacks {summary[name]['fallback_fraction']:.1%}", flush=True)
  timings = time_side_by_side(runs,
                              baseline=names[0], rounds=args.rounds,
                              calls_per_round=args.calls)
  for name, t in timings.items():
    base = METHODS[name][1] or name
    if not METHODS[name][2]:  # fallbacks over the timed steps only
      summary[name]["fallback_fraction"] = _fallback_fraction(
          runs[name].state)
    ratios = (np.asarray(t["samples_ms"])
              / np.asarray(timings[base]["samples_ms"]))
    summary[name].update(base=base, median_ms=t["median_ms"],
                         ratio_to_base=float(np.median(ratios)),
                         samples_ms=t["samples_ms"])
  accuracy = (None if args.no_accuracy else
              estimator_accuracy(params, loss, x, args.batch, args.seed))

  width = max(map(len, summary))
  print(f"\nLayer-wise step sizes vs their base optimizers: {args.arch} "
        f"autoencoder on {data_name}, batch {args.batch}, "
        f"{jax.device_count()} {jax.default_backend()} device(s); step time: "
        f"median of {args.rounds} interleaved rounds x {args.calls} steps; "
        f"loss: mean of steps {args.train_steps - 19}-{args.train_steps}\n")
  print(f"{'method':<{width}}  {'ms/step':>8}  {'x base':>6}  "
        f"{'fallbacks':>9}  {'loss':>7}")
  for name, s in summary.items():
    final = "-" if s["final_loss"] is None else f"{s['final_loss']:.2f}"
    print(f"{name:<{width}}  {s['median_ms']:8.1f}  {s['ratio_to_base']:6.2f}"
          f"  {s['fallback_fraction']:9.1%}  {final:>7}")
  if accuracy:
    print("\nq_l estimates vs the exact d_l^T H_ll d_l (per layer, along a "
          "layer-wise SGD-m run)\n")
    print(f"{'estimate':<28}  {'median rel. err':>15}  {'q_l <= 0':>8}")
    for name, a in accuracy.items():
      print(f"{name:<28}  {a['median_rel_error']:15.2e}  "
            f"{a['frac_non_positive']:8.1%}")

  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"benchmark": "overhead", "arch": args.arch, "data": data_name,
               "batch": args.batch, "train_steps": args.train_steps,
               "rounds": args.rounds, "calls_per_round": args.calls,
               "machine": {"backend": jax.default_backend(),
                           "devices": jax.device_count(),
                           "cpu_count": os.cpu_count(),
                           "platform": platform.platform()},
               "methods": summary, "estimator_accuracy": accuracy}, f,
              indent=2)
  print(f"\nwrote {args.out}")
  return summary


if __name__ == "__main__":
  main()
