"""A few lines that a signal must not cut in two. A SIGINT or SIGTERM whose Python handler raises
(KeyboardInterrupt, foldkit's SystemExit) can land between any two bytecodes: between creating a
temp file and recording it, the exception would leave a file nobody knows of. Inside
:func:`held`, the handler's call waits until the block ends and then runs, with the same signal,
where everything made is recorded and its cleanup can find it."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def held():
    """Hold SIGINT and SIGTERM's Python handlers off while the block runs (on the main thread,
    the only one Python runs them on; elsewhere the block runs as it is). A signal that came
    meanwhile runs its handler when the block ends, once, even if the block raised."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(sig)
            if callable(handler):  # SIG_IGN and SIG_DFL never raise: nothing to hold off
                previous[sig] = signal.signal(sig, lambda signum, frame: got.append((signum, frame)))
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if got:
            signum, frame = got[0]
            previous[signum](signum, frame)
