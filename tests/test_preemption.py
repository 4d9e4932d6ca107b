"""A preemption notice saves a checkpoint at the step it names, returns normally, and a restart resumes there.

On a real multi-host TPU job the notice comes from jax's preemption sync manager
(`multihost_utils.reached_preemption_sync_point`, asked after every step with the step number, by the
loop and by orbax's save policy); here
that function is replaced by one that answers True at step 3.
"""
from __future__ import annotations

import os

import pytest
import train_support as ts
from jax.experimental import multihost_utils

from glide_jax.train import checkpoint as ckpt_lib
from glide_jax.train import train


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
  ts.session_cache(tmp_path_factory)


class Recording(ts.SyntheticIterator):
  """Remembers which batch positions it served, so the resumed run's first batch can be checked."""

  def __init__(self, config):
    super().__init__(config)
    self.served = []

  def __next__(self):
    self.served.append(self.step)
    return super().__next__()


def test_preemption_notice_saves_at_that_step_returns_and_resume_continues(tmp_path, monkeypatch):
  # The program test_checkpoint.py compiles (base, 2x4, loss-second-moment): shared XLA cache.
  config = ts.tiny_config("base", *ts.mesh_overrides(2, 4), "--config.diffusion.schedule_sampler=loss-second-moment",
                          "--config.total_steps=6", "--config.checkpoint.every=100")
  asked = []

  def notice(step):
    asked.append(step)
    return step == 3

  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", notice)
  it = Recording(config)
  first = train.train(config, str(tmp_path), data_iterator=it, tokenizer=ts.tokenizer(config), progress=False,
                      compiler_options=ts.FAST)
  # Asked after every step with the number of steps done, in order (by the loop and by orbax's save
  # policy, so a step may be asked more than once), never past 3.
  assert list(dict.fromkeys(asked)) == [1, 2, 3] and asked == sorted(asked)
  assert first["stopped"] and first["step"] == 3 and len(first["losses"]) == 3
  assert it.served == [0, 1, 2]  # nothing read past the saved position
  ck = ckpt_lib.Checkpointer(os.path.join(tmp_path, "checkpoints"), 100, 3)
  assert ck.all_steps() == [3]  # checkpoint.every=100: only the preemption made it save
  ck.close()
  assert "stop requested" in (tmp_path / "train.log").read_text()

  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: False)
  it = Recording(config)
  second = train.train(config, str(tmp_path), data_iterator=it, tokenizer=ts.tokenizer(config), progress=False,
                       compiler_options=ts.FAST)
  assert not second["stopped"] and second["step"] == 6 and len(second["losses"]) == 3
  assert int(second["state"].step) == 6
  assert it.served == [3, 4, 5]  # the data position came back with the state
  assert "resumed from step 3" in (tmp_path / "train.log").read_text()
