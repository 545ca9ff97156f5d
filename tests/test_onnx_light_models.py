"""The nine light models ONNX ships in its wheel (``onnx/backend/test/data/light``: the ONNX Model Zoo
classics, IR 3, opset 9, every initializer also a graph input, weights made by ConstantOfShape), written
by nobody here. Each folds through ``fold_file`` as ``foldkit fold`` does, verifies, passes the full
checker, keeps no BN that an exact fold could remove (each one kept has a coded reason), and still gives
the outputs ONNX's own reference evaluator computed for it (the ``_output_0.pb`` shipped beside it, on
the input ONNX's backend runner feeds: ``arange(n) / n``)."""

import glob
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import foldkit

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
MODELS = sorted(os.path.basename(p)[:-len(".onnx")] for p in glob.glob(os.path.join(LIGHT, "light_*.onnx")))
# BN each keeps, and why: DenseNet-121 normalizes every dense block's Concat, whose output the next
# Concat reads too (or a MaxPool's), and a Relu follows the BN's per-channel Mul/Add: no exact fold
# exists on either side.
KEPT = {"light_densenet121": 62}


def _runner_input(graph_input) -> np.ndarray:
    """The input ONNX's backend runner feeds a light model (generate_dummy_data, random=False)."""
    shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in graph_input.type.tensor_type.shape.dim)
    n = int(np.prod(shape))
    return (np.arange(n).reshape(shape) / n).astype(np.float32)


def _run(path, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # ORT fuses nothing itself
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_onnx_ships_the_nine_light_models():
    assert len(MODELS) == 9, MODELS


@pytest.mark.parametrize("name", MODELS)
def test_light_model_folds_verifies_and_keeps_onnx_reference_outputs(name, tmp_path):
    src, dst, rep = os.path.join(LIGHT, name + ".onnx"), tmp_path / "folded.onnx", tmp_path / "report.json"
    original = onnx.load(src)
    result = foldkit.fold_file(src, dst, report=str(rep))
    d = json.loads(rep.read_text())
    assert d["verification"]["passed"], d["verification"]
    folded = onnx.load(str(dst))
    onnx.checker.check_model(folded, full_check=True)
    before = sum(n.op_type == "BatchNormalization" for n in original.graph.node)
    after = sum(n.op_type == "BatchNormalization" for n in folded.graph.node)
    assert after == KEPT.get(name, 0) and d["bn_before"] == before and d["bn_after"] == after, (before, after)
    kept = [a for a in d["actions"] if a["action"] == "kept"]
    assert len(kept) == after and all(a["code"] and a["reason"] for a in kept), kept[:3]
    if before == 0:
        assert result.report.unchanged and dst.read_bytes() == open(src, "rb").read()  # nothing applies

    inits = {t.name for t in original.graph.initializer}
    feeds = {i.name: _runner_input(i) for i in original.graph.input if i.name not in inits}
    expected = numpy_helper.to_array(onnx.load_tensor(os.path.join(LIGHT, name + "_output_0.pb")))
    ours, theirs = _run(dst, feeds)[0], _run(src, feeds)[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)  # before vs after, the same runtime
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)  # ONNX's reference evaluator
