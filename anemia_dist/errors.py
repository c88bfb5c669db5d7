"""The errors a user can fix: each message names the key or file and what to do.

The CLI prints any of them as one line (``anemia-dist <command>: error: ...``) and exits 2; a
traceback means a bug in this package, never a bad config, file or checkpoint.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's config, data, weights or checkpoint, not in this package."""


class ConfigError(UserError, ValueError):
    """A config value that cannot be used; the message names the key and what to do."""


class DataError(UserError, ValueError):
    """Unusable data; the message names the file and what to do."""


class WeightsError(UserError, RuntimeError):
    """Pretrained weights that cannot be found or do not fit; the message says what to do."""


class DiskSpaceError(UserError, OSError):
    """The run directory's file system cannot hold the checkpoints; the message names the folder,
    the bytes needed and the last complete checkpoint."""


class CheckpointMismatch(ConfigError):
    """The checkpoint was written for a different model or class list."""


USER_ERRORS = (UserError, FileNotFoundError)
"""What the CLI reports as a message (a path given on the command line that does not exist too)."""
