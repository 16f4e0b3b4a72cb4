"""Flax NNX with ``nnx.Optimizer``, here with K-BFGS, BatchNorm and Dropout.

``nnx.Optimizer.update(model, grads, **kwargs)`` forwards its keyword
arguments to ``tx.update``, so ``value_fn`` goes straight through. The params
it hands to ``value_fn`` are the pure ``nnx.State`` of the ``nnx.Param``
variables; ``olw.nnx_value_fn`` turns them back into a model, merged with an
array snapshot of everything else (BatchNorm statistics, the Dropout RNG
count), so the transform's re-runs of the forward pass never touch the model.
K-BFGS taps the ``nnx.Linear`` layers with no change to the model.

    python examples/flax_nnx.py
"""

from flax import nnx
import jax.numpy as jnp
import numpy as np
import optax

import optax_layerwise as olw


class MLP(nnx.Module):

  def __init__(self, d_in, d_hidden, d_out, *, rngs: nnx.Rngs):
    self.hidden1 = nnx.Linear(d_in, d_hidden, rngs=rngs)
    self.norm = nnx.BatchNorm(d_hidden, momentum=0.9, rngs=rngs)
    self.hidden2 = nnx.Linear(d_hidden, d_hidden, rngs=rngs)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)
    self.out = nnx.Linear(d_hidden, d_out, rngs=rngs)

  def __call__(self, x):
    x = jnp.tanh(self.norm(self.hidden1(x)))
    x = self.dropout(jnp.tanh(self.hidden2(x)))
    return self.out(x)


def make_data(n=512, d_in=8, seed=0):
  """A small regression set: y = sin(sum(x))."""
  x = np.random.default_rng(seed).standard_normal((n, d_in), np.float32)
  return jnp.asarray(x), jnp.asarray(np.sin(x.sum(axis=1, keepdims=True)))


def mse(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


@nnx.jit
def train_step(model, optimizer, x, y):
  # The mini-batch loss of the params alone; built before the forward pass,
  # it sees the same Dropout mask and batch statistics as the gradient.
  value_fn = olw.nnx_value_fn(mse, model, x, y)
  loss, grads = nnx.value_and_grad(mse)(model, x, y)
  optimizer.update(model, grads, value_fn=value_fn)  # forwarded to tx.update
  return loss


def train(tx, x, y, num_steps=80, batch_size=128, log_every=20):
  model = MLP(x.shape[1], 32, 1, rngs=nnx.Rngs(0, dropout=1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  eval_loss = nnx.jit(mse)
  losses = []
  num_batches = x.shape[0] // batch_size
  for i in range(num_steps + 1):
    if i % log_every == 0:
      model.eval()  # running statistics, no dropout
      losses.append(float(eval_loss(model, x, y)))
      model.train()
      print(f"step {i:3d}  loss {losses[-1]:.4f}")
    if i < num_steps:
      b = slice((i % num_batches) * batch_size,
                (i % num_batches + 1) * batch_size)
      train_step(model, optimizer, x[b], y[b])
  return model, optimizer, losses


def main(tx=None):
  # Any transform of the library fits here unchanged, e.g.
  # olw.layerwise_adamw() or olw.cblr(0.1).
  tx = tx if tx is not None else olw.kbfgs(learning_rate=1.0)
  x, y = make_data()
  model, optimizer, losses = train(tx, x, y)
  # optimizer.opt_state is an nnx.State mirroring tx.init's pytree; the
  # K-BFGS diagnostics are in it (see the logging guide).
  print("steps taken:", int(optimizer.step[...]))
  return {"model": model, "optimizer": optimizer, "losses": losses}


if __name__ == "__main__":
  main()
