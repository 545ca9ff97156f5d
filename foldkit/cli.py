"""The foldkit command line: a thin click layer over the Python API.

Exit codes: 0 success; 1 verification failed / check found problems at or above --fail-on;
2 bad usage or unreadable input; 3 internal error (a bug: please report it with --debug output);
130 interrupted.
"""

import signal
import sys

import click

from .cli_common import (EXIT_INTERNAL, EXIT_INTERRUPTED, _die, _import_extensions, _interrupted_exit,  # noqa: F401
                         _sigint, _sigterm, handle_errors, one_line)
from .commands import bench, check, export, fold, recalibrate
from .errors import EXIT_USAGE


class _Group(click.Group):
    """Usage errors as one line too (click prints three: usage, a hint, the error), and an interrupt
    while click parses or dispatches is our one line (click's main prints an empty line first)."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt:
            _interrupted_exit()

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            _interrupted_exit()

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            cmd = e.ctx.command_path if e.ctx is not None else "foldkit"
            _die(f"{e.format_message()} (see '{cmd} --help')", EXIT_USAGE)
        except click.ClickException as e:
            _die(e.format_message(), e.exit_code)
        except (click.Abort, KeyboardInterrupt):
            _interrupted_exit()
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="foldkit-onnx", message="%(prog)s %(version)s (distribution %(package)s)")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def main(debug):
    """foldkit: remove BatchNorm from inference graphs, exactly, and prove it."""
    for stream in (sys.stdout, sys.stderr):  # an ASCII-only terminal gets \u escapes, never a UnicodeEncodeError
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):
            pass
    if not debug:  # numeric edge cases are checked explicitly (finite, overflow); keep stderr to one line
        import warnings

        warnings.simplefilter("ignore", RuntimeWarning)
    try:
        signal.signal(signal.SIGTERM, _sigterm)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when the caller ignores it
            signal.signal(signal.SIGINT, _sigint)
    except ValueError:  # not the main thread (e.g. embedded): leave signals alone
        pass
    _import_extensions(click.get_current_context().invoked_subcommand)


for _command in (fold, check, bench, export, recalibrate):
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()
