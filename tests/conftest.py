"""Shared pytest fixtures, and XLA flags for a fast test suite."""

import os
import subprocess
import sys

from tests.xla_flags import FAST_COMPILE


def _with_fast_compile() -> str:
  return " ".join([os.environ.get("XLA_FLAGS", ""), FAST_COMPILE]).strip()


def _xla_accepts(flags: str) -> bool:
  """Whether this XLA starts with ``flags`` (an unknown flag aborts it)."""
  probe = subprocess.run(
      [sys.executable, "-c", "import jax; jax.devices()"],
      env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"),
      capture_output=True, check=False, timeout=300)
  return probe.returncode == 0


# The fast-compile flags halve the suite's time, mostly compilation (12:42
# -> 5:41 on 2 cores); tests/test_multidevice.py's worker has always run
# with them. Set before JAX starts its CPU backend, if this XLA knows them.
if ("xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")
    and _xla_accepts(_with_fast_compile())):
  os.environ["XLA_FLAGS"] = _with_fast_compile()

import jax  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position


@pytest.fixture
def x64():
  """Runs the test body with 64-bit JAX arrays (tight reference tolerances)."""
  with jax.enable_x64(True):
    yield
