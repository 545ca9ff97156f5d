"""Per-channel affine maps y = s * x + t: what a BN is, and what a Mul/Add/Sub/Div by a constant is.

A pass that found where the channels of ``x`` are (their count C, the axis as a negative index
``neg`` and the rank of ``x`` when known) asks :meth:`Affine.st` for (s, t) as float64 vectors of
length C, or gets a Refusal saying why the map is not per-channel there.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..graph import node_label
from .base import is_op
from ..codes import Why
from .common import Refusal, bn_affine

ARITH = ("Mul", "Add", "Sub", "Div")


def per_channel(arr: np.ndarray, c: int, neg: int, rank: Optional[int], what: str) -> np.ndarray:
    """A constant broadcast against x (channels on axis ``neg``) as a length-C vector, or Refusal.

    Numpy/ONNX broadcasting aligns shapes on the right: the constant's dim at ``k + neg`` meets the
    channel axis; every other dim must be 1, and the constant must not have more dims than x.
    """
    a = np.asarray(arr, dtype=np.float64)
    k = a.ndim
    if a.size == 1:
        if rank is not None and k > rank:
            raise Refusal(f"the {what} constant has rank {k}, more than its input's {rank}")
        if rank is None and k > 2:
            raise Refusal(f"the {what} constant has rank {k} and the rank of its input is unknown")
        return np.full(c, float(a.reshape(-1)[0]))
    if rank is None and k > 2:
        raise Refusal(f"the rank of the {what} input is unknown, so its constant cannot be shown to be per-channel")
    if rank is not None and k > rank:
        raise Refusal(f"the {what} constant has rank {k}, more than its input's {rank}")
    pos = k + neg
    if pos < 0 or a.shape[pos] not in (1, c) or any(d != 1 for j, d in enumerate(a.shape) if j != pos):
        raise Refusal(f"the {what} constant of shape {list(a.shape)} is not per-channel")
    return np.broadcast_to(a.reshape(-1), (c,)).astype(np.float64).copy() if a.shape[pos] == 1 else a.reshape(-1).copy()


class Affine:
    """What to fold: ``x`` (the variable input), ``node`` (the BN or arithmetic op)."""

    def __init__(self, node, x: str):
        self.node, self.x = node, x

    @property
    def is_bn(self) -> bool:
        return is_op(self.node, "BatchNormalization")

    def st(self, c: int, neg: int, rank: Optional[int], op: str):
        raise NotImplementedError


class BNAffine(Affine):
    """A BN normalizes axis 1 of its input."""

    def __init__(self, view, node):
        super().__init__(node, node.input[0])
        self.s, self.t = bn_affine(view, node)

    def st(self, c, neg, rank, op):
        if self.s.size != c:
            raise Refusal(f"channel count mismatch: the BN has {self.s.size} channels, the {op} produces {c}", Why.INVALID_PARAMETERS)
        if rank is None:
            raise Refusal(f"the rank of '{self.x}' is unknown, so the BN channel axis cannot be shown to be the {op}'s output-channel axis")
        if neg != 1 - rank:
            raise Refusal(f"the BN normalizes axis 1 of a rank-{rank} {op} output, not the axis the weight's columns produce")
        return self.s, self.t


class ArithAffine(Affine):
    """x * c, c * x, x + d, d + x, x - d, x / c with a constant c or d."""

    def __init__(self, view, node):
        op = node.op_type
        if len(node.input) != 2:
            raise Refusal(f"{op} does not have two inputs")
        consts = [view.constant(n) for n in node.input]
        if op in ("Sub", "Div"):
            order = [(0, 1)]
        else:
            order = [(0, 1), (1, 0)]
        for xi, ci in order:
            if consts[ci] is not None and consts[xi] is None:
                break
        else:
            raise Refusal(f"{op} '{node_label(node)}' has no constant operand")
        super().__init__(node, node.input[xi])
        self.const = consts[ci]
        if not np.issubdtype(self.const.array.dtype, np.floating) and self.const.array.dtype.name != "bfloat16":
            raise Refusal(f"the {op} constant is not a float tensor")
        v = self.const.array.astype(np.float64)
        if not np.all(np.isfinite(v)):
            raise Refusal(f"the {op} constant holds NaN or Inf values")
        if op == "Div" and np.any(v == 0):
            raise Refusal("the Div constant has zeros")

    def st(self, c, neg, rank, op):
        op_type = self.node.op_type
        v = per_channel(self.const.array, c, neg, rank, op_type)
        one, zero = np.ones(c), np.zeros(c)
        if op_type == "Mul":
            return v, zero
        if op_type == "Div":
            return 1.0 / v, zero
        return one, (v if op_type == "Add" else -v)

    @property
    def shift_only(self) -> bool:
        return self.node.op_type in ("Add", "Sub")


def never_per_channel(aff) -> bool:
    """A Mul/Add/Sub/Div whose constant has more than one dim above 1 (a positional table, say):
    per-channel on no axis, whatever the layout."""
    const = getattr(aff, "const", None)
    return const is not None and sum(d != 1 for d in const.array.shape) > 1


def affine_of(view, node) -> Affine:
    if is_op(node, "BatchNormalization"):
        return BNAffine(view, node)
    if node.domain in ("", "ai.onnx") and node.op_type in ARITH:
        return ArithAffine(view, node)
    raise Refusal(f"{node.op_type} is not a per-channel affine map")


def report_left(ctx) -> None:
    """A "kept" entry, with the reason and code of its last refusal, for every per-channel
    Mul/Add/Sub/Div by a constant still in the model once the passes are done: a constant with at
    most one dim above 1 (a per-channel vector), or a scalar whose input is read by it alone and
    comes from a Conv, ConvTranspose, Gemm or MatMul with a constant weight (through layout ops or
    not). Scalar ops inside activations (GELU, hardswish) read a value other nodes read too, and
    an attention's scale follows a MatMul of two variables: neither is listed. Nor is an Add of a
    constant after a MatMul (through layout ops or not) that reads it alone: that is its bias."""
    from ..report import Action
    from .layout import data_uses, is_layout

    for view, path in ctx.walk():
        for i, node in enumerate(view.nodes):
            if i in view.removed or node.domain not in ("", "ai.onnx") or node.op_type not in ARITH:
                continue
            try:
                aff = ArithAffine(view, node)
            except Refusal:
                continue
            if never_per_channel(aff):
                continue
            j, alone = view.producer_of(aff.x), view.uses(aff.x) == 1
            while j is not None and is_layout(view.nodes[j]) and view.nodes[j].input and view.nodes[j].input[0]:
                alone = alone and data_uses(view, view.nodes[j].input[0]) == 1
                j = view.producer_of(view.nodes[j].input[0])
            p = view.nodes[j] if j is not None else None
            if node.op_type in ("Add", "Sub") and p is not None and is_op(p, "MatMul") and alone:
                continue  # a MatMul's bias (LeViT's after its Flatten), not a map to fold
            if aff.const.array.size == 1:
                weighted = p is not None and p.domain in ("", "ai.onnx") and len(p.input) > 1 and \
                    p.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and view.constant(p.input[1]) is not None
                if not (alone and weighted):  # q @ k^T * scale: no weights to fold into
                    continue
            lines, code = ctx.report._affine_why.get((path, node.output[0]), (["no rewrite applies"], "not_applicable"))
            ctx.report.affine.append(Action(node=node_label(node), action="kept", graph=path,
                                            reason=f"{node.op_type} by a constant not folded: {'; '.join(lines)}",
                                            code=code))


class Chain:
    """Consecutive per-channel affine maps as one: (s, t) composed in float64,
    s = s_n * ... * s_1, t = s_n * (... (s_2 * t_1 + t_2) ...) + t_n."""

    def __init__(self, members):
        self.members = members  # [Affine], in graph order
        self.node, self.x = members[0].node, members[0].x
        self.is_bn = any(getattr(m, "is_bn", False) for m in members)
        self.shift_only = all(getattr(m, "shift_only", False) for m in members)

    def st(self, c, neg, rank, op):
        s, t = np.ones(c), np.zeros(c)
        for m in self.members:
            sm, tm = m.st(c, neg, rank, op)
            s, t = sm * s, sm * t + tm
        return s, t


def chain_after(view, i, first) -> list:
    """[(node index, Affine)] of the map ``first`` at node ``i`` and the per-channel maps after it,
    each the only reader of the one before (it stops at one that is never per-channel)."""
    out = [(i, first)]
    while True:
        y = out[-1][1].node.output[0]
        if view.uses(y) != 1 or view.is_graph_output(y):
            return out
        cons = view.consumers(y)
        if len(cons) != 1:  # read from a subgraph
            return out
        j = cons[0][0]
        nxt = view.nodes[j]
        if nxt.domain not in ("", "ai.onnx") or nxt.op_type not in ARITH + ("BatchNormalization",):
            return out
        try:
            aff = affine_of(view, nxt)
        except Refusal:
            return out
        if aff.x != y or never_per_channel(aff):
            return out
        out.append((j, aff))


def affine_nodes(view):
    """(index, node) of every BN and Mul/Add/Sub/Div still in the view: what the folds visit."""
    for i, node in enumerate(view.nodes):
        if i not in view.removed and node.domain in ("", "ai.onnx") and (
                node.op_type == "BatchNormalization" or node.op_type in ARITH):
            yield i, node


def described(members) -> list:
    """(op type, output, label) of each map, taken before a rewrite renames anything."""
    return [(a.node.op_type, a.node.output[0], node_label(a.node)) for a in members]


def report_refused(ctx, node, path, stage: str, r) -> None:
    """A refusal of a fold: in the BN's entry, or among a Mul/Add's reasons (said if it stays)."""
    if is_op(node, "BatchNormalization"):
        ctx.report.refuse(node.output[0], node_label(node), path, stage, str(r), r.code)
    else:
        ctx.report.refuse_affine(node.output[0], path, str(r), r.code, stage)


def report_folded(ctx, path, said, target: str, written, why) -> None:
    """Each map of ``said`` (see :func:`described`) folded into ``target``; ``why(n)`` is the reason
    for the n-th ("folded into ...")."""
    from ..report import Action

    for n, (op, out, label) in enumerate(said):
        if op == "BatchNormalization":
            entry = ctx.report.entry(out, label, path)
            entry.action, entry.target, entry.reason = "folded", target, why(n)
            entry.tensors = list(written)
        else:
            ctx.report.affine.append(Action(node=label, action="folded", target=target, graph=path,
                                            reason=f"{op} by a constant {why(n)}", tensors=list(written)))
