"""Schedules and ``optax.inject_hyperparams``.

``optax.inject_hyperparams`` moves the numeric hyperparameters into the
optimizer state, where they can be logged, and changed between steps without
recompiling; callables become schedules evaluated at every step. String and
``None`` arguments stay static.

1. K-BFGS with a warm-up + cosine learning rate, read back for logging.
   Only ``memory_size`` (an array shape) would need ``static_args``.
2. CBLR with a scheduled ``learning_rate_scale`` and a ``momentum`` changed
   half-way through.

    python examples/schedules.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_layerwise as olw

NUM_STEPS = 60

# With inject_hyperparams, K-BFGS's numeric arguments are injected too (and
# can be logged or changed); memory_size sets an array shape, so it must be
# static when given.
KBFGS_STATIC_ARGS = ("memory_size",)


def make_data(n=512, d_in=8, seed=0):
  """A small regression set: y = sin(sum(x))."""
  x = np.random.default_rng(seed).standard_normal((n, d_in), np.float32)
  return jnp.asarray(x), jnp.asarray(np.sin(x.sum(axis=1, keepdims=True)))


def init_params(sizes=(8, 32, 1), seed=1):
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
  h = jnp.tanh(olw.dense(x, params["dense_0"]["kernel"],
                         params["dense_0"]["bias"]))
  out = olw.dense(h, params["dense_1"]["kernel"], params["dense_1"]["bias"])
  return jnp.mean((out - y) ** 2)


def train(tx, x, y, batch_size=128, log_every=15, on_step=None):
  params = init_params()
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
  for i in range(NUM_STEPS + 1):
    if i % log_every == 0:
      losses.append(float(full_loss(params, x, y)))
      print(f"  step {i:3d}  loss {losses[-1]:.4f}")
    if i < NUM_STEPS:
      b = slice((i % num_batches) * batch_size,
                (i % num_batches + 1) * batch_size)
      params, opt_state, _ = step(params, opt_state, x[b], y[b])
      if on_step is not None:
        on_step(i, opt_state)
  return losses


def main():
  x, y = make_data()
  results = {}

  # 1. K-BFGS's learning rate: 10 warm-up steps, then a cosine decay. (A zero
  # step at the start of the warm-up is handled: see docs/kbfgs.md.) Without
  # the logging, `olw.kbfgs(learning_rate=warmup_cosine)` is all it takes.
  warmup_cosine = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=3.0, warmup_steps=10, decay_steps=NUM_STEPS,
      end_value=0.3)
  tx = optax.inject_hyperparams(olw.kbfgs, static_args=KBFGS_STATIC_ARGS)(
      learning_rate=warmup_cosine, damping=0.3)
  learning_rates = []
  print("kbfgs, warm-up + cosine learning rate")
  results["kbfgs"] = {
      "losses": train(tx, x, y, on_step=lambda i, opt_state: (
          learning_rates.append(float(opt_state.hyperparams["learning_rate"])))),
      "learning_rates": learning_rates}
  print("  learning rate at steps 0, 10, 59:",
        [round(learning_rates[i], 3) for i in (0, 10, 59)])

  # 2. inject_hyperparams: CBLR's global scale follows a schedule and is read
  # back from the state for logging; its momentum is a plain hyperparameter
  # of the state, changed half-way through without recompiling.
  tx = optax.inject_hyperparams(olw.cblr)(
      learning_rate_scale=optax.linear_schedule(0.5, 0.1, NUM_STEPS),
      momentum=0.9, estimator="exact", max_lr=3.0)
  logged = []

  def on_step(i, opt_state):
    hp = opt_state.hyperparams
    logged.append((float(hp["learning_rate_scale"]), float(hp["momentum"])))
    if i == NUM_STEPS // 2 - 1:
      hp["momentum"] = jnp.asarray(0.5)  # takes effect on the next step

  print("cblr, injected learning_rate_scale schedule and momentum")
  results["cblr"] = {"losses": train(tx, x, y, on_step=on_step),
                     "logged": logged}
  print("  learning_rate_scale at steps 0, 30, 59:",
        [round(logged[i][0], 3) for i in (0, 30, 59)])
  return results


if __name__ == "__main__":
  main()
