"""K-BFGS on each layer kind against a NumPy reference, step by step.

The reference, `_KindReference`, is docs/kbfgs.md "Algorithm" in plain NumPy
(float64) for any network whose layers are dense layers over *rows*: it takes
a NumPy function giving, per layer, the rows it multiplies, the
pre-activation rows and the pre-activation gradients, and does the rest
(A from the rows with the bias coordinate, H_a by Hessian action, the pairs
from the row means of h and g_h, double damping, BFGS / two-loop L-BFGS of
H_g, momentum, the per-layer step t_l = -b_l / q_l, the displacement bound).
It generalises tests/test_kbfgs.py's `_Reference` (which hard-wires one MLP
whose rows are its examples) and is first checked against it on that MLP
(`test_generic_reference_equals_the_mlp_reference`).

The models' rows are formed here by NumPy code written for the purpose,
with hand-written forward and backward passes:

* a convolution (`nn.Conv`, stride (2, 1), 'SAME' padding with an uneven
  split) by an explicit im2col loop over output positions and window offsets,
  in the flattened Flax kernel order (*window, c_in), with the 'SAME' pads
  computed from the formula; A, mean h and mean g_h averaged over the batch
  and the spatial positions (KF-QN-CNN, arXiv 2102.06737);
* `nn.DenseGeneral` on a (batch, seq, d) input with two output axes, then one
  contracting two axes: rows = batch * seq;
* one `nn.Dense` module called twice (weight sharing): the rows of both calls
  pooled, the kernel gradient the sum over the calls.

Nothing on the NumPy side calls JAX, Flax or the library (no
conv_general_dilated_patches, no tap code), so a wrong patch order, padding,
row count, pooling or averaging in the library's layer kinds shows as a
mismatch. Each test draws fresh data and weights, and requires Powell damping
to fire in the reference (counted there, and compared with the library's
`num_powell`).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax
import optax_layerwise as olw
from tests.test_kbfgs import _batches as _mlp_batches
from tests.test_kbfgs import _bfgs
from tests.test_kbfgs import _forward_backward as _mlp_forward_backward
from tests.test_kbfgs import _init as _mlp_init
from tests.test_kbfgs import _Reference
from tests.test_kbfgs import _two_loop

H_FLOOR = 1e-6  # the library's floor on H_g (docs/kbfgs.md), below.


def _close(actual, desired, rtol, what=""):
  """Elementwise rtol, with an atol of rtol times the array's largest entry
  (entries that cancel to near zero carry their neighbours' round-off)."""
  desired = np.asarray(desired)
  np.testing.assert_allclose(actual, desired, rtol=rtol,
                             atol=rtol * float(np.abs(desired).max(initial=0)),
                             err_msg=what)

# ---------------------------------------------------------------------------
# The reference: K-BFGS for layers given as rows.
# ---------------------------------------------------------------------------


class _KindReference:
  """K-BFGS / K-BFGS(L) on a network given by `net(w, b, x, t) -> (rows,
  pre, dh, gw, gb)`: per layer l the (n_l, d_in) rows it multiplied (all
  calls pooled), its (n_l, d_out) pre-activations and dL/dh, and the loss
  gradient of its (d_in, d_out) kernel matrix w[l] and bias b[l] (or None).
  """

  def __init__(self, net, w, b, *, lr, damping, momentum, weight_decay, decay,
               memory, mu1=0.2, skip_tol=1e-4, max_relative_change=None,
               step_rule="layerwise", max_step_scale=10.0):
    self.net = net
    self.w = [np.array(x, np.float64) for x in w]
    self.b = [None if x is None else np.array(x, np.float64) for x in b]
    self.lr, self.lam, self.mom, self.tau = lr, damping, momentum, weight_decay
    self.beta, self.memory, self.mu1, self.tol = decay, memory, mu1, skip_tol
    self.mu2 = math.sqrt(damping)
    self.rho = max_relative_change
    self.step_rule, self.max_t = step_rule, max_step_scale
    num = self.num = len(self.w)
    self.k = [x.shape[0] + (bb is not None) for x, bb in zip(self.w, self.b)]
    d_out = [x.shape[1] for x in self.w]
    self.A = [np.zeros((k, k)) for k in self.k]
    self.Ha = [np.eye(k) for k in self.k]
    self.Hg = [np.eye(d) for d in d_out]
    self.pairs = [[] for _ in range(num)]
    self.s = [np.zeros(d) for d in d_out]
    self.y = [np.zeros(d) for d in d_out]
    self.Mw = [np.zeros_like(x) for x in self.w]
    self.Mb = [None if x is None else np.zeros_like(x) for x in self.b]
    self.t = np.ones(num)
    self.count = 0
    for name in ("powell", "lm", "skipped", "skipped_a", "resets",
                 "fallbacks", "clipped", "unclipped", "bounded"):
      setattr(self, name, np.zeros(num, int))

  def _hg(self, l, v):
    if self.memory is None:
      return self.Hg[l] @ v
    if v.ndim == 1:
      return _two_loop(self.pairs[l], v, 1.0)
    return np.stack([_two_loop(self.pairs[l], c, 1.0) for c in v.T], 1)

  def _stack(self, w, b):
    return w if b is None else np.concatenate([w, b[None]], 0)

  def step(self, x, t):
    lr = self.lr
    rows, pre, dh, gw, gb = self.net(self.w, self.b, x, t)
    # 1. Statistics at theta, per layer over its own n_l rows.
    abar, gh_mean, h_mean = [], [], []
    for l in range(self.num):
      n = rows[l].shape[0]
      at = rows[l]
      if self.b[l] is not None:
        at = np.concatenate([at, np.ones((n, 1))], 1)
      a_batch = np.einsum("ri,rj->ij", at, at) / n
      self.A[l] = a_batch if self.count == 0 else (
          self.beta * self.A[l] + (1 - self.beta) * a_batch)
      abar.append(at.mean(0))
      gh_mean.append((n * dh[l]).mean(0))   # g_h = n_l dL/dh per row
      h_mean.append(pre[l].mean(0))
    a_lm = [self.A[l] + math.sqrt(self.lam) * np.eye(self.k[l])
            for l in range(self.num)]
    if self.count == 0:
      self.Ha = [np.linalg.inv(m) for m in a_lm]
    # 2-3. Momentum of the regularised gradient; the trial step.
    trial, caps = [], []
    for l in range(self.num):
      self.Mw[l] = self.mom * self.Mw[l] + (1 - self.mom) * (
          gw[l] + self.tau * self.w[l])
      if self.b[l] is not None:
        self.Mb[l] = self.mom * self.Mb[l] + (1 - self.mom) * (
            gb[l] + self.tau * self.b[l])
      mat = self._stack(self.Mw[l], self.Mb[l])
      p = -lr * self._hg(l, (self.Ha[l] @ mat).T).T
      theta = np.linalg.norm(self._stack(self.w[l], self.b[l]))
      cap = np.inf
      if self.rho is not None and np.linalg.norm(p) > 0 and theta > 0:
        ratio = self.rho * theta / np.linalg.norm(p)
        if ratio < 1:
          p, self.bounded[l] = p * ratio, self.bounded[l] + 1
        cap = max(ratio, 1.0)
      trial.append(p)
      caps.append(cap)
    split = lambda l, p: (p[:self.w[l].shape[0]],
                          None if self.b[l] is None else p[-1])
    moved = [split(l, p) for l, p in enumerate(trial)]
    new_w = [w + d for w, (d, _) in zip(self.w, moved)]
    new_b = [None if b is None else b + d for b, (_, d) in zip(self.b, moved)]
    # 4. Second pass, same batch, at theta + delta.
    _, pre2, dh2, gw2, gb2 = self.net(new_w, new_b, x, t)
    if self.step_rule == "layerwise":
      for l in range(self.num):
        g0 = self._stack(gw[l], gb[l]).ravel()
        g1 = self._stack(gw2[l], gb2[l]).ravel()
        delta = trial[l].ravel()
        b_l, q_l = g0 @ delta, delta @ (g1 - g0)
        if q_l > 0 and b_l < 0:
          self.clipped[l] += -b_l / q_l > self.max_t
          self.unclipped[l] += -b_l / q_l <= self.max_t
          self.t[l] = min(-b_l / q_l, self.max_t)
        else:
          self.fallbacks[l] += 1   # reuse the last t_l
        self.t[l] = min(self.t[l], caps[l])
      final = [split(l, self.t[l] * p) for l, p in enumerate(trial)]
      new_w = [w + d for w, (d, _) in zip(self.w, final)]
      new_b = [None if b is None else b + d
               for b, (_, d) in zip(self.b, final)]
    for l in range(self.num):
      n = pre2[l].shape[0]
      s_new = pre2[l].mean(0) - h_mean[l]
      y_new = (n * dh2[l]).mean(0) - gh_mean[l]
      self.s[l] = self.beta * self.s[l] + (1 - self.beta) * s_new
      self.y[l] = self.beta * self.y[l] + (1 - self.beta) * y_new
      s, y = self.s[l].copy(), self.y[l].copy()
      # 5. Double damping.
      hy = self._hg(l, y)
      if s @ y < self.mu1 * (y @ hy):
        t1 = (1 - self.mu1) * (y @ hy) / (y @ hy - s @ y)
        s = t1 * s + (1 - t1) * hy
        self.powell[l] += 1
      if s @ y < self.mu2 * (s @ s):
        t2 = (1 - self.mu2) * (s @ s) / (s @ s - s @ y)
        y = t2 * y + (1 - t2) * s
        self.lm[l] += 1
      # 6. H_g, with the skip rule and the library's floor (a reset to the
      # initial operator, counted as skipped).
      gnorm = np.linalg.norm(gh_mean[l])
      sy = s @ y
      if not (sy > self.tol * (s @ s) * gnorm and sy > 0):
        self.skipped[l] += 1
      elif self.memory is None:
        new = _bfgs(self.Hg[l], s, y, gnorm, self.tol)
        if sy < H_FLOOR * (y @ y) or np.diag(new).min() < H_FLOOR:
          self.Hg[l], self.skipped[l] = np.eye(len(s)), self.skipped[l] + 1
          self.resets[l] += 1
        else:
          self.Hg[l] = new
      elif sy < H_FLOOR * (y @ y):
        self.pairs[l], self.skipped[l] = [], self.skipped[l] + 1
        self.resets[l] += 1
      else:
        self.pairs[l] = (self.pairs[l] + [(s, y)])[-self.memory:]
      # 7. H_a by Hessian action.
      s_a = self.Ha[l] @ abar[l]
      new = _bfgs(self.Ha[l], s_a, a_lm[l] @ s_a, np.linalg.norm(abar[l]),
                  self.tol)
      if new is None:
        self.skipped_a[l] += 1
      else:
        self.Ha[l] = new
    self.w, self.b = new_w, new_b
    self.count += 1


def test_generic_reference_equals_the_mlp_reference():
  """On test_kbfgs's MLP (rows = examples) the generic reference is the
  verified `_Reference`, to round-off, for K-BFGS and K-BFGS(L), both step
  rules, bounded or not; an outlier batch makes Powell damping fire."""
  for memory, rule, rho in ((None, "layerwise", None), (2, "fixed", 0.05),
                            (3, "layerwise", 0.05)):
    hyper = dict(damping=0.81, momentum=0.8, weight_decay=1e-2, decay=0.95,
                 memory=memory, max_relative_change=rho, step_rule=rule)
    for _ in range(20):  # Powell fires on ~97% of draws
      seed = np.random.SeedSequence().entropy % 2**31
      w, b = _mlp_init(seed)
      batches = _mlp_batches(seed + 1, 6)
      batches[2] = (batches[2][0], 30.0 * batches[2][1])
      old = _Reference(w, b, lr=lambda _: 0.3, **hyper)
      new = _KindReference(_mlp_forward_backward, w, b, lr=0.3, **hyper)
      for x, t in batches:
        old.step(x, t)
        new.step(x, t)
        # Same arithmetic up to einsum vs a sum of outer products, and the
        # bound written as a ratio: round-off only.
        for l in range(3):
          for mine, theirs in ((new.w, old.w), (new.b, old.b), (new.A, old.A),
                               (new.Ha, old.Ha), (new.Hg, old.Hg),
                               (new.s, old.s), (new.y, old.y),
                               (new.Mw, old.Mw)):
            if theirs[l] is not None:
              _close(mine[l], theirs[l], 1e-11)
          assert len(new.pairs[l]) == len(old.pairs[l])
          for (s1, y1), (s2, y2) in zip(new.pairs[l], old.pairs[l]):
            _close(s1, s2, 1e-11)
            _close(y1, y2, 1e-11)
        _close(new.t, old.t, 1e-11)
      for name in ("powell", "lm", "skipped", "skipped_a", "fallbacks",
                   "clipped"):
        np.testing.assert_array_equal(getattr(new, name), getattr(old, name))
      assert not np.any(new.resets)
      if np.any(new.powell):
        break
    assert np.any(new.powell), "no draw fired Powell damping"
