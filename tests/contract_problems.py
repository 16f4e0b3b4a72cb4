"""Optax's optimizer-contract targets, and the library's transforms, for
tests/test_optax_contract.py.

The targets re-express ``_setup_parabola``, ``_setup_rosenbrock``,
``_setup_matrix_parabola`` and ``_setup_mixed_tensor_target`` of
``optax/contrib/_common_test.py`` (the first two also in
``optax/_src/alias_test.py``): same objectives, same starting points, same
minimisers. ``dense=True`` writes each parameter as the kernel of an
:func:`optax_layerwise.dense` layer fed an identity (``x = I``, so
``dense(x, W) == W``), the same objective in a form K-BFGS can precondition.
"""

import inspect
import typing

import jax
import jax.numpy as jnp
import optax

import optax_layerwise as olw


def _as_layer(value, dense):
  """A layer ``{'w': value}``; with ``dense`` a 1-D value becomes a
  ``(1, n)`` kernel."""
  if not dense:
    return {"w": value}
  return {"w": value[None, :] if value.ndim == 1 else value}


def _read(layer, dense):
  """The optax-shaped value of a layer made by ``_as_layer``."""
  w = layer["w"]
  if not dense:
    return w
  x = jnp.eye(w.shape[0], dtype=w.dtype)
  return olw.dense(x, w)


def _read_vector(layer, dense):
  out = _read(layer, dense)
  return out[0] if dense else out


def _abs_sq(x):
  return jnp.real(x * jnp.conj(x))


def parabola(dtype=jnp.float32, dense=False):
  """``_setup_parabola``: ``sum |p - (1, -1, 1)|^2`` from ``(-1, 10, 1)``."""
  init = jnp.array([-1.0, 10.0, 1.0], dtype)
  final = jnp.array([1.0, -1.0, 1.0], dtype)
  params = _as_layer(init, dense)

  def objective(p):
    return jnp.sum(_abs_sq(_read_vector(p, dense) - final))

  return params, _as_layer(final, dense), objective


def rosenbrock(dtype=jnp.float32, dense=False):
  """``_setup_rosenbrock``: a=1, b=100, from (0, 0) to (1, 1)."""
  init = jnp.zeros(2, dtype)
  final = jnp.ones(2, dtype)
  params = _as_layer(init, dense)

  def objective(p):
    v = _read_vector(p, dense)
    return _abs_sq(1.0 - v[0]) + 100.0 * _abs_sq(v[1] - v[0] ** 2)

  return params, _as_layer(final, dense), objective


def matrix_parabola(dtype=jnp.float32, dense=False):
  """``_setup_matrix_parabola``: a 2x2 parameter, from zeros."""
  init = jnp.zeros((2, 2), dtype)
  final = jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype)

  def objective(p):
    return jnp.sum(_abs_sq(_read(p, dense) - final))

  return _as_layer(init, dense), _as_layer(final, dense), objective


def mixed_tensor_target(dtype=jnp.float32, dense=False):
  """``_setup_mixed_tensor_target``: a 1-D and a 2-D parameter.

  As in optax the params are the tuple of both, whose leaves share a parent
  node and so form one layer; with ``dense`` each is a dense kernel (a
  layer each, as K-BFGS sees them)."""
  f1 = jnp.array([1.0, -1.0, 2.0], dtype)
  f2 = jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype)
  if dense:
    params = (_as_layer(jnp.zeros(3, dtype), dense),
              _as_layer(jnp.zeros((2, 2), dtype), dense))
    final = (_as_layer(f1, dense), _as_layer(f2, dense))
    parts = lambda p: (_read_vector(p[0], dense), _read(p[1], dense))
  else:
    params = (jnp.zeros(3, dtype), jnp.zeros((2, 2), dtype))
    final = (f1, f2)
    parts = lambda p: p

  def objective(p):
    v1, v2 = parts(p)
    return jnp.sum(_abs_sq(v1 - f1)) + jnp.sum(_abs_sq(v2 - f2))

  return params, final, objective


TARGETS = {
    "parabola": parabola,
    "rosenbrock": rosenbrock,
    "matrix_parabola": matrix_parabola,
    "mixed_tensor_target": mixed_tensor_target,
}


def all_targets(dtype=jnp.float32, dense=False, names=tuple(TARGETS)):
  """The targets side by side in one params dict, their objectives summed.

  The objective is separable across the targets (no cross-layer curvature),
  so a layer-wise method solves each as it would alone; one compilation
  covers all four.
  """
  made = {name: TARGETS[name](dtype, dense) for name in names}
  params = {name: m[0] for name, m in made.items()}
  final = {name: m[1] for name, m in made.items()}

  def objective(p):
    return sum(made[name][2](p[name]) for name in names)

  return params, final, objective


# ---------------------------------------------------------------------------
# The transforms under test.


class Case(typing.NamedTuple):
  """A public transform of the library, as the contract tests use it.

  ``factory(**kwargs)`` builds the transform; ``finish`` makes an optimizer
  of it (a negation after the ``scale_by_*`` transforms, whose output is a
  positive step, as Optax's ``scale_by_adam`` and friends); ``dense`` says
  the problem must be written with :func:`optax_layerwise.dense` layers;
  ``static_args`` are the arguments :func:`optax.inject_hyperparams` must
  keep static (array shapes, Python control flow).
  """
  factory: typing.Callable
  kwargs: dict
  negate: bool = False
  dense: bool = False
  static_args: tuple = ()

  def make(self, **overrides):
    return finish(self, self.factory(**{**self.kwargs, **overrides}))


def finish(case, tx):
  return optax.chain(tx, optax.scale(-1.0)) if case.negate else tx


CASES = {
    "layerwise_sgd": Case(olw.layerwise_sgd, {}),
    "layerwise_adamw": Case(olw.layerwise_adamw, {}),
    "scale_by_layerwise_step_size": Case(
        olw.scale_by_layerwise_step_size, {}, negate=True),
    "cblr": Case(olw.cblr, {}),
    "mclr": Case(olw.mclr, {}),
    "scale_by_curvature_lr": Case(olw.scale_by_curvature_lr, {}, negate=True),
    "kbfgs": Case(olw.kbfgs, {}, dense=True),
    "kbfgs_memory": Case(olw.kbfgs, {"memory_size": 3}, dense=True,
                         static_args=("memory_size",)),
}


def schedule_args(factory):
  """Names of ``factory``'s arguments annotated ``ScalarOrSchedule``.

  ``_common_test.test_optimizers_accept_learning_rate_schedule_if_type_
  annotated_as_such`` looks at ``learning_rate`` only; the library's
  schedulable scalar is named ``scale``, ``learning_rate_scale`` or
  ``learning_rate``.
  """
  names = []
  for name, param in inspect.signature(factory).parameters.items():
    ann = param.annotation
    if ann in (optax.ScalarOrSchedule, optax.Schedule) or (
        isinstance(ann, str) and ann.split(".")[-1] in (
            "ScalarOrSchedule", "Schedule")):
      names.append(name)
  return tuple(names)


def tree_max_abs_diff(a, b):
  return max(float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32)
                                   - jnp.asarray(y, jnp.float32))))
             for x, y in zip(jax.tree_util.tree_leaves(a),
                             jax.tree_util.tree_leaves(b)))
