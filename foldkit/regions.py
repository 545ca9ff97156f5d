"""Local verification: each rewrite's own region, cut out of the original and the folded model and
run before/after on ONNX Runtime, whatever the rest of the graph needs.

A node of the folded model is *rewritten* when no node of the original has the same op, inputs,
outputs and attributes, or when it reads a constant a rewrite wrote (a weight folded in place keeps
its name). Rewritten nodes joined by the values between them form a region. Its outputs are the
values the rest of the graph (or the graph's outputs) reads from it; its inputs are the variable
values it reads from outside. In the original, the region is the slice that computes those outputs
from those inputs (e.g. Conv -> BN for a fold into the producer, BN -> Conv for a fold into the
consumer, the parallel branches and their Adds for a branch merge). Both slices become small models
with the real weights; they run on the same seeded random inputs, with shapes from shape inference
(symbolic sizes from --input-shape, else 1 for the first dimension and 8 for the others).

Every region of the main graph goes into one model pair (one ONNX Runtime session each), so the
cost is that of running the rewritten ops once. Rewrites inside If/Loop/Scan bodies are verified
only end to end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, helper

from .graph import iter_graphs

UNKNOWN_DIM = 8  # a spatial size when nothing says otherwise (big enough for a 7x7 kernel with pads)


@dataclass
class Regions:
    reference: Optional[ModelProto] = None  # the original's slices, one model
    candidate: Optional[ModelProto] = None  # the rewritten slices, one model
    inputs: dict = field(default_factory=dict)  # name -> (elem_type, shape)
    defaulted: list = field(default_factory=list)  # inputs whose shape was (partly) a default, not inferred
    outputs: list = field(default_factory=list)
    count: int = 0
    skipped: list = field(default_factory=list)  # sentences: what could not be cut out, and why


def _sig(node) -> bytes:
    n = onnx.NodeProto()
    n.CopyFrom(node)
    n.name = ""
    n.doc_string = ""
    return n.SerializeToString(deterministic=True)


def _consts(graph) -> dict:
    out = {t.name: t for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.output:
            out[n.output[0]] = n
    return out


def inferred_shapes(model: ModelProto, input_shapes: Optional[dict]) -> dict:
    """name -> (elem_type, [dims] with None for unknown), from shape inference with the graph
    inputs' symbolic dims fixed."""
    m = ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    given = input_shapes or {}
    inits = {t.name for t in m.graph.initializer}
    for inp in m.graph.input:
        if inp.name in inits or not inp.type.HasField("tensor_type") or not inp.type.tensor_type.HasField("shape"):
            continue
        dims = inp.type.tensor_type.shape.dim
        want = given.get(inp.name)
        for k, d in enumerate(dims):
            if want is not None and k < len(want):
                d.Clear()
                d.dim_value = int(want[k])
            elif not (d.HasField("dim_value") and d.dim_value > 0):
                d.Clear()
                d.dim_value = 1
    try:
        m = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
    except Exception:  # shape inference itself failed: every shape unknown, defaults apply
        pass
    out = {}
    for v in list(m.graph.input) + list(m.graph.value_info) + list(m.graph.output):
        if v.type.HasField("tensor_type"):
            tt = v.type.tensor_type
            dims = None
            if tt.HasField("shape"):
                dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
            out[v.name] = (tt.elem_type, dims)
    return out


def cut(reference: ModelProto, candidate: ModelProto, written: set, input_shapes: Optional[dict] = None,
        max_nodes: int = 64) -> Regions:
    """The regions the rewrites changed (see the module doc), as one reference/candidate model pair."""
    res = Regions()
    if len(list(iter_graphs(candidate.graph))) > 1 and any(
            (n.op_type in ("If", "Loop", "Scan")) for n in candidate.graph.node):
        res.skipped.append("rewrites inside If/Loop/Scan bodies are verified end to end only")
    ref_g, cand_g = reference.graph, candidate.graph
    ref_sigs = {_sig(n) for n in ref_g.node}
    ref_prod = {o: n for n in ref_g.node for o in n.output if o}
    cand_consts, ref_consts = _consts(cand_g), _consts(ref_g)
    changed = [n for n in cand_g.node
               if not (n.op_type == "Constant" and n.domain in ("", "ai.onnx"))
               and (_sig(n) not in ref_sigs or any(i in written for i in n.input))]
    if not changed:
        return res
    # components of rewritten nodes joined by the values between them
    producer = {o: k for k, n in enumerate(changed) for o in n.output if o}
    parent = list(range(len(changed)))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a
    for k, n in enumerate(changed):
        for i in n.input:
            if i in producer:
                parent[find(k)] = find(producer[i])
    readers = {}
    for n in cand_g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    changed_ids = {id(n) for n in changed}
    graph_outputs = {o.name for o in cand_g.output}
    comps = {}
    for k, n in enumerate(changed):
        comps.setdefault(find(k), []).append(n)
    shapes = inferred_shapes(reference, input_shapes)
    ref_nodes, cand_nodes, ins, outs = [], [], {}, []
    ref_inits, cand_inits = {}, {}
    for nodes in comps.values():
        produced = {o for n in nodes for o in n.output if o}
        region_out = [o for o in produced if o in graph_outputs or any(id(r) not in changed_ids for r in readers.get(o, []))]
        region_in = []
        for n in nodes:
            for i in n.input:
                if i and i not in produced and i not in cand_consts and i not in region_in:
                    region_in.append(i)
        # the original's slice: back from the outputs to the inputs
        slice_nodes, stack, seen, ok = [], list(region_out), set(), True
        while stack and ok:
            v = stack.pop()
            if v in seen or v in region_in or v in ref_consts:
                continue
            seen.add(v)
            p = ref_prod.get(v)
            if p is None:
                ok = False
                break
            if p not in slice_nodes:
                slice_nodes.append(p)
                stack.extend(i for i in p.input if i)
            if len(slice_nodes) > max_nodes:
                ok = False
        missing = [o for o in region_out if o not in ref_prod]
        if not ok or missing or not region_out:
            res.skipped.append(f"the rewrite producing {', '.join(region_out) or '?'} could not be cut out of the original")
            continue
        typed = [(i, shapes.get(i)) for i in region_in]
        if any(t is None or t[1] is None for _, t in typed):
            res.skipped.append(f"the rewrite producing {', '.join(region_out)} has an input of unknown rank")
            continue
        order = {id(n): k for k, n in enumerate(ref_g.node)}
        slice_nodes.sort(key=lambda n: order[id(n)])
        ref_nodes += slice_nodes
        cand_nodes += nodes
        for i, (et, dims) in typed:
            ins[i] = (et, [d if d is not None else (1 if k == 0 else UNKNOWN_DIM) for k, d in enumerate(dims)])
            if any(d is None for d in dims):
                res.defaulted.append(i)
        outs += region_out
        for src, dst, used in ((ref_consts, ref_inits, slice_nodes), (cand_consts, cand_inits, nodes)):
            for n in used:
                for i in n.input:
                    if i in src and i not in dst:
                        dst[i] = src[i]
        res.count += 1
    if not res.count:
        return res
    res.inputs, res.outputs = ins, outs

    def build(nodes, consts):
        inits = [c for c in consts.values() if isinstance(c, TensorProto)]
        cnodes = [c for c in consts.values() if not isinstance(c, TensorProto)]
        g = helper.make_graph(cnodes + list(nodes), "foldkit_regions",
                              [helper.make_tensor_value_info(n, et, dims) for n, (et, dims) in ins.items()],
                              [helper.make_tensor_value_info(o, shapes.get(o, (0, None))[0] or 0, None) for o in outs],
                              inits)
        m = helper.make_model(g, opset_imports=list(candidate.opset_import))
        m.ir_version = candidate.ir_version
        return m
    res.reference = build(ref_nodes, ref_inits)
    res.candidate = build(cand_nodes, cand_inits)
    return res


def feeds_for(regions: Regions, seed: int) -> dict:
    from .graph import np_dtype

    rng = np.random.default_rng(seed + 1)
    feeds = {}
    for name, (et, dims) in regions.inputs.items():
        dtype = np_dtype(et)
        if np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16":
            feeds[name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            feeds[name] = rng.random(dims) < 0.5
        else:
            feeds[name] = rng.integers(0, 4, size=dims).astype(dtype)
    return feeds


SHRUNK_DIM = 16


def _inferable(regions: Regions) -> bool:
    """Whether both region models pass strict shape inference with their current input sizes (a
    cut that breaks what a weight fixes, a MatMul's K or a kernel larger than the cut, does not)."""
    try:
        for m in (regions.reference, regions.candidate):
            onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True, data_prop=True)
    except Exception:
        return False
    return True


def _declare(regions: Regions, name: str) -> None:
    for m in (regions.reference, regions.candidate):  # the region models declare the new sizes
        for i in m.graph.input:
            if i.name == name:
                i.CopyFrom(helper.make_tensor_value_info(i.name, *regions.inputs[i.name]))


def shrink(regions: Regions, max_bytes: int) -> None:
    """Regions whose inputs would exceed ``max_bytes`` run on smaller inputs: every dim the rewrite
    does not depend on is cut, the batch (dim 0) first, to 1, then each other dim to SHRUNK_DIM, until
    the inputs fit. A dim is cut only if both region models still pass strict shape inference, so a
    dim the weights fix (channels, a MatMul's K, room for a kernel) is kept. The rewritten weights
    are the same, ops are independent along the batch, and Conv-like regions are
    translation-equivariant, so the check still covers every folded value. Said in ``skipped``."""
    from .graph import np_dtype

    def total():
        return sum(int(np.prod(d, dtype=np.float64)) * np.dtype(np_dtype(et)).itemsize for et, d in regions.inputs.values())
    if total() <= max_bytes:
        return
    checked = _inferable(regions)  # else (inference cannot judge these regions) cut by position, as before
    cut = []
    rank = max((len(d) for _, d in regions.inputs.values()), default=0)
    for k in range(rank):
        for name, (et, dims) in sorted(regions.inputs.items()):
            if k >= len(dims) or total() <= max_bytes or (not checked and k < 2):
                continue
            to = 1 if k == 0 else min(dims[k], SHRUNK_DIM)
            if to == dims[k]:
                continue
            old = list(dims)
            regions.inputs[name] = (et, dims[:k] + [to] + dims[k + 1:])
            _declare(regions, name)
            if checked and not _inferable(regions):
                regions.inputs[name] = (et, old)
                _declare(regions, name)
                continue
            cut.append(f"{name}[{k}] {old[k]} -> {to}")
    if cut:
        regions.skipped.append("region inputs over the --max-input-mb cap: the dims the rewrites do not depend on "
                               f"were cut ({', '.join(cut[:6])}{', ...' if len(cut) > 6 else ''})")
    if total() > max_bytes:
        regions.count = 0
        regions.skipped.append("even so the region inputs exceed the --max-input-mb cap")
