"""Fold a BatchNormalization into the op that produces its input.

With BN(z) = s * z + t per channel (see foldkit.math) and z the producer's output:

- Conv (1-D/2-D/3-D, any group, strides/dilations/pads/auto_pad), weight [C_out, C_in/g, k...]:
  W' = W * s[o], b' = b * s + t.
- ConvTranspose (any group, output_padding), weight [C_in, C_out/g, k...]: output channel of
  W[i, j] is (i // (C_in/g)) * (C_out/g) + j; W' scales that channel, b' = b * s + t.
- Gemm (any transA/alpha/beta): Y = alpha * A' B' + beta * C; B' scaled along N (axis 1 of B when
  transB=0, axis 0 when transB=1); C' = beta * C * s + t and beta := 1 (C' = t when C is absent).
- MatMul with a constant 2-D weight [K, N], optionally followed by Add of a constant bias that
  broadcasts along N, where the BN channel axis is the MatMul's last axis (2-D input): W' = W * s,
  bias' = bias * s + t. Without an Add, the BN node becomes ``Add(z, t)``.

Preconditions (each refusal is reported with its reason and leaves the graph exactly as it was):
BN in inference mode with constant parameters and var + eps > 0, finite; the producer's output is
read by the BN alone and is not a graph output; weights and biases are constant float tensors; the
channel counts agree; the folded values fit the weight's dtype. A weight shared with another node or
read from an outer scope is cloned, never mutated under its other users.
"""

from __future__ import annotations

import numpy as np

from ..graph import make_tensor, node_label, set_attr
from ..math import fold_into_producer, output_channels
from .base import Pass, bn_nodes, is_op
from .common import Refusal, bn_affine, float_attr, int_attr, rounded, weight

FOLDABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")


class FoldIntoProducer(Pass):
    name = "producer"

    def run_graph(self, ctx, view, path):
        changed = False
        for i, bn in bn_nodes(view):
            label = node_label(bn)
            self.written = []
            try:
                target = self._fold(view, i, bn)
            except Refusal as r:
                ctx.report.refuse(bn.output[0], label, path, "not folded into its producer", str(r))
                continue
            entry = ctx.report.entry(bn.output[0], label, path)
            entry.action, entry.target = "folded", target
            entry.reason = f"folded into the preceding {target}"
            entry.tensors = list(self.written)
            changed = True
        return changed

    def _fold(self, view, i, bn) -> str:
        x = bn.input[0]
        pi = view.producer_of(x)
        if pi is None:
            raise Refusal(f"its input '{x}' is not computed by a node in this graph")
        p = view.nodes[pi]
        if p.domain not in ("", "ai.onnx") or p.op_type not in FOLDABLE:
            raise Refusal(f"its input comes from {p.op_type} '{node_label(p)}', which has no weights to fold into")
        if view.is_graph_output(x):
            raise Refusal(f"the {p.op_type} output '{x}' is also a graph output")
        if view.uses(x) != 1:
            raise Refusal(f"the {p.op_type} output '{x}' is also read by {view.uses(x) - 1} other node(s)")
        s, t = bn_affine(view, bn)
        apply = getattr(self, "_plan_" + p.op_type)(view, pi, p, s, t, x)
        # every check has passed: apply the plan (constants, attributes), then splice the BN out
        # unless the plan rewrote the BN node itself (MatMul without a bias Add)
        target, splice = apply()
        if splice:
            view.remove(i)
            view.rename_output(pi, 0, bn.output[0])
        return target

    @staticmethod
    def _check_channels(n_bn, n_out, op):
        if n_bn != n_out:
            raise Refusal(f"channel count mismatch: the BN has {n_bn} channels, the {op} produces {n_out}")

    def _conv_like(self, view, pi, p, s, t, kind):
        group = int_attr(p, "group", 1)
        w = weight(view, p, 1, f"{p.op_type} weight")
        if w is None or w.array.ndim < 3:
            raise Refusal(f"the {p.op_type} weight is missing or has rank < 3")
        if group < 1 or w.array.shape[0] % group:
            raise Refusal(f"group={group} does not divide the weight's first dimension {w.array.shape[0]}")
        self._check_channels(s.size, output_channels(w.array.shape, kind, group), p.op_type)
        b = weight(view, p, 2, f"{p.op_type} bias", ndim=1)
        w_new, b_new = fold_into_producer(w.array, None if b is None else b.array, s, t, kind, group)
        w_new = rounded(w_new, w.data_type, "folded weight")
        b_type = w.data_type if b is None else b.data_type
        b_new = rounded(b_new, b_type, "folded bias")

        def apply():
            self.written.append(view.set_constant(pi, 1, w_new, w.data_type, f"{w.name}_folded"))
            self.written.append(view.set_constant(pi, 2, b_new, b_type, f"{node_label(p)}_bias_folded" if b is None else f"{b.name}_folded"))
            return f"{p.op_type} '{node_label(p)}'", True
        return apply

    def _plan_Conv(self, view, pi, p, s, t, x):
        return self._conv_like(view, pi, p, s, t, "conv")

    def _plan_ConvTranspose(self, view, pi, p, s, t, x):
        return self._conv_like(view, pi, p, s, t, "conv_transpose")

    def _plan_Gemm(self, view, pi, p, s, t, x):
        w = weight(view, p, 1, "Gemm B", ndim=2)
        if w is None:
            raise Refusal("the Gemm has no B input")
        kind = "rows" if int_attr(p, "transB", 0) else "cols"
        self._check_channels(s.size, output_channels(w.array.shape, kind), "Gemm")
        c = weight(view, p, 2, "Gemm C", ndim=(0, 1, 2))
        beta = float_attr(p, "beta", 1.0)
        w_new, _ = fold_into_producer(w.array, None, s, t, kind)
        w_new = rounded(w_new, w.data_type, "folded weight")
        if c is None:
            c_new, c_type = t, w.data_type
        else:
            c_arr = c.array.astype(np.float64)
            if c_arr.ndim >= 1 and c_arr.shape[-1] not in (1, s.size):
                raise Refusal(f"the Gemm C of shape {list(c_arr.shape)} does not broadcast over {s.size} columns")
            c_new, c_type = beta * c_arr * s + t, c.data_type
        c_new = rounded(c_new, c_type, "folded C")

        def apply():
            self.written.append(view.set_constant(pi, 1, w_new, w.data_type, f"{w.name}_folded"))
            self.written.append(view.set_constant(pi, 2, c_new, c_type, f"{node_label(p)}_C_folded" if c is None else f"{c.name}_folded"))
            if beta != 1.0:
                set_attr(p, "beta", 1.0)
            return f"Gemm '{node_label(p)}'", True
        return apply

    def _matmul_weight(self, view, mi, m, s):
        w = weight(view, m, 1, "MatMul weight", ndim=2)
        self._check_channels(s.size, w.array.shape[1], "MatMul")
        return w

    def _check_last_axis(self, view, x):
        rank = view.index.rank(x)
        if rank is None:
            raise Refusal(f"the rank of '{x}' is unknown, so the BN channel axis cannot be shown to be the MatMul's last axis")
        if rank != 2:
            raise Refusal(f"the BN normalizes axis 1 of a rank-{rank} MatMul output, not the axis the weight's columns produce")

    def _plan_MatMul(self, view, pi, p, s, t, x):
        w = self._matmul_weight(view, pi, p, s)
        self._check_last_axis(view, x)
        w_new = rounded(fold_into_producer(w.array, None, s, t, "cols")[0], w.data_type, "folded weight")
        t_new = rounded(t, w.data_type, "folded bias")
        bn_i = [i for i, _ in view.consumers(x)][0]

        def apply():
            self.written.append(view.set_constant(pi, 1, w_new, w.data_type, f"{w.name}_folded"))
            bn = view.nodes[bn_i]
            for name in bn.input:
                view.index.unuse(name)
            bias = view.index.fresh(f"{node_label(p)}_bias_folded")
            tensor = make_tensor(t_new, w.data_type)
            tensor.name = bias
            view.add_constant(tensor, before=bn_i if view.index.model.ir_version < 4 else None)
            self.written.append(bias)
            bn.op_type = "Add"
            bn.domain = ""
            del bn.attribute[:]
            del bn.input[:]
            bn.input.extend([x, bias])
            view.index.use(x)
            view.index.use(bias)
            view.invalidate()
            return f"MatMul '{node_label(p)}' (the BN became its bias Add)", False
        return apply

    def _plan_Add(self, view, pi, p, s, t, x):
        # MatMul -> Add(bias) -> BN
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
        b_arr = bias.array.astype(np.float64)
        if b_arr.ndim and (b_arr.shape[-1] not in (1, s.size) or any(d != 1 for d in b_arr.shape[:-1])):
            raise Refusal(f"the Add bias of shape {list(b_arr.shape)} is not per-column")
        w = self._matmul_weight(view, mi, m, s)
        self._check_last_axis(view, x)
        w_new = rounded(fold_into_producer(w.array, None, s, t, "cols")[0], w.data_type, "folded weight")
        b_new = rounded((b_arr * s + t).reshape(b_arr.shape[:-1] + (s.size,)), bias.data_type, "folded bias")

        def apply():
            self.written.append(view.set_constant(mi, 1, w_new, w.data_type, f"{w.name}_folded"))
            self.written.append(view.set_constant(pi, 1 - mpos, b_new, bias.data_type, f"{bias.name}_folded"))
            return f"MatMul '{node_label(m)}' + Add '{node_label(p)}'", True
        return apply
