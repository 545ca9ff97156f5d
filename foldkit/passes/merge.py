"""Merge a BatchNormalization with the per-channel affine op that follows it.

BN1 -> BN2, or BN1 -> Mul/Add/Sub/Div by a per-channel (axis 1) or scalar constant: the composition
is one affine map y = s * x + t with s = s2 * s1, t = s2 * t1 + t2. It is written back into BN1 as
gamma = s * sqrt(1 + eps), beta = t, mean = 0, var = 1 (so BN1 computes exactly s * x + t in
float64 before rounding), BN1 takes over the follower's output name and the follower is removed.
The merged BN can then fold into a neighbour on the next round, or be lowered.
"""

from __future__ import annotations

import numpy as np

from ..graph import node_label
from ..report import Action
from .affine import ARITH, ArithAffine, BNAffine
from .base import BNPass
from .common import Refusal, float_attr, rounded


class MergeAffine(BNPass):
    name = "merge"
    stage = "fold"

    def run_bn(self, ctx, view, path, i, bn):
        y = bn.output[0]
        cons = view.consumers(y)
        if len(cons) != 1 or view.uses(y) != 1 or view.is_graph_output(y):
            return False
        j, pos = cons[0]
        nxt = view.nodes[j]
        if nxt.domain not in ("", "ai.onnx") or pos != 0 and nxt.op_type in ("BatchNormalization", "Sub", "Div"):
            return False
        if nxt.op_type != "BatchNormalization" and nxt.op_type not in ARITH:
            return False
        try:
            first = BNAffine(view, bn)
            c = first.s.size
            if nxt.op_type == "BatchNormalization":
                second = BNAffine(view, nxt)
                s2, t2 = second.st(c, 1 - 2, 2, "BatchNormalization")  # both normalize axis 1
            else:
                second = ArithAffine(view, nxt)
                rank = view.index.rank(bn.input[0])
                s2, t2 = second.st(c, 1 - rank if rank else -1, rank, "BatchNormalization")
                if rank is None and second.const.array.size != 1:
                    raise Refusal("the rank of the BN input is unknown")
            s, t = s2 * first.s, s2 * first.t + t2
            eps = float_attr(bn, "epsilon", 1e-5)
            params = [view.constant(n) for n in bn.input[1:5]]
            gamma = rounded(s * np.sqrt(1.0 + eps), params[0].data_type, "merged scale")
            beta = rounded(t, params[1].data_type, "merged shift")
            mean = rounded(np.zeros_like(s), params[2].data_type, "merged mean")
            var = rounded(np.ones_like(s), params[3].data_type, "merged var")
        except Refusal:
            return False
        for pos_, arr, p in zip(range(1, 5), (gamma, beta, mean, var), params):
            view.set_constant(i, pos_, arr, p.data_type, f"{node_label(bn)}_merged_{('scale', 'B', 'mean', 'var')[pos_ - 1]}")
        out = nxt.output[0]
        view.remove(j)
        view.rename_output(i, 0, out)
        label = node_label(nxt)
        target = f"BatchNormalization '{node_label(bn)}'"
        if nxt.op_type == "BatchNormalization":
            e = ctx.report.entry(out, label, path)
            e.action, e.target, e.reason = "merged", target, f"merged into the preceding {target}"
        else:
            ctx.report.affine.append(Action(node=label, action="merged", target=target, graph=path,
                                            reason=f"{nxt.op_type} by a constant merged into {target}"))
        ctx.report.rekey(y, out)  # BN1 is now known by the follower's output name
        view.invalidate()
        return True
