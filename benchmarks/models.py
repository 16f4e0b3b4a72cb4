"""Flax linen models of the benchmarks (the papers' architectures).

Every dense part is a plain :class:`flax.linen.Dense`, so K-BFGS can tap it
with no change to the model; the CNN's convolutions are not dense layers and
take K-BFGS's documented fallback.

* :class:`Autoencoder`: the deep autoencoders of the K-BFGS paper (Goldfarb,
  Ren and Bahamou, 2020), ReLU everywhere except the linear code layer and
  the linear output layer (logits of a Bernoulli per pixel).
* :class:`CNN`: a small convolutional classifier.
* :class:`GCN`: a two-layer graph convolutional network (Kipf and Welling,
  2017): ``softmax(A relu(A X W1 + b1) W2 + b2)``.
* :class:`CharTransformer`: a small pre-LayerNorm causal transformer
  language model over bytes (blocks unrolled, not ``nn.scan``-stacked).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "MNIST_AE_WIDTHS",
    "CURVES_AE_WIDTHS",
    "FACES_AE_WIDTHS",
    "Autoencoder",
    "CNN",
    "GCN",
    "CharTransformer",
]

# Layer widths, input first (the autoencoders of arXiv 2006.08877).
MNIST_AE_WIDTHS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
CURVES_AE_WIDTHS = (784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784)
FACES_AE_WIDTHS = (625, 2000, 1000, 500, 30, 500, 1000, 2000, 625)


def _dense_init(init: str, fan_in: int) -> dict:
  """``kernel_init`` / ``bias_init`` of a ``Dense`` with ``fan_in`` inputs."""
  if init == "glorot":
    return {"kernel_init": nn.initializers.xavier_uniform()}
  if init == "lecun":
    return {}  # Flax's nn.Dense default: LeCun normal kernels, zero biases
  if init == "torch":
    bound = 1.0 / fan_in ** 0.5
    uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound)
    return {"kernel_init": uniform, "bias_init": uniform}
  raise ValueError(f"init must be 'torch', 'lecun' or 'glorot', got {init!r}")


class Autoencoder(nn.Module):
  """A deep dense autoencoder returning per-pixel logits.

  Attributes:
    widths: layer widths including the input, e.g. :data:`CURVES_AE_WIDTHS`.
      The code layer is the narrowest; it and the output layer are linear,
      every other layer is followed by a ReLU.
    weight_init: ``"torch"`` (default): the authors' PyTorch ``nn.Linear`` default,
      kernel and bias ``~ U(+-1/sqrt(fan_in))``, which their K-BFGS runs
      (and its default learning rate 0.3) assume; ``"glorot"``: Flax's
      Glorot-uniform kernels and zero biases; ``"lecun"``: Flax's ``nn.Dense``
      default (LeCun normal kernels, zero biases). Glorot's larger kernels
      (2.6-5.4x the variance on the MNIST architecture) make K-BFGS at lr 0.3
      diverge in our runs.
  """
  widths: Sequence[int]
  weight_init: str = "torch"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    widths = tuple(self.widths)
    if len(widths) < 3:
      raise ValueError(f"an autoencoder needs >= 3 widths, got {widths}")
    if x.shape[-1] != widths[0]:
      raise ValueError(f"input has {x.shape[-1]} features, the model "
                       f"expects {widths[0]}")
    code = 1 + min(range(len(widths) - 1), key=lambda i: widths[1:][i])
    for i, width in enumerate(widths[1:], start=1):
      x = nn.Dense(width, name=f"dense_{i:02d}",
                   **_dense_init(self.weight_init, widths[i - 1]))(x)
      if i != code and i != len(widths) - 1:
        x = nn.relu(x)
    return x


class CNN(nn.Module):
  """Conv(16) - pool - Conv(32) - pool - Dense(hidden) - Dense(classes).

  3 x 3 convolutions with ReLU and 2 x 2 average pooling; works on 8 x 8
  digits and 28 x 28 images (NHWC).
  """
  num_classes: int = 10
  channels: Sequence[int] = (16, 32)
  hidden: int = 64

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for c in self.channels:
      x = nn.relu(nn.Conv(c, (3, 3), padding="SAME")(x))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(x)


class GCN(nn.Module):
  """Two-layer GCN on a dense normalised adjacency ``A``.

  Each layer aggregates then applies a ``Dense`` (``(A H) W + b``, the bias
  after aggregation as in Kipf and Welling), so the nodes are the "examples"
  a K-BFGS tap sees.
  """
  hidden: int = 64
  num_classes: int = 5

  @nn.compact
  def __call__(self, adjacency: jax.Array, features: jax.Array) -> jax.Array:
    h = nn.relu(nn.Dense(self.hidden, name="gc1")(adjacency @ features))
    return nn.Dense(self.num_classes, name="gc2")(adjacency @ h)


class _Block(nn.Module):
  """Pre-LayerNorm block: causal self-attention, then a GELU MLP."""
  dim: int
  heads: int
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(self.heads, name="attention")(
        h, h, mask=mask)
    h = nn.gelu(nn.Dense(self.mlp_ratio * self.dim, name="mlp_in")(
        nn.LayerNorm()(x)))
    return x + nn.Dense(self.dim, name="mlp_out")(h)


class CharTransformer(nn.Module):
  """A causal transformer language model over ``vocab`` symbols.

  Token and learned position embeddings (``nn.Embed``), ``num_blocks``
  pre-LayerNorm blocks (``nn.MultiHeadDotProductAttention`` with a causal
  mask, then ``Dense(mlp_ratio * dim)``-GELU-``Dense(dim)``), a final
  LayerNorm and an untied ``Dense(vocab)`` head; returns next-symbol logits
  ``(batch, length, vocab)``. The blocks are separate modules (no
  ``nn.scan``), so K-BFGS taps every Dense / DenseGeneral in them.
  """
  vocab: int = 256
  dim: int = 64
  heads: int = 4
  num_blocks: int = 2
  max_len: int = 512
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    length = tokens.shape[-1]
    x = nn.Embed(self.vocab, self.dim, name="embed")(tokens)
    x = x + nn.Embed(self.max_len, self.dim, name="pos_embed")(
        jnp.arange(length))
    mask = nn.make_causal_mask(tokens)
    for i in range(self.num_blocks):
      x = _Block(self.dim, self.heads, self.mlp_ratio, name=f"block_{i}")(
          x, mask)
    return nn.Dense(self.vocab, name="head")(nn.LayerNorm()(x))


def count_params(params) -> int:
  """Total number of scalars in a params pytree."""
  return int(sum(jnp.size(x) for x in jax.tree_util.tree_leaves(params)))
