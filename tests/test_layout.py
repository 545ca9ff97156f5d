"""Per-channel maps folded through layout ops (Transpose, Reshape, Flatten, Squeeze, Unsqueeze), as
exporters other than torch.onnx write them (tf2onnx's NHWC Transposes, Keras Conv1D's Unsqueeze /
Squeeze, Reshape to the conv's own shape, LeViT's Linear + BatchNorm1d over a flattened batch, BN
written out in primitives). Each is built by hand, run on ONNX Runtime before and after, and each
refusal leaves the graph unchanged with its reason."""

import numpy as np
import onnx
import pytest
from onnx import helper

import foldkit
from tests.helpers import F32, assert_close, bn_inits, fold_and_compare, make_model, op_count, ort_run, random_feeds, rng, tensor


def _ops(m):
    return [n.op_type for n in m.graph.node]


def _w(r, *shape):
    return r.standard_normal(shape).astype(np.float32)


def _pos(r, *shape):
    return (0.5 + r.random(shape)).astype(np.float32)


def test_keras_nhwc_conv_transpose_mul_add():  # tf2onnx's default export of Keras 3 MobileNetV3
    r = rng(1)
    m = make_model([helper.make_node("Conv", ["x", "w", "cb"], ["c"], pads=[1] * 4),
                    helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),
                    helper.make_node("Mul", ["t", "s"], ["m"], name="mul"),
                    helper.make_node("Add", ["m", "b"], ["y"], name="add"),
                    helper.make_node("Relu", ["y"], ["out"])],
                   [("x", F32, [1, 3, 6, 6])], [("out", F32, None)],
                   [tensor("w", _w(r, 5, 3, 3, 3)), tensor("cb", _w(r, 5)), tensor("s", _pos(r, 5)), tensor("b", _w(r, 5))])
    res = fold_and_compare(m, rtol=1e-5, atol=1e-5)
    assert _ops(res.model) == ["Conv", "Transpose", "Relu"]
    assert all("through Transpose" in a.reason for a in res.report.affine if a.action == "folded")


def test_raw_nhwc_two_transposes_then_bn():  # tf2onnx without its optimizer
    r = rng(2)
    names, t = bn_inits("bn", 4, r)
    m = make_model([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4),
                    helper.make_node("Transpose", ["c"], ["nhwc"], perm=[0, 2, 3, 1]),
                    helper.make_node("Transpose", ["nhwc"], ["nchw"], perm=[0, 3, 1, 2]),
                    helper.make_node("BatchNormalization", ["nchw"] + names, ["y"], name="bn")],
                   [("x", F32, [2, 3, 5, 5])], [("y", F32, None)], [tensor("w", _w(r, 4, 3, 3, 3))] + t)
    res = fold_and_compare(m, rtol=1e-5, atol=1e-5)
    assert _ops(res.model) == ["Conv", "Transpose", "Transpose"]


def test_reshape_to_its_own_shape_then_bn_relu():  # tf_keras InceptionV3
    r = rng(3)
    names, t = bn_inits("bn", 4, r)
    m = make_model([helper.make_node("Conv", ["x", "w"], ["c"]),
                    helper.make_node("Reshape", ["c", "shape"], ["rs"]),
                    helper.make_node("BatchNormalization", ["rs"] + names, ["b"], name="bn"),
                    helper.make_node("Relu", ["b"], ["y"])],
                   [("x", F32, [1, 3, 6, 6])], [("y", F32, None)],
                   [tensor("w", _w(r, 4, 3, 3, 3)), tensor("shape", np.array([1, 4, 4, 4], np.int64))] + t)
    res = fold_and_compare(m, rtol=1e-5, atol=1e-5)
    assert _ops(res.model) == ["Conv", "Reshape", "Relu"]
    (e,) = res.report.actions
    assert e.action == "folded" and "through Reshape" in e.target


def test_keras_conv1d_unsqueeze_conv_squeeze_mul_add():
    r = rng(4)
    m = make_model([helper.make_node("Unsqueeze", ["x", "ax"], ["u"]),
                    helper.make_node("Conv", ["u", "w"], ["c"], pads=[0, 1, 0, 1]),
                    helper.make_node("Squeeze", ["c", "ax"], ["sq"]),
                    helper.make_node("Mul", ["sq", "s"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
                   [("x", F32, [2, 3, 10])], [("y", F32, None)],
                   [tensor("ax", np.array([2], np.int64)), tensor("w", _w(r, 5, 3, 1, 3)),
                    tensor("s", _pos(r, 1, 5, 1)), tensor("b", _w(r, 1, 5, 1))])
    res = fold_and_compare(m, rtol=1e-5, atol=1e-5)
    assert _ops(res.model) == ["Unsqueeze", "Conv", "Squeeze"]


@pytest.mark.parametrize("flatten", ["Reshape", "Flatten"])
def test_levit_linear_flatten_batchnorm1d_reshape(flatten):
    """timm LeViT's Linear + BatchNorm1d: MatMul + Add over [B, T, C], flattened to [B*T, C] for the BN."""
    r = rng(5)
    names, t = bn_inits("bn", 6, r)
    flat = (helper.make_node("Reshape", ["a", "to2"], ["f"]) if flatten == "Reshape"
            else helper.make_node("Flatten", ["a"], ["f"], axis=2))
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "bias"], ["a"]),
                    flat, helper.make_node("BatchNormalization", ["f"] + names, ["b"], name="bn"),
                    helper.make_node("Reshape", ["b", "to3"], ["y"])],
                   [("x", F32, [2, 7, 4])], [("y", F32, None)],
                   [tensor("w", _w(r, 4, 6)), tensor("bias", _w(r, 6)), tensor("to2", np.array([14, 6], np.int64)),
                    tensor("to3", np.array([2, 7, 6], np.int64))] + t)
    res = fold_and_compare(m, rtol=1e-5, atol=1e-5)  # Flatten(axis=2) of [2, 7, 6] is [14, 6] too
    assert op_count(res.model, "BatchNormalization") == 0 and op_count(res.model, "MatMul") == 1


def test_bn_written_out_in_primitives_on_constants_after_nhwc():  # jax2onnx of a plain-JAX CNN
    """(x - mean) * rsqrt(var + eps) * gamma + beta, with rsqrt computed in the graph from constants."""
    r = rng(6)
    c = 4
    m = make_model([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4),
                    helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),
                    helper.make_node("Sub", ["t", "mean"], ["d"]),
                    helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
                    helper.make_node("Reciprocal", ["sd"], ["rs"]),
                    helper.make_node("Mul", ["d", "rs"], ["n"]), helper.make_node("Mul", ["n", "gamma"], ["g"]),
                    helper.make_node("Add", ["g", "beta"], ["y"])],
                   [("x", F32, [1, 3, 5, 5])], [("y", F32, None)],
                   [tensor("w", _w(r, c, 3, 3, 3)), tensor("mean", _w(r, c)), tensor("var", _pos(r, c)),
                    tensor("eps", np.float32(1e-5)), tensor("gamma", _pos(r, c)), tensor("beta", _w(r, c))])
    res = fold_and_compare(m, rtol=1e-5, atol=1e-5)
    assert _ops(res.model) == ["Conv", "Transpose"]


@pytest.mark.parametrize("case, needle", [
    ("merged channels", "do not stay an axis of their own"),
    ("wrong axis", "not per-channel"),
    ("read twice", "also read"),
])
def test_layout_refusals_leave_the_graph_unchanged(case, needle):
    r = rng(7)
    if case == "merged channels":  # [1, 4, 3, 3] -> [1, 36]: the channels become part of one axis
        mid = [helper.make_node("Reshape", ["c", "shape"], ["l"])]
        extra, const, out_reads = [tensor("shape", np.array([1, 36], np.int64))], _pos(r, 36), []
    elif case == "wrong axis":  # NHWC, but the constant is on the H axis
        mid = [helper.make_node("Transpose", ["c"], ["l"], perm=[0, 2, 3, 1])]
        extra, const, out_reads = [], _pos(r, 3, 1, 1), []
    else:
        mid = [helper.make_node("Transpose", ["c"], ["l"], perm=[0, 2, 3, 1])]
        extra, const, out_reads = [], _pos(r, 4), [helper.make_node("Relu", ["c"], ["z"])]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4)] + mid + \
        [helper.make_node("Mul", ["l", "s"], ["y"], name="mul")] + out_reads
    outs = [("y", F32, None)] + ([("z", F32, None)] if out_reads else [])
    m = make_model(nodes, [("x", F32, [1, 3, 3, 3])], outs, [tensor("w", _w(r, 4, 3, 3, 3)), tensor("s", const)] + extra)
    res = foldkit.fold(m, verify=False)
    assert res.model.SerializeToString() == m.SerializeToString()
    (kept,) = [a for a in res.report.affine if a.node == "mul"]
    assert kept.action == "kept" and needle in kept.reason and kept.code, kept


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.sampled_from(["nhwc", "nchw", "swap_hw", "merge_hw", "split_n", "flat_hw", "unsq", "merge_ch"]),
                      min_size=1, max_size=4), const_axis=st.integers(0, 3), seed=st.integers(0, 10 ** 6))
def test_random_layout_chains_fold_exactly_or_are_left_unchanged(steps, const_axis, seed):
    """Conv -> random layout ops -> Mul/Add by a constant on one axis: folded and equal on ONNX Runtime,
    or byte-identical."""
    r = rng(seed)
    shape = [2, 4, 3, 5]  # N, C, H, W of the Conv output
    ch = 1  # where the channels are (None: merged with other dims), followed by hand for each step
    nodes = [helper.make_node("Conv", ["x", "w"], ["v0"], pads=[1] * 4)]
    inits = [tensor("w", _w(r, 4, 3, 3, 3))]
    for k, step in enumerate(steps):
        src, dst = f"v{k}", f"v{k + 1}"
        if step in ("nhwc", "nchw", "swap_hw"):
            if len(shape) != 4:
                nodes.append(helper.make_node("Identity", [src], [dst]))
                continue
            perm = {"nhwc": [0, 2, 3, 1], "nchw": [0, 3, 1, 2], "swap_hw": [0, 1, 3, 2]}[step]
            nodes.append(helper.make_node("Transpose", [src], [dst], perm=perm))
            shape = [shape[p] for p in perm]
            ch = None if ch is None else perm.index(ch)
        else:
            new = {"merge_hw": shape[:2] + [int(np.prod(shape[2:]))],
                   "split_n": [1] + shape, "flat_hw": [int(np.prod(shape[:-1])), shape[-1]],
                   "unsq": shape + [1], "merge_ch": [shape[0], int(np.prod(shape[1:]))]}[step]
            if ch is not None:
                alone = lambda axes: int(np.prod([shape[a] for a in axes if a != ch])) == 1  # noqa: E731
                ch = {"merge_hw": ch if ch < 2 else (2 if alone(range(2, len(shape))) else None),
                      "split_n": ch + 1, "unsq": ch,
                      "flat_hw": 1 if ch == len(shape) - 1 else (0 if alone(range(len(shape) - 1)) else None),
                      "merge_ch": 0 if ch == 0 else (1 if alone(range(1, len(shape))) else None)}[step]
            inits.append(tensor(f"s{k}", np.array(new, np.int64)))
            nodes.append(helper.make_node("Reshape", [src, f"s{k}"], [dst]))
            shape = new
    rank = len(shape)
    axis = const_axis % rank
    cshape = [1] * rank
    cshape[axis] = shape[axis]
    inits += [tensor("k", _pos(r, *cshape)), tensor("t", _w(r, *cshape))]
    last = f"v{len(steps)}"
    nodes += [helper.make_node("Mul", [last, "k"], ["m"], name="mul"), helper.make_node("Add", ["m", "t"], ["y"], name="add")]
    m = make_model(nodes, [("x", F32, [2, 3, 3, 5])], [("y", F32, None)], inits)
    res = foldkit.fold(m, verify=False)
    feeds = random_feeds(m, rng(seed + 1))
    assert_close(ort_run(m, feeds), ort_run(res.model, feeds), 1e-5, 1e-5)
    if shape[axis] == 1 or ch is not None and axis == ch:  # a scalar, or on the channels' axis: folded
        assert op_count(res.model, "Mul") == op_count(res.model, "Add") == 0, [a.reason for a in res.report.affine]
        onnx.checker.check_model(res.model, full_check=True)
    else:  # refused, with a reason, and nothing changed
        assert res.model.SerializeToString() == m.SerializeToString()
        assert {a.node for a in res.report.affine if a.action == "kept" and a.reason} >= {"mul"}


def test_check_counts_per_channel_ops_as_fk014_warnings(tmp_path):
    """A per-channel Mul/Add that fold folds is a warning naming its target; one it leaves, a warning
    with the reason; the folded model has none. Warnings do not fail the gate unless asked."""
    import json

    from click.testing import CliRunner

    from foldkit.cli import main

    r = rng(8)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4),
             helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("Mul", ["t", "s"], ["m"], name="scale"), helper.make_node("Relu", ["m"], ["a"]),
             helper.make_node("Add", ["a", "b"], ["y"], name="shift")]  # after a Relu: nothing to fold into
    m = make_model(nodes, [("x", F32, [1, 3, 4, 4])], [("y", F32, None)],
                   [tensor("w", _w(r, 4, 3, 3, 3)), tensor("s", _pos(r, 4)), tensor("b", _w(r, 4))])
    p, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(m, str(p))
    res = CliRunner().invoke(main, ["check", str(p), "--format", "json"])
    assert res.exit_code == 0, res.output
    found = {f["node"]: f for f in json.loads(res.output)["models"][0]["findings"]}
    assert set(found) == {"scale", "shift"} and {f["code"] for f in found.values()} == {"FK014"}
    assert "can be folded into the preceding Conv" in found["scale"]["message"]
    assert "per-channel op left" in found["shift"]["message"] and "Relu" in found["shift"]["message"]
    assert CliRunner().invoke(main, ["check", str(p), "--fail-on", "warning"]).exit_code == 1
    assert CliRunner().invoke(main, ["fold", str(p), "-o", str(out), "-q"]).exit_code == 0
    res = CliRunner().invoke(main, ["check", str(out), "--format", "json"])
    assert [f["node"] for f in json.loads(res.output)["models"][0]["findings"]] == ["shift"]


@pytest.mark.parametrize("pads, shift", [(0, True), (1, False), (1, True)])
def test_decomposed_bn_before_a_conv_folds_into_it_under_the_padding_rule(pads, shift):
    """Relu -> Mul[1,C,1,1] (-> Add[1,C,1,1]) -> Conv: a shift needs a Conv without padding (the
    padded zeros would not be shifted); a pure scale folds into any Conv."""
    r = rng(9)
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Mul", ["a", "s"], ["m"], name="scale")]
    inits = [tensor("s", _pos(r, 1, 3, 1, 1)), tensor("w", _w(r, 4, 3, 3, 3))]
    if shift:
        nodes.append(helper.make_node("Add", ["m", "b"], ["mb"], name="shift"))
        inits.append(tensor("b", _w(r, 1, 3, 1, 1)))
    nodes.append(helper.make_node("Conv", ["mb" if shift else "m", "w"], ["y"], pads=[pads] * 4))
    m = make_model(nodes, [("x", F32, [1, 3, 6, 6])], [("y", F32, None)], inits)
    res = foldkit.fold(m, verify=False)
    feeds = random_feeds(m, rng(10))
    assert_close(ort_run(m, feeds), ort_run(res.model, feeds), 1e-5, 1e-5)
    if pads and shift:
        assert res.model.SerializeToString() == m.SerializeToString()
        kept = {a.node: a.reason for a in res.report.affine if a.action == "kept"}
        assert "pads its input with zeros" in kept["scale"]
    else:
        assert _ops(res.model) == ["Relu", "Conv"]
        assert all("following Conv" in a.reason for a in res.report.affine)


def test_levit_linear_without_bias_flatten_bn_reshape():
    """timm LeViT's LinearNorm: a bias-free Linear [B, T, K] @ [K, C], flattened for BatchNorm1d: the
    scale goes into the MatMul, the shift becomes an Add where the BN was."""
    r = rng(11)
    names, t = bn_inits("bn", 6, r)
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["mm"]),
                    helper.make_node("Flatten", ["mm"], ["f"], axis=2),
                    helper.make_node("BatchNormalization", ["f"] + names, ["b"], name="bn"),
                    helper.make_node("Reshape", ["b", "to3"], ["y"])],
                   [("x", F32, [2, 7, 4])], [("y", F32, None)],
                   [tensor("w", _w(r, 4, 6)), tensor("to3", np.array([2, 7, 6], np.int64))] + t)
    res = fold_and_compare(m, rtol=1e-5, atol=1e-5)
    assert _ops(res.model) == ["MatMul", "Flatten", "Add", "Reshape"]


def test_reshape_to_a_shape_the_graph_computes():
    """FastViT's attention: x.reshape(B, C, -1) with B, C read by Shape -> Slice: shape inference
    with data propagation tells the dims, and the layer scale after it folds through."""
    r = rng(12)
    m = make_model([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4),
                    helper.make_node("Shape", ["c"], ["shape"]),
                    helper.make_node("Slice", ["shape", "zero", "two"], ["bc"]),
                    helper.make_node("Concat", ["bc", "minus1"], ["target"], axis=0),
                    helper.make_node("Reshape", ["c", "target"], ["flat"]),
                    helper.make_node("Mul", ["flat", "ls"], ["y"], name="layer_scale")],
                   [("x", F32, [1, 3, 3, 3])], [("y", F32, None)],
                   [tensor("w", _w(r, 4, 3, 3, 3)), tensor("zero", np.array([0], np.int64)),
                    tensor("two", np.array([2], np.int64)), tensor("minus1", np.array([-1], np.int64)),
                    tensor("ls", _pos(r, 4, 1))])
    res = fold_and_compare(m, rtol=1e-5, atol=1e-5)
    assert "Mul" not in _ops(res.model)


def test_fastvit_attention_prenorm_folds_into_qkv_through_reshape_and_transpose():
    """BN(x) read by Shape (B, C, H, W = x.shape) and flattened to [B, C, N], transposed to [B, N, C],
    then qkv = x @ W: the BN folds into W (and a bias Add), the Shape reads the BN's input."""
    r = rng(13)
    names, t = bn_inits("bn", 4, r)
    m = make_model([helper.make_node("BatchNormalization", ["x"] + names, ["n"], name="norm"),
                    helper.make_node("Shape", ["n"], ["shape"]),
                    helper.make_node("Reshape", ["n", "to"], ["f"]),
                    helper.make_node("Transpose", ["f"], ["tr"], perm=[0, 2, 1]),
                    helper.make_node("MatMul", ["tr", "w"], ["qkv"]),
                    helper.make_node("Cast", ["shape"], ["y2"], to=onnx.TensorProto.FLOAT)],
                   [("x", F32, [2, 4, 3, 3])], [("qkv", F32, None), ("y2", F32, None)],
                   [tensor("to", np.array([2, 4, 9], np.int64)), tensor("w", _w(r, 4, 12))] + t)
    res = fold_and_compare(m, rtol=1e-5, atol=1e-5)
    assert "BatchNormalization" not in _ops(res.model)
    (e,) = res.report.actions
    assert "through Reshape" in e.target and "Transpose" in e.target


def test_a_map_before_a_flatten_that_merges_its_channels_stays():
    r = rng(14)
    names, t = bn_inits("bn", 4, r)
    m = make_model([helper.make_node("BatchNormalization", ["x"] + names, ["n"], name="norm"),
                    helper.make_node("Flatten", ["n"], ["f"], axis=1),
                    helper.make_node("Gemm", ["f", "w"], ["y"])],
                   [("x", F32, [2, 4, 3, 3])], [("y", F32, None)], [tensor("w", _w(r, 36, 5))] + t)
    res = foldkit.fold(m, verify=False)
    assert res.model.SerializeToString() == m.SerializeToString()
    (e,) = res.report.actions
    assert e.action == "kept" and "not one axis of their own" in e.reason


def test_a_per_channel_scale_before_a_3d_matmul_folds_into_it():
    r = rng(15)
    m = make_model([helper.make_node("Mul", ["x", "s"], ["m"], name="scale"),
                    helper.make_node("Add", ["m", "b"], ["a"], name="shift"),
                    helper.make_node("MatMul", ["a", "w"], ["y"])],
                   [("x", F32, [2, 5, 4])], [("y", F32, None)],
                   [tensor("s", _pos(r, 4)), tensor("b", _w(r, 4)), tensor("w", _w(r, 4, 6))])
    res = fold_and_compare(m, rtol=1e-5, atol=1e-5)
    assert _ops(res.model) == ["MatMul", "Add"]


def test_an_attention_scale_and_a_bias_after_a_flatten_are_not_listed_as_maps_left():
    """q @ k^T * scale has no weights to fold into, and an Add after MatMul -> Flatten (with a Shape
    reader, reshape_as) is the MatMul's bias: neither is a per-channel map left."""
    r = rng(16)
    m = make_model([helper.make_node("MatMul", ["q", "k"], ["att"]),
                    helper.make_node("Mul", ["att", "scale"], ["y1"], name="attn_scale"),
                    helper.make_node("MatMul", ["x", "w"], ["mm"]),
                    helper.make_node("Shape", ["mm"], ["shape"]),
                    helper.make_node("Flatten", ["mm"], ["f"], axis=2),
                    helper.make_node("Add", ["f", "b"], ["fb"], name="bias"),
                    helper.make_node("Reshape", ["fb", "shape"], ["y2"])],
                   [("q", F32, [2, 3, 4]), ("k", F32, [2, 4, 3]), ("x", F32, [2, 7, 4])],
                   [("y1", F32, None), ("y2", F32, None)],
                   [tensor("scale", np.float32(0.5)), tensor("w", _w(r, 4, 6)), tensor("b", _w(r, 6))])
    res = foldkit.fold(m, verify=False)
    assert res.model.SerializeToString() == m.SerializeToString()
    assert [a.node for a in res.report.affine if a.action == "kept"] == []
