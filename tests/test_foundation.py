import jax

from glide_jax import cli


def test_eight_cpu_devices():
  assert jax.device_count() == 8
  assert jax.devices()[0].platform == "cpu"


def test_cli_help_lists_every_command(capsys):
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  for name in cli.COMMANDS:
    assert name in out


def test_cli_refuses_unknown_command():
  import pytest
  with pytest.raises(SystemExit):
    cli.main(["no-such-command"])
