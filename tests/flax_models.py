"""Small Flax models of the kinds Flax users train, on random data.

Each factory returns ``(params, loss_fn)``: ``params`` exactly as the model's
``init`` (linen: the ``"params"`` collection; NNX: the ``nnx.Param`` state
from ``nnx.split``), and ``loss_fn(params) -> scalar``, the mini-batch loss on
a fixed random batch, written the way a user would write ``value_fn``:

* ``cnn``: linen, two 3x3 convolutions (ReLU), average pooling, a dense
  classifier;
* ``conv_bn``: linen, convolutions with ``nn.BatchNorm`` in training mode;
  the loss applies the model with ``mutable=["batch_stats"]`` and returns
  only the loss (the batch statistics normalise, the running averages the
  call would update are dropped);
* ``lstm``: linen, ``nn.RNN(nn.OptimizedLSTMCell)`` over a sequence, a dense
  classifier on the last state;
* ``transformer``: linen, a pre-LayerNorm decoder block (causal
  ``nn.MultiHeadDotProductAttention``, MLP) between an embedding and a
  vocabulary projection, next-token cross-entropy on random tokens;
* ``nnx_transformer``: the same block in Flax NNX (``nnx.MultiHeadAttention``),
  ``value_fn`` following the library's recipe
  (``nnx.merge(graphdef, params, rest)``).

Sizes are small so that a test can run 10 jitted steps of each in a second
or two; ``width`` scales the hidden sizes for the benchmark sweep.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

KINDS = ("cnn", "conv_bn", "lstm", "transformer", "nnx_transformer")


def _classes_loss(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                         labels).mean()


class _CNN(nn.Module):
  width: int = 8
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(self.width, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(2 * self.width, (3, 3))(x))
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.classes)(x)


class _ConvBN(nn.Module):
  width: int = 8
  classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    for features in (self.width, 2 * self.width):
      x = nn.Conv(features, (3, 3), use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train)(x)
      x = nn.relu(x)
      x = nn.avg_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.classes)(x)


class _LSTM(nn.Module):
  width: int = 16
  classes: int = 5

  @nn.compact
  def __call__(self, x):
    h = nn.RNN(nn.OptimizedLSTMCell(self.width))(x)
    return nn.Dense(self.classes)(h[:, -1])


class _Block(nn.Module):
  dim: int
  heads: int

  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(self.heads)(h, h, mask=mask)
    h = nn.LayerNorm()(x)
    h = nn.Dense(self.dim)(nn.gelu(nn.Dense(4 * self.dim)(h)))
    return x + h


class _Transformer(nn.Module):
  vocab: int = 32
  dim: int = 16
  heads: int = 2

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.dim)(tokens)
    x = _Block(self.dim, self.heads)(x)
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


class _NNXTransformer(nnx.Module):

  def __init__(self, vocab, dim, heads, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.down = nnx.Linear(4 * dim, dim, rngs=rngs)
    self.norm3 = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    h = self.norm1(x)
    x = x + self.attn(h, mask=nnx.make_causal_mask(tokens))
    x = x + self.down(nnx.gelu(self.up(self.norm2(x))))
    return self.head(self.norm3(x))


def _tokens_loss(logits, tokens):
  return _classes_loss(logits[:, :-1], tokens[:, 1:])


def make(kind: str, seed: int = 0, *, width: int = 1, batch: int = 16):
  """Returns ``(params, loss_fn)`` of model ``kind`` (one of :data:`KINDS`).

  ``seed`` draws both the init and the data; ``width`` multiplies the hidden
  sizes. ``loss_fn(params)`` is the loss on the fixed random batch.
  """
  params, loss, data = make_problem(kind, seed, width=width, batch=batch)
  return params, lambda p: loss(p, data)


def make_problem(kind: str, seed: int = 0, *, width: int = 1,
                 batch: int = 16):
  """Returns ``(params, loss, data)`` with ``loss(params, data) -> scalar``.

  ``loss`` depends on ``kind``, ``width`` only (not on ``seed``): a step
  jitted over ``(params, data)`` compiles once for all seeds.
  """
  rng = np.random.default_rng(seed)
  key = jax.random.PRNGKey(seed)
  if kind in ("cnn", "conv_bn"):
    x = jnp.asarray(rng.standard_normal((batch, 8, 8, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch))
    if kind == "cnn":
      model = _CNN(width=8 * width)
      params = model.init(key, x)["params"]
      return params, _linen_loss(model), (x, y)
    model = _ConvBN(width=8 * width)
    variables = model.init(key, x)
    return (variables["params"], _batchnorm_loss(model),
            (x, y, variables["batch_stats"]))
  if kind == "lstm":
    x = jnp.asarray(rng.standard_normal((batch, 8, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 5, batch))
    model = _LSTM(width=16 * width)
    return model.init(key, x)["params"], _linen_loss(model), (x, y)
  if kind in ("transformer", "nnx_transformer"):
    vocab, dim, heads = 32, 16 * width, 2
    tokens = jnp.asarray(rng.integers(0, vocab, (batch, 8)))
    if kind == "transformer":
      model = _Transformer(vocab, dim, heads)
      return (model.init(key, tokens)["params"],
              _linen_loss(model, _tokens_loss), (tokens, tokens))
    module = _NNXTransformer(vocab, dim, heads, rngs=nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return params, _nnx_lm_loss(graphdef), (tokens, rest)
  raise ValueError(f"unknown model kind {kind!r}; use one of {KINDS}.")


# One loss function per model configuration (stable jit cache keys: linen
# modules and NNX graph definitions are hashable).


@functools.cache
def _linen_loss(model, criterion=None):
  """``criterion(model(x), y)`` on ``data = (x, y)`` (default: class
  cross-entropy; ``_tokens_loss`` with ``y = x`` for a language model)."""
  criterion = criterion or _classes_loss

  def loss(p, data):
    x, y = data
    return criterion(model.apply({"params": p}, x), y)
  return loss


@functools.cache
def _batchnorm_loss(model):
  def loss(p, data):
    x, y, stats = data
    # As a user writes it: training-mode BatchNorm, the updated running
    # averages dropped (value_fn returns the loss only).
    logits, _ = model.apply({"params": p, "batch_stats": stats}, x,
                            train=True, mutable=["batch_stats"])
    return _classes_loss(logits, y)
  return loss


@functools.cache
def _nnx_lm_loss(graphdef):
  def loss(p, data):
    tokens, rest = data
    return _tokens_loss(nnx.merge(graphdef, p, rest)(tokens), tokens)
  return loss


def train(tx, value_fn, params, num_steps: int = 10):
  """``num_steps`` jitted steps of ``tx`` in one ``lax.scan`` (one
  compilation): ``(losses before each step, final loss, final state)``."""

  @jax.jit
  def run(params):
    def step(carry, _):
      params, state = carry
      loss, grads = jax.value_and_grad(value_fn)(params)
      updates, state = tx.update(grads, state, params, value_fn=value_fn)
      return (optax.apply_updates(params, updates), state), loss
    (params, state), losses = jax.lax.scan(
        step, (params, tx.init(params)), length=num_steps)
    return losses, value_fn(params), state

  return run(params)


def layer_rayleigh(loss, params, data, layers):
  """``kappa_l = g_l^T H g_l / ||g_l||^2`` per layer of ``layers``, by
  ``jax.jvp`` of ``jax.grad``, one layer at a time: an independent route
  (no library oracle) to the curvature CBLR measures."""

  @jax.jit
  def quotients(params, data):
    grad_fn = jax.grad(loss)
    g = grad_fn(params, data)
    leaves, treedef = jax.tree_util.tree_flatten(g)
    out = []
    for l in range(layers.num_layers):
      gl = jax.tree_util.tree_unflatten(treedef, [
          x if i == l else jnp.zeros_like(x)
          for x, i in zip(leaves, layers.leaf_layer)])
      _, hg = jax.jvp(lambda p: grad_fn(p, data), (params,), (gl,))
      out.append(optax.tree.vdot(gl, hg) / optax.tree.vdot(gl, gl))
    return jnp.stack(out)

  return np.asarray(quotients(params, data))


def kernel_fraction(report) -> float:
  """Share of the parameters in kernels (2-D or more, not embeddings) that
  an ``olw.kbfgs_coverage`` report says K-BFGS preconditions."""
  sizes = [(math.prod(leaf.shape), leaf.kind is not None)
           for leaf in report.leaves
           if len(leaf.shape) >= 2 and "embed" not in leaf.path.lower()]
  return sum(s for s, kept in sizes if kept) / sum(s for s, _ in sizes)
