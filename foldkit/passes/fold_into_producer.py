"""Fold a per-channel affine map (BatchNormalization, or Mul/Add/Sub/Div by a constant) into the op
that produces its input.

With y = s * z + t per output channel (see foldkit.math) and z the producer's output:

- Conv (1-D/2-D/3-D, any group, strides/dilations/pads/auto_pad), weight [C_out, C_in/g, k...]:
  W' = W * s[o], b' = b * s + t.
- ConvTranspose (any group, output_padding), weight [C_in, C_out/g, k...]: output channel of
  W[i, j] is (i // (C_in/g)) * (C_out/g) + j; W' scales that channel, b' = b * s + t.
- Gemm (any transA/alpha/beta): Y = alpha * A' B' + beta * C; B' scaled along N (axis 1 of B when
  transB=0, axis 0 when transB=1); C' = beta * C * s + t and beta := 1 (C' = t when C is absent).
- MatMul with a constant 2-D weight [K, N], optionally followed by Add of a constant bias that
  broadcasts along N: W' = W * s, bias' = bias * s + t. Without an Add, the folded node becomes
  ``Add(z, t)`` (or disappears when t = 0). A BN needs the MatMul output to be 2-D (its channel
  axis 1 is then the last axis); a Mul/Add constant needs only to broadcast along the last axis.

For Mul/Add/Sub/Div the constant must broadcast per output channel (or be a scalar): this covers
FrozenBatchNorm-style exports and BN that a converter already decomposed into Mul + Add.

A chain of such maps, each read only by the next (Conv -> Div -> Add -> BN, as torch.ao's QAT ConvBn
exports; Conv -> BN -> Mul), is one map s = s_n * ... * s_1, t = s_n * (... (s_2 * t_1 + t_2) ...) + t_n,
composed in float64 and folded at once: the weight is rounded once, and a chain whose members each
have a negative scale for some channel but whose product does not (QAT's Div by s then BN by s)
folds into a quantized weight where its members one by one could not. When the whole chain cannot
fold, its longest prefix that can does.

Preconditions (each refusal is reported for a BN with its reason, and leaves the graph exactly as
it was): BN in inference mode with constant parameters and var + eps > 0, finite; the producer's
output is read by this node alone and is not a graph output; weights and biases are constant float
tensors; the channel counts agree; the folded values fit the weight's dtype. A weight shared with
another node or read from an outer scope is cloned, never mutated under its other users.
"""

from __future__ import annotations

import numpy as np

from ..graph import node_label, set_attr
from ..math import fold_bias, output_channels
from .affine import Chain, affine_nodes, affine_of, chain_after, described, report_folded, report_refused
from .base import Pass, is_op
from .layout import LAYOUT, Moved, channel_axis_after, data_uses, is_layout, producer_axis, through_layout
from . import qdq
from ..codes import Why
from .common import Refusal, float_attr, int_attr, rounded, scaled_weight, weight

FOLDABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Concat")
# (also through Transpose / Reshape / Flatten / Squeeze / Unsqueeze / Identity: see .layout)
SPLITTABLE = ("Conv", "ConvTranspose", "Gemm")  # producers a BN after a Concat is split into


class _Slice:
    """Channels [lo, hi) of a per-channel map whose full (s, t) is already known."""

    def __init__(self, aff, s, t, lo, hi):
        self.node, self.x, self.is_bn = aff.node, aff.x, getattr(aff, "is_bn", False)
        self.s, self.t, self.lo, self.hi = s, t, lo, hi

    def st(self, c, neg, rank, op):
        if c != self.hi - self.lo:
            raise Refusal(f"channel count mismatch: the {op} produces {c} channels, its part of the Concat is "
                          f"{self.hi - self.lo}", Why.INVALID_PARAMETERS)
        return self.s[self.lo:self.hi], self.t[self.lo:self.hi]


class FoldIntoProducer(Pass):
    name = "producer"
    stage = "fold"

    def run_graph(self, ctx, view, path):
        changed = False
        self.options = ctx.options
        self.notes = ctx.report.notes
        for i, node in affine_nodes(view):
            try:
                target, written, said = self._fold(view, i, node)
            except Refusal as r:
                report_refused(ctx, node, path, "not folded into its producer", r)
                continue
            along = f" (with {len(said) - 1} more per-channel op(s) after it, as one map)" if len(said) > 1 else ""
            report_folded(ctx, path, said, target, written,
                          lambda n: f"folded into the preceding {target}" + (along if n == 0 else " with the map before it"))
            changed = True
        return changed

    def _fold(self, view, i, node):
        """(target, tensors written, what each node folded was: see affine.described)."""
        if not is_op(node, "BatchNormalization"):
            # cheap structural checks before reading any constant
            if not any(view.producer_of(n) is not None and view.nodes[view.producer_of(n)].op_type in FOLDABLE + LAYOUT
                       for n in node.input):
                ps = [view.nodes[view.producer_of(n)] for n in node.input if view.producer_of(n) is not None]
                ps = [q for q in ps if q.op_type != "Constant"]
                what = " or ".join(f"{q.op_type} '{node_label(q)}'" for q in ps) or "a graph input"
                raise Refusal(f"its input comes from {what}, which has no weights to fold into")
        aff = affine_of(view, node)
        chain = chain_after(view, i, aff)
        for n in range(len(chain), 0, -1):  # the whole chain, else its longest prefix that folds
            part = chain[:n]
            said = described([a for _, a in part])  # before any rewrite
            try:
                target, written = self._fold_map(view, i, node, part[0][1] if n == 1 else Chain([a for _, a in part]),
                                                 [j for j, _ in part])
            except Refusal:
                if n == 1:
                    raise
                continue
            return target, written, said

    def _fold_map(self, view, i, node, aff, members):
        x = aff.x
        pi = view.producer_of(x)
        if pi is None:
            raise Refusal(f"its input '{x}' is not computed by a node in this graph")
        p = view.nodes[pi]
        if p.op_type == "DequantizeLinear" and p.domain in ("", "ai.onnx"):
            qi = view.producer_of(p.input[0])
            before = view.nodes[qi] if qi is not None else None
            if before is not None and before.op_type == "QuantizeLinear":
                src = view.producer_of(before.input[0])
                what = f"{view.nodes[src].op_type} '{node_label(view.nodes[src])}'" if src is not None else "its input"
                raise Refusal(f"its input is re-quantized (QuantizeLinear -> DequantizeLinear) after {what}: folding "
                              "would remove a rounding step; fold before quantizing (`foldkit fold` on the float "
                              "model, or onnxruntime's quant_pre_process)", Why.QUANTIZATION)
        if view.is_graph_output(x):
            raise Refusal(f"the {p.op_type} output '{x}' is also a graph output")
        if view.uses(x) != 1:
            raise Refusal(f"the {p.op_type} output '{x}' is also read by {view.uses(x) - 1} other node(s)")
        splice_at, through = pi, ""
        if is_layout(p) and p.input and p.input[0]:  # Conv -> Transpose / ... -> the map: where the channels survive
            pi, p, aff, through = self._through_layout(view, x, aff)
        if p.domain not in ("", "ai.onnx") or p.op_type not in FOLDABLE:
            raise Refusal(f"its input comes from {p.op_type} '{node_label(p)}', which has no weights to fold into")
        last = members[-1]
        out = view.nodes[last].output[0]
        if p.op_type == "Concat":
            if through:
                raise Refusal(f"its input comes through {through} from a Concat")
            apply = self._split(view, last, node, pi, p, aff)
        else:
            apply = getattr(self, "_plan_" + p.op_type)(view, pi, p, aff, last)
        # every check has passed: apply the plan (constants, attributes), then splice the chain out
        # unless the plan rewrote its last node itself (MatMul without a bias Add)
        target, splice, written = apply()
        for j in members[:-1]:
            view.remove(j)
        if splice:
            view.remove(last)
            view.rename_output(splice_at, 0, out)
        return target + (f" through {through}" if through else ""), written

    def _through_layout(self, view, x, aff):
        """(producer index, producer, the map read on the moved channel axis, 'Transpose 't', ...')
        for a map whose input comes through layout ops, or Refusal."""
        z, chain = through_layout(view, x)
        through = ", ".join(f"{view.nodes[j].op_type} '{node_label(view.nodes[j])}'" for j in chain)
        pi = view.producer_of(z)
        p = view.nodes[pi] if pi is not None else None
        if p is None or p.domain not in ("", "ai.onnx") or p.op_type not in FOLDABLE or p.op_type == "Concat":
            what = "a graph input or constant" if p is None else f"{p.op_type} '{node_label(p)}'"
            raise Refusal(f"its input comes through {through} from {what}, which has no weights to fold into")
        # readers of only its shape (Shape, Size: LeViT's reshape_as) still see the same shape, since
        # the producer's output keeps its name and dims: they do not stop the fold
        if view.is_graph_output(z) or data_uses(view, z) != 1:
            raise Refusal(f"the {p.op_type} output '{z}' is also read elsewhere (before {through})")
        at = producer_axis(view, p, z)
        if at is None:
            raise Refusal(f"the rank of the {p.op_type} output '{z}' is unknown")
        try:
            neg, rank = channel_axis_after(view, chain, *at)
        except Refusal:
            members = getattr(aff, "members", [aff])
            x_rank = view.index.rank(x)
            if x_rank is None or not all(getattr(a, "const", None) is not None and a.const.array.size == 1
                                         for a in members):
                raise
            # a scalar map commutes with any move of the elements; its rank is checked against x's
            # (a scalar of higher rank than x would broadcast x to more dims)
            neg, rank = -1, x_rank
        return pi, p, Moved(aff, neg, rank, z, x), through

    def _split(self, view, i, node, ci, cat, aff):
        """A per-channel map after a Concat (MixConv, Inception-style branches): each branch's
        channel range folds into its own producer, a Conv, ConvTranspose or Gemm read only by the
        Concat; all branches or none. Exact: the map is per channel, so it commutes with Concat."""
        rank = view.index.rank(cat.output[0])
        axis = int_attr(cat, "axis", 0)
        if rank is None:
            raise Refusal("the rank of the Concat output is unknown")
        if axis % rank != 1:
            raise Refusal(f"the Concat joins axis {axis}, not the channel axis 1")
        branches, sizes = [], []
        for name in cat.input:
            bi = view.producer_of(name)
            if bi is None or view.nodes[bi].domain not in ("", "ai.onnx") or view.nodes[bi].op_type not in SPLITTABLE:
                what = "a graph input or constant" if bi is None else f"{view.nodes[bi].op_type} '{node_label(view.nodes[bi])}'"
                raise Refusal(f"its input comes from a Concat whose input '{name}' is {what}, not a Conv, "
                              "ConvTranspose or Gemm")
            if view.uses(name) != 1 or view.is_graph_output(name):
                raise Refusal(f"the Concat input '{name}' is also read elsewhere")
            b = view.nodes[bi]
            w = weight(view, b, 1, f"{b.op_type} weight")
            if w is None:
                raise Refusal(f"the {b.op_type} '{node_label(b)}' has no weight")
            kind = {"Conv": "conv", "ConvTranspose": "conv_transpose"}.get(b.op_type) or (
                "rows" if int_attr(b, "transB", 0) else "cols")
            sizes.append(output_channels(w.array.shape, kind, int_attr(b, "group", 1)))
            branches.append((bi, b))
        if len({bi for bi, _ in branches}) != len(branches):
            raise Refusal("the Concat reads one producer twice")
        s, t = aff.st(sum(sizes), 1 - rank, rank, "Concat")
        plans, lo = [], 0
        for (bi, b), c in zip(branches, sizes):
            part = _Slice(aff, s, t, lo, lo + c)
            plans.append(getattr(self, "_plan_" + b.op_type)(view, bi, b, part, i))
            lo += c
        def apply():
            targets, written = [], []
            for plan in plans:  # every branch passed its checks: apply all
                target, _, wrote = plan()
                targets.append(target)
                written += wrote
            return f"Concat '{node_label(cat)}' split into {', '.join(targets)}", True, written
        return apply

    def _qdq(self, view, pi, p, aff, qw, out_axis, rank, bias_pos, what):
        """Fold into a quantized weight (see foldkit.passes.qdq): codes, scale and zero point of its
        DequantizeLinear, and a float bias."""
        c = qw.shape[out_axis]
        a, t = aff.st(c, 1 - rank if what != "Gemm" else -1, rank if what != "Gemm" else 2, what)
        planned = qdq.plan(view, qw, a, out_axis, bool(self.options.get("qdq_reflect")), what)
        b = weight(view, p, bias_pos, f"{what} bias", ndim=(0, 1, 2) if what == "Gemm" else 1)
        beta = float_attr(p, "beta", 1.0) if what == "Gemm" else 1.0
        if b is not None:
            b_arr = b.array.astype(np.float64)
            if b_arr.ndim >= 1 and b_arr.shape[-1] not in (1, c):
                raise Refusal(f"the {what} bias of shape {list(b_arr.shape)} does not broadcast over {c} channels")
            b_new = beta * b_arr * a + t
        else:
            b_new = t
        b_type = b.data_type if b is not None else qw.scale_type
        b_new = rounded(b_new, b_type, "folded bias")
        skip_b = b is None and not np.any(t)
        notes = self.notes

        def apply():
            written = []
            qdq.apply(view, pi, qw, planned, node_label(p), written, notes)
            if not skip_b:
                written.append(view.set_constant(pi, bias_pos, b_new, b_type, f"{node_label(p)}_bias_folded"))
                if what == "Gemm" and beta != 1.0:
                    set_attr(p, "beta", 1.0)
            return f"{what} '{node_label(p)}' (quantized weight: codes, scales and a float bias)", True, written
        return apply

    def _conv_like(self, view, pi, p, aff, kind):
        group = int_attr(p, "group", 1)
        qw = qdq.quantized_weight(view, p, 1)
        if qw is not None:
            if kind == "conv_transpose" and group != 1:
                raise Refusal("a grouped ConvTranspose's output channels cannot take per-channel weight scales")
            return self._qdq(view, pi, p, aff, qw, 0 if kind == "conv" else 1, qw.codes.ndim, 2, p.op_type)
        w = weight(view, p, 1, f"{p.op_type} weight")
        if w is None or w.array.ndim < 3:
            raise Refusal(f"the {p.op_type} weight is missing or has rank < 3")
        if group < 1 or w.array.shape[0] % group:
            raise Refusal(f"group={group} does not divide the weight's first dimension {w.array.shape[0]}")
        rank = w.array.ndim
        s, t = aff.st(output_channels(w.array.shape, kind, group), 1 - rank, rank, p.op_type)
        b = weight(view, p, 2, f"{p.op_type} bias", ndim=1)
        b_new = fold_bias(None if b is None else b.array, s, t)
        w_new = scaled_weight(w, s, kind, group)
        b_type = w.data_type if b is None else b.data_type
        b_new = rounded(b_new, b_type, "folded bias")
        scale_only = not np.any(t) and b is None

        bias = None if scale_only else (b_new, b_type, f"{node_label(p)}_bias_folded" if b is None else f"{b.name}_folded")
        return _weight_and_bias(view, pi, p, w, w_new, bias)

    def _plan_Conv(self, view, pi, p, aff, i):
        return self._conv_like(view, pi, p, aff, "conv")

    def _plan_ConvTranspose(self, view, pi, p, aff, i):
        return self._conv_like(view, pi, p, aff, "conv_transpose")

    def _plan_Gemm(self, view, pi, p, aff, i):
        qw = qdq.quantized_weight(view, p, 1)
        if qw is not None:
            if qw.codes.ndim != 2:
                raise Refusal("the quantized Gemm B is not 2-D")
            return self._qdq(view, pi, p, aff, qw, 0 if int_attr(p, "transB", 0) else 1, 2, 2, "Gemm")
        w = weight(view, p, 1, "Gemm B", ndim=2)
        if w is None:
            raise Refusal("the Gemm has no B input")
        kind = "rows" if int_attr(p, "transB", 0) else "cols"
        s, t = aff.st(output_channels(w.array.shape, kind), -1, 2, "Gemm")
        c = weight(view, p, 2, "Gemm C", ndim=(0, 1, 2))
        beta = float_attr(p, "beta", 1.0)
        w_new = scaled_weight(w, s, kind, 1)
        if c is None:
            c_new, c_type = t, w.data_type
        else:
            c_arr = c.array.astype(np.float64)
            if c_arr.ndim >= 1 and c_arr.shape[-1] not in (1, s.size):
                raise Refusal(f"the Gemm C of shape {list(c_arr.shape)} does not broadcast over {s.size} columns")
            c_new, c_type = beta * c_arr * s + t, c.data_type
        c_new = rounded(c_new, c_type, "folded C")
        skip_c = c is None and not np.any(t)

        bias = None if skip_c else (c_new, c_type, f"{node_label(p)}_C_folded" if c is None else f"{c.name}_folded")
        return _weight_and_bias(view, pi, p, w, w_new, bias, after=(lambda: set_attr(p, "beta", 1.0)) if beta != 1.0 else None)

    def _plan_MatMul(self, view, pi, p, aff, i):
        if getattr(aff, "shift_only", False):
            raise Refusal("an Add after a MatMul is already its bias")
        w = weight(view, p, 1, "MatMul weight", ndim=2)
        if w is None:
            raise Refusal("the MatMul has no constant weight")
        s, t = aff.st(w.array.shape[1], -1, view.index.rank(aff.x), "MatMul")
        w_new = scaled_weight(w, s, "cols", 1)
        # the shift becomes an Add where the map was: after the layout ops, if any, on the axis the
        # channels have there
        x = getattr(aff, "x_after", aff.x)
        t_new = rounded(t.reshape((-1,) + (1,) * (-getattr(aff, "neg", -1) - 1)), w.data_type, "folded bias")

        def apply():
            written = []
            written.append(view.set_constant(pi, 1, w_new, w.data_type, f"{w.name}_folded"))
            if not np.any(t):
                return f"MatMul '{node_label(p)}'", True, written
            bias = view.new_constant(t_new, w.data_type, f"{node_label(p)}_bias_folded", i)
            written.append(bias)
            view.rewrite_node(i, "Add", [x, bias])
            return f"MatMul '{node_label(p)}' (the {'BN' if aff.is_bn else 'op'} became its bias Add)", False, written
        return apply

    def _plan_Add(self, view, pi, p, aff, i):
        # MatMul -> Add(bias) -> BN/Mul/Add
        for mpos in (0, 1):
            mi = view.producer_of(p.input[mpos])
            if mi is not None and is_op(view.nodes[mi], "MatMul"):
                break
        else:
            raise Refusal(f"its input comes from Add '{node_label(p)}', which does not add a bias to a MatMul")
        m = view.nodes[mi]
        mm_out = p.input[mpos]
        if view.uses(mm_out) != 1:
            raise Refusal(f"the MatMul output '{mm_out}' is read by more than the bias Add")
        bias = weight(view, p, 1 - mpos, "Add bias", ndim=(0, 1, 2))
        if bias is None:
            raise Refusal("the Add has no constant bias")
        w = weight(view, m, 1, "MatMul weight", ndim=2)
        if w is None:
            raise Refusal("the MatMul has no constant weight")
        n = w.array.shape[1]
        b_arr = bias.array.astype(np.float64)
        if b_arr.ndim and (b_arr.shape[-1] not in (1, n) or any(d != 1 for d in b_arr.shape[:-1])):
            raise Refusal(f"the Add bias of shape {list(b_arr.shape)} is not per-column")
        s, t = aff.st(n, -1, view.index.rank(aff.x), "MatMul")
        w_new = scaled_weight(w, s, "cols", 1)
        b_new = rounded((b_arr * s + t).reshape(b_arr.shape[:-1] + (n,)), bias.data_type, "folded bias")

        def apply():
            written = []
            written.append(view.set_constant(mi, 1, w_new, w.data_type, f"{w.name}_folded"))
            written.append(view.set_constant(pi, 1 - mpos, b_new, bias.data_type, f"{bias.name}_folded"))
            return f"MatMul '{node_label(m)}' + Add '{node_label(p)}'", True, written
        return apply


def _weight_and_bias(view, pi, p, w, w_new, bias=None, after=None):
    """A plan's apply() for a producer whose input 1 is the weight and input 2 the bias (Conv,
    ConvTranspose, Gemm): ``w_new`` replaces ``w``; ``bias``, an (array, dtype, name) triple,
    replaces or adds input 2 (None: left as it is); ``after`` runs once that bias is in place."""
    def apply():
        written = [view.set_constant(pi, 1, w_new, w.data_type, f"{w.name}_folded")]
        if bias is not None:
            written.append(view.set_constant(pi, 2, *bias))
            if after is not None:
                after()
        return f"{p.op_type} '{node_label(p)}'", True, written
    return apply
