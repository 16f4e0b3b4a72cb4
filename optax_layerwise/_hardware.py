"""Whether the backend multiplies bfloat16 natively: K-BFGS's automatic
``precondition_dtype`` rounds its step products to bfloat16 only there.

Measured on the MNIST autoencoder's products (``H_a M`` at 1001 x 1001 x
500, float32 accumulation): on a CPU with bfloat16 matrix units (AMX) the
bfloat16 inputs ran ~3x faster than float32; on an AVX2 CPU without them,
1.3-1.7x *slower* (62-88 against 97-121 GFLOP/s), since XLA converts them
back. GPUs and TPUs have bfloat16 matrix units.
"""

from __future__ import annotations

import functools
import pathlib

#: x86 CPU flags (Linux ``/proc/cpuinfo``) of bfloat16 dot-product or
#: matrix units. Other CPUs (or no ``/proc/cpuinfo``) count as without.
CPU_BFLOAT16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
CPUINFO = pathlib.Path("/proc/cpuinfo")


def cpu_flags(text: str) -> frozenset:
  """The feature flags listed on ``/proc/cpuinfo``'s ``flags`` lines."""
  flags = set()
  for line in text.splitlines():
    key, _, value = line.partition(":")
    if key.strip() == "flags":
      flags.update(value.split())
  return frozenset(flags)


@functools.lru_cache(maxsize=None)
def native_bfloat16(backend: str) -> bool:
  """Whether ``backend`` (``jax.default_backend()``) has bfloat16 matrix
  units: every accelerator; a CPU only with one of
  :data:`CPU_BFLOAT16_FLAGS`."""
  if backend != "cpu":
    return True
  try:
    text = CPUINFO.read_text()
  except OSError:
    return False
  return bool(cpu_flags(text) & CPU_BFLOAT16_FLAGS)
