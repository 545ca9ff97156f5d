"""Constants computed from constants: what a value is when its producer is a Constant node, a pure
op (Identity, Transpose, Reshape, ...) or an arithmetic op on constants, evaluated on ONNX's
reference evaluator (or dequantized), within a size cap. foldkit.graph's GraphView.constant asks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
import onnx
from onnx import AttributeProto, NodeProto, TensorProto

from .attrs import get_attr
from .tensors import FLOAT_TYPES, np_dtype

if TYPE_CHECKING:
    from .graph import GraphView


@dataclass
class Const:
    """A constant tensor visible from some graph."""

    name: str
    array: np.ndarray  # native dtype (float16, bfloat16 via ml_dtypes, ...)
    data_type: int  # TensorProto.DataType
    owner: "GraphView"  # the graph that defines it
    kind: str  # "initializer", "constant" (a Constant node), "sparse" (a sparse initializer) or "computed"



PURE_OPS = ("Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Cast")
# deterministic ops whose results IEEE arithmetic fixes exactly (no transcendental functions), which
# exporters and pruning/quantization tools put between a weight and its Conv: evaluated on constant
# inputs with ONNX's reference evaluator, in the tensors' own dtype, as any runtime computes them
CONST_OPS = ("Mul", "Add", "Sub", "Div", "Neg", "Abs", "Sign", "Sqrt", "Reciprocal", "Slice", "ConstantOfShape",
             "Concat", "Expand", "Where", "Tile", "Shape", "Size", "Gather", "Equal", "Greater", "Less",
             "GreaterOrEqual", "LessOrEqual", "Not", "And", "Or", "Clip", "Min", "Max", "Flatten", "Range",
             "DequantizeLinear")  # BN parameters given as DequantizeLinear of constants (never a weight: see common.weight)
EVAL_MAX_BYTES = 256 << 20  # a computed constant larger than this is left to the runtime


def computed_value(node: NodeProto, view: GraphView, depth: int) -> Optional[Const]:
    """Evaluate a PURE_OPS node on constant inputs with numpy (exact: these ops move or convert
    values, they do no arithmetic), or None."""
    if depth > 8:
        return None
    ins = [view.constant(n, depth + 1) if n else None for n in node.input]
    if not ins or ins[0] is None or any(c is None for c, n in zip(ins, node.input) if n):
        return None
    x = ins[0].array
    op = node.op_type
    try:
        if op == "Identity":
            out, dt = x, ins[0].data_type
        elif op == "Transpose":
            perm = get_attr(node, "perm", None)
            out, dt = np.transpose(x, perm if perm else None), ins[0].data_type
        elif op == "Reshape":
            shape = [int(d) for d in ins[1].array.reshape(-1)]
            if not get_attr(node, "allowzero", 0):
                shape = [x.shape[k] if d == 0 else d for k, d in enumerate(shape)]
            out, dt = x.reshape(shape), ins[0].data_type
        elif op in ("Squeeze", "Unsqueeze"):
            axes = get_attr(node, "axes", None)
            if axes is None and len(ins) > 1 and ins[1] is not None:
                axes = [int(a) for a in ins[1].array.reshape(-1)]
            if op == "Squeeze":
                out = np.squeeze(x, axis=tuple(axes)) if axes else np.squeeze(x)
            else:
                out = x
                rank = x.ndim + len(axes)
                for a in sorted(a % rank for a in axes):
                    out = np.expand_dims(out, a)
            dt = ins[0].data_type
        elif op == "Cast":
            dt = int(get_attr(node, "to", 0))
            if dt in (TensorProto.STRING, TensorProto.UNDEFINED) or ins[0].data_type == TensorProto.STRING:
                return None
            out = x.astype(np_dtype(dt))
            if not (dt in FLOAT_TYPES and ins[0].data_type in FLOAT_TYPES):
                # a cast to or from integers only where it is exact (a zero point written as
                # Cast(Constant 0.0) to int8, say): values that survive the round trip unchanged
                with np.errstate(invalid="ignore", over="ignore"):
                    if not np.array_equal(np.asarray(out).astype(x.dtype), x):
                        return None
        else:
            return None
    except (ValueError, TypeError, IndexError):
        return None
    return Const(node.output[0], np.asarray(out), dt, view, "computed")


def evaluated_value(node: NodeProto, view: GraphView, depth: int) -> Optional[Const]:
    """A CONST_OPS node whose inputs are all constant, evaluated once (ONNX's reference evaluator),
    or None. Outputs over EVAL_MAX_BYTES, checked before anything is computed where the op can
    grow its input (ConstantOfShape, Expand, Tile, Range), are not evaluated."""
    if depth > 8 or not node.input:
        return None
    ins = [view.constant(n, depth + 1) if n else None for n in node.input]
    if any(c is None for c, n in zip(ins, node.input) if n):
        return None
    try:
        op = node.op_type
        if op in ("ConstantOfShape", "Expand", "Tile"):
            dims = np.asarray(ins[0 if op == "ConstantOfShape" else 1].array).reshape(-1).astype(np.int64)
            n = int(np.prod(np.maximum(dims, 1), dtype=np.float64)) * (1 if op == "ConstantOfShape" else max(1, ins[0].array.size))
            if n * 8 > EVAL_MAX_BYTES:
                return None
        if op == "Range":
            start, limit, delta = (float(np.asarray(c.array).reshape(-1)[0]) for c in ins[:3])
            if delta == 0 or abs((limit - start) / delta) * 8 > EVAL_MAX_BYTES:
                return None
        if op == "DequantizeLinear":
            return _dequantized(node, ins, view)
        from onnx.reference import ReferenceEvaluator

        names = [f"i{k}" if n else "" for k, n in enumerate(node.input)]
        evaluated = onnx.NodeProto()
        evaluated.CopyFrom(node)
        del evaluated.input[:]
        evaluated.input.extend(names)
        del evaluated.output[:]
        evaluated.output.append("o")
        inputs = [onnx.helper.make_tensor_value_info(nm, c.data_type, list(np.shape(c.array)))
                  for nm, c in zip(names, ins) if nm]
        g = onnx.helper.make_graph([evaluated], "foldkit_eval", inputs,
                                   [onnx.helper.make_tensor_value_info("o", 0, None)])
        m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", view.index.opset)])
        m.ir_version = max(view.index.model.ir_version, 3)
        feeds = {nm: np.asarray(c.array) for nm, c in zip(names, ins) if nm}
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (out,) = ReferenceEvaluator(m).run(None, feeds)
        out = np.asarray(out)
        if out.nbytes > EVAL_MAX_BYTES or out.dtype == object:
            return None
        dt = onnx.helper.np_dtype_to_tensor_dtype(out.dtype)
    except Exception:  # anything the evaluator cannot do: the value is simply not known to be constant
        return None
    return Const(node.output[0], out, dt, view, "computed")


def _dequantized(node: NodeProto, ins: list, view: GraphView) -> Optional[Const]:
    """DequantizeLinear of constants, y = (x - zero_point) * scale in the scale's float type, as
    runtimes compute it (the integer difference is exact in float; one rounding in the product).
    Numpy rather than the reference evaluator, which only implements opset 19 and later."""
    x = np.asarray(ins[0].array)
    scale = np.asarray(ins[1].array)
    if x.dtype.kind not in "iu" or scale.dtype.kind != "f" or get_attr(node, "block_size", 0):
        return None
    zp = np.asarray(ins[2].array).astype(np.int64) if len(ins) > 2 and ins[2] is not None else np.int64(0)
    if scale.size > 1:
        axis = int(get_attr(node, "axis", 1)) % max(x.ndim, 1)
        shape = [1] * x.ndim
        shape[axis] = scale.size
        scale = scale.reshape(shape)
        zp = zp.reshape(shape) if np.size(zp) > 1 else zp
    y = (x.astype(np.int64) - zp).astype(scale.dtype) * scale
    return Const(node.output[0], np.asarray(y), ins[1].data_type, view, "computed")


def constant_node_value(node: NodeProto, view: GraphView) -> Optional[Const]:
    for a in node.attribute:
        if a.name == "value" and a.type == AttributeProto.TENSOR:
            return Const(node.output[0], view.index.tensors.array(a.t), a.t.data_type, view, "constant")
        if a.name == "value_float":
            return Const(node.output[0], np.array(a.f, np.float32), TensorProto.FLOAT, view, "constant")
        if a.name == "value_floats":
            return Const(node.output[0], np.array(list(a.floats), np.float32), TensorProto.FLOAT, view, "constant")
    return None


