"""Running a model: ONNX Runtime on CPU with every graph optimization disabled (so ORT's own
Conv+BN fusion cannot hide a wrong fold), or ONNX's reference evaluator where ORT has no CPU kernel
for the model's types (bfloat16, a float64 Conv); the result names the backend."""

from __future__ import annotations

import contextlib
import io
import os
from typing import Optional

import onnx
from onnx import ModelProto, TensorProto

from .graph import iter_graphs


class _BackendUnavailable(Exception):
    pass


class _ReferenceFailed(Exception):
    """ONNX's reference evaluator (the fallback backend) could not run the model."""


def ort_source(path: str, base_dir: Optional[str] = None, mapped: bool = False):
    """(what to hand ort.InferenceSession, the folder its external data is read from): the path,
    or for a file name that is not UTF-8 (which ORT cannot take) the file's bytes and its folder.

    ``mapped``: for a self-contained model file with large tensors, the file as foldkit's loader
    reads every input (foldkit.wire.lazy_load: its own framing walked, its small parts parsed, each
    large tensor a reference to where it lies in the file), so ORT maps the tensors from the file
    instead of parsing and copying them; the path where that reading does not apply."""
    if mapped:
        from .wire import lazy_load

        try:
            skeleton = lazy_load(path, 1024)
        except OSError:
            skeleton = None
        if skeleton is not None:
            return skeleton.SerializeToString(), os.path.dirname(os.path.abspath(path))
    try:
        path.encode("utf-8")
        return path, base_dir
    except UnicodeEncodeError:
        with open(path, "rb") as f:
            return f.read(), os.path.dirname(os.path.abspath(path))


def _quiet_session(ort):
    """ort.InferenceSession that never falls back to other providers, so never prints ORT's "EP
    Error" banner: on a worker thread that banner cannot be kept off stdout (redirecting sys.stdout
    is process-wide). ``enable_fallback=0`` says so where ORT takes it; the override, where not."""
    class QuietSession(ort.InferenceSession):
        def _create_inference_session(self, *args, **kwargs):
            self._enable_fallback = False
            return super()._create_inference_session(*args, **kwargs)
    return QuietSession


def _ort_session(source, base_dir: Optional[str] = None, mem_pattern: bool = True, run_options=None,
                 worker: bool = False, mapped: bool = False, threads: Optional[int] = None,
                 priority_order: bool = False):
    """``source``: serialized bytes, or a model file's path (its external data beside it).
    ``mem_pattern=False``: no pre-planned memory pattern (ORT plans one block for every intermediate
    of a run, which for foldkit's statistics graph is 1.7x the memory the tensors need at once).
    ``run_options``: an ort.RunOptions to run with (setting its ``terminate`` from another thread
    stops a run). ``worker``: called off the main thread (see :func:`_quiet_session`; its idle pool
    threads do not spin). ``mapped``: a path's tensors are mapped from the file (see
    :func:`ort_source`). ``threads``: ORT's intra-op threads (None: its default, one per core).
    ``priority_order``: ORT's priority-based node order, which runs a node as soon as its inputs
    are ready; its default order may run a side branch (foldkit's statistics of a BN input) long
    after the node it hangs off, keeping that input alive until then (ResNet-50 at 224, batch 32:
    1.8 GB instead of 0.7 GB)."""
    from .imports import import_blocked
    ort = import_blocked("onnxruntime")

    if isinstance(source, str):
        source, base_dir = ort_source(source, base_dir, mapped)
    so = ort.SessionOptions()
    so.enable_mem_pattern = mem_pattern
    if base_dir and not isinstance(source, str):  # tensors left on disk are read from the model's folder
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", base_dir)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if priority_order:
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    so.log_severity_level = 4  # errors surface as exceptions; keep ORT's own log off stderr
    if threads:
        so.intra_op_num_threads = threads
    if worker:  # idle pool threads sleep: the main thread needs the cores meanwhile
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        if worker:
            sess = _quiet_session(ort)(source, so, providers=["CPUExecutionProvider"], enable_fallback=0)
        else:
            # ORT's wrapper prints "EP Error" banners on failure; the exception says the same in one line
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                sess = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        msg = str(e)
        if "NOT_IMPLEMENTED" in msg or "Could not find an implementation" in msg or "Type Error" in msg:
            raise _BackendUnavailable(msg.splitlines()[0]) from None
        raise
    ro = run_options if run_options is not None else ort.RunOptions()
    ro.log_severity_level = 4
    return lambda feeds: sess.run(None, feeds, ro)


def runner(model: Optional[ModelProto], model_bytes: Optional[bytes] = None, backend: Optional[str] = None,
           base_dir: Optional[str] = None, path: Optional[str] = None, run_options=None, worker: bool = False,
           threads: Optional[int] = None):
    """(feeds -> outputs, backend_name), the session made once: for running many batches.
    ``run_options``, ``worker`` and ``threads``: see :func:`_ort_session`."""
    if backend in (None, "onnxruntime"):
        try:
            data = path if path is not None else model_bytes if model_bytes is not None else model.SerializeToString()
            # a model file runs as written, its tensors mapped from it, not parsed and copied
            return (_ort_session(data, base_dir, run_options=run_options, worker=worker, mapped=path is not None,
                                 threads=threads), "onnxruntime-cpu")
        except _BackendUnavailable:
            if backend == "onnxruntime":
                raise
    from onnx.reference import ReferenceEvaluator

    try:
        if path is not None:
            ev = ReferenceEvaluator(onnx.load(path))
        else:
            full = model
            if base_dir and any(t.data_location == TensorProto.EXTERNAL for g in iter_graphs(model.graph)
                                for t in g.initializer):
                full = ModelProto()
                full.CopyFrom(model)
                onnx.external_data_helper.load_external_data_for_model(full, base_dir)
            ev = ReferenceEvaluator(full)
    except Exception as e:
        raise _ReferenceFailed(_first_line(e)) from None

    def go(feeds):
        try:
            return ev.run(None, feeds)
        except Exception as e:
            raise _ReferenceFailed(_first_line(e)) from None
    return go, "onnx-reference"


def _same_backend(ran: str) -> str:
    """The ``backend`` argument that runs a model where the one reported as ``ran`` ran."""
    return "onnxruntime" if ran == "onnxruntime-cpu" else "reference"


def run(model: Optional[ModelProto], feeds: dict, model_bytes: Optional[bytes] = None, backend: Optional[str] = None,
        base_dir: Optional[str] = None, path: Optional[str] = None, run_options=None, worker: bool = False,
        threads: Optional[int] = None):
    """Returns (outputs, backend_name). ``path``: run the model file there (``model`` unused)."""
    go, name = runner(model, model_bytes, backend, base_dir, path, run_options, worker, threads)
    return go(feeds), name


def _first_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:300]
