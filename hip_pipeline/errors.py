"""The `hip` command's one user-error type."""


class UsageError(Exception):
    """A user error (bad flags, failed pre-flight check): `hip: error: <message>`, exit code 2.

    Raised by every subcommand module; main.main is the one place that catches it."""
