"""Logging the per-layer step sizes and the K-BFGS diagnostics.

Every transform keeps its per-layer diagnostics in its state (fixed shapes,
so they can be returned from the jitted step at no cost):

* layer-wise step sizes: ``ScaleByLayerwiseStepSizeState`` (``step_sizes``,
  ``curvatures``, ``num_fallbacks``, ...), one entry per layer in the order
  of ``olw.group_layers(params).labels``;
* K-BFGS: ``KBFGSState`` (``num_powell``, ``num_lm``, ``num_skipped_h_g``, ...),
  one entry per dense layer in the order of ``olw.kbfgs_layer_names(params)``.

Inside a chain, ``optax.tree_utils.tree_get(opt_state, "step_sizes")`` finds a
field by name wherever it sits. ``metrics`` below makes the flat
``{name: float}`` dict that TensorBoard, W&B or CLU writers take.

    python examples/logging_diagnostics.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_layerwise as olw


def make_data(n=512, d_in=8, seed=0):
  x = np.random.default_rng(seed).standard_normal((n, d_in), np.float32)
  return jnp.asarray(x), jnp.asarray(np.sin(x.sum(axis=1, keepdims=True)))


def init_params(sizes=(8, 32, 32, 1), seed=1):
  rng = np.random.default_rng(seed)
  return {
      f"dense_{i}": {
          "kernel": jnp.asarray(rng.standard_normal((d_in, d_out), np.float32)
                                / np.sqrt(d_in)),
          "bias": jnp.zeros(d_out),
      }
      for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:]))
  }


def loss_fn(params, x, y):
  *hidden, last = params.values()
  for layer in hidden:
    x = jnp.tanh(olw.dense(x, layer["kernel"], layer["bias"]))
  return jnp.mean((olw.dense(x, last["kernel"], last["bias"]) - y) ** 2)


def step_size_diagnostics(opt_state):
  """The per-layer arrays of the layer-wise step sizes, found by name."""
  get = lambda name: optax.tree_utils.tree_get(opt_state, name)
  return {"step_size": get("step_sizes"), "curvature": get("curvatures"),
          "fallbacks": get("num_fallbacks")}


def kbfgs_diagnostics(opt_state):
  """The per-layer counters of K-BFGS (the state is a ``KBFGSState``)."""
  return {"powell": opt_state.num_powell, "lm": opt_state.num_lm,
          "skipped_h_g": opt_state.num_skipped_h_g,
          "skipped_h_a": opt_state.num_skipped_h_a}


def readable(label):
  """``"['encoder']['dense_0']"`` -> ``"encoder/dense_0"``."""
  return label.replace("']['", "/").strip("[]'")


def metrics(diagnostics, layer_names):
  """``{'step_size/dense_0': 0.31, ...}``: one scalar per layer and field."""
  host = jax.device_get(diagnostics)
  return {f"{field}/{readable(name)}": float(values[i])
          for field, values in host.items()
          for i, name in enumerate(layer_names)}


def train(tx, diagnostics_fn, layer_names, num_steps=60, batch_size=128,
          log_every=20):
  x, y = make_data()
  params = init_params()
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb):
    loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
    updates, opt_state = tx.update(
        grads, opt_state, params, value_fn=lambda p: loss_fn(p, xb, yb))
    params = optax.apply_updates(params, updates)
    return params, opt_state, loss, diagnostics_fn(opt_state)

  full_loss = jax.jit(loss_fn)
  history, losses = [], [float(full_loss(params, x, y))]
  print(f"  initial loss {losses[0]:.4f}")
  num_batches = x.shape[0] // batch_size
  for i in range(num_steps):
    b = slice((i % num_batches) * batch_size, (i % num_batches + 1) * batch_size)
    params, opt_state, _, diag = step(params, opt_state, x[b], y[b])
    history.append(metrics(diag, layer_names))
    if (i + 1) % log_every == 0:
      losses.append(float(full_loss(params, x, y)))
      print(f"  after step {i + 1:3d}  loss {losses[-1]:.4f}")
      for field in diag:
        print(f"    {field:<12s}", "  ".join(
            f"{key.split('/', 1)[1]}={value:.3g}"
            for key, value in history[-1].items()
            if key.startswith(field + "/")))
  return opt_state, history, losses


def main():
  params = init_params()
  results = {}

  print("layerwise_sgd: per-layer step sizes")
  labels = olw.group_layers(params).labels   # "['dense_0']", ...
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   olw.layerwise_sgd(estimator="exact"))
  state, history, losses = train(tx, step_size_diagnostics, labels)
  results["layerwise_sgd"] = {"labels": labels, "history": history,
                              "state": state, "losses": losses}

  print("kbfgs: damping and skipped updates per dense layer")
  names = olw.kbfgs_layer_names(params)      # the same order as the counters
  state, history, losses = train(olw.kbfgs(learning_rate=1.0),
                                 kbfgs_diagnostics, names)
  # Which leaves were preconditioned (False: momentum fallback).
  print("  preconditioned:", jax.tree.map(bool, state.preconditioned))
  results["kbfgs"] = {"names": names, "history": history, "state": state,
                      "losses": losses}
  return results


if __name__ == "__main__":
  main()
