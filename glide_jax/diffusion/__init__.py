"""Gaussian diffusion for GLIDE: schedules and respacing, the diffusion arithmetic, the hybrid
training loss, timestep samplers, compiled samplers, guidance and reference-dump parity.

See docs/diffusion.md (the functions and their contracts) and docs/sampling.md (how to sample).
"""
from glide_jax.diffusion.gaussian import (  # noqa: F401
    MeanVariance,
    condition_mean,
    condition_score,
    ddim_step,
    model_timesteps,
    p_mean_variance,
    p_sample_step,
    predict_eps_from_xstart,
    predict_xstart_from_eps,
    process_xstart,
    q_posterior_mean_variance,
    q_sample,
)
from glide_jax.diffusion.losses import training_losses  # noqa: F401
from glide_jax.diffusion.samplers import SAMPLERS, sample, sample_loop  # noqa: F401
from glide_jax.diffusion.schedules import (  # noqa: F401
    Diffusion,
    create_diffusion,
    get_named_beta_schedule,
    space_timesteps,
)
