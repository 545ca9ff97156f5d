"""What every foldkit command shares: one-line errors with documented exit codes (a traceback only
with --debug), library warnings held back until success, the signal handlers and what they set,
the compiled extensions imported with signals blocked, and the options several commands take."""

from __future__ import annotations

import functools
import signal
import sys

import click

from .errors import EXIT_INTERNAL, EXIT_USAGE, FoldkitError, internal_message
from .text import printable

EXIT_INTERRUPTED = 130


def one_line(text: str) -> str:
    """Control characters (a newline in a node name, say) escaped, so an error is always one line."""
    return printable(text)


def _die(message: str, code: int) -> None:
    click.echo(f"foldkit: error: {one_line(message)}", err=True)
    sys.exit(code)


def _interrupted_exit() -> None:
    """One line saying what an interrupt left: nothing, or the files already committed."""
    committed = getattr(sys.modules.get(f"{__package__}.writing"), "COMMITTED", None) or []  # never import here
    done = f"; already written: {', '.join(printable(p) for p in committed)}" if committed else \
        "; no output was written"
    click.echo(f"foldkit: interrupted{done}", err=True)
    sys.exit(EXIT_INTERRUPTED)


def handle_errors(fn):
    """One line on stderr and a documented exit code for every failure; a traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = bool(click.get_current_context().find_root().params.get("debug"))
        try:
            try:
                return _warnings_after(fn, debug, *args, **kwargs)
            except Exception:
                # a SIGINT inside a C extension (ORT's import, say) surfaces as another error
                if _interrupted:
                    raise KeyboardInterrupt from None
                if _terminated is not None:
                    raise SystemExit(_terminated) from None
                raise
        except FoldkitError as e:
            if debug:
                raise
            _die(str(e), e.exit_code)
        except KeyboardInterrupt:
            _interrupted_exit()
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except MemoryError:
            _die("out of memory", EXIT_USAGE)
        except OSError as e:  # a full disk, a read-only file system, no permission...: the path and the OS's words
            if debug:
                raise
            where = e.filename if e.filename is not None else "foldkit"
            _die(f"{where}: {e.strerror or e}", EXIT_USAGE)
        except Exception as e:  # a bug in foldkit (or a dependency) — still one line
            if debug:
                raise
            _die(internal_message(e), EXIT_INTERNAL)

    return wrapper


def _warnings_after(fn, debug: bool, *args, **kwargs):
    """Run ``fn``, holding back the Python warnings its libraries emit (torch's unpickler, say): they
    are shown once it has succeeded, or with --debug, never beside a failure's one line."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # under the filters in force (main ignores RuntimeWarning)
        ok = False
        try:
            result = fn(*args, **kwargs)
            ok = True
            return result
        except SystemExit as e:  # a command's own exit code: a failure unless 0
            ok = not e.code
            raise
        finally:
            if ok or debug:
                for w in caught:
                    click.echo(warnings.formatwarning(w.message, w.category, w.filename, w.lineno).rstrip("\n"), err=True)


def _reraise_if_debug(e: BaseException) -> None:
    """For commands that take many inputs: a bug met on one input is that input's result, unless
    --debug asks for the traceback, or the error is an interrupt surfacing from a C extension."""
    if _interrupted:
        raise KeyboardInterrupt from None
    if _terminated is not None:
        raise SystemExit(_terminated) from None
    if click.get_current_context().find_root().params.get("debug"):
        raise e


def input_shape_option(fn):
    return click.option("--input-shape", "input_shape", multiple=True, metavar="NAME:D0,D1,...",
                        help="An input's shape: NAME:1,3,224,224, NAME:1x3x224x224 or NAME=1,3,224,224; "
                             "plain dims for a single-input model. Symbolic dimensions not given are 1. "
                             "Repeatable.")(fn)


def max_input_option(fn):
    return click.option("--max-input-mb", "max_input_mb", type=click.FloatRange(min=0, min_open=True), default=1024,
                        show_default=True, metavar="MIB",
                        help="Cap on the generated inputs (all inputs together), checked before anything is allocated.")(fn)


def verbosity_options(fn):
    fn = click.option("-v", "--verbose", count=True, help="More detail (the full per-node tables).")(fn)
    fn = click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")(fn)
    return fn


def tolerance_options(fn):
    fn = click.option("--rtol", type=float, default=None, help="Relative tolerance (scale-aware; default per dtype).")(fn)
    fn = click.option("--atol", type=float, default=None, help="Absolute tolerance (default per dtype).")(fn)
    return fn


_interrupted = False
_terminated = None  # the exit code a SIGTERM asked for


def _sigterm(signum, frame):  # turn SIGTERM into SystemExit so temp files are cleaned up
    global _terminated
    _terminated = 128 + signum
    raise SystemExit(_terminated)


def _sigint(signum, frame):
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


# The compiled extensions every command needs, imported with signals blocked (foldkit.imports); the
# ones only some runs need (onnxruntime, torch's runners) are imported the same way where they are used
_EXTENSIONS = ("numpy", "onnx")
_COMMAND_EXTENSIONS = {"export": ("torch",)}


def _import_extensions(command) -> None:
    from .imports import import_blocked

    try:
        for n in _EXTENSIONS + _COMMAND_EXTENSIONS.get(command, ()):
            try:
                import_blocked(n)
            except ImportError:  # an optional extra: the command says so in its one line
                pass
    except KeyboardInterrupt:  # our one line (click would print an empty line before it)
        _interrupted_exit()
