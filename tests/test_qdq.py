"""BatchNorm folded into quantized (QDQ) weights, exactly, with the graph kept quantized; and the
QDQ patterns that must be refused, with a reason that names the quantization."""

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import foldkit
from tests.helpers import F32, _bn, bn_arrays, make_model, ort_run, qconv, rng, tensor

I8, U8 = TensorProto.INT8, TensorProto.UINT8


def _a(params, eps=1e-5):
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    return gamma / np.sqrt(var + eps)


def _float_cnn(r, negative=()):
    """A float Conv -> BN -> Relu -> Conv, for the real quantizers to quantize: (model, BN params)."""
    names, bn, params = _bn(8, r, negative=negative)
    f = make_model([helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1] * 4),
                    helper.make_node("BatchNormalization", ["c"] + names, ["n"], name="bn"),
                    helper.make_node("Relu", ["n"], ["y"], name="relu"),
                    helper.make_node("Conv", ["y", "w2"], ["z"], name="conv2", pads=[1] * 4)],
                   [("x", F32, [1, 4, 8, 8])], [("z", F32, None)],
                   [tensor("w", r.standard_normal((8, 4, 3, 3)).astype(np.float32)),
                    tensor("b", r.standard_normal(8).astype(np.float32)),
                    tensor("w2", r.standard_normal((8, 8, 3, 3)).astype(np.float32))] + bn, opset=13)
    return f, params


def _qdq_counts(m):
    c = Counter(n.op_type for n in m.graph.node)
    return c["QuantizeLinear"], c["DequantizeLinear"]


def _init(m, name):
    return next(numpy_helper.to_array(t) for t in m.graph.initializer if t.name == name)


def _dq_inputs(m):
    dq = next(n for n in m.graph.node if n.name == "dqw")
    return dq, [_init(m, i) if i else None for i in dq.input]


def fold_qdq(m, ulps=4, bias_dq_removed=0, **kw):
    """Fold, check the BN is gone, the graph still quantized, outputs within a few ulp on ORT."""
    res = foldkit.fold(m, verify=False, **kw)
    onnx.checker.check_model(res.model, full_check=True)
    assert res.report.bn_after == 0, res.report.to_json()
    q_before, dq_before = _qdq_counts(m)
    q_after, dq_after = _qdq_counts(res.model)
    # only a weight's QuantizeLinear may go, and a bias's DequantizeLinear (the bias becomes float)
    assert dq_after == dq_before - bias_dq_removed and q_after <= q_before
    dq = next(n for n in res.model.graph.node if n.name == "dqw")
    codes = next(t for t in res.model.graph.initializer if t.name == dq.input[0])
    assert codes.data_type in (I8, U8)  # the weight is still integer codes, never a float tensor
    feeds = {"x": rng(5).standard_normal((2, 4, 7, 7)).astype(np.float32)}
    a, b = ort_run(m, feeds)[0], ort_run(res.model, feeds)[0]
    scale = float(np.abs(a).max())
    err = float(np.abs(a - b).max())
    assert err <= ulps * np.spacing(np.float32(scale)), (err, scale)
    return res


@pytest.mark.parametrize("act_qdq", [True, False])
def test_int8_codes_per_channel_fold_to_sign_a_times_q(act_qdq):
    m, params = qconv(act_qdq=act_qdq, negative=(1, 4))
    res = fold_qdq(m)
    q = _init(m, "wq").astype(np.int64)
    dq, (codes, scale, *_) = _dq_inputs(res.model)
    a = _a(params)
    assert np.array_equal(codes.astype(np.int64), np.sign(a)[:, None, None, None].astype(np.int64) * q)
    assert np.array_equal(scale, (np.abs(a) * _init(m, "ws").astype(np.float64)).astype(np.float32))
    (act,) = res.report.actions
    assert act.action == "folded" and "quantized weight" in act.target


def test_float_weight_q_dq_with_ties_is_quantized_with_onnx_semantics():
    r = rng(2)
    s = r.uniform(0.01, 0.03, 6).astype(np.float32)
    k = r.integers(-60, 60, (6, 4, 3, 3)).astype(np.float32)
    w = ((k + 0.5) * s[:, None, None, None]).astype(np.float32)  # many exact ties at x.5 steps
    m, params = qconv(float_weight=w, negative=(0,), zp=np.zeros(6, np.int8))
    for t in m.graph.initializer:
        if t.name == "ws":
            t.CopyFrom(tensor("ws", s))
    res = fold_qdq(m)
    assert _qdq_counts(res.model)[0] == _qdq_counts(m)[0] - 1  # the weight's QuantizeLinear is gone
    want = np.clip(np.rint(w / s[:, None, None, None]), -128, 127).astype(np.int64)  # half to even
    _, (codes, *_rest) = _dq_inputs(res.model)
    assert np.array_equal(codes.astype(np.int64), np.sign(_a(params))[:, None, None, None].astype(np.int64) * want)


def test_code_minus_128_with_a_negative_scale_is_refused_naming_the_channel_unless_reflected():
    codes = rng(3).integers(-100, 100, (6, 4, 3, 3)).astype(np.int8)
    codes[2, 0, 0, 0] = -128
    m, params = qconv(codes=codes, negative=(2,))
    res = foldkit.fold(m, verify=False)
    (act,) = res.report.actions
    assert act.action == "kept" and "channel 2" in act.reason and "-128" in act.reason and "--qdq-reflect" in act.reason
    assert res.model.SerializeToString() == m.SerializeToString()
    res = fold_qdq(m, qdq_reflect=True)
    dq, (new, scale, zp) = _dq_inputs(res.model)
    assert zp[2] == -1 and new[2, 0, 0, 0] == 127 and np.all(zp[[0, 1, 3, 4, 5]] == 0)


def test_per_tensor_scale_is_promoted_to_per_channel_and_said():
    m, _ = qconv(per_channel=False)
    res = fold_qdq(m)
    dq, (codes, scale, *_) = _dq_inputs(res.model)
    assert scale.shape == (6,) and any(a.name == "axis" and a.i == 0 for a in dq.attribute)
    assert any("became per-channel" in n for n in res.report.notes)


def test_uint8_zero_point_128_positive_scales_keep_codes_negative_needs_reflection():
    codes = rng(4).integers(20, 230, (6, 4, 3, 3)).astype(np.uint8)
    m, _ = qconv(codes=codes, zp=np.full(6, 128, np.uint8), code_type=U8)
    res = fold_qdq(m)
    assert np.array_equal(_dq_inputs(res.model)[1][0], codes)  # a > 0: only the scales change
    m, _ = qconv(codes=codes, zp=np.full(6, 128, np.uint8), code_type=U8, negative=(3,))
    (act,) = foldkit.fold(m, verify=False).report.actions
    assert act.action == "kept" and "zero point 128" in act.reason
    res = fold_qdq(m, qdq_reflect=True)
    _, (new, _, zp) = _dq_inputs(res.model)
    assert zp[3] == 255 - 128 and np.array_equal(new[3].astype(int), 255 - codes[3].astype(int))


def test_conv_transpose_scales_on_the_output_axis_fold_and_on_the_input_axis_are_refused():
    m, _ = qconv(op="ConvTranspose", axis=1)
    fold_qdq(m)
    m, _ = qconv(op="ConvTranspose", axis=0, c_in=6, c_out=6)
    (act,) = foldkit.fold(m, verify=False).report.actions
    assert act.action == "kept" and "scales axis 0, not the ConvTranspose's output-channel axis 1" in act.reason


def test_missing_axis_means_one_the_onnx_default():
    m, _ = qconv(axis=1, axis_attr=False, c_in=4, c_out=4)  # scales on axis 1 = input channels of a Conv
    (act,) = foldkit.fold(m, verify=False).report.actions
    assert act.action == "kept" and "axis 1" in act.reason


def test_gemm_with_quantized_b():
    r = rng(6)
    codes = r.integers(-100, 100, (5, 3)).astype(np.int8)  # transB=1: [N, K]
    names, bn, params = _bn(5, r, negative=(0,))
    m = make_model([helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], name="dqw", axis=0),
                    helper.make_node("Gemm", ["x", "w", "c"], ["g"], name="gemm", transB=1, beta=0.5),
                    helper.make_node("BatchNormalization", ["g"] + names, ["y"], name="bn")],
                   [("x", F32, [4, 3])], [("y", F32, None)],
                   [numpy_helper.from_array(codes, "wq"), tensor("ws", r.uniform(0.01, 0.03, 5).astype(np.float32)),
                    tensor("c", r.standard_normal(5).astype(np.float32))] + bn, opset=13)
    res = foldkit.fold(m, verify=False)
    assert res.report.bn_after == 0 and _qdq_counts(res.model) == (0, 1)
    feeds = {"x": r.standard_normal((4, 3)).astype(np.float32)}
    a, b = ort_run(m, feeds)[0], ort_run(res.model, feeds)[0]
    assert float(np.abs(a - b).max()) <= 4 * np.spacing(np.float32(np.abs(a).max()))


def test_torch_ao_qat_conv_div_add_bn_chain_folds_completely():
    r = rng(7)
    w = r.standard_normal((6, 4, 3, 3)).astype(np.float32) * 0.1
    m, _ = qconv(float_weight=w, zp=np.zeros(6, np.int8), bias=False,
                 extra_affine=[("Div", r.uniform(0.5, 2, 6)), ("Add", r.standard_normal(6))])
    res = fold_qdq(m, ulps=16)  # composed in float64 and rounded once; the original rounds after each of its maps
    assert Counter(n.op_type for n in res.model.graph.node)["Div"] == 0


def test_bn_parameters_given_as_dequantize_linear_are_constants():
    r = rng(8)
    gamma, beta, mean, var = bn_arrays(6, r)
    gq = np.clip(np.rint(gamma / 0.01), -128, 127).astype(np.int8)
    m = make_model([helper.make_node("DequantizeLinear", ["gq", "gs"], ["gamma"]),
                    helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4),
                    helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], name="bn")],
                   [("x", F32, [1, 4, 5, 5])], [("y", F32, None)],
                   [numpy_helper.from_array(gq, "gq"), tensor("gs", np.float32(0.01)), tensor("beta", beta),
                    tensor("mean", mean), tensor("var", var), tensor("w", r.standard_normal((6, 4, 3, 3)).astype(np.float32))],
                   opset=13)
    res = foldkit.fold(m)
    assert res.report.bn_after == 0 and res.report.verification["passed"]


def test_onnxruntime_quantize_static_graph_is_refused_with_the_fix_named(tmp_path):
    """ORT's quantize_static without quant_pre_process puts an activation Q/DQ between Conv and BN."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    r = rng(9)
    f, _ = _float_cnn(r)
    onnx.save(f, str(tmp_path / "f.onnx"))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.k = 0

        def get_next(self):
            self.k += 1
            return {"x": r.standard_normal((1, 4, 8, 8)).astype(np.float32)} if self.k <= 4 else None

    import logging

    logging.getLogger().setLevel(logging.ERROR)
    quantize_static(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QInt8,
                    op_types_to_quantize=["Conv"])
    q = onnx.load(str(tmp_path / "q.onnx"))
    res = foldkit.fold(q)
    (act,) = res.report.actions
    assert act.action == "kept" and "re-quantized" in act.reason and "quant_pre_process" in act.reason
    assert res.report.unchanged and res.model.SerializeToString() == q.SerializeToString()
    from foldkit.check import check

    onnx.save(q, str(tmp_path / "q2.onnx"))
    assert [f.code for f in check(str(tmp_path / "q2.onnx")).findings] == ["FK003"]


def test_check_reports_a_foldable_qdq_bn_as_fk001(tmp_path):
    from foldkit.check import check

    m, _ = qconv()
    onnx.save(m, str(tmp_path / "m.onnx"))
    assert [f.code for f in check(str(tmp_path / "m.onnx")).findings] == ["FK001"]


def test_bn_before_a_quantized_conv_is_refused():
    r = rng(10)
    names, bn, _ = _bn(4, r)
    m = make_model([helper.make_node("BatchNormalization", ["x"] + names, ["n"], name="bn"),
                    helper.make_node("QuantizeLinear", ["n", "s", "z"], ["nq"]),
                    helper.make_node("DequantizeLinear", ["nq", "s", "z"], ["nd"]),
                    helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=0),
                    helper.make_node("Conv", ["nd", "w"], ["y"], name="conv")],
                   [("x", F32, [1, 4, 5, 5])], [("y", F32, None)],
                   bn + [tensor("s", np.float32(0.05)), tensor("z", np.int8(0)),
                         numpy_helper.from_array(r.integers(-50, 50, (3, 4, 1, 1)).astype(np.int8), "wq"),
                         tensor("ws", np.full(3, 0.02, np.float32))], opset=13)
    res = foldkit.fold(m, verify=False)
    (act,) = res.report.actions
    assert act.action == "kept" and "reads a quantized input" in act.reason
    assert res.model.SerializeToString() == m.SerializeToString()


def test_an_int32_bias_given_as_dequantize_linear_becomes_a_float_bias():
    m, params = qconv(negative=(2,))
    b = _init(m, "b")
    bscale = np.float32(1e-4)
    bq = np.rint(b / bscale).astype(np.int32)
    inits = [t for t in m.graph.initializer if t.name != "b"] + [numpy_helper.from_array(bq, "bq"),
                                                                tensor("bs", bscale)]
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    m.graph.node.insert(0, helper.make_node("DequantizeLinear", ["bq", "bs"], ["b"], name="dqb"))
    res = fold_qdq(m, bias_dq_removed=1)
    conv = next(n for n in res.model.graph.node if n.op_type == "Conv")
    bias = next(t for t in res.model.graph.initializer if t.name == conv.input[2])
    assert bias.data_type == F32 and not any(n.name == "dqb" for n in res.model.graph.node)


def test_nncf_onnx_ptq_graph_folds_and_stays_quantized(tmp_path):
    """A graph made by a real quantizer: NNCF's ONNX post-training quantization (optional dev
    dependency: `pip install nncf==3.4.0`; CI skips it) leaves int8 weight -> DequantizeLinear(axis 0)
    -> Conv -> BatchNormalization."""
    nncf = pytest.importorskip("nncf", reason="nncf is not installed (optional: pip install nncf==3.4.0)")
    r = rng(11)
    f, params = _float_cnn(r, negative=(3,))
    data = nncf.Dataset([{"x": r.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(4)])
    q = nncf.quantize(f, data, subset_size=4)
    res = foldkit.fold(q)
    assert res.report.bn_after == 0 and res.report.verification["passed"]
    assert _qdq_counts(res.model) == _qdq_counts(q)
    conv = next(n for n in q.graph.node if n.op_type == "Conv" and "b" in n.input)
    dq = next(n for n in q.graph.node if n.output[0] == conv.input[1])
    codes = next(numpy_helper.to_array(t) for t in q.graph.initializer if t.name == dq.input[0]).astype(np.int64)
    conv2 = next(n for n in res.model.graph.node if n.op_type == "Conv" and n.name == conv.name)
    dq2 = next(n for n in res.model.graph.node if n.output[0] == conv2.input[1])
    new = next(numpy_helper.to_array(t) for t in res.model.graph.initializer if t.name == dq2.input[0]).astype(np.int64)
    assert np.array_equal(new, np.sign(_a(params))[:, None, None, None].astype(np.int64) * codes)


def test_modelopt_torch_export_folds_and_stays_quantized(tmp_path):
    """NVIDIA ModelOpt (optional dev dependency: `pip install nvidia-modelopt==0.47.0 requests
    huggingface_hub`; CI skips it): mtq.quantize + torch.onnx.export writes float weight ->
    QuantizeLinear(axis 0) -> DequantizeLinear -> Conv -> BatchNormalization, zero points as
    Cast(Constant) to int8."""
    torch = pytest.importorskip("torch")
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as e:
        pytest.skip(f"nvidia-modelopt is not installed ({e})")
    import warnings

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1)).eval()
    bn = net[1]
    bn.running_mean.normal_(0, 0.5)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.normal_(1, 0.3)
    bn.weight.data[2] = -0.7
    bn.bias.data.normal_(0, 0.3)
    data = [torch.randn(1, 4, 8, 8) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = mtq.quantize(net, mtq.INT8_DEFAULT_CFG, lambda model: [model(d) for d in data])
        torch.onnx.export(q, (torch.randn(1, 4, 8, 8),), str(tmp_path / "mo.onnx"), dynamo=False, opset_version=17,
                          do_constant_folding=False)
    m = onnx.load(str(tmp_path / "mo.onnx"))
    res = foldkit.fold(m)
    assert res.report.bn_after == 0 and res.report.verification["passed"]
    q_before, dq_before = _qdq_counts(m)
    assert _qdq_counts(res.model) == (q_before - 1, dq_before)  # only the folded weight's QuantizeLinear went
    conv = next(n for n in res.model.graph.node if n.op_type == "Conv")
    dq = next(n for n in res.model.graph.node if n.output[0] == conv.input[1])
    codes = next(t for t in res.model.graph.initializer if t.name == dq.input[0])
    assert codes.data_type == I8


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10 ** 6), per_channel=st.booleans(), reflect=st.booleans(),
       zero_point=st.sampled_from([None, 0, 3]), negatives=st.lists(st.integers(0, 5), max_size=3, unique=True),
       with_min_code=st.booleans())
def test_random_qdq_folds_are_exact_or_refused_unchanged(seed, per_channel, reflect, zero_point, negatives,
                                                         with_min_code):
    r = rng(seed)
    codes = r.integers(-127, 128, (6, 4, 3, 3)).astype(np.int8)
    if with_min_code:
        codes[r.integers(0, 6), 0, 0, 0] = -128
    zp = None if zero_point is None else np.full(6 if per_channel else (), zero_point, np.int8)
    m, params = qconv(codes=codes, per_channel=per_channel, zp=zp, negative=tuple(negatives), seed=seed % 97)
    res = foldkit.fold(m, verify=False, qdq_reflect=reflect)
    feeds = {"x": rng(seed + 1).standard_normal((2, 4, 7, 7)).astype(np.float32)}
    a, b = ort_run(m, feeds)[0], ort_run(res.model, feeds)[0]
    if res.report.bn_after == 0:
        assert _qdq_counts(res.model)[1] == _qdq_counts(m)[1]
        exact, magnitude, terms = _qconv_float64(m, feeds["x"])
        folded, _, _ = _qconv_float64(res.model, feeds["x"])
        eps = float(np.finfo(np.float32).eps)
        # the fold itself, in exact arithmetic: one rounding of each scale and of the bias
        assert np.all(np.abs(folded - exact) <= eps * (magnitude + np.abs(exact)))
        # ONNX Runtime's float32 conv of the folded model: within float32's forward error bound of
        # the exact values (a sum of `terms` products), as the original's own output is
        bound = (terms + 2) * eps * magnitude
        assert np.all(np.abs(a - exact) <= bound) and np.all(np.abs(b - exact) <= bound)
    else:
        (act,) = res.report.actions  # a quantization refusal, with its code, and the graph as it was
        assert act.code == "quantization" and res.model.SerializeToString() == m.SerializeToString()
        assert "channel" in act.reason


def _qconv_float64(model, x):
    """The qconv graph (x -> Q -> DQ -> Conv(DQ(codes)) [-> BN] -> Relu) in exact float64 from its
    codes and float32 parameters: (y, the sum of the magnitudes of every term of each output,
    the number of products in each output's sum)."""
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    op = {n.op_type: n for n in model.graph.node}
    xs, xz = float(init["xs"]), int(init["xz"])
    info = np.iinfo(init["xz"].dtype)
    xd = (np.clip(np.rint(x.astype(np.float64) / xs) + xz, info.min, info.max) - xz) * xs
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "wq")
    codes = init["wq"].astype(np.int64)
    scale = init[dq.input[1]].astype(np.float64).reshape(-1, 1, 1, 1)
    zp = init[dq.input[2]].astype(np.int64).reshape(-1, 1, 1, 1) if len(dq.input) > 2 else 0
    w = (codes - zp) * scale
    bias = init[op["Conv"].input[2]].astype(np.float64) if len(op["Conv"].input) > 2 else np.zeros(w.shape[0])
    n, _, h, wd = xd.shape
    pad = np.pad(xd, ((0, 0), (0, 0), (1, 1), (1, 1)))
    y = np.zeros((n, w.shape[0], h, wd))
    mag = np.zeros_like(y)
    for i in range(3):
        for j in range(3):
            patch = pad[:, :, i:i + h, j:j + wd]
            y += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
            mag += np.einsum("nchw,oc->nohw", np.abs(patch), np.abs(w[:, :, i, j]))
    y += bias.reshape(1, -1, 1, 1)
    mag += np.abs(bias).reshape(1, -1, 1, 1)
    if "BatchNormalization" in op:
        g, beta, mean, var = (init[k].astype(np.float64).reshape(1, -1, 1, 1) for k in op["BatchNormalization"].input[1:5])
        a = g / np.sqrt(var + 1e-5)
        y = a * (y - mean) + beta
        mag = np.abs(a) * (mag + np.abs(mean)) + np.abs(beta)
    return np.maximum(y, 0), mag, codes[0].size + 1
