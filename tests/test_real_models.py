"""Every public optimizer of the library, at its defaults, on real model kinds.

The models the other suites do not run every transform on: a linen LSTM
through ``nn.RNN`` (``tests/flax_models.py``) and a linen transformer whose
blocks are stacked by ``nn.scan`` with logically partitioned kernels, used
exactly as ``init`` returns them (boxes included). 10 steps each, one
compilation per (transform, model): the loss stays finite and goes down.
(The NNX models with BatchNorm and Dropout run every transform in
tests/test_flax_integration.py; the CNNs and transformers run K-BFGS in
tests/test_kbfgs_models.py and CBLR/MCLR in tests/test_curvature_lr.py.)
``scale_by_layerwise_step_size`` and ``scale_by_curvature_lr`` are the
building blocks of these aliases (they return a positive step to chain),
so the aliases stand for them.
"""

import warnings

import flax.linen as nn
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
    "linen_lstm_rnn": lambda seed: flax_models.make("lstm", seed),
    "linen_scanned_partitioned_lm": _scanned_lm,
}


# The scanned LM compiles slowly (about 30 s a transform on 2 busy cores):
# the layer-wise SGD, CBLR and MCLR run it. K-BFGS is tested on it in
# test_kbfgs_refuses_a_model_whose_layers_are_all_scanned (below). CBLR/MCLR
# at their defaults lower both models' loss on every seed checked (LSTM:
# seeds 0-299; scanned LM: 0-99; docs/curvature_lr.md, "Defaults and why").
CASES = [(name, "linen_lstm_rnn") for name in TRANSFORMS] + [
    (name, "linen_scanned_partitioned_lm")
    for name in ("layerwise_sgd", "cblr", "mclr")]


@pytest.mark.parametrize("name,model", CASES)
def test_defaults_train_real_models(name, model):
  seed = int(np.random.SeedSequence().entropy % 1000)
  params, value_fn = MODELS[model](seed)
  if model == "linen_scanned_partitioned_lm":
    assert any(isinstance(x, nn.LogicallyPartitioned) for x in
               jax.tree_util.tree_leaves(
                   params, is_leaf=lambda x: isinstance(x, nn.Partitioned)))
  tx = TRANSFORMS[name]()

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # K-BFGS: layers in nn.scan fall back
    losses, final, _ = flax_models.train(tx, value_fn, params)
  print(name, model, np.asarray(losses).round(3), float(final))
  assert np.all(np.isfinite(losses)) and np.isfinite(final)
  assert final < losses[0], (losses, final)


def test_kbfgs_refuses_a_model_whose_layers_are_all_scanned():
  params, value_fn = _scanned_lm(0)
  tx = olw.kbfgs()
  with pytest.raises(ValueError, match="nn.scan"):  # raised while tracing
    jax.eval_shape(lambda p: tx.update(jax.grad(value_fn)(p), tx.init(p), p,
                                       value_fn=value_fn), params)
