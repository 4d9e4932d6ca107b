"""Stage configs (`get_config(arg)`, `sweep(add, arg)`), loaded by path through glide_jax.config_lib."""
