"""Subcommands of the `glide-jax` command (see glide_jax/cli.py)."""
