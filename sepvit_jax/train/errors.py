"""The error a user's settings can cause (exit status 2, one `error: ...` line)."""


class ConfigError(ValueError):
    """A setting that cannot work, with a message for the user."""
