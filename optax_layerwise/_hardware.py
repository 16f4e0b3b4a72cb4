"""Whether the backend multiplies bfloat16 natively: K-BFGS's automatic
``precondition_dtype`` rounds its step products to bfloat16 only there.

Measured on the MNIST autoencoder's products (``H_a M`` at 1001 x 1001 x
500, float32 accumulation): on a CPU with bfloat16 matrix units (AMX) the
bfloat16 inputs ran ~3x faster than float32, on an AMD EPYC with
``avx512_bf16`` and no AMX 1.45-1.6x (250-278 against 156-184 GFLOP/s);
on an AVX2 CPU without either,
1.3-1.7x *slower* (62-88 against 97-121 GFLOP/s), since XLA converts them
back. TPUs and NVIDIA GPUs from Ampere (compute capability 8.0) on have
bfloat16 matrix units; older GPUs do not.

The answer is decided once per process, at trace time, for
``jax.default_backend()``: pass ``precondition_dtype`` explicitly for the
same rounding on every host or when compiling for another platform.
"""

from __future__ import annotations

import functools
import pathlib

import jax

#: x86 CPU flags (Linux ``/proc/cpuinfo``) of bfloat16 dot-product or
#: matrix units (both measured faster, see above). Other CPUs
#: (ARM, macOS, Windows: no such ``flags`` lines) count as without.
CPU_BFLOAT16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
CPUINFO = pathlib.Path("/proc/cpuinfo")
#: The first CUDA compute capability with bfloat16 tensor cores (Ampere).
CUDA_BFLOAT16_CAPABILITY = 8.0


def _values(text: str, field: str) -> list:
  """The values of ``/proc/cpuinfo``'s ``field: value`` lines, in order
  (one per processor)."""
  values = []
  for line in text.splitlines():
    key, _, value = line.partition(":")
    if key.strip() == field:
      values.append(value.strip())
  return values


def cpu_flags(text: str) -> frozenset:
  """The feature flags that every processor of ``/proc/cpuinfo``'s text
  lists on its ``flags`` line."""
  per_cpu = [frozenset(v.split()) for v in _values(text, "flags")]
  return frozenset.intersection(*per_cpu) if per_cpu else frozenset()


def cpu_model(text: str) -> str:
  """The first ``model name`` of ``/proc/cpuinfo``'s text (``""`` if
  none)."""
  return next(iter(_values(text, "model name")), "")


def read_cpuinfo() -> str:
  """``/proc/cpuinfo``'s text, ``""`` where it cannot be read."""
  try:
    return CPUINFO.read_text(errors="replace")
  except OSError:
    return ""


def _cpu_native() -> bool:
  return bool(cpu_flags(read_cpuinfo()) & CPU_BFLOAT16_FLAGS)


def _gpu_native(backend: str) -> bool:
  """Every device's CUDA compute capability is at least Ampere's (devices
  without one, such as ROCm's, count as native)."""
  for device in jax.devices(backend):
    capability = getattr(device, "compute_capability", None)
    if capability is not None and float(capability) < CUDA_BFLOAT16_CAPABILITY:
      return False
  return True


@functools.lru_cache(maxsize=None)
def native_bfloat16(backend: str) -> bool:
  """Whether ``backend`` (``jax.default_backend()``) has bfloat16 matrix
  units: a TPU; a GPU from Ampere on; a CPU listing one of
  :data:`CPU_BFLOAT16_FLAGS` on every processor."""
  if backend == "cpu":
    return _cpu_native()
  if backend in ("gpu", "cuda"):
    return _gpu_native(backend)
  return True
