"""Shared pytest fixtures."""

import jax
import pytest


@pytest.fixture
def x64():
  """Runs the test body with 64-bit JAX arrays (tight reference tolerances)."""
  with jax.enable_x64(True):
    yield
