"""Grouping a params pytree into layers; per-layer reductions and broadcasts.

A *layer* is a group of params leaves (docs/step_sizes.md, "Layers").
By default the leaves that share the same parent node form one layer, so a
Flax ``Dense`` (``{'kernel', 'bias'}``) is one layer. The grouping can be
overridden, as in :func:`optax.multi_transform`, by

* a callable ``(path, leaf) -> label`` (``path`` is the key path of
  :func:`jax.tree_util.tree_flatten_with_path`), or
* a label pytree with the structure of the params, one hashable label a leaf.

Per-layer scalars are vectors of length ``L`` (layers in first-seen flatten
order); they are computed in float32 (float64 for float64 leaves, see
:func:`stats_dtype`) and broadcast back onto the leaves.
Everything here is static Python bookkeeping plus a handful of jnp ops over
leaves, so it traces once under :func:`jax.jit`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Hashable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

PyTree = Any
LayerGrouping = Union[None, Callable[[tuple, Any], Hashable], PyTree]

__all__ = ["Layers", "group_layers", "check_params", "stats_dtype",
           "flatten_like"]


def stats_dtype(*dtypes) -> jnp.dtype:
  """The dtype statistics are kept in: float32, or float64 for float64 data.

  bfloat16 / float16 leaves get float32 statistics; float64 leaves (with
  ``jax_enable_x64``) keep float64 so nothing is lost.
  """
  return jnp.promote_types(jnp.float32, jnp.result_type(*dtypes)
                           if dtypes else jnp.float32)


def tree_stats_dtype(tree: PyTree) -> jnp.dtype:
  """:func:`stats_dtype` over all leaves of a pytree."""
  return stats_dtype(*[x.dtype for x in jax.tree_util.tree_leaves(tree)])


def to_stats(tree: PyTree) -> PyTree:
  """Casts every leaf to its :func:`stats_dtype` (a no-op for float32)."""
  return jax.tree_util.tree_map(
      lambda x: jnp.asarray(x).astype(stats_dtype(jnp.result_type(x))), tree)


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def check_params(params: PyTree, *, transform: str) -> None:
  """Raises a clear error for params a curvature transform cannot use.

  Args:
    params: the params handed to ``update``.
    transform: the transform's name, for the message.

  Raises:
    ValueError: params are ``None`` or masked (inside ``optax.masked`` /
      ``optax.multi_transform``), or a leaf is not a floating-point array.
  """
  if params is None:
    raise ValueError(
        f"{transform} needs the current params: call "
        "`tx.update(grads, opt_state, params, value_fn=...)`.")
  leaves = jax.tree_util.tree_leaves(params, is_leaf=_is_masked)
  if any(_is_masked(x) for x in leaves):
    raise ValueError(
        f"{transform} received masked params (optax.MaskedNode leaves): inside "
        "`optax.masked` or `optax.multi_transform` the inner transform only "
        "sees part of the params, so `value_fn(params)` cannot be evaluated. "
        "Apply this transform to the whole params pytree and freeze leaves by "
        "chaining `optax.masked(optax.set_to_zero(), mask)` after it instead.")
  for leaf in leaves:
    dtype = getattr(leaf, "dtype", None) or jnp.asarray(leaf).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
          f"{transform} needs real floating-point params, got a leaf of dtype "
          f"{dtype}. Keep integer or complex arrays out of the params pytree "
          "(e.g. in a separate Flax collection), or cast them to float.")


def flatten_like(tree: PyTree, treedef, what: str) -> list:
  """The leaves of ``tree``; a ``ValueError`` naming ``what`` unless its
  structure is ``treedef`` (the params')."""
  leaves, got = jax.tree_util.tree_flatten(tree)
  if got != treedef:
    raise ValueError(
        f"{what} does not match the params' structure.\n"
        f"  params: {treedef}\n  got:    {got}\n"
        "Updates, params and state must all share the params' structure.")
  return leaves


def strip_variable_keys(path: tuple) -> tuple:
  """Drops the wrappers of boxed leaves (a trailing ``.value`` key): Flax NNX
  ``Variable``, ``nn.Partitioned`` / ``LogicallyPartitioned`` boxes.

  ``nnx.Optimizer`` initialises the state from an ``nnx.State`` of
  ``Variable`` objects but updates with plain arrays; both must give the
  same layers, and paths name the param itself.
  """
  while path and isinstance(path[-1], jax.tree_util.GetAttrKey) and (
      path[-1].name in ("value", "raw_value")):
    path = path[:-1]
  return path


def _default_label(path: tuple, leaf) -> str:
  del leaf
  parent = path[:-1]
  return jax.tree_util.keystr(parent) if parent else "<root>"


@dataclasses.dataclass(frozen=True)
class Layers:
  """A static partition of a pytree's leaves into ``L`` layers.

  Attributes:
    labels: one label per layer, in first-seen flatten order.
    leaf_layer: for each leaf (flatten order), the index of its layer.
    treedef: the tree structure the partition was built for.
  """
  labels: tuple
  leaf_layer: tuple
  treedef: Any

  @property
  def num_layers(self) -> int:
    return len(self.labels)

  def _leaves(self, tree: PyTree, what: str = "The pytree") -> list:
    return flatten_like(tree, self.treedef, what)

  def check_structure(self, tree: PyTree, what: str) -> None:
    """Raises a ``ValueError`` naming ``what`` if ``tree`` is not shaped so."""
    self._leaves(tree, what)

  def reduce(self, leaf_scalars: Sequence[jax.Array]) -> jax.Array:
    """Sums one scalar per leaf into a length-``L`` vector (float32 or more)."""
    index = jnp.asarray(self.leaf_layer, dtype=jnp.int32)
    values = jnp.stack([jnp.asarray(s) for s in leaf_scalars])
    values = values.astype(stats_dtype(values.dtype))
    return jnp.zeros((self.num_layers,), values.dtype).at[index].add(values)

  def inner(self, x: PyTree, y: PyTree) -> jax.Array:
    """Per-layer inner products ``<x, y>_l`` in float32 (or float64)."""

    def dot(a, b):
      dtype = stats_dtype(a.dtype, b.dtype)
      return jnp.sum(a.astype(dtype) * b.astype(dtype))

    return self.reduce(
        [dot(a, b) for a, b in zip(self._leaves(x), self._leaves(y))])

  def sq_norm(self, x: PyTree) -> jax.Array:
    """Per-layer squared norms ``||x_l||^2``, shape ``(L,)``."""
    return self.inner(x, x)

  def leaf_indices(self, layer: int) -> list:
    """The flatten-order indices of ``layer``'s leaves."""
    return [i for i, k in enumerate(self.leaf_layer) if k == layer]

  def per_leaf(self, per_layer: jax.Array) -> list:
    """The entry of a length-``L`` vector that belongs to each leaf."""
    return [per_layer[i] for i in self.leaf_layer]

  def scale(self, tree: PyTree, per_layer: jax.Array) -> PyTree:
    """Multiplies each leaf by its layer's scalar; keeps leaf dtypes."""
    leaves = self._leaves(tree)
    scaled = [
        (leaf * c.astype(stats_dtype(leaf.dtype))).astype(leaf.dtype)
        for leaf, c in zip(leaves, self.per_leaf(per_layer))
    ]
    return jax.tree_util.tree_unflatten(self.treedef, scaled)


def trust_ratio(param_sq_norm: jax.Array, step_sq_norm: jax.Array,
                max_relative_change) -> jax.Array:
  """``rho ||theta_l|| / ||step_l||`` from squared norms (LARS's trust ratio).

  The largest multiple of a layer's step that moves the layer by at most
  ``rho`` times its norm (the library's ``max_relative_change``); ``inf``
  where ``theta_l`` or the step is zero, which have no scale to compare to.
  """
  usable = (param_sq_norm > 0) & (step_sq_norm > 0)
  ratio = jnp.sqrt(param_sq_norm / jnp.where(usable, step_sq_norm, 1.0))
  return jnp.where(usable, max_relative_change * ratio, jnp.inf)


def group_layers(params: PyTree, layers: LayerGrouping = None) -> Layers:
  """Partitions the leaves of ``params`` into layers.

  Args:
    params: the params pytree (arrays or shape-dtype structs).
    layers: ``None`` (leaves under the same parent node form a layer), a
      callable ``(path, leaf) -> label``, or a pytree of labels with the
      params' structure.

  Returns:
    The static :class:`Layers` partition.

  Raises:
    ValueError: a leaf gets no label (``None``), several labels (a list or
      set; a tuple is one label) or an unhashable one, a label tree does not
      match the params, or the params have no leaves.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_layerwise as olw
    >>> params = {'dense': {'kernel': jnp.ones((2, 3)), 'bias': jnp.zeros(3)},
    ...           'out': {'kernel': jnp.ones((3, 1))}}
    >>> olw.group_layers(params).labels
    ("['dense']", "['out']")
  """
  with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  if not with_path:
    raise ValueError("The params pytree has no array leaves to optimise.")
  if layers is None or callable(layers):
    label_fn = _default_label if layers is None else layers
    labels = [label_fn(strip_variable_keys(path), leaf)
              for path, leaf in with_path]
  else:
    try:  # one label (sub)tree per params leaf, as optax.multi_transform
      labels = treedef.flatten_up_to(layers)
    except (ValueError, TypeError):
      labels = None
    if labels is None:  # e.g. Variable wrappers: match the leaves in order
      label_leaves, label_def = jax.tree_util.tree_flatten(
          layers, is_leaf=lambda x: x is None)
      if label_def.num_leaves != treedef.num_leaves or len(
          label_leaves) != len(with_path):
        raise ValueError(
            "The `layers` label pytree must have the params' structure, one "
            f"label per leaf: params have {len(with_path)} leaves, the labels "
            f"{len(label_leaves)}.")
      labels = label_leaves
  for (path, _), label in zip(with_path, labels):
    name = jax.tree_util.keystr(path)
    if label is None:
      raise ValueError(
          f"The layer grouping left the leaf {name} unassigned (its label is "
          "None). Give every leaf a label.")
    if isinstance(label, (list, set, frozenset)):
      raise ValueError(
          f"The layer grouping assigns the leaf {name} to several layers "
          f"({label!r}). A leaf belongs to exactly one layer: give it one "
          "hashable label (a tuple counts as one label).")
    try:
      hash(label)
    except TypeError:
      raise ValueError(
          f"The layer grouping gave the leaf {name} the unhashable label "
          f"{label!r}. Labels must be hashable: a str, an int or a tuple."
      ) from None
  order: dict = {}
  for label in labels:
    order.setdefault(label, len(order))
  leaf_layer = tuple(order[label] for label in labels)
  return Layers(labels=tuple(order), leaf_layer=leaf_layer, treedef=treedef)
