"""glide-jax.

Importing it changes nothing in the process (no environment variables, no JAX configuration): the
entry points apply the CPU's XLA flags themselves (glide_jax/cpu_flags.py).
"""

__version__ = "0.1.0"
