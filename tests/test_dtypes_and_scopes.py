"""dtypes (fp16, bf16, fp64, opset-15 mixed), fp16 rounding done once, and subgraph scopes."""

import ml_dtypes
import numpy as np
from onnx import TensorProto, helper, numpy_helper

import foldkit
from tests.helpers import F32, _branch, bn_arrays, fold_and_compare, make_model, op_count, rng, tensor, typed_conv_bn


def reference_runner(model, feeds):
    from onnx.reference import ReferenceEvaluator
    return ReferenceEvaluator(model).run(None, feeds)


def test_fp16_fold_is_float64_rounded_once():
    m = typed_conv_bn(np.float16, TensorProto.FLOAT16)
    feeds = {"X": rng(2).standard_normal((1, 4, 5, 5)).astype(np.float16)}
    res = fold_and_compare(m, rtol=4e-3, atol=4e-3, feeds=feeds)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    gamma, beta, mean, var = (inits[k].astype(np.float64) for k in ("s", "bb", "m", "v"))
    s = gamma / np.sqrt(var + 1e-5)
    expected_w = (inits["W"].astype(np.float64) * s[:, None, None, None]).astype(np.float16)
    expected_b = (inits["B"].astype(np.float64) * s + beta - mean * s).astype(np.float16)
    out = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    assert out["W"].dtype == np.float16
    assert np.array_equal(out["W"], expected_w)  # bit-exact: one rounding from float64
    assert np.array_equal(out["B"], expected_b)
    # and strictly no worse than folding in fp16 arithmetic, which rounds twice
    naive = inits["W"] * (inits["s"] / np.sqrt(inits["v"] + np.float16(1e-5)))[:, None, None, None]
    exact = inits["W"].astype(np.float64) * s[:, None, None, None]
    assert np.abs(out["W"] - exact).max() <= np.abs(naive.astype(np.float64) - exact).max()


def test_fp16_overflow_is_refused():
    m = typed_conv_bn(np.float16, TensorProto.FLOAT16, scale=6e4)
    for t in m.graph.initializer:
        if t.name == "v":
            t.CopyFrom(tensor("v", np.full(6, 1e-6, np.float16)))
    res = foldkit.fold(m, verify=False)
    assert res.report.bn_after == 1
    assert "overflows float16" in res.report.actions[0].reason
    assert res.model.SerializeToString() == m.SerializeToString()


def test_opset15_bn_params_in_float32_with_fp16_x():
    m = typed_conv_bn(np.float16, TensorProto.FLOAT16, bn_dtype=np.float32, opset=15)
    feeds = {"X": rng(2).standard_normal((1, 4, 5, 5)).astype(np.float16)}
    res = fold_and_compare(m, rtol=4e-3, atol=4e-3, feeds=feeds)
    assert all(t.data_type == TensorProto.FLOAT16 for t in res.model.graph.initializer)


def test_float64():
    m = typed_conv_bn(np.float64, TensorProto.DOUBLE)
    feeds = {"X": rng(2).standard_normal((1, 4, 5, 5))}
    fold_and_compare(m, rtol=1e-12, atol=1e-12, feeds=feeds, runner=reference_runner)
    assert foldkit.fold(m).report.verification["backend"] == "onnx-reference"


def test_bfloat16():
    r = rng(12)
    w = r.standard_normal((4, 5)).astype(ml_dtypes.bfloat16)
    names = ["s", "bb", "m", "v"]
    inits = [tensor("B", w)] + [tensor(n, a.astype(ml_dtypes.bfloat16)) for n, a in zip(names, bn_arrays(5, r))]
    nodes = [helper.make_node("Gemm", ["A", "B"], ["g"]),
             helper.make_node("BatchNormalization", ["g"] + names, ["Y"])]
    m = make_model(nodes, [("A", TensorProto.BFLOAT16, [3, 4])], [("Y", TensorProto.BFLOAT16, None)], inits, opset=22)
    feeds = {"A": r.standard_normal((3, 4)).astype(ml_dtypes.bfloat16)}
    res = fold_and_compare(m, rtol=3e-2, atol=3e-2, feeds=feeds, runner=reference_runner)
    assert {t.data_type for t in res.model.graph.initializer} == {TensorProto.BFLOAT16}
    v = foldkit.fold(m).report.verification
    assert v["passed"] and v["backend"] == "onnx-reference"


def test_if_branches_read_outer_scope_weight():
    """Both If branches read the outer weight W, which the main graph uses as well: it must be cloned."""
    r = rng(13)
    w = r.standard_normal((6, 4, 3, 3)).astype(np.float32)
    then_g = _branch("then", "W", "tb", r, "t_out")
    else_g = _branch("else", "W", "eb", r, "e_out")
    nodes = [helper.make_node("If", ["cond"], ["Y"], then_branch=then_g, else_branch=else_g, name="if"),
             helper.make_node("Conv", ["X", "W"], ["Y2"], pads=[1, 1, 1, 1])]
    m = make_model(nodes, [("cond", TensorProto.BOOL, []), ("X", F32, [1, 4, 5, 5])],
                   [("Y", F32, [1, 6, 5, 5]), ("Y2", F32, None)], [tensor("W", w)])
    for c in (True, False):
        feeds = {"cond": np.array(c), "X": r.standard_normal((1, 4, 5, 5)).astype(np.float32)}
        res = fold_and_compare(m, feeds=feeds)
    assert {a.action for a in res.report.actions} == {"folded"}
    assert {a.graph for a in res.report.actions} == {"main/if.then_branch", "main/if.else_branch"}
    main_w = [numpy_helper.to_array(t) for t in res.model.graph.initializer if t.name == "W"]
    assert len(main_w) == 1 and np.array_equal(main_w[0], w)


def test_loop_body_with_constant_weights():
    r = rng(14)
    w = r.standard_normal((4, 4, 1, 1)).astype(np.float32)
    arrays = bn_arrays(4, r)
    names = [f"l_{k}" for k in "sbmv"]
    body = helper.make_graph(
        [helper.make_node("Conv", ["x_in", "W"], ["c"]),
         helper.make_node("BatchNormalization", ["c"] + names, ["x_out"], name="loop_bn"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_in", F32, [1, 4, 3, 3])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_out", F32, [1, 4, 3, 3])],
        [tensor(n, a) for n, a in zip(names, arrays)])
    nodes = [helper.make_node("Loop", ["trip", "", "X"], ["Y"], body=body, name="loop")]
    m = make_model(nodes, [("trip", TensorProto.INT64, []), ("X", F32, [1, 4, 3, 3])], [("Y", F32, [1, 4, 3, 3])],
                   [tensor("W", w)])
    feeds = {"trip": np.array(3, np.int64), "X": r.standard_normal((1, 4, 3, 3)).astype(np.float32)}
    res = fold_and_compare(m, feeds=feeds, rtol=1e-5)
    assert res.report.actions[0].graph == "main/loop.body"
    assert op_count(res.model, "Conv") == 1


def test_scan_body():
    r = rng(15)
    arrays = bn_arrays(3, r)
    names = [f"s_{k}" for k in "sbmv"]
    body = helper.make_graph(
        [helper.make_node("Gemm", ["xi", "Wg"], ["g"], transB=1),
         helper.make_node("BatchNormalization", ["g"] + names, ["yi"], name="scan_bn"),
         helper.make_node("Identity", ["st_in"], ["st_out"])],
        "scan_body",
        [helper.make_tensor_value_info("st_in", F32, [1]), helper.make_tensor_value_info("xi", F32, [2, 4])],
        [helper.make_tensor_value_info("st_out", F32, [1]), helper.make_tensor_value_info("yi", F32, [2, 3])],
        [tensor(n, a) for n, a in zip(names, arrays)] + [tensor("Wg", r.standard_normal((3, 4)).astype(np.float32))])
    nodes = [helper.make_node("Scan", ["S", "X"], ["S_out", "Y"], body=body, num_scan_inputs=1, name="scan")]
    m = make_model(nodes, [("S", F32, [1]), ("X", F32, [5, 2, 4])], [("S_out", F32, [1]), ("Y", F32, [5, 2, 3])], opset=17)
    feeds = {"S": np.zeros(1, np.float32), "X": r.standard_normal((5, 2, 4)).astype(np.float32)}
    fold_and_compare(m, feeds=feeds)
