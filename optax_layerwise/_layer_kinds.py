"""Layer kinds: the one interface K-BFGS's Kronecker factors see.

K-BFGS (Goldfarb, Ren and Bahamou, arXiv 2006.08877, section 3) keeps two
factors per layer ``h = a @ W + b``: ``H_a`` on the input side and ``H_g`` on
the pre-activation side. Every layer it supports is such a dense layer once
its call is written over *rows*:

* a dense layer, ``nn.DenseGeneral`` or ``nnx.LinearGeneral``: the contracted
  input axes are flattened into ``d_in``, every other input axis (batch,
  sequence, heads not contracted) joins the rows;
* an einsum whose kernel letters are contracted then output letters: as a
  dense layer;
* a convolution: the input *patches* are the rows (KF-QN-CNN, Ren, Bahamou
  and Goldfarb, arXiv 2102.06737: a convolution is a dense layer over
  patches, its statistics averaged over the batch and the spatial
  positions);
* ``nn.OptimizedLSTMCell``: eight dense layers, its fused products computed
  apart while a tap runs.

The kernel is then the ``(d_in, d_out)`` matrix ``kernel.reshape(d_in,
d_out)``: its leading axes are the contracted ones, its trailing axes the
outputs (after the leading axes of a stack scanned by ``nn.scan``, one
layer per slice). A *kind* (one module each: :mod:`optax_layerwise._kind_dense`,
:mod:`optax_layerwise._kind_einsum`, :mod:`optax_layerwise._kind_conv`,
:mod:`optax_layerwise._kind_lstm`) says which Flax modules it taps and how
one of their calls becomes a :class:`LayerCall`; :func:`register_layer_kind`
adds one of your own. :func:`find_kernels` finds the kernels in the params
before any call (``init`` has no ``value_fn``), and the tap checks each call
against what it found.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

from optax_layerwise import _layers

PyTree = Any

__all__ = ["LayerCall", "LayerKind", "LayerSpec", "register_layer_kind",
           "layer_kinds", "find_kernels", "key_name"]


@dataclasses.dataclass(frozen=True)
class LayerCall:
  """One call of a layer, written as a dense layer over rows.

  Attributes:
    rows: ``(n, d_in)`` inputs, one row per example and position.
    outputs: the layer's output (before any activation), whose trailing
      ``out_axes`` axes are the kernel's output axes.
    out_axes: number of trailing output axes of ``outputs``.
    kernel: the kernel leaf as the layer used it (matched to the params by
      identity).
    bias: the bias leaf, or ``None``.
  """
  rows: jax.Array
  outputs: jax.Array
  out_axes: int
  kernel: jax.Array
  bias: Optional[jax.Array]


# A kind's adapter returns the call, or a string saying why this call cannot
# be preconditioned (the layer then takes the fallback, with that reason).
Adapter = Callable[[Any, tuple, dict, jax.Array], Union[LayerCall, str]]


@dataclasses.dataclass(frozen=True)
class LayerKind:
  """A kind of layer K-BFGS preconditions.

  Attributes:
    name: shown in reports and errors, e.g. ``"dense"``, ``"conv"``.
    linen_types: returns the ``flax.linen`` module classes of this kind
      (imported lazily).
    nnx_types: returns the ``flax.nnx`` module classes of this kind.
    adapter: ``(module, args, kwargs, output) -> LayerCall | reason``, for a
      module of one of those classes called with ``args, kwargs``.
    rewrite: for a linen module that applies several kernels fused (e.g.
      ``nn.OptimizedLSTMCell``), ``(module, args, kwargs, dense) -> output |
      reason`` computing the call itself with ``dense(x, name, dtype=None)``,
      the tapped dense layer of its sub-module ``name`` (``x @ kernel +
      bias``); used instead of ``adapter`` (a string: the module runs as
      it is, untapped, for that reason).
  """
  name: str
  linen_types: Callable[[], tuple]
  nnx_types: Callable[[], tuple]
  adapter: Optional[Adapter] = None
  rewrite: Optional[Callable] = None


_KINDS: dict = {}


def register_layer_kind(kind: LayerKind) -> LayerKind:
  """Registers a layer kind for K-BFGS (replacing one of the same name).

  The adapter receives a called module of one of the kind's classes, its
  call's ``args, kwargs`` and its output, and returns a :class:`LayerCall`
  (or a string: why this call cannot be preconditioned). The kernel must be
  the params leaf itself (the tap matches calls to leaves by identity), its
  leading axes contracted with ``rows`` and its trailing axes the last
  ``out_axes`` axes of the output.

  Args:
    kind: the :class:`LayerKind`.

  Returns:
    ``kind``.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import optax_layerwise as olw
    >>> class Bilinear(nn.Module):  # y = x @ kernel, written by hand
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     kernel = self.param('kernel', nn.initializers.lecun_normal(),
    ...                         (x.shape[-1], 3))
    ...     return x @ kernel
    >>> def adapter(module, args, kwargs, y):
    ...   x = args[0]
    ...   return olw.LayerCall(
    ...       rows=x.reshape(-1, x.shape[-1]), outputs=y, out_axes=1,
    ...       kernel=module.get_variable('params', 'kernel'), bias=None)
    >>> _ = olw.register_layer_kind(olw.LayerKind(
    ...     name='bilinear', linen_types=lambda cls=Bilinear: (cls,),
    ...     nnx_types=lambda: (), adapter=adapter))
    >>> x = jnp.ones((4, 2))
    >>> params = Bilinear().init(jax.random.PRNGKey(0), x)['params']
    >>> loss = lambda p: jnp.sum(Bilinear().apply({'params': p}, x) ** 2)
    >>> olw.kbfgs_coverage(loss, params).leaves[0].kind
    'bilinear'
  """
  if (kind.adapter is None) == (kind.rewrite is None):
    raise ValueError(f"register_layer_kind: the kind {kind.name!r} needs "
                     "exactly one of `adapter` and `rewrite`.")
  _KINDS[kind.name] = kind
  return kind


def layer_kinds() -> tuple:
  """The registered kinds, in registration order."""
  return tuple(_KINDS.values())


# --- Finding the kernels in the params -------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """Static description of one layer K-BFGS keeps factors for.

  Attributes:
    name: key path of the layer (the kernel's parent node).
    kernel_index: flatten index of the kernel leaf in the params.
    bias_index: flatten index of its bias leaf, or ``None``.
    d_in: rows of the kernel matrix (product of the contracted axes).
    d_out: columns (product of the output axes).
    slice: for a kernel stacked by ``nn.scan`` (leading axes, one slice per
      layer of the stack), the index of this layer's slice; ``()`` else.
  """
  name: str
  kernel_index: int
  bias_index: Optional[int]
  d_in: int
  d_out: int
  slice: tuple = ()

  @property
  def k(self) -> int:
    """Size of ``H_a``: ``d_in``, plus one for the bias."""
    return self.d_in + (self.bias_index is not None)


def key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


_NOT_KERNELS = ("bias", "scale", "mean", "var")


def _default_selects(path: tuple, leaf) -> bool:
  """Every kernel but embeddings (whose rows are looked up, not applied)."""
  del leaf
  return "embed" not in key_name(path[-1]).lower() if path else True


def _is_kernel(path: tuple, leaf) -> bool:
  """2-D float leaves but biases and norm statistics (also stacked by
  ``nnx.vmap`` / ``nn.scan``), and named ``kernel`` leaves of higher rank."""
  if path and key_name(path[-1]) in _NOT_KERNELS:
    return False
  if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
    return False
  if jnp.ndim(leaf) == 2:
    return True
  return jnp.ndim(leaf) > 2 and bool(path) and key_name(path[-1]) == "kernel"


def _stack_and_split(path: tuple, shape: tuple,
                     bias_shape: Optional[tuple]) -> tuple[int, int]:
  """How many leading kernel axes stack layers (``nn.scan`` over layers),
  and how many of the others are contracted with the input.

  A stacked kernel ``(L, *contracted, *outputs)`` has a stacked bias ``(L,
  *outputs)``: the leading axes they share, with the rest of the bias
  matching the kernel's trailing axes, are stack axes (none when the bias
  matches without them). Without a bias nothing is read as stacked: the tap
  then finds a stacked call and asks for a ``dense_layers`` predicate
  returning ``(stacked axes, contracted axes)``.
  """
  if bias_shape is not None:
    for stack in range(len(bias_shape)):
      if tuple(shape[:stack]) != tuple(bias_shape[:stack]):
        break
      inner, inner_bias = tuple(shape[stack:]), tuple(bias_shape[stack:])
      for split in range(len(inner) - 1, 0, -1):
        if inner[split:] == inner_bias:
          return stack, split
  return 0, _split_without_bias(path, shape)


def _split_without_bias(path: tuple, shape: tuple) -> int:
  """How many leading kernel axes are contracted with the input, for a
  kernel whose bias does not settle it (:func:`_stack_and_split`).

  A kernel of rank 4 or 5, or under a key containing ``"conv"``, is a
  convolution's ``(*window, c_in, c_out)`` (one output axis); a rank-3
  kernel takes the split whose matrix is closest to square (attention's
  projections ``(d, heads, head_dim)`` and ``(heads, head_dim, d)``, and
  1-D convolutions), the fewest contracted axes on a tie. The tap checks
  the guess against every call; a ``dense_layers`` predicate returning the
  number of contracted axes overrides it.
  """
  ndim = len(shape)
  if ndim == 2:
    return 1
  if ndim > 3 or any("conv" in key_name(k).lower() for k in path):
    return ndim - 1

  def imbalance(split):
    d_in, d_out = math.prod(shape[:split]), math.prod(shape[split:])
    return max(d_in, d_out) / max(min(d_in, d_out), 1)

  return min(range(1, ndim), key=lambda s: (imbalance(s), s))


def _bias_of(index: int, paths: list, leaves: list) -> Optional[int]:
  """The sibling ``bias`` (or ``b``) leaf of a kernel, if any."""
  parent = paths[index][:-1]
  candidates = [j for j, p in enumerate(paths)
                if j != index and p[:-1] == parent
                and key_name(p[-1]) in ("bias", "b") and jnp.ndim(leaves[j])]
  named = [j for j in candidates if key_name(paths[j][-1]) == "bias"]
  return (named or candidates or [None])[0]


def find_kernels(params: PyTree, select=None) -> tuple:
  """The static list of layers to keep factors for, from the params alone.

  Args:
    params: the params (or their shapes).
    select: ``(path, leaf) -> bool | int | (int, int)`` on the kernels' key
      paths: falsy excludes the leaf, an ``int`` (not ``bool``) gives the
      number of contracted leading axes, a pair ``(stacked, contracted)``
      also the number of leading axes stacking layers (``nn.scan``).
      Default: every kernel whose key does not contain ``"embed"``.

  Returns:
    A tuple of :class:`LayerSpec`, in flatten order.
  """
  with_path, _ = jax.tree_util.tree_flatten_with_path(params)
  paths = [_layers.strip_variable_keys(p) for p, _ in with_path]
  leaves = [leaf for _, leaf in with_path]
  select = _default_selects if select is None else select
  specs = []
  for i, (path, leaf) in enumerate(zip(paths, leaves)):
    if not path or not _is_kernel(path, leaf):
      continue
    chosen = select(path, leaf)
    if not chosen:
      continue
    bias = _bias_of(i, paths, leaves)
    bias_shape = None if bias is None else tuple(jnp.shape(leaves[bias]))
    shape = tuple(jnp.shape(leaf))
    stack, split = _chosen_split(chosen, path, shape, bias_shape)
    stacked, shape = shape[:stack], shape[stack:]
    d_in, d_out = math.prod(shape[:split]), math.prod(shape[split:])
    if bias is not None and math.prod(bias_shape) != d_out * math.prod(
        stacked):
      bias = None  # a sibling of another shape is not this kernel's bias
    parent = path[:-1]
    name = jax.tree_util.keystr(parent if parent else path)
    for index in itertools.product(*[range(n) for n in stacked]):
      label = name + "".join(f"[{j}]" for j in index)
      specs.append(LayerSpec(label, i, bias, d_in, d_out, index))
  return tuple(specs)


def _chosen_split(chosen, path, shape, bias_shape) -> tuple[int, int]:
  """``(stacked axes, contracted axes)``: the ``select`` predicate's answer
  (an ``int``: contracted axes; a pair: both) or the guess from the shapes."""
  if isinstance(chosen, tuple):
    return int(chosen[0]), int(chosen[1])
  if isinstance(chosen, int) and not isinstance(chosen, bool):
    return 0, chosen
  return _stack_and_split(path, shape, bias_shape)
