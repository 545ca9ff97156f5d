"""Training-mode BN is converted to inference mode, then folded; compared against an inference-mode reference."""

import numpy as np
import pytest


import foldkit
from tests.helpers import assert_close, model, op_count, ort_run, rng


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
