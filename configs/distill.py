r"""Distillation of a v-prediction base model into a few-step guided student (stage `distill`).

  glide-jax train --config configs/distill.py:variant=small,init_from=runs/base_v --workdir runs/distill
  glide-jax train --config configs/distill.py:variant=tiny,runlocal --workdir /tmp/distill

The student is the base model of the variant (configs/base.py) with the guidance scale as an input
(`guidance_embed`); `init_from` names the teacher, a training workdir or bundle of that variant
trained with `--config.diffusion.prediction=v` (the released GLIDE predicts epsilon and is refused).
Phase 1 (Meng et al. 2023) distils the guided teacher, w ~ U[1, 4]; phase 2 (Salimans & Ho 2022)
halves the DDIM steps 64 -> 32 -> 16 -> 8 -> 4. docs/training.md, "Distillation".
"""
from __future__ import annotations

from configs import base, common
from glide_jax import config_lib


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, variant="released", runlocal=False, init_from="")
  config_lib.check_choice("variant", arg.variant, common.VARIANTS)
  c = base.get_config(f"variant={arg.variant}")
  c.stage = "distill"
  c.model.options.guidance_embed = True
  c.diffusion.prediction = "v"
  c.data.caption_dropout = 0.0     # unused: the teacher's unconditional half is the empty caption
  c.init_from = arg.init_from
  # Fine-tuning a trained model: a lower learning rate with a short warmup, restarted every round
  # (the optimizer is reset there); an EMA short enough to forget the previous round.
  c.optimizer.update(lr=5e-5, warmup_steps=500, decay="constant", decay_steps=0)
  c.ema.rates = (0.999,)
  c.ema.warmup = True
  c.sampling.update(sampler="ddim", steps="4", guidance_scale=3.0)
  if arg.variant == "tiny":
    c.distill = common.distill_section(guidance_steps=4, start_steps=8, final_steps=2, steps_per_round=4)
    c.optimizer.update(lr=1e-3, warmup_steps=1)
  else:
    c.distill = common.distill_section(guidance_steps=20_000, start_steps=64, final_steps=4,
                                       steps_per_round=10_000)
  c.total_steps = common.distill_total_steps(c.distill)
  c.checkpoint.every = c.distill.steps_per_round  # a checkpoint at the end of every round
  c.checkpoint.keep = 8
  if arg.runlocal:
    common.apply_runlocal(c)
    c.distill.update(guidance_steps=2, start_steps=4, final_steps=2, steps_per_round=2)
    c.total_steps = common.distill_total_steps(c.distill)
    c.optimizer.update(warmup_steps=1)
  return c
