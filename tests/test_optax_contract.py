"""Optax's own optimizer contract, run against every public transform.

Optax checks each of its optimizers with a common battery of tests:
``optax/contrib/_common_test.py`` (class ``ContribTest``) and the "COMMON
TESTS" of ``optax/_src/alias_test.py`` (class ``AliasTest``), both shipped in
the optax wheel. Their test classes cannot be reused from outside (the
optimizer lists are module constants, optimizers are looked up by name in
``optax.contrib``/``optax.alias``, the update kwargs are chosen by
optimizer name, with no way to pass ``value_fn``), so each check is
re-expressed here, citing the Optax test it follows; Optax's assertion
helpers (``optax._src.test_utils``) are imported. The adaptations:

* every ``update`` gets ``value_fn=`` (the objective as a function of the
  params), as this library's transforms need it;
* the ``scale_by_*`` transforms output a positive step (as
  ``optax.scale_by_adam``), so they are tested followed by
  ``optax.scale(-1)``;
* K-BFGS preconditions dense layers only, so its problems are the same
  objectives with each parameter written as the kernel of an
  ``olw.dense`` layer fed an identity (``dense(I, W) == W``);
* checks that Optax runs as separate compilations over several targets or
  dtypes run here over one pytree holding all of them (a layer per target or
  dtype; the objective is their sum, separable, so the layers do not
  interact), and checks that need the same compiled step share it: one
  ``jax.jit`` compilation per transform and group of checks keeps the file
  fast.

Checks, and the Optax tests they follow (both files unless said):
``test_optimization_state_stability_and_no_recompilation``
(``test_optimization`` / ``test_optimizers``, ``test_optimizers_accept_
extra_args``, ``test_state_shape_dtype_shard_stability``,
``test_preserve_dtype``), ``test_inject_hyperparams_and_schedules``
(``test_optimizers_can_be_wrapped_in_inject_hyperparams``; ``ContribTest.
test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such``),
``test_gradient_accumulation``, ``test_tree_map_params`` (the
"tree_map_params works" subtest) and ``test_complex_params_refused_at_init``
(the complex64/complex128 cases).

Not applicable: ``AliasTest.test_explicit_dtype`` (``accumulator_dtype`` /
``mu_dtype`` arguments, which no transform here has; statistics are float32
or float64 by design, README "Conventions") and the L-BFGS-specific tests.

Expected failures (strict): ``optax.tree.map_params`` (documented, every
transform); K-BFGS with float32 and float64 layers in one tree (a bug);
cblr/mclr under ``inject_hyperparams`` at momentum 0 (a state-structure
deviation). Each reason is in its marker.
"""
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax._src import test_utils as optax_test_utils
import pytest

import optax_layerwise as olw
from tests import contract_problems as cp

CASES = cp.CASES
NAMES = tuple(CASES)

# Each test compiles one step function (per transform); XLA's CPU backend
# optimisations are turned off for them (a per-function option, nothing
# global): the file's time is almost all compilation, which this cuts by
# about a third, while the programs' semantics (shapes, dtypes, values up to
# rounding) stay the same.
jit = functools.partial(jax.jit, compiler_options={
    "xla_backend_optimization_level": 0})

# optax's convergence tolerance (assert_trees_all_close(params, final_params,
# rtol=3e-2, atol=3e-2) in both test_optimization and test_optimizers).
CONVERGENCE_TOL = 3e-2


def _extra_args(objective, value):
  """The update kwargs: ``value_fn`` plus an argument nobody expects
  (``test_optimizers_accept_extra_args`` in both files), and ``value`` cast
  to a confusing dtype (``test_state_shape_dtype_shard_stability``)."""
  return {"value_fn": objective, "value": value,
          "unexpected_extra_args_your_optimizer_doesnt_expect": 1}


def _assert_finite(tree, what):
  for leaf in jax.tree_util.tree_leaves(tree):
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      assert np.all(np.isfinite(np.asarray(leaf, np.float64))), what


def _avals(tree):
  return jax.tree_util.tree_map(
      lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


# ---------------------------------------------------------------------------
# One compiled step function per transform runs five of Optax's checks:
#
# * alias_test.AliasTest.test_optimization (parabola, Rosenbrock; 10000
#   steps) and _common_test.ContribTest.test_optimizers (the four targets,
#   30000 steps under jax.lax.scan): every target reaches its minimiser
#   within rtol = atol = 3e-2 (optax's tolerance);
# * their subtest "the optimizer doesn't recompile on 2nd call" (also in
#   ContribTest.test_optimizers_accept_extra_args): the second call, given
#   the state the first returned, reuses the compilation;
# * test_optimizers_accept_extra_args (both files): every update gets an
#   unexpected keyword argument;
# * test_state_shape_dtype_shard_stability (both files; float16, bfloat16,
#   float32, float64; ``value`` cast to a confusing dtype): the update and
#   its state pass through jax.lax.cond against the unchanged (params,
#   state), which fails to trace unless every shape and dtype is kept (here
#   also through jax.lax.fori_loop's carry, as strict; a drift of weak types
#   shows as a recompilation);
# * test_preserve_dtype (both files; bfloat16, float32): updates have the
#   params' dtypes.
#
# The four float32 targets and the parabola in float16, bfloat16 and
# float64 sit side by side in one params tree (a layer each; the objective
# is their sum, separable, so the layers do not interact), under
# jax.enable_x64. K-BFGS cannot take float32 and float64 layers in one tree
# (test_kbfgs_mixed_float32_float64_layers): its float64 parabola runs on
# its own. Optax checks one dtype at a time, so this is still its contract.

STEPS_PER_CALL = 1000
NUM_CALLS = 30  # 30000 steps, as _common_test (alias_test runs 10000).
OTHER_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float64)

STEP_GROUPS = [(name, "all") for name in NAMES if not CASES[name].dense] + [
    (name, group) for name in NAMES if CASES[name].dense
    for group in ("float64-apart", "float64")]


def _step_problem(dense, group):
  """``(params, final, objective)``: the targets of the group, side by side."""
  made = {}
  if group != "float64":
    params, final, objective = cp.all_targets(jnp.float32, dense=dense)
    made["float32"] = (params, final, objective)
  dtypes = {"all": OTHER_DTYPES, "float64-apart": OTHER_DTYPES[:2],
            "float64": OTHER_DTYPES[2:]}[group]
  for dtype in dtypes:
    made[f"parabola_{jnp.dtype(dtype).name}"] = cp.parabola(dtype, dense)
  params = {k: m[0] for k, m in made.items()}
  final = {k: m[1] for k, m in made.items()}
  objective = lambda p: sum(m[2](p[k]).astype(jnp.float32)
                            for k, m in made.items())
  return params, final, objective


def _dtypes(tree):
  return [leaf.dtype for leaf in jax.tree_util.tree_leaves(tree)]


@pytest.mark.parametrize("name,group", STEP_GROUPS,
                         ids=[f"{n}-{g}" for n, g in STEP_GROUPS])
def test_optimization_state_stability_and_no_recompilation(name, group):
  case = CASES[name]
  with jax.enable_x64(True):
    tx = case.make()
    params, final, objective = _step_problem(case.dense, group)

    def step(params, state):
      value, grads = jax.value_and_grad(objective)(params)
      value = value.astype(jnp.float16)  # confuse dtype intentionally
      updates, new_state = tx.update(grads, state, params,
                                     **_extra_args(objective, value))
      # Both checked while tracing (dtypes are static); the cond is optax's
      # way, and raises TypeError if a branch's types differ.
      assert _dtypes(updates) == _dtypes(params), "updates change dtype"
      cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
      jax.lax.cond(cond, lambda: (updates, new_state),
                   lambda: (params, state))
      return optax.apply_updates(params, updates), new_state

    @jit
    def run(params, state):
      return jax.lax.fori_loop(0, STEPS_PER_CALL, lambda _, c: step(*c),
                               (params, state))

    state = tx.init(params)
    state_avals = _avals(state)
    params, state = run(params, state)
    with optax_test_utils.log_compilations() as compilation_logs:
      params, state = run(params, state)
    assert not compilation_logs, (
        f"{name} recompiles on the second call to update")
    for _ in range(NUM_CALLS - 2):
      params, state = run(params, state)

  assert _avals(state) == state_avals
  assert _dtypes(params) == _dtypes(final)
  # The state's counters account for every step: each was taken (count) or
  # skipped as non-finite (num_skipped, count frozen); none is skipped on
  # these smooth problems.
  total = STEPS_PER_CALL * NUM_CALLS
  skipped = int(optax.tree.get(state, "num_skipped"))
  counts = optax.tree_utils.tree_get_all_with_path(state, "count")
  assert counts and all(int(c) + skipped == total for _, c in counts), (
      counts, skipped)
  assert skipped == 0
  _assert_finite(state, f"{name}: non-finite state")
  for key in final:
    err = cp.tree_max_abs_diff(params[key], final[key])
    optax_test_utils.assert_trees_all_close(
        jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64),
                               params[key]),
        jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64),
                               final[key]),
        rtol=CONVERGENCE_TOL, atol=CONVERGENCE_TOL,
        err_msg=f"{name} did not solve {key} (max error {err:.3g})")


@pytest.mark.parametrize("name", NAMES + ("cblr_secant",))
def test_state_can_be_donated(name):
  # Flax's and Optax's examples jit the step with the state donated
  # (donate_argnums); XLA refuses a state holding one buffer twice ("donate
  # the same buffer twice"), as init once returned for the zero counters.
  case = (CASES[name] if name in CASES
          else cp.Case(olw.cblr, {"curvature": "secant"}))
  tx = case.make()
  params, _, objective = cp.parabola(jnp.float32, case.dense)
  state = tx.init(params)
  leaves = jax.tree_util.tree_leaves(state)
  assert len({id(x) for x in leaves}) == len(leaves), name

  @functools.partial(jit, donate_argnums=(0, 1))
  def step(params, state):
    updates, state = tx.update(jax.grad(objective)(params), state, params,
                               value_fn=objective)
    return optax.apply_updates(params, updates), state

  for _ in range(2):  # the second call donates what the first returned
    params, state = step(params, state)
  _assert_finite((params, state), name)


# Regression: K-BFGS(L) once accepted pairs of s ~ 1e-20, y ~ 1e-17 at the
# minimum (s^T s underflowed, so the skip rule passed them), r_inv reached
# 3e35 and every later step overflowed and was skipped; pairs whose s^T y is
# below sqrt(finfo.tiny) are now rejected (_bfgs._accept_pair).
def test_kbfgs_memory_takes_every_step_near_a_minimum():
  tx = CASES["kbfgs_memory"].make()
  params, final, objective = cp.rosenbrock(jnp.float32, dense=True)

  def step(carry, _):
    params, state = carry
    updates, state = tx.update(jax.grad(objective)(params), state, params,
                               value_fn=objective)
    return (optax.apply_updates(params, updates), state), None

  (params, state), _ = jit(lambda p, s: jax.lax.scan(step, (p, s),
                                                     length=5000))(
                                                         params,
                                                         tx.init(params))
  optax_test_utils.assert_trees_all_close(params, final, rtol=CONVERGENCE_TOL,
                                          atol=CONVERGENCE_TOL)
  assert int(state.num_skipped) == 0 and int(state.count) == 5000, (
      int(state.num_skipped), int(state.count))


# ---------------------------------------------------------------------------
# Two checks of the hyperparameter plumbing, on one problem and one
# compilation per transform:
#
# * _common_test.ContribTest.test_optimizers_can_be_wrapped_in_inject_
#   hyperparams and alias_test.AliasTest.test_optimizers_can_be_wrapped_in_
#   inject_hyperparams: the first update of the plain and of the injected
#   transform are equal (updates: rtol 1e-5 in _common_test, 1e-3 in
#   alias_test; states: rtol 1e-5 atol 1e-5, and rtol 1e-4). Every numeric
#   argument is injected (as optax injects the opt_kwargs it passes);
#   arguments that set an array shape stay static (the case's static_args),
#   as optax does for 'rank' or 'num_betas'.
# * _common_test.ContribTest.test_optimizers_accept_learning_rate_schedule_
#   if_type_annotated_as_such: an argument annotated ScalarOrSchedule gives
#   the same params after 10 steps with constant_schedule(v) as with v
#   (optax's default tolerance, rtol 1e-6). Optax looks at ``learning_rate``
#   only; here every such argument (``scale``, ``learning_rate_scale``,
#   ``learning_rate``), at half its default so that ignoring it would show.

HYPER_STEPS = 10


def _numeric_defaults(factory):
  out = {}
  for arg, param in inspect.signature(factory).parameters.items():
    default = param.default
    if isinstance(default, (int, float)) and not isinstance(default, bool):
      out[arg] = default
  return out


def _inject_problem(dense):
  """The params and grads of optax's inject test, ``[-1 (2, 3), +1 (2, 5,
  2)]`` and ``[+1, -1]`` (one layer: leaves under one parent node), with the
  quadratic objective whose gradient there is those grads (curvatures 2 and
  0.5). For K-BFGS, one dense layer (a -1 (2, 3) kernel and a +1 (3,)
  bias, fed the 2x2 identity) under a quadratic, and its gradient there."""
  if dense:
    params = {"w": -jnp.ones((2, 3)), "b": jnp.ones(3)}
    target = jnp.array([[1.0, 2.0, 0.0], [-1.0, 0.5, 3.0]])

    def objective(p):
      out = olw.dense(jnp.eye(2), p["w"], p["b"])
      return jnp.sum(jnp.array([[2.0], [0.5]]) * (out - target) ** 2)
    return params, jax.grad(objective)(params), objective
  params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
  grads = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]
  curv = (2.0, 0.5)

  def objective(p):
    # f(p) = sum 0.5 c |p - p0 + g / c|^2: gradient g at p0.
    return sum(0.5 * c * jnp.sum((q - q0 + g / c) ** 2)
               for c, q, q0, g in zip(curv, p, params, grads))
  return params, grads, objective


def _inner(case, state):
  """The transform's own state (the chain's first part after a negation)."""
  return state[0] if case.negate else state


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_and_schedules(name):
  case = CASES[name]
  scheduled = cp.schedule_args(case.factory)
  hparams = {**_numeric_defaults(case.factory), **case.kwargs}
  hparams.update({arg: 0.5 * hparams[arg] for arg in scheduled})
  if hparams.get("momentum") == 0.0:
    # cblr/mclr leave the momentum trace out of the chain at a Python 0.0
    # but keep it when momentum is injected; at 0.0 the two states differ in
    # structure (test_injected_zero_momentum_keeps_the_state_structure), so
    # the comparison is made with momentum on.
    hparams["momentum"] = 0.9
  opt = case.make(**hparams)
  opt_inject = cp.finish(case, optax.inject_hyperparams(
      case.factory, static_args=case.static_args)(**hparams))
  opt_schedule = case.make(**{**hparams, **{
      arg: optax.constant_schedule(hparams[arg]) for arg in scheduled}})
  params, grads, objective = _inject_problem(case.dense)

  def trajectory(opt, keep_first=True):
    """Params after HYPER_STEPS steps; the first update and new state.

    The first gradient is ``grads`` (the objective is built so)."""
    def step(carry, _):
      params, state = carry
      grads = jax.grad(objective)(params)
      updates, state = opt.update(grads, state, params, value_fn=objective)
      out = (updates, state) if keep_first else None
      return (optax.apply_updates(params, updates), state), out

    (final, _), per_step = jax.lax.scan(
        step, (params, opt.init(params)), length=HYPER_STEPS)
    return final, jax.tree_util.tree_map(lambda x: x[0], per_step)

  @jit
  def run():
    return (trajectory(opt), trajectory(opt_inject),
            trajectory(opt_schedule, False)[0] if scheduled else None)

  (final, (updates, state)), (_, (updates_inject, state_inject)), (
      final_schedule) = run()
  assert any(np.any(np.asarray(u) != 0)
             for u in jax.tree_util.tree_leaves(updates)), "no step taken"
  # Tolerances: alias_test's rtol (updates 1e-3, states 1e-4) and
  # _common_test's state atol (1e-5), not _common_test's rtol 1e-5. The
  # plain transform folds Python-float hyperparameters into constants in
  # float64 at trace time, the injected one computes with float32 arrays.
  # With b2 = 0.999, 1 - float32(0.999) is off by 1.29e-5 relative, so
  # optax.scale_by_adam's own second moment (the direction of
  # layerwise_adamw) differs by 1.29e-5 relative (the reason alias_test,
  # which injects optax.adam, allows 1e-4); the K-BFGS(L) memory's
  # 1 / (s^T y) differs by 1.2e-5 relative after one damped pair, and
  # entries of H_g that are 0 in exact arithmetic are +-2e-9 (hence the
  # atol). Updates agree to 2e-7 relative.
  optax_test_utils.assert_trees_all_close(updates_inject, updates, rtol=1e-3)
  optax_test_utils.assert_trees_all_close(
      _inner(case, state_inject).inner_state, _inner(case, state), rtol=1e-4,
      atol=1e-5)
  injected = _inner(case, state_inject).hyperparams
  assert set(injected) == set(hparams) - set(case.static_args)
  if scheduled:
    assert cp.tree_max_abs_diff(final, params) > 0, "no step taken"
    # The schedule's rate is a float32 array, the plain one a folded Python
    # float; K-BFGS amplifies that round-off over HYPER_STEPS steps (1.4e-6
    # relative measured, K-BFGS(L)): _common_test's rtol 1e-5.
    optax_test_utils.assert_trees_all_close(final_schedule, final,
                                            rtol=1e-5)
  else:
    assert name.startswith("scale_by_"), (
        f"{name} has no argument annotated ScalarOrSchedule")


@pytest.mark.xfail(
    strict=True, raises=AssertionError,
    reason="deviation from Optax's inject_hyperparams contract (states "
    "equal): with momentum=0.0 (a Python number) cblr/mclr leave "
    "optax.trace out of their chain, but under optax.inject_hyperparams the "
    "momentum is traced, so the trace is kept: the injected inner_state has "
    "an extra TraceState. Updates are equal; a checkpoint of one does not "
    "restore into the other (see _curvature_lr.py, 'a traced momentum keeps "
    "the trace').")
@pytest.mark.parametrize("name", ["cblr", "mclr"])
def test_injected_zero_momentum_keeps_the_state_structure(name):
  case = CASES[name]
  params, _, _ = _inject_problem(case.dense)
  plain = case.factory(momentum=0.0)
  injected = optax.inject_hyperparams(case.factory)(momentum=0.0)
  state = jax.eval_shape(plain.init, params)
  inner = jax.eval_shape(injected.init, params).inner_state
  assert jax.tree_util.tree_structure(inner) == (
      jax.tree_util.tree_structure(state))


def _multi_dtype_parabola(dense, dtypes):
  made = {jnp.dtype(d).name: cp.parabola(d, dense) for d in dtypes}
  params = {k: m[0] for k, m in made.items()}
  return params, lambda p: sum(
      made[k][2](p[k]).astype(jnp.float32) for k in made)


# Found by the stability check with all dtypes in one tree (regression: a
# float32 layer's factors next to a float64 layer once received float64
# statistics and failed to trace).
@pytest.mark.parametrize("name", [n for n in NAMES if CASES[n].dense])
def test_kbfgs_mixed_float32_float64_layers(name):
  case = CASES[name]
  with jax.enable_x64(True):
    tx = case.make()
    params, objective = _multi_dtype_parabola(
        True, (jnp.float32, jnp.float64))
    grads = jax.grad(objective)(params)
    updates, state = jax.eval_shape(
        functools.partial(tx.update, value_fn=objective),
        grads, tx.init(params), params)
    assert _avals(state) == _avals(tx.init(params))
    assert updates["float32"]["w"].dtype == jnp.float32
    assert updates["float64"]["w"].dtype == jnp.float64


# ---------------------------------------------------------------------------
# alias_test.AliasTest.test_gradient_accumulation and
# _common_test.ContribTest.test_gradient_accumulation: under
# optax.MultiSteps(every_k_schedule=4) the first update is exactly zero
# (bfloat16 and float32, one layer each). Extended to the 4th call, which
# must emit a finite, non-zero update of the params' dtypes (the inner
# transform ran once, on the averaged gradient, with value_fn forwarded).


@pytest.mark.parametrize("name", NAMES)
def test_gradient_accumulation(name):
  case = CASES[name]
  opt = optax.MultiSteps(case.make(), every_k_schedule=4)
  params, objective = _multi_dtype_parabola(case.dense,
                                            (jnp.bfloat16, jnp.float32))
  grads = jax.grad(objective)(params)
  update = jit(functools.partial(opt.update, value_fn=objective))
  state = opt.init(params)
  for k in range(4):
    updates, state = update(grads, state, params)
    if k == 0:
      optax_test_utils.assert_trees_all_equal(
          updates, jax.tree_util.tree_map(jnp.zeros_like, grads))
  for key, p in params.items():
    assert jax.tree_util.tree_leaves(updates[key])[0].dtype == (
        jax.tree_util.tree_leaves(p)[0].dtype)
  _assert_finite(updates, f"{name}: non-finite accumulated update")
  assert all(np.any(np.asarray(u, np.float32) != 0)
             for u in jax.tree_util.tree_leaves(updates)), (
                 "the 4th micro-step emitted no update")
  assert int(state.gradient_step) == 1
  counts = optax.tree_utils.tree_get_all_with_path(state.inner_opt_state,
                                                   "count")
  assert counts and all(int(c) == 1 for _, c in counts), counts


# ---------------------------------------------------------------------------
# alias_test.AliasTest.test_optimization and _common_test.ContribTest.
# test_optimizers, subtest "Test that tree_map_params works": a no-op
# optax.tree.map_params over the state.


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.xfail(
    strict=True, raises=ValueError,
    reason="documented exception (docs/distributed.md): optax.tree.map_params "
    "calls init on a placeholder object instead of params, and every "
    "transform's init needs real arrays (it groups leaves into layers, checks "
    "their dtypes, sizes per-layer statistics); the layer-wise and CBLR "
    "transforms raise 'no array leaves', K-BFGS builds a state whose "
    "structure does not match. Map over the state by key path instead "
    "(tests/multidevice_worker.py like_params).")
def test_tree_map_params(name):
  case = CASES[name]
  tx = case.make()
  params, _, _ = cp.parabola(jnp.float32, case.dense)
  state = tx.init(params)
  mapped = optax.tree.map_params(tx, lambda v: v, state)
  optax_test_utils.assert_trees_all_equal(mapped, state)


# ---------------------------------------------------------------------------
# alias_test.AliasTest.test_optimization and
# test_state_shape_dtype_shard_stability with complex64/complex128: optax
# skips them for optimizers that do not support complex parameters. No
# transform here does (their curvature quantities are defined for real
# params); the contract kept is that they refuse complex params at init with
# an error naming the dtype, instead of mis-stepping silently.


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [jnp.complex64, jnp.complex128])
def test_complex_params_refused_at_init(name, dtype):
  case = CASES[name]
  with jax.enable_x64(dtype == jnp.complex128):
    params, _, _ = cp.parabola(dtype, case.dense)
    with pytest.raises(ValueError, match=(
        f"{jnp.dtype(dtype).name}.*Keep integer or complex")):
      case.make().init(params)
