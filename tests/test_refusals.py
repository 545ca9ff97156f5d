"""One test per refusal reason: the reason is reported and the graph is left byte-for-byte as it was."""

import numpy as np
import pytest
from onnx import helper

import foldkit
from tests.helpers import F32, base, bn_inits, make_model, rng, tensor


CASES = [
    ("producer output is a graph output", dict(conv_out_is_output=True), "is also a graph output"),
    ("producer output read elsewhere", dict(extra_reader=True), "is also read by 1 other node(s)"),
    ("weight is a graph input", dict(w_as_input=True), "the Conv weight 'W' is not a constant initializer"),
    ("BN parameter is a graph input", dict(bn_param_as_input=True), "its scale input 'bn_scale' is not a constant initializer"),
    ("channel mismatch", dict(bn_channels=3), "channel count mismatch: the BN has 3 channels, the Conv produces 6"),
    ("negative variance", dict(var=[1, 1, -2, 1, 1, 1]), "var + epsilon is not positive"),
    ("zero variance and epsilon", dict(var=[0] * 6, eps=0.0), "var + epsilon is not positive"),
    ("NaN variance", dict(var=[1, np.nan, 1, 1, 1, 1]), "holds NaN or Inf"),
    ("Inf scale", dict(scale=[1, np.inf, 1, 1, 1, 1]), "holds NaN or Inf"),
    ("float32 overflow", dict(scale=[3e38] * 6, var=[1e-30] * 6), "overflows float32"),
    ("producer without weights", dict(producer="Relu"), "which has no weights to fold into"),
    ("spatial=0", dict(spatial=0, opset=7), "spatial=0"),
]


@pytest.mark.parametrize("label,kwargs,reason", CASES, ids=[c[0] for c in CASES])
def test_refusal(label, kwargs, reason):
    m = base(**kwargs)
    before = m.SerializeToString()
    res = foldkit.fold(m, verify=False, check=False)
    assert res.report.bn_after == 1
    (action,) = res.report.actions
    assert action.action == "kept"
    assert reason in action.reason, action.reason
    assert res.model.SerializeToString() == before


def test_initializer_that_is_also_an_input_is_not_constant():
    m = base()
    m.graph.input.append(helper.make_tensor_value_info("W", F32, [6, 4, 3, 3]))
    res = foldkit.fold(m, verify=False, check=False)
    assert "also a graph input, so it can be overridden at run time" in res.report.actions[0].reason


def test_matmul_rank3_refused():
    r = rng(22)
    names, bn = bn_inits("bn", 7, r)
    nodes = [helper.make_node("MatMul", ["X", "W"], ["mm"]),
             helper.make_node("BatchNormalization", ["mm"] + names, ["Y"])]
    m = make_model(nodes, [("X", F32, [2, 7, 4])], [("Y", F32, None)],
                   [tensor("W", r.standard_normal((4, 7)).astype(np.float32))] + bn)
    res = foldkit.fold(m, verify=False, check=False)
    assert "rank-3 MatMul output" in res.report.actions[0].reason
    assert res.model.SerializeToString() == m.SerializeToString()


def test_bn_on_graph_input_reason():
    r = rng(23)
    names, bn = bn_inits("bn", 4, r)
    m = make_model([helper.make_node("BatchNormalization", ["X"] + names, ["Y"])],
                   [("X", F32, [1, 4, 2, 2])], [("Y", F32, None)], bn)
    res = foldkit.fold(m)
    assert "is not computed by a node in this graph" in res.report.actions[0].reason
    assert res.report.verification["passed"] and res.report.verification["max_abs_err"] == 0
    assert res.report.verification["method"] == "unchanged" and res.report.unchanged


def test_training_mode_with_used_statistics_is_refused():
    r = rng(24)
    names, bn = bn_inits("bn", 6, r)
    nodes = [helper.make_node("Conv", ["X", "W"], ["c"]),
             helper.make_node("BatchNormalization", ["c"] + names, ["Y", "rm", "rv"], training_mode=1)]
    m = make_model(nodes, [("X", F32, [2, 4, 3, 3])], [("Y", F32, None), ("rm", F32, None)],
                   [tensor("W", r.standard_normal((6, 4, 1, 1)).astype(np.float32))] + bn, infer_outputs=False)
    res = foldkit.fold(m, verify=False, check=False)
    assert "running-statistics output 'rm' is read by the graph" in res.report.actions[0].reason
    assert res.model.SerializeToString() == m.SerializeToString()
