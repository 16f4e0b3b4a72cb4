"""Tests for the layer grouping and per-layer reductions (_layers.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_layerwise as olw
from optax_layerwise import _layers


def _params(rng):
  return {
      "dense": {"kernel": rng.normal(size=(4, 3)).astype(np.float32),
                "bias": rng.normal(size=(3,)).astype(np.float32)},
      "out": {"kernel": rng.normal(size=(3, 2)).astype(np.float32)},
  }


def test_default_grouping_is_by_parent_node():
  params = _params(np.random.default_rng(0))
  layers = olw.group_layers(params)
  assert layers.labels == ("['dense']", "['out']")
  # Flatten order is bias, kernel (dict keys sorted), then out/kernel.
  assert layers.leaf_layer == (0, 0, 1)


def test_grouping_by_callable_and_label_tree():
  params = _params(np.random.default_rng(0))
  by_kind = olw.group_layers(params, lambda path, leaf: leaf.ndim)
  assert by_kind.num_layers == 2 and by_kind.leaf_layer == (0, 1, 1)
  labels = {"dense": {"kernel": "a", "bias": "b"}, "out": {"kernel": "a"}}
  by_tree = olw.group_layers(params, labels)
  assert by_tree.labels == ("b", "a") and by_tree.leaf_layer == (0, 1, 1)


def test_grouping_errors_name_the_problem():
  params = _params(np.random.default_rng(0))
  with pytest.raises(ValueError, match="unassigned"):
    olw.group_layers(params, lambda path, leaf: None if leaf.ndim == 1 else 0)
  with pytest.raises(ValueError, match="one label per leaf"):
    olw.group_layers(params, {"dense": "a", "out": "b"})
  with pytest.raises(ValueError, match="no array leaves"):
    olw.group_layers({})


def test_inner_norm_and_scale_match_numpy():
  rng = np.random.default_rng(1)
  x, y = _params(rng), _params(rng)
  layers = olw.group_layers(x)
  want_inner = [
      np.sum(x["dense"]["kernel"] * y["dense"]["kernel"])
      + np.sum(x["dense"]["bias"] * y["dense"]["bias"]),
      np.sum(x["out"]["kernel"] * y["out"]["kernel"]),
  ]
  # float32 sums of ~15 products of O(1) values: 1e-5 relative is ample.
  np.testing.assert_allclose(layers.inner(x, y), want_inner, rtol=1e-5)
  np.testing.assert_allclose(layers.sq_norm(x)[1],
                             np.sum(x["out"]["kernel"] ** 2), rtol=1e-5)
  scaled = layers.scale(x, jnp.array([2.0, -3.0]))
  np.testing.assert_allclose(scaled["dense"]["bias"], 2 * x["dense"]["bias"])
  np.testing.assert_allclose(scaled["out"]["kernel"], -3 * x["out"]["kernel"])


def test_structure_mismatch_is_named():
  params = _params(np.random.default_rng(0))
  layers = olw.group_layers(params)
  with pytest.raises(ValueError, match="the updates does not match"):
    layers.check_structure({"dense": params["dense"]}, "the updates")


def test_reductions_are_float32_for_bfloat16_leaves():
  x = {"a": {"w": jnp.full((300,), 1.01, jnp.bfloat16)}}
  layers = olw.group_layers(x)
  out = layers.sq_norm(x)
  assert out.dtype == jnp.float32
  assert layers.scale(x, jnp.array([0.5]))["a"]["w"].dtype == jnp.bfloat16
  # bf16 has an 8-bit mantissa: 1.01 is stored as 1.0078125; the f32 sum of
  # 300 squares is exact to ~1e-6 relative, a bf16 sum would be off by >1e-3.
  np.testing.assert_allclose(out[0], 300 * 1.0078125 ** 2, rtol=1e-6)


def test_check_params_rejects_masked_integer_and_none():
  with pytest.raises(ValueError, match="value_fn=..."):
    _layers.check_params(None, transform="t")
  with pytest.raises(ValueError, match="dtype int32"):
    _layers.check_params({"a": jnp.ones(2, jnp.int32)}, transform="t")
  with pytest.raises(ValueError, match="dtype complex64"):
    _layers.check_params({"a": jnp.ones(2, jnp.complex64)}, transform="t")
  with pytest.raises(ValueError, match="optax.masked"):
    _layers.check_params({"a": jnp.ones(2), "b": optax.MaskedNode()},
                         transform="t")
