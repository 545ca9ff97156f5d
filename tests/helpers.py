"""Builders for small ONNX graphs and an independent before/after comparison on ONNX Runtime.

The comparison here deliberately does not use foldkit.verify, so that a bug there cannot hide one
in the passes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import foldkit

F32 = TensorProto.FLOAT


def rng(seed=0):
    return np.random.default_rng(seed)


def bn_arrays(c, r, dtype=np.float32):
    """Realistic, non-identity BN statistics."""
    gamma = r.normal(1.0, 0.3, c)
    beta = r.normal(0.0, 0.5, c)
    mean = r.normal(0.0, 0.7, c)
    var = r.uniform(0.3, 2.5, c)
    return [a.astype(dtype) for a in (gamma, beta, mean, var)]


def bn_inits(prefix, c, r, dtype=np.float32):
    names = [f"{prefix}_{k}" for k in ("scale", "B", "mean", "var")]
    return names, [numpy_helper.from_array(a, n) for a, n in zip(bn_arrays(c, r, dtype), names)]


def tensor(name, a):
    return numpy_helper.from_array(np.asarray(a), name)


def make_model(nodes, inputs, outputs, inits=(), opset=17, ir_version=None, infer_outputs=True, name="g"):
    """inputs/outputs: [(name, elem_type, shape)]; output shapes are filled in by shape inference."""
    g = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        list(inits))
    kw = {"opset_imports": [helper.make_opsetid("", opset)]}
    m = helper.make_model(g, **kw)
    m.ir_version = ir_version or min(m.ir_version, 8 if opset <= 17 else m.ir_version)
    if infer_outputs:
        fill_output_shapes(m)
    return m


def fill_output_shapes(m):
    """Give graph outputs the shapes ONNX infers (the full checker requires them)."""
    inferred = onnx.shape_inference.infer_shapes(m)
    types = {v.name: v.type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for o in m.graph.output:
        if o.name in types and types[o.name].tensor_type.HasField("shape"):
            o.type.CopyFrom(types[o.name])
    return m


def ort_run(model, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def random_feeds(model, r=None, shapes=None):
    r = r or rng(1)
    feeds = {}
    inits = {t.name for t in model.graph.initializer}
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        shape = (shapes or {}).get(i.name) or [d.dim_value if d.dim_value > 0 else 2 for d in tt.shape.dim]
        dt = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if tt.elem_type == TensorProto.BOOL:
            feeds[i.name] = np.array(r.random(shape) < 0.5)
        else:
            feeds[i.name] = r.standard_normal(shape).astype(dt)
    return feeds


def op_count(model, op):
    from foldkit.graph import iter_graphs
    return sum(n.op_type == op for g in iter_graphs(model.graph) for n in g.node)


def assert_close(ref, new, rtol, atol):
    for a, b in zip(ref, new):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a64.shape == b64.shape
        scale = float(np.max(np.abs(a64))) if a64.size else 0.0
        err = float(np.max(np.abs(a64 - b64))) if a64.size else 0.0
        assert err <= atol + rtol * scale, f"max abs err {err:.3g} > {atol} + {rtol} * {scale:.3g}"


def fold_and_compare(model, rtol=1e-5, atol=1e-6, bn_after=0, feeds=None, runner=ort_run, **kw):
    """Fold, run the full checker, and compare before/after outputs on ONNX Runtime."""
    before = model.SerializeToString()
    result = foldkit.fold(model, verify=False, **kw)
    assert model.SerializeToString() == before, "fold() mutated its input"
    onnx.checker.check_model(result.model, full_check=True)
    assert op_count(result.model, "BatchNormalization") == bn_after, result.report.to_json()
    feeds = feeds if feeds is not None else random_feeds(model)
    assert_close(runner(model, feeds), runner(result.model, feeds), rtol, atol)
    return result
