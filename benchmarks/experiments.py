"""The benchmark experiments: data + model + loss, one builder each.

=============  ===============================================================
name           what
=============  ===============================================================
``curves-ae``  K-BFGS paper's CURVES autoencoder
               (784-400-200-100-50-25-6-25-50-100-200-400-784) on synthetic
               CURVES; sigmoid cross-entropy summed over pixels, batch mean.
``mnist-ae``   K-BFGS paper's MNIST autoencoder (784-1000-500-250-30-250-500-
               1000-784) on Fashion-MNIST (Debian package or ``data_dir``), or
               on synthetic CURVES (``dataset="curves"``).
``digits-cnn`` A small CNN on scikit-learn's digits (or Fashion-MNIST),
               softmax cross-entropy (the layer-wise step-size paper's CNN
               setting, scaled down).
``gcn``        A two-layer GCN on a contextual stochastic block model,
               full-batch, masked softmax cross-entropy (the layer-wise
               step-size paper's GCN setting on generated data).
=============  ===============================================================

Every builder takes size parameters (``n_train``, widths, ...) so the smoke
tests can run tiny versions of the same code.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import data as data_lib
from benchmarks import models

__all__ = ["Experiment", "EXPERIMENTS", "build_experiment", "curves_ae",
           "mnist_ae", "digits_cnn", "gcn", "softmax_cross_entropy_fns"]

Params = Any
Batch = Dict[str, jax.Array]


@dataclasses.dataclass
class Experiment:
  """A training problem the runner can optimise with any method.

  Attributes:
    name: the experiment's CLI name.
    description: one line for tables and the JSON file.
    init_fn: ``PRNGKey -> params``.
    loss_fn: ``(params, batch) -> scalar`` mean mini-batch loss (what is
      differentiated, and what ``value_fn`` closes over).
    metrics_fn: ``(params, batch) -> {name: (sum, count)}``, summable over
      chunks of a split (always has ``"loss"``).
    train: training arrays; with ``batch_size`` set each has a leading
      example dimension, else the dict is one full batch.
    test: test arrays (same convention) or ``None``.
    batch_size: mini-batch size, or ``None`` for full-batch training.
    default_epochs: epochs when the CLI gives none.
    info: extra facts for the JSON file (architecture, data, paper).
  """
  name: str
  description: str
  init_fn: Callable[[jax.Array], Params]
  loss_fn: Callable[[Params, Batch], jax.Array]
  metrics_fn: Callable[[Params, Batch], Dict[str, Any]]
  train: Dict[str, np.ndarray]
  test: Optional[Dict[str, np.ndarray]]
  batch_size: Optional[int]
  default_epochs: int = 10
  info: Dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def full_batch(self) -> bool:
    return self.batch_size is None

  @property
  def num_train(self) -> int:
    if self.full_batch:
      return int(self.info.get("num_train", 1))
    return int(next(iter(self.train.values())).shape[0])

  @property
  def num_test(self) -> int:
    if self.test is None:
      return 0
    if self.full_batch:
      return int(self.info.get("num_test", 0))
    return int(next(iter(self.test.values())).shape[0])

  @property
  def steps_per_epoch(self) -> int:
    if self.full_batch:
      return 1
    return max(1, self.num_train // self.batch_size)


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------


def _autoencoder(name: str, description: str, dataset: data_lib.Dataset,
                 widths: Sequence[int], batch_size: int, default_epochs: int,
                 info: dict) -> Experiment:
  model = models.Autoencoder(tuple(widths))
  x_train = dataset.x_train.reshape(len(dataset.x_train), -1)
  x_test = dataset.x_test.reshape(len(dataset.x_test), -1)
  if x_train.shape[1] != widths[0]:
    raise ValueError(f"{name}: data have {x_train.shape[1]} pixels, the "
                     f"architecture expects {widths[0]}")

  def per_example(params, x):
    logits = model.apply({"params": params}, x)
    return optax.sigmoid_binary_cross_entropy(logits, x).sum(axis=-1)

  def loss_fn(params, batch):
    return per_example(params, batch["x"]).mean()

  def metrics_fn(params, batch):
    losses = per_example(params, batch["x"])
    return {"loss": (losses.sum(), losses.shape[0])}

  @jax.jit
  def init_fn(key):
    return model.init(key, jnp.zeros((1, widths[0]), jnp.float32))["params"]

  batch_size = min(int(batch_size), len(x_train))
  return Experiment(
      name=name, description=description, init_fn=init_fn, loss_fn=loss_fn,
      metrics_fn=metrics_fn, train={"x": x_train}, test={"x": x_test},
      batch_size=batch_size, default_epochs=default_epochs,
      info=dict(info, architecture="-".join(map(str, widths)),
                data=dataset.name,
                loss="sigmoid cross-entropy summed over pixels, batch mean"))


def curves_ae(*, n_train: int = 20_000, n_test: int = 10_000,
              batch_size: int = 1000,
              widths: Sequence[int] = models.CURVES_AE_WIDTHS,
              data_seed: int = 0, cache_dir: Optional[str] = None,
              default_epochs: int = 10) -> Experiment:
  """The K-BFGS paper's CURVES autoencoder on synthetic CURVES."""
  ds = data_lib.make_curves(n_train, n_test, seed=data_seed,
                            cache_dir=cache_dir)
  return _autoencoder(
      "curves-ae", f"CURVES autoencoder on {ds.name}", ds, widths, batch_size,
      default_epochs,
      {"paper": "Goldfarb, Ren, Bahamou (NeurIPS 2020), CURVES autoencoder"})


def mnist_ae(*, dataset: str = "auto", data_dir: Optional[str] = None,
             n_train: Optional[int] = None, n_test: Optional[int] = None,
             batch_size: int = 1000,
             widths: Sequence[int] = models.MNIST_AE_WIDTHS,
             data_seed: int = 0, cache_dir: Optional[str] = None,
             default_epochs: int = 10) -> Experiment:
  """The K-BFGS paper's MNIST autoencoder.

  Args:
    dataset: ``"fashion-mnist"`` (Debian package or ``data_dir``; raises
      :class:`~benchmarks.data.DataUnavailableError` if absent),
      ``"curves"`` (synthetic CURVES, 784 inputs), or ``"auto"``
      (Fashion-MNIST if found, else CURVES with a printed notice).
  """
  if dataset not in ("auto", "fashion-mnist", "curves"):
    raise ValueError(f"dataset must be auto, fashion-mnist or curves, got "
                     f"{dataset!r}")
  ds = None
  if dataset in ("auto", "fashion-mnist"):
    try:
      ds = data_lib.load_fashion_mnist(data_dir, n_train=n_train,
                                       n_test=n_test)
    except data_lib.DataUnavailableError as e:
      if dataset == "fashion-mnist":
        raise
      print(f"[mnist-ae] {e}\n[mnist-ae] Falling back to synthetic CURVES "
            "at the MNIST architecture.")
  if ds is None:
    ds = data_lib.make_curves(20_000 if n_train is None else n_train,
                              10_000 if n_test is None else n_test,
                              seed=data_seed, cache_dir=cache_dir)
  return _autoencoder(
      "mnist-ae", f"MNIST autoencoder on {ds.name}", ds, widths, batch_size,
      default_epochs,
      {"paper": "Goldfarb, Ren, Bahamou (NeurIPS 2020), MNIST autoencoder; "
                "paper: K-BFGS train loss 59.8 at epoch 10, 53.8 at epoch 50 "
                "on MNIST (not comparable on other data)"})


def softmax_cross_entropy_fns(model) -> Tuple[Callable, Callable]:
  """``(loss_fn, metrics_fn)`` for a Flax ``model`` giving logits of integer
  labels (applied as ``{"params": params}`` to ``batch["x"]``, labels
  ``batch["y"]``): the softmax cross-entropy averaged over every labelled
  position (an example, or each token of a sequence); the metrics are the
  loss and argmax-accuracy sums with the number of positions."""

  def per_position(params, batch):
    logits = model.apply({"params": params}, batch["x"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                             batch["y"])
    correct = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
    return losses, correct

  def loss_fn(params, batch):
    return per_position(params, batch)[0].mean()

  def metrics_fn(params, batch):
    losses, correct = per_position(params, batch)
    return {"loss": (losses.sum(), losses.size),
            "accuracy": (correct.sum(), correct.size)}

  return loss_fn, metrics_fn


def _classifier(name, description, model, x_train, y_train, x_test, y_test,
                batch_size, default_epochs, info) -> Experiment:
  loss_fn, metrics_fn = softmax_cross_entropy_fns(model)

  @jax.jit
  def init_fn(key):
    return model.init(key, jnp.zeros((1,) + x_train.shape[1:],
                                     jnp.float32))["params"]

  return Experiment(
      name=name, description=description, init_fn=init_fn, loss_fn=loss_fn,
      metrics_fn=metrics_fn, train={"x": x_train, "y": y_train},
      test={"x": x_test, "y": y_test},
      batch_size=min(int(batch_size), len(x_train)),
      default_epochs=default_epochs,
      info=dict(info, loss="softmax cross-entropy, batch mean"))


def digits_cnn(*, dataset: str = "digits", data_dir: Optional[str] = None,
               n_train: Optional[int] = None, batch_size: int = 128,
               channels: Sequence[int] = (16, 32), hidden: int = 64,
               default_epochs: int = 20) -> Experiment:
  """A small CNN classifier on sklearn digits (or ``dataset="fashion-mnist"``)."""
  if dataset == "digits":
    ds = data_lib.load_digits(n_train=n_train)
  elif dataset == "fashion-mnist":
    ds = data_lib.load_fashion_mnist(data_dir, n_train=n_train,
                                     flatten=False)
  else:
    raise ValueError(f"dataset must be digits or fashion-mnist, got "
                     f"{dataset!r}")
  model = models.CNN(num_classes=10, channels=tuple(channels), hidden=hidden)
  return _classifier(
      "digits-cnn", f"CNN on {ds.name}", model, ds.x_train, ds.y_train,
      ds.x_test, ds.y_test, batch_size, default_epochs,
      {"architecture": f"conv{list(channels)}-dense{hidden}-10",
       "data": ds.name,
       "paper": "Bahamou and Goldfarb (2023), CNN setting (scaled down)"})


def gcn(*, num_nodes: int = 2000, num_classes: int = 5,
        num_features: int = 64, hidden: int = 64,
        average_degree: float = 10.0, homophily: float = 0.7,
        feature_signal: float = 1.0, data_seed: int = 0,
        default_epochs: int = 200) -> Experiment:
  """A two-layer GCN on a CSBM graph, full-batch (one step per epoch)."""
  g = data_lib.make_csbm(num_nodes, num_classes, num_features,
                         average_degree=average_degree, homophily=homophily,
                         feature_signal=feature_signal, seed=data_seed)
  model = models.GCN(hidden=hidden, num_classes=num_classes)
  common = {"adjacency": g.adjacency, "features": g.features,
            "labels": g.labels}

  def per_node(params, batch):
    logits = model.apply({"params": params}, batch["adjacency"],
                         batch["features"])
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["labels"])
    correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
    return losses, correct, batch["mask"]

  def loss_fn(params, batch):
    losses, _, mask = per_node(params, batch)
    return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)

  def metrics_fn(params, batch):
    losses, correct, mask = per_node(params, batch)
    n = mask.sum()
    return {"loss": ((losses * mask).sum(), n),
            "accuracy": ((correct * mask).sum(), n)}

  @jax.jit
  def init_fn(key):
    return model.init(key, g.adjacency[:1, :1],
                      jnp.zeros((1, num_features)))["params"]

  return Experiment(
      name="gcn", description=f"2-layer GCN on {g.name}", init_fn=init_fn,
      loss_fn=loss_fn, metrics_fn=metrics_fn,
      train=dict(common, mask=g.train_mask),
      test=dict(common, mask=g.test_mask), batch_size=None,
      default_epochs=default_epochs,
      info={"architecture": f"GCN {num_features}-{hidden}-{num_classes}",
            "data": g.name, "num_train": int(g.train_mask.sum()),
            "num_test": int(g.test_mask.sum()),
            "loss": "softmax cross-entropy over training nodes (full batch)",
            "paper": "Bahamou and Goldfarb (2023), GCN setting, on a CSBM"})


EXPERIMENTS: Dict[str, Callable[..., Experiment]] = {
    "curves-ae": curves_ae,
    "mnist-ae": mnist_ae,
    "digits-cnn": digits_cnn,
    "gcn": gcn,
}


def build_experiment(name: str, **overrides) -> Experiment:
  """Builds a registered experiment; ``None`` overrides and keyword arguments
  the builder does not take are dropped (so one CLI serves all builders)."""
  if name not in EXPERIMENTS:
    raise ValueError(f"unknown experiment {name!r}; choose from "
                     f"{sorted(EXPERIMENTS)}")
  builder = EXPERIMENTS[name]
  accepted = inspect.signature(builder).parameters
  kwargs = {k: v for k, v in overrides.items()
            if v is not None and k in accepted}
  return builder(**kwargs)
