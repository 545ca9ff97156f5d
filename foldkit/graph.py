"""A small use-def index over an ONNX ModelProto, with scoped constant lookup.

Its neighbours: foldkit.attrs (stateless ONNX helpers: attributes, names, use counts) and
foldkit.tensors (where tensor bytes live; reading and writing them), both re-exported here, and
foldkit.constants (what a value computed from constants is), which GraphView.constant asks.

Why raw protobuf rather than onnx-ir: foldkit needs exactly four things (producer of a value, how
many times a value is used anywhere in the model, constants visible from a (sub)graph, fresh names)
and must leave every byte it does not rewrite as it was, so that output is deterministic and
round-trips. The index is rebuilt per graph in O(nodes); tensors are never copied to build it.

Use counts are model-wide (a node input in any graph, or a graph output of any graph, counts), so a
weight that an ``If``/``Loop`` body reads from the outer scope counts as shared with it.
"""

from __future__ import annotations

import bisect
from typing import Optional

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, NodeProto, TensorProto

from .constants import CONST_OPS, PURE_OPS, Const, computed_value, constant_node_value, evaluated_value  # noqa: F401
from .attrs import (BadAttribute, all_names, attr_float, attr_int, count_uses, default_opset, del_attr,  # noqa: F401
                    get_attr, iter_graphs, node_label, set_attr, subgraph_paths, subgraphs, value_types)
from .tensors import (_RAW_TYPES, FLOAT_TYPES, OpenFiles, TensorStore, make_tensor, memory_tensor,  # noqa: F401
                      np_dtype, sparse_to_array)


class ModelIndex:
    """Model-wide facts: use counts, the names taken, opset, and what the passes released."""

    def __init__(self, model: ModelProto, base_dir: Optional[str] = None, defer: bool = False,
                 spill_dir: Optional[str] = None, spill_above: int = 0):
        self.model = model
        # where tensor bytes live, and where new ones go: foldkit.tensors owns it
        self.tensors = TensorStore(base_dir, defer, spill_dir, spill_above, model)
        self.opset = default_opset(model)
        self.uses = count_uses(model)
        self.names = all_names(model)
        self.released: set = set()  # constant names whose last use a pass removed
        # constants a pass gave new contents under their old name (maybe another shape): cleanup
        # brings the value_info, graph input and output records of these names in line
        self.rewritten: set = set()
        self._types: Optional[dict] = None
        self.views: dict = {}  # id(graph) -> the GraphView over it, until that view commits

    def _type(self, name: str):
        if self._types is None:
            self._types = value_types(self._consistent())
        return self._types.get(name, (None, 0, None))

    def _consistent(self) -> ModelProto:
        """The model as shape inference should see it when the value types are first asked for.

        Folds keep the type of every value that survives them, so the types can be computed on
        the model with the pending edits applied, but not on the protobuf in the middle of a pass:
        a removed node is still there (its output renamed onto its producer: two producers) and a
        new Constant node (IR < 4) is not there yet, so inference could type nothing downstream of
        them and the unknown ranks would stay cached for the whole fold. Views are edited one at a
        time (children committed before their parent is yielded), so at most one has pending edits:
        inference then runs on a skeleton (foldkit.wire.checker_view: no payload copied) with that
        view's node list as commit will write it."""
        dirty = [v for v in self.views.values() if v.pending()]
        if not dirty:
            return self.model
        from .wire import checker_view

        skeleton = checker_view(self.model)
        view = dirty[0]
        position = next((k for k, g in enumerate(iter_graphs(self.model.graph)) if g is view.graph), None)
        if position is None:  # not reachable from the model (a view over a detached graph)
            return self.model
        target = list(iter_graphs(skeleton.graph))[position]
        del target.node[:]
        target.node.extend(view.pending_nodes())
        return skeleton

    def rank(self, name: str) -> Optional[int]:
        return self._type(name)[0]

    def dims(self, name: str) -> Optional[tuple]:
        """Dims of ``name`` as shape inference tells them (int, symbol str, or None each), or None."""
        return self._type(name)[2]

    def elem_type(self, name: str) -> int:
        """TensorProto elem type of ``name`` (0 when unknown)."""
        return self._type(name)[1]

    def fresh(self, base: str) -> str:
        """A name no value, initializer or node in the model has: ``base``, ``base_1``, ..."""
        base = base or "foldkit"
        name, k = base, 0
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def use(self, name: str) -> None:
        if name:
            self.uses[name] += 1

    def unuse(self, name: str) -> None:
        if name:
            self.uses[name] -= 1
            if self.uses[name] <= 0:
                self.released.add(name)


class GraphView:
    """One graph's nodes with producer/consumer maps and a parent scope for constants.

    Nodes are addressed by index into ``self.nodes`` (references into the protobuf). Removals and
    insertions are recorded and applied by :meth:`commit`, so indices stay valid during a pass.
    """

    def __init__(self, graph: GraphProto, index: ModelIndex, parent: Optional["GraphView"] = None):
        self.graph = graph
        self.index = index
        self.parent = parent
        self.nodes = list(graph.node)
        self.removed: set = set()
        self.inserted_before: dict = {}  # node idx -> [NodeProto]
        self.inserted_after: dict = {}  # node idx -> [NodeProto]
        self.producer = {}
        for i, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = i
        self.inputs = {i.name for i in graph.input}
        self.outputs = {o.name for o in graph.output}
        self.inits = {t.name: t for t in graph.initializer}
        self.sparse = {t.values.name: t for t in graph.sparse_initializer}
        self._consumers = None
        index.views[id(graph)] = self
        self._evaluated: dict = {}  # values of CONST_OPS nodes on constants, computed once

    # -- structure ---------------------------------------------------------------------------
    def consumers(self, name: str) -> list:
        """(node idx, input position) of every live node in this graph reading ``name``."""
        if self._consumers is None:
            cons: dict = {}
            for i, node in enumerate(self.nodes):
                for pos, inp in enumerate(node.input):
                    if inp:
                        cons.setdefault(inp, []).append((i, pos))
            self._consumers = cons
        return [(i, p) for i, p in self._consumers.get(name, []) if i not in self.removed]

    def invalidate(self) -> None:
        self._consumers = None

    def _unindex(self, i: int) -> None:
        """Before node ``i``'s inputs change: its entries leave the consumers index (if built)."""
        if self._consumers is None:
            return
        for name in set(self.nodes[i].input):
            entries = self._consumers.get(name)
            if entries:
                entries[:] = [e for e in entries if e[0] != i]

    def _reindex(self, i: int) -> None:
        """After node ``i``'s inputs changed: its entries join the index in the order a rebuild
        would give them (node, then input position), so that nothing downstream can tell."""
        if self._consumers is None:
            return
        for pos, name in enumerate(self.nodes[i].input):
            if name:
                bisect.insort(self._consumers.setdefault(name, []), (i, pos))

    def producer_of(self, name: str) -> Optional[int]:
        i = self.producer.get(name)
        return None if i is None or i in self.removed else i

    def is_graph_output(self, name: str) -> bool:
        return name in self.outputs

    def uses(self, name: str) -> int:
        return self.index.uses[name]

    # -- constants ---------------------------------------------------------------------------
    def constant(self, name: str, depth: int = 0) -> Optional[Const]:
        """The constant tensor called ``name`` as seen from this graph, or None.

        Besides initializers and Constant nodes, the output of a small pure op whose inputs are all
        constant (``PURE_OPS``: exporters write ``MatMul(x, Transpose(W))``) is evaluated here."""
        view: Optional[GraphView] = self
        while view is not None:
            if name in view.producer:
                i = view.producer[name]
                node = view.nodes[i]
                if i in view.removed or node.domain not in ("", "ai.onnx"):
                    return None
                if node.op_type == "Constant":
                    return constant_node_value(node, view)
                if node.op_type in PURE_OPS and len(node.output) == 1:
                    return computed_value(node, view, depth)
                if node.op_type in CONST_OPS and len(node.output) == 1:
                    if name not in view._evaluated:
                        view._evaluated[name] = evaluated_value(node, view, depth)
                    return view._evaluated[name]
                return None
            if name in view.inits or name in view.sparse:
                if name in view.inputs and (view.index.model.ir_version >= 4 or view.parent is not None):
                    return None  # an initializer that is also an input can be overridden at run time
                if name in view.inits:
                    t = view.inits[name]
                    return Const(name, view.index.tensors.array(t), t.data_type, view, "initializer")
                if name not in view._evaluated:  # densified once, only when a pass asks
                    sp = view.sparse[name]
                    view._evaluated[name] = Const(name, sparse_to_array(sp, view.index.tensors), sp.values.data_type,
                                                  view, "sparse")
                return view._evaluated[name]
            if name in view.inputs:
                return None
            view = view.parent
        return None

    def why_not_constant(self, name: str) -> str:
        view: Optional[GraphView] = self
        while view is not None:
            if name in view.inits and name in view.inputs:
                return (f"'{name}' is also a graph input, so it can be overridden at run time "
                        "(--freeze-initializer-inputs removes such inputs so that they fold)")
            if name in view.producer or name in view.inputs or name in view.inits:
                break
            view = view.parent
        return f"'{name}' is not a constant initializer"

    def set_constant(self, i: int, pos: int, array, data_type: int, base: str) -> str:
        """Give ``node`` input ``pos`` the constant ``array`` (already rounded to its dtype; an
        array or a ScaledChannels, which a deferred payload keeps as is until it is written).

        Overwrites the existing constant in place only when this node is its sole user and it lives
        in this graph; otherwise (shared weight, outer-scope weight, missing optional input) a new
        constant with a fresh name is created and the old one is left untouched for its other users.
        """
        node = self.nodes[i]
        old = node.input[pos] if pos < len(node.input) else ""
        const = self.constant(old) if old else None
        store = self.index.tensors
        if const is not None and const.owner is self and self.uses(old) == 1 and const.kind not in ("computed", "sparse"):
            self.index.rewritten.add(old)
            if self.index._types is not None:
                shape = tuple(getattr(array, "shape", np.shape(array)))
                self.index._types[old] = (len(shape), data_type, shape)
            if const.kind == "initializer":
                store.place(array, data_type, self.inits[old], top_level=self.parent is None)  # in place
            else:
                tensor = make_tensor(array, data_type)
                tensor.name = old
                cnode = self.nodes[self.producer[old]]
                del cnode.attribute[:]
                cnode.attribute.append(onnx.helper.make_attribute("value", tensor))
            return old
        name = self.index.fresh(base)
        tensor = TensorProto()
        tensor.name = name
        as_node = self.index.model.ir_version < 4  # see add_constant
        # only a top-level initializer may hold a deferred payload: the writer fills those alone
        store.place(array, data_type, tensor, top_level=self.parent is None and not as_node)
        self.add_constant(tensor, before=i if as_node else None)
        self._unindex(i)
        while len(node.input) <= pos:
            node.input.append("")
        node.input[pos] = name
        self._reindex(i)
        self.index.unuse(old)
        self.index.use(name)
        return name

    def add_constant(self, tensor: TensorProto, before: Optional[int] = None) -> None:
        """A new constant: an initializer, or (IR < 4, where every initializer must also be a graph
        input) a Constant node, so that the graph's inputs never change."""
        if before is None:
            self.graph.initializer.append(tensor)
            self.inits[tensor.name] = self.graph.initializer[-1]
        else:
            cnode = onnx.helper.make_node("Constant", [], [tensor.name], value=tensor)
            self.insert_before(before, cnode)

    # -- edits --------------------------------------------------------------------------------
    def remove(self, i: int) -> None:
        self.removed.add(i)  # consumers() leaves removed nodes out: the index stays valid
        for name in self.nodes[i].input:
            self.index.unuse(name)

    def _insert(self, table: dict, i: int, node: NodeProto) -> None:
        table.setdefault(i, []).append(node)
        for name in node.input:
            self.index.use(name)
        for out in node.output:
            self.index.names.add(out)

    def insert_before(self, i: int, node: NodeProto) -> None:
        self._insert(self.inserted_before, i, node)

    def insert_after(self, i: int, node: NodeProto) -> None:
        self._insert(self.inserted_after, i, node)

    def new_constant(self, array: np.ndarray, data_type: int, base: str, near: int) -> str:
        """A new constant (already rounded) under a fresh name, usable by node ``near``; its name."""
        tensor = make_tensor(array, data_type)
        tensor.name = self.index.fresh(base)
        self.add_constant(tensor, before=near if self.index.model.ir_version < 4 else None)
        return tensor.name

    def rewrite_node(self, i: int, op_type: str, inputs: list) -> None:
        """Turn node ``i`` into ``op_type(inputs)`` (default domain, no attributes), same outputs."""
        node = self.nodes[i]
        self._unindex(i)
        for name in node.input:
            self.index.unuse(name)
        node.op_type, node.domain = op_type, ""
        del node.attribute[:]
        del node.input[:]
        node.input.extend(inputs)
        for name in inputs:
            self.index.use(name)
        self._reindex(i)

    def set_input(self, i: int, pos: int, name: str) -> None:
        node = self.nodes[i]
        self._unindex(i)
        self.index.unuse(node.input[pos])
        node.input[pos] = name
        self.index.use(name)
        self._reindex(i)

    def rename_output(self, i: int, pos: int, new: str) -> None:
        node = self.nodes[i]
        old = node.output[pos]
        self.producer.pop(old, None)
        node.output[pos] = new
        self.producer[new] = i

    def pending(self) -> bool:
        """Whether removals or insertions wait for :meth:`commit`."""
        return bool(self.removed or self.inserted_before or self.inserted_after)

    def pending_nodes(self) -> list:
        """The node list :meth:`commit` will write (the live nodes themselves, not copies)."""
        out = []
        for i, node in enumerate(self.nodes):
            out.extend(self.inserted_before.get(i, ()))
            if i not in self.removed:
                out.append(node)
            out.extend(self.inserted_after.get(i, ()))
        return out

    def commit(self) -> bool:
        """Apply removals and insertions to the protobuf. Returns True if the node list changed."""
        if self.index.views.get(id(self.graph)) is self:
            del self.index.views[id(self.graph)]
        if not self.pending():
            return False
        new_nodes = []
        for node in self.pending_nodes():
            copy = NodeProto()
            copy.CopyFrom(node)
            new_nodes.append(copy)
        del self.graph.node[:]
        self.graph.node.extend(new_nodes)
        return True
