r"""Distillation of the shapes demo (configs/shapes.py) into 8- and 4-step guided students.

  glide-jax train --config configs/shapes_distill.py --workdir runs/shapes_distill
  glide-jax train --config configs/shapes_distill.py:init_from=runs/shapes --workdir W
  glide-jax train --config configs/shapes_distill.py:runlocal,init_from=runs/shapes_quick/bundle --workdir W

The teacher is the base demo (`init_from`, default runs/shapes/bundle: its exported EMA weights; a
workdir gives its raw weights). The student has the teacher's architecture plus the guidance
embedding (`guidance_embed`, zero at the start, so step 0 is the teacher's conditional model).
Phase 1 (Meng et al. 2023): GUIDANCE_STEPS steps of guidance distillation, w ~ U[1, 4] per example.
Phase 2 (Salimans & Ho 2022): one round, 8 -> 4 DDIM steps, ROUND_STEPS long. Checkpoints every
CHECKPOINT_EVERY steps (a divisor of both) close phase 1 and the round, so the phase-1 student is
`glide-jax export --step GUIDANCE_STEPS` (launch/demo_distill.sh samples it with DDIM at 8 and at 4
steps, the round's student at 4).

Why most of the budget goes to phase 1 and the round starts at 8 (docs/experiments.md, runs Q and
R): on this data the teacher with CFG and DDIM on the trailing grid scores alike at 16 and 8 steps
and 2.5 points lower at 4, so the few-step gap was guidance, not step count; an earlier split (600
steps of phase 1, then 16 -> 8 -> 4 at 600 each) left its phase-1 student 6.5 points below the
teacher, and its rounds lost more against the phase-1 student sampled at the same counts. Sized for
launch/demo_distill.sh's 40 minutes on 2 CPU cores: batch 16, each step one student forward and
backward plus two teacher forwards, 1.43x the base demo's step at that batch (1.047 s against
0.730 s, alone, `python -m benchmarks.run train_step --stages shapes shapes_distill --batch 16
--no-reference`); the 1,800 steps took 1,992 s with compilation in run R. Those figures are the
previous demo network's (6.1 M parameters, `channel_mult=1,2,4`); the student follows whatever
`configs/shapes.py` holds, and with the current one the 1,800 steps took 871 s on the AMD EPYC
(0.43-0.51 s per step, run S) and 774 s on the Intel Xeon (0.40-0.43 s, run S2; the README's "The
distilled students, measured").
"""
from __future__ import annotations

from configs import common, shapes
from glide_jax import config_lib

DEFAULT_INIT = "runs/shapes/bundle"
GUIDANCE_STEPS = 1400
ROUND_STEPS = 400
CHECKPOINT_EVERY = 200


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, runlocal=False, init_from=DEFAULT_INIT)
  c = common.skeleton("distill")
  c.model.kind = "text2im"
  c.model.options = dict(shapes.MODEL, guidance_embed=True)
  c.model.dtype = "float32"
  c.init_from = arg.init_from
  c.distill = common.distill_section(guidance_steps=GUIDANCE_STEPS, start_steps=8, final_steps=4,
                                     steps_per_round=ROUND_STEPS, guidance_min=1.0, guidance_max=4.0)
  c.total_steps = common.distill_total_steps(c.distill)
  c.batch_size = 16
  c.diffusion.noise_schedule = "squaredcos_cap_v2"  # the teacher's schedule
  c.diffusion.prediction = shapes.PREDICTION         # and its target (v; init_from checks it)

  c.data.name = "glide_shapes/size32"
  c.data.caption_dropout = 0.0    # unused: the teacher's unconditional half is the empty caption
  c.checkpoint.every = CHECKPOINT_EVERY  # divides both: the ends of phase 1 and of the round
  c.log.every = 25
  c.log.sample_every = 0          # launch/demo_distill.sh samples and scores the exported students
  c.log.sample_prompts = shapes.PROMPTS
  c.sampling.update(sampler="ddim", steps="4", guidance_scale=3.0)
  # Fine-tuning: a constant learning rate after a short warmup, restarted with the optimizer at
  # every round; a short EMA so that the exported weights forget the previous round.
  shapes.short_cpu_run(c, lr=2e-4, warmup_steps=20, text_ctx=shapes.MODEL["text_ctx"], runlocal=False)
  c.optimizer.update(decay="constant", decay_steps=0)
  c.ema.rates = (0.995,)
  c.checkpoint.keep = common.distill_total_steps(c.distill) // CHECKPOINT_EVERY  # all (110 MB each)
  if arg.runlocal:
    common.apply_runlocal(c)
    c.distill.update(guidance_steps=2, steps_per_round=1)
    c.total_steps = common.distill_total_steps(c.distill)
    c.checkpoint.update(every=1, keep=4)
    c.optimizer.update(warmup_steps=1)
  return c
