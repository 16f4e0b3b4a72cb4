"""Shared pytest fixtures, and XLA flags for a fast test suite."""

import os
import subprocess
import sys

# XLA:CPU flags that halve the suite's time, mostly compilation (12:42 ->
# 6:41 on 2 cores): LLVM without its expensive passes, no fusion emitters.
# They change how XLA compiles, not what it computes (float32 results may
# differ by round-off); tests/test_multidevice.py's worker has always run
# with them. Set before JAX starts its CPU backend, if this XLA knows them.
FAST_COMPILE = ("--xla_backend_optimization_level=0 "
                "--xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false")


def _with_fast_compile() -> str:
  return " ".join([os.environ.get("XLA_FLAGS", ""), FAST_COMPILE]).strip()


def _xla_accepts(flags: str) -> bool:
  """Whether this XLA starts with ``flags`` (an unknown flag aborts it)."""
  probe = subprocess.run(
      [sys.executable, "-c", "import jax; jax.devices()"],
      env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"),
      capture_output=True, check=False, timeout=300)
  return probe.returncode == 0


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
