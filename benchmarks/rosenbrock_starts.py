"""K-BFGS on two-layer Rosenbrock from many starts, in float32 (issue 12).

Rosenbrock ``(1 - a)^2 + 100 (b - a^2)^2`` with ``a`` and ``b`` two 1x1
dense layers of input 1 (``tests/test_kbfgs_recovery.py`` runs the usual
start ``(-1.2, 1)``). Near the minimum the trial step ``delta`` falls below
the params' float32 spacing, so the curvature pair and ``q_l`` measured at
``theta + delta`` come out zero: how often a run then stalls depends on
round-off, which moves with how XLA compiles the step (a change as small as
where ``-lr`` is multiplied in moved 48 of 48 starts reaching 1e-6 to 42).
This script measures that rate, so that a change can be judged on many
starts instead of one trajectory. Prints a table, writes
``<out>/rosenbrock_starts.json`` and a PNG of every start's loss. About a
minute per transform on 2 CPU cores.

    python -m benchmarks.rosenbrock_starts [--starts 48] [--steps 15000]
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
from benchmarks.report import aligned

TRANSFORMS: Dict[str, Callable[[], optax.GradientTransformation]] = {
    "kbfgs()": olw.kbfgs,
    "kbfgs(memory_size=5, lbfgs_gamma='scaled')": lambda: olw.kbfgs(
        memory_size=5, lbfgs_gamma="scaled"),
}
TARGETS = (1e-3, 1e-6)


def rosenbrock_two_layers(params) -> jax.Array:
  """Rosenbrock of ``a = params["a"]["kernel"]``, ``b = params["b"]
  ["kernel"]``, each the output of a 1x1 dense layer of input 1."""
  one = jnp.ones((1, 1))
  a = olw.dense(one, params["a"]["kernel"])[0, 0]
  b = olw.dense(one, params["b"]["kernel"])[0, 0]
  return (1 - a) ** 2 + 100 * (b - a * a) ** 2


def rosenbrock_params(a, b) -> dict:
  return {"a": {"kernel": jnp.full((1, 1), a, jnp.float32)},
          "b": {"kernel": jnp.full((1, 1), b, jnp.float32)}}


def losses_from_starts(tx, starts: np.ndarray, steps: int) -> np.ndarray:
  """``(len(starts), steps)`` losses of ``tx`` from each ``(a, b)`` start,
  one compiled program (vmapped over the starts)."""
  def run(a, b):
    def body(carry, _):
      p, state = carry
      loss, grads = jax.value_and_grad(rosenbrock_two_layers)(p)
      updates, state = tx.update(grads, state, p,
                                 value_fn=rosenbrock_two_layers)
      return (optax.apply_updates(p, updates), state), loss
    params = rosenbrock_params(a, b)
    return jax.lax.scan(body, (params, tx.init(params)), None,
                        length=steps)[1]
  starts = jnp.asarray(starts, jnp.float32)
  return np.asarray(jax.jit(jax.vmap(run))(starts[:, 0], starts[:, 1]))


def random_starts(num: int, spread: float, seed: int) -> np.ndarray:
  """The usual start ``(-1.2, 1)`` and ``num - 1`` normal draws around it
  (standard deviation ``spread``)."""
  rng = np.random.default_rng(seed)
  draws = np.array([-1.2, 1.0]) + spread * rng.normal(size=(num - 1, 2))
  return np.concatenate([[[-1.2, 1.0]], draws]).astype(np.float32)


def summary(losses: np.ndarray) -> dict:
  """Per target: how many starts reach it and the median first step."""
  out = {}
  for target in TARGETS:
    hit = losses < target
    firsts = [int(np.argmax(h)) for h in hit if h.any()]
    out[f"{target:g}"] = dict(
        reached=len(firsts),
        median_step=float(np.median(firsts)) if firsts else None)
  out["finite"] = bool(np.all(np.isfinite(losses)))
  out["min_losses"] = [float(x) for x in np.nanmin(losses, axis=1)]
  return out


def plot(curves: Dict[str, np.ndarray], path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4),
                           squeeze=False)
  for ax, (name, losses) in zip(axes[0], curves.items()):
    for row in losses:
      stalled = not (row < TARGETS[-1]).any()
      ax.semilogy(row, lw=0.6, color="tab:red" if stalled else "tab:blue",
                  alpha=0.8 if stalled else 0.3)
    for target in TARGETS:
      ax.axhline(target, color="gray", ls=":", lw=0.8)
    ax.set(title=f"{name}: red never reaches {TARGETS[-1]:g}",
           xlabel="step", ylabel="loss (float32)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--starts", type=int, default=48)
  parser.add_argument("--steps", type=int, default=15_000)
  parser.add_argument("--spread", type=float, default=0.05)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="results/rosenbrock_starts")
  args = parser.parse_args(argv)
  starts = random_starts(args.starts, args.spread, args.seed)
  rows, results, curves = [], {}, {}
  for name, make in TRANSFORMS.items():
    curves[name] = losses_from_starts(make(), starts, args.steps)
    results[name] = s = summary(curves[name])
    rows.append([name, args.starts] + [
        f"{s[f'{t:g}']['reached']} (median step {s[f'{t:g}']['median_step']})"
        for t in TARGETS] + [f"{max(s['min_losses']):.1e}",
                             "yes" if s["finite"] else "NO"])
    print(f"{name}: done", flush=True)
  print("\n".join(aligned([["transform", "starts"]
                           + [f"reached {t:g}" for t in TARGETS]
                           + ["worst min loss", "all finite"]] + rows)))
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "rosenbrock_starts.json").write_text(json.dumps(dict(
      steps=args.steps, spread=args.spread, seed=args.seed,
      starts=starts.tolist(), results=results), indent=1))
  plot(curves, out / "rosenbrock_starts.png")
  print(f"Results: {out / 'rosenbrock_starts.json'}, "
        f"{out / 'rosenbrock_starts.png'}")
  return results


if __name__ == "__main__":
  main()
