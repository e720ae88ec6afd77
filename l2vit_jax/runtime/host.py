"""The former home of process set-up, the compilation cache and console progress, kept importable
while its last callers move to the modules that now hold each job:

* ``runtime.process_setup``: XLA and libtpu flags, the host allocator, the platforms JAX may start;
* ``runtime.compilation``: the persistent compilation cache and the compile statistics;
* ``runtime.console``: progress bars of long passes and quiet library logs.

The names below are those modules' own objects (``compile_stats`` is the one counter of the process),
not copies. New code imports the modules above.
"""

from l2vit_jax.runtime.compilation import compile_stats, enable_compilation_cache
from l2vit_jax.runtime.console import quiet_library_logs
from l2vit_jax.runtime.process_setup import configure_allocator, configure_platforms, configure_xla_flags

__all__ = ["compile_stats", "configure_allocator", "configure_platforms", "configure_xla_flags",
           "enable_compilation_cache", "quiet_library_logs"]
