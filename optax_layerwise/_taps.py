"""Layer taps: dense-layer inputs and pre-activation gradients of a loss.

K-BFGS needs, for every dense layer ``h = a @ W + b``, statistics of the
layer's inputs ``a`` and of the gradient of the loss with respect to its
pre-activations ``h``. Neither is in the params or the gradient, so
:func:`tap_dense_layers` re-runs the user's ``value_fn`` with every dense layer
*tapped*: a tapped layer

* records its input (rows flattened: ``(..., d_in) -> (n, d_in)``, so
  sequence or spatial dims join the batch of examples), and
* adds a zero perturbation ``e`` of shape ``(d_out,)`` to its output,
  ``h + e``, so that ``dL/de = sum_rows dL/dh``: the summed pre-activation
  gradient (Flax's ``Module.perturb`` trick). One ``jax.vjp`` gives it for all
  layers at once, together with the params gradient.

K-BFGS only ever uses the *means* over examples of ``h`` and of ``gh_i = n
dL/dh_i`` (docs/kbfgs.md), so a ``(d_out,)`` perturbation suffices:
it costs no memory per example, and ``mean_i gh_i = dL/de`` exactly.

Supported layers, with no change to the model:

* Flax linen ``nn.Dense`` (and subclasses), through
  :func:`flax.linen.intercept_methods`;
* Flax NNX ``nnx.Linear`` (and subclasses), by wrapping ``nnx.Linear.__call__``
  only while the tap runs;
* plain JAX: call :func:`dense` for the layer (``dense(x, kernel, bias)``
  computes ``x @ kernel + bias`` and is tapped when a tap runs).

A tapped call is matched to its params leaf by the *identity* of the kernel
array inside the trace (each params leaf is a distinct tracer of the
``jax.vjp``), not by call order, so layers may be called in any order, several
times (weight sharing: the rows of all calls are pooled), or not at all.
Calls whose kernel is not a params leaf (frozen weights closed over by
``value_fn``, or calls inside a ``jax.jit`` / ``jax.lax.scan`` nested in
``value_fn``, which re-trace the kernel) are left untapped, except linen
layers inside ``nn.scan`` / ``nn.RNN`` / ``nn.remat``: those are matched by
their scope path and their statistics leave the inner trace through shadow
leaves (:mod:`optax_layerwise._shadows`), summed over a broadcast cell's
steps, one set per slice of a scanned stack (leading axes of the
statistics).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from optax_layerwise import _checks
from optax_layerwise import _kind_conv  # pylint: disable=unused-import
from optax_layerwise import _kind_dense
from optax_layerwise import _kind_einsum  # pylint: disable=unused-import
from optax_layerwise import _kind_lstm  # pylint: disable=unused-import
from optax_layerwise import _layer_kinds
from optax_layerwise import _layers
from optax_layerwise import _parallel
from optax_layerwise import _row_samples
from optax_layerwise import _shadows

PyTree = Any

__all__ = ["dense", "DenseTap", "TapResult", "tap_dense_layers",
           "SUPPORTED_LAYERS"]

SUPPORTED_LAYERS = ("flax.linen.Dense", "flax.linen.DenseGeneral",
                    "flax.linen.Einsum", "flax.linen.Conv",
                    "flax.linen.OptimizedLSTMCell",
                    "linen layers inside nn.scan / nn.RNN / nn.remat",
                    "flax.nnx.Linear",
                    "flax.nnx.LinearGeneral", "flax.nnx.Einsum",
                    "flax.nnx.Conv", "optax_layerwise.dense (plain JAX)",
                    "kinds added with optax_layerwise.register_layer_kind")

_NESTED = ("called only inside a transform nested in value_fn that is not "
           "a Flax linen transform (jax.lax.scan, jax.checkpoint, nnx.scan): "
           "its statistics cannot leave that trace")

_NO_SHADOW = ("called inside nn.scan / nn.RNN, but no shadow leaf reached it "
              "to carry its statistics out")
_SHADOW_NEEDS = (": its params must come from the params given to value_fn "
                 "as nested dicts, unchanged (no cast or copy in value_fn)")

# The stack of active tap contexts. It is empty outside `tap_dense_layers`;
# a lock serialises the (trace-time only) patching of `nnx.Linear`.
_CONTEXTS: list = []
_PATCH_LOCK = threading.RLock()


class UntappableLayer(ValueError):
  """A layer call the tap cannot read (a kernel shared with another bias,
  outputs that do not match the kernel's guessed axes, a kernel both
  scanned and called directly): K-BFGS and ``precondition="inputs"`` raise
  it; the aliases' ``precondition="auto"`` skips the input factor."""


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["input_mean", "input_second_moment", "output_mean",
                 "output_grad", "sampled_grad", "second_moment_mean",
                 "output_grad_second_moment"],
    meta_fields=["name", "num_rows", "kernel_index", "bias_index", "kind"])
@dataclasses.dataclass(frozen=True)
class DenseTap:
  """What one tapped dense layer saw (statistics dtype: float32 or float64).

  A pytree whose leaves are the arrays; the rest is static, so it can be
  returned from ``jax.jit``.

  Attributes:
    input_mean: ``(d_in,)`` mean input ``mean_i a_i``.
    input_second_moment: ``(d_in, d_in)`` ``mean_i a_i a_i^T``, or ``None``
      when not requested.
    output_mean: ``(d_out,)`` mean pre-activation ``mean_i h_i``.
    output_grad: ``(d_out,)`` ``sum_i dL/dh_i`` (``= mean_i gh_i`` with ``gh_i
      = n dL/dh_i``; equals the bias gradient).
    name: key path of the kernel leaf, e.g. ``"['Dense_0']['kernel']"``.
    num_rows: number of examples ``n`` (all leading dims of all calls);
      ``0`` for a layer called inside ``nn.scan`` / ``nn.RNN``, whose row
      count is only known at run time (the means are exact either way).
    kernel_index: flatten index of the kernel leaf in the params.
    bias_index: flatten index of the bias leaf, or ``None``.
    kind: the layer kind that tapped the calls (``"dense"``, ``"conv"``).
    sampled_grad: with ``sampled_grads=s``, the gradients of ``W`` (as a
      ``(d_in, d_out)`` matrix) and of ``b`` (``(d_out,)``, whether or not
      the layer has one) estimated from every ``s``-th row of each call
      (:mod:`optax_layerwise._row_samples`); else, and for calls inside
      ``nn.scan`` / ``nn.RNN``, ``None``.
    second_moment_mean: ``(d_in,)`` the mean of the rows
      ``input_second_moment`` was formed from (every
      ``second_moment_stride``-th row; ``input_mean`` itself for all rows),
      or ``None`` (not requested, or calls inside ``nn.scan`` / ``nn.RNN``,
      which form it from all rows).
    output_grad_second_moment: with ``output_second_moment=s``, ``(d_out,)``
      ``mean_i gh_i * gh_i``, estimated from every ``s``-th row of each
      call; else, and for calls inside ``nn.scan`` / ``nn.RNN`` /
      ``nn.remat``, ``None``.
  """
  input_mean: jax.Array
  input_second_moment: Optional[jax.Array]
  output_mean: jax.Array
  output_grad: jax.Array
  name: str
  num_rows: int
  kernel_index: int
  bias_index: Optional[int]
  kind: str = "dense"
  sampled_grad: Optional[tuple] = None
  second_moment_mean: Optional[jax.Array] = None
  output_grad_second_moment: Optional[jax.Array] = None


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["loss", "grads", "layers"],
    meta_fields=["num_untapped_calls", "unsupported"])
@dataclasses.dataclass(frozen=True)
class TapResult:
  """Result of :func:`tap_dense_layers` (a pytree; jit-returnable).

  Attributes:
    loss: ``value_fn(params)``.
    grads: its gradient (params' structure), or ``None`` if not requested.
    layers: ``{kernel leaf index: DenseTap}`` for every tapped layer.
    num_untapped_calls: layer calls whose kernel was not a params leaf.
    unsupported: ``((kernel index, reason), ...)`` for tapped kernels whose
      calls their kind cannot precondition (e.g. a grouped convolution).
  """
  loss: jax.Array
  grads: Optional[PyTree]
  layers: dict
  num_untapped_calls: int
  unsupported: tuple = ()


@dataclasses.dataclass
class _Record:
  kernel_index: int
  bias_index: Optional[int]
  kind: str
  num_rows: int = 0
  sum_x: Any = None
  sum_xx: Any = None
  sum_y: Any = None
  sum_xs: Any = None  # the sum of the rows sum_xx is formed from


@dataclasses.dataclass(frozen=True)
class _Nested:
  """A tapped kernel called inside a nested transform."""
  path: tuple  # key names of the kernel leaf
  stack: tuple  # leading axes the transform slices (nn.scan over layers)
  layout: _shadows.Layout
  kind: str
  bias_index: Optional[int]


@dataclasses.dataclass(frozen=True)
class Location:
  """Where a linen layer's params live: its scope path and params dict."""
  path: tuple
  params: Any


def _suffix_index(paths) -> dict:
  """``{path suffix: [leaf indices]}`` over every suffix of every leaf's
  path: a module's scope path finds its params whether ``value_fn``
  receives the params or the whole variables dict (paths starting with
  ``'params'``), or one of several subtrees."""
  owners: dict = {}
  for i, path in enumerate(paths):
    for start in range(len(path)):
      owners.setdefault(tuple(path[start:]), []).append(i)
  return owners


def _ancestors(trace) -> list:
  """``trace`` and the traces it was opened in (``parent_trace`` chain)."""
  chain = []
  while trace is not None and not any(trace is t for t in chain):
    chain.append(trace)
    trace = getattr(trace, "parent_trace", None)
  return chain


def linen_location(module) -> Optional[Location]:
  """The :class:`Location` of a bound linen module (``None`` for NNX)."""
  scope = getattr(module, "scope", None)
  if scope is None or not hasattr(module, "get_variable"):
    return None
  return Location(tuple(scope.path), module.variables.get("params", {}))


def _trace_of(x):
  """The JAX trace a value belongs to (``None`` for concrete arrays)."""
  return getattr(x, "_trace", None)


class _Context:
  """One active tap: kernel identities, perturbations, and the records."""

  def __init__(self, leaves, perts, want_second_moment, stats_dtype,
               paths=(), nested=None, slots=None, samplings=None,
               square_slots=None):
    """``nested``: the first pass's finds, given to the shadow pass;
    ``slots``: the sampled gradients' zero inputs (``{index: ((d_in,
    d_out), (d_out,))}``); ``square_slots``: the output gradients' second
    moments' (``{index: (d_out,)}``); ``samplings``: the rows of the second
    moment, the sampled gradients and the output gradients' second moment
    (:class:`_row_samples.Sampling`)."""
    self.kernel_pos = {id(leaves[index]): index for index in perts}
    self.leaf_index = {id(leaf): i for i, leaf in enumerate(leaves)}
    self.paths = list(paths)
    self.shapes = [jnp.shape(leaf) for leaf in leaves]
    self.shadows_on = bool(nested)
    self.nested: dict = dict(nested or {})
    self.emitted: set = set()
    self.own_traces = _ancestors(_trace_of(next(iter(perts.values()))) if (
        perts) else None)
    self.perts = perts
    self.want_second_moment = want_second_moment
    self.stats_dtype = stats_dtype
    self.slots = slots or {}
    self.square_slots = square_slots or {}
    self.gram_rows, self.grad_rows, self.square_rows = samplings or (
        (_row_samples.Sampling(),) * 3)
    self.records: dict = {}
    self.untapped = 0
    self.untapped_kernels: set = set()
    self.hooked: set = set()
    self.unhooked: set = set()
    self.square_hooked: set = set()
    self.unsupported: dict = {}

  @property
  def sampled(self) -> set:
    """The layers whose every call gave its sampled gradient (not those
    also called in a nested transform, which has no hook)."""
    return self.hooked - self.unhooked - set(self.nested)

  @property
  def squared(self) -> set:
    """The layers whose every call gave its output gradients' squares."""
    return self.square_hooked - self.untapped_kernels - set(self.nested)

  @functools.cached_property
  def path_index(self) -> dict:
    """Leaves by path suffix, built on the first nested call only."""
    return _suffix_index(self.paths)

  def skip(self, kernel, reason: str) -> None:
    """A call of a tapped kernel that its kind cannot precondition."""
    index = self.kernel_pos.get(id(kernel))
    if index is None:
      self.untapped += 1
    else:
      self.unsupported[index] = reason

  def record(self, call: _layer_kinds.LayerCall, kind: str = "dense",
             location: Optional[Location] = None):
    """Accumulates one call's statistics; returns its perturbed output."""
    y = call.outputs
    index = self.kernel_pos.get(id(call.kernel))
    if index is None or _trace_of(y) is not _trace_of(self.perts[index]):
      # Not a params leaf: frozen weights, params cast or copied in value_fn
      # (untapped), or a call inside a transform nested in value_fn (nn.scan,
      # nn.RNN, nn.remat), whose values live in an inner trace and may not
      # leave it but by a shadow.
      out = self._record_nested(call, kind, location)
      if out is not None:
        return out
      if index is not None:
        self.untapped_kernels.add(index)
        self.unhooked.add(index)  # its sampled gradient would miss this call
      self.untapped += 1
      return y
    bias_index = None if call.bias is None else self.leaf_index.get(
        id(call.bias))
    out_shape = self._out_shape(index, call)
    pert = self.perts[index]
    rec = self.records.get(index)
    if rec is None:
      rec = self.records[index] = _Record(index, bias_index, kind)
    elif rec.bias_index != bias_index:
      raise UntappableLayer(
          "A layer was called several times with different biases "
          f"(leaf {index}); give each call its own layer.")
    positions = math.prod(y.shape[1:y.ndim - call.out_axes])
    self._accumulate(rec, call.rows, y.reshape(-1, pert.shape[0]), positions)
    y = self._sample_gradient(index, call.rows, y, positions)
    y = self._square_gradient(index, y, positions)
    if y.dtype == pert.dtype:
      return y + pert.reshape(out_shape)
    # Add in the statistics dtype so the summed cotangent stays accurate.
    return (y.astype(pert.dtype) + pert.reshape(out_shape)).astype(y.dtype)

  def _sample_gradient(self, index: int, rows, y, positions: int):
    """``y`` hooked so that the backward pass gives the layer's sampled
    gradient to its slot (if one was asked for and fits the rows)."""
    slot = self.slots.get(index)
    if slot is None or slot[0].shape[0] != rows.shape[1]:
      self.unhooked.add(index)
      return y
    self.hooked.add(index)
    stride = self.grad_rows.stride_for(rows, positions)
    flat = _row_samples.gradient_hook(
        stride, y.reshape(-1, slot[1].shape[0]),
        rows.astype(self.stats_dtype), slot)
    return flat.reshape(y.shape)

  def _square_gradient(self, index: int, y, positions: int):
    """``y`` hooked so that the backward pass gives the sum of its rows'
    squared cotangents to the layer's slot (if one was asked for)."""
    slot = self.square_slots.get(index)
    if slot is None:
      return y
    self.square_hooked.add(index)
    flat = y.reshape(-1, slot.shape[0])
    stride = self.square_rows.stride_for(flat, positions)
    return _row_samples.square_hook(stride, flat, slot).reshape(y.shape)

  def _out_shape(self, index: int, call: _layer_kinds.LayerCall,
                 stacked: int = 0) -> tuple:
    """The call's output axes, checked against the kernel's ``d_out``
    (``stacked``: leading axes of the leaf the call sees sliced off)."""
    y = call.outputs
    out_shape = y.shape[y.ndim - call.out_axes:]
    d_out = self.perts[index].shape[0]
    if math.prod(out_shape) != d_out:
      how = (f"({stacked}, number of contracted axes): it is a stack of "
             f"{self.shapes[index][:stacked]} layers scanned by nn.scan"
             if stacked else "the number of contracted leading kernel axes")
      raise UntappableLayer(
          f"The layer with kernel leaf {index} (shape {self.shapes[index]}) "
          f"was called with {math.prod(out_shape)} outputs per row, but "
          f"{d_out} were expected from the params: its kernel's axes were "
          "guessed wrong. Pass kbfgs a `dense_layers` predicate returning, "
          f"for this leaf, {how}.")
    return out_shape

  def _is_inner(self, value) -> bool:
    """A tracer of a trace opened inside the tap's (a nested transform's),
    not a concrete array or a tracer of the tap's or an enclosing trace
    (a call on frozen weights or a cast of the params, in value_fn)."""
    trace = _trace_of(value)
    return trace is not None and not any(trace is t for t in self.own_traces)

  def _record_nested(self, call, kind, location) -> Optional[jax.Array]:
    """A linen call in a nested transform: its statistics leave by the
    shadow beside its kernel. The first pass finds the kernel leaves it may
    be (by scope path and shape); the shadow pass reads the shadow its
    module received. ``None``: not such a call, or no shadow reached it."""
    if location is None or not self._is_inner(call.outputs):
      return None
    if not self.shadows_on:
      self._find_nested(call, kind, location)
      return call.outputs
    found = _shadows.find(location.params)
    if found is None or found[0] not in self.nested:
      return None
    index, shadow = found
    info = self.nested[index]
    if shadow.dtype != self.stats_dtype:
      return None  # params cast in value_fn: statistics would lose precision
    self.emitted.add(index)
    want = self.want_second_moment
    spec = _shadows.Emit(
        info.layout, self.stats_dtype, _all_rows_gram,
        static_want=want if isinstance(want, bool) else None,
        in_backward=call.rows.shape[0] <= info.layout.d_in)
    return _shadows.emit(spec, shadow, call.rows, call.outputs,
                         jnp.asarray(want, self.stats_dtype))

  def _find_nested(self, call, kind, location) -> None:
    """First pass: records every tapped kernel leaf this call may use."""
    ndim = call.kernel.ndim
    for index in self.path_index.get(location.path + ("kernel",), ()):
      shape = self.shapes[index]
      if index not in self.perts or tuple(shape[len(shape) - ndim:]) != (
          call.kernel.shape):
        continue
      stack = tuple(shape[:len(shape) - ndim])
      self._out_shape(index, call, len(stack))
      bias_path = self.paths[index][:-1] + ("bias",)
      bias = self.paths.index(bias_path) if (
          call.bias is not None and bias_path in self.paths) else None
      layout = _shadows.Layout(call.rows.shape[1], self.perts[index].shape[0],
                               self.want_second_moment is not False)
      self.nested[index] = _Nested(self.paths[index], stack, layout, kind,
                                   bias)

  def _accumulate(self, rec: _Record, rows, out, positions: int) -> None:
    rows, out = rows.astype(self.stats_dtype), out.astype(self.stats_dtype)
    sum_x = jnp.sum(rows, axis=0)
    sum_y = jnp.sum(out, axis=0)
    # A kernel also called in a nested transform: all rows, like those.
    sampling = _row_samples.Sampling() if rec.kernel_index in self.nested else (
        self.gram_rows)
    sum_xx, sum_xs = _second_moment(rows, self.want_second_moment,
                                    sampling, positions) or (None, None)
    if rec.num_rows:
      if sum_xx is not None:
        sum_xs = _add_sampled_sums(rec, sum_x, sum_xs)
        sum_xx = rec.sum_xx + sum_xx
      sum_x = rec.sum_x + sum_x
      sum_y = rec.sum_y + sum_y
    rec.num_rows += rows.shape[0]
    rec.sum_x, rec.sum_y, rec.sum_xx, rec.sum_xs = sum_x, sum_y, sum_xx, sum_xs


def gram(rows: jax.Array, block: int = 192) -> jax.Array:
  """``rows^T rows``, computing only the blocks on and above the diagonal.

  The Gram matrix is symmetric, so for ``d > block`` the columns are cut into
  ``b`` blocks and ``b (b + 1) / 2`` of the ``b^2`` block products are formed
  (about 60 % of the flops of ``rows.T @ rows`` for ``d ~ 1000``); the blocks
  below the diagonal are exact transposes of those above.

  With the rows sharded over an explicit mesh axis (``jax.make_mesh``'s
  default ``AxisType.Explicit``, batch sharded under ``jax.jit``) the
  product contracts a sharded dimension, so its sharding is given: the
  replicated ``(d, d)`` matrix (XLA all-reduces the per-shard products).
  """
  d = rows.shape[1]
  matmul = _row_samples.rows_matmul(rows)
  edges = list(range(0, d, block)) + [d]
  if len(edges) > 2 and edges[-1] - edges[-2] < block // 2:
    edges.pop(-2)  # merge a small last block into its neighbour
  if len(edges) <= 2:
    return matmul(rows.T, rows)
  parts = [rows[:, a:b] for a, b in zip(edges[:-1], edges[1:])]
  grid = [[None] * len(parts) for _ in parts]
  for i, left in enumerate(parts):
    for j in range(i, len(parts)):
      grid[i][j] = matmul(left.T, parts[j])
      if j > i:
        grid[j][i] = grid[i][j].T
  return jnp.block(grid)


def _add_sampled_sums(rec: _Record, call_sum, sum_xs):
  """The sum of the rows behind the second moment, over the calls so far
  (``None`` while every call used all its rows, whose sum is ``sum_x``)."""
  if rec.sum_xs is None and sum_xs is None:
    return None
  before = rec.sum_x if rec.sum_xs is None else rec.sum_xs
  return before + (call_sum if sum_xs is None else sum_xs)


def _second_moment(rows: jax.Array, want, sampling=_row_samples.Sampling(),
                   positions: int = 1) -> Optional[tuple]:
  """``(rows^T rows, sum of rows)`` from ``sampling``'s rows, scaled
  (:func:`_row_samples.second_moment`; ``positions`` rows per example), if
  ``want`` (a bool, or a traced bool computed under ``lax.cond`` so that
  skipped steps cost nothing), else ``None``."""
  sampled = functools.partial(_row_samples.second_moment, gram,
                              sampling=sampling, positions=positions)
  if isinstance(want, bool):
    return sampled(rows) if want else None
  d = rows.shape[1]
  zero_sum = None if sampling.stride_for(rows, positions) == 1 else (
      jnp.zeros((d,), rows.dtype))
  return jax.lax.cond(want, sampled, lambda r: (
      jnp.zeros((d, d), r.dtype), zero_sum), rows)


def _all_rows_gram(rows: jax.Array, want) -> Optional[jax.Array]:
  """``rows^T rows`` of all rows if ``want`` (the calls inside nested
  transforms: their shadows carry no sampled rows' mean)."""
  out = _second_moment(rows, want)
  return None if out is None else out[0]


def dense(x: jax.Array, kernel: jax.Array,
          bias: Optional[jax.Array] = None, *,
          precision=None) -> jax.Array:
  """A dense layer ``x @ kernel + bias`` that K-BFGS can tap (plain JAX).

  Outside a tap this is just the affine map over the last axis of ``x``.
  Inside :func:`tap_dense_layers` (hence inside :func:`optax_layerwise.kbfgs`)
  the call records its input and perturbs its output. Pass the params leaves
  themselves (``p['kernel']``, not a cast or reshaped copy): the call is
  matched to its params leaf by identity.

  Args:
    x: ``(..., d_in)`` inputs.
    kernel: ``(d_in, d_out)`` weights.
    bias: ``(d_out,)`` bias or ``None``.
    precision: passed to :func:`jax.lax.dot_general`.

  Returns:
    ``(..., d_out)`` pre-activations.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_layerwise as olw
    >>> p = {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)}
    >>> olw.dense(jnp.ones((4, 3)), p['kernel'], p['bias']).shape
    (4, 2)
  """
  if kernel.ndim != 2:
    raise ValueError(
        f"dense: kernel must be (d_in, d_out), got shape {kernel.shape}.")
  call = _affine(x, kernel, bias, precision=precision)
  if not _CONTEXTS:
    return call.outputs
  return _CONTEXTS[-1].record(call)


def _affine(x, kernel, bias, *, precision=None,
            dtype=None) -> _layer_kinds.LayerCall:
  """``x @ kernel + bias`` over the last axis of ``x`` (in ``dtype`` if
  given), as a :class:`LayerCall` on the uncast leaves."""
  cast = (lambda a: a) if dtype is None else (lambda a: a.astype(dtype))
  y = jax.lax.dot_general(x, cast(kernel), (((x.ndim - 1,), (0,)), ((), ())),
                          precision=precision)
  if bias is not None:
    y = y + cast(bias)
  return _layer_kinds.LayerCall(x.reshape(-1, kernel.shape[0]), y, 1, kernel,
                                bias)


# --- Flax adapters ---------------------------------------------------------


def _tapped_call(kind, module, args, kwargs, y):
  """Records one call of a module of ``kind``; returns its output."""
  call = kind.adapter(module, args, kwargs, y)
  if isinstance(call, str):
    _CONTEXTS[-1].skip(_kind_dense.kernel_and_bias(module)[0], call)
    return y
  return _CONTEXTS[-1].record(call, kind.name, linen_location(module))


def _sublayer_dense(kind, module):
  """``dense(x, name, dtype=None)``: the tapped dense layer of ``module``'s
  sub-module ``name`` (for a kind's ``rewrite``), computed in ``dtype``."""
  location = linen_location(module)

  def dense(x, name, dtype=None):
    sub = Location(location.path + (name,), location.params[name])
    bias = sub.params.get("bias")
    call = _affine(x, _kind_dense.unbox(sub.params["kernel"]),
                   None if bias is None else _kind_dense.unbox(bias),
                   dtype=dtype)
    return _CONTEXTS[-1].record(call, kind.name, sub)

  return dense


def _linen_interceptor(next_fun, args, kwargs, context):
  if not _CONTEXTS or context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  for kind in _layer_kinds.layer_kinds():
    if isinstance(context.module, kind.linen_types()):
      if kind.rewrite is not None:
        out = kind.rewrite(context.module, args, kwargs,
                           _sublayer_dense(kind, context.module))
        if not isinstance(out, str):
          return out
        _CONTEXTS[-1].untapped += 1  # the reason: docs/kbfgs.md
        return next_fun(*args, **kwargs)
      y = next_fun(*args, **kwargs)
      return _tapped_call(kind, context.module, args, kwargs, y)
  return next_fun(*args, **kwargs)


def _nnx_classes() -> list:
  """``(kind, class)`` for the NNX classes of every kind that define their
  own ``__call__``."""
  try:
    from flax import nnx  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:  # pragma: no cover
    return []
  return [(kind, cls) for kind in _layer_kinds.layer_kinds()
          for cls in kind.nnx_types() if "__call__" in cls.__dict__]


@contextlib.contextmanager
def _nnx_patched():
  """Wraps the NNX layers' ``__call__`` for the duration of the tap."""
  with _PATCH_LOCK:
    originals = []
    for kind, cls in _nnx_classes():
      original = cls.__dict__["__call__"]

      def tapped_call(self, *args, _kind=kind, _original=original, **kwargs):
        y = _original(self, *args, **kwargs)
        return _tapped_call(_kind, self, args, kwargs, y)

      tapped_call.__wrapped__ = original
      originals.append((cls, original))
      cls.__call__ = tapped_call
    try:
      yield
    finally:
      for cls, original in originals:
        cls.__call__ = original


@contextlib.contextmanager
def _tapping(ctx: _Context):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  _CONTEXTS.append(ctx)
  try:
    with nn.intercept_methods(_linen_interceptor), _nnx_patched():
      yield
  finally:
    _CONTEXTS.pop()


# --- The tap ---------------------------------------------------------------


def candidate_kernels(params: PyTree) -> list:
  """Flatten indices of the leaves that could be dense kernels (2-D floats)."""
  leaves = jax.tree_util.tree_leaves(params)
  return [i for i, leaf in enumerate(leaves)
          if jnp.ndim(leaf) == 2 and jnp.issubdtype(leaf.dtype, jnp.floating)]


def tap_dense_layers(
    value_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    *,
    kernels: Optional[list] = None,
    second_moment: bool = True,
    with_grads: bool = True,
    axis_name: Optional[_parallel.AxisName] = None,
    local_grads: bool = False,
    second_moment_stride: Union[int, tuple] = 1,
    sampled_grads: Union[None, int, tuple] = None,
    output_second_moment: Union[None, int, tuple] = None,
) -> TapResult:
  """Runs ``value_fn(params)`` once with every dense layer tapped.

  One forward pass and one ``jax.vjp`` give the loss, its params gradient and,
  per dense layer, the input statistics and the summed pre-activation
  gradient. Under ``jax.jit``, unrequested outputs (``with_grads=False``) are
  removed by XLA, leaving a forward pass plus the backward pass through the
  activations only.

  Args:
    value_fn: the mini-batch loss, a function of the params alone (a mean over
      examples), whose dense layers are ``nn.Dense``, ``nnx.Linear`` or
      :func:`dense` calls on the params leaves.
    params: the params.
    kernels: flatten indices of the leaves to tap (default: every 2-D float
      leaf), or ``{index: d_out}`` for kernels of higher rank, ``d_out``
      being the product of their output axes.
    second_moment: also return ``mean_i a_i a_i^T`` (``O(n d_in^2)``); a
      traced boolean scalar computes it under :func:`jax.lax.cond` (zeros
      when ``False``).
    with_grads: also return the params gradient.
    local_grads: with ``axis_name``, return this device's params gradient
      (and sampled gradients) without averaging it (for callers that
      average only the few numbers they derive from it, linearly).
    second_moment_stride: form ``mean_i a_i a_i^T`` from every this-many-th
      row of each call (:mod:`optax_layerwise._row_samples`; 1: all rows),
      or from a ``(stride, min_rows[, min_sample])`` tuple: calls with fewer
      rows use all, and the stride is lowered to keep ``min_sample`` rows.
    sampled_grads: a row stride ``s`` (or such a tuple): also return
      each directly called layer's gradient estimated from every ``s``-th
      row (``DenseTap.sampled_grad``; ``None``: not).
    output_second_moment: a row stride ``s`` (or such a tuple): also return
      each directly called layer's ``mean_i gh_i * gh_i`` estimated from
      every ``s``-th row (``DenseTap.output_grad_second_moment``; ``None``:
      not).
    axis_name: under ``jax.shard_map`` / ``jax.pmap``, the data-parallel
      axis: ``value_fn`` is this device's loss (a mean over its shard, or
      that mean's ``pmean``) and the loss, gradient and every statistic
      returned are means over the axis, i.e. over the global batch when the
      shards have equal sizes (one all-reduce; ``num_rows`` stays the
      per-device count).

  Returns:
    A :class:`TapResult`.

  Raises:
    ValueError: ``value_fn`` needs to be given, or returns no float scalar.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import optax_layerwise as olw
    >>> p = {'l': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)}}
    >>> x = jnp.ones((5, 3))
    >>> def loss(p):
    ...   return jnp.mean(olw.dense(x, p['l']['kernel'], p['l']['bias']) ** 2)
    >>> res = olw.tap_dense_layers(loss, p)
    >>> res.layers[1].output_grad  # = the bias gradient
    Array([3., 3.], dtype=float32)
  """
  value_fn = _checks.require_value_fn(value_fn, transform="tap_dense_layers")
  checked = _checks.checked_value_fn(
      value_fn, "tap_dense_layers")
  with_path, _ = jax.tree_util.tree_flatten_with_path(params)
  leaves = [leaf for _, leaf in with_path]
  if kernels is None:
    kernels = candidate_kernels(params)
  dtype = _layers.stats_dtype(*[leaves[i].dtype for i in kernels]) if (
      kernels) else jnp.float32
  sizes = kernels if isinstance(kernels, dict) else {
      i: leaves[i].shape[-1] for i in kernels}
  perts = {i: jnp.zeros((d_out,), dtype) for i, d_out in sizes.items()}
  slots = {} if sampled_grads is None else {
      i: (jnp.zeros((leaves[i].size // d_out, d_out), dtype),
          jnp.zeros((d_out,), dtype)) for i, d_out in sizes.items()}
  squares = {} if output_second_moment is None else {
      i: jnp.zeros((d_out,), dtype) for i, d_out in sizes.items()}
  paths = [tuple(_layer_kinds.key_name(k)
                 for k in _layers.strip_variable_keys(path))
           for path, _ in with_path]
  run = functools.partial(_vjp_pass, checked, perts=(perts, slots, squares),
                          paths=paths, second_moment=second_moment,
                          dtype=dtype, axis_name=axis_name,
                          samplings=tuple(map(_row_samples.Sampling.of, (
                              second_moment_stride, sampled_grads or 1,
                              output_second_moment or 1))))
  out = run(params)
  found = out.ctx.nested
  injected = _shadows.insert(params, {
      i: (n.path, jnp.zeros(n.stack + (n.layout.size,), dtype))
      for i, n in found.items()}) if found else None
  cts = {}
  if injected is not None:  # again, with the nested calls' statistics
    out, cts = _shadow_pass(run, injected, out)  # leaving (the first pass:
  loss, grads, (pert_grads, sampled, squares), aux, ctx = out  # (dead code
  cts = {i: cts[i] for i in ctx.emitted}  # then)
  sampled = {i: sampled[i] for i in ctx.sampled}
  squares = {i: squares[i] for i in ctx.squared}
  if axis_name is not None:  # one all-reduce for everything that is used
    local = (grads if with_grads else None, sampled) if local_grads else None
    grads = grads if with_grads and not local_grads else None
    loss, grads, aux, pert_grads, cts, sampled, squares = (
        _parallel.global_mean((loss, grads, aux, {
            i: pert_grads[i] for i in aux}, cts, {} if local_grads else
                               sampled, squares), axis_name))
    if local is not None:
      grads, sampled = local
  return _result(loss, grads if with_grads else None, ctx, aux, pert_grads,
                 cts, with_path, (sampled, squares))


def _result(loss, grads, ctx: _Context, aux, pert_grads, cts,
            with_path, hooked) -> TapResult:
  """The :class:`TapResult` of the last pass (``hooked``: the sampled
  gradients and the output gradients' squares, by layer)."""
  sampled, squares = hooked
  layers = {index: _layer_tap(rec, aux[index], pert_grads[index],
                              with_path[index][0], sampled.get(index),
                              squares.get(index))
            for index, rec in ctx.records.items()}
  for index, ct in cts.items():
    layers[index] = _nested_tap(ctx.nested[index], ct, layers.get(index),
                                index, with_path[index][0])
  unsupported = {i: _NESTED for i in ctx.untapped_kernels
                 if i not in layers}
  unsupported.update({i: _NO_SHADOW + _SHADOW_NEEDS for i in ctx.nested
                      if i not in layers})
  unsupported.update(ctx.unsupported)
  return TapResult(loss, grads, dict(sorted(layers.items())), ctx.untapped,
                   tuple(sorted(unsupported.items())))


def _shadow_pass(run, injected, first):
  """The pass with shadows, and the shadows' cotangents; the first pass
  (nested calls untapped, with the reason) if ``value_fn`` cannot take
  the extra leaves (it maps the params with another tree, ravels them)."""
  try:
    out = run(injected, nested=first.ctx.nested)
  except (ValueError, TypeError, KeyError) as err:
    reason = (f"{_NO_SHADOW}: value_fn does not accept extra leaves in the "
              f"params ({type(err).__name__}: "
              f"{str(err).splitlines()[0][:120]})")
    first.ctx.unsupported.update({i: reason for i in first.ctx.nested})
    return first, {}
  grads, cts = _shadows.remove(out.grads)
  return out._replace(grads=grads), cts


class _Pass(NamedTuple):
  loss: jax.Array
  grads: PyTree
  pert_grads: dict
  aux: dict
  ctx: _Context


def _vjp_pass(checked, params, *, perts, paths, second_moment, dtype,
              axis_name, samplings, nested=None) -> _Pass:
  """One tapped forward pass and its ``jax.vjp`` at the loss; with
  ``nested`` (the first pass's finds), the params carry shadows. ``perts``:
  the outputs' perturbations and the sampled gradients' slots."""
  box = {}  # the context, filled while jax.vjp traces `tapped`

  def tapped(p, e):
    clean = _shadows.remove(p)[0] if nested else p
    ctx = _Context(jax.tree_util.tree_leaves(clean), e[0], second_moment,
                   dtype, paths, nested=nested, slots=e[1],
                   samplings=samplings, square_slots=e[2])
    with _tapping(ctx):
      loss = checked(p)
    box["ctx"] = ctx
    aux = {i: (r.sum_x, r.sum_xx, r.sum_y, r.sum_xs)
           for i, r in ctx.records.items()}
    return _parallel.per_device_loss(loss, axis_name), (loss, aux)

  scaled, vjp_fn, (loss, aux) = jax.vjp(
      tapped, *_parallel.local_params((params, perts), axis_name),
      has_aux=True)
  grads, pert_grads = vjp_fn(jnp.ones_like(scaled))
  return _Pass(loss, grads, pert_grads, aux, box["ctx"])


def _layer_tap(rec: _Record, sums, output_grad, path,
               sampled_grad=None, squares=None) -> DenseTap:
  """The tap of a layer called in ``value_fn``'s own trace (``squares``:
  ``sum_i g_i * g_i`` of the loss's ``g_i = dL/dh_i = gh_i / n``)."""
  sum_x, sum_xx, sum_y, sum_xs = sums
  n = rec.num_rows
  return DenseTap(
      input_mean=sum_x / n,
      input_second_moment=None if sum_xx is None else sum_xx / n,
      output_mean=sum_y / n, output_grad=output_grad,
      name=jax.tree_util.keystr(path), num_rows=n,
      kernel_index=rec.kernel_index, bias_index=rec.bias_index,
      kind=rec.kind, sampled_grad=sampled_grad,
      second_moment_mean=None if sum_xs is None else sum_xs / n,
      output_grad_second_moment=None if squares is None else squares * n)


def _nested_tap(info: _Nested, shadow_ct, direct: Optional[DenseTap],
                index: int, path) -> DenseTap:
  """The tap of a layer called in nested transforms, from its shadow's
  cotangent (sums over the calls; leading ``info.stack`` axes for a
  scanned stack), combined with its direct calls if any."""
  if direct is not None:
    if info.stack:
      raise UntappableLayer(
          f"The kernel {jax.tree_util.keystr(path)} is called both as a "
          "scanned stack and directly; give each use its own layer.")
    shadow_ct = shadow_ct + _as_sums(direct, info.layout, shadow_ct.dtype)
  means = info.layout.unpack(shadow_ct)
  return DenseTap(**means, name=jax.tree_util.keystr(path), num_rows=0,
                  kernel_index=index, bias_index=info.bias_index,
                  kind=info.kind)


def _as_sums(tap: DenseTap, layout: _shadows.Layout, dtype) -> jax.Array:
  """A direct tap written as a shadow vector of sums."""
  n = tap.num_rows
  second = tap.input_second_moment
  return layout.pack(n, tap.input_mean * n, tap.output_mean * n,
                     tap.output_grad, None if second is None else second * n,
                     dtype)


def no_tappable_layer_error(transform: str, untapped: int) -> ValueError:
  """The error for a ``value_fn`` in which no dense layer could be tapped."""
  supported = ", ".join(SUPPORTED_LAYERS)
  if untapped:
    why = (f"{untapped} layer call(s) ran, but none on a params leaf: pass "
           "the params leaves to the layers unchanged (no casts or copies in "
           "value_fn); layers called inside jax.jit / jax.lax.scan / "
           "nnx.scan nested in value_fn cannot be tapped (linen nn.scan / "
           "nn.RNN / nn.remat can).")
  else:
    why = "value_fn called no supported layer."
  return ValueError(
      f"{transform} found no layer to precondition. Supported layers: "
      f"{supported}. {why}")
