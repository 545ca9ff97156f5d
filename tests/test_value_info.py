"""No stale record is left behind: every tensor foldkit creates, widens or removes leaves no value_info,
graph input or output record that disagrees with it. Property: each model of the suite's corpora, re-saved
with full shape inference and a value_info for every initializer too (as jax2onnx writes them), folds to
the same nodes and weights as the bare model, passes the full checker, and gives the same outputs."""

import glob
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import foldkit
from tests.helpers import F32, fold_and_compare, make_model, tensor


def _with_records(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with a value_info for every value shape inference can type and every initializer."""
    m = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    have = {v.name for v in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output)}
    for t in m.graph.initializer:
        if t.name not in have:
            m.graph.value_info.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return m


def _structure(m: onnx.ModelProto):
    inits = {t.name: (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes()) for t in m.graph.initializer}
    nodes = [(n.op_type, tuple(n.input), tuple(n.output), tuple(a.SerializeToString() for a in n.attribute))
             for n in m.graph.node]
    return nodes, inits


def _gemm_scalar_bias(bias_shape=(), c_record=True):
    """jax2onnx's shape: Gemm(x, W, c) with a scalar c (and its rank-0 value_info), then Mul by a [1, N]
    constant: the fold widens c to N values."""
    r = np.random.default_rng(4)
    inits = [tensor("W", r.standard_normal((4, 3)).astype(np.float32)),
             tensor("c", np.full(bias_shape, 0.5, np.float32)),
             tensor("s", r.uniform(0.5, 2, (1, 3)).astype(np.float32))]
    m = make_model([helper.make_node("Gemm", ["x", "W", "c"], ["g"]), helper.make_node("Mul", ["g", "s"], ["y"])],
                   [("x", F32, [2, 4])], [("y", F32, [2, 3])], inits)
    if c_record:
        m.graph.value_info.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, list(bias_shape)))
    return m


def _corpus():
    from tests.test_golden import _corpus as golden

    out = dict(sorted(golden().items()))
    out["gemm_scalar_bias"] = _gemm_scalar_bias()
    out["gemm_bias_1"] = _gemm_scalar_bias((1,))
    light = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
    for p in sorted(glob.glob(os.path.join(light, "light_*.onnx"))):
        out[os.path.basename(p)[:-5]] = onnx.load(p)
    return out


CORPUS = _corpus()


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_full_records_fold_to_the_same_weights_and_pass_the_checker(name):
    bare = CORPUS[name]
    recorded = _with_records(bare)
    onnx.checker.check_model(recorded, full_check=True)
    a = foldkit.fold(bare, verify=False).model
    b = foldkit.fold(recorded, verify=False).model
    assert _structure(b) == _structure(a)
    onnx.checker.check_model(b, full_check=True)
    for v in list(b.graph.value_info) + list(b.graph.input) + list(b.graph.output):  # no record is stale
        t = next((t for t in b.graph.initializer if t.name == v.name), None)
        if t is not None:
            dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
            assert (v.type.tensor_type.elem_type, dims) == (t.data_type, list(t.dims)), v.name


def test_the_widened_scalar_bias_keeps_no_rank_0_record(tmp_path):
    m = _gemm_scalar_bias()
    folded = fold_and_compare(m).model  # fold, full checker, ORT before vs after
    assert [n.op_type for n in folded.graph.node] == ["Gemm"]
    c = {v.name: v for v in folded.graph.value_info}
    bias = folded.graph.node[0].input[2]
    assert bias not in c or [d.dim_value for d in c[bias].type.tensor_type.shape.dim] == [3]
    src, dst = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(m, str(src))
    foldkit.fold_file(str(src), str(dst))  # the CLI's path: verified on the written file
    onnx.checker.check_model(onnx.load(str(dst)), full_check=True)
