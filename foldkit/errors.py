"""Exceptions that carry a documented exit code.

Every error a user can cause is one of these; the CLI prints ``str(error)`` as one line on stderr
and exits with ``error.exit_code``. Anything else is a bug in foldkit.
"""

EXIT_OK = 0
EXIT_FAILED = 1  # verification failed, or `check` found problems at or above --fail-on
EXIT_USAGE = 2  # bad usage or unreadable input
EXIT_INTERNAL = 3  # a bug in foldkit


def internal_message(e: BaseException) -> str:
    """The one line that reports a bug in foldkit (exit code 3)."""
    what = str(e).splitlines()[0] if str(e).strip() else ""
    return f"internal error: {type(e).__name__}{': ' + what if what else ''} (rerun with --debug for a traceback)"


class FoldkitError(Exception):
    """Base class: a problem with a one-line explanation and an exit code."""

    exit_code = EXIT_USAGE


class InputError(FoldkitError):
    """The input model, a path or an option cannot be used (exit code 2)."""

    exit_code = EXIT_USAGE


class VerificationError(FoldkitError):
    """The rewritten model does not agree with the original within tolerance (exit code 1)."""

    exit_code = EXIT_FAILED

    def __init__(self, message, result=None):
        super().__init__(message)
        self.result = result
