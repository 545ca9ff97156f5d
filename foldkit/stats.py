"""BatchNorm running statistics: measured on real data, judged, and re-estimated (ONNX models).

Statistics are accumulated per channel in float64 as (count, mean, M2) and merged with Chan et
al.'s parallel formula, so the result is the exact population mean and variance of every value a BN
saw (``var = M2 / count``), never an average of per-batch variances, whatever the batch sizes.

Two estimators (``recalibrate``):

- ``batch`` (precise BN, Wu & Johnson 2021, "Rethinking Batch in BatchNorm"): one pass over the
  data in which every recalibrated BN normalizes with its own batch's statistics, as in training;
  each BN's population statistics are those of all its inputs over the pass.
- ``exact``: statistics consistent with inference. BNs are measured in dependency order: a BN is
  measured, in inference mode, once every BN upstream of it has its new statistics. After it,
  running the model in inference mode over the same data gives every BN an input whose mean and
  variance are its stored statistics. It takes one pass over the data per level of the BN
  dependency graph (the longest chain of BNs feeding one another: 53 for ResNet-50, 1 for BNs that
  do not feed each other); every pass streams the data.

Only BNs change: every other op keeps its inference behaviour (Dropout stays off). On many
machines (torch.distributed, launched by torchrun), batch i goes to rank i mod world size, and the
per-channel (count, mean, M2) are gathered and merged in rank order, so every rank computes the
same statistics; rank 0 writes.
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


def find_bns(model: ModelProto, only=(), skip=()) -> tuple:
    """(the BNs to recalibrate, notes on the ones left alone): main-graph BNs in inference mode whose
    parameters are initializers."""
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
        mean = numpy_helper.to_array(inits[n.input[3]])
        var = numpy_helper.to_array(inits[n.input[4]])
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


def _reduce_mean(x: str, out: str, axes: list, opset: int, nodes: list, inits: list, tag: str) -> None:
    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array(axes, dtype=np.int64), f"{tag}_axes"))
        nodes.append(helper.make_node("ReduceMean", [x, f"{tag}_axes"], [out], keepdims=1))
    else:
        nodes.append(helper.make_node("ReduceMean", [x], [out], axes=axes, keepdims=1))


def instrumented(model: ModelProto, bns: list, batch_mode: set, rank_of: Callable[[str], Optional[int]],
                 elem_of: Callable[[str], int] = lambda v: onnx.TensorProto.FLOAT) -> ModelProto:
    """A copy of ``model`` whose outputs are the inputs of ``bns`` (in order); the BNs whose list
    index is in ``batch_mode`` normalize with their batch's statistics instead of their running ones."""
    from .graph import default_opset

    m = ModelProto()
    m.CopyFrom(model)
    g = m.graph
    opset = default_opset(m)
    nodes = list(g.node)
    new_nodes, extra_inits = [], []
    replace = {bns[k].index: k for k in batch_mode}
    stat_at = {b.index: k for k, b in enumerate(bns)}
    for i, n in enumerate(nodes):
        if i in stat_at:  # the statistics of the BN's input right where it is: it is freed as usual after
            new_nodes += _moment_ops(bns[stat_at[i]], stat_at[i], rank_of, opset, extra_inits)
        if i not in replace:
            new_nodes.append(n)
            continue
        b = bns[replace[i]]
        if opset >= 14:  # the runtime's own training-mode BN: it normalizes with the batch's statistics
            t = onnx.NodeProto()
            t.CopyFrom(n)
            del t.output[1:]
            t.output.extend([f"foldkit_pbn{replace[i]}_rm", f"foldkit_pbn{replace[i]}_rv"])  # required, unused
            keep = [a for a in t.attribute if a.name != "training_mode"]
            del t.attribute[:]
            t.attribute.extend(keep + [helper.make_attribute("training_mode", 1)])
            new_nodes.append(t)
            continue
        rank = rank_of(b.x)
        if rank is None:
            raise InputError(f"{b.name}: the rank of its input is unknown; give --input-shape or use --method exact")
        axes = [0] + list(range(2, rank))
        tag = f"foldkit_pbn{replace[i]}"
        gamma, beta = b.params[0], b.params[1]
        shape = [1, b.channels] + [1] * (rank - 2)
        extra_inits.append(numpy_helper.from_array(np.array(shape, dtype=np.int64), f"{tag}_shape"))
        extra_inits.append(numpy_helper.from_array(np.array(b.eps, dtype=np.float32), f"{tag}_eps"))
        ops = []
        _reduce_mean(b.x, f"{tag}_mean", axes, opset, ops, extra_inits, f"{tag}_m")
        ops += [helper.make_node("Sub", [b.x, f"{tag}_mean"], [f"{tag}_d"]),
                helper.make_node("Mul", [f"{tag}_d", f"{tag}_d"], [f"{tag}_d2"])]
        _reduce_mean(f"{tag}_d2", f"{tag}_var", axes, opset, ops, extra_inits, f"{tag}_v")
        ops += [helper.make_node("CastLike", [f"{tag}_eps", f"{tag}_var"], [f"{tag}_epsx"]) if opset >= 15 else
                helper.make_node("Identity", [f"{tag}_eps"], [f"{tag}_epsx"]),
                helper.make_node("Add", [f"{tag}_var", f"{tag}_epsx"], [f"{tag}_ve"]),
                helper.make_node("Sqrt", [f"{tag}_ve"], [f"{tag}_sd"]),
                helper.make_node("Div", [f"{tag}_d", f"{tag}_sd"], [f"{tag}_z"]),
                helper.make_node("Reshape", [gamma, f"{tag}_shape"], [f"{tag}_g"]),
                helper.make_node("Reshape", [beta, f"{tag}_shape"], [f"{tag}_b"]),
                helper.make_node("CastLike", [f"{tag}_g", f"{tag}_z"], [f"{tag}_gx"]) if opset >= 15 else
                helper.make_node("Identity", [f"{tag}_g"], [f"{tag}_gx"]),
                helper.make_node("CastLike", [f"{tag}_b", f"{tag}_z"], [f"{tag}_bx"]) if opset >= 15 else
                helper.make_node("Identity", [f"{tag}_b"], [f"{tag}_bx"]),
                helper.make_node("Mul", [f"{tag}_z", f"{tag}_gx"], [f"{tag}_zg"]),
                helper.make_node("Add", [f"{tag}_zg", f"{tag}_bx"], [n.output[0]])]
        new_nodes += ops
    del g.node[:]
    g.node.extend(new_nodes)
    del g.output[:]
    for k in range(len(bns)):
        tag = f"foldkit_stat{k}"
        g.output.extend([helper.make_tensor_value_info(f"{tag}_mean", onnx.TensorProto.DOUBLE, None),
                         helper.make_tensor_value_info(f"{tag}_m2", onnx.TensorProto.DOUBLE, None),
                         helper.make_tensor_value_info(f"{tag}_shape", onnx.TensorProto.INT64, None)])
    g.initializer.extend(extra_inits)
    return m


def _moment_ops(b: "BNInfo", k: int, rank_of, opset: int, extra_inits: list) -> list:
    """The batch's per-channel mean and M2 of BN ``b``'s input, computed in the graph in float64 (so
    only 2 x C numbers per BN leave ONNX Runtime, not the activations), and the input's shape for
    the count. Placed just before the BN, so that the float64 temporaries (one cast copy, one
    deviation; ReduceSumSquare squares as it sums) live only while this one input does."""
    rank = rank_of(b.x)
    if rank is None:
        raise InputError(f"{b.name}: the rank of its input is unknown; give --input-shape")
    spatial = list(range(2, rank))
    tag = f"foldkit_stat{k}"
    ops = [helper.make_node("Cast", [b.x], [f"{tag}_x64"], to=onnx.TensorProto.DOUBLE)]
    # in two stages: over the contiguous spatial axes of each (sample, channel) row first (every
    # row holds as many values, so the mean of the row means is the mean), then over the samples
    mean_in = f"{tag}_x64"
    if spatial:
        _reduce_mean(mean_in, f"{tag}_rm", spatial, opset, ops, extra_inits, f"{tag}_ra")
        mean_in = f"{tag}_rm"
    _reduce_mean(mean_in, f"{tag}_mean", [0], opset, ops, extra_inits, f"{tag}_ma")
    ops.append(helper.make_node("Sub", [f"{tag}_x64", f"{tag}_mean"], [f"{tag}_d"]))
    sq_axes = spatial or [0]
    if opset >= 18:
        extra_inits.append(numpy_helper.from_array(np.array(sq_axes, dtype=np.int64), f"{tag}_sa"))
        ops.append(helper.make_node("ReduceSumSquare", [f"{tag}_d", f"{tag}_sa"], [f"{tag}_sq"], keepdims=0))
    else:
        ops.append(helper.make_node("ReduceSumSquare", [f"{tag}_d"], [f"{tag}_sq"], axes=sq_axes, keepdims=0))
    if spatial:  # [N, C] row sums: the samples' sum
        if opset >= 13:
            extra_inits.append(numpy_helper.from_array(np.array([0], dtype=np.int64), f"{tag}_s0"))
            ops.append(helper.make_node("ReduceSum", [f"{tag}_sq", f"{tag}_s0"], [f"{tag}_m2"], keepdims=0))
        else:
            ops.append(helper.make_node("ReduceSum", [f"{tag}_sq"], [f"{tag}_m2"], axes=[0], keepdims=0))
    else:
        ops.append(helper.make_node("Identity", [f"{tag}_sq"], [f"{tag}_m2"]))
    ops.append(helper.make_node("Shape", [b.x], [f"{tag}_shape"]))
    return ops


def _measure(model_bytes: bytes, bns: list, batches: Iterable[dict], reduce: Callable[[list], list]) -> tuple:
    """(one Moments per BN, samples, batches) over ``batches`` (each a feed dict)."""
    from .verify import _ort_session

    from .data import DataError

    run = _ort_session(model_bytes, mem_pattern=False)  # the statistics graph: see _ort_session
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
            mean, m2, shape = outs[3 * k], outs[3 * k + 1], outs[3 * k + 2]
            count = int(np.prod(shape)) // int(shape[1])
            if count:
                m.merge(Moments(count, np.asarray(mean, np.float64).reshape(-1), np.asarray(m2, np.float64).reshape(-1)))
        nb += 1
        samples += next(iter(feeds.values())).shape[0] if feeds else 0
    acc = reduce(acc)
    return acc, samples, nb


def write_stats(model: ModelProto, bns: list, moments: list, which: Iterable[int]) -> None:
    """Store new running mean/var (in each parameter's dtype) for the BNs at list indices ``which``;
    a parameter another node also reads is copied under a fresh name first."""
    from .graph import all_names, count_uses

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    uses = count_uses(model)
    names = all_names(model)
    for k in which:
        b, mo = bns[k], moments[k]
        if mo.count == 0:
            raise InputError(f"{b.name}: saw no values in the data")
        node = g.node[b.index]
        for pos, values in ((3, mo.mean), (4, mo.var)):
            old = inits[node.input[pos]]
            dtype = numpy_helper.to_array(old).dtype
            new = numpy_helper.from_array(values.astype(dtype).reshape(numpy_helper.to_array(old).shape), old.name)
            if uses[old.name] == 1:
                old.CopyFrom(new)
            else:
                base = f"{old.name}_recalibrated"
                name, j = base, 0
                while name in names:
                    j += 1
                    name = f"{base}_{j}"
                names.add(name)
                new.name = name
                g.initializer.append(new)
                inits[name] = g.initializer[-1]
                uses[old.name] -= 1
                uses[name] = 1
                node.input[pos] = name


def recalibrate(model: ModelProto, batches: Callable[[], Iterable[dict]], method: str = "batch", only=(), skip=(),
                reduce: Optional[Callable[[list], list]] = None, input_shapes: Optional[dict] = None,
                distributed: Optional["Distributed"] = None) -> dict:
    """Re-estimate the running statistics of ``model``'s BNs in place (see the module doc) over
    ``batches()`` (called once per pass; each call streams the data anew). ``reduce`` merges
    per-rank partial Moments (torch.distributed); returns the per-BN summary for the report."""
    if method not in METHODS:
        raise InputError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if distributed is not None:
        batches, reduce = distributed.shard(batches), distributed.reduce
    reduce = reduce or (lambda acc: acc)
    bns, notes = find_bns(model, only, skip)
    if not bns:
        raise InputError("no BatchNormalization to recalibrate (main graph, inference mode, initializer parameters)")
    rank_of, elem_of = _typing(model, input_shapes)
    moments = [None] * len(bns)
    passes = 0
    samples = nbatches = 0
    if method == "batch":
        inst = instrumented(model, bns, set(range(len(bns))), rank_of, elem_of)
        moments, samples, nbatches = _measure(inst.SerializeToString(), bns, _feeds(batches()), reduce)
        passes = 1
        write_stats(model, bns, moments, range(len(bns)))
    else:
        done = set()
        while len(done) < len(bns):
            ready = [k for k in range(len(bns)) if k not in done and bns[k].upstream <= done]
            if not ready:  # a cycle cannot happen in a valid graph; be safe
                ready = [k for k in range(len(bns)) if k not in done]
            inst = instrumented(model, bns, set(), rank_of, elem_of)
            acc, samples, nbatches = _measure(inst.SerializeToString(), bns, _feeds(batches()), reduce)
            for k in ready:
                moments[k] = acc[k]
            write_stats(model, bns, moments, ready)
            done.update(ready)
            passes += 1
    if distributed is not None:
        samples, nbatches = distributed.counts(samples, nbatches)
    per_bn = []
    for b, mo in zip(bns, moments):
        dm = np.abs(mo.mean - b.old_mean)
        ratio = mo.var / np.where(b.old_var > 0, b.old_var, np.nan)
        worst = np.argsort(-dm)[:3]
        per_bn.append({"node": b.name, "channels": b.channels, "values_seen": int(mo.count),
                       "max_abs_mean_change": float(dm.max()),
                       "max_var_ratio": float(np.nanmax(ratio)) if np.isfinite(ratio).any() else None,
                       "min_var_ratio": float(np.nanmin(ratio)) if np.isfinite(ratio).any() else None,
                       "most_changed_channels": [int(c) for c in worst],
                       "old_mean": [float(v) for v in b.old_mean[worst]], "new_mean": [float(v) for v in mo.mean[worst]]})
    return {"method": method, "passes": passes, "samples": samples, "batches": nbatches, "bns": per_bn, "notes": notes}


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


def drift(model: ModelProto, batches: Callable[[], Iterable[dict]], reduce=None) -> list:
    """Per BN, how far its running statistics are from its inputs' in inference mode over the data:
    the largest |mean shift| / sqrt(running var + eps) and the var ratios over channels."""
    bns, _ = find_bns(model)
    if not bns:
        return []
    inst = instrumented(model, bns, set(), *_typing(model, None))
    acc, _, _ = _measure(inst.SerializeToString(), bns, _feeds(batches()), reduce or (lambda a: a))
    out = []
    for b, mo in zip(bns, acc):
        shift = np.abs(mo.mean - b.old_mean) / np.sqrt(b.old_var + b.eps)
        ratio = (mo.var + b.eps) / (b.old_var + b.eps)
        out.append({"node": b.name, "max_mean_shift_sd": float(np.max(shift)),
                    "max_var_ratio": float(np.max(ratio)), "min_var_ratio": float(np.min(ratio)),
                    "worst_channel": int(np.argmax(shift))})
    return out


# --- a metric that says whether recalibration helped ---------------------------------------------

def classifier_metric(model_bytes: bytes, batches: Iterable[dict], reference_bytes: Optional[bytes] = None) -> Optional[dict]:
    """Top-1 accuracy against the data's ``label`` array, or (no labels) top-1 agreement with
    ``reference_bytes``'s predictions, on the first output when it is [N, K] with K >= 2."""
    from .data import LABEL
    from .verify import _ort_session

    from .data import DataError

    run = _ort_session(model_bytes)
    ref = _ort_session(reference_bytes) if reference_bytes is not None else None
    right = total = 0
    kind = None
    for b in batches:
        feeds = {k: v for k, v in b.items() if k != LABEL}
        try:
            out = np.asarray(run(feeds)[0])
        except Exception as e:
            raise DataError(f"--eval-data: the model does not run on it: "
                            f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:300]}") from None
        if out.ndim != 2 or out.shape[1] < 2:
            return None
        pred = np.argmax(out, axis=1)
        if LABEL in b:
            kind = "accuracy"
            truth = np.asarray(b[LABEL]).reshape(-1)
        elif ref is not None:
            kind = "agreement with the original"
            truth = np.argmax(np.asarray(ref(feeds)[0]), axis=1)
        else:
            return None
        right += int(np.sum(pred == truth))
        total += pred.size
    return {"metric": kind, "top1": right / total if total else None, "samples": total}


# --- many machines ------------------------------------------------------------------------------

class Distributed:
    """torch.distributed as torchrun sets it up (RANK, WORLD_SIZE, MASTER_ADDR): batches are
    sharded (batch i to rank i mod world size) and per-channel Moments gathered and merged in rank
    order, so that every rank computes the same statistics. gloo on CPU."""

    def __init__(self):
        import os

        try:
            import torch.distributed as dist
        except ImportError:
            raise InputError("recalibrating under torchrun needs PyTorch: pip install 'foldkit-onnx[torch]'") from None
        self.dist = dist
        if not dist.is_initialized():
            dist.init_process_group(backend=os.environ.get("FOLDKIT_DIST_BACKEND", "gloo"))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @staticmethod
    def requested() -> bool:
        import os

        try:
            return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
        except ValueError:
            return False

    def shard(self, batches: Callable[[], Iterable[dict]]) -> Callable[[], Iterable[dict]]:
        def mine():
            for i, b in enumerate(batches()):
                if i % self.world == self.rank:
                    yield b
        return mine

    def reduce(self, acc: list) -> list:
        payload = [(m.count, m.mean, m.m2) for m in acc]
        gathered = [None] * self.world
        self.dist.all_gather_object(gathered, payload)
        out = [Moments() for _ in acc]
        for per_rank in gathered:  # rank order: the same merge on every rank
            for m, (count, mean, m2) in zip(out, per_rank):
                m.merge(Moments(count, mean, m2))
        return out

    def counts(self, samples: int, batches: int) -> tuple:
        gathered = [None] * self.world
        self.dist.all_gather_object(gathered, (samples, batches))
        return sum(s for s, _ in gathered), sum(b for _, b in gathered)

    def close(self) -> None:
        try:
            self.dist.barrier()
            self.dist.destroy_process_group()
        except Exception:
            pass


def recalibrate_file(src: str, dst: str, data, *, method: str = "batch", fold: bool = True, only=(), skip=(),
                     batch_size: Optional[int] = None, max_samples: Optional[int] = None, eval_data=None,
                     max_drop: Optional[float] = None, report: Optional[str] = None, durable: bool = False,
                     input_shapes: Optional[dict] = None) -> dict:
    """``foldkit recalibrate``: re-estimate ``src``'s BN statistics on ``data`` (see foldkit.data),
    fold (unless ``fold=False``) with verification, judge the result on ``eval_data`` and write
    ``dst`` (and the JSON ``report``). ``batch_size`` None: a function's batches as it yields
    them, .npz data in slices of 32; given, every source is re-cut (foldkit.data.batching). Under
    torchrun, batch i (as cut here) goes to rank i mod world size; every rank measures its shard
    and rank 0 writes. Raises VerificationError (nothing written but the report) when the metric drops by
    more than ``max_drop`` points."""
    import os

    from . import io as fio
    from .api import fold as fold_api
    from .data import batching, files as data_files, fixed_batch, is_function, source as data_source
    from .errors import VerificationError
    from .report import Report
    from .text import to_json

    src, dst = os.fspath(src), os.fspath(dst)
    fio.guard_outputs({"-o": dst, "--report": report},
                      fio.model_files(src) + data_files(data) + data_files(eval_data))
    model = fio.load_model(src)
    original = fio.serialize(model) if eval_data is not None else None  # the --eval-data reference only
    source = data_source((data, batch_size, max_samples), model)
    dist = Distributed() if Distributed.requested() else None
    try:
        rec = recalibrate(model, source, method, only, skip, input_shapes=input_shapes, distributed=dist)
        rec["batching"] = batching(data, batch_size, fixed_batch(model))
        if is_function(data) and (batch_size or fixed_batch(model)):
            rec["notes"].append(f"the function's batches were {rec['batching']}; precise-BN statistics depend on "
                                "the batches (without --batch-size they are used as the function yields them)")
        if dist is not None and dist.rank != 0:
            return rec  # rank 0 alone writes
        if fold:
            result = fold_api(model, input_shapes=input_shapes)
            out_model, rep = result.model, result.report
        else:
            out_model, rep = model, Report(bn_before=sum(n.op_type == "BatchNormalization" for n in model.graph.node))
            rep.bn_after = rep.bn_before
            rep.unchanged = False
        rep.command, rep.inputs = "recalibrate", [src, os.fspath(data)] + ([os.fspath(eval_data)] if eval_data else [])
        d = rep.to_dict()
        d["recalibration"] = rec
        out_bytes = fio.serialize(out_model)
        metric = None
        if eval_data is not None:
            ev = data_source((eval_data, batch_size or None, None), model)
            before = classifier_metric(original, ev(), original)
            after = classifier_metric(out_bytes, ev(), original)
            if before is None or after is None:
                metric = {"note": "--eval-data: the first output is not classifier-like ([N, K] scores)"}
            else:
                metric = {"metric": before["metric"], "before": before["top1"], "after": after["top1"],
                          "samples": after["samples"],
                          "change_points": round(100 * (after["top1"] - before["top1"]), 6)}
        d["metric"] = metric
        failed = (metric is not None and max_drop is not None and "change_points" in metric
                  and -metric["change_points"] > max_drop)
        if report:
            fio.atomic_write(report, to_json(d).encode(), durable=durable)
        if failed:
            raise VerificationError(
                f"recalibration makes {metric['metric']} worse by {-metric['change_points']:.2f} points "
                f"({100 * metric['before']:.2f}% -> {100 * metric['after']:.2f}%), over --max-drop {max_drop:g}; "
                "nothing written but the report")
        fio.atomic_write(dst, out_bytes, durable=durable)
        return d
    finally:
        if dist is not None:
            dist.close()
