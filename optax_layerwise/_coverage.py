"""Which params K-BFGS preconditions, by which layer kind, and why not.

:func:`kbfgs_coverage` traces one tapped pass of ``value_fn`` (shapes only,
with :func:`jax.eval_shape`: nothing is computed) and reports, leaf by leaf,
the kind that Kronecker-factors it or the reason it takes the fallback
``-lr * momentum``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax

from optax_layerwise import _kbfgs
from optax_layerwise import _layer_kinds
from optax_layerwise import _layers
from optax_layerwise import _taps

PyTree = Any

__all__ = ["KBFGSCoverage", "LeafCoverage", "kbfgs_coverage"]


class LeafCoverage(NamedTuple):
  """One params leaf.

  Attributes:
    path: its key path.
    shape: its shape.
    kind: the layer kind preconditioning it (``"dense"``, ``"conv"``), or
      ``None`` for the fallback.
    reason: why it falls back (empty when preconditioned).
  """
  path: str
  shape: tuple
  kind: Optional[str]
  reason: str


class KBFGSCoverage(NamedTuple):
  """What :func:`optax_layerwise.kbfgs` does with each params leaf."""
  leaves: tuple

  @property
  def fraction(self) -> float:
    """Fraction of the parameters (scalars) that are preconditioned."""
    sizes = [(math.prod(leaf.shape), leaf.kind is not None)
             for leaf in self.leaves]
    total = sum(size for size, _ in sizes)
    return sum(size for size, kept in sizes if kept) / max(total, 1)

  def __str__(self) -> str:
    lines = [f"K-BFGS preconditions {self.fraction:.0%} of the parameters"]
    for leaf in self.leaves:
      what = leaf.kind if leaf.kind else f"fallback: {leaf.reason}"
      lines.append(f"  {leaf.path} {leaf.shape}: {what}")
    return "\n".join(lines)


_NOT_A_KERNEL = ("not a kernel (a bias without a preconditioned kernel, a "
                 "norm scale, an embedding or another non-matrix leaf)")


def traced_taps(value_fn, params, specs) -> _taps.TapResult:
  """One tapped pass of the candidate kernels ``specs``, traced with
  :func:`jax.eval_shape` (shapes only; fine inside ``jax.jit``)."""
  return jax.eval_shape(lambda p: _taps.tap_dense_layers(
      value_fn, p, kernels={s.kernel_index: s.d_out for s in specs},
      second_moment=False, with_grads=False), params)


def kbfgs_coverage(value_fn: Callable[[PyTree], Any], params: PyTree, *,
                   dense_layers=None) -> KBFGSCoverage:
  """Reports which leaves :func:`optax_layerwise.kbfgs` preconditions.

  Args:
    value_fn: the mini-batch loss, as given to ``update``.
    params: the params (arrays or shape-dtype structs).
    dense_layers: the ``dense_layers`` argument given to ``kbfgs``.

  Returns:
    A :class:`KBFGSCoverage`; ``print`` it for a table.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import optax_layerwise as olw
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     x = nn.LayerNorm()(nn.relu(nn.Conv(4, (3, 3))(x)))
    ...     return nn.Dense(1)(x.mean((1, 2)))
    >>> x = jnp.ones((2, 8, 8, 3))
    >>> params = Net().init(jax.random.PRNGKey(0), x)['params']
    >>> report = olw.kbfgs_coverage(
    ...     lambda p: jnp.mean(Net().apply({'params': p}, x)), params)
    >>> [(leaf.path, leaf.kind) for leaf in report.leaves][:3]
    [("['Conv_0']['bias']", 'conv'), ("['Conv_0']['kernel']", 'conv'), ("['Dense_0']['bias']", 'dense')]
    >>> round(report.fraction, 3)
    0.936
  """
  specs = _layer_kinds.find_kernels(params, dense_layers)
  result = traced_taps(value_fn, params, specs)
  reasons = dict(result.unsupported)
  kinds = {}
  for spec in specs:
    tap = result.layers.get(spec.kernel_index)
    for index in (spec.kernel_index, spec.bias_index):
      if index is not None:
        kinds[index] = (tap.kind, "") if tap is not None else (
            None, reasons.get(spec.kernel_index, _kbfgs.UNSEEN))
  with_path, _ = jax.tree_util.tree_flatten_with_path(params)
  return KBFGSCoverage(tuple(
      LeafCoverage(jax.tree_util.keystr(_layers.strip_variable_keys(path)),
                   tuple(jax.numpy.shape(leaf)),
                   *kinds.get(i, (None, _NOT_A_KERNEL)))
      for i, (path, leaf) in enumerate(with_path)))
