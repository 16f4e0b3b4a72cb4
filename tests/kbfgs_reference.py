"""K-BFGS / K-BFGS(L) in plain NumPy (float64): docs/kbfgs.md, "Algorithm".

Shared by tests/test_kbfgs.py (a hand-written MLP, whose rows are its
examples) and tests/test_kinds_reference.py (convolutions, DenseGeneral, a
shared kernel, an nn.scan stack, whose rows are formed by hand there).

`KBFGSReference` takes the network as a NumPy function giving, per layer, the
rows it multiplies, the pre-activation rows and the pre-activation gradients,
and does the rest: A from the rows with the bias coordinate, H_a by Hessian
action, the pairs from the row means of h and g_h, double damping, BFGS /
two-loop L-BFGS of H_g with the library's floor, momentum, the per-layer step
t_l = -b_l / q_l, the displacement bound, the factor and step-size intervals,
and the row-sampled estimates (A and the q_l's gradients from every s-th row,
scaled by n / k), and A and H_a in diagonal blocks (`block_size`: A's
off-diagonal blocks zeroed, H_a's Hessian-action update block by block).
It shares no code with the library (L-BFGS is the two-loop recursion here,
the compact representation there; BFGS the textbook product form here).
"""

import math

import numpy as np

H_FLOOR = 1e-6  # the library's floor on H_g (docs/kbfgs.md).


def bfgs(h, s, y, gnorm, tol):
  """Inverse BFGS, textbook product form; None when skipped."""
  sy = s @ y
  if not (sy > tol * (s @ s) * gnorm and sy > 0):
    return None
  rho = 1.0 / sy
  eye = np.eye(len(s))
  new = (eye - rho * np.outer(s, y)) @ h @ (eye - rho * np.outer(y, s)) + (
      rho * np.outer(s, s))
  return new if np.all(np.isfinite(new)) else None


def block_slices(k, block_size):
  """The index ranges of k inputs in n = ceil(k / block_size) consecutive
  blocks of ceil(k / n), the last one shorter; one block for None."""
  if block_size is None or k <= block_size:
    return [slice(0, k)]
  n = -(-k // block_size)
  size = -(-k // n)
  return [slice(i * size, min((i + 1) * size, k)) for i in range(n)]


def block_mask(k, block_size):
  """1 on the diagonal blocks of a (k, k) matrix, 0 off them."""
  mask = np.zeros((k, k))
  for sl in block_slices(k, block_size):
    mask[sl, sl] = 1.0
  return mask


def from_blocks(blocks, k):
  """The (k, k) block-diagonal matrix of the library's (n, s, s) blocks
  (padded indices dropped)."""
  blocks = np.asarray(blocks)
  n, s, _ = blocks.shape
  full = np.zeros((n * s, n * s), blocks.dtype)
  for i in range(n):
    full[i * s:(i + 1) * s, i * s:(i + 1) * s] = blocks[i]
  return full[:k, :k]


def two_loop(pairs, v, gamma):
  """L-BFGS H v by the two-loop recursion, pairs oldest first; H_0 =
  diag(gamma) (Nocedal and Wright, Algorithm 7.4; gamma a number or a
  vector)."""
  q = v.copy()
  alphas = []
  for s, y in reversed(pairs):
    alpha = (s @ q) / (s @ y)
    alphas.append(alpha)
    q = q - alpha * y
  r = gamma * q
  for (s, y), alpha in zip(pairs, reversed(alphas)):
    beta = (y @ r) / (s @ y)
    r = r + s * (alpha - beta)
  return r


class KBFGSReference:
  """K-BFGS / K-BFGS(L) on a network given by `net(w, b, x, t) -> (rows,
  pre, dh, gw, gb)`: per layer l the (n_l, d_in) rows it multiplied (all
  calls pooled), its (n_l, d_out) pre-activations and dL/dh, and the loss
  gradient of its (d_in, d_out) kernel matrix w[l] and bias b[l] (or None).

  `lr` is a number or a schedule `count -> lr`. Besides the state, it
  records per layer-step the relative step lr ||P_l|| / ||[W_l; b_l]||
  before the bound (`relative_steps`) and every measured -b_l / q_l
  (`raw_t`), and counts the damping, skips, resets and step-size outcomes.
  """

  def __init__(self, net, w, b, *, lr, damping, momentum, weight_decay, decay,
               memory, mu1=0.2, skip_tol=1e-4, max_relative_change=None,
               step_rule="layerwise", max_step_scale=10.0, factor_interval=1,
               step_size_interval=1, a_stride=1, q_stride=1,
               hg_init="identity", block_size=None):
    self.net = net
    self.w = [np.array(x, np.float64) for x in w]
    self.b = [None if x is None else np.array(x, np.float64) for x in b]
    self.lr, self.lam, self.mom, self.tau = lr, damping, momentum, weight_decay
    self.beta, self.memory, self.mu1, self.tol = decay, memory, mu1, skip_tol
    self.mu2 = math.sqrt(damping)
    self.rho = max_relative_change
    self.step_rule, self.max_t = step_rule, max_step_scale
    self.interval = factor_interval  # A and H_a refreshed every k steps
    self.ss_interval = step_size_interval  # t_l measured every k steps
    self.a_stride, self.q_stride = a_stride, q_stride  # sampled rows
    # "diagonal": H_g = diag(1 / (D + 0.1)) first; or one per layer.
    self.hg_init = ([hg_init] * len(w) if isinstance(hg_init, str)
                    else list(hg_init))
    num = self.num = len(self.w)
    self.k = [x.shape[0] + (bb is not None) for x, bb in zip(self.w, self.b)]
    d_out = [x.shape[1] for x in self.w]
    self.block_size = block_size
    self.A = [np.zeros((k, k)) for k in self.k]
    self.Ha = [np.eye(k) for k in self.k]
    self.Hg = [np.eye(d) for d in d_out]
    self.pairs = [[] for _ in range(num)]
    self.H0 = [np.ones(d) for d in d_out]  # K-BFGS(L)'s diagonal H_0
    self.s = [np.zeros(d) for d in d_out]
    self.y = [np.zeros(d) for d in d_out]
    self.Mw = [np.zeros_like(x) for x in self.w]
    self.Mb = [None if x is None else np.zeros_like(x) for x in self.b]
    self.t = np.ones(num)
    self.relative_steps = []  # lr ||P_l|| / ||[W_l; b_l]|| before the bound
    self.raw_t = []           # every measured -b_l / q_l
    self.count = 0
    for name in ("powell", "lm", "skipped", "skipped_a", "resets",
                 "fallbacks", "clipped", "unclipped", "bounded"):
      setattr(self, name, np.zeros(num, int))

  def _hg(self, l, v):
    if self.memory is None:
      return self.Hg[l] @ v
    if v.ndim == 1:
      return two_loop(self.pairs[l], v, self.H0[l])
    return np.stack([two_loop(self.pairs[l], c, self.H0[l]) for c in v.T], 1)

  def _stride(self, stride, rows):
    """The stride raised until it is coprime with the rows per example."""
    positions = rows.shape[0] // self.batch
    while stride > 1 and math.gcd(stride, positions) > 1:
      stride += 1
    return stride

  def _sampled_grad(self, l, rows, dh):
    """(n / k) sum over every q_stride-th row of [a_i; 1] dL/dh_i."""
    s = self._stride(self.q_stride, rows[l])
    a, g = rows[l][::s], dh[l][::s]
    scale = rows[l].shape[0] / len(a)
    grad_b = None if self.b[l] is None else scale * g.sum(0)
    return self._stack(scale * a.T @ g, grad_b).ravel()

  def _stack(self, w, b):
    return w if b is None else np.concatenate([w, b[None]], 0)

  def step(self, x, t):
    lr = self.lr(self.count) if callable(self.lr) else self.lr
    refresh = self.count % self.interval == 0
    rows, pre, dh, gw, gb = self.net(self.w, self.b, x, t)
    self.batch = x.shape[0]
    # 1. Statistics at theta, per layer over its own n_l rows.
    abar, gh_mean, h_mean = [], [], []
    for l in range(self.num):
      n = rows[l].shape[0]
      at = rows[l]
      if self.b[l] is not None:
        at = np.concatenate([at, np.ones((n, 1))], 1)
      # Every s-th row, with its bias coordinate.
      sub = at[::self._stride(self.a_stride, at)]
      a_batch = sub.T @ sub / len(sub) * block_mask(self.k[l],
                                                    self.block_size)
      if refresh:
        self.A[l] = a_batch if self.count == 0 else (
            self.beta * self.A[l] + (1 - self.beta) * a_batch)
      abar.append(at.mean(0))
      gh_mean.append((n * dh[l]).mean(0))   # g_h = n_l dL/dh per row
      h_mean.append(pre[l].mean(0))
    a_lm = [self.A[l] + math.sqrt(self.lam) * np.eye(self.k[l])
            for l in range(self.num)]
    if self.count == 0:
      self.Ha = [np.linalg.inv(m) for m in a_lm]
      for l in range(self.num):  # ours: from A's rows' (n dL/dh)^2
        if self.hg_init[l] == "diagonal":
          n = rows[l].shape[0]
          g = n * dh[l][::self._stride(self.a_stride, rows[l])]
          d = (g * g).mean(0)
          self.H0[l] = 1.0 / (d / d.mean() + 0.1)
          self.Hg[l] = np.diag(self.H0[l])
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
      self.relative_steps.append(
          np.linalg.norm(p) / theta if theta > 0 else np.inf)
      cap = np.inf
      if self.rho is not None and np.linalg.norm(p) > 0 and theta > 0:
        ratio = self.rho * theta / np.linalg.norm(p)
        if ratio < 1:  # ours: ||delta_l|| <= rho ||theta_l||
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
    rows2, pre2, dh2, gw2, gb2 = self.net(new_w, new_b, x, t)
    if self.step_rule == "layerwise":
      # The per-layer step (ours): t_l = -b_l / q_l, safeguarded.
      for l in range(self.num):
        g0 = self._stack(gw[l], gb[l]).ravel()
        g1 = self._stack(gw2[l], gb2[l]).ravel()
        delta = trial[l].ravel()
        b_l, q_l = g0 @ delta, delta @ (g1 - g0)
        if self.q_stride > 1:  # q_l from both gradients of every s-th row
          q_l = delta @ (self._sampled_grad(l, rows2, dh2)
                         - self._sampled_grad(l, rows, dh))
        if self.count % self.ss_interval:
          pass                     # not measured: reuse the last t_l
        elif q_l > 0 and b_l < 0:
          self.raw_t.append(-b_l / q_l)
          self.clipped[l] += -b_l / q_l > self.max_t
          self.unclipped[l] += -b_l / q_l <= self.max_t
          self.t[l] = min(-b_l / q_l, self.max_t)
        else:
          self.fallbacks[l] += 1   # reuse the last accepted t_l
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
        new = bfgs(self.Hg[l], s, y, gnorm, self.tol)
        if new is None:            # not finite
          self.skipped[l] += 1
        elif sy < H_FLOOR * (y @ y) or np.diag(new).min() < H_FLOOR:
          self.Hg[l], self.skipped[l] = np.eye(len(s)), self.skipped[l] + 1
          self.resets[l] += 1
        else:
          self.Hg[l] = new
      elif sy < H_FLOOR * (y @ y):  # a reset to H_0 = I
        self.pairs[l], self.skipped[l] = [], self.skipped[l] + 1
        self.H0[l] = np.ones_like(self.H0[l])
        self.resets[l] += 1
      else:
        self.pairs[l] = (self.pairs[l] + [(s, y)])[-self.memory:]
      # 7. H_a by Hessian action.
      if not refresh:
        continue
      skipped = False
      for sl in block_slices(self.k[l], self.block_size):
        h, a = self.Ha[l][sl, sl], abar[l][sl]
        if not np.any(a):  # no pair (zero inputs' mean): not a skip
          continue
        s_a = h @ a
        new = bfgs(h, s_a, a_lm[l][sl, sl] @ s_a, np.linalg.norm(a),
                   self.tol)
        if new is None:
          skipped = True
        else:
          self.Ha[l][sl, sl] = new
      self.skipped_a[l] += skipped
    self.w, self.b = new_w, new_b
    self.count += 1
