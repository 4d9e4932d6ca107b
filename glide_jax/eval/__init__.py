"""Evaluation of samples: caption accuracy on glide_shapes, CLIP score, FID, guidance sweeps.

  attributes   the glide_shapes attribute reader, `caption_accuracy`, caption parsing
  clip_score   CLIP score (100 x cosine) under a noised CLIP at t=0
  frechet      the Frechet distance and feature statistics
  inception    the FID Inception-v3 (Flax) and the importer of its weights file
  fid          `compute_fid` (always reported with sample counts and reference set)
  sweep        guidance sweeps (table, plot, grids)
  stats        intervals of accuracies and paired comparisons between guidance scales
  plots        sample grids, sweep plots, TensorBoard

Submodules are imported on use: `from glide_jax.eval import attributes` pulls in no JAX.
"""
