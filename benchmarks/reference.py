"""The PyTorch reference (openai/glide-text2im) built from the same options, holding OUR weights.

Not a dependency: fetch and install it outside this repository to compare, e.g.
  git clone https://github.com/openai/glide-text2im /tmp/glide-text2im
  pip install --no-deps -e /tmp/glide-text2im && pip install ftfy regex
Our random parameters are copied in with glide_jax.interop.glide_text2im.export_state_dict, so both
sides run identical weights; `max_rel_err` compares their outputs as a sanity check.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

_CREATE_ARGS = ("image_size", "num_channels", "num_res_blocks", "channel_mult", "attention_resolutions",
                "num_heads", "num_head_channels", "num_heads_upsample", "use_scale_shift_norm", "dropout",
                "text_ctx", "xf_width", "xf_layers", "xf_heads", "xf_final_ln", "xf_padding",
                "resblock_updown", "cache_text_emb", "inpaint", "super_res")


def build_model(kind: str, options: dict[str, Any], params: Any):
  """A float32 glide-text2im U-Net of `kind` with `options` (resolved, glide-text2im names) and our params."""
  import torch
  from glide_text2im.model_creation import create_model

  from glide_jax.interop.glide_text2im import export_state_dict

  args = {k: options[k] for k in _CREATE_ARGS}
  args["cache_text_emb"] = False
  model = create_model(use_fp16=False, **args)
  n_vocab = int(options.get("n_vocab", model.tokenizer.n_vocab))
  if n_vocab != model.tokenizer.n_vocab:
    # A model with its own small vocabulary (the shapes demo): same architecture, smaller table.
    model.token_embedding = torch.nn.Embedding(n_vocab, int(options["xf_width"]))
  state = export_state_dict(params, kind, options)
  model.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items()}, strict=True)
  return model.float()


def diffusion(steps: int, noise_schedule: str, respacing: str):
  from glide_text2im.model_creation import create_gaussian_diffusion
  return create_gaussian_diffusion(steps=steps, noise_schedule=noise_schedule, timestep_respacing=respacing)


def nchw(x: np.ndarray):
  import torch
  return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x, np.float32), (0, 3, 1, 2))))


def nhwc(t) -> np.ndarray:
  return np.transpose(t.detach().cpu().numpy(), (0, 2, 3, 1))


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-12))


def normal_kl(mean1, logvar1, mean2, logvar2):
  import torch
  return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def hybrid_loss(model, diff, x0, t, noise, model_kwargs: dict[str, Any]):
  """GLIDE's training objective, as ours (glide_jax.diffusion.losses): MSE on epsilon plus the VB
  term for the learned variance with the mean's gradient stopped (glide-text2im ships no training
  code, so this is written here from guided-diffusion's definition; the t=0 decoder NLL is replaced
  by the KL, which does not change the cost)."""
  import torch
  x_t = diff.q_sample(x0, t, noise=noise)
  out = model(x_t, t, **model_kwargs)
  eps, v = out[:, :3], out[:, 3:]
  frozen = torch.cat([eps.detach(), v], dim=1)
  true_mean, _, true_logvar = diff.q_posterior_mean_variance(x0, x_t, t)
  pred = diff.p_mean_variance(lambda x, tt, **kw: frozen, x_t, t, clip_denoised=False)
  kl = normal_kl(true_mean, true_logvar, pred["mean"], pred["log_variance"]).mean(dim=(1, 2, 3)) / math.log(2.0)
  mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
  return (mse + kl * diff.num_timesteps / 1000.0).mean()
