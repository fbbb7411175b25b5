"""User-facing errors.

Every problem a user can cause (a bad file, a bad option, a model that does not fit a key) is raised as
a :class:`StealthMarkError` with a message that says what is wrong and what to do. The CLI prints the
message and exits with ``exit_code``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class StealthMarkError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""

    exit_code = 2


class InputError(StealthMarkError):
    """A file, option or array that cannot be used as given."""


class KeyFileError(InputError):
    """A key file with a bad schema, a broken commitment or unusable settings."""


class ModelError(InputError):
    """A model file or spec that cannot be loaded or that answers with the wrong shape."""


class PayloadTooLongError(InputError):
    """The payload does not fit the chosen QR version and error-correction level."""


class ResourceError(StealthMarkError):
    """Out of memory or a device that is not available."""

    exit_code = 3


class Cancelled(StealthMarkError):
    """The user cancelled a long run (Ctrl-C, SIGTERM or the Slicer module's Cancel)."""

    exit_code = 130
