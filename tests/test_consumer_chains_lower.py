"""Folds other tools miss: BN into the following op, per-channel Mul/Add chains, BN merges, lowering."""

import numpy as np
import pytest
from onnx import helper

import foldkit
from tests.helpers import F32, bn_inits, fold_and_compare, make_model, op_count, rng, tensor


def bn_then(op_node_fn, c_in=6, x_shape=(2, 6, 7, 7), seed=40, extra_inits=()):
    r = rng(seed)
    names, bn = bn_inits("bn", c_in, r)
    nodes = [helper.make_node("Relu", ["X"], ["r"]),
             helper.make_node("BatchNormalization", ["r"] + names, ["b"], name="bn")] + op_node_fn("b", r)
    inits = bn + [tensor(n, a) for n, a in extra_inits(r)] if callable(extra_inits) else bn
    return nodes, inits, r


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("group", [1, 2, 6])
@pytest.mark.parametrize("attrs", [{}, {"auto_pad": "VALID"}, {"strides": "s2"}, {"dilations": "d2"}])
@pytest.mark.parametrize("bias", [True, False])
def test_bn_into_following_conv(dims, group, attrs, bias):
    r = rng(41)
    names, bn = bn_inits("bn", 6, r)
    c_out = 6 if group == 6 else 4
    w = r.standard_normal((c_out, 6 // group) + (3,) * dims).astype(np.float32)
    inits = bn + [tensor("W", w)]
    ins = ["b", "W"]
    if bias:
        inits.append(tensor("Bc", r.standard_normal(c_out).astype(np.float32)))
        ins.append("Bc")
    kw = {k: v for k, v in attrs.items() if k == "auto_pad"}
    if "strides" in attrs:
        kw["strides"] = [2] * dims
    if "dilations" in attrs:
        kw["dilations"] = [2] * dims
    nodes = [helper.make_node("Relu", ["X"], ["r"]),
             helper.make_node("BatchNormalization", ["r"] + names, ["b"], name="bn"),
             helper.make_node("Conv", ins, ["Y"], group=group, name="conv", **kw)]
    m = make_model(nodes, [("X", F32, [2, 6] + [9] * dims)], [("Y", F32, None)], inits)
    res = fold_and_compare(m, rtol=1e-5, atol=1e-5)
    a = res.report.actions[0]
    assert a.action == "folded" and a.reason == "folded into the following Conv 'conv'"


@pytest.mark.parametrize("attrs", [{"pads": [1, 1, 1, 1]}, {"auto_pad": "SAME_UPPER"}])
def test_bn_into_padded_conv_is_refused(attrs):
    r = rng(42)
    names, bn = bn_inits("bn", 6, r)
    nodes = [helper.make_node("Relu", ["X"], ["r"]),
             helper.make_node("BatchNormalization", ["r"] + names, ["b"], name="bn"),
             helper.make_node("Conv", ["b", "W"], ["Y"], **attrs)]
    m = make_model(nodes, [("X", F32, [1, 6, 5, 5])], [("Y", F32, None)],
                   bn + [tensor("W", r.standard_normal((4, 6, 3, 3)).astype(np.float32))])
    res = foldkit.fold(m, verify=False)
    assert res.report.bn_after == 1
    assert "pads its input with zeros" in res.report.actions[0].reason
    assert res.model.SerializeToString() == m.SerializeToString()


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, [5], [3, 5]])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.7, 1.9)])
def test_bn1d_into_following_gemm(trans_b, c_shape, alpha, beta):
    r = rng(43)
    names, bn = bn_inits("bn", 4, r)
    inits = bn + [tensor("B", r.standard_normal((5, 4) if trans_b else (4, 5)).astype(np.float32))]
    ins = ["b", "B"]
    if c_shape:
        inits.append(tensor("C", r.standard_normal(c_shape).astype(np.float32)))
        ins.append("C")
    nodes = [helper.make_node("Relu", ["X"], ["r"]),
             helper.make_node("BatchNormalization", ["r"] + names, ["b"], name="bn"),
             helper.make_node("Gemm", ins, ["Y"], transB=trans_b, alpha=alpha, beta=beta)]
    m = make_model(nodes, [("X", F32, [3, 4])], [("Y", F32, None)], inits)
    fold_and_compare(m)


def test_gemm_transa_refused():
    r = rng(44)
    names, bn = bn_inits("bn", 4, r)
    nodes = [helper.make_node("Relu", ["X"], ["r"]),
             helper.make_node("BatchNormalization", ["r"] + names, ["b"]),
             helper.make_node("Gemm", ["b", "B"], ["Y"], transA=1)]
    m = make_model(nodes, [("X", F32, [3, 4])], [("Y", F32, None)], bn + [tensor("B", np.ones((4, 5), np.float32))],
                   infer_outputs=False)
    res = foldkit.fold(m, verify=False, check=False)
    assert "transA=1" in res.report.actions[0].reason


@pytest.mark.parametrize("with_add", [False, True])
def test_bn1d_into_following_matmul(with_add):
    r = rng(45)
    names, bn = bn_inits("bn", 4, r)
    nodes = [helper.make_node("Relu", ["X"], ["r"]),
             helper.make_node("BatchNormalization", ["r"] + names, ["b"], name="bn"),
             helper.make_node("MatMul", ["b", "W"], ["mm" if with_add else "Y"], name="mm")]
    inits = bn + [tensor("W", r.standard_normal((4, 5)).astype(np.float32))]
    if with_add:
        nodes.append(helper.make_node("Add", ["mm", "bias"], ["Y"]))
        inits.append(tensor("bias", r.standard_normal(5).astype(np.float32)))
    m = make_model(nodes, [("X", F32, ["N", 4])], [("Y", F32, None)], inits)
    res = fold_and_compare(m)
    assert op_count(res.model, "Add") == 1 and op_count(res.model, "MatMul") == 1


def conv_then_affine(ops, c=6, group=1, bias=True):
    """Conv followed by a chain of (op, const shape, const position) — a decomposed/frozen BN."""
    r = rng(46)
    inits = [tensor("W", r.standard_normal((c, 4 // group, 3, 3)).astype(np.float32))]
    ins = ["X", "W"]
    if bias:
        inits.append(tensor("Bc", r.standard_normal(c).astype(np.float32)))
        ins.append("Bc")
    nodes = [helper.make_node("Conv", ins, ["z0"], group=group, pads=[1, 1, 1, 1], name="conv")]
    cur = "z0"
    for k, (op, shape, const_first) in enumerate(ops):
        val = r.uniform(0.5, 1.5, shape) if op in ("Mul", "Div") else r.normal(0, 1, shape)
        inits.append(tensor(f"k{k}", val.astype(np.float32)))
        out = "Y" if k == len(ops) - 1 else f"z{k + 1}"
        nodes.append(helper.make_node(op, [f"k{k}", cur] if const_first else [cur, f"k{k}"], [out]))
        cur = out
    return make_model(nodes, [("X", F32, [2, 4, 5, 5])], [("Y", F32, None)], inits)


@pytest.mark.parametrize("ops", [
    [("Mul", [6, 1, 1], False), ("Add", [6, 1, 1], False)],  # FrozenBatchNorm2d export
    [("Mul", [1, 6, 1, 1], True), ("Add", [1, 6, 1, 1], True)],
    [("Mul", [], False)],
    [("Add", [1], False)],
    [("Sub", [6, 1, 1], False), ("Div", [6, 1, 1], False)],
    [("Mul", [6, 1, 1], False), ("Mul", [6, 1, 1], False), ("Add", [6, 1, 1], False), ("Sub", [], False)],
])
@pytest.mark.parametrize("bias", [True, False])
def test_affine_chain_into_conv(ops, bias):
    m = conv_then_affine(ops, bias=bias)
    res = foldkit.fold(m, verify=False)
    fold_and_compare(m)
    assert [n.op_type for n in res.model.graph.node] == ["Conv"]
    assert len(res.report.affine) == len(ops) and res.report.bn_before == 0


@pytest.mark.parametrize("shape", [[1, 1, 5, 5], [6, 5, 5], [5]])
def test_non_per_channel_constant_stays(shape):
    m = conv_then_affine([("Mul", shape, False)])
    res = foldkit.fold(m, verify=False)
    assert [n.op_type for n in res.model.graph.node] == ["Conv", "Mul"]
    assert res.model.SerializeToString() == m.SerializeToString()


def test_affine_into_gemm_and_rank3_matmul():
    r = rng(47)
    nodes = [helper.make_node("Gemm", ["A", "B"], ["g"], transB=1),
             helper.make_node("Mul", ["g", "s"], ["g2"]),
             helper.make_node("Add", ["g2", "t"], ["Y1"]),
             helper.make_node("MatMul", ["X3", "W"], ["m"]),
             helper.make_node("Mul", ["m", "s"], ["Y2"])]
    inits = [tensor("B", r.standard_normal((5, 4)).astype(np.float32)), tensor("W", r.standard_normal((4, 5)).astype(np.float32)),
             tensor("s", r.uniform(.5, 2, 5).astype(np.float32)), tensor("t", r.normal(0, 1, (1, 5)).astype(np.float32))]
    m = make_model(nodes, [("A", F32, [3, 4]), ("X3", F32, [2, 3, 4])], [("Y1", F32, None), ("Y2", F32, None)], inits)
    res = fold_and_compare(m)
    assert [n.op_type for n in res.model.graph.node] == ["Gemm", "MatMul"]
    # the shared scale 's' was read by both Muls; it is gone only because both were folded
    assert "s" not in {t.name for t in res.model.graph.initializer}


def test_bn_bn_and_bn_mul_add_merge_then_lower():
    r = rng(48)
    n1, bn1 = bn_inits("bn1", 6, r)
    n2, bn2 = bn_inits("bn2", 6, r)
    nodes = [helper.make_node("BatchNormalization", ["X"] + n1, ["a"], name="bn1"),
             helper.make_node("BatchNormalization", ["a"] + n2, ["b"], name="bn2"),
             helper.make_node("Mul", ["b", "s"], ["c"]),
             helper.make_node("Add", ["c", "t"], ["Y"])]
    inits = bn1 + bn2 + [tensor("s", r.uniform(.5, 2, (6, 1, 1)).astype(np.float32)),
                         tensor("t", r.normal(0, 1, (6, 1, 1)).astype(np.float32))]
    m = make_model(nodes, [("X", F32, [2, 6, 4, 4])], [("Y", F32, None)], inits)
    res = fold_and_compare(m, bn_after=1)
    assert [n.op_type for n in res.model.graph.node] == ["BatchNormalization"]
    acts = {a.node: a.action for a in res.report.actions}
    assert acts == {"bn1": "kept", "bn2": "merged"}
    assert "input 'X' is not computed by a node" in [a for a in res.report.actions if a.node == "bn1"][0].reason
    low = fold_and_compare(m, bn_after=0, lower_standalone=True)
    assert [n.op_type for n in low.model.graph.node] == ["Mul", "Add"]
    assert {a.action for a in low.report.actions} == {"lowered", "merged"}


def test_lower_standalone_fp16():
    r = rng(49)
    names, bn = bn_inits("bn", 6, r, dtype=np.float16)
    nodes = [helper.make_node("Relu", ["X"], ["r"]), helper.make_node("BatchNormalization", ["r"] + names, ["Y"])]
    from onnx import TensorProto
    m = make_model(nodes, [("X", TensorProto.FLOAT16, [1, 6, 3, 3])], [("Y", TensorProto.FLOAT16, None)], bn)
    feeds = {"X": r.standard_normal((1, 6, 3, 3)).astype(np.float16)}
    res = fold_and_compare(m, rtol=4e-3, atol=4e-3, feeds=feeds, lower_standalone=True)
    assert {t.data_type for t in res.model.graph.initializer} == {TensorProto.FLOAT16}


def test_weight_computed_by_pure_ops_folds_and_the_ops_go():
    """Exporters write Linear(bias=False) as MatMul(x, Transpose(W)) and reshape biases: foldkit
    evaluates such pure ops on constants, folds, and removes what became dead."""
    r = rng(50)
    names, bn = bn_inits("bn", 5, r)
    nodes = [helper.make_node("Transpose", ["Wt"], ["W"], perm=[1, 0]),
             helper.make_node("MatMul", ["X", "W"], ["mm"]),
             helper.make_node("BatchNormalization", ["mm"] + names, ["Y"], name="bn"),
             helper.make_node("Unsqueeze", ["b0", "ax"], ["b1"]),
             helper.make_node("Reshape", ["b1", "shp"], ["b2"]),
             helper.make_node("Cast", ["w16"], ["w32"], to=1),
             helper.make_node("Conv", ["Z", "w32", "b2"], ["c"]),
             helper.make_node("BatchNormalization", ["c"] + names, ["Y2"], name="bn2")]
    inits = bn + [tensor("Wt", r.standard_normal((5, 4)).astype(np.float32)),
                  tensor("b0", r.standard_normal(5).astype(np.float32)), tensor("ax", np.array([0], np.int64)),
                  tensor("shp", np.array([5], np.int64)), tensor("w16", r.standard_normal((5, 3, 1, 1)).astype(np.float16))]
    m = make_model(nodes, [("X", F32, [2, 4]), ("Z", F32, [1, 3, 4, 4])], [("Y", F32, None), ("Y2", F32, None)], inits)
    res = fold_and_compare(m)
    assert [n.op_type for n in res.model.graph.node] == ["MatMul", "Add", "Conv"]
    assert not {"Wt", "b0", "w16"} & {t.name for t in res.model.graph.initializer}


def test_computed_weight_read_elsewhere_is_kept():
    r = rng(51)
    names, bn = bn_inits("bn", 5, r)
    nodes = [helper.make_node("Transpose", ["Wt"], ["W"], perm=[1, 0]),
             helper.make_node("MatMul", ["X", "W"], ["mm"]),
             helper.make_node("BatchNormalization", ["mm"] + names, ["Y"]),
             helper.make_node("MatMul", ["X", "W"], ["Y2"])]
    m = make_model(nodes, [("X", F32, [2, 4])], [("Y", F32, None), ("Y2", F32, None)],
                   bn + [tensor("Wt", r.standard_normal((5, 4)).astype(np.float32))])
    res = fold_and_compare(m)
    ops = [n.op_type for n in res.model.graph.node]
    assert ops.count("Transpose") == 1 and "Wt" in {t.name for t in res.model.graph.initializer}
