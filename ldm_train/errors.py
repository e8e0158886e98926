"""The one base class of the errors a user can fix: `python -m ldm_train` prints them as one line and exits 2.

Every error the framework raises for a mistake in what the user gave it (config, paths, data, artifacts,
checkpoints, missing pretrained weights) derives from `UserError` and carries a message that names the fix.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

USER_ERROR_EXIT = 2  # like argparse: the command line (or what it points at) is wrong
CTRL_C_EXIT = 130  # 128 + SIGINT: what a shell reports for a process stopped by Ctrl-C


class UserError(Exception):
    """A mistake in what the user gave the framework; the message names the fix."""


class MissingWeightsError(UserError, FileNotFoundError):
    """Pretrained weights that are neither on disk nor in a cache, and cannot be downloaded here."""
