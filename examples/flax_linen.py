"""Flax linen with ``flax.training.train_state.TrainState`` and K-BFGS.

``TrainState.apply_gradients`` calls ``tx.update(grads, opt_state, params)``
and passes any other keyword to ``state.replace``, so it cannot forward
``value_fn``. ``olw.apply_gradients(state, grads=..., value_fn=...)`` is the
same step with ``value_fn``, for any ``TrainState`` (or subclass). K-BFGS taps
the model's ``nn.Dense`` layers with no change to the model.

    python examples/flax_linen.py
"""

from typing import Sequence

import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_layerwise as olw


class MLP(nn.Module):
  features: Sequence[int] = (32, 32, 3)

  @nn.compact
  def __call__(self, x):
    for width in self.features[:-1]:
      x = nn.tanh(nn.Dense(width)(x))
    return nn.Dense(self.features[-1])(x)


def make_data(n=512, d_in=10, num_classes=3, seed=0):
  """Overlapping Gaussian blobs around random class centres."""
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((num_classes, d_in), np.float32)
  y = rng.integers(0, num_classes, n)
  x = centres[y] + rng.standard_normal((n, d_in), np.float32)
  return jnp.asarray(x), jnp.asarray(y)


def make_state(tx, x, seed=1):
  model = MLP()
  params = jax.jit(model.init)(jax.random.PRNGKey(seed), x[:1])["params"]
  return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                      tx=tx)


def loss_fn(params, apply_fn, x, y):
  logits = apply_fn({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@jax.jit
def train_step(state, x, y):
  def batch_loss(params):  # the mini-batch loss of the params alone
    return loss_fn(params, state.apply_fn, x, y)

  loss, grads = jax.value_and_grad(batch_loss)(state.params)
  # `state.apply_gradients(grads=grads)` would raise: K-BFGS needs `value_fn`,
  # which it cannot forward. olw.apply_gradients is the same step with it.
  state = olw.apply_gradients(state, grads=grads, value_fn=batch_loss)
  return state, loss


def main(num_steps=60, batch_size=128, log_every=15):
  x, y = make_data()
  state = make_state(olw.kbfgs(learning_rate=1.0), x)
  eval_loss = jax.jit(lambda params: loss_fn(params, state.apply_fn, x, y))
  losses = []
  num_batches = x.shape[0] // batch_size
  for i in range(num_steps + 1):
    if i % log_every == 0:
      losses.append(float(eval_loss(state.params)))
      print(f"step {i:3d}  loss {losses[-1]:.4f}")
    if i < num_steps:
      b = slice((i % num_batches) * batch_size,
                (i % num_batches + 1) * batch_size)
      state, _ = train_step(state, x[b], y[b])
  return {"losses": losses, "state": state}


if __name__ == "__main__":
  main()
