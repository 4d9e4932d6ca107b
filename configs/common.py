"""Defaults shared by every stage config: the config skeleton, the mesh rule table, model sizes.

Sources cited in comments:
  [G]   openai/glide-text2im model_creation.py (released sizes)
  [GD]  openai/guided-diffusion scripts/image_train.py, train_util.py
  [P]   GLIDE paper, arXiv 2112.10741 (section given)
  [ADM] Dhariwal & Nichol 2021, arXiv 2105.05233, App. I, Tables 11 and 13
  [CLIP] Radford et al. 2021, arXiv 2103.00020, Table 19/20 (training hyper-parameters)
"""
from __future__ import annotations

import ml_collections

from glide_jax.parallel import sharding

VARIANTS = ("released", "full", "small", "tiny")

# Logical axis -> mesh axes: the framework's default rules (glide_jax/parallel/sharding.py says why).
MESH_RULES = sharding.DEFAULT_RULES

# ----------------------------------------------------------------------------- model sizes
# Every text2im/upsample option in glide-text2im's names. Released sizes: [G] model_creation.py
# (base 385,030,726 params; upsampler 398,361,286).
RELEASED_BASE = dict(
    image_size=64, num_channels=192, num_res_blocks=3, channel_mult="1,2,3,4",
    attention_resolutions="32,16,8", num_heads=1, num_head_channels=64, num_heads_upsample=-1,
    dropout=0.1,  # [ADM] Table 11, ImageNet-64
    use_scale_shift_norm=True, resblock_updown=True,
    text_ctx=128, xf_width=512, xf_layers=16, xf_heads=8, xf_final_ln=True, xf_padding=True,
    n_vocab=50257,  # GPT-2 BPE [G] tokenizer/bpe.py
)
RELEASED_UPSAMPLE = dict(
    RELEASED_BASE, image_size=256, num_res_blocks=2, channel_mult="1,1,2,2,4,4",
    dropout=0.0,  # [ADM] Table 13, 64->256 upsampler (the released [G] default 0.1 is unused at inference)
)
# The paper's full models, [P] §4.1: ADM-64 at width 512 plus a 24-block 2048-wide text
# transformer (3.5B); the upsampler with 384 channels and a 1024-wide text encoder (1.5B).
# Head counts keep GLIDE's 64 channels per head.
FULL_BASE = dict(RELEASED_BASE, num_channels=512, xf_width=2048, xf_layers=24, xf_heads=32)
FULL_UPSAMPLE = dict(RELEASED_UPSAMPLE, num_channels=384, xf_width=1024, xf_layers=16, xf_heads=16)
# A ~100M-parameter base for a single host with accelerators, GPT-2 tokens.
SMALL_BASE = dict(
    RELEASED_BASE, num_channels=128, num_res_blocks=2, xf_width=384, xf_layers=6, xf_heads=6,
    text_ctx=64)
SMALL_UPSAMPLE = dict(
    RELEASED_UPSAMPLE, num_channels=64, num_res_blocks=2, channel_mult="1,1,2,2,4,4",
    xf_width=384, xf_layers=6, xf_heads=6, text_ctx=64)
# Unit-test size: 16 px, one text layer, seconds on a CPU.
TINY_BASE = dict(
    image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
    attention_resolutions="8", num_heads=1, num_head_channels=16, num_heads_upsample=-1,
    dropout=0.0, use_scale_shift_norm=True, resblock_updown=True,
    text_ctx=16, xf_width=32, xf_layers=1, xf_heads=2, xf_final_ln=True, xf_padding=True,
    n_vocab=64)
TINY_UPSAMPLE = dict(TINY_BASE)

TEXT2IM_SIZES = {
    "base": {"released": RELEASED_BASE, "full": FULL_BASE, "small": SMALL_BASE, "tiny": TINY_BASE},
    "upsample": {"released": RELEASED_UPSAMPLE, "full": FULL_UPSAMPLE, "small": SMALL_UPSAMPLE,
                 "tiny": TINY_UPSAMPLE},
}


def model_options(stage: str, variant: str) -> dict:
  """A fresh copy of the glide-text2im options for a 'base' or 'upsample' model of a variant, plus
  our `scan_layers` (off: the text blocks per layer; on: under nn.scan) and `attention_impl` (None:
  the backend's default kernel; 'xla', 'cudnn'; docs/models.md), listed so that
  `--config.model.options.scan_layers=true` or `--config.model.options.attention_impl=cudnn` can set them."""
  return dict(TEXT2IM_SIZES[stage][variant], scan_layers=False, attention_impl=None)


# ----------------------------------------------------------------------------- skeleton
def skeleton(stage: str) -> ml_collections.ConfigDict:
  """Every section and field of the config schema (docs/architecture.md), with ADM defaults."""
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = 0
  c.total_steps = 100_000
  c.batch_size = 256            # global, across all hosts
  c.microbatches = 1            # gradient accumulation steps per optimizer step

  c.model = ml_collections.ConfigDict()
  c.model.kind = "text2im"      # registry.create_model kind
  c.model.options = ml_collections.ConfigDict()
  c.model.dtype = "float32"     # compute dtype; parameters stay float32
  c.model.remat_policy = "none"  # per block: 'none' | 'full' | 'dots' | ... (glide_jax/models/remat.py)

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.steps = 1000
  c.diffusion.noise_schedule = "squaredcos_cap_v2"  # [G] base; 'linear' for the upsampler
  c.diffusion.schedule_sampler = "uniform"          # [GD] default; or 'stratified', 'loss-second-moment', 'logit-normal'
  c.diffusion.logit_normal_loc = 0.0                # 'logit-normal' only: t/T = sigmoid(loc + scale * N(0, 1))
  c.diffusion.logit_normal_scale = 1.0
  c.diffusion.prediction = "epsilon"                # [G]; 'v' for velocity, 'x0' (glide_jax/diffusion/schedules.py)
  c.diffusion.upsample_residual = ""                # [G]: ''; upsamplers: 'bicubic' | 'bilinear' diffuse image - up(low_res)
  c.diffusion.vb_weight = 1.0                       # [GD] hybrid loss: mse + vb_weight * vb (0 = mse alone)
  c.diffusion.min_snr_gamma = 0.0                   # > 0: cap the MSE's x0 weight at gamma (Min-SNR; 0 = off)

  c.data = ml_collections.ConfigDict()
  c.data.name = "image_folder"
  c.data.data_dir = ""
  c.data.split = "train"
  c.data.image_key = "image"
  c.data.caption_key = "caption"
  c.data.tokenizer = ml_collections.ConfigDict()
  c.data.tokenizer.type = "gpt2"  # 'gpt2' | 'sentencepiece' | 'words' | 'clip'
  c.data.tokenizer.path = ""      # tokenizer files; '' = the built-in one for the type
  c.data.tokenizer.text_ctx = 128
  c.data.caption_dropout = 0.2    # [P] §4.2: 20% of captions become empty for CFG
  c.data.low_res_size = 0         # upsampler conditioning size; 0 = none
  c.data.masks = ml_collections.ConfigDict()
  c.data.masks.kind = "none"      # inpainting masks: 'none' | 'random' (boxes, ellipses, strokes)
  c.data.masks.min_known = 0.3    # fraction of the image left known, lower and upper bound
  c.data.masks.max_known = 0.9
  c.data.low_res_blur = 0.0        # training: Gaussian blur sigma (px) of the low-res input; 0 = none
  c.data.low_res_noise = 0.0       # training: std of Gaussian noise added to the low-res input
  c.data.random_crop = True        # training: random square crops (evaluation: centre crops)
  c.data.num_threads = 0           # tf.data private thread pool size; 0 = tf.data's default
  c.data.prepare_timeout = 3600.0  # s another process may take to prepare glide_shapes (multi-process)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"      # 'adamw' | 'sgd' (plain gradient descent: scale-sensitive, for tests)
  c.optimizer.lr = 1e-4           # [GD] default
  c.optimizer.b1 = 0.9            # [ADM] App. I: AdamW, torch defaults
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.0  # [GD] default
  c.optimizer.grad_clip_norm = 0.0  # 0 = off ([GD] does not clip)
  c.optimizer.warmup_steps = 0    # [GD] has no warmup
  c.optimizer.decay = "constant"  # 'constant' | 'linear' | 'cosine'
  c.optimizer.decay_steps = 0     # steps of the decay after warmup (needed by linear/cosine)
  c.optimizer.final_lr_frac = 0.0  # the decay ends at lr * final_lr_frac

  c.ema = ml_collections.ConfigDict()
  c.ema.rates = (0.9999,)         # [ADM] App. I
  c.ema.warmup = False            # True: bias-corrected EMA, usable from the first steps

  c.mesh = ml_collections.ConfigDict()
  c.mesh.replica = 1              # axis sizes inside a slice (ICI); -1 = all remaining devices
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.dcn_replica = 1          # axis sizes across slices (DCN); their product = slice count
  c.mesh.dcn_data = 1
  c.mesh.dcn_fsdp = 1
  c.mesh.dcn_tensor = 1
  c.rules = MESH_RULES

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 10_000     # [GD] save_interval
  c.checkpoint.keep = 3
  c.checkpoint["async"] = True  # orbax async save; `async` is a Python keyword, hence the item syntax
  c.checkpoint.check_every = 10   # multi-process: agree on a SIGTERM every this many steps (a collective;
                                  # 1 = every step); one process checks every step, jax's preemption
                                  # sync point is asked every step
  c.checkpoint.params_check_every = 1000  # multi-process: compare the parameter copies' checksums
                                  # (on device) every this many steps; 0 = only at the start and end

  c.log = ml_collections.ConfigDict()
  c.log.every = 10                # [GD] log_interval
  c.log.sample_every = 10_000
  c.log.sample_prompts = ("a red circle on the left", "an oil painting of a corgi")
  c.log.sample_seed = 0
  c.log.tensorboard = True
  c.log.profile_steps = (0, 0)    # (first step, count): a jax.profiler trace of those steps on process 0
                                  # into WORKDIR/profile; count 0 = none

  c.sampling = ml_collections.ConfigDict()
  c.sampling.sampler = "plms"     # 'ancestral' | 'ddim' | 'plms' | 'dpm++'
  c.sampling.steps = "100"        # respacing: a count ('100') or a GLIDE set ('fast27')
  c.sampling.guidance_scale = 3.0  # [G] text2im notebook

  c.init_from = ""
  return c


def distill_section(**values) -> ml_collections.ConfigDict:
  """The `distill` section of a distill-stage config (glide_jax/train/stages.py DISTILL_DEFAULTS, which
  a test keeps equal to these defaults; docs/training.md, "Distillation")."""
  d = ml_collections.ConfigDict()
  d.guidance_steps = 0        # phase 1: train steps of guidance distillation (w as an input)
  d.start_steps = 16          # phase 2: DDIM steps of the first progressive teacher ...
  d.final_steps = 4           # ... halved each round down to this many
  d.steps_per_round = 0       # train steps of each progressive round
  d.guidance_min = 1.0        # w ~ U[guidance_min, guidance_max] per example, GLIDE's scale s
  d.guidance_max = 4.0        #   (pred_u + s (pred_c - pred_u); 1 = the conditional model)
  d.clip_x0 = True            # the teacher's x0 clipped to [-1, 1] in its DDIM steps, as the sampler
  d.update(values)
  return d


def distill_total_steps(d: ml_collections.ConfigDict) -> int:
  """Train steps of a `distill` section's schedule: phase 1 plus one round per halving."""
  rounds = int(d.start_steps // d.final_steps).bit_length() - 1
  return int(d.guidance_steps) + rounds * int(d.steps_per_round)


def apply_runlocal(c: ml_collections.ConfigDict) -> None:
  """Shrinks a config to a few steps on this machine (big_vision's `runlocal`)."""
  c.total_steps = 4
  c.batch_size = min(c.batch_size, 8)
  c.log.every = 1
  c.log.sample_every = 0
  c.log.tensorboard = False
  c.checkpoint.every = 2
  c.checkpoint.keep = 1
  c.sampling.steps = "4"
  c.mesh.update(replica=1, data=-1, fsdp=1, tensor=1, dcn_replica=1, dcn_data=1, dcn_fsdp=1,
                dcn_tensor=1)
