"""Gradient accumulation: ``optax.MultiSteps``, or accumulating in the step.

``optax.MultiSteps.update(..., **extra_args)`` forwards ``value_fn`` to the
wrapped transform, so it works as is. But it runs the wrapped ``update`` on
*every* micro-batch (and keeps the result only on every k-th), so the
curvature measurement is paid k times per optimizer step. Accumulating the
gradient inside one jitted step (``lax.scan`` over the micro-batches) and
calling ``tx.update`` once pays it once. Both measure the curvature on the
last micro-batch (``value_fn``) and take the mean gradient of all k, and both
give the same params.

    python examples/gradient_accumulation.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_layerwise as olw

K = 4           # micro-batches per optimizer step
MICRO = 32      # examples per micro-batch
NUM_STEPS = 40  # optimizer steps


def make_data(n=512, d_in=8, seed=0):
  """A small regression set: y = sin(sum(x))."""
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
    x = jnp.tanh(x @ layer["kernel"] + layer["bias"])
  return jnp.mean((x @ last["kernel"] + last["bias"] - y) ** 2)


def micro_batches(x, y, step):
  """The K micro-batches of optimizer step ``step``: ``(K, MICRO, ...)``."""
  n = K * MICRO
  start = (step * n) % x.shape[0]
  xs, ys = x[start:start + n], y[start:start + n]
  return xs.reshape(K, MICRO, -1), ys.reshape(K, MICRO, -1)


def make_tx():
  return olw.layerwise_sgd(momentum=0.9, estimator="exact")


def train_multisteps(x, y, num_steps=NUM_STEPS, log_every=10):
  """A. ``optax.MultiSteps``: one call per micro-batch."""
  tx = optax.MultiSteps(make_tx(), every_k_schedule=K)
  params = init_params()
  opt_state = tx.init(params)

  @jax.jit
  def micro_step(params, opt_state, xb, yb):
    loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
    updates, opt_state = tx.update(   # value_fn is forwarded to the inner tx
        grads, opt_state, params, value_fn=lambda p: loss_fn(p, xb, yb))
    return optax.apply_updates(params, updates), opt_state, loss

  losses, params_history = [], []
  for step in range(num_steps + 1):
    if step % log_every == 0:
      losses.append(float(jax.jit(loss_fn)(params, x, y)))
      print(f"  step {step:3d}  loss {losses[-1]:.4f}")
    params_history.append(params)
    if step < num_steps:
      xs, ys = micro_batches(x, y, step)
      for k in range(K):  # params change only after the K-th micro-batch
        params, opt_state, _ = micro_step(params, opt_state, xs[k], ys[k])
  return params_history, losses, opt_state


def train_in_step(x, y, num_steps=NUM_STEPS, log_every=10):
  """B. Accumulate inside one jitted step; one ``tx.update`` per step."""
  tx = make_tx()
  params = init_params()
  opt_state = tx.init(params)

  @jax.jit
  def step_fn(params, opt_state, xs, ys):
    def accumulate(grad_sum, batch):
      loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
      return jax.tree.map(jnp.add, grad_sum, grads), loss

    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_sum, losses = jax.lax.scan(accumulate, zeros, (xs, ys))
    grads = jax.tree.map(lambda g: g / K, grad_sum)
    # Curvature on the last micro-batch, once per optimizer step.
    updates, opt_state = tx.update(
        grads, opt_state, params, value_fn=lambda p: loss_fn(p, xs[-1], ys[-1]))
    return optax.apply_updates(params, updates), opt_state, losses.mean()

  losses, params_history = [], []
  for step in range(num_steps + 1):
    if step % log_every == 0:
      losses.append(float(jax.jit(loss_fn)(params, x, y)))
      print(f"  step {step:3d}  loss {losses[-1]:.4f}")
    params_history.append(params)
    if step < num_steps:
      params, opt_state, _ = step_fn(params, opt_state,
                                     *micro_batches(x, y, step))
  return params_history, losses, opt_state


def main():
  x, y = make_data()
  print(f"A. optax.MultiSteps, {K} micro-batches of {MICRO} per step")
  history_a, losses_a, state_a = train_multisteps(x, y)
  print(f"B. accumulated in the jitted step, {K} x {MICRO}")
  history_b, losses_b, _ = train_in_step(x, y)
  first_step_gap = max(
      float(jnp.max(jnp.abs(a - b))) for a, b in zip(
          jax.tree.leaves(history_a[1]), jax.tree.leaves(history_b[1])))
  print(f"params after the first step, max |A - B| = {first_step_gap:.2e}")
  return {"multisteps": (history_a, losses_a, state_a),
          "in_step": (history_b, losses_b), "first_step_gap": first_step_gap}


if __name__ == "__main__":
  main()
