"""The converter's one error type for problems a user can cause (exit status 2 in the CLI)."""


class CheckpointError(ValueError):
    """A checkpoint could not be read, recognised or written; the message (one line) says why."""
