"""Helpers shared by the BN passes: reading a BN as an affine map, refusing with a reason."""

from __future__ import annotations

import numpy as np

from ..graph import FLOAT_TYPES, BadAttribute, GraphView, attr_float, attr_int, node_label, np_dtype
from ..codes import Why
from ..math import FoldArithmeticError, bn_scale_shift, round_to, scale_output_channels_rounded


class Refusal(Exception):
    """A rewrite does not apply; ``str(self)`` is the sentence for the report, ``code`` (a
    foldkit.codes.Why) what ``foldkit check`` makes of it."""

    def __init__(self, message, code=None):
        super().__init__(message)
        from ..codes import Why

        self.code = code or Why.NOT_APPLICABLE


def is_training(opset: int, node) -> bool:
    try:
        if opset >= 14:
            return attr_int(node, "training_mode", 0) == 1
        if opset < 7:
            return attr_int(node, "is_test", 0) == 0
    except BadAttribute as e:
        raise Refusal(str(e)) from None
    return any(o for o in node.output[1:])


def bn_affine(view: GraphView, node):
    """(s, t) in float64 with BN(x) = s * x + t, or Refusal."""
    if is_training(view.index.opset, node):
        raise Refusal("it is in training mode (its output uses batch statistics)", Why.TRAINING_MODE)
    if view.index.opset < 9 and _int(node, "spatial", 1) == 0:
        raise Refusal("spatial=0 (per-activation statistics) is not a per-channel affine map")
    if len(node.input) < 5:
        raise Refusal("it has fewer than 5 inputs")
    params = []
    for name, what in zip(node.input[1:5], ("scale", "B", "mean", "var")):
        c = view.constant(name)
        if c is None:
            raise Refusal(f"its {what} input {view.why_not_constant(name)}")
        if c.data_type not in FLOAT_TYPES:
            raise Refusal(f"its {what} input has a non-float type")
        params.append(c.array)
    try:
        return bn_scale_shift(*params, eps=_float(node, "epsilon", 1e-5))
    except FoldArithmeticError as e:
        raise Refusal(str(e), e.code) from None


def _int(node, name, default):
    try:
        return attr_int(node, name, default)
    except BadAttribute as e:
        raise Refusal(str(e)) from None


def _float(node, name, default):
    try:
        return attr_float(node, name, default)
    except BadAttribute as e:
        raise Refusal(str(e)) from None


int_attr, float_attr = _int, _float


def rounded(a: np.ndarray, data_type: int, what: str) -> np.ndarray:
    try:
        return round_to(a, np_dtype(data_type))
    except FoldArithmeticError as e:
        raise Refusal(f"{what}: {e}", e.code) from None


def weight(view: GraphView, node, pos: int, what: str, ndim=None):
    """The constant at input ``pos`` of ``node``, checked to be a float tensor."""
    name = node.input[pos] if pos < len(node.input) else ""
    if not name:
        return None
    pi = view.producer_of(name)
    if pi is not None and view.nodes[pi].op_type == "DequantizeLinear" and pos == 1:
        # a quantized weight is never evaluated into a float one: that would dequantize the model
        raise Refusal(f"the {what} is quantized (DequantizeLinear '{node_label(view.nodes[pi])}'), which only a "
                      "BN after the op folds into")
    c = view.constant(name)
    if c is None:
        raise Refusal(f"the {what} {view.why_not_constant(name)}")
    if c.data_type not in FLOAT_TYPES:
        raise Refusal(f"the {what} '{name}' is not a float tensor")
    if ndim is not None and c.array.ndim not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise Refusal(f"the {what} '{name}' has rank {c.array.ndim}, expected {ndim}")
    return c


def scaled_weight(w, s, kind: str, group: int):
    """The constant ``w`` scaled by ``s`` along its output channels, rounded once to its dtype: an
    array, or for a big weight a checked :class:`~foldkit.math.ScaledChannels` that computes it
    when written (or, when it is not a deferred payload, when its TensorProto is made)."""
    try:
        return scale_output_channels_rounded(w.array, s, kind, group, np_dtype(w.data_type), lazy=True)
    except FoldArithmeticError as e:
        raise Refusal(f"folded weight: {e}", e.code) from None
