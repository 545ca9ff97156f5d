"""The original's half of verification, started early on a worker thread.

A verified fold runs the original and the folded model on ONNX Runtime and compares them. The
original is fixed once the inference-mode pass is done, so its half (ORT's start-up, its session,
its run on the generated inputs) goes to a worker thread then, and proceeds while the folds and
the write use the main thread: ONNX Runtime releases the GIL while it builds a session and while
it runs. It takes every core but one (the main thread's), and its idle threads sleep rather than
spin. Only the folded model's half waits for the written file.

The outcome is the one :func:`foldkit.verify.reference_stage` computes in line (the same inputs,
backend and errors; every later run of the original in that verification, such as the re-run
that tells a random model from a wrong fold, uses the same thread count), so verdicts and reports
do not depend on whether the run went early. The
worker prints nothing and swaps no process-wide streams (see foldkit.backends). It is not a
daemon, so the interpreter never exits under it; :meth:`ReferenceRun.cancel` stops a run nobody
will read (ORT's RunOptions.terminate), so an interrupted or failed fold still ends promptly.
"""

from __future__ import annotations

import os
import threading
from typing import Optional


def worker_threads() -> int:
    """ORT's intra-op threads for the early run: every core but the one the main thread folds and
    writes on (at least one). Later runs of the original in the same verification use as many."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


class ReferenceRun:
    """:func:`foldkit.verify.reference_stage` of the model ``reference_bytes``, on a worker thread."""

    def __init__(self, reference_bytes: bytes, *, input_shapes=None, seed: int = 0,
                 max_input_bytes: Optional[int] = None, base_dir: Optional[str] = None):
        self._args = (reference_bytes, input_shapes, seed, max_input_bytes, base_dir)
        self._lock = threading.Lock()
        self._cancelled = False
        self._run_options = None
        self._stage = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._work, name="foldkit-reference-run", daemon=False)
        self._thread.start()

    def _work(self) -> None:
        from .imports import import_blocked
        from .reading import parse_model
        from .verify import reference_stage

        reference_bytes, input_shapes, seed, max_input_bytes, base_dir = self._args
        try:
            try:
                run_options = import_blocked("onnxruntime").RunOptions()
            except Exception:  # no ORT: the stage meets the same error where it would in line
                run_options = None
            with self._lock:
                if self._cancelled:
                    return
                self._run_options = run_options
            reference = parse_model(reference_bytes)
            self._stage = reference_stage(reference, reference_bytes, input_shapes, seed, max_input_bytes, base_dir,
                                          run_options=run_options, worker=True, threads=worker_threads())
        except Exception as e:  # re-raised by result(), in the caller's thread
            self._error = e

    def result(self):
        """The ReferenceStage (waits for the worker); raises what reference_stage raised. After
        :meth:`cancel`, the stage is computed here, in line, as it would have been without this."""
        self._thread.join()
        if self._cancelled:
            from .reading import parse_model
            from .verify import reference_stage

            reference_bytes, input_shapes, seed, max_input_bytes, base_dir = self._args
            return reference_stage(parse_model(reference_bytes), reference_bytes, input_shapes, seed, max_input_bytes,
                                   base_dir)
        if self._error is not None:
            raise self._error
        return self._stage

    def cancel(self) -> None:
        """Nobody will read the outcome: stop the run if it has started (it ends with an error that
        nobody reads) and skip it if not. The session being built, if any, is finished first."""
        with self._lock:
            self._cancelled = True
            if self._run_options is not None:
                self._run_options.terminate = True

    def done(self) -> bool:
        return not self._thread.is_alive()
