"""Training-mode BN is converted to inference mode, then folded; compared against an inference-mode reference."""

import numpy as np
import pytest
from onnx import helper

import foldkit
from tests.helpers import F32, assert_close, bn_inits, make_model, op_count, ort_run, rng, tensor


def model(opset, training):
    r = rng(31)
    names, bn = bn_inits("bn", 6, r)
    outs, attrs = ["Y"], {}
    if training:
        if opset >= 14:
            outs, attrs = ["Y", "rm", "rv"], {"training_mode": 1}
        elif opset >= 7:
            outs = ["Y", "rm", "rv", "sm", "sv"]
        else:
            outs, attrs = ["Y", "rm", "rv", "sm", "sv"], {"is_test": 0}
    elif opset < 7:
        attrs = {"is_test": 1}
    nodes = [helper.make_node("Conv", ["X", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c"] + names, outs, name="bn", **attrs)]
    return make_model(nodes, [("X", F32, [2, 4, 5, 5])], [("Y", F32, None)],
                      [tensor("W", r.standard_normal((6, 4, 3, 3)).astype(np.float32))] + bn,
                      opset=opset, infer_outputs=False)


@pytest.mark.parametrize("opset", [9, 14, 15, 17])
def test_training_mode_converted_and_folded(opset):
    m = model(opset, training=True)
    res = foldkit.fold(m)
    assert op_count(res.model, "BatchNormalization") == 0
    (a,) = res.report.actions
    assert a.action == "folded" and a.steps[0].startswith("converted: training mode -> inference mode")
    assert res.report.verification["reference"] == "inference-mode original"
    feeds = {"X": rng(2).standard_normal((2, 4, 5, 5)).astype(np.float32)}
    assert_close(ort_run(model(opset, training=False), feeds), ort_run(res.model, feeds), 1e-5, 1e-6)


def test_opset6_is_test_zero_converted():
    m = model(6, training=True)
    res = foldkit.fold(m, verify=False, check=False, skip=["producer"])
    bn = [n for n in res.model.graph.node if n.op_type == "BatchNormalization"][0]
    assert list(bn.output) == ["Y"]
    assert [a.i for a in bn.attribute if a.name == "is_test"] == [1]


def test_skip_inference_mode_keeps_training_bn():
    res = foldkit.fold(model(17, training=True), verify=False, check=False, skip=["inference-mode"])
    assert res.report.bn_after == 1
    assert "training mode" in res.report.actions[0].reason
