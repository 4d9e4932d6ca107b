"""Distillation of the guided model (stage `distill`, glide_jax/diffusion/distillation.py).

Each check is against something computed without the code it guards: the teacher's own apply, the
sampler's classifier-free-guidance combination, a closed-form Gaussian case (data ~ N(mu, s^2), whose
exact x0 predictor is affine in x_t, as in tests/test_samplers.py), and an uninterrupted run.
Tiny models (configs/distill.py:variant=tiny, 8 px, 50 diffusion steps)."""
from __future__ import annotations

import json
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_support as ts

from glide_jax import config_lib, sampling
from glide_jax.commands import export as export_cmd
from glide_jax.diffusion import distillation, gaussian, guidance, samplers, schedules
from glide_jax.models import registry
from glide_jax.train import checkpoint as ckpt_lib
from glide_jax.train import init_from, stages
from glide_jax.train import program as program_lib
from glide_jax.train import train as train_lib

# Phase 1 for 2 steps, then rounds 8 -> 4 and 4 -> 2 of 2 steps each: 6 steps in all.
SCHEDULE = ["--config.distill.guidance_steps=2", "--config.distill.start_steps=8",
            "--config.distill.final_steps=2", "--config.distill.steps_per_round=2", "--config.total_steps=6",
            "--config.batch_size=8", "--config.checkpoint.every=1", "--config.checkpoint.keep=10",
            *ts.mesh_overrides(2, 4)]  # the 8 CPU devices of the tests: parameters fsdp-sharded by 4


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
  ts.session_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """A tiny v-prediction text2im bundle with every zero-initialised leaf drawn at random (so its
  output depends on x, t and the caption)."""
  config = ts.tiny_config("base", "--config.diffusion.prediction=v")
  return ts.perturbed_bundle(config, tmp_path_factory.mktemp("teacher") / "bundle"), config


def _distill_config(bundle, *extra):
  return ts.tiny_config("distill", f"--config.init_from={bundle}", *SCHEDULE, *extra)


def _inputs(config, b=4, seed=0):
  it = ts.SyntheticIterator(config, seed=seed)
  batch = next(it)
  r = np.random.RandomState(seed)
  s = int(config.model.options.image_size)
  x = r.standard_normal((b, s, s, 3)).astype(np.float32)
  t = r.randint(0, int(config.diffusion.steps), (b,)).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(t), jnp.asarray(batch["tokens"][:b]), jnp.asarray(batch["mask"][:b])


def test_step0_student_is_the_teachers_conditional_model(teacher):
  bundle, base_config = teacher
  config = _distill_config(bundle)
  program = program_lib.build(config, tokenizer=ts.tokenizer(config))
  params = init_from.load_init_params(config, program.stage)
  state = program.init_state(jax.random.key(0), params=params, compiler_options=ts.FAST)
  assert not np.any(np.asarray(state.params["guidance_embed_2"]["kernel"]))
  assert np.any(np.asarray(state.params["guidance_embed_0"]["kernel"]))
  teacher_params = ts.bundle_params(bundle)
  teacher_model = registry.create_model("text2im", dict(base_config.model.options))
  x, t, tokens, mask = _inputs(config)
  want = teacher_model.apply({"params": teacher_params}, x, t, tokens, mask)
  for w in (0.0, 1.0, 3.0, 7.5):
    got = program.stage.model.apply({"params": jax.device_get(state.params)}, x, t, tokens, mask,
                                    guidance=jnp.full((4,), w))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  # the frozen teacher in the state is the same tree, sharded like the student
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               jax.device_get(state.teacher), jax.device_get(state.params))
  assert jax.tree.map(lambda s: s.spec, program.state_shardings.teacher) == \
      jax.tree.map(lambda s: s.spec, program.state_shardings.params)


def test_distill_refuses_teachers_it_cannot_distil(teacher, tmp_path):
  bundle, _ = teacher
  config = _distill_config(bundle, "--config.diffusion.prediction=epsilon")
  with pytest.raises(ValueError, match="distils v-prediction"):
    stages.make_stage(config)
  eps = ts.tiny_config("base")  # an epsilon-prediction teacher
  eps_bundle = ts.perturbed_bundle(eps, tmp_path / "eps")
  config = _distill_config(eps_bundle)
  with pytest.raises(ValueError, match="predicts 'epsilon'"):
    init_from.load_init_params(config, stages.make_stage(config))
  config = _distill_config(bundle, "--config.model.options.num_channels=64")
  with pytest.raises(ValueError, match="num_channels"):
    init_from.load_init_params(config, stages.make_stage(config))
  for bad, match in ((["--config.distill.final_steps=3"], "power of 2"),
                     (["--config.distill.start_steps=64"], "diffusion.s 50 steps"),
                     (["--config.distill.guidance_max=0.5"], "guidance_min")):
    with pytest.raises(ValueError, match=match):
      stages.make_stage(_distill_config(bundle, *bad))
  with pytest.raises(config_lib.ConfigError, match="distill.rounds"):
    _distill_config(bundle, "--config.distill.rounds=3")


def _loss_setup(teacher):
  """The stage, its initial (= teacher) parameters, a batch as the step prepares it, and jitted
  forwards taking the parameters as arguments. (Closed over, parameters become constants, and
  XLA:CPU with the experimental ynn/oneDNN fusions of glide_jax/cpu_flags.py returned NaNs here.)"""
  bundle, _ = teacher
  config = _distill_config(bundle)
  stage = stages.make_stage(config)
  params = init_from.load_init_params(config, stage)
  _x, t, tokens, mask = _inputs(config)
  empty_t, empty_m = (jnp.asarray(a) for a in ts.tokenizer(config).empty(4))
  image = jnp.asarray(next(ts.SyntheticIterator(config))["image"][:4])
  batch = {"image": image, "tokens": tokens, "mask": mask, "t": t, "weights": jnp.ones((4,)),
           "noise": jax.random.normal(jax.random.key(1), image.shape), "uncond_tokens": empty_t,
           "uncond_mask": empty_m}
  model = stage.model
  forward = jax.jit(lambda p, x_, t_, tok, m, g: model.apply({"params": p}, x_, t_, tok, m, guidance=g))
  loss = jax.jit(lambda p, bt, step: stage.loss(p, bt, jax.random.key(2), teacher=p, step=step))
  return config, stage, params, batch, forward, loss


def test_phase1_target_is_the_samplers_guided_prediction(teacher):
  """The phase-1 loss at step 0 (student = teacher) is, per example, the mean square of the student's
  output minus the target that the sampler's classifier-free guidance (guidance.cfg_model_fn, one
  doubled batch, what diffusion/pipeline.py samples with) gives at the drawn w, at x_t = q_sample."""
  _config, stage, params, batch, forward, loss_fn = _loss_setup(teacher)
  model = stage.model
  loss, aux = loss_fn(params, batch, jnp.int32(0))
  w = aux["guidance"]
  assert np.all((w >= 1.0) & (w <= 4.0)) and np.ptp(np.asarray(w)) > 0
  x_t = gaussian.q_sample(stage.diffusion, batch["image"], batch["t"], batch["noise"])

  def sampler_target(p, x_, t_, w_):
    v = {"params": p}
    text_c = model.apply(v, batch["tokens"], batch["mask"], method="encode_text")
    text_u = model.apply(v, batch["uncond_tokens"], batch["uncond_mask"], method="encode_text")

    def apply_fn(xx, tt, cond):
      text, g = cond
      return model.apply(v, xx, tt, text_cond=text, guidance=g)
    return guidance.cfg_model_fn(apply_fn, (text_c, w_), (text_u, w_), w_[:, None, None, None])(x_, t_)

  target = jax.jit(sampler_target)(params, x_t, batch["t"], w)
  student = forward(params, x_t, batch["t"], batch["tokens"], batch["mask"], w)
  np.testing.assert_allclose(np.asarray(aux["losses"]), np.asarray(jnp.mean((student - target) ** 2, axis=(1, 2, 3))),
                             rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(float(loss), float(jnp.mean(aux["losses"])), rtol=1e-6)
  # ... which is the formula written out: pred_u + w (pred_c - pred_u), the conditional variance
  u = forward(params, x_t, batch["t"], batch["uncond_tokens"], batch["uncond_mask"], w)
  wb = w[:, None, None, None]
  want = jnp.concatenate([u[..., :3] + wb * (student[..., :3] - u[..., :3]), student[..., 3:]], -1)
  np.testing.assert_allclose(np.asarray(target), np.asarray(want), atol=1e-5)
  assert np.abs(np.asarray(student - u)).max() > 1e-3  # the caption matters, so w does
  assert np.all(np.asarray(aux["round"]) == -1)


def test_phase2_loss_is_salimans_and_hos_target(teacher):
  """At the first step of round 8 -> 4 (student = teacher): max(SNR, 1) times the x0 error against
  progressive_target (two clipped teacher DDIM steps), with the student's x0 from its v output."""
  _config, stage, params, batch, forward, loss_fn = _loss_setup(teacher)
  _, aux = loss_fn(params, batch, jnp.int32(2))
  w = aux["guidance"]
  assert np.all(np.asarray(aux["round"]) == 0)
  abar_ext = distillation.extended_alphas_cumprod(stage.diffusion)
  tau, tau_mid, tau_end = stage.distill.student_times(batch["t"], jnp.int32(0))
  assert set(np.asarray(tau).tolist()) <= {12, 25, 38, 50}  # trailing4 of 50 steps, + 1

  def teacher_x0(z_, tau_):
    out = forward(params, z_, tau_ - 1, batch["tokens"], batch["mask"], w)
    return jnp.clip(distillation.x0_from_v(z_, out[..., :3], abar_ext[tau_]), -1, 1)

  a = abar_ext[tau][:, None, None, None]
  z = jnp.sqrt(a) * batch["image"] + jnp.sqrt(1 - a) * batch["noise"]
  target = distillation.progressive_target(teacher_x0, z, tau, tau_mid, tau_end, abar_ext)
  v = forward(params, z, tau - 1, batch["tokens"], batch["mask"], w)[..., :3]
  x0 = jnp.sqrt(a) * z - jnp.sqrt(1 - a) * v
  snr = abar_ext[tau] / (1 - abar_ext[tau])
  want = jnp.maximum(snr, 1.0) * jnp.mean((x0 - target) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(aux["losses"]), np.asarray(want), rtol=2e-4, atol=1e-7)
  assert np.all(np.asarray(want) > 0)


# ----------------------------------------------------------------------------- closed-form Gaussian
MU = np.array([0.3, -0.2, 0.1])
S = np.array([0.5, 0.35, 0.6])
N = 4096


def _exact_x0(abar_ext):
  """E[x0 | z] for x0 ~ N(MU, S^2) at grid point tau: affine in z."""
  mu, s2 = jnp.asarray(MU, jnp.float32), jnp.asarray(S ** 2, jnp.float32)

  def x0(z, tau):
    ab = abar_ext[tau][:, None, None, None]
    a = jnp.sqrt(ab)
    return mu + a * s2 / (ab * s2 + 1 - ab) * (z - a * mu)
  return x0


def _as_model_fn(x0_at, abar_ext):
  """(z, original timestep) -> [v | 0] with v = (sqrt(abar) z - x0) / sqrt(1 - abar)."""
  def model_fn(z, t_model):
    tau = t_model + 1
    ab = abar_ext[tau][:, None, None, None]
    v = (jnp.sqrt(ab) * z - x0_at(z, tau)) / jnp.sqrt(1 - ab)
    return jnp.concatenate([v, jnp.zeros_like(v)], -1)
  return model_fn


def test_one_progressive_round_halves_the_steps_on_a_gaussian():
  """Round 8 -> 4 with the exact teacher: fit the student's x0 (affine per step and channel, which
  holds the exact answer) to the round's targets by least squares, then sample it with our DDIM on
  the 4-step trailing grid: it lands where the teacher's 8 DDIM steps do from the same noise, so it
  keeps their sample mean and variance, which 4 plain DDIM steps do not."""
  diffusion = schedules.create_diffusion(1000, "squaredcos_cap_v2", "", prediction="v")
  abar_ext = distillation.extended_alphas_cumprod(diffusion)
  schedule = distillation.DistillSchedule(0, 8, 4, 10, 1000)
  teacher_x0 = _exact_x0(abar_ext)
  r = jnp.int32(0)
  key = jax.random.key(0)
  coefs = {}
  for i in range(1, 5):  # each student step: its t-draws map to step i
    t = jnp.full((N,), (i - 1) * 250 + 7, jnp.int32)
    tau, tau_mid, tau_end = schedule.student_times(t, r)
    assert int(tau[0]) == 250 * i and int(tau_end[0]) == 250 * (i - 1) and int(tau_mid[0]) in (250 * i - 125, 250 * i - 126)
    key, k1, k2 = jax.random.split(key, 3)
    x = jnp.asarray(MU, jnp.float32) + jnp.asarray(S, jnp.float32) * jax.random.normal(k1, (N, 1, 1, 3))
    a = abar_ext[tau][:, None, None, None]
    z = jnp.sqrt(a) * x + jnp.sqrt(1 - a) * jax.random.normal(k2, x.shape)
    target = distillation.progressive_target(teacher_x0, z, tau, tau_mid, tau_end, abar_ext)
    zz, tt = np.asarray(z).reshape(N, 3).astype(np.float64), np.asarray(target).reshape(N, 3).astype(np.float64)
    fit = [np.polyfit(zz[:, ch], tt[:, ch], 1) for ch in range(3)]
    resid = max(np.abs(np.polyval(fit[ch], zz[:, ch]) - tt[:, ch]).max() for ch in range(3))
    assert resid < 1e-3, resid  # the target of an affine teacher is affine in z_t
    coefs[250 * i] = np.array(fit)  # [3, (slope, intercept)]
  table = np.zeros((1001, 3, 2), np.float32)
  for tau, c in coefs.items():
    table[tau] = c
  table = jnp.asarray(table)

  def student_x0(z, tau):
    c = table[tau]  # [B, 3, 2]
    return c[:, None, None, :, 0] * z + c[:, None, None, :, 1]

  shape = (N, 1, 1, 3)
  d4 = schedules.create_diffusion(1000, "squaredcos_cap_v2", "trailing4", prediction="v")
  d8 = schedules.create_diffusion(1000, "squaredcos_cap_v2", "trailing8", prediction="v")
  kw = {"sampler": "ddim", "clip_denoised": False}
  student = np.asarray(samplers.sample(_as_model_fn(student_x0, abar_ext), d4, shape, jax.random.key(5), **kw))
  teacher8 = np.asarray(samplers.sample(_as_model_fn(teacher_x0, abar_ext), d8, shape, jax.random.key(5), **kw))
  teacher4 = np.asarray(samplers.sample(_as_model_fn(teacher_x0, abar_ext), d4, shape, jax.random.key(5), **kw))
  np.testing.assert_allclose(student, teacher8, atol=2e-3)
  # ... which 4 plain DDIM steps of the teacher do not (so the check above has teeth)
  assert np.abs(teacher4 - teacher8).max() > 20 * np.abs(student - teacher8).max()
  # The sample mean and variance are the 8-step teacher's (few-step DDIM itself shrinks the variance
  # of this case: -20 % at 8 steps, -35 % at 4, measured; the student keeps the teacher's).
  x, x8, x4 = (a.reshape(-1, 3) for a in (student, teacher8, teacher4))
  np.testing.assert_allclose(x.mean(0), x8.mean(0), atol=2e-3)
  np.testing.assert_allclose(x.std(0), x8.std(0), rtol=5e-3)
  assert np.all(np.abs(x4.std(0) / x8.std(0) - 1) > 0.1)
  np.testing.assert_array_less(np.abs(x.mean(0) - MU), 5 * S / np.sqrt(N))


# ----------------------------------------------------------------------------- the train loop
@pytest.fixture(scope="module")
def run(teacher, tmp_path_factory):
  """6 uninterrupted steps (phase 1, round 8 -> 4, round 4 -> 2), a checkpoint after each."""
  bundle, _ = teacher
  config = _distill_config(bundle)
  workdir = tmp_path_factory.mktemp("distill") / "w"
  result = train_lib.train(config, str(workdir), data_iterator=ts.SyntheticIterator(config),
                           tokenizer=ts.tokenizer(config), progress=False, compiler_options=ts.FAST)
  assert result["step"] == 6 and all(np.isfinite(result["losses"]))
  return config, workdir, result


def _state_item(workdir, step):
  return ckpt_lib.restore_workdir_item(str(workdir), "state", step)[0]


def test_teacher_becomes_the_student_at_each_round(run):
  _, workdir, _result = run
  rounds = {s: v["round"] for s, v in ts.logged_steps(workdir).items()}
  assert rounds == {1: -1, 2: -1, 3: 0, 4: 0, 5: 1, 6: 1}
  init = _state_item(workdir, 1)["teacher"]
  for step, source in ((2, None), (3, 2), (4, 2), (5, 4), (6, 4)):
    # after `step` steps the teacher is the initial one in phase 1, then the student at the round start
    want = init if source is None else _state_item(workdir, source)["params"]
    jax.tree.map(np.testing.assert_array_equal, _state_item(workdir, step)["teacher"], want)


def test_resume_in_the_middle_of_a_round_is_exact(run, tmp_path):
  config, workdir, result = run
  copy = tmp_path / "w"
  shutil.copytree(workdir, copy)
  for step in (4, 5, 6):  # keep steps 1..3: the run resumes one step into round 8 -> 4
    shutil.rmtree(copy / "checkpoints" / str(step))
  resumed = train_lib.train(config, str(copy), data_iterator=ts.SyntheticIterator(config),
                            tokenizer=ts.tokenizer(config), progress=False, compiler_options=ts.FAST)
  assert resumed["step"] == 6
  assert resumed["losses"] == result["losses"][3:]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed["state"]), jax.device_get(result["state"]))


def test_the_exported_student_samples_in_one_pass_per_step(run, tmp_path):
  _config, workdir, _ = run
  path = export_cmd.export(str(workdir), str(tmp_path / "student"))
  sm = sampling.load_sampler_model(path)
  assert sm.meta["distill"]["distilled_steps"] == [2] and sm.meta["model"]["options"]["guidance_embed"]
  assert sm.diffusion_settings["sampler"] == "ddim" and sm.diffusion_settings["timestep_respacing"] == "2"
  assert sampling.make_diffusion(sm, "2").timestep_respacing == "trailing2"
  # an earlier checkpoint is the 4-step student of round 8 -> 4
  mid = sampling.load_sampler_model(export_cmd.export(str(workdir), str(tmp_path / "s4"), step=4))
  assert mid.meta["distill"]["distilled_steps"] == [4] and mid.meta["distill"]["teacher_steps"] == 8

  calls = []

  class Spy:
    """The student's module, recording what each traced forward pass gets."""
    guidance_embed = True

    def apply(self, variables, *args, **kw):
      if kw.get("method") is None:
        calls.append((args[0].shape[0], kw.get("guidance")))
      return sm.model.apply(variables, *args, **kw)

  spy = sampling.SamplerModel(**{**sm.__dict__, "model": Spy()})
  prompts = ["a b", "c d e"]
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the distilled count: no warning
    out = sampling.generate(spy, prompts, jax.random.key(0), guidance_scale=3.0, sampler="ddim", respacing="2")
  assert out.shape == (2, 8, 8, 3) and np.all(np.isfinite(out))
  assert len(calls) == 1 and calls[0][0] == 2  # one pass per step (one traced scan body), batch not doubled
  # w reaches the model as an input: another scale, other samples from the same noise
  other = sampling.generate(sm, prompts, jax.random.key(0), guidance_scale=1.0, sampler="ddim", respacing="2")
  assert np.abs(out - other).max() > 1e-4
  with pytest.warns(UserWarning, match=r"distilled for DDIM with 2 steps"):
    sampling.generate(sm, prompts, jax.random.key(0), guidance_scale=3.0, sampler="ddim", respacing="4")
  with pytest.warns(UserWarning, match=r"distilled for DDIM"):
    sampling.generate(sm, prompts, jax.random.key(0), guidance_scale=3.0, sampler="dpm++", respacing="2")


def test_the_serialized_student_samples_what_generate_does(run, tmp_path):
  # `export --serialize` of a student: its inputs (tokens, mask, key, w; no unconditional caption),
  # its trailing grid and its guidance input, against sampling.generate on the same bundle.
  _config, workdir, _ = run
  path = export_cmd.export(str(workdir), str(tmp_path / "served"), serialize=True, serialize_batch=2)
  spec = json.loads((path / "sampler.json").read_text())
  assert [d.split()[0] for d in spec["inputs"]] == ["params", "tokens", "mask", "key_data", "guidance_scale"]
  assert spec["steps"] == "trailing2" and spec["sampler"] == "ddim"
  exported = jax.export.deserialize(bytearray((path / "sampler.jax_exported").read_bytes()))
  sm = sampling.load_sampler_model(path)
  prompts, key = ["a b", "c d e"], jax.random.key(3)
  tokens, mask = sm.tokenizer.encode_batch(prompts)
  served = {g: np.asarray(exported.call(sm.params, tokens, mask, jax.random.key_data(key), jnp.float32(g)))
            for g in (1.0, 3.0)}
  for g, out in served.items():
    np.testing.assert_allclose(out, sampling.generate(sm, prompts, key, guidance_scale=g), rtol=1e-5, atol=1e-5)
  assert np.abs(served[3.0] - served[1.0]).max() > 1e-4  # w is an input that matters
