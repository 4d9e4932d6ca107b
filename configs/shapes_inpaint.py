r"""Second demo stage, part 2: inpainting fine-tune of the 32 px demo model (configs/shapes.py).

  glide-jax train --config configs/shapes_inpaint.py --workdir runs/shapes_inpaint
  glide-jax train --config configs/shapes_inpaint.py --workdir W --config.init_from=runs/shapes
  glide-jax train --config configs/shapes_inpaint.py:runlocal,init_from=runs/shapes_quick/bundle --workdir W

Starts from the base demo's weights (`init_from`, default runs/shapes/bundle: the exported EMA
weights; a workdir also works and gives its raw weights). The 4 extra input channels (known RGB and
mask, [P] §4.3) start at zero, so step 0 predicts what the base model predicts. Random masks (boxes,
ellipses, strokes) come from the data pipeline. The architecture is the base demo's, read from
configs/shapes.py, so the two must come from the same version of that file. Sized like the base
demo (launch/demo_inpaint.sh, bounded by TRAIN_MINUTES); measured in docs/experiments.md, "Second
demo stage".
"""
from __future__ import annotations

from configs import common, shapes
from glide_jax import config_lib

DEFAULT_INIT = "runs/shapes/bundle"


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, runlocal=False, steps=0, init_from=DEFAULT_INIT)
  c = common.skeleton("inpaint")
  c.model.kind = "inpaint"
  c.model.options = dict(shapes.MODEL)
  c.model.dtype = "float32"
  c.init_from = arg.init_from

  c.total_steps = arg.steps or 750  # 534 s on 2 CPU cores with the current demo network (~20 min before)
  c.batch_size = 32
  c.diffusion.noise_schedule = "squaredcos_cap_v2"  # the base model's schedule
  c.diffusion.prediction = shapes.PREDICTION         # and its target (init_from checks it)

  c.data.name = "glide_shapes/size32"
  c.data.caption_dropout = 0.2    # keep classifier-free guidance working
  c.data.masks.kind = "random"
  c.checkpoint.every = 500
  c.log.every = 25
  c.log.sample_every = 0          # in-training samples need images and masks; the launch script samples
  c.log.sample_prompts = shapes.PROMPTS
  c.sampling.update(sampler="ancestral", steps="100", guidance_scale=3.0)
  # Fine-tuning: a lower peak than the base run's 1e-3, and a short warmup for the new channels.
  shapes.short_cpu_run(c, lr=3e-4, warmup_steps=50, text_ctx=shapes.MODEL["text_ctx"],
                       runlocal=arg.runlocal)
  return c
