"""The `foldkit` program's first lines (the console script, ``python cli.py`` and ``python -m
foldkit`` all start here).

Until foldkit.cli is imported and its command group installs the real signal handlers, a SIGINT
or SIGTERM would surface as a KeyboardInterrupt traceback from inside an import. Nothing can have
been written yet, so until then a signal prints the one line an interrupt prints and exits at once.

Its last lines too: a command that ran only foldkit's own code (``fold`` and ``check`` without a
FILE.py:FN, see ``allow_quick_exit``) has committed its outputs by the time it returns; the process
then ends as Python's exit would (other threads joined, atexit handlers run, stdout and stderr
flushed) but without tearing down every module, which for numpy, protobuf and onnx costs about
20 ms and can change nothing the command left behind.
"""

import os
import signal
import sys

_quick_exit = False


def allow_quick_exit() -> None:
    """Called by a command that runs no user code (no factory, no data loader): when it returns,
    the program may end without Python's module teardown."""
    global _quick_exit
    _quick_exit = True


def _before_start(signum, frame):
    if signum == signal.SIGINT:
        os.write(2, b"foldkit: interrupted; no output was written\n")
        os._exit(130)
    os._exit(128 + signum)


def run(**kwargs):
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) in (signal.default_int_handler, signal.SIG_DFL):  # not when ignored
                previous[sig] = signal.signal(sig, _before_start)
    except ValueError:  # not the main thread: leave signals alone
        pass
    from .cli import main

    for sig, handler in previous.items():  # main() installs its own from these
        signal.signal(sig, handler)
    try:
        return main(**kwargs)
    except SystemExit as e:
        if _quick_exit and (e.code is None or isinstance(e.code, int)):
            _end_now(e.code or 0)
        raise


def _end_now(code: int) -> None:
    """End the process as Python's exit would, less the module teardown; returns only when
    stdout or stderr cannot be flushed (a closed pipe), which is then left to Python's own exit."""
    import atexit
    import threading

    me = threading.current_thread()
    for t in threading.enumerate():  # what threading._shutdown does
        if t is not me and not t.daemon:
            t.join()
    atexit._run_exitfuncs()  # runs each handler once and clears them
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):
        return
    os._exit(code)
