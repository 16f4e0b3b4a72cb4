"""Issue 14's model suite: every public transform at its defaults on the
kinds of Flax models users train (small, random data).

* an NNX CNN with BatchNorm and Dropout, ``value_fn`` by the documented
  recipe (:func:`olw.nnx_value_fn`, rebuilt each step), under ``nnx.jit``;
* an NNX transformer with ``nnx.MultiHeadAttention``;
* a linen conv net with BatchNorm (``mutable=["batch_stats"]`` in
  ``value_fn``);
* a linen LSTM through ``nn.RNN(nn.OptimizedLSTMCell)``;
* a linen transformer LM whose blocks are stacked by ``nn.scan`` with
  logically partitioned kernels and tied embeddings, params exactly as
  ``init`` returns them (boxes included).

10 steps each, one compilation per (transform, model): the loss stays
finite and goes down (NNX CNN: the loss without Dropout, BatchNorm on the
batch, on the same batch before and after). K-BFGS also preconditions >=
90 % of the kernel parameters (printed). ``scale_by_layerwise_step_size``
and ``scale_by_curvature_lr`` are the building blocks of these aliases
(they return a positive step to chain), so the aliases stand for them.
"""

import warnings

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_layerwise as olw
from tests import flax_models

VOCAB = 16

TRANSFORMS = {
    "layerwise_sgd": olw.layerwise_sgd,
    "layerwise_adamw": olw.layerwise_adamw,
    "cblr": olw.cblr,
    "mclr": olw.mclr,
    "kbfgs": olw.kbfgs,
}


class _Block(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    init = lambda *axes: nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), axes)
    h = nn.LayerNorm()(x)
    h = nn.MultiHeadDotProductAttention(
        num_heads=2, kernel_init=init("embed", "heads", "kv"))(
            h, mask=nn.make_causal_mask(x[..., 0]))
    x = x + h
    h = nn.gelu(nn.Dense(32, kernel_init=init("embed", "mlp"))(
        nn.LayerNorm()(x)))
    return x + nn.Dense(16, kernel_init=init("mlp", "embed"))(h), None


class _ScannedLM(nn.Module):

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(VOCAB, 16)
    blocks = nn.scan(_Block, variable_axes={"params": 0},
                     split_rngs={"params": True}, length=2,
                     metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = blocks()(embed(tokens), None)
    return embed.attend(nn.LayerNorm()(x))


def _scanned_lm(seed):
  tokens = jax.random.randint(jax.random.PRNGKey(seed), (8, 7), 0, VOCAB)
  model = _ScannedLM()
  params = model.init(jax.random.PRNGKey(seed + 1), tokens)["params"]
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, tokens)[:, :-1], tokens[:, 1:]).mean()
  return params, loss


MODELS = {
    "linen_conv_batchnorm": lambda seed: flax_models.make("conv_bn", seed),
    "linen_lstm_rnn": lambda seed: flax_models.make("lstm", seed),
    "linen_scanned_partitioned_lm": _scanned_lm,
    "nnx_transformer": lambda seed: flax_models.make("nnx_transformer",
                                                     seed),
}
CASES = [(name, model) for model in [*MODELS, "nnx_cnn_bn_dropout"]
         for name in TRANSFORMS]


def _check_kbfgs_coverage(value_fn, params):
  report = olw.kbfgs_coverage(value_fn, params)
  fraction = flax_models.kernel_fraction(report)
  print(f"K-BFGS preconditions {fraction:.1%} of the kernel parameters")
  assert fraction >= 0.9, str(report)


@pytest.mark.parametrize("name,model", CASES)
def test_defaults_train_real_models(name, model):
  seed = int(np.random.SeedSequence().entropy % 1000)
  if model == "nnx_cnn_bn_dropout":
    before, after = _train_nnx_cnn(TRANSFORMS[name](), seed, name == "kbfgs")
    print(name, model, before, after)
    assert np.isfinite(after) and after < before
    return
  params, value_fn = MODELS[model](seed)
  if model == "linen_scanned_partitioned_lm":
    assert any(isinstance(x, nn.LogicallyPartitioned) for x in
               jax.tree_util.tree_leaves(
                   params, is_leaf=lambda x: isinstance(x, nn.Partitioned)))
  if name == "kbfgs":
    _check_kbfgs_coverage(value_fn, params)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # fallback warnings (embeddings, norms)
    losses, final, _ = flax_models.train(TRANSFORMS[name](), value_fn,
                                         params)
  print(name, model, np.asarray(losses).round(3), float(final))
  assert np.all(np.isfinite(losses)) and np.isfinite(final)
  assert final < losses[0], (losses, final)


class _NNXCNN(nnx.Module):
  """Conv - BatchNorm - ReLU - Dropout, twice, then a linear classifier."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
    self.norm1 = nnx.BatchNorm(8, rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)
    self.norm2 = nnx.BatchNorm(16, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.out = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    x = self.drop(nnx.relu(self.norm1(self.conv1(x))))
    x = self.drop(nnx.relu(self.norm2(self.conv2(x))))
    return self.out(x.mean(axis=(1, 2)))


def _xent(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def _nnx_steps(model, optimizer, x, y):
  """10 steps as a user writes them: value_fn by the documented recipe."""

  @nnx.scan(in_axes=(nnx.Carry, None, None), out_axes=nnx.Carry, length=10)
  def step(carry, x, y):
    model, optimizer = carry
    value_fn = olw.nnx_value_fn(_xent, model, x, y)
    grads = nnx.grad(_xent)(model, x, y)
    optimizer.update(model, grads, value_fn=value_fn)
    return model, optimizer

  step((model, optimizer), x, y)


def _train_nnx_cnn(tx, seed, check_coverage):
  """The loss without Dropout (BatchNorm on the batch) before and after."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((16, 8, 8, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, 16))
  model = _NNXCNN(nnx.Rngs(seed, dropout=seed + 1))
  if check_coverage:
    _check_kbfgs_coverage(olw.nnx_value_fn(_xent, model, x, y),
                          nnx.as_pure(nnx.state(model, nnx.Param)))
  clean = lambda: float(_xent(_without_dropout(model), x, y))
  before = clean()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # fallback warnings (norm scales)
    _nnx_steps(model, optimizer, x, y)
  return before, clean()


def _without_dropout(model):
  """A copy of ``model`` whose Dropout is off (BatchNorm still on the
  batch): the deterministic loss of the current params."""
  copy = nnx.clone(model)
  copy.set_attributes(deterministic=True)
  return copy
