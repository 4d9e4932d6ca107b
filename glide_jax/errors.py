"""Which exceptions are a user's mistake, which the `glide-jax` command reports in one line.

A user's mistake: a UserError raised anywhere; a missing, misplaced or unwritable file (the OSErrors
below, from any library); a ValueError raised by glide-jax's own code (its checks of paths, bundles,
options and config keys, config_lib.ConfigError among them). A ValueError raised inside jax, flax,
numpy or another library, and every other exception, is a bug or an unexpected state: it keeps its
traceback. This module imports nothing, so any layer may raise UserError.
"""
from __future__ import annotations

import os
import types

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Set (to anything but '' or '0') to see the traceback of a user error too, as `glide-jax --debug`.
DEBUG_ENV = "GLIDE_JAX_DEBUG"
FILE_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)


class UserError(ValueError):
  """Something the user asked for cannot be done as asked (a path, an option, a bundle of the wrong
  kind); the message says what and how to fix it. A ValueError, so callers catching those still do."""


def _innermost_frame(tb: types.TracebackType | None) -> types.FrameType | None:
  frame = None
  while tb is not None:
    frame, tb = tb.tb_frame, tb.tb_next
  return frame


def raised_by_glide_jax(error: BaseException) -> bool:
  """True if the innermost frame of `error`'s traceback is in the glide_jax package."""
  frame = _innermost_frame(error.__traceback__)
  if frame is None:
    return False
  path = os.path.abspath(frame.f_code.co_filename)
  return os.path.commonpath([path, PACKAGE_DIR]) == PACKAGE_DIR


def is_user_error(error: BaseException) -> bool:
  """Whether the CLI reports `error` in one line (the module docstring says which are)."""
  if isinstance(error, (UserError,) + FILE_ERRORS):
    return True
  return isinstance(error, ValueError) and raised_by_glide_jax(error)


def debug_enabled() -> bool:
  return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(error: BaseException) -> str:
  """The message of `error` without a trailing newline; multi-line messages (a list of differing
  config keys) keep their lines."""
  text = str(error).rstrip() or type(error).__name__
  if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in text:
    text = f"{text}: {error.filename}"
  return text
