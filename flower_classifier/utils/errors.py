"""The error a user can fix, and a short reason for any error.

    from flower_classifier.utils.errors import UserError
    raise UserError("data folder flowers does not exist; pass the folder that holds train/")

The command lines (cli.runner.run_cli) print a UserError as one `error:` line and exit 2.
"""


class UserError(Exception):
    """A problem the user can fix; the CLI prints its message as one line and exits non-zero."""


def error_reason(error):
    """What went wrong, in a few words: the system's error text, else the first line of the
    message, else the exception's name."""
    lines = str(error).splitlines() or [type(error).__name__]
    return getattr(error, "strerror", None) or lines[0]
