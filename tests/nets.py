"""Tiny networks and dense-Hessian references shared by the tests.

The references here use `jax.hessian` of the flattened loss: an independent
route to every curvature quantity the library computes matrix-free.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


def mlp(key, sizes=(5, 4, 3, 2), batch=8, dtype=jnp.float32):
  """A tanh MLP with softmax cross-entropy; returns (params, loss_fn).

  Random values are drawn in float32 and cast, so the same key gives the same
  problem in every dtype (up to rounding).
  """
  keys = jax.random.split(key, len(sizes) + 1)
  params = {}
  for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f"layer{i}"] = {
        "w": (jax.random.normal(keys[i], (m, n), jnp.float32)
              / np.sqrt(m)).astype(dtype),
        "b": (0.1 * jax.random.normal(jax.random.fold_in(keys[i], 1), (n,),
                                      jnp.float32)).astype(dtype),
    }
  x = jax.random.normal(keys[-2], (batch, sizes[0]), jnp.float32).astype(dtype)
  y = jax.random.randint(keys[-1], (batch,), 0, sizes[-1], jnp.int32)
  depth = len(sizes) - 1

  def loss_fn(p):
    h = x
    for i in range(depth):
      h = h @ p[f"layer{i}"]["w"] + p[f"layer{i}"]["b"]
      if i < depth - 1:
        h = jnp.tanh(h)
    logp = jax.nn.log_softmax(h.astype(jnp.promote_types(h.dtype,
                                                         jnp.float32)))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

  return params, loss_fn


def cnn(key, batch=4, dtype=jnp.float32):
  """A conv(3x3, 2 channels) -> tanh -> dense classifier on 6x6 inputs."""
  k = jax.random.split(key, 5)
  params = {
      "conv": {"w": 0.5 * jax.random.normal(k[0], (3, 3, 1, 2), jnp.float32),
               "b": 0.1 * jax.random.normal(k[1], (2,), jnp.float32)},
      "dense": {"w": 0.2 * jax.random.normal(k[2], (72, 3), jnp.float32)},
  }
  params = jax.tree_util.tree_map(lambda v: v.astype(dtype), params)
  x = jax.random.normal(k[3], (batch, 6, 6, 1), jnp.float32).astype(dtype)
  y = jax.random.randint(k[4], (batch,), 0, 3, jnp.int32)

  def loss_fn(p):
    h = jax.lax.conv_general_dilated(
        x, p["conv"]["w"], (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["conv"]["b"]
    h = jnp.tanh(h).reshape(batch, -1) @ p["dense"]["w"]
    logp = jax.nn.log_softmax(h.astype(jnp.promote_types(h.dtype,
                                                         jnp.float32)))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

  return params, loss_fn


def dense_reference(loss_fn, params, layers):
  """Returns (g, H, index) of the flattened loss; index[k] = layer of entry k."""
  flat, unravel = ravel_pytree(params)
  flat_loss = lambda v: loss_fn(unravel(v))
  grad, hess = jax.jit(lambda v: (jax.grad(flat_loss)(v),
                                  jax.hessian(flat_loss)(v)))(flat)
  labels = jax.tree_util.tree_unflatten(
      layers.treedef,
      [jnp.full(leaf.shape, i, flat.dtype) for leaf, i in zip(
          jax.tree_util.tree_leaves(params), layers.leaf_layer)])
  index, _ = ravel_pytree(labels)
  return np.asarray(grad), np.asarray(hess), np.asarray(index).astype(int)


def layer_matrix(hess, index, d, num_layers):
  """``M[l, m] = d^(l)^T H d^(m)`` from a dense Hessian and a flat direction."""
  masks = np.stack([(index == l) * d for l in range(num_layers)])
  return masks @ hess @ masks.T


def ravel(tree):
  return np.asarray(ravel_pytree(tree)[0])
