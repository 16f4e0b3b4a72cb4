"""Tests of K-BFGS / K-BFGS(L) (optax_layerwise._kbfgs).

The centrepiece is `_Reference`: docs/kbfgs.md, "Algorithm", in plain NumPy
(float64) (tests/kbfgs_reference.py, shared with tests/test_kinds_reference.py),
on an MLP whose forward and backward passes are written by hand here. It
shares no code with the library (in particular L-BFGS uses the two-loop
recursion there, the compact representation in the library).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_layerwise as olw
from optax_layerwise import _hardware
from tests.kbfgs_reference import KBFGSReference
from tests.kbfgs_reference import from_blocks
# tests/test_kbfgs_recovery.py imports the two-loop recursion from here.
from tests.kbfgs_reference import two_loop as _two_loop  # noqa: F401

# ---------------------------------------------------------------------------
# The reference: docs/kbfgs.md, "Algorithm", in NumPy.
# ---------------------------------------------------------------------------

# A 5-6-4-3 MLP: tanh hidden layers, linear output, loss 0.5 ||z - t||^2
# averaged over the batch. The middle layer has no bias.
SIZES = (5, 6, 4, 3)
HAS_BIAS = (True, False, True)
NAMES = ("l1", "l2", "l3")


def _forward_backward(w, b, x, t):
  """Manual forward and backward; returns per-layer inputs, pre-activations,
  pre-activation gradients dL/dh (n, d_out), and the params gradient."""
  n = x.shape[0]
  inputs, pre = [], []
  a = x
  for l in range(3):
    h = a @ w[l] + (b[l] if b[l] is not None else 0.0)
    inputs.append(a)
    pre.append(h)
    a = np.tanh(h) if l < 2 else h
  dh = [None] * 3
  dh[2] = (pre[2] - t) / n
  for l in (1, 0):
    da = dh[l + 1] @ w[l + 1].T
    dh[l] = da * (1.0 - np.tanh(pre[l]) ** 2)
  gw = [inputs[l].T @ dh[l] for l in range(3)]
  gb = [dh[l].sum(0) if HAS_BIAS[l] else None for l in range(3)]
  return inputs, pre, dh, gw, gb


class _Reference(KBFGSReference):
  """K-BFGS on the 5-6-4-3 MLP, step by step, as docs/kbfgs.md states it:
  the generic NumPy reference with each layer's rows its examples."""

  def __init__(self, w, b, **kwargs):
    super().__init__(_forward_backward, w, b, **kwargs)


# ---------------------------------------------------------------------------
# The same model in plain JAX (olw.dense), Flax linen and Flax NNX.
# ---------------------------------------------------------------------------


def _init(seed, dtype=np.float64):
  rng = np.random.default_rng(seed)
  w = [rng.normal(size=(SIZES[l], SIZES[l + 1])) / np.sqrt(SIZES[l])
       for l in range(3)]
  b = [0.1 * rng.normal(size=SIZES[l + 1]) if HAS_BIAS[l] else None
       for l in range(3)]
  return [x.astype(dtype) for x in w], [
      None if x is None else x.astype(dtype) for x in b]


def _batches(seed, num, n=12, dtype=np.float64):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num):
    x = rng.normal(size=(n, SIZES[0]))
    t = np.sin(x[:, :3]) + 0.1 * rng.normal(size=(n, 3))
    out.append((x.astype(dtype), t.astype(dtype)))
  return out


def _plain_params(w, b):
  params = {}
  for l, name in enumerate(NAMES):
    params[name] = {"kernel": jnp.asarray(w[l])}
    if b[l] is not None:
      params[name]["bias"] = jnp.asarray(b[l])
  return params


def _plain_loss(params, x, t):
  a = x
  for l, name in enumerate(NAMES):
    a = olw.dense(a, params[name]["kernel"], params[name].get("bias"))
    if l < 2:
      a = jnp.tanh(a)
  return 0.5 * jnp.mean(jnp.sum((a - t) ** 2, -1))


class _Linen(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(SIZES[1], name="l1")(x))
    x = jnp.tanh(nn.Dense(SIZES[2], use_bias=False, name="l2")(x))
    return nn.Dense(SIZES[3], name="l3")(x)


class _NNX(nnx.Module):

  def __init__(self, w, b):
    rngs = nnx.Rngs(0)
    self.l1 = nnx.Linear(SIZES[0], SIZES[1], rngs=rngs)
    self.l2 = nnx.Linear(SIZES[1], SIZES[2], use_bias=False, rngs=rngs)
    self.l3 = nnx.Linear(SIZES[2], SIZES[3], rngs=rngs)
    for layer, wl, bl in zip((self.l1, self.l2, self.l3), w, b):
      layer.kernel.value = jnp.asarray(wl)
      if bl is not None:
        layer.bias.value = jnp.asarray(bl)

  def __call__(self, x):
    x = jnp.tanh(self.l1(x))
    x = jnp.tanh(self.l2(x))
    return self.l3(x)


def _sq_loss(z, t):
  return 0.5 * jnp.mean(jnp.sum((z - t) ** 2, -1))


def _by_name(params):
  """{('l1', 'kernel'): array, ...} from plain, linen or NNX params."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    out[tuple(k for k in keys if k not in ("params", "value"))] = np.asarray(
        leaf)
  return out


def _run(framework, tx, w, b, batches):
  """Trains the 5-6-4-3 MLP written in `framework`; per step, returns the
  params ({(layer, leaf): array}) and the KBFGSState."""
  history = []
  if framework == "plain":
    params = _plain_params(w, b)

    @jax.jit
    def step(p, state, x, t):
      grads = jax.grad(_plain_loss)(p, x, t)
      updates, state = tx.update(grads, state, p,
                                 value_fn=lambda q: _plain_loss(q, x, t))
      return optax.apply_updates(p, updates), state

  elif framework == "linen":
    # nn.Dense is tapped with no change to the model.
    model = _Linen()
    params = {"params": _plain_params(w, b)}

    @jax.jit
    def step(p, state, x, t):
      loss = lambda q: _sq_loss(model.apply(q, x), t)
      updates, state = tx.update(jax.grad(loss)(p), state, p, value_fn=loss)
      return optax.apply_updates(p, updates), state

  else:
    # nnx.Linear through nnx.Optimizer, which forwards value_fn to update.
    net = _NNX(w, b)
    opt = nnx.Optimizer(net, tx, wrt=nnx.Param)

    @nnx.jit
    def nnx_step(net, opt, x, t):
      graphdef = nnx.graphdef(net)
      loss = lambda m: _sq_loss(m(x), t)
      grads = nnx.grad(loss)(net)
      opt.update(net, grads, value_fn=lambda p: loss(nnx.merge(graphdef, p)))

    for x, t in batches:
      nnx_step(net, opt, jnp.asarray(x), jnp.asarray(t))
      history.append((_by_name(nnx.state(net, nnx.Param)),
                      nnx.as_pure(opt.opt_state)))
    return history

  state = tx.init(params)
  for x, t in batches:
    params, state = step(params, state, jnp.asarray(x), jnp.asarray(t))
    history.append((_by_name(params), state))
  return history


def _lr_schedule(count):
  # lr = 0 on the first step: delta = 0 makes the first pair (s, y) = 0, which
  # the skip rule must reject (s^T y = 0); then the paper's 0.3, halved late.
  return jnp.where(count == 0, 0.0, jnp.where(count < 5, 0.3, 0.15))


def _ref_lr(count):
  return 0.0 if count == 0 else (0.3 if count < 5 else 0.15)


# Each framework is checked against the reference, hence against the others
# ("the same model in linen, NNX and plain JAX gives the same trajectory");
# both K-BFGS and K-BFGS(L) run in plain JAX. (Four compilations keep it fast.)
# `strides`: A's and q_l's row strides (12 rows a batch: 5 keeps rows 0, 5,
# 10, standing for 4 each). `init`: H_g's first value (K-BFGS's default is
# the diagonal; "identity" is the paper's). `block`: A and H_a in diagonal
# blocks of at most this many inputs (the layers have k = 6, 7, 5 with their
# biases: 2 gives 3, 4 and 3 blocks, 3 gives 2, 3 and 2, with padded last
# blocks); 256 (like the default 1024) gives one block here, the whole
# factor.
@pytest.mark.parametrize(
    "framework,memory,bounded,rule,interval,ss,strides,init,block", [
        ("plain", None, False, "fixed", 1, 1, (1, 1), "identity", 256),
        ("plain", 2, False, "fixed", 1, 1, (1, 1), "identity", None),
        ("linen", 2, False, "fixed", 1, 1, (1, 1), "diagonal", 256),
        ("nnx", None, False, "fixed", 1, 1, (1, 1), "diagonal", 256),
        ("plain", None, True, "fixed", 1, 1, (3, 1), "diagonal", 2),
        ("plain", None, False, "layerwise", 1, 1, (1, 1), "identity", 256),
        ("plain", None, True, "layerwise", 2, 3, (2, 5), "diagonal", 2),
        ("linen", 2, True, "layerwise", 3, 2, (1, 3), "identity", 3)])
def test_matches_numpy_reference_step_by_step(x64, framework, memory,
                                              bounded, rule, interval, ss,
                                              strides, init, block):
  # damping = 0.81 makes mu2 = sqrt(0.81) = 0.9; momentum and stat_decay
  # differ, so swapping the two decays would show.
  hyper = dict(damping=0.81, momentum=0.8, weight_decay=1e-2)

  def draw():
    w, b = _init(np.random.SeedSequence().entropy % 2**31)
    batches = _batches(np.random.SeedSequence().entropy % 2**31, 7)
    # An outlier batch (targets x30) on step 3: the large residual makes the
    # pre-activation-gradient change y dominate s in the tanh layers, so
    # Powell damping fires.
    x3, t3 = batches[3]
    batches[3] = (x3, 30.0 * t3)
    return w, b, batches

  def config(probe):
    # max_relative_change (ours): None is the paper's algorithm; the bounded
    # case takes the median relative step of the unbounded run as the bound,
    # so it shortens about half of the nonzero layer steps and spares the
    # rest. The per-layer step's clip: the median measured t_l, so it fires
    # on about half of the accepted measurements (step 0, lr = 0, is a
    # fallback).
    moving = np.array(probe.relative_steps)
    rho = float(np.median(moving[moving > 0])) if bounded else None
    max_t = float(np.median(probe.raw_t)) if rule == "layerwise" else 10.0
    return dict(lr=_ref_lr, decay=0.95, memory=memory,
                max_relative_change=rho, step_rule=rule, max_step_scale=max_t,
                factor_interval=interval, step_size_interval=ss,
                a_stride=strides[0], q_stride=strides[1], hg_init=init,
                block_size=block, **hyper)

  def run_reference(w, b, batches, **kwargs):
    ref = _Reference(w, b, **kwargs)
    for x, t in batches:
      ref.step(x, t)
    return ref

  def informative(ref):
    # Both damping rules fire; with the per-layer step, both the clip and
    # the unclipped rule -b/q apply on some layer-steps (step 0 falls back).
    fired = np.any(ref.powell) and np.any(ref.lm)
    if rule == "layerwise":
      fired = fired and np.any(ref.clipped) and np.any(ref.unclipped)
    return fired

  # Fresh random draws until the (cheap, NumPy) reference, in the very
  # configuration tested, sees both damping rules fire, so every run
  # compares both; each fires in about half of the draws, so 30 attempts
  # fail to find one with probability < 1e-6.
  for _ in range(30):
    w, b, batches = draw()
    probe = run_reference(w, b, batches, lr=_ref_lr, decay=0.95,
                          memory=memory, step_rule=rule,
                          step_size_interval=ss, a_stride=strides[0],
                          q_stride=strides[1], hg_init=init,
                          block_size=block, **hyper)
    kwargs = config(probe)
    check = run_reference(w, b, batches, **kwargs)
    if informative(check):
      break
  assert informative(check), "no draw fired both damping rules"
  rho = kwargs["max_relative_change"]
  ref = _Reference(w, b, **kwargs)
  tx = olw.kbfgs(_lr_schedule, memory_size=memory, stat_decay=0.95,
                 max_relative_change=rho, step_rule=rule,
                 max_step_scale=kwargs["max_step_scale"],
                 input_factor_interval=interval, step_size_interval=ss,
                 input_factor_row_stride=strides[0],
                 step_size_row_stride=strides[1], h_g_init=init,
                 block_size=block, **hyper)
  history = _run(framework, tx, w, b, batches)
  assert olw.kbfgs_layer_names(_plain_params(w, b)) == ("['l1']", "['l2']",
                                                        "['l3']")
  # Tolerance: float64 throughout; both sides do the same arithmetic in a
  # different order (Cholesky vs LU inverse, compact vs two-loop L-BFGS,
  # rank-2 vs product-form BFGS), so they differ by round-off (~1e-16)
  # amplified by the condition numbers of A + sqrt(lambda) I and of H_g
  # (<~1e3 here) over 7 steps: 1e-9 relative leaves a wide margin while any
  # algorithmic difference (a missed damping, a wrong sign, an off-by-one
  # step in the averages) shows up at 1e-2 or more.
  tol = dict(rtol=1e-9, atol=1e-11)
  saw_powell = saw_skip = False
  for step, (x, t) in enumerate(batches):
    ref.step(x, t)
    params, state = history[step]
    assert int(state.count) == step + 1
    for l, name in enumerate(NAMES):
      np.testing.assert_allclose(params[(name, "kernel")], ref.w[l], **tol)
      np.testing.assert_allclose(
          _by_name(state.momentum)[(name, "kernel")], ref.Mw[l], **tol)
      if HAS_BIAS[l]:
        np.testing.assert_allclose(params[(name, "bias")], ref.b[l], **tol)
        np.testing.assert_allclose(
            _by_name(state.momentum)[(name, "bias")], ref.Mb[l], **tol)
      ls = state.layers[l]
      np.testing.assert_allclose(from_blocks(ls.a, ref.k[l]), ref.A[l], **tol)
      np.testing.assert_allclose(from_blocks(ls.h_a, ref.k[l]), ref.Ha[l],
                                 **tol)
      np.testing.assert_allclose(ls.s, ref.s[l], **tol)
      np.testing.assert_allclose(ls.y, ref.y[l], **tol)
      if memory is None:
        np.testing.assert_allclose(ls.h_g, ref.Hg[l], **tol)
      else:
        num = len(ref.pairs[l])
        assert int(ls.h_g.num_pairs) == num
        if num:  # stored scaled to ||s|| = 1 (the same operator)
          norms = np.stack([np.linalg.norm(p[0]) for p in ref.pairs[l]])
          np.testing.assert_allclose(
              ls.h_g.s[memory - num:],
              np.stack([p[0] for p in ref.pairs[l]]) / norms[:, None], **tol)
          np.testing.assert_allclose(
              ls.h_g.y[memory - num:],
              np.stack([p[1] for p in ref.pairs[l]]) / norms[:, None], **tol)
        np.testing.assert_array_equal(ls.h_g.s[:memory - num], 0.0)
    np.testing.assert_array_equal(state.num_powell, ref.powell)
    np.testing.assert_array_equal(state.num_lm, ref.lm)
    np.testing.assert_array_equal(state.num_skipped_h_g, ref.skipped)
    np.testing.assert_array_equal(state.num_skipped_h_a, ref.skipped_a)
    np.testing.assert_allclose(state.step_sizes, ref.t, **tol)
    if rule == "layerwise":
      np.testing.assert_array_equal(state.num_fallbacks, ref.fallbacks)
    if step == 0:
      # Initialisation: A from the first batch, H_g skipped on the zero pair.
      np.testing.assert_array_equal(state.num_skipped_h_g, [1, 1, 1])
      np.testing.assert_allclose(
          from_blocks(state.layers[0].h_a, ref.k[0]),
          np.linalg.inv(ref.A[0] + math.sqrt(0.81) * np.eye(ref.k[0])), **tol)
    saw_powell |= bool(np.any(ref.powell))
    saw_skip |= bool(np.any(ref.skipped))
    if step == 3:
      assert saw_powell and saw_skip
  assert np.any(ref.lm), "the Levenberg-Marquardt damping never fired"
  if bounded:
    relative = np.array(ref.relative_steps)
    assert np.any(relative > rho) and np.any((relative > 0) & (relative < rho))
  if rule == "layerwise":
    # The safeguards fired (the zero first step falls back, the clip bit) on
    # some layer-steps and not on others, where t_l = -b_l / q_l exactly.
    assert np.all(ref.fallbacks >= 1) and np.any(ref.clipped)
    assert np.any(ref.unclipped)
  # The memory wrapped around (more accepted pairs than slots).
  if memory is not None:
    assert int(state.layers[0].h_g.num_pairs) == memory
  assert not bool(np.any(state.num_skipped))



# ---------------------------------------------------------------------------
# Training, chaining, fallback, robustness, errors.
# ---------------------------------------------------------------------------


def test_trains_digits_autoencoder_below_best_adam():
  from sklearn.datasets import load_digits  # bundled, no download
  data = jnp.asarray(load_digits().data / 16.0, jnp.float32)
  key = jax.random.PRNGKey(np.random.SeedSequence().entropy % 2**31)
  sizes, batch, epochs = (64, 32, 8, 32, 64), 100, 10
  keys = jax.random.split(key, len(sizes))
  params = {f"l{i}": {"kernel": jax.random.normal(keys[i], (m, n)) / m**0.5,
                      "bias": jnp.zeros(n)}
            for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:]))}

  def loss_fn(p, x):  # the paper's loss: sigmoid CE summed over pixels
    h = x
    for i in range(4):
      h = olw.dense(h, p[f"l{i}"]["kernel"], p[f"l{i}"]["bias"])
      if i in (0, 2):  # ReLU; linear code and output layers
        h = jax.nn.relu(h)
    return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(h, x), -1))

  nb = data.shape[0] // batch
  order = jnp.concatenate([
      jax.random.permutation(jax.random.fold_in(keys[-1], e),
                             data.shape[0])[:nb * batch]
      for e in range(epochs)])
  batches = data[order].reshape(epochs * nb, batch, 64)

  def train(tx):
    def step(carry, x):
      p, state = carry
      updates, state = tx.update(jax.grad(loss_fn)(p, x), state, p,
                                 value_fn=lambda q: loss_fn(q, x))
      return (optax.apply_updates(p, updates), state), None
    (p, _), _ = jax.lax.scan(step, (params, tx.init(params)), batches)
    return loss_fn(p, data)

  adam_grid = jnp.array([1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
  adam = jax.jit(jax.vmap(lambda lr: train(optax.adam(lr))))(adam_grid)
  # Batch 100 (the paper uses 1000): a larger step than the default 0.3 suits
  # this small problem; the paper tunes the learning rate of every method.
  kbfgs = jax.jit(lambda: train(olw.kbfgs(1.0)))()
  initial = loss_fn(params, data)
  assert np.isfinite(float(kbfgs))
  # Measured over seeds: K-BFGS ~17.1 vs the best Adam ~17.6 (from ~44).
  assert float(kbfgs) < float(np.nanmin(adam)) < float(initial)


class _NormNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.LayerNorm()(nn.Dense(8)(x)))
    return nn.Dense(3)(x)


def test_chains_after_clipping_and_layer_norm_takes_the_fallback():
  key = jax.random.PRNGKey(np.random.SeedSequence().entropy % 2**31)
  x = jax.random.normal(key, (32, 5))
  t = jnp.sin(x[:, :3] + x[:, 3:4])  # learnable targets
  model = _NormNet()
  params = model.init(jax.random.fold_in(key, 2), x)
  loss = lambda p: _sq_loss(model.apply(p, x), t)
  # Clip at half the initial gradient norm: active on the checked first step.
  clip = 0.5 * float(optax.global_norm(jax.grad(loss)(params)))
  lr, mom, tau = 0.3, 0.9, 1e-3
  tx = optax.chain(optax.clip_by_global_norm(clip),
                   olw.kbfgs(lr, momentum=mom, weight_decay=tau))

  @jax.jit
  def step(p, state):
    updates, state = tx.update(jax.grad(loss)(p), state, p, value_fn=loss)
    return optax.apply_updates(p, updates), state, updates

  state = tx.init(params)
  new, state, updates = step(params, state)
  kstate = state[1]
  flags = _by_name(kstate.preconditioned)
  assert flags == {("Dense_0", "bias"): True, ("Dense_0", "kernel"): True,
                   ("Dense_1", "bias"): True, ("Dense_1", "kernel"): True,
                   ("LayerNorm_0", "bias"): False,
                   ("LayerNorm_0", "scale"): False}
  grads = jax.grad(loss)(params)
  clipped, _ = optax.clip_by_global_norm(clip).update(grads, None)
  assert float(optax.global_norm(grads)) > clip  # clipping was active
  expected_m = jax.tree_util.tree_map(
      lambda g, p: (1 - mom) * (g + tau * p), clipped, params)
  m = _by_name(kstate.momentum)
  u = _by_name(updates)
  for key_, value in _by_name(expected_m).items():
    # float32 round-off of a few elementwise ops.
    np.testing.assert_allclose(m[key_], value, rtol=1e-5, atol=1e-8)
    if key_[0] == "LayerNorm_0":  # the fallback: -lr * momentum
      np.testing.assert_allclose(u[key_], -lr * value, rtol=1e-5, atol=1e-9)
  for _ in range(30):
    new, state, _ = step(new, state)
  assert float(loss(new)) < 0.5 * float(loss(params))


def test_state_is_scan_compatible_and_float32_for_bfloat16_params():
  key = jax.random.PRNGKey(np.random.SeedSequence().entropy % 2**31)
  w, b = _init(int(key[1]), np.float32)
  params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16),
                                  _plain_params(w, b))
  batches = _batches(int(key[0]), 6, n=16, dtype=np.float32)
  xs = jnp.asarray(np.stack([x for x, _ in batches]), jnp.bfloat16)
  ts = jnp.asarray(np.stack([t for _, t in batches]), jnp.bfloat16)
  tx = olw.kbfgs(0.1, memory_size=3)
  state0 = tx.init(params)

  def step(carry, batch):
    p, state = carry
    x, t = batch
    loss = lambda q: _plain_loss(q, x, t).astype(jnp.float32)
    updates, state = tx.update(jax.grad(loss)(p), state, p, value_fn=loss)
    return (optax.apply_updates(p, updates), state), loss(p)

  (final, state), losses = jax.jit(
      lambda p, s: jax.lax.scan(step, (p, s), (xs, ts)))(params, state0)
  shapes = lambda tree: jax.tree_util.tree_map(
      lambda a: (a.shape, a.dtype), tree)
  assert shapes(state) == shapes(state0)
  for leaf in jax.tree_util.tree_leaves((state.layers, state.momentum)):
    assert leaf.dtype in (jnp.float32, jnp.int32)
  assert all(leaf.dtype == jnp.bfloat16
             for leaf in jax.tree_util.tree_leaves(final))
  assert int(state.count) == 6 and int(state.num_skipped) == 0
  assert np.all(np.isfinite(np.asarray(losses, np.float32)))
  assert int(state.layers[0].h_g.num_pairs) >= 1


def _tiny_problem():
  key = jax.random.PRNGKey(np.random.SeedSequence().entropy % 2**31)
  w, b = _init(int(key[1]), np.float32)
  (x, t), = _batches(int(key[0]), 1, n=16, dtype=np.float32)
  return _plain_params(w, b), jnp.asarray(x), jnp.asarray(t)


def test_nonfinite_gradient_skips_the_step_and_counts():
  params, x, t = _tiny_problem()
  tx = olw.kbfgs(0.1)
  loss = lambda p: _plain_loss(p, x, t)
  state = tx.init(params)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=loss))
  grads = jax.grad(loss)(params)
  grads["l1"]["kernel"] = grads["l1"]["kernel"].at[0, 0].set(jnp.nan)
  # Skipped on the first step too: H_g stays I (its diagonal start waits
  # for an accepted step); only num_skipped and preconditioned change.
  _, skipped = update(grads, state, params)
  unchanged = lambda s: s._replace(num_skipped=0, preconditioned=None)
  for a, b in zip(jax.tree_util.tree_leaves(unchanged(skipped)),
                  jax.tree_util.tree_leaves(unchanged(state))):
    np.testing.assert_array_equal(a, b)
  _, state = update(jax.grad(loss)(params), state, params)
  updates, new_state = update(grads, state, params)
  assert all(not np.any(u) for u in jax.tree_util.tree_leaves(updates))
  assert int(new_state.num_skipped) == 1
  assert int(new_state.count) == int(state.count)
  for a, b in zip(jax.tree_util.tree_leaves(new_state._replace(
      num_skipped=0)), jax.tree_util.tree_leaves(state._replace(
          num_skipped=0))):
    np.testing.assert_array_equal(a, b)


def test_nonfinite_pair_is_skipped_and_counted():
  params, x, t = _tiny_problem()
  w0 = params["l1"]["kernel"]

  def loss(p):
    # Finite at theta (and its gradient), NaN anywhere the first kernel has
    # moved by more than 1e-4: the second pass then yields a NaN pair.
    gate = jnp.sqrt(1e-8 - jnp.sum((p["l1"]["kernel"] - w0) ** 2)) / 1e-4
    return _plain_loss(p, x, t) * gate

  tx = olw.kbfgs(0.1)
  state = tx.init(params)
  updates, state = jax.jit(
      lambda p, s: tx.update(jax.grad(loss)(p), s, p, value_fn=loss))(
          params, state)
  assert all(np.all(np.isfinite(u)) for u in jax.tree_util.tree_leaves(
      updates))
  assert float(optax.global_norm(updates)) > 0
  np.testing.assert_array_equal(state.num_skipped_h_g, [1, 1, 1])
  assert int(state.num_skipped) == 0
  for layer in state.layers:  # the pair did not poison the state: H_g is
    np.testing.assert_array_equal(layer.s, 0.0)  # still its diagonal start
    diagonal = np.diagonal(layer.h_g)
    np.testing.assert_array_equal(layer.h_g, np.diag(diagonal))
    assert np.all(np.isfinite(diagonal)) and np.all(diagonal > 0)
    assert np.all(np.isfinite(layer.h_a)) and np.all(np.isfinite(layer.a))


def test_tangent_pair_matches_secant_pair_for_small_steps(x64):
  w, b = _init(np.random.SeedSequence().entropy % 2**31)
  batches = _batches(np.random.SeedSequence().entropy % 2**31, 1)
  out = {}
  for pair in ("secant", "tangent"):
    # A small step: secant and tangent differ by O(lr) relatively.
    out[pair] = _run("plain", olw.kbfgs(1e-3, pair=pair), w, b,
                     batches)[-1][1]
  for sec, tan in zip(out["secant"].layers, out["tangent"].layers):
    scale = np.abs(sec.s).max()
    assert scale > 0
    np.testing.assert_allclose(tan.s, sec.s, atol=1e-2 * scale)
    np.testing.assert_allclose(tan.y, sec.y, atol=1e-2 * np.abs(sec.y).max())


def test_untapped_dense_kernel_warns_and_takes_the_fallback():
  params, x, t = _tiny_problem()

  def loss(p):  # l3 is applied with a bare matmul: not tappable
    a = jnp.tanh(olw.dense(x, p["l1"]["kernel"], p["l1"]["bias"]))
    a = jnp.tanh(olw.dense(a, p["l2"]["kernel"]))
    return _sq_loss(a @ p["l3"]["kernel"] + p["l3"]["bias"], t)

  tx = olw.kbfgs(0.1)
  with pytest.warns(UserWarning, match=r"\['l3'\]"):
    _, state = tx.update(jax.grad(loss)(params), tx.init(params), params,
                         value_fn=loss)
  flags = _by_name(state.preconditioned)
  assert flags[("l1", "kernel")] and not flags[("l3", "kernel")]
  assert not flags[("l3", "bias")]
  # Excluding it with `dense_layers` drops its state (and the warning).
  tx = olw.kbfgs(0.1, dense_layers=lambda path, leaf: "l3" not in str(path))
  assert len(tx.init(params).layers) == 2


def test_errors():
  params, x, t = _tiny_problem()
  loss = lambda p: _plain_loss(p, x, t)
  tx = olw.kbfgs()
  state = tx.init(params)
  grads = jax.grad(loss)(params)
  with pytest.raises(ValueError, match="value_fn"):
    tx.update(grads, state, params)
  with pytest.raises(ValueError, match="params"):
    tx.update(grads, state, None, value_fn=loss)
  bare = lambda p: jnp.sum((x @ p["l1"]["kernel"]) ** 2)
  with pytest.raises(ValueError, match="Supported layers: flax.linen.Dense, "
                     "flax.linen.DenseGeneral, .*optax_layerwise.dense"):
    tx.update(grads, state, params, value_fn=bare)
  cast = lambda p: jnp.sum(olw.dense(x, p["l1"]["kernel"] * 1.0) ** 2)
  with pytest.raises(ValueError, match="none on a params leaf"):
    tx.update(grads, state, params, value_fn=cast)
  for bad in (0, -3, 2.5, True):
    with pytest.raises(ValueError, match="memory_size"):
      olw.kbfgs(memory_size=bad)
  for bad in (0.0, -0.1):
    with pytest.raises(ValueError, match="damping"):
      olw.kbfgs(damping=bad)
  with pytest.raises(ValueError, match="learning_rate"):
    olw.kbfgs(-0.1)
  with pytest.raises(ValueError, match="pair"):
    olw.kbfgs(pair="exact")
  with pytest.raises(ValueError, match="mu2"):
    olw.kbfgs(damping=2.0)
  with pytest.raises(ValueError, match="h_g_init must be one of"):
    olw.kbfgs(h_g_init="diag")
  for name in ("input_factor_row_stride", "step_size_row_stride"):
    for bad in (0, 2.0, True):
      with pytest.raises(ValueError, match=f"{name} must be a Python int"):
        olw.kbfgs(**{name: bad})


def test_default_row_strides_sample_only_calls_of_256_rows_or_more():
  """The automatic strides (None) sample calls of >= AUTO_MIN_ROWS rows as
  the explicit strides do, each lowered to keep AUTO_MIN_SAMPLE rows (at
  256 rows: 4 and 4, not 4 and 14), and leave smaller calls whole."""
  w, b = _init(np.random.SeedSequence().entropy % 2**31)
  params = _plain_params(w, b)
  rows = lambda a, q: dict(max_relative_change=None,
                           input_factor_row_stride=a, step_size_row_stride=q)
  k = olw._kbfgs
  big = k.AUTO_MIN_ROWS
  capped = lambda stride: min(stride, big // k.AUTO_MIN_SAMPLE)
  assert capped(k.AUTO_STEP_SIZE_ROW_STRIDE) < k.AUTO_STEP_SIZE_ROW_STRIDE
  auto, sampled, exact = (olw.kbfgs(**rows(None, None)), olw.kbfgs(
      **rows(capped(k.AUTO_INPUT_FACTOR_ROW_STRIDE),
             capped(k.AUTO_STEP_SIZE_ROW_STRIDE))), olw.kbfgs(**rows(1, 1)))
  for n, twin, other in ((big, sampled, exact), (big - 1, exact, sampled)):
    (x, t), = _batches(np.random.SeedSequence().entropy % 2**31, 1, n=n)
    loss = lambda p, x=x, t=t: _plain_loss(p, x, t)
    got, same, differs = (
        jax.jit(lambda p, tx=tx, loss=loss: tx.update(
            jax.grad(loss)(p), tx.init(p), p, value_fn=loss)[1])(params)
        for tx in (auto, twin, other))
    # Equal up to float32 round-off (q_l = <delta, g' - g> cancels: 1e-4
    # relative between programs that fuse differently, or take the gradient
    # by the hook instead of jax.grad); sampled and exact differ by 1e-2 or
    # more.
    close = lambda a, c: np.max(np.abs(a - c)) <= 1e-3 * np.max(np.abs(c))
    for mine, equal, unequal in zip(got.layers, same.layers, differs.layers):
      assert close(mine.a, equal.a) and not close(mine.a, unequal.a)
    assert close(got.curvatures, same.curvatures)
    assert not close(got.curvatures, differs.curvatures)


def test_automatic_stride_keeps_coprime_and_64_rows():
  """Sampling.stride_for with the automatic rule: every stride is coprime
  with the rows per example and leaves at least min_sample rows (the
  coprime bump must not undo the cap: 16 positions at 256 rows once gave
  stride 5, 52 rows); hand cases for the cap, the bump, and both."""
  from optax_layerwise import _row_samples
  sampling = _row_samples.Sampling(14, 256, 64)
  stride = lambda n, p: sampling.stride_for(jnp.zeros((n, 1)), p)
  assert stride(255, 1) == 1  # below min_rows: all rows
  assert stride(1000, 1) == 14  # 72 rows
  assert stride(256, 1) == 4  # capped: 64 rows
  assert stride(1000, 28) == 15  # bumped past 14 (gcd 14)
  assert stride(900, 28) == 13  # 15 would leave 60 rows, 14 shares 14
  assert stride(256, 16) == 3  # 4 shares 4 with 16: down, not up to 5
  for n in range(256, 1300, 37):
    for p in (1, 2, 3, 4, 7, 16, 28, 49, 64, 196):
      s = stride(n, p)
      assert math.gcd(s, p) == 1 and (s == 1 or len(range(0, n, s)) >= 64)


# ---------------------------------------------------------------------------
# The per-layer step (ours): t_l = -b_l / q_l from the second pass.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [1, 5])
def test_layer_step_is_minus_b_over_q_from_jax_grad(x64, stride):
  """b_l and q_l from two independent jax.grad calls, at theta and at theta
  plus the trial step, give the applied multiple t_l = -b_l / q_l. With
  step_size_row_stride=s, q_l's gradients are those of the loss (a mean over
  rows) on every s-th example: (n / k) sum_S a_i dL/dh_i is their mean."""
  w, b = _init(np.random.SeedSequence().entropy % 2**31)
  batches = _batches(np.random.SeedSequence().entropy % 2**31, 4)
  hyper = dict(max_relative_change=None, max_step_scale=1e6,
               step_size_row_stride=stride)
  tx = olw.kbfgs(0.1, **hyper)
  fixed = olw.kbfgs(0.1, step_rule="fixed", **hyper)
  params = _plain_params(w, b)
  state = tx.init(params)
  unguarded = 0

  @jax.jit
  def step(params, state, x, t):
    loss = lambda p: _plain_loss(p, x, t)
    grads = jax.grad(loss)(params)
    # The same state: the fixed rule returns the trial step delta itself.
    trial, _ = fixed.update(grads, state, params, value_fn=loss)
    updates, state = tx.update(grads, state, params, value_fn=loss)
    sampled = jax.grad(lambda p: _plain_loss(p, x[::stride], t[::stride]))
    g1, g0 = sampled(optax.apply_updates(params, trial)), sampled(params)
    return grads, trial, updates, state, g1, g0

  for x, t in batches:
    grads, trial, updates, state, g1, g0 = step(params, state, x, t)
    for l, name in enumerate(NAMES):
      dot = lambda a, c: sum(float(jnp.vdot(a[name][k], c[name][k]))
                             for k in a[name])
      b_l = dot(grads, trial)
      q_l = dot(jax.tree_util.tree_map(jnp.subtract, g1, g0), trial)
      # float64 throughout; the two sides sum in a different order.
      np.testing.assert_allclose(state.decreases[l], b_l, rtol=1e-10)
      np.testing.assert_allclose(state.curvatures[l], q_l, rtol=1e-8)
      if q_l > 0 and b_l < 0:  # no safeguard fires
        unguarded += 1
        np.testing.assert_allclose(state.step_sizes[l], -b_l / q_l, rtol=1e-8)
        for k in params[name]:
          np.testing.assert_allclose(updates[name][k],
                                     -b_l / q_l * trial[name][k], rtol=1e-8,
                                     atol=1e-14)
    params = optax.apply_updates(params, updates)
  assert int(state.count) == len(batches)
  # The rule itself was checked on most layer-steps (tanh net, small steps:
  # q_l > 0 mostly; 8 to 12 of the 12 seen).
  assert unguarded >= len(batches) * len(NAMES) // 2, unguarded


def test_tangent_pair_measures_the_exact_curvature_along_the_step(x64):
  """pair='tangent': q_l = <delta_l, (H delta)_l> from jax.jvp of jax.grad."""
  w, b = _init(np.random.SeedSequence().entropy % 2**31)
  (x, t), = _batches(np.random.SeedSequence().entropy % 2**31, 1)
  loss = lambda p: _plain_loss(p, x, t)
  params = _plain_params(w, b)
  hyper = dict(pair="tangent", max_relative_change=None)
  tx = olw.kbfgs(0.1, **hyper)
  trial, _ = olw.kbfgs(0.1, step_rule="fixed", **hyper).update(
      jax.grad(loss)(params), tx.init(params), params, value_fn=loss)
  _, state = tx.update(jax.grad(loss)(params), tx.init(params), params,
                       value_fn=loss)
  _, hess_trial = jax.jvp(jax.grad(loss), (params,), (trial,))
  for l, name in enumerate(NAMES):
    q_l = sum(float(jnp.vdot(trial[name][k], hess_trial[name][k]))
              for k in trial[name])
    np.testing.assert_allclose(state.curvatures[l], q_l, rtol=1e-8)


@pytest.mark.parametrize("memory", [None])  # K-BFGS(L): test_kbfgs_models
def test_defaults_stay_finite_on_the_curves_autoencoder(memory):
  """The defaults, with no learning rate tuned, on the K-BFGS paper's CURVES
  autoencoder with Flax's default (LeCun normal), Glorot and the authors'
  (PyTorch) initialisation: 200 steps, finite, loss well down."""
  from benchmarks import curves_inits
  run = curves_inits.curves_autoencoder_run(olw.kbfgs(memory_size=memory),
                                            200)
  for init in ("lecun", "glorot", "torch"):
    state, losses = run(init)
    print(f"{init} memory={memory}: loss {losses[0]:.1f} -> "
          f"{losses[-1]:.1f}, t_l = {np.round(state.step_sizes, 2)}")
    assert np.all(np.isfinite(losses)), (init, losses)
    assert int(state.num_skipped) == 0, init
    assert losses[-10:].mean() < 0.5 * losses[0], init


def _tanh_net(rows, d_in, d_hidden, d_out, scale):
  """Fresh draws of a tanh layer with bias and a linear one without, and
  their squared-error loss on random inputs (targets 1): ``(params,
  one_step)``, ``one_step(tx)`` being the jitted first update and state."""
  key = jax.random.split(jax.random.PRNGKey(np.random.SeedSequence().entropy
                                            % 2**31), 3)
  x = jax.random.normal(key[0], (rows, d_in))
  params = {"l1": {"kernel": jax.random.normal(key[1], (d_in, d_hidden))
                   * scale, "bias": jnp.zeros(d_hidden)},
            "l2": {"kernel": jax.random.normal(key[2], (d_hidden, d_out))
                   * scale}}

  def loss(p):
    h = jnp.tanh(olw.dense(x, p["l1"]["kernel"], p["l1"]["bias"]))
    return jnp.mean((olw.dense(h, p["l2"]["kernel"]) - 1.0) ** 2)

  def one_step(tx):
    return jax.jit(lambda p: tx.update(jax.grad(loss)(p), tx.init(p), p,
                                       value_fn=loss))(params)

  return params, one_step


@pytest.mark.parametrize("native", [True, False])
def test_default_precondition_dtype_rounds_only_wide_layers(monkeypatch,
                                                            native):
  # precondition_dtype=None: bfloat16 products for float32 factors at least
  # 128 wide on both sides where the backend multiplies bfloat16 natively,
  # exact ones otherwise. One step, the paper's fixed step and no bound, so
  # the update is the preconditioned momentum itself.
  monkeypatch.setattr(_hardware, "native_bfloat16", lambda backend: native)
  _, one_step = _tanh_net(256, 150, 140, 3, 1 / 12)

  def update(dtype):
    return one_step(olw.kbfgs(0.1, step_rule="fixed",
                              max_relative_change=None,
                              precondition_dtype=dtype))[0]

  auto, exact = update(None), update(jnp.float32)
  np.testing.assert_array_equal(auto["l2"]["kernel"], exact["l2"]["kernel"])
  wide, ref = auto["l1"]["kernel"], exact["l1"]["kernel"]
  if not native:
    np.testing.assert_array_equal(wide, ref)
    return
  rel = float(jnp.linalg.norm(wide - ref) / jnp.linalg.norm(ref))
  # Rounded (more than float32 round-off), by about bfloat16's 2^-9 on
  # Gaussian data, with room for two chained products.
  assert 2.0**-14 < rel < 2.0**-5, rel


_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: Test CPU @ 2.0GHz
flags\t\t: fpu sse2 avx avx2 fma{extra0}
vmx flags\t: amx_bf16
bugs\t\t: sysret_ss_attrs

processor\t: 1
flags\t\t: fpu sse2 avx avx2 fma{extra1}
"""


@pytest.mark.parametrize("extra0, extra1, native", [
    ("", "", False), (" avx512f avx512_bf16", " avx512f avx512_bf16", True),
    (" amx_tile amx_bf16", " amx_tile amx_bf16", True),
    (" avx512f avx512_fp16", " avx512f avx512_fp16", False),
    (" amx_bf16", "", False)])  # every processor must list it
def test_native_bfloat16_reads_the_cpu_flags(tmp_path, monkeypatch, extra0,
                                             extra1, native):
  info = tmp_path / "cpuinfo"
  info.write_text(_CPUINFO.format(extra0=extra0, extra1=extra1))
  monkeypatch.setattr(_hardware, "CPUINFO", info)
  _hardware.native_bfloat16.cache_clear()
  try:
    assert _hardware.native_bfloat16("cpu") is native
    assert _hardware.native_bfloat16("tpu")
    assert _hardware.cpu_model(info.read_text()) == "Test CPU @ 2.0GHz"
    assert _hardware.cpu_model("processor\t: 0\n") == ""
    monkeypatch.setattr(_hardware, "CPUINFO", tmp_path / "missing")
    _hardware.native_bfloat16.cache_clear()
    assert not _hardware.native_bfloat16("cpu")
  finally:
    _hardware.native_bfloat16.cache_clear()


@pytest.mark.parametrize("capabilities, native", [
    (["9.0", "8.0"], True), (["8.6", "7.5"], False), ([None], True)])
def test_native_bfloat16_on_gpus_needs_ampere(monkeypatch, capabilities,
                                              native):
  class Device:
    def __init__(self, capability):
      if capability is not None:
        self.compute_capability = capability

  monkeypatch.setattr(_hardware.jax, "devices",
                      lambda backend: [Device(c) for c in capabilities])
  _hardware.native_bfloat16.cache_clear()
  try:
    assert _hardware.native_bfloat16("gpu") is native
  finally:
    _hardware.native_bfloat16.cache_clear()


def test_huge_finite_trial_step_is_bounded_not_skipped():
  # A learning rate of 1e21 makes the trial step's squared norm overflow
  # float32 while every entry is finite: the step must be taken within the
  # displacement bound, not skipped as non-finite (a review of a finiteness
  # test by squared norms found it skipped). (The bound's ratio then reads
  # the overflowed norm as infinite and shortens the step to zero.)
  params, one_step = _tanh_net(32, 4, 8, 1, 0.4)
  updates, state = one_step(olw.kbfgs(1e21, step_rule="fixed"))
  assert int(state.num_skipped) == 0
  for name in params:
    u = jnp.sqrt(sum(jnp.sum(v ** 2) for v in updates[name].values()))
    p = jnp.sqrt(sum(jnp.sum(v ** 2) for v in params[name].values()))
    assert float(u) <= 0.1 * float(p) * (1 + 1e-5), (name, u, p)
