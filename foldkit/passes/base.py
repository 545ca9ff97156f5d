"""The pass interface and the context the passes share."""

from __future__ import annotations

from typing import Iterator, Optional

from onnx import ModelProto, NodeProto

from ..graph import GraphView, ModelIndex, subgraph_paths
from ..report import Report


def is_op(node: NodeProto, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in ("", "ai.onnx")


class FoldContext:
    def __init__(self, model: ModelProto, report: Report, base_dir: Optional[str] = None, defer: bool = False,
                 spill_dir: Optional[str] = None, spill_above: int = 0, **options):
        self.model = model
        self.report = report
        self.options = options
        self.converted_training = False  # set by the inference-mode pass when it converted a BN
        self.index = ModelIndex(model, base_dir, defer=defer, spill_dir=spill_dir, spill_above=spill_above)

    def walk(self) -> Iterator[tuple]:
        """Yield (view, graph_path) for every graph, children before parents.

        Each view is committed right after its consumer finishes with it (the generator resumes),
        and the source pages the pass read there leave the resident set (foldkit.tensors).
        """
        yield from self._walk(self.model.graph, None, "main")

    def _walk(self, graph, parent, path):
        view = GraphView(graph, self.index, parent)
        for node in view.nodes:
            for sub, sub_path in subgraph_paths(node, path):
                yield from self._walk(sub, view, sub_path)
        yield view, path
        view.commit()
        self.index.tensors.release()


STAGES = ("inference-mode", "fold", "final")


class Pass:
    """A rewrite. ``name`` is what ``--skip`` takes; ``run`` edits ``ctx.model`` in place.

    ``stage`` says when it runs: ``inference-mode`` first and alone (verification compares against
    the model after it), ``fold`` in the fixed-point loop with the other folds, ``final`` once at the
    end, in the order given."""

    name = "pass"
    stage = "fold"

    def run(self, ctx: FoldContext) -> bool:
        """Apply the pass everywhere; return True if anything changed."""
        changed = False
        for view, path in ctx.walk():
            changed |= self.run_graph(ctx, view, path)
        return changed

    def run_graph(self, ctx: FoldContext, view: GraphView, path: str) -> bool:
        raise NotImplementedError


class BNPass(Pass):
    """A rewrite of one BatchNormalization at a time: :meth:`run_bn` is called for every BN still
    in the graph (one that an earlier call removed is not visited)."""

    def run_graph(self, ctx: FoldContext, view: GraphView, path: str) -> bool:
        changed = False
        for i, bn in bn_nodes(view):
            changed |= bool(self.run_bn(ctx, view, path, i, bn))
        return changed

    def run_bn(self, ctx: FoldContext, view: GraphView, path: str, i: int, bn: NodeProto) -> bool:
        """Rewrite (or refuse, in the report) node ``i``; return True if it changed the graph."""
        raise NotImplementedError


def bn_nodes(view: GraphView):
    for i, node in enumerate(view.nodes):
        if i not in view.removed and is_op(node, "BatchNormalization"):
            yield i, node
