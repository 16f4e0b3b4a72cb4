"""CBLR and MCLR at their defaults on small Flax models (issue 14, item 3).

For each model kind of ``tests/flax_models.py`` and two seeds: the exact
per-layer Rayleigh quotients at init, then 10 steps of ``olw.cblr()`` and
``olw.mclr()`` (nothing tuned), printing the loss before and after, the
per-layer rates of the first and last step, the joint factor and the
fallbacks. About 3 minutes on 2 CPU cores.

    python -m benchmarks.cblr_defaults [kind,kind,...]
"""

import sys

import jax
import numpy as np
import optax

import optax_layerwise as olw
from tests import flax_models


def run(tx, params, loss_fn, steps=10):
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    value, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s, p, value_fn=loss_fn)
    return optax.apply_updates(p, u), s, value

  losses, lrs = [], []
  for _ in range(steps):
    params, state, value = step(params, state)
    losses.append(float(value))
    lrs.append(np.asarray(state[0].lrs))
  losses.append(float(jax.jit(loss_fn)(params)))
  return losses, lrs, state[0]


def main(kinds):
  np.set_printoptions(precision=3, linewidth=200)
  for kind in kinds:
    for seed in (0, 1):
      params, loss, data = flax_models.make_problem(kind, seed)
      loss_fn = lambda p, data=data: loss(p, data)
      layers = olw.group_layers(params)
      print(f"== {kind} seed {seed}: layers "
            f"{[jax.tree_util.keystr(tuple(l))[-24:] if isinstance(l, tuple) else str(l)[-24:] for l in layers.labels]}")
      print("   exact kappa at init:",
            flax_models.layer_rayleigh(loss, params, data, layers))
      for name, tx in (("cblr()", olw.cblr()), ("mclr()", olw.mclr())):
        losses, lrs, inner = run(tx, params, loss_fn)
        print(f"   {name}: loss {losses[0]:.4g} -> {losses[-1]:.4g} "
              f"(max {max(losses):.4g}), joint factor "
              f"{float(inner.joint_scale):.3g}, fallbacks "
              f"{np.asarray(inner.num_fallbacks)}")
        print("     rates, step 1: ", lrs[0])
        print("     rates, step 10:", lrs[-1])


if __name__ == "__main__":
  main(sys.argv[1].split(",") if len(sys.argv) > 1 else flax_models.KINDS)
