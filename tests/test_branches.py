"""Parallel branches merged into one op (RepVGG, MobileOne, ...): built by hand for each case, run on
ONNX Runtime before and after, and every refusal leaving the graph unchanged with its reason."""

import numpy as np
import onnx
import pytest
from onnx import helper

import foldkit
from tests.helpers import F32, bn_inits, fold_and_compare, make_model, op_count, repvgg_block, rng, tensor


def _merged(result, convs=1):
    m = result.model
    assert op_count(m, "Conv") == convs and op_count(m, "Add") == 0 and op_count(m, "BatchNormalization") == 0
    (b,) = [a for a in result.report.branches if a.action == "merged"]
    return b


@pytest.mark.parametrize("identity", ["bn", "x", None])
def test_repvgg_block_3x3_1x1_identity_becomes_one_conv(identity):
    res = fold_and_compare(repvgg_block(identity=identity), rtol=1e-5, atol=1e-5)
    b = _merged(res)
    assert b.target == "Conv 'conv0'" and "[3x3]" in b.reason and "[1x1]" in b.reason
    if identity == "bn":
        (e,) = [a for a in res.report.actions if a.node == "bn_identity"]
        assert e.action == "folded" and e.target == "Conv 'conv0'"
    assert res.report.bn_after == 0


def test_mobileone_several_kxk_branches_with_biases():
    res = fold_and_compare(repvgg_block(extra_3x3=3, bias=True), rtol=1e-5, atol=1e-5)
    assert "6 parallel branches" in _merged(res).reason


@pytest.mark.parametrize("group", [2, 8])  # grouped, depthwise
def test_grouped_and_depthwise(group):
    fold_and_compare(repvgg_block(group=group), rtol=1e-5, atol=1e-5)
    assert _merged(foldkit.fold(repvgg_block(group=group), verify=False))


def test_strided_block_without_identity_and_dilated_with_identity():
    _merged(fold_and_compare(repvgg_block(stride=2, identity=None), rtol=1e-5, atol=1e-5))
    _merged(fold_and_compare(repvgg_block(dilation=2), rtol=1e-5, atol=1e-5))
    _merged(fold_and_compare(repvgg_block(k=5, extra_3x3=0), rtol=1e-5, atol=1e-5))


def test_channel_change_without_identity():
    _merged(fold_and_compare(repvgg_block(c_in=4, c_out=8, identity=None), rtol=1e-5, atol=1e-5))


def test_fp16_merges_in_float64_rounded_once():
    m = repvgg_block(dtype=np.float16)
    res = fold_and_compare(m, rtol=5e-3, atol=5e-3)
    _merged(res)


def _unchanged_with_reason(m, needle):
    res = foldkit.fold(m, verify=False, skip=["producer"])  # no folds: the branch structure as built
    before = foldkit.fold(m, verify=False, skip=["producer", "branches"]).model.SerializeToString()
    assert res.model.SerializeToString() == before
    kept = [b for b in res.report.branches if b.action == "kept"]
    assert kept and needle in kept[0].reason, [b.reason for b in res.report.branches]


def _conv_sum(kernels_pads, strides=((1, 1), (1, 1)), groups=(1, 1), read_elsewhere=False, c=4):
    r = rng(3)
    nodes, inits = [], []
    for n, ((k, p), s, g) in enumerate(zip(kernels_pads, strides, groups)):
        inits.append(tensor(f"w{n}", r.standard_normal((c, c // g, k, k)).astype(np.float32)))
        nodes.append(helper.make_node("Conv", ["x", f"w{n}"], [f"c{n}"], name=f"conv{n}", pads=[p] * 4,
                                      strides=list(s), group=g))
    nodes.append(helper.make_node("Add", ["c0", "c1"], ["y"], name="add"))
    outputs = [("y", F32, None)]
    if read_elsewhere:
        nodes.append(helper.make_node("Relu", ["c1"], ["z"], name="relu"))
        outputs.append(("z", F32, None))
    return make_model(nodes, [("x", F32, [1, c, 8, 8])], outputs, inits)


@pytest.mark.parametrize("case, needle", [
    ("strides", "differ in group, strides"),
    ("groups", "differ in group, strides"),
    ("not centred", "not centred"),
    ("odd difference", "odd difference"),
    ("read elsewhere", "also read by 1 other node"),
])
def test_refusals_leave_the_graph_unchanged_with_a_reason(case, needle):
    m = {
        "strides": lambda: _conv_sum([(3, 1), (1, 0)], strides=((1, 1), (2, 2))),
        "groups": lambda: _conv_sum([(3, 1), (1, 0)], groups=(1, 2)),
        "not centred": lambda: _conv_sum([(3, 1), (1, 1)]),
        "odd difference": lambda: _conv_sum([(3, 1), (2, 0)]),
        "read elsewhere": lambda: _conv_sum([(3, 1), (1, 0)], read_elsewhere=True),
    }[case]()
    _unchanged_with_reason(m, needle)


def test_residual_add_of_two_paths_is_not_touched():
    r = rng(1)
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], name="c0", pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["ra"]),
             helper.make_node("Conv", ["ra", "w1"], ["b"], name="c1", pads=[1] * 4),
             helper.make_node("Add", ["b", "x"], ["y"], name="residual")]
    inits = [tensor("w0", r.standard_normal((4, 4, 3, 3)).astype(np.float32)),
             tensor("w1", r.standard_normal((4, 4, 3, 3)).astype(np.float32))]
    m = make_model(nodes, [("x", F32, [1, 4, 6, 6])], [("y", F32, None)], inits)
    res = foldkit.fold(m, verify=False)
    assert res.model.SerializeToString() == m.SerializeToString() and not res.report.branches


def test_conv_plus_its_own_input_is_merged():  # y = Conv(x) + x: one Conv with the identity added
    r = rng(2)
    m = make_model([helper.make_node("Conv", ["x", "w"], ["a"], name="c", pads=[1] * 4),
                    helper.make_node("Add", ["a", "x"], ["y"], name="add")],
                   [("x", F32, [1, 4, 6, 6])], [("y", F32, None)],
                   [tensor("w", r.standard_normal((4, 4, 3, 3)).astype(np.float32))])
    _merged(fold_and_compare(m, rtol=1e-5, atol=1e-5))


def test_sum_node_and_matmul_and_gemm_branches():
    r = rng(4)
    m = make_model([helper.make_node("MatMul", ["x", "w0"], ["a"], name="m0"),
                    helper.make_node("MatMul", ["x", "w1"], ["b"], name="m1"),
                    helper.make_node("Sum", ["a", "b", "x"], ["y"], name="sum")],
                   [("x", F32, [3, 6])], [("y", F32, None)],
                   [tensor("w0", r.standard_normal((6, 6)).astype(np.float32)),
                    tensor("w1", r.standard_normal((6, 6)).astype(np.float32))])
    res = fold_and_compare(m, rtol=1e-5, atol=1e-5)
    assert op_count(res.model, "MatMul") == 1 and op_count(res.model, "Sum") == 0
    names, t = bn_inits("bn", 6, r)
    g = make_model([helper.make_node("Gemm", ["x", "w0", "c0"], ["a"], name="g0", transB=1, alpha=0.5, beta=2.0),
                    helper.make_node("Gemm", ["x", "w1"], ["b"], name="g1"),
                    helper.make_node("BatchNormalization", ["x"] + names, ["n"], name="bn"),
                    helper.make_node("Add", ["a", "b"], ["ab"]), helper.make_node("Add", ["ab", "n"], ["y"])],
                   [("x", F32, [3, 6])], [("y", F32, None)],
                   [tensor("w0", r.standard_normal((6, 6)).astype(np.float32)),
                    tensor("c0", r.standard_normal(6).astype(np.float32)),
                    tensor("w1", r.standard_normal((6, 6)).astype(np.float32))] + t)
    res = fold_and_compare(g, rtol=1e-5, atol=1e-5)
    assert op_count(res.model, "Gemm") == 1 and op_count(res.model, "Add") == 0


def test_conv_transpose_branches():
    r = rng(5)
    nodes, inits = [], []
    for n, (k, p) in enumerate([(3, 1), (1, 0)]):
        inits.append(tensor(f"w{n}", r.standard_normal((4, 3, k, k)).astype(np.float32)))
        nodes.append(helper.make_node("ConvTranspose", ["x", f"w{n}"], [f"c{n}"], name=f"ct{n}", pads=[p] * 4))
    nodes.append(helper.make_node("Add", ["c0", "c1"], ["y"]))
    m = make_model(nodes, [("x", F32, [1, 4, 5, 5])], [("y", F32, None)], inits)
    res = fold_and_compare(m, rtol=1e-5, atol=1e-5)
    assert op_count(res.model, "ConvTranspose") == 1


def test_skip_branches_and_check_reports_fk009(tmp_path):
    from click.testing import CliRunner

    from foldkit.cli import main

    m = repvgg_block()
    res = foldkit.fold(m, verify=False, skip=["branches"])
    assert op_count(res.model, "Conv") == 2 and res.report.bn_after == 1
    p = tmp_path / "m.onnx"
    onnx.save(res.model, str(p))
    r = CliRunner().invoke(main, ["check", str(p), "--format", "json"])
    import json

    codes = [f["code"] for f in json.loads(r.output)["models"][0]["findings"]]
    assert "FK009" in codes and "FK001" in codes  # the identity BN folds only by merging


def test_merge_is_deterministic_and_idempotent():
    m = repvgg_block(extra_3x3=1)
    a = foldkit.fold(m, verify=False).model
    b = foldkit.fold(m, verify=False).model
    assert a.SerializeToString() == b.SerializeToString()
    again = foldkit.fold(a, verify=False)
    assert again.model.SerializeToString() == a.SerializeToString()


@pytest.mark.parametrize("opset", [11, 17])  # axes as attributes, axes as inputs
def test_stack_and_sum_as_torch_exports_it(opset):
    """torch.stack([bn(x), conv1x1(x), conv3x3(x)]).sum(0): Unsqueeze each, Concat, ReduceSum."""
    r = rng(6)
    c = 4
    names, t = bn_inits("bn", c, r)
    inits = [tensor("w0", r.standard_normal((c, 1, 3, 3)).astype(np.float32)),
             tensor("w1", r.standard_normal((c, 1, 1, 1)).astype(np.float32))] + t
    nodes = [helper.make_node("BatchNormalization", ["x"] + names, ["b0"], name="bn"),
             helper.make_node("Conv", ["x", "w0"], ["b1"], name="dw3", pads=[1] * 4, group=c),
             helper.make_node("Conv", ["x", "w1"], ["b2"], name="dw1", group=c)]
    if opset >= 13:
        inits.append(tensor("zero", np.array([0], dtype=np.int64)))
    for k in range(3):
        extra = {"axes": [0]} if opset < 13 else {}
        nodes.append(helper.make_node("Unsqueeze", [f"b{k}"] + (["zero"] if opset >= 13 else []), [f"u{k}"], **extra))
    nodes.append(helper.make_node("Concat", ["u0", "u1", "u2"], ["cat"], axis=0))
    extra = {"axes": [0]} if opset < 13 else {}
    nodes.append(helper.make_node("ReduceSum", ["cat"] + (["zero"] if opset >= 13 else []), ["y"], keepdims=0, **extra))
    m = make_model(nodes, [("x", F32, [2, c, 6, 6])], [("y", F32, None)], inits, opset=opset)
    res = fold_and_compare(m, rtol=1e-5, atol=1e-5)
    assert op_count(res.model, "Conv") == 1 and len(res.model.graph.node) == 1
    keep = make_model([n for n in nodes[:-1]] + [helper.make_node(
        "ReduceSum", ["cat"] + (["zero"] if opset >= 13 else []), ["y"], keepdims=1, **extra)],
        [("x", F32, [2, c, 6, 6])], [("y", F32, None)], inits, opset=opset)
    assert op_count(foldkit.fold(keep, verify=False).model, "ReduceSum") == 1  # keepdims=1 is not a plain sum


def test_refused_when_a_weight_is_not_constant_or_the_merge_overflows():
    r = rng(7)
    m = make_model([helper.make_node("Conv", ["x", "w0"], ["a"], name="c0", pads=[1] * 4),
                    helper.make_node("Conv", ["x", "w1"], ["b"], name="c1"),
                    helper.make_node("Add", ["a", "b"], ["y"], name="add")],
                   [("x", F32, [1, 4, 6, 6]), ("w1", F32, [4, 4, 1, 1])], [("y", F32, None)],
                   [tensor("w0", r.standard_normal((4, 4, 3, 3)).astype(np.float32))])
    _unchanged_with_reason(m, "'w1' is not a constant initializer")
    big = np.full((4, 4, 3, 3), 40000, dtype=np.float16)
    h = make_model([helper.make_node("Conv", ["x", "w0"], ["a"], name="c0", pads=[1] * 4),
                    helper.make_node("Conv", ["x", "w1"], ["b"], name="c1", pads=[1] * 4),
                    helper.make_node("Add", ["a", "b"], ["y"], name="add")],
                   [("x", helper.np_dtype_to_tensor_dtype(np.dtype(np.float16)), [1, 4, 6, 6])],
                   [("y", helper.np_dtype_to_tensor_dtype(np.dtype(np.float16)), None)],
                   [tensor("w0", big), tensor("w1", big)])
    _unchanged_with_reason(h, "overflows float16")


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kernels=st.lists(st.sampled_from([1, 2, 3, 5]), min_size=1, max_size=3),
       shifts=st.lists(st.sampled_from([0, 0, 0, 1]), min_size=3, max_size=3), stride=st.sampled_from([1, 2]),
       dilation=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 4]),
       identity=st.sampled_from([None, "bn", "x"]), seed=st.integers(0, 10 ** 6))
def test_random_branch_structures_merge_exactly_or_are_left_unchanged(kernels, shifts, stride, dilation, group,
                                                                    identity, seed):
    """Any sum of Convs of one x (any kernel, padding, stride, dilation, group) plus an identity or BN
    branch: either merged and equal on ONNX Runtime, or refused and byte-identical."""
    from tests.helpers import assert_close, ort_run, random_feeds

    r = rng(seed)
    c, h = 4, 9
    out_hw = None
    nodes, inits, names = [], [], []
    for n, k in enumerate(kernels):
        p = dilation * (k - 1) // 2 + shifts[n]  # "same" padding, sometimes off by one: refusals too
        hw = (h + 2 * p - dilation * (k - 1) - 1) // stride + 1
        if hw < 1 or (out_hw is not None and hw != out_hw):
            return  # not a valid sum: the shapes differ
        out_hw = hw
        inits.append(tensor(f"w{n}", r.standard_normal((c, c // group, k, k)).astype(np.float32)))
        nodes.append(helper.make_node("Conv", ["x", f"w{n}"], [f"c{n}"], pads=[p] * 4, strides=[stride] * 2,
                                      dilations=[dilation] * 2, group=group))
        names.append(f"c{n}")
    if identity is not None:
        if out_hw != h:
            return
        if identity == "bn":
            bn_names, bn = bn_inits("bn", c, r)
            inits += bn
            nodes.append(helper.make_node("BatchNormalization", ["x"] + bn_names, ["id"]))
            names.append("id")
        else:
            names.append("x")
    if len(names) < 2:
        return
    nodes.append(helper.make_node("Sum", names, ["y"]))
    m = make_model(nodes, [("x", F32, [1, c, h, h])], [("y", F32, None)], inits)
    res = foldkit.fold(m, verify=False)
    feeds = random_feeds(m, rng(seed + 1))
    if any(b.action == "merged" for b in res.report.branches):
        assert op_count(res.model, "Sum") == 0
        assert_close(ort_run(m, feeds), ort_run(res.model, feeds), 1e-5, 1e-5)
    else:
        assert res.model.SerializeToString() == m.SerializeToString() or res.report.bn_after == 0
        assert_close(ort_run(m, feeds), ort_run(res.model, feeds), 1e-5, 1e-5)


# --- asymmetric kernels (ACNet, SINet) ----------------------------------------------------------------

def _asym(kernels, c=4, h=9, bn=True, seed=5, pads=None):
    """Sum of Convs (each + BN) of one x with per-dim kernel shapes, each centred ('same' padding)."""
    r = rng(seed)
    nodes, inits, names = [], [], []
    for n, k in enumerate(kernels):
        p = pads[n] if pads else [(kk - 1) // 2 for kk in k] * 2
        inits.append(tensor(f"w{n}", (r.standard_normal((c, c) + tuple(k)) * 0.3).astype(np.float32)))
        nodes.append(helper.make_node("Conv", ["x", f"w{n}"], [f"c{n}"], name=f"conv{n}", pads=list(p)))
        out = f"c{n}"
        if bn:
            bn_names, t = bn_inits(f"bn{n}", c, r)
            inits += t
            nodes.append(helper.make_node("BatchNormalization", [out] + bn_names, [f"b{n}"], name=f"bn{n}"))
            out = f"b{n}"
        names.append(out)
    nodes.append(helper.make_node("Sum", names, ["y"], name="sum"))
    return make_model(nodes, [("x", F32, [1, c, h, h])], [("y", F32, None)], inits)


def test_sinet_1x5_plus_5x1_is_left_with_its_cost_unless_asked():
    """pytorchcv's sinet_cityscapes sums 1x5 + 5x1 (and 1x3 + 3x1) on one input: foldkit crashed with
    StopIteration looking for a branch of the merged size. A 5x5 costs 25 multiply-adds per output
    where the branches take 10: left, with the reason; merged when asked, and exact either way."""
    m = _asym([(1, 5), (5, 1)])
    res = fold_and_compare(m)  # the BNs fold into their convs; both convs stay
    assert op_count(res.model, "Conv") == 2
    (kept,) = [b for b in res.report.branches if b.action == "kept"]
    assert "multiply-adds" in kept.reason and "25" in kept.reason and "10" in kept.reason and kept.code, kept
    asked = fold_and_compare(m, merge_larger_kernels=True)
    assert op_count(asked.model, "Conv") == 1 and op_count(asked.model, "Sum") == 0
    (conv,) = [n for n in asked.model.graph.node if n.op_type == "Conv"]
    w = next(t for t in asked.model.graph.initializer if t.name == conv.input[1])
    assert list(w.dims[2:]) == [5, 5]


def test_acnet_3x3_1x3_3x1_becomes_one_3x3():
    res = fold_and_compare(_asym([(3, 3), (1, 3), (3, 1)]))
    _merged(res)


def test_asymmetric_kernels_merge_into_the_first_branch_when_no_costlier():
    """3x1 + 1x3 + 3x1 + 1x3: no branch is 3x3, and one 3x3 (9) costs less than the four (12)."""
    res = fold_and_compare(_asym([(3, 1), (1, 3), (3, 1), (1, 3)]))
    _merged(res)
    (conv,) = [n for n in res.model.graph.node if n.op_type == "Conv"]
    w = next(t for t in res.model.graph.initializer if t.name == conv.input[1])
    assert list(w.dims[2:]) == [3, 3]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kernels=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=2, max_size=4),
       off=st.lists(st.sampled_from([0, 0, 0, 1]), min_size=4, max_size=4), larger=st.booleans(),
       seed=st.integers(0, 10 ** 6))
def test_random_kernel_shapes_per_dim_never_crash(kernels, off, larger, seed):
    """Any kernel shape per dim (odd and even, asymmetric), padded 'same' or off by one: merged and
    equal on ONNX Runtime, or left with a reason; never an exception."""
    from tests.helpers import assert_close, ort_run, random_feeds

    h = 9
    pads, sizes = [], set()
    for n, (kh, kw) in enumerate(kernels):
        p = [(kh - 1) // 2 + off[n], (kw - 1) // 2, kh - 1 - (kh - 1) // 2 + off[n], kw - 1 - (kw - 1) // 2]
        pads.append(p)
        sizes.add((h + p[0] + p[2] - kh + 1, h + p[1] + p[3] - kw + 1))
    if len(sizes) != 1:
        return  # not a valid sum: the output shapes differ
    m = _asym(kernels, bn=False, seed=seed, pads=pads)
    res = foldkit.fold(m, verify=False, merge_larger_kernels=larger)
    feeds = random_feeds(m, rng(seed + 1))
    assert_close(ort_run(m, feeds), ort_run(res.model, feeds), 1e-5, 1e-5)
    if not any(b.action == "merged" for b in res.report.branches):
        assert res.model.SerializeToString() == m.SerializeToString()
        assert all(b.reason and b.code for b in res.report.branches if b.action == "kept")


# --- linear combinations: Sub, layer scales, affine ops inside the tree (FastViT, RepViT) -----------------

def _repmixer(c=6, h=8, ls="channel", order="mixer-norm", mixer_bn=True, seed=21, ls_op="Mul", dtype=np.float32):
    """FastViT's RepMixer, unmerged: x + ls * (BN(DWConv(x)) + BN(DWConv1x1(x)) - BN(x))."""
    r = rng(seed)
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inits = [], []
    for n, k in enumerate((3, 1)):
        inits.append(tensor(f"w{n}", (r.standard_normal((c, 1, k, k)) * 0.5).astype(dtype)))
        nodes.append(helper.make_node("Conv", ["x", f"w{n}"], [f"c{n}"], name=f"dw{n}", group=c, pads=[k // 2] * 4))
        out = f"c{n}"
        if mixer_bn:
            names, t = bn_inits(f"bn{n}", c, r, dtype)
            inits += t
            nodes.append(helper.make_node("BatchNormalization", [out] + names, [f"b{n}"], name=f"bn{n}"))
            out = f"b{n}"
    nodes.append(helper.make_node("Add", ["c0" if not mixer_bn else "b0", "c1" if not mixer_bn else "b1"], ["mixer"],
                                  name="mixer_add"))
    names, t = bn_inits("norm", c, r, dtype)
    inits += t
    nodes.append(helper.make_node("BatchNormalization", ["x"] + names, ["norm"], name="norm"))
    a, b = ("mixer", "norm") if order == "mixer-norm" else ("norm", "mixer")
    nodes.append(helper.make_node("Sub", [a, b], ["diff"], name="sub"))
    shape = {"channel": (c, 1, 1), "scalar": (), "4d": (1, c, 1, 1)}[ls]
    v = (0.5 + r.random(shape)).astype(dtype)
    inits.append(tensor("ls", v if ls_op == "Mul" else 1 / v))
    nodes.append(helper.make_node(ls_op, ["diff", "ls"], ["scaled"], name="layer_scale"))
    nodes.append(helper.make_node("Add", ["x", "scaled"], ["y"], name="residual"))
    nodes.append(helper.make_node("Relu", ["y"], ["out"], name="act"))
    return make_model(nodes, [("x", elem, [1, c, h, h])], [("out", elem, None)], inits)


@pytest.mark.parametrize("ls, order, ls_op", [("channel", "mixer-norm", "Mul"), ("scalar", "mixer-norm", "Mul"),
                                              ("4d", "norm-mixer", "Mul"), ("channel", "mixer-norm", "Div")])
@pytest.mark.parametrize("mixer_bn", [True, False])
def test_fastvit_repmixer_becomes_one_conv(ls, order, ls_op, mixer_bn):
    m = _repmixer(ls=ls, order=order, ls_op=ls_op, mixer_bn=mixer_bn)
    res = fold_and_compare(m, rtol=1e-5, atol=1e-5)
    assert op_count(res.model, "Conv") == 1 and op_count(res.model, "Sub") == 0
    assert op_count(res.model, "Mul") == op_count(res.model, "Div") == op_count(res.model, "Add") == 0
    (b,) = [a for a in res.report.branches if a.action == "merged"]
    assert "identity 'x'" in b.reason and "Sub" in b.reason and b.target == "Conv 'dw0'"
    (norm,) = [a for a in res.report.actions if a.node == "norm"]
    assert norm.action == "folded" and norm.target == "Conv 'dw0'"


def test_repmixer_in_fp16_merges_in_float64_rounded_once():
    m = _repmixer(dtype=np.float16)
    res = fold_and_compare(m, rtol=5e-3, atol=5e-3)
    assert op_count(res.model, "Conv") == 1
    # the merged kernel is the float64 combination rounded once to float16
    w = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}

    def bn(p):
        s = w[f"{p}_scale"].astype(np.float64) / np.sqrt(w[f"{p}_var"].astype(np.float64) + 1e-5)
        return s, w[f"{p}_B"].astype(np.float64) - w[f"{p}_mean"].astype(np.float64) * s
    (s0, _), (s1, _), (sn, _) = bn("bn0"), bn("bn1"), bn("norm")
    ls = w["ls"].astype(np.float64).reshape(-1)
    k = w["w0"].astype(np.float64) * s0[:, None, None, None]
    k[:, :, 1:2, 1:2] += w["w1"].astype(np.float64) * s1[:, None, None, None]
    k = k * ls[:, None, None, None]
    k[:, 0, 1, 1] += 1 - ls * sn
    got = {t.name: onnx.numpy_helper.to_array(t) for t in res.model.graph.initializer}
    (conv,) = [n for n in res.model.graph.node if n.op_type == "Conv"]
    assert np.array_equal(got[conv.input[1]], k.astype(np.float16))


def test_repvit_identity_that_a_conv_computes_then_a_bn_read_twice():
    """RepViT's first block: x comes from the stem's Conv; BN(DW3x3(x) + DW1x1(x) + x) is read by two nodes."""
    r = rng(22)
    c = 6
    nodes = [helper.make_node("Conv", ["u", "ws"], ["x"], name="stem", pads=[1] * 4)]
    inits = [tensor("ws", (r.standard_normal((c, 3, 3, 3)) * 0.3).astype(np.float32)),
             tensor("w0", r.standard_normal((c, 1, 3, 3)).astype(np.float32)),
             tensor("w1", r.standard_normal((c, 1, 1, 1)).astype(np.float32))]
    nodes += [helper.make_node("Conv", ["x", "w0"], ["a"], name="dw3", group=c, pads=[1] * 4),
              helper.make_node("Conv", ["x", "w1"], ["b"], name="dw1", group=c),
              helper.make_node("Add", ["a", "b"], ["ab"], name="add0"),
              helper.make_node("Add", ["ab", "x"], ["abx"], name="add1")]
    names, t = bn_inits("bn", c, r)
    inits += t
    nodes += [helper.make_node("BatchNormalization", ["abx"] + names, ["y"], name="bn"),
              helper.make_node("ReduceMean", ["y"], ["se"], axes=[2, 3], keepdims=1),
              helper.make_node("Mul", ["y", "se"], ["out"])]
    m = make_model(nodes, [("u", F32, [1, 3, 8, 8])], [("out", F32, None)], inits, opset=13)
    res = fold_and_compare(m, rtol=1e-5, atol=1e-5)
    assert op_count(res.model, "Conv") == 2 and op_count(res.model, "Add") == 0


def test_a_leaf_read_twice_inside_the_tree_counts_twice():  # BN(y) + 0.5 * y, y = Conv(x)
    r = rng(23)
    names, t = bn_inits("bn", 4, r)
    m = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1] * 4),
                    helper.make_node("BatchNormalization", ["y"] + names, ["n"], name="bn"),
                    helper.make_node("Mul", ["y", "half"], ["h"], name="half"),
                    helper.make_node("Add", ["n", "h"], ["out"], name="add")],
                   [("x", F32, [1, 4, 6, 6])], [("out", F32, None)],
                   [tensor("w", r.standard_normal((4, 4, 3, 3)).astype(np.float32)),
                    tensor("half", np.float32(0.5))] + t)
    res = fold_and_compare(m, rtol=1e-5, atol=1e-5)
    assert [n.op_type for n in res.model.graph.node] == ["Conv"]


def test_a_shift_a_matmul_cannot_take_and_a_spatial_constant_are_refused_or_left():
    r = rng(24)
    # x @ W1 + (x + d): the MatMul has no bias for d
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
                    helper.make_node("Add", ["x", "d"], ["b"], name="shift"),
                    helper.make_node("Add", ["a", "b"], ["y"], name="add")],
                   [("x", F32, [2, 4])], [("y", F32, None)],
                   [tensor("w", r.standard_normal((4, 4)).astype(np.float32)),
                    tensor("d", r.standard_normal(4).astype(np.float32))])
    _unchanged_with_reason(m, "would need a bias")
    # Conv(x) + x * P with P [1, C, H, W] (a positional constant, not per-channel): not a branch structure
    p = make_model([helper.make_node("Conv", ["x", "w"], ["a"], name="conv", pads=[1] * 4),
                    helper.make_node("Mul", ["x", "p"], ["b"], name="pos"),
                    helper.make_node("Add", ["a", "b"], ["y"], name="add")],
                   [("x", F32, [1, 4, 6, 6])], [("y", F32, None)],
                   [tensor("w", r.standard_normal((4, 4, 3, 3)).astype(np.float32)),
                    tensor("p", r.standard_normal((1, 4, 6, 6)).astype(np.float32))])
    res = foldkit.fold(p, verify=False)
    assert res.model.SerializeToString() == p.SerializeToString() and not res.report.branches


def test_gemm_and_conv_transpose_branches_under_per_channel_scales():
    r = rng(25)
    # 0.5 * BN(Gemm1(x)) - Gemm2(x) + x  on [N, 5]
    names, t = bn_inits("bn", 5, r)
    g = make_model([helper.make_node("Gemm", ["x", "w1", "c1"], ["a"], name="g1", transB=1),
                    helper.make_node("BatchNormalization", ["a"] + names, ["an"], name="bn"),
                    helper.make_node("Mul", ["an", "k"], ["ak"], name="k"),
                    helper.make_node("Gemm", ["x", "w2"], ["b"], name="g2", alpha=0.7),
                    helper.make_node("Sub", ["ak", "b"], ["d"], name="sub"),
                    helper.make_node("Add", ["d", "x"], ["y"], name="add")],
                   [("x", F32, [3, 5])], [("y", F32, None)],
                   [tensor("w1", r.standard_normal((5, 5)).astype(np.float32)),
                    tensor("c1", r.standard_normal(5).astype(np.float32)),
                    tensor("w2", r.standard_normal((5, 5)).astype(np.float32)),
                    tensor("k", (0.5 + r.random(5)).astype(np.float32))] + t)
    res = fold_and_compare(g, rtol=1e-5, atol=1e-5)
    assert [n.op_type for n in res.model.graph.node] == ["Gemm"]
    # BN(ConvT1(x)) + ConvT2(x) * s, grouped
    names, t = bn_inits("bt", 8, r)
    ct = make_model([helper.make_node("ConvTranspose", ["x", "v1"], ["a"], name="t1", group=2, strides=[2, 2]),
                     helper.make_node("BatchNormalization", ["a"] + names, ["an"], name="bt"),
                     helper.make_node("ConvTranspose", ["x", "v2", "vb"], ["b"], name="t2", group=2, strides=[2, 2]),
                     helper.make_node("Mul", ["b", "s"], ["bs"], name="s"),
                     helper.make_node("Add", ["an", "bs"], ["y"], name="add")],
                    [("x", F32, [1, 4, 5, 5])], [("y", F32, None)],
                    [tensor("v1", r.standard_normal((4, 4, 2, 2)).astype(np.float32)),
                     tensor("v2", r.standard_normal((4, 4, 2, 2)).astype(np.float32)),
                     tensor("vb", r.standard_normal(8).astype(np.float32)),
                     tensor("s", (0.5 + r.random((8, 1, 1))).astype(np.float32))] + t)
    res = fold_and_compare(ct, rtol=1e-5, atol=1e-5)
    assert [n.op_type for n in res.model.graph.node] == ["ConvTranspose"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "sub", "rsub", "mul", "div", "shift", "bn", "sum3"]),
                              st.integers(0, 10 ** 6)), min_size=1, max_size=7),
       kernels=st.lists(st.sampled_from([1, 3, 5]), min_size=1, max_size=3), seed=st.integers(0, 10 ** 6))
def test_random_linear_trees_merge_exactly(ops, kernels, seed):
    """A random tree of Add / Sub / Sum / per-channel Mul, Div, Add and BN over Conv branches of x and x
    itself: one Conv, equal on ONNX Runtime to the tree."""
    from tests.helpers import assert_close, ort_run, random_feeds

    r = rng(seed)
    c, h = 4, 7
    nodes, inits = [], []
    pool = ["x"]
    for n, k in enumerate(kernels):
        inits.append(tensor(f"w{n}", (r.standard_normal((c, c, k, k)) * 0.4).astype(np.float32)))
        nodes.append(helper.make_node("Conv", ["x", f"w{n}"], [f"c{n}"], name=f"conv{n}", pads=[k // 2] * 4))
        pool.append(f"c{n}")
    for n, (op, pick) in enumerate(ops):
        out = f"t{n}"
        a = pool.pop(pick % len(pool))
        if op in ("add", "sub", "rsub", "sum3") and pool:
            b = pool.pop((pick // 7) % len(pool))
            if op == "sum3" and pool:
                nodes.append(helper.make_node("Sum", [a, b, pool.pop(0)], [out]))
            else:
                nodes.append(helper.make_node("Sub" if op != "add" else "Add", [b, a] if op == "rsub" else [a, b], [out]))
        elif op == "bn":
            names, t = bn_inits(f"bn{n}", c, r)
            inits += t
            nodes.append(helper.make_node("BatchNormalization", [a] + names, [out]))
        else:
            v = (0.5 + r.random((c, 1, 1)) * (1 if pick % 2 else -1)).astype(np.float32)
            if pick % 3 == 0:
                v = v[:1, :1, :1].reshape(())  # a scalar
            inits.append(tensor(f"k{n}", v))
            nodes.append(helper.make_node({"mul": "Mul", "div": "Div", "shift": "Add"}.get(op, "Mul"), [a, f"k{n}"], [out]))
        pool.append(out)
    while len(pool) > 1:  # combine what is left into one output
        a, b = pool.pop(), pool.pop()
        nodes.append(helper.make_node("Add", [a, b], [f"s{len(pool)}"]))
        pool.append(f"s{len(pool)}")
    if pool[0] == "x" or not any(n.op_type in ("Add", "Sub", "Sum") for n in nodes):
        return
    nodes.append(helper.make_node("Relu", [pool[0]], ["y"]))
    m = make_model(nodes, [("x", F32, [1, c, h, h])], [("y", F32, None)], inits)
    res = foldkit.fold(m, verify=False)
    feeds = random_feeds(m, rng(seed + 1))
    assert_close(ort_run(m, feeds), ort_run(res.model, feeds), 1e-5, 1e-5)
    onnx.checker.check_model(res.model, full_check=True)
    # every Conv branch of x reached the root: one Conv is left, and nothing between it and the Relu
    reads_x = {n.input[0] for n in m.graph.node if n.op_type == "Conv"} == {"x"}
    if reads_x and not any(b.action == "kept" for b in res.report.branches):
        assert [n.op_type for n in res.model.graph.node] == ["Conv", "Relu"], [b.reason for b in res.report.branches]
