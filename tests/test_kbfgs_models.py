"""K-BFGS on the kinds of Flax models users train (small, random data).

Each model runs 10 steps of K-BFGS(L) (and some of K-BFGS) at their
defaults: the loss must stay finite and go down, and the kernels (2-D or
more, embeddings aside) must be preconditioned, >= 90 % (the fraction is
printed). The models: a linen CNN, a conv net with BatchNorm, a transformer
LM with ``MultiHeadDotProductAttention``, tied embeddings and two logically
partitioned blocks stacked by ``nn.scan`` (one set of factors per slice), an
LSTM through ``nn.RNN(nn.OptimizedLSTMCell)`` (statistics over all time
steps), an NNX CNN and an NNX transformer.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_layerwise as olw
from tests import flax_models

VOCAB, SEQ, BATCH = 11, 6, 8


class _CNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3))(x))
    x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


class _ConvBN(nn.Module):

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Conv(6, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    return nn.Dense(3)(x.mean(axis=(1, 2)))


class _Block(nn.Module):
  """Pre-norm attention and MLP; kernels logically partitioned (boxed in
  ``nn.LogicallyPartitioned``, the TPU recipe) if ``partitioned``."""
  partitioned: bool = False

  @nn.compact
  def __call__(self, x):
    init = lambda *axes: nn.initializers.lecun_normal()
    if self.partitioned:
      init = lambda *axes: nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), axes)
    x = x + nn.MultiHeadDotProductAttention(
        num_heads=2, kernel_init=init("embed", "heads", "kv"))(
            nn.LayerNorm()(x), mask=nn.make_causal_mask(x[..., 0]))
    h = nn.gelu(nn.Dense(32, kernel_init=init("embed", "mlp"))(
        nn.LayerNorm()(x)))
    return x + nn.Dense(16, kernel_init=init("mlp", "embed"))(h)


class _ScannedLM(nn.Module):
  """Two partitioned blocks stacked by ``nn.scan`` (params on a leading
  ``layers`` axis), tied embeddings."""

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(VOCAB, 16)
    blocks = nn.scan(lambda module, x, _: (module(x), None),
                     variable_axes={"params": 0}, split_rngs={"params": True},
                     length=2, metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = blocks(_Block(partitioned=True), embed(tokens), None)
    return embed.attend(x)


class _LSTM(nn.Module):

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, 8)(tokens)
    x = nn.RNN(nn.OptimizedLSTMCell(16))(x)
    return nn.Dense(VOCAB)(x)


class _NNXCNN(nnx.Module):

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(2, 6, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(6, 8, (3, 3), strides=2, rngs=rngs)
    self.out = nnx.Linear(8 * 4 * 4, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
    return self.out(x.reshape(x.shape[0], -1))


class _NNXLM(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, 16, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
        num_heads=2, in_features=16, decode=False, rngs=rngs)
    self.mlp = nnx.Linear(16, 32, rngs=rngs)
    self.back = nnx.Linear(32, 16, rngs=rngs)
    self.head = nnx.Linear(16, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    x = x + self.attention(x, mask=nnx.make_causal_mask(tokens))
    x = x + self.back(nnx.gelu(self.mlp(x)))
    return self.head(x)


def _images(key):
  x = jax.random.normal(key, (BATCH, 8, 8, 2))
  return x, jax.random.randint(jax.random.fold_in(key, 1), (BATCH,), 0, 3)


def _tokens(key):
  t = jax.random.randint(key, (BATCH, SEQ + 1), 0, VOCAB)
  return t[:, :-1], t[:, 1:]


def _xent(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                         labels).mean()


def _linen(model, data):
  """``(params, value_fn)`` for a linen model."""
  def make(key):
    x, y = data(key)
    variables = model.init(jax.random.fold_in(key, 2), x)
    if "batch_stats" in variables:
      stats = variables["batch_stats"]
      return variables["params"], lambda p: _xent(model.apply(
          {"params": p, "batch_stats": stats}, x,
          mutable=["batch_stats"])[0], y)
    return variables["params"], lambda p: _xent(
        model.apply({"params": p}, x), y)
  return make


def _nnx(cls, data):
  def make(key):
    x, y = data(key)
    graphdef, params = nnx.split(cls(nnx.Rngs(int(key[1]) % 1000)),
                                 nnx.Param)
    return params, lambda p: _xent(nnx.merge(graphdef, p)(x), y)
  return make


MODELS = {
    "linen_cnn": _linen(_CNN(), _images),
    "linen_conv_batchnorm": _linen(_ConvBN(), _images),
    "nnx_cnn": _nnx(_NNXCNN, _images),
    "nnx_transformer": _nnx(_NNXLM, _tokens),
    "linen_scanned_blocks": _linen(_ScannedLM(), _tokens),
    "linen_lstm": _linen(_LSTM(), _tokens),
}


# K-BFGS(L) on every model; K-BFGS (the same taps, another H_g) on those
# whose kinds tests/test_real_models.py does not run it on (it runs K-BFGS on
# a conv net with BatchNorm, the LSTM, the scanned LM and the NNX
# transformer, with the same coverage check).
CASES = [pytest.param(m, 5, id=f"{n}-kbfgs_l") for n, m in MODELS.items()] + [
    pytest.param(MODELS[n], None, id=f"{n}-kbfgs")
    for n in ("linen_cnn", "nnx_cnn")]


@pytest.mark.parametrize("make,memory", CASES)
def test_kbfgs_trains_real_model_kinds(make, memory):
  key = jax.random.PRNGKey(np.random.SeedSequence().entropy % 2**31)
  params, value_fn = make(key)
  report = olw.kbfgs_coverage(value_fn, params)
  fraction = flax_models.kernel_fraction(report)
  print(f"preconditioned {fraction:.1%} of the kernel parameters\n{report}")
  assert fraction >= 0.9, str(report)
  tx = olw.kbfgs(memory_size=memory)

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # fallback warnings: the report has them
    losses, final, state = flax_models.train(tx, value_fn, params)
  assert np.all(np.isfinite(losses)) and np.isfinite(final)
  assert final < losses[0], (losses, final)
  assert int(state.num_skipped) == 0
