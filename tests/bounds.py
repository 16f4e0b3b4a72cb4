"""Eigenvalue bounds that double damping guarantees for BFGS and L-BFGS.

Shared by the K-BFGS long-run test (test_long_runs.py); test_bfgs.py derives
the same bounds inline (see the comment block there for the derivation):

Let ``H > 0`` be the inverse-Hessian approximation before an update whose
pair was damped by Powell (threshold ``mu1``) then Levenberg-Marquardt
(``mu2``). With ``R = max(1, 1 / (mu1 lmin(H)))``::

    lmax(H+) <= lmax(H) R^2 / mu2^2 + 1 / mu2                        (U)
    lmin(H+) >= 1 / (1 / lmin(H) + R^2 / mu2)                        (D)

For the L-BFGS operator of stored (damped) pairs from ``gamma W`` (``W``
diagonal, ``I`` or the diagonal start), the same
per-update argument with each pair's own ratios ``||y||^2 / s^T y`` and
``||s||^2 / s^T y`` gives the bounds of :func:`lbfgs_operator_bounds`.
"""

import numpy as np


def dense_update_bounds(lam_min, lam_max, mu1, mu2):
  """Bounds ``(D), (U)`` on the eigenvalues after one damped BFGS update.

  Args:
    lam_min, lam_max: extreme eigenvalues of ``H`` before the update (arrays
      broadcast).
    mu1, mu2: the Powell and Levenberg-Marquardt thresholds.

  Returns:
    ``(lo, hi)`` with ``lo <= lmin(H+)`` and ``lmax(H+) <= hi``.
  """
  lam_min = np.asarray(lam_min, np.float64)
  big_r = np.maximum(1.0, 1.0 / (mu1 * lam_min))
  hi = np.asarray(lam_max, np.float64) * big_r ** 2 / mu2 ** 2 + 1.0 / mu2
  lo = 1.0 / (1.0 / lam_min + big_r ** 2 / mu2)
  return lo, hi


def lbfgs_operator_bounds(s, y, num_pairs, w=None, gamma=1.0):
  """Eigenvalue bounds of L-BFGS operators from their stored pairs.

  Args:
    s, y: ``(..., p, d)`` stored pairs, oldest first; the last ``num_pairs``
      rows are valid (the layout of ``_bfgs.LBFGSMemory``).
    num_pairs: ``(...,)`` valid rows.
    w: ``(..., d)`` the diagonal of ``W`` (``None``: ones).
    gamma: the initial matrix ``gamma W``.

  Returns:
    ``(lo, hi)``, each ``(...,)``.
  """
  s = np.asarray(s, np.float64)
  y = np.asarray(y, np.float64)
  num_pairs = np.asarray(num_pairs)
  p = s.shape[-2]
  w = np.ones(s.shape[:-2] + s.shape[-1:]) if w is None else np.asarray(
      w, np.float64)
  lo = float(gamma) * w.min(-1) * np.ones(num_pairs.shape)
  hi = float(gamma) * w.max(-1) * np.ones(num_pairs.shape)
  for j in range(p):
    valid = j >= p - num_pairs
    sj, yj = s[..., j, :], y[..., j, :]
    ss = np.sum(sj * sj, -1)
    yy = np.sum(yj * yj, -1)
    sy = np.where(valid, np.sum(sj * yj, -1), 1.0)
    hi = np.where(valid, hi * yy * ss / sy ** 2 + ss / sy, hi)
    lo = np.where(valid, 1.0 / (1.0 / lo + yy / sy), lo)
  return lo, hi
