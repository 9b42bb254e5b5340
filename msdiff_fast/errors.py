"""The error a user's mistake raises (a missing checkpoint, a bad option value, an unreadable
image): one line that names the option, and the exit status the ``msdiff`` command returns for it."""


class UsageError(Exception):
    """A user error: the ``msdiff`` command prints ``msdiff: error: <message>`` and exits with ``code``
    (2 for a bad option value, as argparse does; 1 otherwise). ``msdiff_fast.cli.CLIError`` is this class."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def one_line(error: BaseException) -> str:
    """An exception's message on one line (a KeyError's key without its quotes)."""
    text = str(error) or type(error).__name__
    if isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    return " ".join(text.split())
