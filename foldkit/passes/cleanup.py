"""Remove what the rewrites made dead, and nothing else.

- initializers, Constant nodes and the ops that computed a weight from constants (Transpose of an
  initializer, Mul(W, mask), ConstantOfShape, ...) whose last use a pass removed (``ModelIndex.released``), transitively, unless
  they are graph inputs or outputs; constants the input model already left unused stay;
- ``value_info`` entries for values that no longer exist (renamed producer outputs, dropped
  running-statistics outputs).

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
            live = set(keep_io) | {t.name for t in g.initializer}
            for n in g.node:
                live.update(n.output)
            stale = [k for k, v in enumerate(g.value_info) if v.name not in live]
            for k in reversed(stale):
                del g.value_info[k]
            changed |= bool(dead or dead_nodes or stale)
        return changed
