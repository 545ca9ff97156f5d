"""BN input moments over real data (ONNX models): which BNs, a copy of the model instrumented to
compute, in float64 in the graph, each BN input's per-row (sample, channel) mean and M2, one sample
at a time, and the exact merge of the rows and of the batches.

Statistics are accumulated per channel in float64 as (count, mean, M2) and merged with Chan et
al.'s parallel formula, so the result is the exact population mean and variance of every value a BN
saw (``var = M2 / count``), never an average of per-batch variances, whatever the batch sizes.
foldkit.recalibration re-estimates running statistics from them; foldkit.stats judges them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np
import onnx
from onnx import ModelProto, helper, numpy_helper

from .errors import InputError

METHODS = ("batch", "exact")


@dataclass
class Moments:
    """Per-channel count, mean and M2 (sum of squared deviations), float64."""

    count: int = 0
    mean: Optional[np.ndarray] = None
    m2: Optional[np.ndarray] = None

    def add(self, x: np.ndarray, axis: int = 1) -> None:
        """Every value of ``x`` on channel axis ``axis`` (samples and positions alike)."""
        x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, 0)
        c = x.shape[0]
        flat = x.reshape(c, -1)
        n = flat.shape[1]
        if n == 0:
            return
        mb = flat.mean(axis=1)
        m2b = ((flat - mb[:, None]) ** 2).sum(axis=1)
        self.merge(Moments(n, mb, m2b))

    def merge(self, other: "Moments") -> None:
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2 = other.count, other.mean.copy(), other.m2.copy()
            return
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / n)
        self.m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / n)
        self.count = n

    @property
    def var(self) -> np.ndarray:
        return self.m2 / self.count


@dataclass
class BNInfo:
    index: int  # node index in the main graph
    name: str  # node label
    x: str  # input value
    params: list  # [scale, B, mean, var] initializer names
    eps: float
    channels: int
    old_mean: np.ndarray = None
    old_var: np.ndarray = None
    upstream: set = field(default_factory=set)  # indices (into the BN list) of BNs that feed this one


def _label(node) -> str:
    return node.name or f"{node.op_type}({node.output[0]})"


def find_bns(model: ModelProto, only=(), skip=(), base_dir: Optional[str] = None) -> tuple:
    """(the BNs to recalibrate, notes on the ones left alone): main-graph BNs in inference mode whose
    parameters are initializers (``base_dir``: where tensors a lazy load left on disk are read)."""
    from .graph import attr_float

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    inputs = {i.name for i in g.input}
    out, notes = [], []
    labels = {_label(n) for n in g.node if n.op_type == "BatchNormalization"}
    unknown = [n for n in list(only) + list(skip) if n not in labels]
    if unknown:
        raise InputError(f"--only/--skip-node names {unknown[0]!r}, which is not a BatchNormalization of the main graph")
    for k, n in enumerate(g.node):
        if n.op_type != "BatchNormalization" or n.domain not in ("", "ai.onnx"):
            continue
        label = _label(n)
        if (only and label not in only) or label in skip:
            continue
        if len(n.input) < 5 or any(p not in inits or p in inputs for p in n.input[1:5]):
            notes.append(f"{label}: its parameters are not all initializers; left as it is")
            continue
        if any(a.name == "training_mode" and a.i for a in n.attribute) or len([o for o in n.output if o]) > 1:
            notes.append(f"{label}: in training mode; `foldkit fold` converts it first")
            continue
        if any(a.name == "spatial" and a.i == 0 for a in n.attribute):  # opset <= 8: statistics per (channel, position)
            notes.append(f"{label}: spatial=0 (statistics per channel and position); left as it is")
            continue
        mean = numpy_helper.to_array(inits[n.input[3]], base_dir or "")
        var = numpy_helper.to_array(inits[n.input[4]], base_dir or "")
        out.append(BNInfo(k, label, n.input[0], list(n.input[1:5]), attr_float(n, "epsilon", 1e-5), int(mean.size),
                          mean.astype(np.float64), var.astype(np.float64)))
    subs = sum(1 for n in g.node for a in n.attribute if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS))
    if subs:
        notes.append("BatchNormalization inside If/Loop/Scan bodies is not recalibrated")
    _upstream(model, out)
    return out, notes


def _upstream(model: ModelProto, bns: list) -> None:
    producer = {o: n for n in model.graph.node for o in n.output if o}
    by_output = {model.graph.node[b.index].output[0]: k for k, b in enumerate(bns)}
    memo = {}

    def ancestors(value, seen):
        if value in memo:
            return memo[value]
        acc = set()
        stack = [value]
        while stack:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            if v in by_output:
                acc.add(by_output[v])
            p = producer.get(v)
            if p is not None:
                stack.extend(i for i in p.input if i)
        memo[value] = acc
        return acc
    for b in bns:
        b.upstream = ancestors(b.x, set())


_AXES_AS_INPUT = {"ReduceMean": 18, "ReduceSumSquare": 18, "ReduceSum": 13}  # the opset from which axes is an input


def _reduce(op: str, x: str, out: str, axes: list, opset: int, nodes: list, inits: list, tag: str,
            keepdims: int = 1) -> None:
    """``op(x)`` over ``axes`` into ``out``, with the axes as an attribute or an input as ``opset`` wants."""
    if opset >= _AXES_AS_INPUT[op]:
        inits.append(numpy_helper.from_array(np.array(axes, dtype=np.int64), f"{tag}_axes"))
        nodes.append(helper.make_node(op, [x, f"{tag}_axes"], [out], keepdims=keepdims))
    else:
        nodes.append(helper.make_node(op, [x], [out], axes=axes, keepdims=keepdims))


def _reduce_mean(x: str, out: str, axes: list, opset: int, nodes: list, inits: list, tag: str) -> None:
    _reduce("ReduceMean", x, out, axes, opset, nodes, inits, tag)


def instrumented(model: ModelProto, bns: list, batch_mode: set, rank_of: Callable[[str], Optional[int]],
                 elem_of: Callable[[str], int] = lambda v: onnx.TensorProto.FLOAT) -> ModelProto:
    """A copy of ``model`` whose outputs are, for each of ``bns`` in order, its input's row means,
    row M2s and shape (see :func:`_moment_ops`); the BNs whose list index is in ``batch_mode``
    normalize with their batch's statistics instead of their running ones (see :func:`_batch_bn`)."""
    from .graph import default_opset

    m = ModelProto()
    m.CopyFrom(model)
    g = m.graph
    opset = default_opset(m)
    dtypes = {t.name: t.data_type for t in g.initializer}
    nodes = list(g.node)
    new_nodes, extra_inits = [], []
    replace = {bns[k].index: k for k in batch_mode}
    stat_at = {b.index: k for k, b in enumerate(bns)}
    for i, n in enumerate(nodes):
        if i in stat_at:  # the statistics of the BN's input right where it is: it is freed as usual after
            new_nodes += _moment_ops(bns[stat_at[i]], stat_at[i], rank_of, opset, extra_inits, elem_of)
        if i in replace:
            new_nodes += _batch_bn(n, bns[replace[i]], replace[i], opset, dtypes, extra_inits)
        else:
            new_nodes.append(n)
    del g.node[:]
    g.node.extend(new_nodes)
    del g.output[:]
    for k in range(len(bns)):
        tag = f"foldkit_stat{k}"
        g.output.extend([helper.make_tensor_value_info(f"{tag}_mean", onnx.TensorProto.DOUBLE, None),
                         helper.make_tensor_value_info(f"{tag}_var", onnx.TensorProto.DOUBLE, None),
                         helper.make_tensor_value_info(f"{tag}_shape", onnx.TensorProto.INT64, None)])
    g.initializer.extend(extra_inits)
    return m


def _batch_bn(node, b: "BNInfo", k: int, opset: int, dtypes: dict, extra_inits: list) -> list:
    """BN ``node`` (in inference mode) normalizing with its batch's own mean and (population)
    variance: the rows of :func:`_moment_ops` merged in the graph, in float64 (every row has as many
    values, so the batch mean is the mean of the row means and the variance the mean of the row
    variances plus the variance of the row means), rounded once to the type of the BN's
    statistics. The BN stays an inference-mode BN (the runtime's plain kernel) fed with them: ONNX
    Runtime's training-mode kernel would compute them a second time, in float32, at 0.7x the cost
    of all of foldkit's float64 rows (ResNet-50, 224x224, batch 32), and it needs opset 14."""
    tag, st = f"foldkit_pbn{k}", f"foldkit_stat{k}"
    mean, var = f"{st}_mean", f"{st}_var"  # [N, C, 1...] (rank > 2) or [N, C]
    ops = []
    _reduce_mean(mean, f"{tag}_bm", [0], opset, ops, extra_inits, f"{tag}_a")
    ops += [helper.make_node("Sub", [mean, f"{tag}_bm"], [f"{tag}_dev"]),
            helper.make_node("Mul", [f"{tag}_dev", f"{tag}_dev"], [f"{tag}_dev2"]),
            helper.make_node("Add", [var, f"{tag}_dev2"], [f"{tag}_spread"])]
    _reduce_mean(f"{tag}_spread", f"{tag}_bv", [0], opset, ops, extra_inits, f"{tag}_b")
    extra_inits.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{tag}_flat"))
    t = onnx.NodeProto()
    t.CopyFrom(node)
    for j, (v, param) in enumerate(((f"{tag}_bm", b.params[2]), (f"{tag}_bv", b.params[3])), start=3):
        ops += [helper.make_node("Reshape", [v, f"{tag}_flat"], [f"{v}_flat"]),
                helper.make_node("Cast", [f"{v}_flat"], [f"{tag}_stat{j}"], to=dtypes.get(param, onnx.TensorProto.FLOAT))]
        t.input[j] = f"{tag}_stat{j}"
    return ops + [t]


def _moment_ops(b: "BNInfo", k: int, rank_of, opset: int, extra_inits: list,
                elem_of: Callable[[str], int] = lambda v: onnx.TensorProto.FLOAT) -> list:
    """Per (sample, channel) row of BN ``b``'s input: its mean and variance (the mean squared
    deviation from that mean: two passes), in float64, as ``[N, C, 1...]`` outputs
    (foldkit_stat{k}_mean / _var), with the input's shape for the counts; :func:`row_moments`
    merges the rows exactly.

    The rows are computed one sample at a time by a Scan (which hands its body each sample as a
    view of the input, not a copy), so the float64 temporaries are one sample's, not the batch's:
    they stay in cache, and peak memory barely moves. Only 2 x N x C numbers per BN leave ONNX
    Runtime. A rank-2 input ([N, C]) has one value per row: the rows are its values."""
    rank = rank_of(b.x)
    if rank is None:
        raise InputError(f"{b.name}: the rank of its input is unknown; give --input-shape")
    tag = f"foldkit_stat{k}"
    ops = [helper.make_node("Shape", [b.x], [f"{tag}_shape"])]
    if rank <= 2:
        ops.append(helper.make_node("Cast", [b.x], [f"{tag}_mean"], to=onnx.TensorProto.DOUBLE))
        ops.append(helper.make_node("Sub", [f"{tag}_mean", f"{tag}_mean"], [f"{tag}_var"]))
        return ops
    spatial = list(range(1, rank - 1))  # of one sample: [C, spatial...]
    body_nodes, body_inits = [], []
    body_nodes.append(helper.make_node("Cast", [f"{tag}_xs"], [f"{tag}_x64"], to=onnx.TensorProto.DOUBLE))
    _reduce_mean(f"{tag}_x64", f"{tag}_rm", spatial, opset, body_nodes, body_inits, f"{tag}_ra")
    body_nodes.append(helper.make_node("Sub", [f"{tag}_x64", f"{tag}_rm"], [f"{tag}_d"]))
    # Mul then ReduceMean: ORT's ReduceSumSquare is 1.4x slower than Mul and a reduction (double, in cache)
    body_nodes.append(helper.make_node("Mul", [f"{tag}_d", f"{tag}_d"], [f"{tag}_d2"]))
    # both kept [C, 1...]: no Reshape in the body (each body node costs every sample a dispatch)
    _reduce_mean(f"{tag}_d2", f"{tag}_rv", spatial, opset, body_nodes, body_inits, f"{tag}_sa")
    body = helper.make_graph(
        body_nodes, f"{tag}_rows", [helper.make_tensor_value_info(f"{tag}_xs", elem_of(b.x), [None] * (rank - 1))],
        [helper.make_tensor_value_info(f"{tag}_rm", onnx.TensorProto.DOUBLE, None),
         helper.make_tensor_value_info(f"{tag}_rv", onnx.TensorProto.DOUBLE, None)], body_inits)
    if opset >= 9:
        ops.append(helper.make_node("Scan", [b.x], [f"{tag}_mean", f"{tag}_var"], num_scan_inputs=1, body=body))
        return ops
    # Scan-8 takes [batch, sequence, ...] (and sequence lengths first): the samples are a sequence of one batch
    ops += [helper.make_node("Unsqueeze", [b.x], [f"{tag}_seq"], axes=[0]),
            helper.make_node("Scan", ["", f"{tag}_seq"], [f"{tag}_mean1", f"{tag}_var1"], num_scan_inputs=1, body=body),
            helper.make_node("Squeeze", [f"{tag}_mean1"], [f"{tag}_mean"], axes=[0]),
            helper.make_node("Squeeze", [f"{tag}_var1"], [f"{tag}_var"], axes=[0])]
    return ops


def row_moments(mean_rows, var_rows, shape) -> Moments:
    """The exact merge of a batch's rows (each ``count = prod(shape[2:])`` values of one sample and
    channel; ``mean_rows``/``var_rows`` [N, C...]) into one Moments per channel (Chan et al., all
    rows at once: equal counts make the batch mean the mean of the row means)."""
    mean_rows = np.asarray(mean_rows, np.float64).reshape(int(shape[0]), -1)
    var_rows = np.asarray(var_rows, np.float64).reshape(mean_rows.shape)
    per_row = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1
    n = mean_rows.shape[0]
    if n == 0 or per_row == 0:
        return Moments()
    mean = mean_rows.mean(axis=0)
    m2 = per_row * (var_rows.sum(axis=0) + ((mean_rows - mean) ** 2).sum(axis=0))
    return Moments(n * per_row, mean, m2)


def _measure(model_bytes: bytes, bns: list, batches: Iterable[dict], reduce: Callable[[list], list],
             base_dir: Optional[str] = None) -> tuple:
    """(one Moments per BN, samples, batches) over ``batches`` (each a feed dict); ``base_dir``:
    where the tensors a lazy load left on disk are (ONNX Runtime maps them from there)."""
    from .verify import _ort_session

    from .data import DataError

    run = _ort_session(model_bytes, base_dir, mem_pattern=False, priority_order=True)  # the statistics graph: see _ort_session
    acc = [Moments() for _ in bns]
    samples = nb = 0
    for feeds in batches:
        try:
            outs = run(feeds)
        except Exception as e:  # shapes or types the model does not take: the data's problem
            shapes = {k: list(np.shape(v)) for k, v in feeds.items()}
            raise DataError(f"--data: the model does not run on batch {nb} (shapes {shapes}): "
                            f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:300]}") from None
        for k, m in enumerate(acc):
            m.merge(row_moments(outs[3 * k], outs[3 * k + 1], outs[3 * k + 2]))
        nb += 1
        samples += next(iter(feeds.values())).shape[0] if feeds else 0
    acc = reduce(acc)
    return acc, samples, nb



def _typing(model: ModelProto, input_shapes: Optional[dict]):
    """(rank_of, elem_of): a value's rank (None when unknown) and element type, from shape inference."""
    from .regions import inferred_shapes

    shapes = inferred_shapes(model, input_shapes)

    def rank_of(v):
        return len(shapes[v][1]) if v in shapes and shapes[v][1] is not None else None

    def elem_of(v):
        return shapes[v][0] if v in shapes and shapes[v][0] else onnx.TensorProto.FLOAT
    return rank_of, elem_of


def _feeds(batches: Iterable[dict]) -> Iterable[dict]:
    from .data import LABEL

    for b in batches:
        yield {k: v for k, v in b.items() if k != LABEL}


