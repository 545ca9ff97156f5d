"""ONNX helpers with no state: graphs and subgraphs, model-wide use counts and names, typed
attributes, node labels, and the value types shape inference can tell."""

from __future__ import annotations

from collections import Counter
from typing import Iterator

import onnx
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto

from .wire import payload_nbytes

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


def subgraphs(node: NodeProto) -> Iterator[GraphProto]:
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == AttributeProto.GRAPHS:
            yield from attr.graphs


def subgraph_paths(node: NodeProto, path: str) -> Iterator[tuple]:
    """(subgraph, its report path) for each graph attribute of ``node``: ``path/node.attr[k]``."""
    for attr in node.attribute:
        subs = [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs)
        for k, sub in enumerate(subs):
            yield sub, f"{path}/{node_label(node)}.{attr.name if len(subs) == 1 else f'{attr.name}[{k}]'}"


def iter_graphs(graph: GraphProto) -> Iterator[GraphProto]:
    """The graph and every subgraph below it, depth first, in node order."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from iter_graphs(sub)


def count_uses(model: ModelProto) -> Counter:
    uses: Counter = Counter()
    for g in iter_graphs(model.graph):
        for node in g.node:
            for name in node.input:
                if name:
                    uses[name] += 1
        for out in g.output:
            uses[out.name] += 1
    return uses


def all_names(model: ModelProto) -> set:
    names = set()
    for g in iter_graphs(model.graph):
        names.update(i.name for i in g.input)
        names.update(o.name for o in g.output)
        names.update(t.name for t in g.initializer)
        names.update(t.values.name for t in g.sparse_initializer)
        names.update(v.name for v in g.value_info)
        for node in g.node:
            names.update(node.input)
            names.update(node.output)
            if node.name:
                names.add(node.name)
    return names


def default_opset(model: ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    return 1


def get_attr(node: NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class BadAttribute(ValueError):
    """An attribute has the wrong type for its op; the message is a sentence for the report."""


def _typed_attr(node: NodeProto, name: str, default, want: int, what: str):
    for a in node.attribute:
        if a.name == name:
            if a.type != want:
                raise BadAttribute(f"attribute '{name}' of {node_label(node)} is {AttributeProto.AttributeType.Name(a.type)}, "
                                   f"expected {what}")
            return onnx.helper.get_attribute_value(a)
    return default


def attr_int(node: NodeProto, name: str, default: int) -> int:
    return int(_typed_attr(node, name, default, AttributeProto.INT, "INT"))


def attr_float(node: NodeProto, name: str, default: float) -> float:
    value = float(_typed_attr(node, name, default, AttributeProto.FLOAT, "FLOAT"))
    if value != value or value in (float("inf"), float("-inf")):
        raise BadAttribute(f"attribute '{name}' of {node_label(node)} is not finite")
    return value


def set_attr(node: NodeProto, name: str, value) -> None:
    del_attr(node, name)
    node.attribute.append(onnx.helper.make_attribute(name, value))


def del_attr(node: NodeProto, name: str) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            return


def node_label(node: NodeProto) -> str:
    """A stable, readable id: the node name, else its op and first output."""
    return node.name or f"{node.op_type}({node.output[0] if node.output else '?'})"


def value_types(model: ModelProto) -> dict:
    """(rank or None, elem_type, dims or None) of every value ONNX shape inference can tell, across
    all graphs; a dim is an int, a symbol (str) or None (unknown).

    Large float initializers are detached while inference runs (it only needs their dims), so a
    big model is not copied whole; they are put back before returning.
    """
    stash = []
    for g in iter_graphs(model.graph):
        for t in g.initializer:
            if t.data_type in FLOAT_TYPES and t.data_location != TensorProto.EXTERNAL and t.HasField("raw_data") \
                    and payload_nbytes(t) > 4096:
                stash.append((t, t.raw_data))
                t.ClearField("raw_data")
    target = model
    if len(model.graph.sparse_initializer):  # typed as inputs (shape inference ignores them), not copied
        from .wire import GRAPH_FIELD, copy_without, without_payloads

        target = copy_without(model, GRAPH_FIELD)
        target.graph.CopyFrom(without_payloads(model.graph, lambda t: False))
    try:  # data propagation gives the dims of shapes computed in the graph (Shape -> Gather -> Reshape)
        inferred = onnx.shape_inference.infer_shapes(target, strict_mode=False, data_prop=True)
    except Exception:
        try:
            inferred = onnx.shape_inference.infer_shapes(target, strict_mode=False)
        except Exception:  # a model shape inference cannot handle: ranks stay unknown
            inferred = model
    finally:
        for t, raw in stash:
            t.raw_data = raw
    types = {}
    for g in iter_graphs(inferred.graph):
        for v in list(g.input) + list(g.output) + list(g.value_info):
            tt = v.type.tensor_type
            if v.type.HasField("tensor_type"):
                dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                             for d in tt.shape.dim) if tt.HasField("shape") else None
                types[v.name] = (len(dims) if dims is not None else None, tt.elem_type, dims)
        for t in g.initializer:
            types[t.name] = (len(t.dims), t.data_type, tuple(t.dims))
    return types
