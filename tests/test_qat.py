"""torch.ao quantization-aware training, exported before convert: the fused ConvBn / LinearBn modules
write ``Op(x, DQ(Q(w * s))) -> Div(s) -> [Add(bias)] -> BatchNormalization``, s = gamma / sqrt(var + eps).

The graphs are made by torch.ao's own ``prepare_qat`` with per-channel and per-tensor weight observers
(one BN channel with a negative gamma, so that the weight's codes reach -128 where the Div alone has a
negative scale), trained a few steps, frozen and exported by torch.onnx. Each must fold completely
(Div, Add and BN in one map: a = s_bn / s > 0 everywhere), stay quantized (integer codes read by
DequantizeLinear, the same codes ONNX's QuantizeLinear gives the float weight) and match the original
on ONNX Runtime."""

import contextlib
import io
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")

import foldkit  # noqa: E402
from tests.helpers import ort_run  # noqa: E402

C = 8
SHAPES = {"linear": (4, 6), "conv1d": (2, 3, 16), "conv2d": (2, 3, 12, 12), "conv3d": (1, 3, 6, 6, 6)}


def _qat_model(kind, per_channel, bias, seed=0):
    import torch.ao.quantization as tq

    nn = torch.nn
    op, bn = {"linear": (lambda: nn.Linear(6, C, bias=bias), nn.BatchNorm1d),
              "conv1d": (lambda: nn.Conv1d(3, C, 3, padding=1, bias=bias), nn.BatchNorm1d),
              "conv2d": (lambda: nn.Conv2d(3, C, 3, padding=1, bias=bias), nn.BatchNorm2d),
              "conv3d": (lambda: nn.Conv3d(3, C, 3, padding=1, bias=bias), nn.BatchNorm3d)}[kind]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.op, self.bn, self.dequant = tq.QuantStub(), op(), bn(C), tq.DeQuantStub()

        def forward(self, x):
            return self.dequant(self.bn(self.op(self.quant(x))))

    m = Net()
    m.bn.weight.data = 1 + 0.3 * torch.randn(C, generator=g)
    m.bn.weight.data[2] = -m.bn.weight.data[2].abs()  # a negative scale for one channel
    m.bn.bias.data = 0.3 * torch.randn(C, generator=g)
    m.bn.running_mean = 0.5 * torch.randn(C, generator=g)
    m.bn.running_var = 0.5 + torch.rand(C, generator=g)
    m = tq.fuse_modules_qat(m.train(), [["op", "bn"]])
    act = tq.FakeQuantize.with_args(observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                                    dtype=torch.quint8)
    if per_channel:
        w = tq.FakeQuantize.with_args(observer=tq.MovingAveragePerChannelMinMaxObserver, quant_min=-128,
                                      quant_max=127, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                      ch_axis=0)
    else:
        w = tq.FakeQuantize.with_args(observer=tq.MovingAverageMinMaxObserver, quant_min=-128, quant_max=127,
                                      dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    m.qconfig = tq.QConfig(activation=act, weight=w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tq.prepare_qat(m, inplace=True)
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(*SHAPES[kind], generator=g))
    m.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
    m.apply(tq.disable_observer)
    return m.eval()


def _export(m, kind, path, fold_constants):
    x = torch.randn(*SHAPES[kind], generator=torch.Generator().manual_seed(1))
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), str(path), dynamo=False, opset_version=17, do_constant_folding=fold_constants)
    model = onnx.load(str(path))
    # the BN output itself is compared: the activation fake-quant after it would round differences away
    g = model.graph
    (bn,) = [n for n in g.node if n.op_type == "BatchNormalization"]
    tail = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and
            (n.input[0] == bn.output[0] or any(n.input[0] == t.output[0] for t in g.node
                                               if t.op_type == "QuantizeLinear" and t.input[0] == bn.output[0]))]
    for n in tail:
        g.node.remove(n)
    del g.output[:]
    shape = list(SHAPES[kind])
    shape[1] = C
    g.output.append(onnx.helper.make_tensor_value_info(bn.output[0], onnx.TensorProto.FLOAT, shape))
    onnx.checker.check_model(model)
    return model, x.numpy()


@pytest.mark.parametrize("fold_constants", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("kind", list(SHAPES))
def test_torch_ao_qat_fused_modules_fold_exactly_and_stay_quantized(tmp_path, kind, per_channel, bias, fold_constants):
    m, x = _export(_qat_model(kind, per_channel, bias), kind, tmp_path / "qat.onnx", fold_constants)
    before = Counter(n.op_type for n in m.graph.node)
    assert before["BatchNormalization"] == 1 and before["Div"] >= 1
    res = foldkit.fold(m)  # verified on ONNX Runtime
    after = Counter(n.op_type for n in res.model.graph.node)
    assert after["BatchNormalization"] == 0 and after["Div"] == 0 and after["Add"] == 0, res.report.to_json()
    assert res.report.verification["passed"]
    # still quantized: the op's weight is DequantizeLinear of an int8 initializer, no float weight left
    inits = {t.name: t for t in res.model.graph.initializer}
    (op,) = [n for n in res.model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    (dq,) = [n for n in res.model.graph.node if n.output[0] == op.input[1]]
    assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].data_type == onnx.TensorProto.INT8
    # the codes are those ONNX's QuantizeLinear gives the exported float weight (a > 0: codes kept)
    producer = {o: n for n in m.graph.node for o in n.output}
    (op0,) = [n for n in m.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    wq = producer[producer[op0.input[1]].input[0]]
    assert wq.op_type == "QuantizeLinear"
    got_codes = numpy_helper.to_array(inits[dq.input[0]])
    want_codes = _evaluate(m, wq.output[0], got_codes.shape, {m.graph.input[0].name: x})
    assert np.array_equal(got_codes.reshape(want_codes.shape), want_codes)
    a, b = ort_run(m, {m.graph.input[0].name: x})[0], ort_run(res.model, {m.graph.input[0].name: x})[0]
    err = float(np.abs(a - b).max())
    assert err <= 8 * np.spacing(np.float32(np.abs(a).max())), err


def test_the_div_alone_cannot_fold_where_the_whole_chain_can(tmp_path):
    """Channel 2's gamma is negative, so s[2] < 0 and Div by s alone would need the codes negated;
    that channel holds a -128, which has no negation in int8. The Div, Add and BN composed are
    a = s_bn / s > 0: codes kept, scales multiplied."""
    m, x = _export(_qat_model("conv2d", True, True), "conv2d", tmp_path / "qat.onnx", True)
    producer = {o: n for n in m.graph.node for o in n.output}
    (conv,) = [n for n in m.graph.node if n.op_type == "Conv"]
    wq = producer[producer[conv.input[1]].input[0]]
    codes = _evaluate(m, wq.output[0], (C, 3, 3, 3), {m.graph.input[0].name: x})
    assert codes[2].min() == -128
    # the graph cut after the Div: refused with the quantization code, unchanged
    (div,) = [n for n in m.graph.node if n.op_type == "Div" and n.input[0] == conv.output[0]]
    cut = onnx.ModelProto()
    cut.CopyFrom(m)
    keep = [n for n in cut.graph.node if n.op_type not in ("Add", "BatchNormalization") or n.input[0] != div.output[0]
            and not n.input[0].startswith("/op/Add")]
    del cut.graph.node[:]
    cut.graph.node.extend(keep)
    cut.graph.output[0].name = div.output[0]
    res = foldkit.fold(cut, verify=False)
    assert res.model.SerializeToString() == cut.SerializeToString()
    full = foldkit.fold(m)
    assert Counter(n.op_type for n in full.model.graph.node)["Div"] == 0 and full.report.verification["passed"]


def _evaluate(model, name, shape, feeds):
    """The int8 value ``name`` inside ``model``, computed by ONNX Runtime."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT8, list(shape)))
    return ort_run(m, feeds)[-1]
