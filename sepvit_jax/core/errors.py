"""The one error type for checkpoint problems a user can cause (exit status 2 in the CLIs)."""


class CheckpointError(ValueError):
    """A checkpoint could not be read, recognised or written; the message (one line) says why."""
