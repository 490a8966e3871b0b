"""JAX's persistent compilation cache, for the commands that compile."""

import warnings


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
