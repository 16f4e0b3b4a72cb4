"""K-BFGS and K-BFGS(L) (Goldfarb, Ren and Bahamou, NeurIPS 2020).

Block-diagonal quasi-Newton with one block per dense layer ``h = a @ W + b``,
each block approximated by a Kronecker product whose two small factors keep
their inverses by BFGS: ``H_a`` (input side, ``(d_in+1)^2``) and ``H_g``
(pre-activation side, ``d_out^2``, or the L-BFGS operator of the last ``p``
pairs for K-BFGS(L)). The step for layer ``l`` is ``-lr * H_a M_l H_g`` with
``M_l`` the momentum of the regularised gradient of ``[W; b]``.

The algorithm follows ALGORITHMS.md section 3 (the paper, arXiv 2006.08877,
as implemented in the authors' public code
renyiryry/kbfgs_neurips2020_public, rewritten for Flax's ``(d_in, d_out)``
kernel layout). Per step, on the mini-batch of ``value_fn``:

1. Tapped pass at ``theta`` (:mod:`optax_layerwise._taps`): per layer the mean
   homogeneous input ``abar``, ``A_batch = mean_i at_i at_i^T``, ``mean h`` and
   ``mean gh`` (``gh_i = n dL/dh_i``). ``A <- A_batch`` on the first step,
   else ``A <- beta A + (1 - beta) A_batch``; on the first step ``H_a <- (A +
   sqrt(lambda) I)^-1`` (the only explicit inverse; ``H_g = I`` from
   ``init``).
2. ``M <- mu M + (1 - mu) (g + tau theta)`` for every leaf.
3. ``delta_l = -lr H_a M_l H_g`` for dense layers; other leaves (norm scales,
   embeddings, ...) take the fallback ``-lr M``.
4. Second tapped pass on the same mini-batch at ``theta + delta``
   (``pair="secant"``) or the directional derivatives along ``delta``
   (``pair="tangent"``): ``s <- beta s + (1 - beta)(mean h+ - mean h)``,
   ``y <- beta y + (1 - beta)(mean gh+ - mean gh)``.
5. Double damping of ``(s, y)`` (Powell with ``mu1``, then
   Levenberg-Marquardt with ``mu2 = sqrt(lambda)``).
6. BFGS update of ``H_g`` (or append to the L-BFGS memory), skipped when
   ``s^T y <= 1e-4 s^T s ||mean gh||`` or non-finite.
7. ``H_a`` by Hessian action: ``s_a = H_a abar``, ``y_a = (A + sqrt(lambda) I)
   s_a``, BFGS update with the same skip rule (``||abar||`` in place of
   ``||mean gh||``, as in the authors' code).

A whole step is skipped (zero update, state unchanged but for
``num_nonfinite``; ``count`` does not advance) when the gradient, the tapped
statistics (a NaN loss from ``value_fn``) or the step itself are not finite;
a non-finite pair from the second pass skips that layer's ``s, y, H_g``
update and is counted in ``num_skipped``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from optax_layerwise import _bfgs
from optax_layerwise import _curvature
from optax_layerwise import _layers
from optax_layerwise import _taps

PyTree = Any
ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]

__all__ = ["KBFGSLayerState", "KBFGSState", "kbfgs"]

_NAME = "kbfgs"
PAIRS = ("secant", "tangent")
STEP_RULES = ("layerwise", "fixed")


class KBFGSLayerState(NamedTuple):
  """The Kronecker factors of one dense layer (statistics dtype).

  Attributes:
    a: ``(k, k)`` running ``A = mean a a^T`` (``k = d_in + 1`` with a bias).
    h_a: ``(k, k)`` ``H_a ~ (A + sqrt(lambda) I)^-1``.
    h_g: ``(d_out, d_out)`` ``H_g`` (K-BFGS), or the
      :class:`optax_layerwise._bfgs.LBFGSMemory` of the last ``p`` pairs
      (K-BFGS(L)).
    s: ``(d_out,)`` smoothed pre-activation change (before damping).
    y: ``(d_out,)`` smoothed pre-activation-gradient change (before damping).
  """
  a: jax.Array
  h_a: jax.Array
  h_g: Union[jax.Array, _bfgs.LBFGSMemory]
  s: jax.Array
  y: jax.Array


class KBFGSState(NamedTuple):
  """State of :func:`kbfgs`; shapes and dtypes are fixed across steps.

  Per-layer vectors have one entry per dense layer, in the order of
  :func:`kbfgs_layer_names`.

  Attributes:
    count: accepted steps (int32); indexes learning-rate schedules.
    momentum: ``M``, the momentum of the regularised gradient (params'
      structure, statistics dtype).
    layers: one :class:`KBFGSLayerState` per dense layer.
    preconditioned: params' structure, bool scalars: ``True`` for the leaves
      (kernel and bias) the last step preconditioned; ``False`` for leaves
      that took the fallback ``-lr M``.
    num_powell: per layer, steps on which Powell damping fired (int32).
    num_lm: per layer, steps on which Levenberg-Marquardt damping fired.
    num_skipped: per layer, ``H_g`` updates skipped (skip rule or non-finite
      pair).
    num_skipped_a: per layer, ``H_a`` updates skipped.
    num_nonfinite: whole steps skipped for a non-finite gradient, tapped
      statistics or step (int32 scalar).
    step_sizes: per layer, the multiple ``t_l`` of the trial step
      ``delta_l = -lr H_a M_l H_g`` applied last (``step_rule="layerwise"``;
      1 with ``step_rule="fixed"``).
    decreases: per layer, the last measured ``b_l = <g, delta>_l`` (0 with
      ``step_rule="fixed"``).
    curvatures: per layer, the last measured ``q_l = <delta_l, g(theta +
      delta) - g(theta)>_l`` (0 with ``step_rule="fixed"``).
    num_fallbacks: per layer, steps whose measurement was rejected
      (``q_l <= 0``, ``b_l >= 0`` or non-finite), which reused the last
      accepted ``t_l``.
  """
  count: jax.Array
  momentum: PyTree
  layers: tuple
  preconditioned: PyTree
  num_powell: jax.Array
  num_lm: jax.Array
  num_skipped: jax.Array
  num_skipped_a: jax.Array
  num_nonfinite: jax.Array
  step_sizes: jax.Array
  decreases: jax.Array
  curvatures: jax.Array
  num_fallbacks: jax.Array


@dataclasses.dataclass(frozen=True)
class _Dense:
  """Static description of one dense layer of the params."""
  name: str
  kernel_index: int
  bias_index: Optional[int]
  d_in: int
  d_out: int

  @property
  def k(self) -> int:
    return self.d_in + (self.bias_index is not None)


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _strip_value(path: tuple) -> tuple:
  # Non-pure nnx.State leaves sit under a trailing `.value` attribute.
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and (
      path[-1].name in ("value", "raw_value")):
    return path[:-1]
  return path


def _default_is_dense(path: tuple, leaf) -> bool:
  del leaf
  return "embed" not in _key_name(path[-1]).lower() if path else True


def _dense_layers(params: PyTree, dense_layers) -> tuple:
  """The static list of dense layers (kernel and optional bias leaves)."""
  with_path, _ = jax.tree_util.tree_flatten_with_path(params)
  paths = [_strip_value(p) for p, _ in with_path]
  leaves = [leaf for _, leaf in with_path]
  is_dense = dense_layers if dense_layers is not None else _default_is_dense
  layers = []
  for i in _taps.candidate_kernels(params):
    if not paths[i] or not is_dense(paths[i], leaves[i]):
      continue
    d_in, d_out = leaves[i].shape
    parent = paths[i][:-1]
    biases = [
        j for j, p in enumerate(paths)
        if j != i and p[:-1] == parent and jnp.ndim(leaves[j]) == 1
        and leaves[j].shape[0] == d_out
        and _key_name(p[-1]) in ("bias", "b")]
    bias = None
    if biases:
      named = [j for j in biases if _key_name(paths[j][-1]) == "bias"]
      bias = (named or biases)[0]
    name = jax.tree_util.keystr(parent if parent else paths[i])
    layers.append(_Dense(name, i, bias, d_in, d_out))
  return tuple(layers)


def kbfgs_layer_names(params: PyTree, dense_layers=None) -> tuple:
  """Names of the dense layers :func:`kbfgs` keeps Kronecker factors for.

  The order is that of the per-layer vectors and ``layers`` of
  :class:`KBFGSState`.

  Args:
    params: the params (or their shapes), as given to ``tx.init``.
    dense_layers: the ``dense_layers`` predicate given to :func:`kbfgs`.

  Returns:
    A tuple of key-path strings of the dense layers' parent nodes.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_layerwise as olw
    >>> params = {'l1': {'kernel': jnp.ones((4, 8)), 'bias': jnp.zeros(8)},
    ...           'norm': {'scale': jnp.ones(8)},
    ...           'l2': {'kernel': jnp.ones((8, 1))}}
    >>> olw.kbfgs_layer_names(params)  # 'norm' takes the momentum fallback
    ("['l1']", "['l2']")
  """
  return tuple(layer.name for layer in _dense_layers(params, dense_layers))


def _sym(x: jax.Array) -> jax.Array:
  return 0.5 * (x + x.T)


def _spd_inverse(x: jax.Array) -> jax.Array:
  chol = jnp.linalg.cholesky(x)
  eye = jnp.eye(x.shape[0], dtype=x.dtype)
  return _sym(jax.scipy.linalg.cho_solve((chol, True), eye))


def _homogeneous(layer: _Dense, tap: _taps.DenseTap):
  """``abar`` and ``A_batch`` with the homogeneous coordinate for a bias."""
  mean, second = tap.input_mean, tap.input_second_moment
  if layer.bias_index is None:
    return mean, second
  one = jnp.ones((1,), mean.dtype)
  abar = jnp.concatenate([mean, one])
  a_batch = jnp.block([[second, mean[:, None]], [mean[None, :], one[None]]])
  return abar, a_batch


def _step_scales(decrease: jax.Array, curvature: jax.Array,
                 previous: jax.Array, limit: jax.Array,
                 max_step_scale) -> tuple[jax.Array, jax.Array]:
  """Per-layer multiples ``t_l`` of the trial step, and which were measured.

  Seed 000's rule (the minimiser of the quadratic model along a layer's own
  direction, Bahamou and Goldfarb, arXiv 2305.13664) applied to K-BFGS's
  step: ``t_l = -b_l / q_l`` with ``b_l = <g, delta>_l`` and the secant
  curvature ``q_l = <delta_l, g(theta + delta) - g(theta)>_l``
  (docs/kbfgs.md, "Per-layer step"). A measurement with ``q_l <= 0``,
  ``b_l >= 0`` (not a descent direction) or a non-finite value is rejected
  and the layer reuses ``previous``; accepted ones are clipped to
  ``[0, max_step_scale]``; every ``t_l`` is then capped by ``limit`` (the
  displacement bound, ``inf`` without one).
  """
  valid = (jnp.isfinite(decrease) & jnp.isfinite(curvature)
           & (curvature > 0) & (decrease < 0))
  raw = -decrease / jnp.where(valid, curvature, 1.0)
  scales = jnp.where(valid, jnp.clip(raw, 0.0, max_step_scale), previous)
  return jnp.minimum(scales, limit), valid


def _layer_dot(a_leaves, b_leaves, layer: _Dense, dtype) -> jax.Array:
  """``<a, b>_l`` over the kernel and bias of one dense layer."""
  return sum(jnp.vdot(a_leaves[i].astype(dtype), b_leaves[i].astype(dtype))
             for i in (layer.kernel_index, layer.bias_index) if i is not None)


def kbfgs(
    learning_rate: ScalarOrSchedule = 0.3,
    *,
    damping: float = 0.3,
    momentum: float = 0.9,
    weight_decay: float = 1e-5,
    stat_decay: float = 0.9,
    memory_size: Optional[int] = None,
    pair: str = "secant",
    mu1: float = _bfgs.POWELL_MU1,
    mu2: Optional[float] = None,
    skip_tol: float = _bfgs.SKIP_TOL,
    lbfgs_gamma: float = 1.0,
    max_relative_change: Optional[float] = 0.1,
    step_rule: str = "layerwise",
    max_step_scale: float = 10.0,
    input_factor_interval: int = 1,
    dense_layers: Optional[Callable[[tuple, Any], bool]] = None,
    axis_name: Optional[_curvature.AxisName] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""K-BFGS / K-BFGS(L): Kronecker-factored BFGS for dense layers.

  Goldfarb, Ren and Bahamou, "Practical Quasi-Newton Methods for Training
  Deep Neural Networks", NeurIPS 2020, arXiv 2006.08877 (ALGORITHMS.md
  section 3). Each dense layer ``h = a @ W + b`` moves by
  ``delta = -lr * H_a M H_g``, ``M`` being the momentum of ``grad + tau *
  theta`` for ``[W; b]``, ``H_a ~ (A + sqrt(lambda) I)^-1`` and ``H_g`` a BFGS
  (or, with ``memory_size=p``, L-BFGS) approximation of the inverse
  pre-activation Hessian, damped by Powell + Levenberg-Marquardt "double
  damping". Leaves outside dense layers move by ``-lr * M``.

  This is a complete optimizer, meant as the **last** stage of a chain: its
  secant pair is measured at ``theta + delta`` with the very step it returns,
  so nothing may rescale its output (transforms of the gradient before it,
  such as :func:`optax.clip_by_global_norm`, are fine). It needs the params
  and the mini-batch loss ``value_fn``::

      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params,
                                     value_fn=lambda p: loss_fn(p, batch))
      params = optax.apply_updates(params, updates)

  ``value_fn`` is re-run with the dense layers tapped (Flax linen
  ``nn.Dense``, Flax NNX ``nnx.Linear``, or :func:`optax_layerwise.dense` in
  plain JAX), once at ``theta`` and once at ``theta + delta``. Put the
  gradient computation and ``tx.update`` in the same ``jax.jit``: XLA then
  shares the forward and backward pass of the tap at ``theta`` with the
  gradient's (so K-BFGS costs one extra forward-backward pass, the second
  one, plus its matrix products).

  Args:
    learning_rate: ``lr``, a scalar or an Optax schedule of the step count.
    damping: ``lambda``; ``A`` is damped by ``sqrt(lambda) I`` and
      Levenberg-Marquardt damping uses ``mu2 = sqrt(lambda)``.
    momentum: momentum ``mu`` of the gradient.
    weight_decay: L2 coefficient ``tau`` added to the gradient (``g + tau
      theta``, all leaves).
    stat_decay: ``beta``, decay of the moving averages of ``A``, ``s``, ``y``.
    memory_size: ``None`` for K-BFGS (dense ``H_g``); an integer ``p >= 1``
      for K-BFGS(L) (the last ``p`` pairs; the paper uses 100). It sets
      the state's shape: under :func:`optax.inject_hyperparams` list it in
      ``static_args`` when given (every other numeric argument may be
      injected).
    pair: ``"secant"`` (the paper: a second pass on the same mini-batch at
      ``theta + delta``) or ``"tangent"`` (ours: the directional derivatives
      of ``mean h`` and ``mean gh`` along ``delta``, one ``jax.jvp``;
      independent of the step length, about twice the cost).
    mu1: Powell damping threshold (0.2).
    mu2: Levenberg-Marquardt threshold, ``sqrt(damping)`` by default; must lie
      in ``(0, 1)``.
    skip_tol: tolerance of the BFGS skip rule (1e-4).
    lbfgs_gamma: K-BFGS(L)'s initial matrix ``gamma I`` (1).
    max_relative_change: bounds each dense layer's step (ours, not the
      paper's): ``delta_l`` is shortened to ``||delta_l|| <= rho ||[W; b]||``
      (default ``rho = 0.1``). While ``H_g`` still sits at its initial ``I``,
      the first steps can be far too long for networks initialised with
      larger weights than the authors' (PyTorch's ``U(+-1/sqrt(fan_in))``):
      at lr 0.3 on the CURVES autoencoder, Flax's default LeCun-normal init
      diverged to NaN within 10 steps without it, and trained with it; with
      the authors' init the bound changed the loss after 80 steps by 0.1%.
      ``None`` gives the paper's algorithm exactly. Layers whose params
      are all zero are not bounded.
    step_rule: ``"layerwise"`` (default; ours, docs/kbfgs.md "Per-layer
      step"): each dense layer takes ``t_l`` times the trial step
      ``delta_l = -lr H_a M_l H_g``, with ``t_l = -b_l / q_l`` the minimiser
      of the quadratic model along ``delta_l`` (Bahamou and Goldfarb,
      arXiv 2305.13664), ``b_l = <g, delta>_l`` and the secant curvature
      ``q_l = <delta_l, g(theta + delta) - g(theta)>_l`` from the params
      gradients of the two tapped passes (``pair="tangent"``: the exact
      ``<delta_l, (H delta)_l>``). A rejected measurement (``q_l <= 0``,
      ``b_l >= 0``, non-finite) reuses the last ``t_l``. ``lr`` then sets
      the length of the trial step at which the pair and ``q_l`` are
      measured, and matters much less. ``"fixed"``: the paper's step
      ``delta`` itself.
    max_step_scale: upper clip of an accepted ``t_l`` (10).
    input_factor_interval: refresh the input-side factor (``A`` from the
      tapped inputs' second moment, ``O(n d_in^2)``, and the ``H_a`` update)
      every this many steps (ours; kfac-jax's ``curvature_update_period``
      plays the same role). 1 is the paper.
    dense_layers: which 2-D leaves are dense kernels that get Kronecker
      factors: a predicate ``(path, leaf) -> bool`` on key paths. Default:
      every 2-D float leaf whose key does not contain ``"embed"``; a 1-D
      sibling of length ``d_out`` named ``bias`` (or ``b``) is its bias.
      Exclude big 2-D leaves that are not dense layers to save memory.
      A callable: under :func:`optax.inject_hyperparams` (which treats
      callables as schedules) list it in ``static_args``.
    axis_name: under ``jax.shard_map`` / ``jax.pmap``, the data-parallel
      axis: ``value_fn`` is then this device's loss, and the tapped
      statistics (``abar``, ``A_batch``, ``mean h``, ``mean gh``, and the
      pair ``s, y``) are averaged over the axis before any nonlinear use, so
      all devices hold identical factors (per dense layer and step,
      ``d_in^2 + d_in + 4 d_out`` numbers in two all-reduces, and the
      per-layer step's ``b_l, q_l`` in a third; see
      ``docs/distributed.md``). The incoming gradient must already be the
      global one. ``None`` (default) under plain ``jax.jit``, sharded or not.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` with state
    :class:`KBFGSState`.

  Raises:
    ValueError: a bad hyperparameter (at construction), or at ``update``:
      no ``value_fn``, no params, no tappable dense layer.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_layerwise as olw
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (32, 4))
    >>> t = jnp.sin(x[:, :1])
    >>> k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    >>> params = {'l1': {'kernel': jax.random.normal(k1, (4, 8)) / 2,
    ...                  'bias': jnp.zeros(8)},
    ...           'l2': {'kernel': jax.random.normal(k2, (8, 1)) / 3}}
    >>> def loss_fn(p):
    ...   h = jnp.tanh(olw.dense(x, p['l1']['kernel'], p['l1']['bias']))
    ...   return jnp.mean((olw.dense(h, p['l2']['kernel']) - t) ** 2)
    >>> tx = olw.kbfgs(0.1)
    >>> state = tx.init(params)
    >>> @jax.jit  # gradient and update in one jit: XLA shares the tap's pass
    ... def step(params, state):
    ...   grads = jax.grad(loss_fn)(params)
    ...   updates, state = tx.update(grads, state, params, value_fn=loss_fn)
    ...   return optax.apply_updates(params, updates), state
    >>> params, state = step(params, state)
    >>> bool(state.preconditioned['l1']['kernel'])
    True
    >>> olw.kbfgs_layer_names(params), state.layers[0].h_a.shape  # d_in + 1
    (("['l1']", "['l2']"), (5, 5))
  """
  # Hyperparameters injected by optax.inject_hyperparams arrive traced and
  # are not checked (_concrete gives None); memory_size sets shapes and must
  # then be listed in static_args.
  lr_value = None if callable(learning_rate) else _curvature.concrete_float(learning_rate)
  if lr_value is not None and lr_value < 0:
    raise ValueError(f"{_NAME}: learning_rate must be >= 0, got "
                     f"{learning_rate}. kbfgs returns the descent step "
                     "-lr * H_a M H_g itself: pass a positive rate.")
  damping_value = _curvature.concrete_float(damping)
  if damping_value is not None and not damping_value > 0:
    raise ValueError(f"{_NAME}: damping must be > 0 (A is damped by "
                     f"sqrt(damping) I), got {damping}.")
  if mu2 is None:
    mu2 = jnp.sqrt(damping) if damping_value is None else math.sqrt(
        damping_value)
    if damping_value is not None and mu2 >= 1:
      raise ValueError(
          f"{_NAME}: damping={damping} gives mu2 = sqrt(damping) >= 1; pass "
          "mu2 in (0, 1) explicitly for damping >= 1.")
  for name, value in (("mu2", mu2), ("mu1", mu1)):
    number = _curvature.concrete_float(value)
    if number is not None and not 0 < number < 1:
      raise ValueError(f"{_NAME}: {name} must lie in (0, 1), got {value}.")
  for name, value in (("momentum", momentum), ("stat_decay", stat_decay)):
    _curvature.check_decay(value, name, transform=_NAME)
  weight_decay_value = _curvature.concrete_float(weight_decay)
  if weight_decay_value is not None and weight_decay_value < 0:
    raise ValueError(f"{_NAME}: weight_decay must be >= 0, got "
                     f"{weight_decay}.")
  if max_relative_change is not None:
    _curvature.check_non_negative(
        max_relative_change, "max_relative_change", transform=_NAME,
        why="It bounds each dense layer's step relative to its norm; pass "
        "None to remove the bound.")
  if memory_size is not None and _curvature.concrete_int(memory_size) is None:
    raise ValueError(
        f"{_NAME}: memory_size sets the shape of the L-BFGS state and must be "
        "a Python int. With optax.inject_hyperparams, pass "
        "static_args=('memory_size',).")
  if memory_size is not None and (
      isinstance(memory_size, bool) or int(memory_size) != memory_size
      or memory_size < 1):
    raise ValueError(f"{_NAME}: memory_size must be None (K-BFGS) or an "
                     f"integer >= 1 (K-BFGS(L)), got {memory_size!r}.")
  if pair not in PAIRS:
    raise ValueError(f"{_NAME}: pair must be one of {PAIRS}, got {pair!r}.")
  if step_rule not in STEP_RULES:
    raise ValueError(f"{_NAME}: step_rule must be one of {STEP_RULES}, got "
                     f"{step_rule!r}.")
  _curvature.check_non_negative(
      max_step_scale, "max_step_scale", transform=_NAME,
      why="It caps the per-layer multiple t_l of the trial step.")
  layerwise = step_rule == "layerwise"
  # Traced when injected by optax.inject_hyperparams: then not checked, and
  # the refresh is decided under lax.cond.
  interval_value = _curvature.concrete_int(input_factor_interval)
  if interval_value is not None and (
      isinstance(input_factor_interval, bool)
      or interval_value != input_factor_interval or interval_value < 1):
    raise ValueError(f"{_NAME}: input_factor_interval must be an integer "
                     f">= 1, got {input_factor_interval!r}.")
  sqrt_damping = (jnp.sqrt(damping) if damping_value is None
                  else math.sqrt(damping_value))
  beta = stat_decay

  def init_fn(params):
    _layers.check_params(params, transform=_NAME)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    layer_states = []
    for layer in _dense_layers(params, dense_layers):
      dtype = _layers.stats_dtype(leaves[layer.kernel_index].dtype)
      eye_k = jnp.eye(layer.k, dtype=dtype)
      if memory_size is None:
        h_g = jnp.eye(layer.d_out, dtype=dtype)
      else:
        h_g = _bfgs.lbfgs_init(int(memory_size), layer.d_out, dtype)
      layer_states.append(KBFGSLayerState(
          a=jnp.zeros_like(eye_k), h_a=eye_k, h_g=h_g,
          s=jnp.zeros((layer.d_out,), dtype),
          y=jnp.zeros((layer.d_out,), dtype)))
    num = len(layer_states)
    # Distinct buffers everywhere, so the state can be donated to jax.jit.
    counts = lambda: jnp.zeros((num,), jnp.int32)
    stats = lambda: jnp.zeros((num,), _layers.tree_stats_dtype(params))
    return KBFGSState(
        count=jnp.zeros([], jnp.int32),
        momentum=jax.tree_util.tree_unflatten(treedef, [
            jnp.zeros(jnp.shape(x), _layers.stats_dtype(x.dtype))
            for x in leaves]),
        layers=tuple(layer_states),
        preconditioned=jax.tree_util.tree_unflatten(
            treedef, [jnp.zeros([], bool) for _ in leaves]),
        num_powell=counts(), num_lm=counts(), num_skipped=counts(),
        num_skipped_a=counts(), num_nonfinite=jnp.zeros([], jnp.int32),
        step_sizes=stats() + 1.0, decreases=stats(), curvatures=stats(),
        num_fallbacks=counts())

  def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
    del extra_args
    value_fn = _curvature.require_value_fn(value_fn, transform=_NAME)
    # A non-scalar or non-float loss fails naming kbfgs, not the tap.
    value_fn = _curvature._checked_value_fn(  # pylint: disable=protected-access
        value_fn, _NAME)
    _layers.check_params(params, transform=_NAME)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    grad_leaves = _layers.flatten_like(
        updates, treedef, f"{_NAME}: the updates (gradients)")
    dense = _dense_layers(params, dense_layers)
    if len(dense) != len(state.layers):
      raise ValueError(f"{_NAME}: the params have {len(dense)} dense layers "
                       f"but the state was built for {len(state.layers)}; "
                       "re-run init.")

    # 1. Tapped pass at theta; A and H_a are refreshed every
    # input_factor_interval steps (always on the first).
    refresh = True if interval_value == 1 else (
        state.count % input_factor_interval == 0)
    taps = _taps.tap_dense_layers(
        value_fn, params, kernels=[layer.kernel_index for layer in dense],
        second_moment=refresh, with_grads=layerwise, axis_name=axis_name,
        local_grads=True)
    if not taps.layers:
      raise _taps.no_tappable_layer_error(_NAME, taps.num_untapped_calls)
    untapped = [layer.name for layer in dense
                if layer.kernel_index not in taps.layers]
    if untapped:
      warnings.warn(
          f"{_NAME}: no tapped call used the dense kernel(s) {untapped}; they "
          "take the fallback -lr * momentum. Exclude them with `dense_layers` "
          "to save their state memory.", stacklevel=2)
    for layer in dense:
      tap = taps.layers.get(layer.kernel_index)
      if tap is not None and tap.bias_index != layer.bias_index:
        raise ValueError(
            f"{_NAME}: the dense layer {layer.name} was called with bias leaf "
            f"{tap.bias_index} but its params have bias leaf "
            f"{layer.bias_index} (None = no bias). Call the layer with its own "
            "`bias` sibling leaf, or none if it has none.")
    tapped = tuple(layer for layer in dense
                   if layer.kernel_index in taps.layers)

    precond = [False] * len(leaves)
    for layer in tapped:
      precond[layer.kernel_index] = True
      if layer.bias_index is not None:
        precond[layer.bias_index] = True
    preconditioned = jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(flag) for flag in precond])

    stats = [(t.input_mean, t.input_second_moment, t.output_mean,
              t.output_grad) for t in taps.layers.values()]
    finite = _curvature.tree_all_finite((grad_leaves, stats, taps.loss))

    lr = learning_rate(state.count) if callable(learning_rate) else (
        learning_rate)

    # 2. Momentum of the regularised gradient.
    mom_leaves = jax.tree_util.tree_leaves(state.momentum)
    new_mom = []
    for g, p, m in zip(grad_leaves, leaves, mom_leaves):
      g_reg = g.astype(m.dtype) + weight_decay * p.astype(m.dtype)
      new_mom.append(momentum * m + (1.0 - momentum) * g_reg)

    # 3. Directions: preconditioned for tapped layers, -lr M elsewhere.
    deltas = [(-lr * m).astype(m.dtype) for m in new_mom]
    first = state.count == 0
    layer_work, limits = {}, {}
    for pos, layer in enumerate(dense):
      if layer not in tapped:
        continue
      ls = state.layers[pos]
      abar, a_batch = _homogeneous(layer, taps.layers[layer.kernel_index])
      a_new = jnp.where(first, a_batch, jnp.where(
          refresh, beta * ls.a + (1.0 - beta) * a_batch, ls.a))
      a_damped = a_new + sqrt_damping * jnp.eye(layer.k, dtype=a_new.dtype)
      h_a = jax.lax.cond(first, _spd_inverse, lambda _, h=ls.h_a: h, a_damped)
      m_w = new_mom[layer.kernel_index]
      if layer.bias_index is not None:
        m_w = jnp.concatenate([m_w, new_mom[layer.bias_index][None]])
      left = h_a @ m_w
      if memory_size is None:
        direction = left @ ls.h_g
      else:
        direction = _bfgs.lbfgs_apply(ls.h_g, left, lbfgs_gamma)
      step = -lr * direction
      limits[pos] = jnp.asarray(jnp.inf, step.dtype)
      if max_relative_change is not None:
        theta_sq = _layer_dot(leaves, leaves, layer, step.dtype)
        ratio = _layers.trust_ratio(theta_sq, jnp.sum(jnp.square(step)),
                                    max_relative_change)
        step = step * jnp.minimum(1.0, ratio)
        # The per-layer multiple t_l may not push the move past the bound:
        # the shortened step sits on it (ratio 1), a shorter one has room.
        limits[pos] = jnp.maximum(ratio, 1.0)
      deltas[layer.kernel_index] = step[:layer.d_in]
      if layer.bias_index is not None:
        deltas[layer.bias_index] = step[layer.d_in]
      layer_work[pos] = (abar, a_new, a_damped, h_a)

    out_leaves = [d.astype(p.dtype) for d, p in zip(deltas, leaves)]
    new_updates = jax.tree_util.tree_unflatten(treedef, out_leaves)
    # A step that is not finite in the params' dtypes (a float16 overflow, a
    # preconditioner gone bad) skips the step, as a non-finite gradient does.
    finite = finite & _curvature.tree_all_finite(out_leaves)

    # 4. The pair: second pass at theta + delta, or directional derivatives.
    kernels = [layer.kernel_index for layer in tapped]
    if pair == "secant":
      shifted = jax.tree_util.tree_map(
          lambda p, u: jnp.asarray(p + u).astype(jnp.asarray(p).dtype),
          params, new_updates)
      plus = _taps.tap_dense_layers(value_fn, shifted, kernels=kernels,
                                    second_moment=False,
                                    with_grads=layerwise, axis_name=axis_name,
                                    local_grads=True)
      grad_change = None if not layerwise else [
          a - b for a, b in zip(jax.tree_util.tree_leaves(plus.grads),
                                jax.tree_util.tree_leaves(taps.grads))]
      pairs = {}
      for layer in tapped:
        before = taps.layers[layer.kernel_index]
        after = plus.layers.get(layer.kernel_index)
        if after is None:
          raise ValueError(f"{_NAME}: the layer {layer.name} was tapped at "
                           "theta but not at theta + delta; value_fn must "
                           "call the same layers for all params.")
        pairs[layer.kernel_index] = (after.output_mean - before.output_mean,
                                     after.output_grad - before.output_grad)
    else:

      def means(p):
        res = _taps.tap_dense_layers(value_fn, p, kernels=kernels,
                                     second_moment=False,
                                     with_grads=layerwise, axis_name=axis_name,
                                     local_grads=True)
        return {i: (res.layers[i].output_mean, res.layers[i].output_grad)
                for i in kernels}, res.grads

      # The tangent of the gradient is the Hessian-vector product H delta.
      _, (pairs, hess_delta) = jax.jvp(means, (params,), (new_updates,))
      grad_change = None if not layerwise else jax.tree_util.tree_leaves(
          hess_delta)
    # A zero step (lr = 0, e.g. a warm-up schedule's first step) has a zero
    # pair in exact arithmetic; the recomputed second pass may differ from the
    # first by round-off, and BFGS would take that noise at face value.
    zero_step = jnp.logical_not(jnp.any(jnp.stack(
        [jnp.any(u != 0) for u in out_leaves])))
    pairs = {i: tuple(jnp.where(zero_step, jnp.zeros_like(v), v) for v in sy)
             for i, sy in pairs.items()}

    # The per-layer step (ours): t_l times the trial step of tapped layers.
    step_sizes, decreases, curvatures = (state.step_sizes, state.decreases,
                                         state.curvatures)
    measured = jnp.zeros(step_sizes.shape, bool)
    if layerwise and tapped:
      dtype = step_sizes.dtype
      grad0 = jax.tree_util.tree_leaves(taps.grads)
      rows = [pos for pos, layer in enumerate(dense) if pos in layer_work]
      b = jnp.stack([_layer_dot(grad0, deltas, dense[pos], dtype)
                     for pos in rows])
      q = jnp.stack([_layer_dot(grad_change, deltas, dense[pos], dtype)
                     for pos in rows])
      # The gradients are this device's (local_grads): b and q are linear in
      # them, so one all-reduce of 2 L numbers gives the global ones.
      b, q = _curvature.global_mean(jnp.stack([b, q]), axis_name)
      limit = jnp.stack([limits[pos] for pos in rows]).astype(dtype)
      index = jnp.asarray(rows)
      scales, valid = _step_scales(b, q, step_sizes[index], limit,
                                   max_step_scale)
      step_sizes = step_sizes.at[index].set(scales.astype(dtype))
      decreases = decreases.at[index].set(jnp.where(jnp.isfinite(b), b,
                                                    decreases[index]))
      curvatures = curvatures.at[index].set(jnp.where(jnp.isfinite(q), q,
                                                      curvatures[index]))
      measured = measured.at[index].set(valid)
      for row, pos in enumerate(rows):
        layer = dense[pos]
        for i in (layer.kernel_index, layer.bias_index):
          if i is not None:
            out_leaves[i] = (scales[row] * deltas[i]).astype(leaves[i].dtype)
      new_updates = jax.tree_util.tree_unflatten(treedef, out_leaves)
      finite = finite & _curvature.tree_all_finite(out_leaves)

    # 5-7. Damping and the BFGS updates of H_g and H_a, and the new state.
    def take_step(_):
      new_layers = list(state.layers)
      powell_flags, lm_flags, skip_flags, skip_a_flags = [], [], [], []
      for pos, layer in enumerate(dense):
        ls = state.layers[pos]
        if pos not in layer_work:
          for flags in (powell_flags, lm_flags, skip_flags, skip_a_flags):
            flags.append(jnp.asarray(False))
          continue
        abar, a_new, a_damped, h_a = layer_work[pos]
        tap = taps.layers[layer.kernel_index]
        s_new, y_new = pairs[layer.kernel_index]
        pair_ok = _curvature.tree_all_finite((s_new, y_new))
        s_bar = jnp.where(pair_ok, beta * ls.s + (1.0 - beta) * s_new, ls.s)
        y_bar = jnp.where(pair_ok, beta * ls.y + (1.0 - beta) * y_new, ls.y)
        if memory_size is None:
          hy = ls.h_g @ y_bar
        else:
          hy = _bfgs.lbfgs_apply(ls.h_g, y_bar, lbfgs_gamma)
        s_d, y_d, powell, lm = _bfgs.double_damping(s_bar, y_bar, hy, mu1=mu1,
                                                    mu2=mu2)
        g_norm = jnp.linalg.norm(tap.output_grad)
        if memory_size is None:
          h_g, updated = _bfgs.bfgs_inverse_update(
              ls.h_g, s_d, y_d, grad_norm=g_norm, skip_tol=skip_tol,
              valid=pair_ok)
        else:
          h_g, updated = _bfgs.lbfgs_append(ls.h_g, s_d, y_d, grad_norm=g_norm,
                                            skip_tol=skip_tol, valid=pair_ok)
        s_a, y_a = _bfgs.hessian_action_pair(h_a, a_damped, abar)
        h_a_new, updated_a = _bfgs.bfgs_inverse_update(
            h_a, s_a, y_a, grad_norm=jnp.linalg.norm(abar), skip_tol=skip_tol,
            valid=refresh)
        new_layers[pos] = KBFGSLayerState(a=a_new, h_a=h_a_new, h_g=h_g,
                                          s=s_bar, y=y_bar)
        powell_flags.append(powell & pair_ok)
        lm_flags.append(lm & pair_ok)
        skip_flags.append(~updated)
        skip_a_flags.append(refresh & ~updated_a)

      def count(flags):
        if not flags:
          return jnp.zeros((0,), jnp.int32)
        return jnp.stack(flags).astype(jnp.int32)

      new_state = KBFGSState(
          count=state.count + 1,
          momentum=jax.tree_util.tree_unflatten(treedef, new_mom),
          layers=tuple(new_layers),
          preconditioned=preconditioned,
          num_powell=state.num_powell + count(powell_flags),
          num_lm=state.num_lm + count(lm_flags),
          num_skipped=state.num_skipped + count(skip_flags),
          num_skipped_a=state.num_skipped_a + count(skip_a_flags),
          num_nonfinite=state.num_nonfinite,
          step_sizes=step_sizes, decreases=decreases, curvatures=curvatures,
          num_fallbacks=state.num_fallbacks + (
              jnp.asarray([pos in layer_work for pos in range(len(dense))],
                          bool) & ~measured).astype(jnp.int32)
          if layerwise else state.num_fallbacks)
      return new_state

    def skip_step(_):
      return state._replace(preconditioned=preconditioned,
                            num_nonfinite=state.num_nonfinite + 1)

    # A non-finite gradient or statistic skips the whole step: zero update,
    # state unchanged but the counter. lax.cond rather than jnp.where, so the
    # big factors are not copied through selects every step.
    new_state = jax.lax.cond(finite, take_step, skip_step, None)
    new_updates = jax.tree_util.tree_map(
        lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
