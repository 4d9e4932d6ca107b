"""Names every layer shares; this module imports nothing, so the data pipeline, the trainer and the
commands can all take them from here."""

# The GLIDE training stages a config's `stage` names: the 64 px text-conditional base model, the
# 256 px upsampler, the inpainting fine-tune (of either), the noised CLIP for CLIP guidance, and
# the distillation of a guided base model into a few-step student (the base stage's data).
STAGES: tuple[str, ...] = ("base", "upsample", "inpaint", "clip", "distill")
