"""onnx.checker as foldkit runs it: the full check (shape inference included) on the checker view
(foldkit.wire.checker_view: big tensors as typed inputs, no payload copied or read)."""

from __future__ import annotations

from typing import Optional

import onnx
from onnx import ModelProto


def checker_error(model: ModelProto) -> Optional[str]:
    """The first line of onnx.checker's full-check complaint, or None when the model passes."""
    from .wire import checker_view

    try:
        onnx.checker.check_model(checker_view(model), full_check=True)
    except Exception as e:  # checker raises ValidationError, shape inference InferenceError
        return (str(e).strip().splitlines() or [type(e).__name__])[0]
    return None
