"""K-BFGS / K-BFGS(L) step time and state memory relative to Adam.

The K-BFGS paper's MNIST autoencoder (784-1000-500-250-30-250-500-1000-784,
ReLU, linear code and output layers, sigmoid cross-entropy summed over pixels
and averaged over the batch) at batch 1000, on synthetic inputs (timing does
not depend on the data). Each method runs the same jitted training step
(forward, backward, optimizer update, ``apply_updates``; params and state
donated). Methods are timed side by side in interleaved rounds after
compilation and warm-up; the ratio reported is the median over rounds of the
per-round ratio to Adam, so a slow spell on a shared machine slows both sides
alike. XLA's flop count of each compiled step is reported too (noise-free).

Run from the repository root::

    python -m benchmarks.kbfgs_overhead [--rounds 9] [--batch 1000]

Writes ``results/kbfgs_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_layerwise as olw
from benchmarks import loop
from benchmarks import models
from benchmarks.timing import Carried, time_side_by_side

WIDTHS = models.MNIST_AE_WIDTHS


def _loss_fn(model):
  def loss(params, x):
    logits = model.apply(params, x)
    return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, x), -1))
  return loss


def _megabytes(tree) -> float:
  return sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree)
             ) / 2**20


def _compile(step, params, state, x) -> tuple[float, float]:
  """XLA's flop count of the compiled step, and the compile time (s)."""
  start = time.perf_counter()
  compiled = step.lower(params, state, x).compile()
  seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))), seconds


def run(batch: int = 1000, rounds: int = 9, calls: int = 3,
        memory_size: int = 100, widths=WIDTHS, warmup: int = 3,
        seed: int = 0, tangent: bool = True) -> dict:
  """Measures every method; returns the results dictionary."""
  model = models.Autoencoder(tuple(widths))
  key = jax.random.PRNGKey(seed)
  x = (jax.random.uniform(key, (batch, widths[0])) > 0.7).astype(jnp.float32)
  params0 = model.init(jax.random.fold_in(key, 1), x)
  loss = _loss_fn(model)
  methods = {
      "adam": optax.adam(1e-3),
      "kbfgs": olw.kbfgs(0.3),
      f"kbfgs_l{memory_size}": olw.kbfgs(0.3, memory_size=memory_size),
  }
  if tangent:
    methods["kbfgs_tangent"] = olw.kbfgs(0.3, pair="tangent")
  runs = {}
  for name, tx in methods.items():
    step = loop.make_step(loss, tx, donate=True)
    params = jax.tree_util.tree_map(jnp.copy, params0)
    state = tx.init(params)
    flops, compile_s = _compile(step, params, state, x)
    call = Carried(step, params, state, x)
    losses = [float(call()) for _ in range(1 + warmup)]
    runs[name] = dict(call=call, flops=flops, compile_s=compile_s,
                      losses=losses, state_mb=_megabytes(tx.init(params0)))
    print(f"  compiled {name}: {compile_s:.1f} s, warm-up losses "
          f"{', '.join(f'{v:.1f}' for v in losses)}", flush=True)

  timings = time_side_by_side({name: item["call"] for name, item in
                               runs.items()}, baseline="adam", rounds=rounds,
                              calls_per_round=calls)
  names = list(runs)
  params_mb = _megabytes(params0)
  results = {
      "config": dict(widths=list(widths), batch=batch, rounds=rounds,
                     calls_per_round=calls, memory_size=memory_size,
                     dtype="float32", inputs="synthetic binary images"),
      "machine": dict(platform=platform.platform(),
                      cpu_count=os.cpu_count(),
                      jax=jax.__version__, backend=jax.default_backend()),
      "params_mb": params_mb,
      "methods": {},
  }
  for name in names:
    item, timing = runs[name], timings[name]
    results["methods"][name] = dict(
        median_step_ms=timing["median_ms"],
        min_step_ms=timing["min_ms"],
        time_ratio_vs_adam=timing["ratio_median"],
        gflops_per_step=item["flops"] / 1e9,
        flop_ratio_vs_adam=item["flops"] / runs["adam"]["flops"],
        state_mb=item["state_mb"],
        state_ratio_vs_adam=item["state_mb"] / runs["adam"]["state_mb"],
        compile_s=item["compile_s"],
        final_loss=float(loss(item["call"].params, x)),
        samples_ms=timing["samples_ms"])
  return results


def _table(results: dict) -> str:
  head = (f"{'method':<15}{'median ms':>10}{'x Adam':>8}{'GFLOP':>8}"
          f"{'flop x':>8}{'state MB':>10}{'x Adam':>8}")
  lines = [head, "-" * len(head)]
  for name, m in results["methods"].items():
    lines.append(
        f"{name:<15}{m['median_step_ms']:>10.1f}"
        f"{m['time_ratio_vs_adam']:>8.2f}{m['gflops_per_step']:>8.1f}"
        f"{m['flop_ratio_vs_adam']:>8.2f}{m['state_mb']:>10.1f}"
        f"{m['state_ratio_vs_adam']:>8.2f}")
  lines.append(f"params: {results['params_mb']:.1f} MB; batch "
               f"{results['config']['batch']}; {results['config']['rounds']} "
               "interleaved rounds")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=1000)
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--calls", type=int, default=3,
                      help="steps per method per round")
  parser.add_argument("--memory-size", type=int, default=100)
  parser.add_argument("--small", action="store_true",
                      help="a 784-100-30-100-784 model (smoke test)")
  parser.add_argument("--skip-tangent", action="store_true",
                      help="leave out the pair='tangent' variant")
  parser.add_argument("--out", default="results/kbfgs_overhead.json")
  args = parser.parse_args(argv)
  widths = (784, 100, 30, 100, 784) if args.small else WIDTHS
  print(f"K-BFGS overhead, autoencoder {'-'.join(map(str, widths))}, batch "
        f"{args.batch}, backend {jax.default_backend()}", flush=True)
  results = run(batch=args.batch, rounds=args.rounds, calls=args.calls,
                memory_size=args.memory_size, widths=widths,
                tangent=not args.skip_tangent)
  print(_table(results))
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
