"""`glide-jax app`: an interactive editor in the browser (generate, mask and inpaint, upsample).

core.py does the work through `glide_jax.sampling` (the same calls as `glide-jax sample`); ui.py is
the Gradio page. Gradio is the `app` extra: `pip install -e ".[app]"`.
"""
