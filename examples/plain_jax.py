"""Plain JAX: a dict-of-arrays MLP trained with ``optax.chain``.

Gradient clipping, then layer-wise SGD (no learning rate); the same training
step trains K-BFGS, whose dense layers are the ``olw.dense`` calls.

    python examples/plain_jax.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_layerwise as olw


def make_data(n=512, d_in=8, seed=0):
  """A small regression set: y = sin(sum(x))."""
  x = np.random.default_rng(seed).standard_normal((n, d_in), np.float32)
  return jnp.asarray(x), jnp.asarray(np.sin(x.sum(axis=1, keepdims=True)))


def init_params(sizes=(8, 32, 32, 1), seed=1):
  """``{'dense_i': {'kernel', 'bias'}}``: one layer per sub-dict."""
  rng = np.random.default_rng(seed)
  return {
      f"dense_{i}": {
          "kernel": jnp.asarray(rng.standard_normal((d_in, d_out), np.float32)
                                / np.sqrt(d_in)),
          "bias": jnp.zeros(d_out),
      }
      for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:]))
  }


def predict(params, x):
  *hidden, last = params.values()
  for layer in hidden:
    # olw.dense is x @ kernel + bias; K-BFGS taps it (other methods ignore it).
    x = jnp.tanh(olw.dense(x, layer["kernel"], layer["bias"]))
  return olw.dense(x, last["kernel"], last["bias"])


def loss_fn(params, x, y):
  return jnp.mean((predict(params, x) - y) ** 2)


def train(tx, params, x, y, num_steps=80, batch_size=128, log_every=20):
  """Mini-batch training; returns the final params and the logged losses."""
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb):
    loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
    updates, opt_state = tx.update(
        grads, opt_state, params, value_fn=lambda p: loss_fn(p, xb, yb))
    return optax.apply_updates(params, updates), opt_state, loss

  full_loss = jax.jit(loss_fn)
  losses = []
  num_batches = x.shape[0] // batch_size
  for i in range(num_steps + 1):
    if i % log_every == 0:
      losses.append(float(full_loss(params, x, y)))
      print(f"  step {i:3d}  loss {losses[-1]:.4f}")
    if i < num_steps:
      b = i % num_batches
      xb = x[b * batch_size:(b + 1) * batch_size]
      yb = y[b * batch_size:(b + 1) * batch_size]
      params, opt_state, _ = step(params, opt_state, xb, yb)
  return params, losses


def main():
  x, y = make_data()
  results = {}
  optimizers = {
      # No learning rate: each layer's step comes from its curvature. With
      # few layers the exact per-layer curvature is cheap and noise-free.
      "layerwise_sgd": optax.chain(
          optax.clip_by_global_norm(1.0),
          olw.layerwise_sgd(momentum=0.9, estimator="exact")),
      # K-BFGS must be the last stage; transforms of the gradient before it
      # are fine. Small problems like a larger step than the default 0.3.
      "kbfgs": optax.chain(optax.clip_by_global_norm(1.0),
                           olw.kbfgs(learning_rate=1.0)),
  }
  for name, tx in optimizers.items():
    print(name)
    _, results[name] = train(tx, init_params(), x, y)
  return results


if __name__ == "__main__":
  main()
