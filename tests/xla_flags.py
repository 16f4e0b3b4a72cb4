"""XLA:CPU flags that cut compile time (LLVM without its expensive passes, no
fusion emitters): about fourfold for the multi-device worker's programs and
half the whole suite's time. They change how XLA compiles, not what it
computes (float32 results may differ by round-off). No JAX import here:
``tests/conftest.py`` sets them before JAX starts its CPU backend."""

FAST_COMPILE = ("--xla_backend_optimization_level=0 "
                "--xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false")
