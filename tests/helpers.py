"""Builders for small ONNX graphs and an independent before/after comparison on ONNX Runtime.

The comparison here deliberately does not use foldkit.verify, so that a bug there cannot hide one
in the passes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import foldkit

F32 = TensorProto.FLOAT
I8, U8 = TensorProto.INT8, TensorProto.UINT8


def rng(seed=0):
    return np.random.default_rng(seed)


def bn_arrays(c, r, dtype=np.float32):
    """Realistic, non-identity BN statistics."""
    gamma = r.normal(1.0, 0.3, c)
    beta = r.normal(0.0, 0.5, c)
    mean = r.normal(0.0, 0.7, c)
    var = r.uniform(0.3, 2.5, c)
    return [a.astype(dtype) for a in (gamma, beta, mean, var)]


def bn_inits(prefix, c, r, dtype=np.float32):
    names = [f"{prefix}_{k}" for k in ("scale", "B", "mean", "var")]
    return names, [numpy_helper.from_array(a, n) for a, n in zip(bn_arrays(c, r, dtype), names)]


def tensor(name, a):
    return numpy_helper.from_array(np.asarray(a), name)


def make_model(nodes, inputs, outputs, inits=(), opset=17, ir_version=None, infer_outputs=True, name="g"):
    """inputs/outputs: [(name, elem_type, shape)]; output shapes are filled in by shape inference."""
    g = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        list(inits))
    kw = {"opset_imports": [helper.make_opsetid("", opset)]}
    m = helper.make_model(g, **kw)
    m.ir_version = ir_version or min(m.ir_version, 8 if opset <= 17 else m.ir_version)
    if infer_outputs:
        fill_output_shapes(m)
    return m


def fill_output_shapes(m):
    """Give graph outputs the shapes ONNX infers (the full checker requires them)."""
    inferred = onnx.shape_inference.infer_shapes(m)
    types = {v.name: v.type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for o in m.graph.output:
        if o.name in types and types[o.name].tensor_type.HasField("shape"):
            o.type.CopyFrom(types[o.name])
    return m


def ort_run(model, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def random_feeds(model, r=None, shapes=None):
    r = r or rng(1)
    feeds = {}
    inits = {t.name for t in model.graph.initializer}
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        shape = (shapes or {}).get(i.name) or [d.dim_value if d.dim_value > 0 else 2 for d in tt.shape.dim]
        dt = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if tt.elem_type == TensorProto.BOOL:
            feeds[i.name] = np.array(r.random(shape) < 0.5)
        else:
            feeds[i.name] = r.standard_normal(shape).astype(dt)
    return feeds


def op_count(model, op):
    from foldkit.graph import iter_graphs
    return sum(n.op_type == op for g in iter_graphs(model.graph) for n in g.node)


def assert_close(ref, new, rtol, atol):
    for a, b in zip(ref, new):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a64.shape == b64.shape
        scale = float(np.max(np.abs(a64))) if a64.size else 0.0
        err = float(np.max(np.abs(a64 - b64))) if a64.size else 0.0
        assert err <= atol + rtol * scale, f"max abs err {err:.3g} > {atol} + {rtol} * {scale:.3g}"


def fold_and_compare(model, rtol=1e-5, atol=1e-6, bn_after=0, feeds=None, runner=ort_run, **kw):
    """Fold, run the full checker, and compare before/after outputs on ONNX Runtime."""
    before = model.SerializeToString()
    result = foldkit.fold(model, verify=False, **kw)
    assert model.SerializeToString() == before, "fold() mutated its input"
    onnx.checker.check_model(result.model, full_check=True)
    assert op_count(result.model, "BatchNormalization") == bn_after, result.report.to_json()
    feeds = feeds if feeds is not None else random_feeds(model)
    assert_close(runner(model, feeds), runner(result.model, feeds), rtol, atol)
    return result


def conv_bn_model(dims=2, group=1, bias=True, c_in=4, c_out=6, k=3, seed=0, conv_attrs=None, opset=17,
                  transpose=False, spatial=5):
    r = rng(seed)
    if group > 1 and not transpose:
        c_in, c_out = int(np.lcm(c_in, group)), int(np.lcm(c_out, group))
    if transpose:
        c_in, c_out = int(np.lcm(c_in, group)), int(np.lcm(c_out, group))
        w = r.standard_normal((c_in, c_out // group) + (k,) * dims).astype(np.float32)
    else:
        w = r.standard_normal((c_out, c_in // group) + (k,) * dims).astype(np.float32)
    inits = [tensor("W", w)]
    ins = ["X", "W"]
    if bias:
        inits.append(tensor("Bc", r.standard_normal(c_out).astype(np.float32)))
        ins.append("Bc")
    names, bn = bn_inits("bn", c_out, r)
    op = "ConvTranspose" if transpose else "Conv"
    attrs = {"group": group}
    attrs.update(conv_attrs or {})
    nodes = [helper.make_node(op, ins, ["c"], name="conv", **attrs),
             helper.make_node("BatchNormalization", ["c"] + names, ["Y"], name="bn", epsilon=1e-3)]
    return make_model(nodes, [("X", F32, [2, c_in] + [spatial] * dims)], [("Y", F32, None)], inits + bn, opset=opset)


def base(conv_out_is_output=False, extra_reader=False, w_as_input=False, bn_param_as_input=False,
         bn_channels=6, var=None, producer="Conv", opset=17, scale=None, spatial=None, eps=1e-5):
    r = rng(21)
    names, bn = bn_inits("bn", bn_channels, r)
    if var is not None:
        bn[3] = tensor(names[3], np.asarray(var, np.float32))
    if scale is not None:
        bn[0] = tensor(names[0], np.asarray(scale, np.float32))
    inputs = [("X", F32, [1, 4, 5, 5])]
    inits = bn
    if w_as_input:
        inputs.append(("W", F32, [6, 4, 3, 3]))
    else:
        inits = [tensor("W", r.standard_normal((6, 4, 3, 3)).astype(np.float32))] + inits
    if bn_param_as_input:
        inputs.append((names[0], F32, [bn_channels]))
        inits = [t for t in inits if t.name != names[0]]
    outputs = [("Y", F32, None)]
    if producer == "Conv":
        nodes = [helper.make_node("Conv", ["X", "W"], ["c"], pads=[1, 1, 1, 1], name="conv")]
    else:
        nodes = [helper.make_node("Relu", ["X"], ["c"], name="relu")]
    bn_attrs = {"epsilon": eps}
    if spatial is not None:
        bn_attrs["spatial"] = spatial
    nodes.append(helper.make_node("BatchNormalization", ["c"] + names, ["Y"], name="bn", **bn_attrs))
    if conv_out_is_output:
        outputs.append(("c", F32, None))
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["c"], ["R"]))
        outputs.append(("R", F32, None))
    return make_model(nodes, inputs, outputs, inits, opset=opset, infer_outputs=False)


def typed_conv_bn(np_dtype, elem, bn_dtype=None, opset=17, scale=1.0):
    r = rng(11)
    w = np.clip(r.standard_normal((6, 4, 3, 3)) * scale, -6e4, 6e4).astype(np_dtype)
    b = r.standard_normal(6).astype(np_dtype)
    bn_dtype = bn_dtype or np_dtype
    arrays = bn_arrays(6, r, np.float64)
    names = ["s", "bb", "m", "v"]
    inits = [tensor("W", w), tensor("B", b)] + [tensor(n, a.astype(bn_dtype)) for n, a in zip(names, arrays)]
    nodes = [helper.make_node("Conv", ["X", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c"] + names, ["Y"], name="bn")]
    return make_model(nodes, [("X", elem, [1, 4, 5, 5])], [("Y", elem, None)], inits, opset=opset)


def _branch(name, w_name, bn_prefix, r, out):
    arrays = bn_arrays(6, r)
    names = [f"{bn_prefix}_{k}" for k in "sbmv"]
    nodes = [helper.make_node("Conv", ["X", w_name], [f"{name}_c"], pads=[1, 1, 1, 1], name=f"{name}_conv"),
             helper.make_node("BatchNormalization", [f"{name}_c"] + names, [out], name=f"{name}_bn")]
    inits = [tensor(n, a) for n, a in zip(names, arrays)]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, F32, [1, 6, 5, 5])], inits)


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


def repvgg_block(c_in=8, c_out=8, k=3, group=1, stride=1, dilation=1, identity="bn", extra_3x3=0, r=None,
                 pad_1x1=None, bias=False, h=9, dtype=np.float32, opset=17):
    """x -> [Conv kxk + BN] + [Conv 1x1 + BN] (+ [Conv kxk + BN] * extra) (+ BN(x) | x) -> Relu."""
    r = r or rng(0)
    nodes, inits, branches = [], [], []
    p = dilation * (k - 1) // 2
    specs = [(k, p)] + [(1, 0 if pad_1x1 is None else pad_1x1)] + [(k, p)] * extra_3x3
    for n, (kk, pp) in enumerate(specs):
        w = tensor(f"w{n}", (r.standard_normal((c_out, c_in // group, kk, kk)) * 0.3).astype(dtype))
        inits.append(w)
        conv_in = ["x", f"w{n}"]
        if bias:
            inits.append(tensor(f"cb{n}", r.standard_normal(c_out).astype(dtype)))
            conv_in.append(f"cb{n}")
        nodes.append(helper.make_node("Conv", conv_in, [f"c{n}"], name=f"conv{n}", group=group,
                                      strides=[stride, stride], dilations=[dilation, dilation], pads=[pp] * 4))
        names, t = bn_inits(f"bn{n}", c_out, r, dtype)
        inits += t
        nodes.append(helper.make_node("BatchNormalization", [f"c{n}"] + names, [f"b{n}"], name=f"bn{n}"))
        branches.append(f"b{n}")
    if identity == "bn":
        names, t = bn_inits("bnid", c_in, r, dtype)
        inits += t
        nodes.append(helper.make_node("BatchNormalization", ["x"] + names, ["bid"], name="bn_identity"))
        branches.append("bid")
    elif identity == "x":
        branches.append("x")
    acc = branches[0]
    for n, b in enumerate(branches[1:]):
        nodes.append(helper.make_node("Add", [acc, b], [f"s{n}"], name=f"add{n}"))
        acc = f"s{n}"
    nodes.append(helper.make_node("Relu", [acc], ["y"], name="relu"))
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return make_model(nodes, [("x", et, [2, c_in, h, h])], [("y", et, None)], inits, opset=opset)


def _bn(c, r, prefix="bn", negative=()):
    gamma, beta, mean, var = bn_arrays(c, r)
    for ch in negative:
        gamma[ch] = -abs(gamma[ch]) - 0.2
    names = [f"{prefix}_{k}" for k in ("scale", "B", "mean", "var")]
    return names, [tensor(n, a) for n, a in zip(names, (gamma, beta, mean, var))], (gamma, beta, mean, var)


def qconv(codes=None, per_channel=True, zp=None, code_type=I8, float_weight=None, axis=0, axis_attr=True,
          negative=(), c_out=6, c_in=4, act_qdq=True, bias=True, seed=0, op="Conv", extra_affine=()):
    """[x -> Q -> DQ] -> op(DQ(weight)) -> [affine ops] -> BN -> Relu, as ModelOpt / NNCF / QAT export it."""
    r = rng(seed)
    wshape = (c_out, c_in, 3, 3) if op == "Conv" else (c_in, c_out, 3, 3)
    nodes, inits = [], []
    x = "x"
    if act_qdq:
        inits += [tensor("xs", np.float32(0.05)), tensor("xz", np.int8(0))]
        nodes += [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"])]
        x = "xd"
    nch = wshape[axis]
    scale = (r.uniform(0.01, 0.03, nch) if per_channel else np.array(0.02)).astype(np.float32)
    inits.append(tensor("ws", scale))
    dq_in = ["wq", "ws"]
    if zp is not None:
        inits.append(tensor("wz", np.asarray(zp, dtype=np.int8 if code_type == I8 else np.uint8)))
        dq_in.append("wz")
    attrs = {"axis": axis} if (per_channel and axis_attr) else {}
    if float_weight is not None:
        inits.append(tensor("wf", float_weight.astype(np.float32)))
        nodes.append(helper.make_node("QuantizeLinear", ["wf"] + dq_in[1:], ["wq"], **attrs))
    else:
        if codes is None:
            codes = r.integers(-100, 100, wshape).astype(np.int8 if code_type == I8 else np.uint8)
        inits.append(numpy_helper.from_array(codes, "wq"))
    nodes.append(helper.make_node("DequantizeLinear", dq_in, ["w"], name="dqw", **attrs))
    conv_in = [x, "w"] + (["b"] if bias else [])
    if bias:
        inits.append(tensor("b", r.standard_normal(c_out).astype(np.float32)))
    nodes.append(helper.make_node(op, conv_in, ["c"], name="conv", pads=[1] * 4))
    prev = "c"
    for k, (kind, arr) in enumerate(extra_affine):
        inits.append(tensor(f"aff{k}", arr.astype(np.float32).reshape(1, -1, 1, 1)))
        nodes.append(helper.make_node(kind, [prev, f"aff{k}"], [f"af{k}"], name=f"{kind.lower()}{k}"))
        prev = f"af{k}"
    names, bn, params = _bn(c_out, r, negative=negative)
    inits += bn
    nodes += [helper.make_node("BatchNormalization", [prev] + names, ["n"], name="bn"),
              helper.make_node("Relu", ["n"], ["y"], name="relu")]
    m = make_model(nodes, [("x", F32, [2, c_in, 7, 7])], [("y", F32, None)], inits, opset=19 if not per_channel else 13)
    return m, params


def _ill_conditioned(seed=3):
    """y = BN(Conv(x)) - Conv2(x) with Conv2 ~ the folded conv: catastrophic cancellation, so the
    rounding of exact folds shows up far above the default relative tolerance."""
    r = rng(seed)
    c = 8
    w = (r.standard_normal((c, c, 3, 3)) * 30).astype(np.float32)
    gamma, beta, mean, var = r.normal(1, 0.2, c), r.normal(0, 0.5, c), r.normal(0, 0.5, c), r.uniform(0.5, 2, c)
    s = gamma / np.sqrt(var + 1e-5)
    w2 = (w.astype(np.float64) * s[:, None, None, None]).astype(np.float32)
    b2 = (beta - mean * s).astype(np.float32)
    inits = [tensor("w", w), tensor("w2", w2), tensor("b2", b2)] + [
        tensor(n, a.astype(np.float32)) for n, a in zip(("g", "be", "mu", "v"), (gamma, beta, mean, var))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4),
             helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "v"], ["b"], name="bn"),
             helper.make_node("Conv", ["x", "w2", "b2"], ["c2"], name="twin", pads=[1] * 4),
             helper.make_node("Sub", ["b", "c2"], ["y"], name="cancel")]
    return make_model(nodes, [("x", F32, [1, c, 8, 8])], [("y", F32, None)], inits)


def _mixconv(third="Conv", c_in=4):
    r = rng(13)
    names, bn = bn_inits("bn", 3 + 5 + 2, r)
    nodes = [helper.make_node("Conv", ["x", "w3"], ["a"], name="k3", pads=[1] * 4),
             helper.make_node("Conv", ["x", "w5", "b5"], ["b"], name="k5", pads=[2] * 4)]
    inits = [tensor("w3", r.standard_normal((3, c_in, 3, 3)).astype(np.float32)),
             tensor("w5", r.standard_normal((5, c_in, 5, 5)).astype(np.float32)),
             tensor("b5", r.standard_normal(5).astype(np.float32))]
    if third == "Conv":
        nodes.append(helper.make_node("Conv", ["x", "w1"], ["c"], name="k1", group=2))
        inits.append(tensor("w1", r.standard_normal((2, c_in // 2, 1, 1)).astype(np.float32)))
    elif third == "ConvTranspose":
        nodes.append(helper.make_node("ConvTranspose", ["x", "wt"], ["c"], name="kt", pads=[1] * 4, group=2))
        inits.append(tensor("wt", r.standard_normal((c_in, 1, 3, 3)).astype(np.float32)))
    else:
        nodes.append(helper.make_node("MaxPool", ["x"], ["c0"], kernel_shape=[1, 1]))
        nodes.append(helper.make_node("Slice", ["c0", "st", "en", "ax"], ["c"]))
        inits += [tensor("st", np.array([0], np.int64)), tensor("en", np.array([2], np.int64)),
                  tensor("ax", np.array([1], np.int64))]
    nodes += [helper.make_node("Concat", ["a", "b", "c"], ["cat"], axis=1, name="cat"),
              helper.make_node("BatchNormalization", ["cat"] + names, ["n"], name="bn"),
              helper.make_node("Relu", ["n"], ["y"])]
    return make_model(nodes, [("x", F32, [2, c_in, 7, 7])], [("y", F32, None)], inits + bn)


def _classifier(c=4, k=10, seed=15):
    r = rng(seed)
    names, bn = bn_inits("bn", c, r)
    nodes = [helper.make_node("Conv", ["img", "w"], ["cv"], name="conv", pads=[1] * 4),
             helper.make_node("BatchNormalization", ["cv"] + names, ["b"], name="bn"),
             helper.make_node("Relu", ["b"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], transB=1)]
    inits = [tensor("w", r.standard_normal((c, 1, 3, 3)).astype(np.float32)),
             tensor("fc", r.standard_normal((k, c)).astype(np.float32)), tensor("fcb", r.standard_normal(k).astype(np.float32))]
    m = make_model(nodes, [("img", F32, ["N", 1, 8, 8])], [("logits", F32, ["N", k])], inits + bn)
    return m


class UseCountDrift(AssertionError):
    pass


def recount_problem(ctx) -> str:
    """How the use counts the passes kept (``ctx.index.uses``) differ from a recount of the model,
    or '' when they agree. foldkit keeps one count, maintained by every GraphView edit; cleanup
    trusts it to decide what is dead, so a drift would remove a tensor something still reads."""
    from foldkit.attrs import count_uses

    kept = {k: v for k, v in ctx.index.uses.items() if v}
    real = {k: v for k, v in count_uses(ctx.model).items() if v}
    diff = sorted((k, kept.get(k, 0), real.get(k, 0)) for k in set(kept) | set(real) if kept.get(k, 0) != real.get(k, 0))
    return ", ".join(f"{k!r}: kept {a}, real {b}" for k, a, b in diff[:5])


class Recounting:
    """A pass that, after running, checks the kept use counts against a recount."""

    def __init__(self, inner):
        self.inner, self.name, self.stage = inner, inner.name, inner.stage

    def run(self, ctx):
        changed = self.inner.run(ctx)
        problem = recount_problem(ctx)
        if problem:
            raise UseCountDrift(f"after pass {self.name!r}: {problem}")
        return changed
