"""Process-level JAX settings for the command-line tools.

Call `configure()` before the first computation: it must run before the XLA backend starts.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import jax

# XLA:CPU's default scheduler runs independent operations concurrently, which for MGDN nearly
# doubles the peak temporary memory (0.93 GB vs 0.53 GB for a 528x528 MFF pair) for no
# measurable gain on a few cores.
_CPU_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def configure() -> None:
    """Memory-friendly XLA:CPU scheduling, and a persistent compilation cache (default
    ~/.cache/mgdn_jax, or $MGDN_JAX_CACHE) so that repeated runs skip compilation."""
    flags = os.environ.get("XLA_FLAGS", "")
    missing = [f for f in _CPU_FLAGS if f.split("=")[0] not in flags]
    if missing:
        os.environ["XLA_FLAGS"] = " ".join([flags, *missing]).strip()
    cache = os.environ.get("MGDN_JAX_CACHE", str(Path.home() / ".cache" / "mgdn_jax"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def release_memory() -> None:
    """Hands freed heap memory back to the operating system (glibc's `malloc_trim`); a no-op
    without glibc. XLA's compiler frees hundreds of MB that glibc keeps mapped otherwise:
    1.64 GB resident after compiling the MFF training step, 0.75 GB after trimming. Call it
    after compiling, before the compiled program first runs."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
