"""Remove what the rewrites made dead, and nothing else.

- initializers (sparse ones too), Constant nodes and the ops that computed a weight from constants (Transpose of an
  initializer, Mul(W, mask), ConstantOfShape, ...) whose last use a pass removed (``ModelIndex.released``), transitively, unless
  they are graph inputs or outputs; constants the input model already left unused stay;
- ``value_info`` entries for values that no longer exist (renamed producer outputs, dropped
  running-statistics outputs);
- and the records of every constant a pass rewrote under its own name (a scalar bias widened to
  one value per channel, a weight whose dtype a QDQ fold kept): its ``value_info``, graph input and
  graph output entries take the tensor's element type and dims, so that no stale shape is left for
  onnx.checker or a runtime to trip on (jax2onnx writes a value_info for every initializer).

Graph input and output names, opset imports, metadata, doc strings and nodes of other domains are
never touched.
"""

from __future__ import annotations

from ..graph import CONST_OPS, PURE_OPS, iter_graphs
from .base import Pass, is_op


class Cleanup(Pass):
    name = "cleanup"
    stage = "final"

    def run(self, ctx):
        uses = ctx.index.uses  # the one count, kept by every GraphView edit (tests recount it after each pass)
        released = ctx.index.released
        changed = False
        for g in iter_graphs(ctx.model.graph):
            keep_io = {i.name for i in g.input} | {o.name for o in g.output}
            # Constant nodes, and pure ops that computed a weight a fold replaced, once nothing reads
            # them; removing one can free its inputs in turn
            dead_nodes = []
            while True:
                gone = set(dead_nodes)
                more = [k for k, n in enumerate(g.node) if k not in gone and len(n.output) == 1
                        and (is_op(n, "Constant") or (n.domain in ("", "ai.onnx") and n.op_type in PURE_OPS + CONST_OPS))
                        and n.output[0] in released and uses[n.output[0]] == 0 and n.output[0] not in keep_io]
                if not more:
                    break
                for k in more:
                    for name in g.node[k].input:
                        if name:
                            uses[name] -= 1
                            if uses[name] == 0:
                                released.add(name)
                dead_nodes += more
            for k in sorted(dead_nodes, reverse=True):
                del g.node[k]
            dead = [k for k, t in enumerate(g.initializer)
                    if t.name in released and uses[t.name] == 0 and t.name not in keep_io]
            for k in reversed(dead):
                ctx.index.tensors.discard(g.initializer[k].name)
                del g.initializer[k]
            dead_sparse = [k for k, t in enumerate(g.sparse_initializer)
                           if t.values.name in released and uses[t.values.name] == 0 and t.values.name not in keep_io]
            for k in reversed(dead_sparse):
                del g.sparse_initializer[k]
            live = set(keep_io) | {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
            for n in g.node:
                live.update(n.output)
            stale = [k for k, v in enumerate(g.value_info) if v.name not in live]
            for k in reversed(stale):
                del g.value_info[k]
            retyped = _retype_records(g, ctx.index.rewritten)
            changed |= bool(dead or dead_sparse or dead_nodes or stale or retyped)
        return changed


def _retype_records(g, rewritten: set) -> bool:
    """Give the records (value_info, graph input, graph output) of the constants in ``rewritten``
    that live in graph ``g`` the element type and dims of the tensor they now hold."""
    if not rewritten:
        return False
    tensors = {t.name: t for t in g.initializer if t.name in rewritten}
    for n in g.node:
        if is_op(n, "Constant") and n.output and n.output[0] in rewritten:
            value = next((a.t for a in n.attribute if a.name == "value"), None)
            if value is not None:
                tensors[n.output[0]] = value
    changed = False
    for v in list(g.value_info) + list(g.input) + list(g.output):
        t = tensors.get(v.name)
        if t is None or not v.type.HasField("tensor_type"):
            continue
        tt = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if tt.elem_type == t.data_type and tt.HasField("shape") and dims == list(t.dims):
            continue
        tt.elem_type = t.data_type
        tt.ClearField("shape")
        shape = tt.shape  # present, and empty for a scalar
        shape.SetInParent()
        for d in t.dims:
            shape.dim.add().dim_value = d
        changed = True
    return changed
