"""The fused LSTM kind: ``nn.OptimizedLSTMCell``.

The cell keeps eight dense kernels under ``nn.LSTMCell``'s names (``ii, if,
ig, io`` on the input, ``hi, hf, hg, ho`` with biases on the hidden state)
but applies each group as one concatenated matrix product, so no dense call
is there to tap. While a tap runs, the cell is computed as ``nn.LSTMCell``
writes it (the same function, Flax's docstring equations), with the eight
products as tapped dense layers; each kernel is then a dense layer of its
own whose pre-activation is its own product (K-BFGS, arXiv 2006.08877,
section 3, per layer). Inside ``nn.RNN`` the statistics of all time steps
are combined (see :mod:`optax_layerwise._shadows`).
"""

from __future__ import annotations

from optax_layerwise import _layer_kinds


def _linen_types():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return (nn.OptimizedLSTMCell,)


def _rewrite(module, args, kwargs, dense):
  """``OptimizedLSTMCell.__call__`` with its eight products tapped; a
  subclass with a ``__call__`` of its own is left alone (a reason)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  if type(module).__call__ is not nn.OptimizedLSTMCell.__call__:
    return "a subclass of nn.OptimizedLSTMCell with its own __call__"
  carry = args[0] if args else kwargs["carry"]
  inputs = args[1] if len(args) > 1 else kwargs["inputs"]
  c, h = carry
  if module.dtype is not None:
    inputs, h = inputs.astype(module.dtype), h.astype(module.dtype)
  z = {g: dense(inputs, "i" + g, module.dtype) + dense(h, "h" + g,
                                                       module.dtype)
       for g in "ifgo"}
  gate, act = module.gate_fn, module.activation_fn
  new_c = gate(z["f"]) * c + gate(z["i"]) * act(z["g"])
  new_h = gate(z["o"]) * act(new_c)
  return (new_c, new_h), new_h


KIND = _layer_kinds.register_layer_kind(_layer_kinds.LayerKind(
    name="lstm", linen_types=_linen_types, nnx_types=lambda: (),
    rewrite=_rewrite))

__all__ = ["KIND"]
