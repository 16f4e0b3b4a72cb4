"""Array-level BFGS machinery for K-BFGS (docs/kbfgs.md, steps 6-8).

Nothing here knows about pytrees or layers: plain vectors and matrices, all
pure ``jnp`` code with static shapes, so it runs under ``jax.jit``,
``jax.vmap`` and ``lax.scan``. Conventions follow Goldfarb, Ren and Bahamou,
"Practical Quasi-Newton Methods for Training Deep Neural Networks", NeurIPS
2020 (arXiv 2006.08877), and the authors' public code:

* :func:`bfgs_inverse_update`: the BFGS update of an inverse Hessian
  approximation ``H`` with the authors' skip rule (docs/kbfgs.md, step 7).
* :func:`double_damping`: Powell damping followed by Levenberg-Marquardt-like
  damping of a pair ``(s, y)`` (the paper's "double damping" (DD);
  docs/kbfgs.md, step 6).
* :func:`hessian_action_pair`: the pair ``(H_a abar, (A + sqrt(lambda) I)
  H_a abar)`` that updates ``H_a`` without an explicit inverse (the paper's
  "Hessian-action" BFGS; docs/kbfgs.md, step 8).
* :class:`LBFGSMemory`, :func:`lbfgs_init`, :func:`lbfgs_append`,
  :func:`lbfgs_apply`: limited-memory BFGS in a fixed-size chronological
  buffer of the last ``p`` pairs, applied through the compact representation
  of Byrd, Nocedal and Schnabel (1994) so that one matrix product
  applies ``H`` to many vectors at once (K-BFGS(L)).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

__all__ = [
    "POWELL_MU1", "SKIP_TOL", "bfgs_inverse_update", "double_damping",
    "hessian_action_pair", "LBFGSMemory", "lbfgs_init", "lbfgs_append",
    "lbfgs_apply", "H_FLOOR", "below_floor", "floor_or_reset", "SCALED",
    "lbfgs_gamma", "product",
]

#: Powell damping threshold ``mu1`` of the authors' code.
POWELL_MU1 = 0.2
#: Skip a BFGS update when ``s^T y <= SKIP_TOL * s^T s * ||g||``.
SKIP_TOL = 1e-4


def product(x: jax.Array, y: jax.Array, dtype=None) -> jax.Array:
  """``x @ y`` with the inputs cast to ``dtype`` (``None``: as they are),
  accumulated and returned in ``x``'s dtype."""
  if dtype is None or jnp.dtype(dtype) == x.dtype:
    return x @ y
  return jnp.matmul(x.astype(dtype), y.astype(dtype),
                    preferred_element_type=x.dtype)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den`` with a zero denominator replaced by one (result unused)."""
  return num / jnp.where(den == 0, jnp.ones_like(den), den)


def _symmetric_update(h, s, hy, rho, coef) -> jax.Array:
  """``h + coef s s^T - rho (s hy^T + hy s^T)`` as ``h +- u u^T - p p^T + q
  q^T``: ``u = sqrt(|coef|) s``, ``p, q = sqrt(rho / 2) (c s +- hy / c)``,
  ``c = sqrt(max|hy| / max|s|)``, for ``rho >= 0`` (an accepted pair has
  ``s^T y > 0``; a skipped one ``rho = 1``).

  The update is symmetric, but XLA may round its ``(i, j)`` and ``(j, i)``
  entries differently (fused multiply-adds, scalars moved between
  factors), and the asymmetry would accumulate over thousands of updates.
  Here every term is some ``x_i x_j``, the same product at both entries, so
  the result is symmetric to the last bit with no pass over the transpose
  (whose strided reads cost 3-5x the update on XLA:CPU). ``c`` gives ``c s``
  and ``hy / c`` equal norms, so ``p p^T - q q^T`` cancels no more than the
  products ``s hy^T`` themselves would; from the largest entries, which
  cannot overflow where ``s hy^T`` does not (``||hy||^2`` could).
  """
  ns, nh = jnp.max(jnp.abs(s)), jnp.max(jnp.abs(hy))
  c = jnp.sqrt(_safe_div(nh, ns))
  c = jnp.where((ns > 0) & (nh > 0), c, 1.0)
  w = jnp.sqrt(0.5 * jnp.abs(rho))
  u = jnp.sqrt(jnp.abs(coef)) * s
  p, q = w * (c * s + hy / c), w * (c * s - hy / c)
  return (h + jnp.sign(coef) * jnp.outer(u, u) - jnp.outer(p, p)
          + jnp.outer(q, q))


def _accept_pair(s: jax.Array, y: jax.Array, grad_norm: jax.Array,
                 skip_tol: float) -> jax.Array:
  """The skip rule: ``s^T y > skip_tol * s^T s * ||g||`` and all finite."""
  sy = jnp.vdot(s, y)
  ss = jnp.vdot(s, s)
  return (sy > skip_tol * ss * grad_norm) & (sy > 0) & jnp.isfinite(sy) & (
      jnp.isfinite(ss))


def bfgs_inverse_update(
    h: jax.Array,
    s: jax.Array,
    y: jax.Array,
    *,
    grad_norm: jax.Array,
    skip_tol: float = SKIP_TOL,
    valid: jax.Array = True,
    hy: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array]:
  r"""BFGS update of an inverse Hessian approximation, with the skip rule.

  With ``rho = 1 / s^T y`` (Nocedal and Wright, *Numerical Optimization*,
  eq. (6.17))::

      H+ = (I - rho s y^T) H (I - rho y s^T) + rho s s^T
         = H + (rho^2 y^T H y + rho) s s^T - rho (s (H y)^T + (H y) s^T),

  the second, ``O(d^2)`` form being what is computed, with its rank-two
  term written so that round-off cannot make it asymmetric
  (:func:`_symmetric_update`). The update is skipped (``H`` returned
  unchanged) when ``s^T y <= skip_tol * s^T s * grad_norm`` (the authors'
  rule, ``grad_norm`` being the norm of the mean pre-activation gradient for
  ``H_g`` and of the mean layer input for ``H_a``) or when the result is not
  finite.

  Args:
    h: ``(d, d)`` symmetric positive definite ``H``.
    s: ``(d,)`` step.
    y: ``(d,)`` gradient change.
    grad_norm: scalar of the skip rule.
    skip_tol: the skip rule's tolerance.
    valid: a boolean scalar; ``False`` skips the update as well.
    hy: ``H y``, if the caller has it (``None``: computed).

  Returns:
    ``(H+, updated)``: the new matrix and a boolean scalar, ``False`` when the
    update was skipped.
  """
  ok = _accept_pair(s, y, grad_norm, skip_tol) & valid
  rho = _safe_div(1.0, jnp.where(ok, jnp.vdot(s, y), 1.0))
  hy = h @ y if hy is None else hy
  coef = rho * rho * jnp.vdot(y, hy) + rho
  new_h = _symmetric_update(h, s, hy, rho, coef)
  # H+ is finite when the added terms' largest entry is (H is): O(d) work
  # instead of a pass over the (d, d) result.
  largest = (jnp.abs(coef) * jnp.max(s * s)
             + 2.0 * jnp.abs(rho) * jnp.max(jnp.abs(s)) * jnp.max(jnp.abs(hy)))
  ok = ok & jnp.isfinite(4.0 * largest)
  return jnp.where(ok, new_h, h), ok


def double_damping(
    s: jax.Array,
    y: jax.Array,
    hy: jax.Array,
    *,
    mu1: float = POWELL_MU1,
    mu2: float,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  r"""Powell then Levenberg-Marquardt-like damping of a pair (the paper's DD).

  * Powell: if ``s^T y < mu1 y^T H y``, ``t1 = (1 - mu1) y^T H y / (y^T H y -
    s^T y)`` and ``s <- t1 s + (1 - t1) H y``, which makes ``s^T y = mu1 y^T H
    y``.
  * Levenberg-Marquardt: then, if ``s^T y < mu2 s^T s``, ``t2 = (1 - mu2) s^T
    s / (s^T s - s^T y)`` and ``y <- t2 y + (1 - t2) s``, which makes ``s^T y
    = mu2 s^T s``.

  Afterwards ``s^T y >= mu2 ||s||^2 > 0`` whenever ``s != 0``, which is what
  bounds the eigenvalues of the updated ``H`` (see the tests for the bounds).

  Args:
    s: ``(d,)`` step.
    y: ``(d,)`` gradient change.
    hy: ``H y`` with the current ``H`` (a matrix product, or the L-BFGS
      operator).
    mu1: Powell threshold (0.2 in the authors' code).
    mu2: Levenberg-Marquardt threshold (``sqrt(damping)`` in the authors'
      code).

  Returns:
    ``(s, y, powell_fired, lm_fired)``.
  """
  sy = jnp.vdot(s, y)
  yhy = jnp.vdot(y, hy)
  powell = sy < mu1 * yhy
  t1 = _safe_div((1.0 - mu1) * yhy, yhy - sy)
  s = jnp.where(powell, t1 * s + (1.0 - t1) * hy, s)
  sy = jnp.vdot(s, y)
  ss = jnp.vdot(s, s)
  lm = sy < mu2 * ss
  t2 = _safe_div((1.0 - mu2) * ss, ss - sy)
  y = jnp.where(lm, t2 * y + (1.0 - t2) * s, y)
  return s, y, powell, lm


def hessian_action_pair(h_a: jax.Array, a_damped, abar: jax.Array, *,
                        matvec=jnp.matmul) -> tuple[jax.Array, jax.Array]:
  """The Hessian-action pair for ``H_a`` (docs/kbfgs.md, step 8).

  ``s_a = H_a abar`` and ``y_a = (A + sqrt(lambda) I) s_a``: a pair whose
  "Hessian" is exactly the damped ``A``, so BFGS updates of ``H_a`` with it
  track ``(A + sqrt(lambda) I)^-1`` without ever inverting it.

  Args:
    h_a: ``(k, k)`` current ``H_a``.
    a_damped: ``(k, k)`` ``A + sqrt(lambda) I``, or a function applying it
      to a vector (so that the damped matrix need not be formed).
    abar: ``(k,)`` mean (homogeneous) layer input (``h_a`` ``(n, s, s)``
      and ``abar`` ``(n, s)`` with ``matvec=_blocks.matvec``).
    matvec: ``(h_a, v) -> H_a v`` (the blocked form's, say).

  Returns:
    ``(s_a, y_a)``.
  """
  s_a = matvec(h_a, abar)
  return s_a, a_damped(s_a) if callable(a_damped) else matvec(a_damped, s_a)


class LBFGSMemory(NamedTuple):
  """The last ``p`` accepted pairs, oldest first (fixed shapes).

  Besides the pairs it keeps the small matrices of the compact form,
  updated in ``O(p d + p^2)`` per appended pair, so applying ``H`` needs no
  triangular solve.

  Attributes:
    s: ``(p, d)`` steps; the last ``num_pairs`` rows are valid, the others 0.
    y: ``(p, d)`` gradient changes, same layout.
    r_inv: ``(p, p)`` inverse of ``R = triu(S Y^T)``, with a unit diagonal in
      the empty slots (upper triangular).
    yy: ``(p, p)`` ``Y W Y^T``.
    sy: ``(p,)`` ``diag(S Y^T)`` (0 in the empty slots).
    num_pairs: int32 scalar, the number of valid rows (``<= p``).
    w: ``(d,)`` the diagonal of ``W`` in the initial matrix ``H_0 = gamma
      W`` (ones: ``gamma I``; K-BFGS's diagonal start sets it on the first
      step, while the memory is empty).
  """
  s: jax.Array
  y: jax.Array
  r_inv: jax.Array
  yy: jax.Array
  sy: jax.Array
  num_pairs: jax.Array
  w: jax.Array


def lbfgs_init(memory_size: int, dim: int, dtype=jnp.float32) -> LBFGSMemory:
  """An empty memory: ``H`` is ``gamma I`` until pairs arrive."""
  p = memory_size
  return LBFGSMemory(jnp.zeros((p, dim), dtype), jnp.zeros((p, dim), dtype),
                     jnp.eye(p, dtype=dtype), jnp.zeros((p, p), dtype),
                     jnp.zeros((p,), dtype), jnp.zeros([], jnp.int32),
                     jnp.ones((dim,), dtype))


def _shift(m: jax.Array, new_row: jax.Array, new_col: jax.Array,
           corner: jax.Array) -> jax.Array:
  """Drops row and column 0 of ``m`` and appends a last row and column."""
  inner = m[1:, 1:]
  top = jnp.concatenate([inner, new_col[:, None]], axis=1)
  bottom = jnp.concatenate([new_row, corner[None]])[None]
  return jnp.concatenate([top, bottom], axis=0)


def _unit_pair(s: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(s, y) / ||s||``: the same L-BFGS operator, representable numbers.

  The BFGS update, hence the L-BFGS operator, is invariant under the joint
  scaling ``(c s, c y)`` (every term is ``s s^T / s^T y`` or ``rho s y^T``),
  but the compact form stores ``1 / (s^T y)``: near a minimum float32 pairs
  of ``s ~ 1e-20`` made it ``~1e37`` and its products overflowed, freezing
  every later step. ``||s||`` is taken as ``max|s| * ||s / max|s|||``, so a
  tiny ``s`` does not underflow; ``s = 0`` is left as is (the skip rule
  rejects it).
  """
  peak = jnp.max(jnp.abs(s))
  safe = jnp.where(peak > 0, peak, 1.0)
  norm = safe * jnp.linalg.norm(s / safe)
  scale = jnp.where(peak > 0, 1.0 / norm, 1.0)
  return s * scale, y * scale


def lbfgs_append(
    memory: LBFGSMemory,
    s: jax.Array,
    y: jax.Array,
    *,
    grad_norm: jax.Array,
    skip_tol: float = SKIP_TOL,
    valid: jax.Array = True,
) -> tuple[LBFGSMemory, jax.Array]:
  """Appends ``(s, y)``, dropping the oldest pair (or empty slot); skip rule.

  The pair is skipped (memory unchanged) under the same rule as
  :func:`bfgs_inverse_update`: ``s^T y <= skip_tol * s^T s * grad_norm`` or a
  non-finite pair, or when ``valid`` is ``False``. It is stored scaled to
  ``||s|| = 1`` (:func:`_unit_pair`).

  ``R^-1`` is updated without a solve: dropping the first pair keeps the
  trailing block of the inverse of an upper triangular matrix, and the new
  column is ``[-R'^-1 u / d; 1 / d]`` with ``u = S' y``, ``d = s^T y`` (as in
  the authors' code).

  Returns:
    ``(memory, appended)``.
  """
  ok = _accept_pair(s, y, grad_norm, skip_tol) & valid
  ok = ok & jnp.all(jnp.isfinite(s)) & jnp.all(jnp.isfinite(y))
  dtype = memory.s.dtype
  s, y = _unit_pair(s.astype(dtype), y.astype(dtype))
  p = memory.s.shape[0]
  old_s, old_y = memory.s[1:], memory.y[1:]
  d = jnp.vdot(s, y)
  d_safe = jnp.where(ok, d, 1.0)
  u = old_s @ y                      # R's new column: s_i^T y, older pairs
  r_inv_old = memory.r_inv[1:, 1:]
  new_col = -(r_inv_old @ u) / d_safe
  r_inv = _shift(memory.r_inv, jnp.zeros((p - 1,), dtype), new_col,
                 1.0 / d_safe)
  wy = memory.w * y
  yy_col = old_y @ wy
  yy = _shift(memory.yy, yy_col, yy_col, jnp.vdot(y, wy))
  new = LBFGSMemory(
      s=jnp.concatenate([old_s, s[None]]),
      y=jnp.concatenate([old_y, y[None]]),
      r_inv=r_inv, yy=yy,
      sy=jnp.concatenate([memory.sy[1:], d[None]]),
      num_pairs=jnp.minimum(memory.num_pairs + 1, p), w=memory.w)
  ok = ok & jnp.all(jnp.isfinite(new_col))
  return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new,
                                memory), ok


def lbfgs_apply(memory: LBFGSMemory, v: jax.Array,
                gamma: float = 1.0, dtype=None) -> jax.Array:
  r"""Applies the L-BFGS inverse-Hessian operator ``H`` to ``v``.

  ``v`` is a vector ``(d,)`` or a matrix ``(c, d)`` whose *rows* are the
  vectors (``H`` is symmetric, so this is also ``v @ H``). Compact form
  (Byrd, Nocedal and Schnabel 1994, eq. (2.17), with ``H_0 = gamma W``,
  ``W = diag(memory.w)``), the rows of ``S, Y`` being the pairs::

      H = gamma W + S^T C S - gamma S^T R^-T Y W - gamma W Y^T R^-1 S,
      C = R^-T (D + gamma Y W Y^T) R^-1,

  ``R = triu(S Y^T)`` and ``D = diag(S Y^T)``; for rows ``V``::

      V H = gamma V W + (V S^T C - gamma V W Y^T R^-1) S
            - gamma (V S^T R^-T) Y W.

  Empty slots (zero rows, unit diagonal in ``R``) drop out exactly. Cost
  ``O(p^3)`` for ``C`` plus ``4 p d c`` for ``c`` rows: the work of ``c``
  two-loop recursions as a few matrix products.

  Args:
    memory: the pairs.
    v: ``(d,)`` or ``(c, d)``.
    gamma: the scale of the initial matrix ``gamma W``.
    dtype: the inputs' dtype of the four ``(c, d)``-sized products
      (:func:`product`); the ``p x p`` work stays in ``memory``'s dtype.

  Returns:
    ``H v`` (rows ``v_i H``), shaped like ``v``.
  """
  s, y, r_inv = memory.s, memory.y, memory.r_inv
  c = r_inv.T @ (jnp.diag(memory.sy) + gamma * memory.yy) @ r_inv
  rows = v[None] if v.ndim == 1 else v
  rows_w = rows * memory.w.astype(rows.dtype)
  vs = product(rows, s.T, dtype)
  vy = product(rows_w, y.T, dtype)
  out = (gamma * rows_w + product(vs @ c - gamma * (vy @ r_inv), s, dtype)
         - gamma * product(vs @ r_inv.T, y * memory.w, dtype))
  return out[0] if v.ndim == 1 else out


# --- The pre-activation factor H_g: K-BFGS's dense BFGS or K-BFGS(L)'s L-BFGS

#: Floor (ours) on the inverse curvature an accepted pair may give ``H_g``
#: (docs/kbfgs.md, "When H_g collapses: the floor and the reset").
H_FLOOR = 1e-6


def below_floor(s: jax.Array, y: jax.Array, floor: float) -> jax.Array:
  """Whether the pair puts ``H+`` below ``floor`` along ``y``.

  Every BFGS or L-BFGS update satisfies the secant equation ``H+ y = s``, so
  ``y^T H+ y / y^T y = s^T y / y^T y``, whatever ``H`` was: the pair alone
  fixes this Rayleigh quotient of the updated matrix, and ``s^T y < floor
  y^T y`` proves ``lambda_min(H+) < floor``.
  """
  return jnp.vdot(s, y) < floor * jnp.vdot(y, y)


def identity_where(where: jax.Array, h: jax.Array) -> jax.Array:
  """``h``, or ``I`` (a dense inverse's initial matrix) where ``where``."""
  return jnp.where(where, jnp.eye(h.shape[0], dtype=h.dtype), h)


def floor_or_reset(new_h: jax.Array, s: jax.Array, y: jax.Array,
                   updated: jax.Array, floor: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The floor rule for a dense inverse (ours; docs/kbfgs.md).

  An accepted update whose result has a Rayleigh quotient below ``floor``
  (along the pair's ``y``, see :func:`below_floor`, or along a coordinate
  axis: a diagonal entry) is replaced by a reset to ``I`` (the paper's
  initial matrix), and the pair is dropped. Both tests are ``O(d)`` and only prove
  ``lambda_min(H+) < floor`` (they never fire on a matrix above the floor);
  after double damping one pair lowers ``lambda_min`` by at most a factor
  ``1 + 1/mu1``, so the rule fires only on an ``H`` that has already drifted
  to within that factor of the floor.

  Args:
    new_h: ``(d, d)`` the updated matrix (the old one when the update was
      skipped).
    s, y: the (damped) pair of the update.
    updated: whether the update was applied.
    floor: the floor.

  Returns:
    ``(H, updated, reset)``.
  """
  reset = updated & (below_floor(s, y, floor)
                     | (jnp.min(jnp.diagonal(new_h)) < floor))
  return identity_where(reset, new_h), updated & ~reset, reset


@dataclasses.dataclass(frozen=True)
class DenseInverse:
  """K-BFGS's ``H_g``: a dense ``(d, d)`` inverse updated by BFGS, reset to
  ``I`` when an update would take it below ``floor`` (:func:`floor_or_reset`;
  a reset is reported as a skipped update)."""
  floor: float = H_FLOOR

  def init(self, dim: int, dtype) -> jax.Array:
    return jnp.eye(dim, dtype=dtype)

  def apply(self, h: jax.Array, v: jax.Array, dtype=None) -> jax.Array:
    """``H v`` for a vector, ``v H`` for the rows of a matrix (inputs in
    ``dtype``, :func:`product`)."""
    return product(v, h, dtype)

  def start(self, h: jax.Array, first: jax.Array, w: jax.Array) -> jax.Array:
    """``h``, or ``diag(w)`` where ``first`` (K-BFGS's diagonal start)."""
    return jnp.where(first, jnp.diag(w).astype(h.dtype), h)

  def apply_started(self, h: jax.Array, first: jax.Array, w: jax.Array,
                    v: jax.Array, dtype=None) -> jax.Array:
    """:meth:`apply` with :meth:`start`'s matrix, selected on the product
    (``v * w`` where ``first``) so the ``(d, d)`` matrix is not rewritten."""
    out = self.apply(h, v, dtype)
    return jnp.where(first, (v * w).astype(out.dtype), out)

  def update(self, h: jax.Array, s: jax.Array, y: jax.Array, hy=None,
             **skip_rule):
    """BFGS with the skip rule, then the floor (``hy``: ``H y`` if
    known)."""
    new_h, updated = bfgs_inverse_update(h, s, y, hy=hy, **skip_rule)
    new_h, updated, _ = floor_or_reset(new_h, s, y, updated, self.floor)
    return new_h, updated

  def reset_where(self, h: jax.Array, where: jax.Array) -> jax.Array:
    """``h``, or ``I`` (the paper's initial matrix) where ``where``."""
    return identity_where(where, h)


#: ``LimitedMemory(gamma=SCALED)``: ``H_0 = (s^T y / y^T y) I`` from the
#: newest pair (Nocedal and Wright, eq. (7.20)).
SCALED = "scaled"


def lbfgs_gamma(memory: LBFGSMemory, gamma: Any = 1.0) -> jax.Array:
  """The initial scale ``gamma`` of ``H_0 = gamma W``: ``gamma`` itself, or
  for ``"scaled"`` ``s^T y / y^T W y`` of the newest pair (1 while the
  memory is empty)."""
  if not (isinstance(gamma, str) and gamma == SCALED):
    return gamma
  sy, yy = memory.sy[-1], memory.yy[-1, -1]
  return jnp.where(memory.num_pairs > 0, _safe_div(sy, yy),
                   jnp.ones_like(sy))


@dataclasses.dataclass(frozen=True)
class LimitedMemory:
  """K-BFGS(L)'s ``H_g``: the L-BFGS operator of the last ``memory_size``
  pairs with initial matrix ``gamma W`` (``W = I``, or K-BFGS's diagonal
  start; ``gamma="scaled"``: ``s^T y / y^T W y`` of the newest pair). A pair
  that would put the operator below ``floor`` along its ``y``
  (:func:`below_floor`) empties the memory instead (reported as a skipped
  update)."""
  memory_size: int
  gamma: Any = 1.0
  floor: float = H_FLOOR

  def __post_init__(self):
    if isinstance(self.gamma, str) and self.gamma != SCALED:
      raise ValueError(f"kbfgs: lbfgs_gamma must be a positive number or "
                       f"{SCALED!r}, got {self.gamma!r}.")

  def init(self, dim: int, dtype) -> LBFGSMemory:
    return lbfgs_init(self.memory_size, dim, dtype)

  def apply(self, h: LBFGSMemory, v: jax.Array, dtype=None) -> jax.Array:
    return lbfgs_apply(h, v, lbfgs_gamma(h, self.gamma), dtype)

  def start(self, h: LBFGSMemory, first: jax.Array,
            w: jax.Array) -> LBFGSMemory:
    """``h``, or with ``H_0 = gamma diag(w)`` where ``first`` (K-BFGS's
    diagonal start; the memory is then empty, so ``yy`` stays 0)."""
    return h._replace(w=jnp.where(first, w.astype(h.w.dtype), h.w))

  def apply_started(self, h: LBFGSMemory, first: jax.Array, w: jax.Array,
                    v: jax.Array, dtype=None) -> jax.Array:
    return self.apply(self.start(h, first, w), v, dtype)

  def update(self, h: LBFGSMemory, s: jax.Array, y: jax.Array, hy=None,
             **skip_rule):
    """Appends the pair (``hy`` unused: the memory has no matrix)."""
    del hy
    new, appended = lbfgs_append(h, s, y, **skip_rule)
    reset = appended & below_floor(s, y, self.floor)
    return self.reset_where(new, reset), appended & ~reset

  def reset_where(self, h: LBFGSMemory, where: jax.Array) -> LBFGSMemory:
    """``h``, or the empty memory where ``where``."""
    return jax.tree_util.tree_map(lambda e, n: jnp.where(where, e, n),
                                  self.init(h.s.shape[1], h.s.dtype), h)
