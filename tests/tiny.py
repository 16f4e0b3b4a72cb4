"""A tiny dense network, its batches and the library's transforms, shared by
the reliability tests (test_faults, test_precision, test_determinism,
test_long_runs).

The network is small (3 -> 4 -> 2, tanh) so that each transform compiles in
a few seconds; its dense layers go through :func:`optax_layerwise.dense`, so
K-BFGS can tap them. ``poison`` multiplies the first layer's pre-activations
by an identity whose *derivative* is NaN when ``poison > 0``: the loss and its
gradient stay finite, every second derivative through that layer (a
Hessian-vector product, a tangent pair) is NaN. It lets a test inject a fault
into a curvature product alone.
"""

import jax
import jax.numpy as jnp
import numpy as np

import optax_layerwise as olw

SIZES = (3, 4, 2)
BATCH = 8


@jax.custom_jvp
def _unit(x, poison):
  """Ones; the derivative is NaN when ``poison > 0``."""
  del poison
  return jnp.ones_like(x)


@_unit.defjvp
def _unit_jvp(primals, tangents):
  x, poison = primals
  dx, _ = tangents
  nan = jnp.where(poison > 0, jnp.nan, 0.0).astype(dx.dtype)
  return jnp.ones_like(x), nan * dx


@jax.custom_jvp
def second_order_poison(x, poison):
  """``x``, whose second derivative is NaN when ``poison > 0``."""
  del poison
  return x


@second_order_poison.defjvp
def _poison_jvp(primals, tangents):
  x, poison = primals
  dx, _ = tangents
  return x, dx * _unit(x, poison)


def init_params(key, dtype=jnp.float32, sizes=SIZES):
  """Params ``{'l0': {'w', 'b'}, 'l1': {'w', 'b'}, ...}`` (drawn in float32)."""
  params = {}
  for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
    k1, k2 = jax.random.split(jax.random.fold_in(key, i))
    params[f"l{i}"] = {
        "w": (jax.random.normal(k1, (m, n)) / np.sqrt(m)).astype(dtype),
        "b": (0.1 * jax.random.normal(k2, (n,))).astype(dtype)}
  return params


def loss(params, x, t, poison=0.0):
  """Mean squared error of the tanh network (float32 or wider result)."""
  depth = len(params)
  h = x.astype(params["l0"]["w"].dtype)
  for i in range(depth):
    h = olw.dense(h, params[f"l{i}"]["w"], params[f"l{i}"]["b"])
    if i == 0:
      h = second_order_poison(h, poison)
    if i < depth - 1:
      h = jnp.tanh(h)
  err = h.astype(jnp.promote_types(h.dtype, jnp.float32)) - t
  return 0.5 * jnp.mean(jnp.sum(err ** 2, axis=-1))


def batches(key, num, batch=BATCH, sizes=SIZES, scales=None, noise=0.1):
  """``(xs, ts)`` of shape ``(num, batch, .)``: a noisy random teacher.

  ``scales`` multiplies the input features (badly scaled inputs make an
  ill-conditioned problem).
  """
  kx, kt, kn = jax.random.split(key, 3)
  xs = jax.random.normal(kx, (num, batch, sizes[0]))
  if scales is not None:
    xs = xs * jnp.asarray(scales, xs.dtype)
  teacher = jax.random.normal(kt, (sizes[0], sizes[-1]))
  ts = jnp.sin(xs @ teacher) + noise * jax.random.normal(
      kn, (num, batch, sizes[-1]))
  return xs, ts


# name -> factory. Keep this list short: every entry costs a compilation in
# each test that loops over it.
TRANSFORMS = {
    # Measured every step (the aliases' default measures every 40), so the
    # fault and long-run tests see the measurement path on every step.
    "layerwise_sgd": lambda: olw.layerwise_sgd(update_interval=1),
    "layerwise_adamw": lambda: olw.layerwise_adamw(update_interval=1),
    # The input-side preconditioner refreshed every step too.
    "layerwise_sgd_inputs": lambda: olw.layerwise_sgd(
        update_interval=1, precondition="inputs"),
    # The bound this was tuned with (the default became 0.1: 12 steps
    # of cblr at scale 0.05 then fall short of the precision tests' margin).
    "cblr": lambda: olw.cblr(0.05, max_lr=5.0, max_relative_change=1.0),
    "mclr": lambda: olw.mclr(0.1, max_lr=2.0),
    # The secant rates are noisier: momentum (off by default) smooths them.
    "cblr_secant": lambda: olw.cblr(0.1, curvature="secant", initial_lr=0.1,
                                    max_lr=2.0, momentum=0.9),
    "kbfgs": lambda: olw.kbfgs(0.2),
    "kbfgs_l": lambda: olw.kbfgs(0.2, memory_size=3),
}

#: Transforms whose state is a chain whose first part has ``num_skipped``.
CHAINED = ("layerwise_sgd", "layerwise_adamw", "layerwise_sgd_inputs", "cblr",
           "mclr", "cblr_secant")


def skip_count(name, state):
  """Whole steps skipped so far (the transform's own counter)."""
  return int(state.num_skipped) if name.startswith("kbfgs") else int(
      state[0].num_skipped)


def head_state(name, state):
  """The transform's own state (K-BFGS) or the first part of its chain."""
  return state if name.startswith("kbfgs") else state[0]


def tree_finite(tree) -> bool:
  return all(bool(np.all(np.isfinite(np.asarray(x, np.float64))))
             for x in jax.tree_util.tree_leaves(tree)
             if jnp.issubdtype(jnp.result_type(x), jnp.inexact))
