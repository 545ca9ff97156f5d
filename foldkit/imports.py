"""Importing compiled extensions safely. A signal whose Python handler raises (SIGINT's
KeyboardInterrupt, foldkit's SIGTERM) inside an extension module's initialisation leaves it half
built, and CPython then crashes (SIGSEGV, seen under load with protobuf's upb). Imported here, the
module initialises with SIGINT and SIGTERM blocked; a signal that came meanwhile is delivered right
after, between two bytecodes, where its exception is safe."""

from __future__ import annotations

import importlib
import signal
import sys


def import_blocked(name: str):
    """``importlib.import_module(name)`` with SIGINT and SIGTERM blocked while it runs (only the
    first time: an imported module is returned at once)."""
    module = sys.modules.get(name)
    if module is not None:
        return module
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    except (AttributeError, ValueError, OSError):  # no pthread_sigmask here: import as usual
        return importlib.import_module(name)
    try:
        return importlib.import_module(name)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a pending signal is delivered here
