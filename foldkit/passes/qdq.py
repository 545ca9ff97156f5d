"""Folding into quantized (QDQ) weights, exactly, keeping the graph quantized.

A quantized weight is ``DequantizeLinear(q, s, zp, axis)``: W = s * (q - zp) per channel of ``axis``
(or per tensor), with q an integer initializer, or ``DequantizeLinear(QuantizeLinear(W_float, s, zp))``
as QAT exporters write it. A per-output-channel map y = a * z + t after the op that reads it
(a = gamma / sqrt(var + eps) for a BN; all arithmetic float64) is folded as

- a > 0: the codes stay, s' = a * s;
- a < 0, zero point 0: q' = -q and s' = |a| * s (a code at the type's minimum, -128 for int8, has no
  negation: refused naming the channel, unless ``qdq_reflect``);
- a < 0 with ``qdq_reflect``: q' = qmin + qmax - q, zp' = qmin + qmax - zp (exact: q' - zp' =
  -(q - zp)); the zero point is then not 0, which TensorRT does not accept;
- a = 0: refused (a zero scale);
- the op's float bias b' = a * b + t (a bias given as DequantizeLinear becomes a float
  initializer: keeping a float bias is exact, re-deriving an int32 bias is not).

For Q -> DQ, q is first computed with ONNX QuantizeLinear semantics (x / s in the scale's float
type, round half to even, + zp, saturate) and written as an integer initializer: keeping the float
weight with a rescaled QuantizeLinear would not be exact (ties flip). A per-tensor scale with a
non-uniform a becomes per-channel (reported). The output stays quantized: the weight is still an
integer initializer read by DequantizeLinear, which no pass evaluates into a float weight.

The scale must be on the output-channel axis (Conv: 0; ConvTranspose with group 1: 1; Gemm: 1, or 0
with transB): a missing ``axis`` means 1, the ONNX default; a scale on another axis (some exporters
put ConvTranspose scales on the input channels) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from onnx import TensorProto

from ..graph import get_attr, node_label, np_dtype, set_attr
from ..math import FoldArithmeticError, round_to
from ..codes import Why
from .common import Refusal

INT_TYPES = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255), TensorProto.INT16: (-32768, 32767),
             TensorProto.UINT16: (0, 65535)}


@dataclass
class QWeight:
    dq: int  # index of the DequantizeLinear
    codes: np.ndarray  # integer codes (computed from Q(W) when the weight is float -> Q -> DQ)
    code_type: int
    scale: np.ndarray
    scale_type: int
    zp: Optional[np.ndarray]
    axis: Optional[int]  # None: per tensor
    q: Optional[int]  # index of the QuantizeLinear for float -> Q -> DQ, else None

    @property
    def shape(self):
        return self.codes.shape


def _int_attr(node, name, default):
    v = get_attr(node, name, default)
    try:
        return int(v)
    except (TypeError, ValueError):
        raise Refusal(f"{node.op_type} '{node_label(node)}' has a non-integer {name}", Why.QUANTIZATION) from None


def quantized_weight(view, node, pos: int) -> Optional[QWeight]:
    """The QDQ weight at input ``pos`` of ``node``, None when that input is not a DequantizeLinear
    output, or Refusal for a quantized weight that cannot be folded (with the reason)."""
    name = node.input[pos] if pos < len(node.input) else ""
    di = view.producer_of(name) if name else None
    if di is None or view.nodes[di].op_type != "DequantizeLinear" or view.nodes[di].domain not in ("", "ai.onnx"):
        return None
    dq = view.nodes[di]
    if view.uses(name) != 1 or view.is_graph_output(name):
        raise Refusal(f"the quantized weight '{name}' is also read elsewhere", Why.QUANTIZATION)
    if _int_attr(dq, "block_size", 0):
        raise Refusal("the weight is block-quantized (DequantizeLinear block_size), which is not folded", Why.QUANTIZATION)
    scale = view.constant(dq.input[1]) if len(dq.input) > 1 else None
    zp = view.constant(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if scale is None or (len(dq.input) > 2 and dq.input[2] and zp is None):
        raise Refusal("the weight's DequantizeLinear scale or zero point is not a constant", Why.QUANTIZATION)
    if scale.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16):
        raise Refusal("the weight's DequantizeLinear scale is not a float tensor", Why.QUANTIZATION)
    qi = None
    src = view.producer_of(dq.input[0])
    if src is not None and view.nodes[src].op_type == "QuantizeLinear" and view.nodes[src].domain in ("", "ai.onnx"):
        qi = src
        qn = view.nodes[qi]
        if view.uses(dq.input[0]) != 1:
            raise Refusal("the weight's QuantizeLinear output is read elsewhere", Why.QUANTIZATION)
        w = view.constant(qn.input[0])
        qs = view.constant(qn.input[1]) if len(qn.input) > 1 else None
        qz = view.constant(qn.input[2]) if len(qn.input) > 2 and qn.input[2] else None
        if w is None or qs is None:
            raise Refusal("the weight before QuantizeLinear is not a constant", Why.QUANTIZATION)
        if (qs.array.tobytes() != scale.array.tobytes() or (qz is None) != (zp is None)
                or (qz is not None and qz.array.tobytes() != zp.array.tobytes())
                or _int_attr(qn, "axis", 1) != _int_attr(dq, "axis", 1)):
            raise Refusal("the weight's QuantizeLinear and DequantizeLinear use different scales or zero points", Why.QUANTIZATION)
        code_type = qz.data_type if qz is not None else TensorProto.UINT8
        if _int_attr(qn, "saturate", 1) != 1 or code_type not in INT_TYPES:
            raise Refusal("the weight is quantized to a type other than 8- or 16-bit integers", Why.QUANTIZATION)
        codes = _quantize(w.array, scale.array, None if qz is None else qz.array, code_type,
                          _axis(dq, w.array.ndim, scale.array))
    else:
        c = view.constant(dq.input[0])
        if c is None:
            raise Refusal("the quantized weight's integer codes are not a constant initializer", Why.QUANTIZATION)
        code_type, codes = c.data_type, np.asarray(c.array)
    if code_type not in INT_TYPES:
        raise Refusal(f"the weight's codes are {TensorProto.DataType.Name(code_type)}, not 8- or 16-bit integers",
                      Why.QUANTIZATION)
    axis = _axis(dq, codes.ndim, scale.array)
    return QWeight(di, codes, code_type, np.asarray(scale.array), scale.data_type,
                   None if zp is None else np.asarray(zp.array), axis, qi)


def _axis(dq, rank: int, scale: np.ndarray) -> Optional[int]:
    if np.asarray(scale).size == 1:
        return None
    axis = _int_attr(dq, "axis", 1)  # the ONNX default when the attribute is missing
    if not -rank <= axis < rank:
        raise Refusal(f"the DequantizeLinear axis {axis} is out of range for a rank-{rank} weight", Why.QUANTIZATION)
    return axis % rank


def _per(arr, n, axis, rank):
    """A per-tensor or per-axis parameter as an array broadcastable against the weight."""
    a = np.asarray(arr)
    if axis is None or a.size == 1:
        return a.reshape(())
    shape = [1] * rank
    shape[axis] = n
    return a.reshape(shape)


def _quantize(w, scale, zp, code_type, axis) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(round_half_even(x / y_scale) + y_zero_point), the division in
    the scale's float type (as runtimes compute it)."""
    w = np.asarray(w)
    ft = np.asarray(scale).dtype
    sc = _per(scale, w.shape[axis] if axis is not None else 1, axis, w.ndim)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        x = np.rint(w.astype(ft) / sc.astype(ft)).astype(np.float64)
    if zp is not None:
        x = x + _per(zp, w.shape[axis] if axis is not None else 1, axis, w.ndim).astype(np.float64)
    lo, hi = INT_TYPES[code_type]
    return np.clip(np.nan_to_num(x, nan=0.0, posinf=hi, neginf=lo), lo, hi).astype(np_dtype(code_type))


def plan(view, qw: QWeight, a: np.ndarray, out_axis: int, reflect: bool, what: str):
    """(new codes, new scale, new zero point or None, new axis, promoted?) for the map a per output
    channel along ``out_axis`` of the weight, or Refusal."""
    c = qw.shape[out_axis]
    if a.size != c:
        raise Refusal(f"channel count mismatch: the map has {a.size} channels, the {what} produces {c}", Why.INVALID_PARAMETERS)
    if qw.axis is not None and qw.axis != out_axis:
        raise Refusal(f"the weight's DequantizeLinear scales axis {qw.axis}, not the {what}'s output-channel axis "
                      f"{out_axis}: a per-output-channel map cannot be folded into them", Why.QUANTIZATION)
    zero = np.nonzero(a == 0)[0]
    if zero.size:
        raise Refusal(f"the map is zero on channel {int(zero[0])}, which would make a zero scale", Why.QUANTIZATION)
    rank = qw.codes.ndim
    lo, hi = INT_TYPES[qw.code_type]
    s = np.asarray(qw.scale, dtype=np.float64)
    if qw.axis is None:
        s = np.full(c, float(s.reshape(-1)[0]))
    zp = None if qw.zp is None else np.asarray(qw.zp).astype(np.int64)
    if zp is not None and zp.size == 1 and qw.axis is None:
        zp = np.full(c, int(zp.reshape(-1)[0]))
    zp_vec = np.zeros(c, np.int64) if zp is None else zp.reshape(-1)
    neg = a < 0
    codes = np.asarray(qw.codes).astype(np.int64)
    moved = np.moveaxis(codes, out_axis, 0).copy()
    new_zp = zp_vec.copy()
    for ch in np.nonzero(neg)[0]:
        if zp_vec[ch] == 0 and not reflect:
            if np.any(moved[ch] == lo):
                raise Refusal(f"channel {int(ch)} has a negative scale and a code {lo}, which has no negation in "
                              f"{TensorProto.DataType.Name(qw.code_type).lower()} with zero point 0 (the exact "
                              "reflected encoding is opt-in: --qdq-reflect)", Why.QUANTIZATION)
            if lo == 0:
                raise Refusal(f"channel {int(ch)} has a negative scale: unsigned codes with zero point 0 cannot "
                              "be negated (--qdq-reflect gives the exact reflected encoding)", Why.QUANTIZATION)
            moved[ch] = -moved[ch]
        elif reflect:
            moved[ch] = lo + hi - moved[ch]
            new_zp[ch] = lo + hi - zp_vec[ch]
        else:
            raise Refusal(f"channel {int(ch)} has a negative scale and zero point {int(zp_vec[ch])}: negating its "
                          "codes needs the reflected encoding (--qdq-reflect)", Why.QUANTIZATION)
    new_codes = np.moveaxis(moved, 0, out_axis).astype(np_dtype(qw.code_type))
    try:
        new_scale = round_to(np.abs(a) * s, np_dtype(qw.scale_type))
    except FoldArithmeticError as e:
        raise Refusal(f"folded scale: {e}", e.code) from None
    if np.any(new_scale == 0):
        raise Refusal("a folded scale underflows to zero", Why.OVERFLOW)
    uniform = qw.axis is None and np.all(new_scale == new_scale[0]) and np.all(new_zp == new_zp[0])
    if uniform:
        new_scale = new_scale[:1].reshape(np.shape(qw.scale))
    zp_type = np_dtype(qw.code_type)
    promoted = qw.axis is None and not uniform
    if (qw.zp is None and not np.any(new_zp)) or (np.array_equal(new_zp, zp_vec) and not promoted):
        out_zp = None  # the zero point input stays as it is
    elif uniform:
        out_zp = new_zp[:1].astype(zp_type).reshape(np.shape(qw.zp) if qw.zp is not None else ())
    else:
        out_zp = new_zp.astype(zp_type)
    del rank
    return new_codes, new_scale, out_zp, None if uniform else out_axis, promoted


def apply(view, pi, qw: QWeight, planned, base: str, written: list, report_notes: Optional[list] = None) -> None:
    """Write the new codes, scale, zero point and axis into the weight's DequantizeLinear."""
    codes, scale, zp, axis, promoted = planned
    dq = view.nodes[qw.dq]
    if qw.q is not None:  # float -> Q -> DQ: the codes become an initializer, the QuantizeLinear goes
        name = view.new_constant(codes, qw.code_type, f"{base}_codes", qw.dq)
        view.set_input(qw.dq, 0, name)
        view.remove(qw.q)
        written.append(name)
    else:
        written.append(view.set_constant(qw.dq, 0, codes, qw.code_type, f"{base}_codes"))
    written.append(view.set_constant(qw.dq, 1, scale, qw.scale_type, f"{base}_scale"))
    if zp is not None:
        written.append(view.set_constant(qw.dq, 2, zp, qw.code_type, f"{base}_zero_point"))
    if axis is not None:
        set_attr(dq, "axis", int(axis))
    if promoted and report_notes is not None:
        report_notes.append(f"the per-tensor weight scale of '{node_label(view.nodes[pi])}' became per-channel "
                            "(exact: the folded scales differ per channel)")
