"""How digitjax's programs are compiled: XLA's options, and JAX's persistent compilation cache
for the commands that compile."""

import os
import warnings
from typing import Any


def xla_options(quick_compile: bool) -> dict[str, Any]:
    """XLA's options for a run's training programs (`Config.quick_compile`). On CPU, LLVM's
    code generation split into as many parts as there are cores, not XLA's 32: the same
    numbers, with less of LLVM's cost per part (the training chunk's compile 8% fewer
    CPU seconds on two cores). Quick, on CPU: XLA's classic LLVM emitters instead of its newer
    fusion emitters, which compile the training chunk in ~60% of the time (1.36 -> 0.80 s for
    the default recipe's) and give the same numbers bit for bit, but run its steps ~5% slower
    (benchmarks/README.md)."""
    import jax

    if jax.default_backend() != "cpu":
        return {}
    options: dict[str, Any] = {"xla_cpu_parallel_codegen_split_count": os.cpu_count() or 1}
    if quick_compile:
        options["xla_cpu_use_fusion_emitters"] = False
    return options


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache: a fresh process loads the programs an earlier one
    compiled (benchmarks/README.md has the figures). The thresholds are lowered to zero
    because predict's programs are small. Where the cache cannot be made, runs go on without."""
    import jax

    from digitjax.data import default_cache_dir

    folder = default_cache_dir() / "jax-cache"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    # JAX writes an entry in place and never replaces it: one cut short by a kill is a
    # recompile at each later start, and not worth a warning on every run.
    warnings.filterwarnings("ignore", "Error reading persistent compilation cache entry")
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
