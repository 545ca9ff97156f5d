"""Every producer fold runs before and after on ONNX Runtime and must agree tightly."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import foldkit
from tests.helpers import F32, bn_inits, conv_bn_model, fold_and_compare, make_model, op_count, rng, tensor


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("group", [1, 2, "depthwise"])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn(dims, group, bias):
    if group == "depthwise":
        m = conv_bn_model(dims, group=4, c_in=4, c_out=4, bias=bias)
    else:
        m = conv_bn_model(dims, group=group, bias=bias)
    r = fold_and_compare(m)
    assert op_count(r.model, "Conv") == 1
    assert r.report.actions[0].action == "folded" and "Conv 'conv'" in r.report.actions[0].target


@pytest.mark.parametrize("attrs", [
    {"strides": [2, 2]},
    {"dilations": [2, 2]},
    {"pads": [1, 0, 2, 1]},
    {"auto_pad": "SAME_UPPER"},
    {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
    {"auto_pad": "VALID"},
])
def test_conv_attributes(attrs):
    fold_and_compare(conv_bn_model(2, conv_attrs=attrs, spatial=7))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose_bn(dims, group, bias):
    m = conv_bn_model(dims, group=group, bias=bias, c_in=6, c_out=6 if group != 2 else 4, transpose=True, spatial=3)
    r = fold_and_compare(m)
    assert op_count(r.model, "ConvTranspose") == 1


def test_conv_transpose_unequal_channels_grouped_with_output_padding():
    m = conv_bn_model(2, group=2, c_in=4, c_out=10, transpose=True, spatial=4,
                      conv_attrs={"strides": [2, 2], "output_padding": [1, 1], "pads": [1, 1, 1, 1]})
    fold_and_compare(m)


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, [5], [1, 5], [3, 5], [3, 1], []])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0), (1.5, 0.0)])
def test_gemm_bn(trans_a, trans_b, c_shape, alpha, beta):
    r = rng(3)
    a_shape = [4, 3] if trans_a else [3, 4]
    b_shape = [5, 4] if trans_b else [4, 5]
    inits = [tensor("B", r.standard_normal(b_shape).astype(np.float32))]
    ins = ["A", "B"]
    if c_shape is not None:
        inits.append(tensor("C", r.standard_normal(c_shape).astype(np.float32)))
        ins.append("C")
    names, bn = bn_inits("bn", 5, r)
    nodes = [helper.make_node("Gemm", ins, ["g"], transA=trans_a, transB=trans_b, alpha=alpha, beta=beta),
             helper.make_node("BatchNormalization", ["g"] + names, ["Y"])]
    m = make_model(nodes, [("A", F32, a_shape)], [("Y", F32, None)], inits + bn)
    fold_and_compare(m)


@pytest.mark.parametrize("with_add", [False, True])
@pytest.mark.parametrize("bias_shape", [[5], [1, 5]])
def test_matmul_bn(with_add, bias_shape):
    r = rng(4)
    inits = [tensor("W", r.standard_normal((4, 5)).astype(np.float32))]
    names, bn = bn_inits("bn", 5, r)
    nodes = [helper.make_node("MatMul", ["X", "W"], ["mm"])]
    x = "mm"
    if with_add:
        inits.append(tensor("bias", r.standard_normal(bias_shape).astype(np.float32)))
        nodes.append(helper.make_node("Add", ["mm", "bias"], ["mma"]))
        x = "mma"
    nodes.append(helper.make_node("BatchNormalization", [x] + names, ["Y"], name="bn1d"))
    m = make_model(nodes, [("X", F32, ["N", 4])], [("Y", F32, None)], inits + bn)
    r_ = fold_and_compare(m)
    assert op_count(r_.model, "MatMul") == 1 and op_count(r_.model, "Add") == 1


def test_chain_conv_bn_bn():
    r = rng(5)
    m = conv_bn_model(2)
    names, bn2 = bn_inits("bn2", 6, r)
    m.graph.node[1].output[0] = "mid"
    m.graph.node.append(helper.make_node("BatchNormalization", ["mid"] + names, ["Y"], name="bn2"))
    m.graph.initializer.extend(bn2)
    res = fold_and_compare(m)
    assert [a.action for a in res.report.actions] == ["folded", "folded"]


def test_weights_as_constant_nodes():
    m = conv_bn_model(2)
    g = m.graph
    consts = []
    for t in list(g.initializer):
        consts.append(helper.make_node("Constant", [], [t.name], value=t))
    del g.initializer[:]
    nodes = consts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    r = fold_and_compare(m)
    assert op_count(r.model, "Constant") == 2  # folded weight and bias; BN parameter Constants removed


def test_shared_weight_is_cloned_not_mutated():
    """Two Convs read the same weight; only one has a BN. The other must keep the original weight."""
    r = rng(6)
    w = r.standard_normal((6, 4, 3, 3)).astype(np.float32)
    names, bn = bn_inits("bn", 6, r)
    nodes = [helper.make_node("Conv", ["X", "W"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1"] + names, ["Y1"]),
             helper.make_node("Conv", ["X", "W"], ["Y2"], pads=[1, 1, 1, 1])]
    m = make_model(nodes, [("X", F32, [1, 4, 5, 5])], [("Y1", F32, None), ("Y2", F32, None)], [tensor("W", w)] + bn)
    res = fold_and_compare(m)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in res.model.graph.initializer}
    assert np.array_equal(inits["W"], w)
    assert len([k for k in inits if k.startswith("W")]) == 2


def test_new_names_do_not_collide():
    """The model already holds names foldkit would pick for new tensors."""
    r = rng(7)
    w = r.standard_normal((6, 4, 1, 1)).astype(np.float32)
    names, bn = bn_inits("bn", 6, r)
    taken = [tensor("W_folded", np.ones(1, np.float32)), tensor("conv_bias_folded", np.ones(1, np.float32))]
    nodes = [helper.make_node("Conv", ["X", "W"], ["c1"], name="conv"),
             helper.make_node("BatchNormalization", ["c1"] + names, ["Y1"]),
             helper.make_node("Conv", ["X", "W"], ["Y2"]),
             helper.make_node("Add", ["W_folded", "conv_bias_folded"], ["Y3"])]
    m = make_model(nodes, [("X", F32, [1, 4, 3, 3])], [("Y1", F32, None), ("Y2", F32, None), ("Y3", F32, None)],
                   [tensor("W", w)] + taken + bn)
    res = fold_and_compare(m)
    inits = [t.name for t in res.model.graph.initializer]
    assert len(inits) == len(set(inits))
    assert "W_folded_1" in inits and "conv_bias_folded_1" in inits


@pytest.mark.parametrize("opset", [7, 9, 11, 13, 14, 15, 17, 21])
def test_opsets(opset):
    fold_and_compare(conv_bn_model(2, opset=opset))


def test_ir3_initializers_as_inputs():
    """IR 3 models list every initializer as a graph input; new tensors become Constant nodes."""
    m = conv_bn_model(2, bias=False, opset=8)
    m.ir_version = 3
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    res = fold_and_compare(m, feeds={"X": rng(0).standard_normal((2, 4, 5, 5)).astype(np.float32)})
    assert [i.name for i in res.model.graph.input] == [i.name for i in m.graph.input]


def test_graph_output_names_and_metadata_untouched():
    m = conv_bn_model(2)
    m.doc_string = "doc"
    m.producer_name = "me"
    onnx.helper.set_model_props(m, {"k": "v"})
    m.graph.node.append(helper.make_node("Custom", ["Y"], ["Z"], domain="com.example"))
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    m.graph.output.append(helper.make_tensor_value_info("Z", F32, None))
    res = foldkit.fold(m, verify=False, check=False)
    out = res.model
    assert out.doc_string == "doc" and out.producer_name == "me"
    assert [(p.key, p.value) for p in out.metadata_props] == [("k", "v")]
    assert [o.name for o in out.graph.output] == ["Y", "Z"]
    assert [(o.domain, o.version) for o in out.opset_import] == [(o.domain, o.version) for o in m.opset_import]
    assert out.graph.node[-1].domain == "com.example"


def test_deterministic_and_idempotent():
    m = conv_bn_model(2, group=2)
    a = foldkit.fold(m, verify=False).model.SerializeToString(deterministic=True)
    b = foldkit.fold(m, verify=False).model.SerializeToString(deterministic=True)
    assert a == b
    again = foldkit.fold(onnx.load_from_string(a), verify=False)
    assert again.model.SerializeToString(deterministic=True) == a
    assert again.report.bn_before == 0


def test_verify_reports_errors():
    res = foldkit.fold(conv_bn_model(2))
    v = res.report.verification
    assert v["passed"] and v["backend"] == "onnxruntime-cpu"
    assert 0 <= v["max_abs_err"] <= v["atol"] + v["rtol"] * 100
    assert res.report.bn_before == 1 and res.report.bn_after == 0


# --- chains of per-channel maps fold as one map, rounded once ------------------------------------------

def _conv_bn_mul(dtype, k):
    r = rng(31)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    names, bn = bn_inits("bn", 4, r, dtype)
    return make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4),
                       helper.make_node("BatchNormalization", ["c"] + names, ["b"], name="bn"),
                       helper.make_node("Mul", ["b", "k"], ["y"], name="scale")],
                      [("x", elem, [1, 3, 6, 6])], [("y", elem, None)],
                      [tensor("w", r.standard_normal((4, 3, 3, 3)).astype(dtype)), tensor("k", np.asarray(k, dtype))] + bn)


def test_conv_bn_mul_in_fp16_is_one_map_rounded_once():
    k = (0.3 + rng(32).random((4, 1, 1))).astype(np.float16)
    m = _conv_bn_mul(np.float16, k)
    res = fold_and_compare(m, rtol=5e-3, atol=5e-3)
    assert [n.op_type for n in res.model.graph.node] == ["Conv"]
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
    s = w["bn_scale"] / np.sqrt(w["bn_var"] + 1e-5)
    want = (w["w"] * (s * k.astype(np.float64).reshape(-1))[:, None, None, None]).astype(np.float16)
    got = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    assert np.array_equal(got[res.model.graph.node[0].input[1]], want)
    (mul,) = [a for a in res.report.affine if a.node == "scale"]
    assert mul.action == "folded" and "with the map before it" in mul.reason


def test_a_chain_that_overflows_folds_its_longest_prefix_that_does_not():
    m = _conv_bn_mul(np.float16, np.full((4, 1, 1), 6e4, np.float16))  # BN * 6e4 overflows float16
    res = foldkit.fold(m, verify=False)
    assert [n.op_type for n in res.model.graph.node] == ["Conv", "Mul"]
    assert res.report.bn_after == 0
