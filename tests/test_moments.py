"""The in-graph moments (foldkit.moments): each BN input's rows (one sample, one channel) reduced one
sample at a time in float64 by a Scan, merged exactly. Judged against float64 computed here in
numpy from ONNX Runtime's own values of the BN inputs, at a tolerance only float64 rounding meets,
on inputs that are hard for a variance (a large offset, constant channels), at every rank, with
batches of unequal sizes; and recalibrating a file keeps its weights in the file."""

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from foldkit.cli import main
from foldkit.recalibration import recalibrate
from tests.helpers import F32, make_model, rng, tensor


def _model(rank, c=3, offset=0.0, opset=17):
    """x -> Conv (1x1, or MatMul at rank 2) + offset -> BN, with the BN input as a second output."""
    r = rng(rank)
    bn = [tensor(n, a) for n, a in (("g", np.ones(c, np.float32)), ("b", np.zeros(c, np.float32)),
                                    ("m", np.zeros(c, np.float32)), ("v", np.ones(c, np.float32)))]
    off = tensor("off", np.array([offset, 0.0, 5.0][:c], np.float32).reshape([c] + [1] * (rank - 2)))
    if rank == 2:
        w = tensor("W", r.standard_normal((4, c)).astype(np.float32))
        first = helper.make_node("MatMul", ["x", "W"], ["h0"])
        xin = ("x", F32, ["n", 4])
    else:
        arr = r.standard_normal([c, 4] + [1] * (rank - 2)).astype(np.float32)
        arr[2] = 0.0  # channel 2 is constant: the offset alone, zero variance
        w = tensor("W", arr)
        first = helper.make_node("Conv", ["x", "W"], ["h0"])
        xin = ("x", F32, ["n", 4] + [None] * (rank - 2))
    nodes = [first, helper.make_node("Add", ["h0", "off"], ["h"]),
             helper.make_node("BatchNormalization", ["h", "g", "b", "m", "v"], ["y"])]
    return make_model(nodes, [xin], [("y", F32, None)], [w, off] + bn, opset=opset, infer_outputs=False)


def _bn_input_values(m, xs):
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    probe.graph.output.append(helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = [np.moveaxis(sess.run(None, {"x": x})[1].astype(np.float64), 1, 0) for x in xs]
    return np.concatenate([r.reshape(r.shape[0], -1) for r in rows], axis=1)


@pytest.mark.parametrize("rank,opset", [(2, 17), (3, 17), (4, 8), (4, 11), (4, 17), (4, 18), (5, 17)])  # 8: Scan-8
def test_moments_equal_float64_statistics_of_the_bn_inputs(rank, opset):
    """--method exact measures the BN input in inference mode: its stored statistics are the
    population mean and variance of every value it saw, to float64 rounding, also for a channel
    offset by 1e5 (where a one-pass sum of squares, even in float64, loses digits) and a constant one (variance 0)."""
    m = _model(rank, offset=1e5, opset=opset)
    r = rng(7)
    spatial = {2: [], 3: [9], 4: [5, 6], 5: [3, 4, 2]}[rank]
    xs = [r.standard_normal([n, 4] + spatial).astype(np.float32) for n in (5, 1, 12)]
    h = _bn_input_values(m, xs)
    recalibrate(m, lambda: iter([{"x": x} for x in xs]), method="exact")
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
    bn = next(n for n in m.graph.node if n.op_type == "BatchNormalization")
    mean, var = inits[bn.input[3]], inits[bn.input[4]]
    want_mean, want_var = h.mean(axis=1), h.var(axis=1)
    # stored as float32: the float64 result rounded once, so within half an ulp of float32
    scale = float(np.abs(h).max())
    np.testing.assert_allclose(mean, want_mean, rtol=2 ** -23, atol=1e-12 * scale)
    np.testing.assert_allclose(var, want_var, rtol=2 ** -23, atol=0)
    if rank > 2:
        assert var[2] == 0.0  # the constant channel: exactly zero, not a rounding residue


def test_recalibrating_a_file_maps_its_weights_and_streams_them_out(tmp_path, monkeypatch):
    """recalibrate (without --eval-data) loads the model lazily: no weight is parsed into memory,
    ONNX Runtime reads them from the input file, and the output streams them; the output equals
    the in-memory recalibration of the same model, and a BN that cannot fold keeps its new
    statistics (the output is never a copy of the input)."""
    from foldkit import wire

    r = rng(3)
    c = 8
    w = r.standard_normal((c, 4, 3, 3)).astype(np.float32)
    bn = [tensor(n, a) for n, a in (("g", np.ones(c, np.float32)), ("b", np.zeros(c, np.float32)),
                                    ("m", np.zeros(c, np.float32)), ("v", np.ones(c, np.float32)))]
    bn2 = [tensor(n + "2", a) for n, a in (("g", np.ones(4, np.float32)), ("b", np.zeros(4, np.float32)),
                                         ("m", np.zeros(4, np.float32)), ("v", np.ones(4, np.float32)))]
    nodes = [helper.make_node("BatchNormalization", ["x", "g2", "b2", "m2", "v2"], ["x1"]),  # on the input: stays
             helper.make_node("Conv", ["x1", "W"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["h", "g", "b", "m", "v"], ["y"])]
    m = make_model(nodes, [("x", F32, ["n", 4, 6, 6])], [("y", F32, None)], [tensor("W", w)] + bn + bn2)
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p))
    data = tmp_path / "d.npz"
    np.savez(data, x=(r.standard_normal((40, 4, 6, 6)) * 2 + 3).astype(np.float32))
    loads = []
    real = wire.lazy_load
    monkeypatch.setattr(wire, "lazy_load", lambda *a, **k: (loads.append(a[0]), real(*a, **k))[1])
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    res = CliRunner().invoke(main, ["recalibrate", str(p), "--data", str(data), "-o", str(out), "--report", str(rep)])
    assert res.exit_code == 0, res.output
    assert str(p) in loads
    d = json.loads(rep.read_text())
    assert d["verification"]["passed"] and d["bn_after"] == 1 and d["recalibration"]["samples"] == 40
    got = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    # the BN on the input was not folded, and it has the input's statistics (mean near 3, var near 4)
    assert abs(float(got["m2"].mean()) - 3) < 0.5 and abs(float(got["v2"].mean()) - 4) < 1.5
    # the same as recalibrating the model in memory and folding it there
    plain = tmp_path / "plain.onnx"
    res = CliRunner().invoke(main, ["recalibrate", str(p), "--data", str(data), "-o", str(plain),
                                    "--eval-data", str(data)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes() == plain.read_bytes()
    # --no-fold: the model as it was, with new statistics, its weight streamed from the input
    nofold = tmp_path / "nofold.onnx"
    res = CliRunner().invoke(main, ["recalibrate", str(p), "--data", str(data), "-o", str(nofold), "--no-fold"])
    assert res.exit_code == 0, res.output
    kept = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(nofold)).graph.initializer}
    np.testing.assert_array_equal(kept["W"], w)
    np.testing.assert_array_equal(kept["m2"], got["m2"])
    assert sorted(os.listdir(tmp_path)) == sorted(["m.onnx", "d.npz", "o.onnx", "r.json", "plain.onnx", "nofold.onnx"])
