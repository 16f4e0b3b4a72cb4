"""Flax linen with ``flax.training.train_state.TrainState`` and K-BFGS.

``TrainState.apply_gradients`` calls ``tx.update(grads, opt_state, params)``
and passes any other keyword to ``state.replace``, so it cannot forward
``value_fn``. The fix is the two lines it runs, with ``value_fn`` added; here
they live in a ``TrainState`` subclass so the training step reads as usual.
K-BFGS taps the model's ``nn.Dense`` layers with no change to the model.

    python examples/flax_linen.py
"""

from typing import Callable, Optional, Sequence

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


class TrainState(train_state.TrainState):
  """A ``TrainState`` whose ``apply_gradients`` forwards ``value_fn``."""

  def apply_gradients(self, *, grads, value_fn: Optional[Callable] = None,
                      **kwargs):
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params,
                                        value_fn=value_fn)
    return self.replace(step=self.step + 1,
                        params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **kwargs)


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
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def loss_fn(params, apply_fn, x, y):
  logits = apply_fn({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@jax.jit
def train_step(state, x, y):
  def batch_loss(params):  # the mini-batch loss of the params alone
    return loss_fn(params, state.apply_fn, x, y)

  loss, grads = jax.value_and_grad(batch_loss)(state.params)
  # The plain `state.apply_gradients(grads=grads)` would raise: K-BFGS needs
  # `value_fn`. Without the subclass, the same two lines are:
  #   updates, opt_state = state.tx.update(grads, state.opt_state,
  #                                        state.params, value_fn=batch_loss)
  #   state = state.replace(step=state.step + 1, opt_state=opt_state,
  #                         params=optax.apply_updates(state.params, updates))
  state = state.apply_gradients(grads=grads, value_fn=batch_loss)
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
