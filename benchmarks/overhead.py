"""Per-step overhead of the layer-wise step sizes against SGD with momentum.

Times, side by side in one run, the full jitted training step (loss and
gradient, optimizer update, apply) of ``optax.sgd(lr, momentum=0.9)`` and of
``olw.layerwise_sgd`` with the curvature measured

* by Hutchinson (one probe) every step and every 10 steps, and exactly,
* with the Hessian-vector product by forward-over-reverse (``jax.jvp`` of
  ``jax.grad``) or by a gradient difference (one extra gradient),

on a deep MLP autoencoder (the K-BFGS paper's CURVES or MNIST architecture)
at batch 1000. It also measures the accuracy of the gradient-difference
curvature against the exact product. Prints a table and writes JSON.

    python -m benchmarks.overhead [--arch curves|mnist] [--batch 1000]
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
from benchmarks import models
from benchmarks.timing import time_side_by_side
from optax_layerwise import _curvature

ARCHS = {"curves": models.CURVES_AE_WIDTHS, "mnist": models.MNIST_AE_WIDTHS}

METHODS = {
    "sgd-m (baseline)": lambda: optax.sgd(1e-4, momentum=0.9),
    "hutchinson, jvp, interval 1": lambda: olw.layerwise_sgd(),
    "hutchinson, jvp, interval 10": lambda: olw.layerwise_sgd(
        update_interval=10),
    "hutchinson, grad-diff, interval 1": lambda: olw.layerwise_sgd(
        hvp="gradient_difference"),
    "hutchinson, grad-diff, interval 10": lambda: olw.layerwise_sgd(
        hvp="gradient_difference", update_interval=10),
    "exact, jvp, interval 1": lambda: olw.layerwise_sgd(estimator="exact"),
}
BASELINE = "sgd-m (baseline)"


def _problem(arch: str, batch: int, seed: int):
  model = models.Autoencoder(ARCHS[arch])
  x = jnp.asarray(data.make_curves(n_train=batch, n_test=1, seed=seed).x_train)
  params = model.init(jax.random.PRNGKey(seed), x[:1])

  def loss_fn(p):
    logits = model.apply(p, x)
    return optax.sigmoid_binary_cross_entropy(logits, x).sum(-1).mean()

  return params, loss_fn


def _stepper(tx, params, loss_fn):
  """A zero-argument callable running one jitted step on carried state."""

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, value_fn=loss_fn)
    return optax.apply_updates(params, updates), opt_state, loss

  carry = [params, tx.init(params)]

  def run():
    carry[0], carry[1], loss = step(carry[0], carry[1])
    return loss

  return run


def gradient_difference_accuracy(params, loss_fn, num_points: int = 3):
  """Relative error of per-layer curvatures by gradient difference.

  At ``num_points`` points along an SGD-m trajectory, compares the exact
  ``q_l = g_l^T H_ll g_l`` (forward-over-reverse) with the gradient
  difference, both with the exact per-layer estimator.

  On a ReLU network the two measure different things: the jvp gives the
  Hessian almost everywhere (ReLU kinks contribute nothing), while a finite
  step crosses kinks whose gradient jumps grow linearly with the step, so the
  difference quotient converges to the secant curvature including them. On
  smooth networks they agree to the truncation error (see
  ``tests/test_curvature.py``).
  """
  layers = olw.group_layers(params)

  @jax.jit
  def forms(p):
    g = jax.grad(loss_fn)(p)
    exact = _curvature.layer_quadratic_forms(
        _curvature.make_hvp(loss_fn, p), g, layers, estimator="exact")
    diff = _curvature.layer_quadratic_forms(
        _curvature.make_hvp(loss_fn, p, method="gradient_difference", grad=g),
        g, layers, estimator="exact")
    return exact.curvature, diff.curvature

  sgd = optax.sgd(1e-4, momentum=0.9)
  state = sgd.init(params)
  sgd_step = jax.jit(lambda p, s: sgd.update(jax.grad(loss_fn)(p), s, p))
  errors = []
  for point in range(num_points):
    exact, diff = (np.asarray(v) for v in forms(params))
    nonzero = np.abs(exact) > 0  # a dead ReLU layer can have q_l = 0
    errors.append(np.abs(diff - exact)[nonzero] / np.abs(exact[nonzero]))
    for _ in range(20 if point < num_points - 1 else 0):
      updates, state = sgd_step(params, state)
      params = optax.apply_updates(params, updates)
  errors = np.concatenate(errors)
  return {"median_rel_error": float(np.median(errors)),
          "p90_rel_error": float(np.quantile(errors, 0.9)),
          "max_rel_error": float(np.max(errors)),
          "num_layer_samples": int(errors.size)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--arch", choices=sorted(ARCHS), default="curves")
  parser.add_argument("--batch", type=int, default=1000)
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--calls", type=int, default=5,
                      help="steps timed together in each round")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="results/overhead.json")
  args = parser.parse_args(argv)

  params, loss_fn = _problem(args.arch, args.batch, args.seed)
  steps = {name: _stepper(make(), params, loss_fn)
           for name, make in METHODS.items()}
  timings = time_side_by_side(steps, baseline=BASELINE, rounds=args.rounds,
                              calls_per_round=args.calls)
  accuracy = gradient_difference_accuracy(params, loss_fn)

  width = max(map(len, timings))
  print(f"\nLayer-wise SGD step time vs optax.sgd(momentum=0.9): "
        f"{args.arch} autoencoder, batch {args.batch}, "
        f"{jax.device_count()} {jax.default_backend()} device(s), "
        f"median of {args.rounds} interleaved rounds x {args.calls} steps\n")
  print(f"{'method':<{width}}  {'ms/step':>8}  {'ratio':>6}")
  for name, t in timings.items():
    print(f"{name:<{width}}  {t['median_ms']:8.1f}  {t['ratio_median']:6.2f}")
  print("\nGradient-difference curvature vs forward-over-reverse (per layer, "
        f"{accuracy['num_layer_samples']} samples): median rel. error "
        f"{accuracy['median_rel_error']:.1e}, 90th pct "
        f"{accuracy['p90_rel_error']:.1e}, max {accuracy['max_rel_error']:.1e}")

  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"benchmark": "overhead", "arch": args.arch,
               "batch": args.batch, "rounds": args.rounds,
               "calls_per_round": args.calls, "baseline": BASELINE,
               "machine": {"backend": jax.default_backend(),
                           "devices": jax.device_count(),
                           "cpu_count": os.cpu_count(),
                           "platform": platform.platform()},
               "timings": timings,
               "gradient_difference_accuracy": accuracy}, f, indent=2)
  print(f"\nwrote {args.out}")
  return timings


if __name__ == "__main__":
  main()
