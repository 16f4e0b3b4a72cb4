"""K-BFGS on each layer kind against a NumPy reference, step by step.

The reference, `KBFGSReference` (tests/kbfgs_reference.py), is docs/kbfgs.md
"Algorithm" in plain NumPy (float64) for any network whose layers are dense
layers over *rows*: it takes a NumPy function giving, per layer, the rows it
multiplies, the pre-activation rows and the pre-activation gradients, and
does the rest (A from the rows with the bias coordinate, H_a by Hessian
action, the pairs from the row means of h and g_h, double damping, BFGS /
two-loop L-BFGS of H_g, momentum, the per-layer step t_l = -b_l / q_l, the
displacement bound). tests/test_kbfgs.py's `_Reference` is the same class on
an MLP whose rows are its examples, checked there against the library in
plain JAX, linen and NNX, with schedules and update intervals.

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
  pooled, the kernel gradient the sum over the calls;
* a stack of `nn.Dense` + tanh blocks scanned by `nn.scan` over a leading
  params axis (kernels (L, d, d), biases (L, d)), then a dense head: the
  reference is the unrolled net, each slice its own layer whose rows are that
  slice's inputs; the library's per-slice factors (`kbfgs_layer_names`
  "['stack']['Dense_0'][j]", listed after the head) are matched to the
  reference's layers by name.

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
from tests.kbfgs_reference import KBFGSReference
from tests.kbfgs_reference import from_blocks


def _close(actual, desired, rtol, what=""):
  """Elementwise rtol, with an atol of rtol times the array's largest entry
  (entries that cancel to near zero carry their neighbours' round-off)."""
  desired = np.asarray(desired)
  np.testing.assert_allclose(actual, desired, rtol=rtol,
                             atol=rtol * float(np.abs(desired).max(initial=0)),
                             err_msg=what)


# ---------------------------------------------------------------------------
# The models: NumPy (rows by hand) and Flax linen (tapped by the library).
# ---------------------------------------------------------------------------


def _same_pads(size, window, stride):
  """'SAME': ceil(size / stride) outputs; the padding split low-first."""
  out = -(-size // stride)
  total = max((out - 1) * stride + window - size, 0)
  return (total // 2, total - total // 2), out


def _im2col(x, window, strides):
  """(n * positions, prod(window) * c_in) patches of a 'SAME' 2-D conv, by
  loops over output positions and window offsets, features ordered as the
  flattened Flax kernel (*window, c_in); rows ordered (n, o0, o1)."""
  n, size0, size1, c_in = x.shape
  (pad0, out0) = _same_pads(size0, window[0], strides[0])
  (pad1, out1) = _same_pads(size1, window[1], strides[1])
  padded = np.zeros((n, size0 + sum(pad0), size1 + sum(pad1), c_in))
  padded[:, pad0[0]:pad0[0] + size0, pad1[0]:pad1[0] + size1] = x
  cols = np.empty((n, out0, out1, window[0], window[1], c_in))
  for i in range(out0):
    for j in range(out1):
      for u in range(window[0]):
        for v in range(window[1]):
          cols[:, i, j, u, v] = padded[:, i * strides[0] + u,
                                       j * strides[1] + v]
  return cols.reshape(n * out0 * out1, -1), (out0, out1)


def _tanh_grad(pre):
  return 1.0 - np.tanh(pre) ** 2


class _ConvCase:
  """conv (3x2 window, stride (2, 1), 'SAME', bias) -> tanh -> flatten ->
  dense head without bias. Input 5x6x2: the 'SAME' pads are (1, 1) and
  (0, 1), 3x6 output positions."""
  name = "conv"
  n, spatial, c_in, window, strides, c_out, n_out = 6, (5, 6), 2, (3, 2), (
      2, 1), 3, 2
  layers = ("conv", "head")
  positions = 18

  def shapes(self):
    kernel = self.window + (self.c_in, self.c_out)
    return {"conv": (kernel, (self.c_out,)),
            "head": ((self.positions * self.c_out, self.n_out), None)}

  def numpy_net(self, w, b, x, t):
    n = x.shape[0]
    rows, _ = _im2col(x, self.window, self.strides)
    h1 = rows @ w[0] + b[0]                       # (n * positions, c_out)
    a1 = np.tanh(h1).reshape(n, -1)                # Flax's reshape, (o0, o1, c)
    z = a1 @ w[1]
    dz = (z - t) / n                               # 0.5 mean_n ||z - t||^2
    dh1 = (dz @ w[1].T).reshape(h1.shape) * _tanh_grad(h1)
    return ([rows, a1], [h1, z], [dh1, dz], [rows.T @ dh1, a1.T @ dz],
            [dh1.sum(0), None])

  def model(self):
    case = self

    class Net(nn.Module):

      @nn.compact
      def __call__(self, x):
        h = nn.Conv(case.c_out, case.window, strides=case.strides,
                    padding="SAME", name="conv")(x)
        return nn.Dense(case.n_out, use_bias=False, name="head")(
            jnp.tanh(h).reshape(x.shape[0], -1))

    return Net()

  def data(self, rng, num):
    out = []
    for _ in range(num):
      x = rng.normal(size=(self.n,) + self.spatial + (self.c_in,))
      t = np.sin(2 * x.reshape(self.n, -1)[:, :self.n_out]) + (
          0.1 * rng.normal(size=(self.n, self.n_out)))
      out.append((x, t))
    return out


class _SeqCase:
  """DenseGeneral d -> (2, 3) on (batch, seq, d), tanh, then DenseGeneral
  contracting the two axes (2, 3) -> n_out: rows = batch * seq."""
  name = "seq"
  n, seq, d, n_out = 3, 4, 4, 2
  layers = ("a_proj", "b_out")  # flatten order is alphabetical

  def shapes(self):
    return {"a_proj": ((self.d, 2, 3), (2, 3)),
            "b_out": ((2, 3, self.n_out), (self.n_out,))}

  def numpy_net(self, w, b, x, t):
    n = x.shape[0]
    rows = x.reshape(-1, self.d)                   # (n * seq, d)
    h1 = rows @ w[0] + b[0]
    a1 = np.tanh(h1)                               # (n * seq, 6)
    z = a1 @ w[1] + b[1]
    dz = (z - t.reshape(z.shape)) / n              # mean over the batch only
    dh1 = (dz @ w[1].T) * _tanh_grad(h1)
    return ([rows, a1], [h1, z], [dh1, dz], [rows.T @ dh1, a1.T @ dz],
            [dh1.sum(0), dz.sum(0)])

  def model(self):
    case = self

    class Net(nn.Module):

      @nn.compact
      def __call__(self, x):
        h = nn.DenseGeneral((2, 3), name="a_proj")(x)       # (n, seq, 2, 3)
        return nn.DenseGeneral(case.n_out, axis=(-2, -1), name="b_out")(
            jnp.tanh(h))

    return Net()

  def data(self, rng, num):
    out = []
    for _ in range(num):
      x = rng.normal(size=(self.n, self.seq, self.d))
      t = np.sin(2 * x[..., :self.n_out]) + 0.1 * rng.normal(
          size=(self.n, self.seq, self.n_out))
      out.append((x, t))
    return out


class _SharedCase:
  """One nn.Dense module called twice (tanh between), then a head: the
  shared kernel's rows are the inputs of both calls, pooled."""
  name = "shared"
  n, d, n_out = 8, 4, 2
  layers = ("a_shared", "b_head")

  def shapes(self):
    return {"a_shared": ((self.d, self.d), (self.d,)),
            "b_head": ((self.d, self.n_out), (self.n_out,))}

  def numpy_net(self, w, b, x, t):
    n = x.shape[0]
    h1 = x @ w[0] + b[0]
    a1 = np.tanh(h1)
    h2 = a1 @ w[0] + b[0]
    a2 = np.tanh(h2)
    z = a2 @ w[1] + b[1]
    dz = (z - t) / n
    dh2 = (dz @ w[1].T) * _tanh_grad(h2)
    dh1 = (dh2 @ w[0].T) * _tanh_grad(h1)
    rows = np.concatenate([x, a1])                 # both calls, 2n rows
    return ([rows, a2], [np.concatenate([h1, h2]), z],
            [np.concatenate([dh1, dh2]), dz],
            [x.T @ dh1 + a1.T @ dh2, a2.T @ dz],
            [dh1.sum(0) + dh2.sum(0), dz.sum(0)])

  def model(self):
    case = self

    class Net(nn.Module):

      @nn.compact
      def __call__(self, x):
        shared = nn.Dense(case.d, name="a_shared")
        a = jnp.tanh(shared(jnp.tanh(shared(x))))
        return nn.Dense(case.n_out, name="b_head")(a)

    return Net()

  def data(self, rng, num):
    out = []
    for _ in range(num):
      x = rng.normal(size=(self.n, self.d))
      t = np.sin(2 * x[:, :self.n_out]) + 0.1 * rng.normal(
          size=(self.n, self.n_out))
      out.append((x, t))
    return out


class _ScanCase:
  """nn.scan over `depth` blocks Dense(d) -> tanh (params stacked on a
  leading axis: one (depth, d, d) kernel and one (depth, d) bias), then a
  dense head. The reference's layers are the unrolled slices, then the head;
  slice j's rows are its own inputs (block j - 1's outputs)."""
  name = "scan"
  n, d, depth, n_out = 8, 4, 3, 2
  # The library gets the bare "params" collection (applied as {"params": p}),
  # as in tests/test_nested_taps.py (which also checks the variables dict).
  bare_params = True
  layers = tuple(f"stack[{j}]" for j in range(depth)) + ("head",)

  def shapes(self):
    return {**{name: ((self.d, self.d), (self.d,))
               for name in self.layers[:-1]},
            "head": ((self.d, self.n_out), (self.n_out,))}

  def library_names(self):
    return tuple(f"['stack']['Dense_0'][{j}]"
                 for j in range(self.depth)) + ("['head']",)

  def to_params(self, w, b):
    depth = self.depth
    return {"stack": {"Dense_0": {"kernel": jnp.asarray(np.stack(w[:depth])),
                                  "bias": jnp.asarray(np.stack(b[:depth]))}},
            "head": {"kernel": jnp.asarray(w[depth]),
                     "bias": jnp.asarray(b[depth])}}

  def matrices(self, tree):
    stack, head = tree["stack"]["Dense_0"], tree["head"]
    kernel, bias = np.asarray(stack["kernel"]), np.asarray(stack["bias"])
    assert kernel.shape == (self.depth, self.d, self.d)
    return ([kernel[j] for j in range(self.depth)] + [
        np.asarray(head["kernel"])], [bias[j] for j in range(self.depth)] + [
            np.asarray(head["bias"])])

  def numpy_net(self, w, b, x, t):
    n, depth = x.shape[0], self.depth
    acts, pre = [x], []
    for j in range(depth):
      pre.append(acts[-1] @ w[j] + b[j])
      acts.append(np.tanh(pre[-1]))
    z = acts[-1] @ w[depth] + b[depth]
    dz = (z - t) / n
    dh, back = [None] * depth + [dz], dz @ w[depth].T
    for j in reversed(range(depth)):
      dh[j] = back * _tanh_grad(pre[j])
      back = dh[j] @ w[j].T
    return (acts, pre + [z], dh, [a.T @ g for a, g in zip(acts, dh)],
            [g.sum(0) for g in dh])

  def model(self):
    case = self

    class Block(nn.Module):

      @nn.compact
      def __call__(self, x, _):
        return jnp.tanh(nn.Dense(case.d)(x)), None

    class Net(nn.Module):

      @nn.compact
      def __call__(self, x):
        x, _ = nn.scan(Block, variable_axes={"params": 0},
                       split_rngs={"params": True}, length=case.depth)(
                           name="stack")(x, None)
        return nn.Dense(case.n_out, name="head")(x)

    return Net()

  def data(self, rng, num):  # (n, d) inputs, as the shared case's
    return _SharedCase.data(self, rng, num)


CASES = {c.name: c for c in (_ConvCase(), _SeqCase(), _SharedCase(),
                             _ScanCase())}


def _draw(case, rng, num, outlier):
  """Weights as (d_in, d_out) matrices and biases (None without), batches;
  batch `outlier` has its targets scaled by 30 (a large residual makes the
  change in g_h dominate that in h: Powell damping)."""
  w, b = [], []
  for name in case.layers:
    kernel, bias = case.shapes()[name]
    d_out = math.prod(bias) if bias else kernel[-1]
    d_in = math.prod(kernel) // d_out
    w.append(rng.normal(size=(d_in, d_out)) / math.sqrt(d_in))
    b.append(None if bias is None else 0.1 * rng.normal(size=d_out))
  batches = case.data(rng, num)
  x, t = batches[outlier]
  batches[outlier] = (x, 30.0 * t)
  return w, b, batches


def _to_params(case, w, b):
  if hasattr(case, "to_params"):  # a stacked layout (nn.scan)
    return case.to_params(w, b)
  params = {}
  for name, wl, bl in zip(case.layers, w, b):
    kernel, bias = case.shapes()[name]
    params[name] = {"kernel": jnp.asarray(wl.reshape(kernel))}
    if bias is not None:
      params[name]["bias"] = jnp.asarray(bl.reshape(bias))
  return {"params": params}


def _matrices(case, tree):
  """(d_in, d_out) kernel matrices and flat biases of a params-shaped tree."""
  if hasattr(case, "matrices"):
    return case.matrices(tree)
  w, b = [], []
  for name in case.layers:
    leaf = tree["params"][name]
    kernel = np.asarray(leaf["kernel"])
    bias = leaf.get("bias")
    d_out = kernel.shape[-1] if bias is None else np.asarray(bias).size
    w.append(kernel.reshape(-1, d_out))
    b.append(None if bias is None else np.asarray(bias).ravel())
  return w, b


def _sq_loss(z, t):
  return 0.5 * jnp.mean(jnp.sum((z - t) ** 2, axis=tuple(range(1, z.ndim))))


def _run_library(case, tx, w, b, batches):
  """Trains the Flax model with `tx`, one jitted step per batch; returns
  per step the model's output and loss gradient before the step, and the
  params and K-BFGS state after it."""
  model = case.model()
  bare = getattr(case, "bare_params", False)

  @jax.jit
  def step(params, state, x, t):
    loss = lambda p: _sq_loss(model.apply({"params": p} if bare else p, x), t)
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params, value_fn=loss)
    return (model.apply({"params": params} if bare else params, x), grads,
            optax.apply_updates(params, updates), state)

  params = _to_params(case, w, b)
  state = tx.init(params)
  history = []
  for x, t in batches:
    out, grads, params, state = step(params, state, jnp.asarray(x),
                                     jnp.asarray(t))
    history.append((out, grads, params, state))
  return history


HYPER = dict(damping=0.81, momentum=0.8, weight_decay=1e-2)  # mu2 = 0.9
STEPS, OUTLIER = 6, 3
# float64 on both sides, the same arithmetic in another order (Cholesky vs LU
# inverse, compact vs two-loop L-BFGS, XLA's conv and reductions vs NumPy):
# measured discrepancies stay below 1e-13 of each array's largest entry over
# the 6 steps (up to 1e-12 on the scan case). 1e-9 (elementwise, plus 1e-9
# of the array's largest entry for entries that cancel) leaves a margin of
# 10^3 or more, while a real difference (a patch out of order, a pad on the
# wrong side, statistics averaged over the batch instead of the rows, one
# call of a shared kernel left out, a scan slice given another's statistics,
# a missed damping) moves the factors by 1e-3 or more.
RTOL = 1e-9


# K-BFGS (memory None) on the conv, shared and scan cases, K-BFGS(L) on the
# first three; the paper's fixed step and the per-layer step; bounded (rho =
# 0.1, the default) or not. Six compilations keep the module under 40 s on 2
# loaded cores (a K-BFGS(L) scan run, 6 s more, did not fit;
# tests/test_nested_taps.py runs the scanned stack with memory 2 against the
# unrolled one). `strides`: A's and q_l's row strides, on the cases with one
# call per layer (the library samples each call's rows, the reference the
# pooled rows: the same rows only for one call); the others take all rows.
# K-BFGS starts from its default diagonal H_g (from A's rows, the positions
# of the conv's images too) but on the scan case's scanned layers, whose
# calls give no per-row output gradients: the library starts those from I.
@pytest.mark.parametrize("kind,memory,rule,rho,strides", [
    ("conv", None, "layerwise", None, (3, 5)),
    ("conv", 2, "fixed", 0.1, (2, 1)),
    ("seq", 2, "layerwise", 0.1, (2, 3)),
    ("shared", None, "layerwise", 0.1, (1, 1)),
    ("shared", 3, "layerwise", None, (1, 1)),
    ("scan", None, "layerwise", 0.1, (1, 1)),
])
def test_kind_matches_numpy_reference_step_by_step(x64, kind, memory, rule,
                                                   rho, strides):
  case = CASES[kind]
  config = dict(lr=0.3, decay=0.95, memory=memory, max_relative_change=rho,
                step_rule=rule, a_stride=strides[0], q_stride=strides[1],
                hg_init=["identity" if name.startswith("stack")
                         else "diagonal" for name in case.layers], **HYPER)
  # Fresh draws until the (cheap, NumPy) reference sees Powell damping fire;
  # it did on 20 of 20 seeds per configuration, so 10 attempts all failing
  # means a change in the algorithm, not bad luck.
  for _ in range(10):
    seed = np.random.SeedSequence().entropy
    w, b, batches = _draw(case, np.random.default_rng(seed), STEPS, OUTLIER)
    probe = KBFGSReference(case.numpy_net, w, b, **config)
    for x, t in batches:
      probe.step(x, t)
    if np.any(probe.powell):
      break
  assert np.any(probe.powell), "no draw fired Powell damping"
  params0 = _to_params(case, w, b)
  # The library's layer l is the reference's layer order[l], by name (the
  # per-layer vectors and state.layers follow kbfgs_layer_names).
  names = olw.kbfgs_layer_names(params0)
  expected = (case.library_names() if hasattr(case, "library_names") else
              tuple(f"['params']['{name}']" for name in case.layers))
  # Flatten order: dict keys sorted, then the slices of a stacked kernel.
  assert names == tuple(sorted(expected)), names
  order = [names.index(name) for name in expected]
  tx = olw.kbfgs(0.3, memory_size=memory, stat_decay=0.95,
                 max_relative_change=rho, step_rule=rule,
                 input_factor_row_stride=strides[0],
                 step_size_row_stride=strides[1], **HYPER)
  history = _run_library(case, tx, w, b, batches)
  ref = KBFGSReference(case.numpy_net, w, b, **config)
  for step, (x, t) in enumerate(batches):
    out, grads, params, state = history[step]
    where = f"{kind} seed={seed} step={step}"
    # The NumPy model (im2col, pooling, backward by hand) is the Flax model:
    # same output and loss gradient at the (so far equal) params.
    _, pre, _, gw, gb = case.numpy_net(ref.w, ref.b, x, t)
    _close(np.asarray(out).reshape(pre[-1].shape), pre[-1], RTOL,
           where + " model output")
    jw, jb = _matrices(case, grads)
    for l in range(len(gw)):
      _close(jw[l], gw[l], RTOL, where + " kernel gradient")
      if gb[l] is not None:
        _close(jb[l], gb[l], RTOL, where + " bias gradient")
    ref.step(x, t)
    assert int(state.count) == step + 1 and int(state.num_skipped) == 0
    pw, pb = _matrices(case, params)
    mw, mb = _matrices(case, state.momentum)
    for l, name in enumerate(case.layers):
      at = f"{where} layer={name}"
      _close(pw[l], ref.w[l], RTOL, at + " kernel")
      _close(mw[l], ref.Mw[l], RTOL, at + " momentum")
      assert (pb[l] is None) == (ref.b[l] is None)
      if ref.b[l] is not None:
        _close(pb[l], ref.b[l], RTOL, at + " bias")
        _close(mb[l], ref.Mb[l], RTOL, at + " bias momentum")
      ls = state.layers[order[l]]
      _close(from_blocks(ls.a, ref.k[l]), ref.A[l], RTOL, at + " A")
      _close(from_blocks(ls.h_a, ref.k[l]), ref.Ha[l], RTOL, at + " H_a")
      _close(ls.s, ref.s[l], RTOL, at + " s")
      _close(ls.y, ref.y[l], RTOL, at + " y")
      if memory is None:
        _close(ls.h_g, ref.Hg[l], RTOL, at + " H_g")
      else:
        num = len(ref.pairs[l])
        assert int(ls.h_g.num_pairs) == num, at
        if num:  # stored scaled to ||s|| = 1, newest last
          s_ref = np.stack([p[0] for p in ref.pairs[l]])
          y_ref = np.stack([p[1] for p in ref.pairs[l]])
          norms = np.linalg.norm(s_ref, axis=1)[:, None]
          _close(ls.h_g.s[memory - num:], s_ref / norms, RTOL, at + " S")
          _close(ls.h_g.y[memory - num:], y_ref / norms, RTOL, at + " Y")
        np.testing.assert_array_equal(ls.h_g.s[:memory - num], 0.0)
    mine = lambda v: np.asarray(v)[order]   # in the reference's order
    np.testing.assert_array_equal(mine(state.num_powell), ref.powell, where)
    np.testing.assert_array_equal(mine(state.num_lm), ref.lm, where)
    np.testing.assert_array_equal(mine(state.num_skipped_h_g), ref.skipped,
                                  where)
    np.testing.assert_array_equal(mine(state.num_skipped_h_a), ref.skipped_a,
                                  where)
    _close(mine(state.step_sizes), ref.t, RTOL, where + " t_l")
    if rule == "layerwise":
      np.testing.assert_array_equal(mine(state.num_fallbacks), ref.fallbacks,
                                    where)
  assert np.any(ref.powell)
  print(f"{kind} memory={memory} {rule} rho={rho}: powell {ref.powell} "
        f"lm {ref.lm} skipped H_g {ref.skipped} bounded {ref.bounded} "
        f"t_l clipped {ref.clipped} accepted {ref.unclipped} fallbacks "
        f"{ref.fallbacks}")
