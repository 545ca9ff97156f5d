"""The `foldkit` program's first lines (the console script, ``python cli.py`` and ``python -m
foldkit`` all start here).

Until foldkit.cli is imported and its command group installs the real signal handlers, a SIGINT
or SIGTERM would surface as a KeyboardInterrupt traceback from inside an import. Nothing can have
been written yet, so until then a signal prints the one line an interrupt prints and exits at once.
"""

import os
import signal


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
    return main(**kwargs)
