"""Fold a per-channel affine map into the op that consumes its output (y = s * x + t feeds a linear
op): a BatchNormalization, a Mul/Add/Sub/Div by a per-channel or scalar constant (a BN a converter
decomposed: ``Relu -> Mul -> Add -> Conv``), or a chain of them each read only by the next,
composed in float64 into one map.

- Conv with no padding (pads all zero or auto_pad=VALID), any group, weight [C_out, C_in/g, k...]:
  W'[o, i, k] = W[o, i, k] * s[c], b'[o] = b[o] + sum_{i,k} W[o, i, k] * t[c], c = the input channel
  of (o, i). With padding the border windows would see the padded zeros, which the map would have
  shifted by t: that is not exact, so it is refused, unless t = 0 (a pure scale keeps zeros zero).
- Gemm with transA=0 (BN on A's columns K): B' = diag(s) B_eff, C' = beta * C + alpha * t B_eff,
  beta := 1 (B_eff = B, or B^T when transB=1).
- MatMul with a constant 2-D weight [K, N] and a 2-D input (the BN channel axis is then K):
  W' = diag(s) W, bias t W added to a following constant bias Add, or a new Add.

Preconditions: BN in inference mode with valid constant parameters; its output read only by that
op (as its data input) and not a graph output; constant float weights; channel counts agree.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..graph import node_label, set_attr
from ..math import fold_into_conv_consumer
from .affine import Chain, affine_nodes, affine_of, chain_after, described, report_folded, report_refused
from .base import Pass, is_op
from .layout import channel_axis_after, is_layout, shape_readers
from ..codes import Why
from .common import Refusal, float_attr, int_attr, rounded, weight


class FoldIntoConsumer(Pass):
    name = "consumer"
    stage = "fold"

    def run_graph(self, ctx, view, path):
        changed = False
        for i, node in affine_nodes(view):
            try:
                aff = affine_of(view, node)
            except Refusal as r:
                if is_op(node, "BatchNormalization"):
                    report_refused(ctx, node, path, "not folded into its consumer", r)
                continue
            chain = chain_after(view, i, aff)
            said = described([a for _, a in chain])
            try:
                target, written = self._fold(view, [j for j, _ in chain], aff if len(chain) == 1
                                             else Chain([a for _, a in chain]))
            except Refusal as r:
                report_refused(ctx, node, path, "not folded into its consumer", r)
                continue
            more = " with the maps next to it" if len(said) > 1 else ""
            report_folded(ctx, path, said, target, written, lambda n: f"folded into the following {target}{more}")
            changed = True
        return changed

    def _fold(self, view, members, aff):
        """Fold the map ``aff`` (nodes ``members``, in order) into the op that reads its output."""
        y = view.nodes[members[-1]].output[0]  # the map's output (a BN's, or its chain's last op's)
        if view.is_graph_output(y):
            raise Refusal(f"its output '{y}' is a graph output")
        # a reader of only the shape (Shape, Size) reads the map's input instead: the same shape
        shape_only = shape_readers(view, y)
        cons = [cq for cq in view.consumers(y) if cq not in shape_only]
        if view.uses(y) - len(shape_only) != 1 or len(cons) != 1:
            raise Refusal(f"its output '{y}' is read by {view.uses(y)} nodes")
        j, pos = cons[0]
        c = view.nodes[j]
        layout = []  # Transpose / Reshape / ... between the map and the op: the channels followed through
        while is_layout(c) and pos == 0 and c.input and c.input[0]:
            out = c.output[0]
            nxt = view.consumers(out)
            if view.is_graph_output(out) or view.uses(out) != 1 or len(nxt) != 1:
                raise Refusal(f"the {c.op_type} '{node_label(c)}' after it is read by {view.uses(out)} nodes")
            layout.append(j)
            j, pos = nxt[0]
            c = view.nodes[j]
        if c.op_type == "QuantizeLinear" and c.domain in ("", "ai.onnx"):
            raise Refusal(f"it is followed by QuantizeLinear '{node_label(c)}': the op after it reads a quantized "
                          "input, so folding into it would change what is quantized; fold before quantizing",
                          Why.QUANTIZATION)
        if c.domain not in ("", "ai.onnx") or c.op_type not in ("Conv", "Gemm", "MatMul") or pos != 0:
            raise Refusal(f"it is followed by {c.op_type} '{node_label(c)}', which cannot absorb it")
        x = aff.x
        ch, neg, rank = self._channels(view, c)
        if layout:
            neg, rank = self._axis_before(view, layout, y, neg, rank)
        s, t = aff.st(ch, neg, rank, c.op_type)
        apply = getattr(self, "_plan_" + c.op_type)(view, j, c, s, t, x)
        written = apply()
        for k in members:
            view.remove(k)
        view.set_input(layout[0] if layout else j, 0, x)
        for k, q in shape_only:
            view.set_input(k, q, x)
        through = f" (through {', '.join(f'{view.nodes[k].op_type} {node_label(view.nodes[k])!r}' for k in layout)})" \
            if layout else ""
        return f"{c.op_type} '{node_label(c)}'{through}", written

    @staticmethod
    def _axis_before(view, layout, y, neg, rank):
        """(axis as a negative index, rank) on the map's output ``y`` of the channels the op after the
        layout ops reduces over (its axis ``neg`` of ``rank``), or Refusal."""
        r0 = view.index.rank(y)
        if r0 is None:
            raise Refusal(f"the rank of '{y}' is unknown")
        found = []
        for a in range(r0):
            try:
                b, r = channel_axis_after(view, layout, a, r0)
            except Refusal:
                continue
            if r == rank and b == neg:
                found.append(a)
        if len(found) != 1:
            names = ", ".join(f"{view.nodes[k].op_type} '{node_label(view.nodes[k])}'" for k in layout)
            raise Refusal(f"the channels the op reduces over are not one axis of their own before {names}")
        return found[0] - r0, r0

    @staticmethod
    def _channels(view, c):
        """(input channels, their axis as a negative index, the input's rank) of the consumer."""
        if c.op_type == "Conv":
            w = weight(view, c, 1, "Conv weight")
            if w is None or w.array.ndim < 3:
                raise Refusal("the Conv weight is missing or has rank < 3")
            return w.array.shape[1] * int_attr(c, "group", 1), 1 - w.array.ndim, w.array.ndim
        if c.op_type == "Gemm":
            if int_attr(c, "transA", 0):
                raise Refusal("the following Gemm has transA=1, so the channels are not its reduction axis")
            w = weight(view, c, 1, "Gemm B", ndim=2)
            if w is None:
                raise Refusal("the Gemm has no B input")
            return w.array.shape[1 if int_attr(c, "transB", 0) else 0], -1, 2
        rank = view.index.rank(c.input[0])
        if rank is None or rank < 2:
            raise Refusal("the rank of the MatMul input is unknown, so its reduction axis cannot be shown to be "
                          "the channels'")
        w = weight(view, c, 1, "MatMul weight", ndim=2)
        if w is None:
            raise Refusal("the MatMul has no constant weight")
        return w.array.shape[0], -1, rank  # the last axis: a BN's axis 1 only for a 2-D input

    def _plan_Conv(self, view, j, c, s, t, x):
        auto_pad = next((a.s.decode(errors="replace") for a in c.attribute if a.name == "auto_pad"), "NOTSET")
        pads = next((list(a.ints) for a in c.attribute if a.name == "pads"), [])
        if (auto_pad not in ("NOTSET", "VALID") or any(pads)) and np.any(t):
            raise Refusal(f"the following Conv '{node_label(c)}' pads its input with zeros, which the shift "
                          "would have changed, so folding would be inexact at the borders")
        group = int_attr(c, "group", 1)
        w = weight(view, c, 1, "Conv weight")
        if w is None or w.array.ndim < 3:
            raise Refusal("the Conv weight is missing or has rank < 3")
        if group < 1 or w.array.shape[0] % group:
            raise Refusal(f"group={group} does not divide the Conv's output channels")
        if w.array.shape[1] * group != s.size:
            raise Refusal(f"channel count mismatch: the BN has {s.size} channels, the Conv reads {w.array.shape[1] * group}", Why.INVALID_PARAMETERS)
        b = weight(view, c, 2, "Conv bias", ndim=1)
        w_new, b_new = fold_into_conv_consumer(w.array, None if b is None else b.array, s, t, group)
        w_new = rounded(w_new, w.data_type, "folded weight")
        b_type = w.data_type if b is None else b.data_type
        b_new = rounded(b_new, b_type, "folded bias")

        def apply():
            written = []
            written.append(view.set_constant(j, 1, w_new, w.data_type, f"{w.name}_folded"))
            written.append(view.set_constant(j, 2, b_new, b_type,
                                                  f"{node_label(c)}_bias_folded" if b is None else f"{b.name}_folded"))
            return written
        return apply

    def _plan_Gemm(self, view, j, c, s, t, x):
        if int_attr(c, "transA", 0):
            raise Refusal("the following Gemm has transA=1, so the BN channels are not its reduction axis")
        w = weight(view, c, 1, "Gemm B", ndim=2)
        if w is None:
            raise Refusal("the Gemm has no B input")
        trans_b = int_attr(c, "transB", 0)
        b_eff = w.array.astype(np.float64).T if trans_b else w.array.astype(np.float64)  # [K, N]
        if b_eff.shape[0] != s.size:
            raise Refusal(f"channel count mismatch: the BN has {s.size} channels, the Gemm reduces over {b_eff.shape[0]}", Why.INVALID_PARAMETERS)
        alpha, beta = float_attr(c, "alpha", 1.0), float_attr(c, "beta", 1.0)
        b_new = s[:, None] * b_eff
        b_new = rounded(b_new.T if trans_b else b_new, w.data_type, "folded weight")
        cc = weight(view, c, 2, "Gemm C", ndim=(0, 1, 2))
        shift = alpha * (t @ b_eff)
        c_type = w.data_type if cc is None else cc.data_type
        c_new = rounded(shift if cc is None else beta * cc.array.astype(np.float64) + shift, c_type, "folded C")

        def apply():
            written = []
            written.append(view.set_constant(j, 1, b_new, w.data_type, f"{w.name}_folded"))
            written.append(view.set_constant(j, 2, c_new, c_type,
                                                  f"{node_label(c)}_C_folded" if cc is None else f"{cc.name}_folded"))
            if beta != 1.0:
                set_attr(c, "beta", 1.0)
            return written
        return apply

    def _plan_MatMul(self, view, j, c, s, t, x):
        w = weight(view, c, 1, "MatMul weight", ndim=2)
        if w is None:
            raise Refusal("the MatMul has no constant weight")
        if w.array.shape[0] != s.size:
            raise Refusal(f"channel count mismatch: the BN has {s.size} channels, the MatMul reduces over {w.array.shape[0]}", Why.INVALID_PARAMETERS)
        wf = w.array.astype(np.float64)
        w_new = rounded(s[:, None] * wf, w.data_type, "folded weight")
        shift = t @ wf
        out = c.output[0]
        add = None
        cons = view.consumers(out)
        if len(cons) == 1 and view.uses(out) == 1 and not view.is_graph_output(out):
            k, _ = cons[0]
            cand = view.nodes[k]
            if is_op(cand, "Add"):
                other = cand.input[1] if cand.input[0] == out else cand.input[0]
                bias = view.constant(other)
                if bias is not None and bias.array.size in (1, shift.size) and bias.array.ndim <= 2 and \
                        (bias.array.ndim == 0 or bias.array.shape[-1] == shift.size):
                    add = (k, list(cand.input).index(other), bias)
        shift_rounded = rounded(shift, w.data_type, "folded bias")
        if add is not None:
            k, bpos, bias = add
            b_new = rounded(bias.array.astype(np.float64) + shift.reshape((1,) * (bias.array.ndim - 1) + (-1,))
                            if bias.array.ndim else bias.array.astype(np.float64) + shift, bias.data_type, "folded bias")

        def apply():
            written = []
            written.append(view.set_constant(j, 1, w_new, w.data_type, f"{w.name}_folded"))
            if add is not None:
                written.append(view.set_constant(k, bpos, b_new, bias.data_type, f"{bias.name}_folded"))
                return written
            name = view.new_constant(shift_rounded, w.data_type, f"{node_label(c)}_bias_folded", j)
            written.append(name)
            mid = view.index.fresh(f"{out}_unbiased")
            view.rename_output(j, 0, mid)
            view.insert_after(j, onnx.helper.make_node("Add", [mid, name], [out], name=view.index.fresh(f"{node_label(c)}_bias")))
            return written
        return apply
