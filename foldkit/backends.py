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


def ort_source(path: str, base_dir: Optional[str] = None):
    """(what to hand ort.InferenceSession, the folder its external data is read from): the path,
    or for a file name that is not UTF-8 (which ORT cannot take) the file's bytes and its folder."""
    try:
        path.encode("utf-8")
        return path, base_dir
    except UnicodeEncodeError:
        with open(path, "rb") as f:
            return f.read(), os.path.dirname(os.path.abspath(path))


def _ort_session(source, base_dir: Optional[str] = None, mem_pattern: bool = True):
    """``source``: serialized bytes, or a model file's path (its external data beside it).
    ``mem_pattern=False``: no pre-planned memory pattern (ORT plans one block for every intermediate
    of a run, which for foldkit's statistics graph is 1.7x the memory the tensors need at once)."""
    from .imports import import_blocked
    ort = import_blocked("onnxruntime")

    if isinstance(source, str):
        source, base_dir = ort_source(source, base_dir)
    so = ort.SessionOptions()
    so.enable_mem_pattern = mem_pattern
    if base_dir and not isinstance(source, str):  # tensors left on disk are read from the model's folder
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", base_dir)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4  # errors surface as exceptions; keep ORT's own log off stderr
    try:
        # ORT's wrapper prints "EP Error" banners on failure; the exception says the same in one line
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            sess = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        msg = str(e)
        if "NOT_IMPLEMENTED" in msg or "Could not find an implementation" in msg or "Type Error" in msg:
            raise _BackendUnavailable(msg.splitlines()[0]) from None
        raise
    ro = ort.RunOptions()
    ro.log_severity_level = 4
    return lambda feeds: sess.run(None, feeds, ro)


def runner(model: Optional[ModelProto], model_bytes: Optional[bytes] = None, backend: Optional[str] = None,
           base_dir: Optional[str] = None, path: Optional[str] = None):
    """(feeds -> outputs, backend_name), the session made once: for running many batches."""
    if backend in (None, "onnxruntime"):
        try:
            data = path if path is not None else model_bytes if model_bytes is not None else model.SerializeToString()
            return _ort_session(data, base_dir), "onnxruntime-cpu"
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
        base_dir: Optional[str] = None, path: Optional[str] = None):
    """Returns (outputs, backend_name). ``path``: run the model file there (``model`` unused)."""
    go, name = runner(model, model_bytes, backend, base_dir, path)
    return go(feeds), name

def _first_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:300]
