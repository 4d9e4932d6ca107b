"""Names every layer shares; this module imports nothing, so the data pipeline, the trainer and the
commands can all take them from here."""

# The GLIDE training stages a config's `stage` names: the 64 px text-conditional base model, the
# 256 px upsampler, the inpainting fine-tune (of either) and the noised CLIP for CLIP guidance.
STAGES: tuple[str, ...] = ("base", "upsample", "inpaint", "clip")
