"""glide-jax."""
from glide_jax import cpu_flags as _cpu_flags

__version__ = "0.1.0"

# Before any JAX backend exists (importing jax does not create one): fast CPU convolutions.
_cpu_flags.apply()
