"""--lower-standalone: a BatchNormalization nothing can absorb becomes Mul + Add.

y = x * s + t with s, t precomputed in float64 and rounded once to x's dtype, shaped [C, 1, ...]
so that they broadcast over axis 1. For runtimes without a fused BatchNormalization kernel. Needs
the rank and type of x (from ONNX shape inference).
"""

from __future__ import annotations

import onnx

from ..graph import node_label
from .base import BNPass
from .common import Refusal, bn_affine, rounded


class LowerStandalone(BNPass):
    name = "lower"
    stage = "final"

    def run(self, ctx):
        if not ctx.options.get("lower_standalone"):
            return False
        return super().run(ctx)

    def run_bn(self, ctx, view, path, i, bn):
        label = node_label(bn)
        try:
            s, t = bn_affine(view, bn)
            x = bn.input[0]
            rank, elem = view.index.rank(x), view.index.elem_type(x)
            if rank is None or rank < 2 or not elem:
                raise Refusal(f"the rank or type of '{x}' is unknown, so the Mul/Add constants cannot be shaped")
            shape = (s.size,) + (1,) * (rank - 2)
            s_c = rounded(s.reshape(shape), elem, "lowered scale")
            t_c = rounded(t.reshape(shape), elem, "lowered shift")
        except Refusal as r:
            ctx.report.refuse(bn.output[0], label, path, "not lowered", str(r), r.code)
            return False
        names = [view.new_constant(arr, elem, f"{label}_{base}", i) for base, arr in (("scale", s_c), ("shift", t_c))]
        mid = view.index.fresh(f"{bn.output[0]}_scaled")
        view.insert_before(i, onnx.helper.make_node("Mul", [x, names[0]], [mid], name=view.index.fresh(f"{label}_mul")))
        view.rewrite_node(i, "Add", [mid, names[1]])
        e = ctx.report.entry(bn.output[0], label, path)
        e.action, e.target, e.reason = "lowered", None, "lowered to Mul + Add (--lower-standalone)"
        e.tensors = names
        return True
