"""Merge parallel branches over one input into one op (RepVGG, MobileOne, RepGhost, ...).

Networks trained with re-parameterizable blocks sum, on the same input x, a k x k Conv, a 1 x 1 Conv
and an identity BatchNormalization; after the Conv+BN folds, each block is

    y = Conv(x, W1, b1) + Conv(x, W2, b2) + ... + (s * x + t) [+ x]

Convolution is linear in its kernel, so when every Conv reads x with the same group, strides and
dilations, and every kernel is centred on the same output position, y is one Conv:

- kernels are zero-padded to the largest size K (per spatial dim, (K - k) / 2 zeros each side, so
  K - k must be even) and summed; that moves the kernel's taps by (K - k) / 2 * dilation, so a
  branch's pads plus that offset must equal the largest branch's pads (3x3 pad 1 and 1x1 pad 0 do);
- an affine branch s * x + t (an inference BatchNormalization of x, or Mul/Add/Sub/Div of x by a
  per-channel constant) or x itself (s = 1, t = 0) is a Conv whose kernel, per group, has s[o] at
  the tap that reads input channel o at the output's own position: it needs as many output as input
  channels, stride 1, and pads that keep the spatial size (pad_begin + pad_end = dilation * (K - 1),
  pad_begin a multiple of the dilation);
- biases are summed, with t.

Likewise ConvTranspose branches (same group, strides, dilations, output_padding, centred kernels),
MatMul branches (x @ W1 + x @ W2 + s * x + t = x @ (W1 + W2 + diag(s)) + t) and Gemm branches
(transA = 0; alpha and beta are multiplied in). All sums are float64, rounded once to the weight's
dtype. The first branch with the largest kernel survives: it gets the merged weight and bias and the
Add's output name; the other branches and the Adds are removed. Asymmetric kernels merge where the
merged kernel costs no more multiply-adds than the branches together (ACNet's 3x3 + 1x3 + 3x1 is one
3x3; 3x1 + 1x3 + 3x1 + 1x3 is one 3x3, into the first branch); where it would cost more (SINet's
1x5 + 5x1 into a 5x5: 25 against 10), the branches are left, with the reason, unless the option
``merge_larger_kernels`` asks for it.

Refused (graph unchanged, reason in the report) when a branch output is read elsewhere or is a graph
output, the branches differ in group, strides, dilations or padding mode, a kernel cannot be
centred, a weight is not a constant float tensor, the dtypes differ, or a merged value overflows.
"""

from __future__ import annotations

import numpy as np

from ..graph import del_attr, get_attr, node_label, set_attr
from ..report import Action
from .affine import ARITH, affine_of
from .base import Pass, is_op
from .common import Refusal, float_attr, int_attr, rounded, weight

CHAIN = ("Add", "Sum", "ReduceSum")
MERGEABLE = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def _ints(node, name, default):
    v = get_attr(node, name, None)
    if v is None:
        return list(default)
    try:
        return [int(x) for x in v]
    except (TypeError, ValueError):
        raise Refusal(f"{node.op_type} '{node_label(node)}' has a non-integer {name}") from None


class BranchMerge(Pass):
    name = "branches"
    stage = "fold"

    def run_graph(self, ctx, view, path):
        self.options = ctx.options
        changed = False
        for i in range(len(view.nodes) - 1, -1, -1):  # outermost Add first; its inner Adds go with it
            node = view.nodes[i]
            if i in view.removed or node.domain not in ("", "ai.onnx") or node.op_type not in CHAIN:
                continue
            if not self._is_chain(view, node):
                continue
            leaves, inner = self._tree(view, i)
            plan = self._plan(view, leaves)
            if plan is None:
                continue
            try:
                done = plan(ctx, path, i, inner)
            except Refusal as r:
                self._refused(ctx, view, path, node, leaves, str(r), r.code)
                continue
            changed |= done
        return changed

    # -- structure --------------------------------------------------------------------------
    def _is_chain(self, view, node) -> bool:
        """An Add of two variables (not an Add of a constant: that is an affine op), a Sum, or the
        stack-and-sum that ``torch.stack(branches).sum(0)`` exports."""
        if node.op_type == "ReduceSum":
            return self._stacked(view, node) is not None
        if node.op_type == "Add" and (len(node.input) != 2 or any(view.constant(n) is not None for n in node.input)):
            return False
        return len(node.output) == 1 and len(node.input) >= 2

    def _axes(self, view, node, pos):
        """A node's axes: the attribute (older opsets) or the constant input ``pos`` (opset 13+)."""
        if len(node.input) > pos and node.input[pos]:
            c = view.constant(node.input[pos])
            return None if c is None else [int(a) for a in np.asarray(c.array).reshape(-1)]
        a = get_attr(node, "axes", None)
        return None if a is None else [int(v) for v in a]

    def _stacked(self, view, node):
        """ReduceSum(Concat(Unsqueeze(b1, 0), Unsqueeze(b2, 0), ..., axis=0), axes=[0], keepdims=0)
        is b1 + b2 + ...: (the b's, the Concat and Unsqueeze node indices), or None."""
        try:
            if (self._axes(view, node, 1) != [0] or int_attr(node, "keepdims", 1) != 0
                    or int_attr(node, "noop_with_empty_axes", 0)):
                return None
            ci = view.producer_of(node.input[0])
            if ci is None or not is_op(view.nodes[ci], "Concat") or int_attr(view.nodes[ci], "axis", 0) != 0:
                return None
            if view.uses(node.input[0]) != 1 or view.is_graph_output(node.input[0]):
                return None
            leaves, inner = [], [ci]
            for name in view.nodes[ci].input:
                ui = view.producer_of(name)
                if (ui is None or not is_op(view.nodes[ui], "Unsqueeze") or self._axes(view, view.nodes[ui], 1) != [0]
                        or view.uses(name) != 1 or view.is_graph_output(name)):
                    return None
                leaves.append(view.nodes[ui].input[0])
                inner.append(ui)
            return (leaves, inner) if len(leaves) >= 2 else None
        except Refusal:  # a malformed attribute: not this pattern
            return None

    def _tree(self, view, root: int):
        """(leaves, internal node indices) of the sum rooted at ``root``: an input computed by
        another Add/Sum (or stack-and-sum) that this sum alone reads is expanded."""
        leaves, inner, stack = [], [], [view.nodes[root].output[0]]
        while stack:
            name = stack.pop()
            j = view.producer_of(name)
            if j is not None:
                sub = view.nodes[j]
                if (sub.domain in ("", "ai.onnx") and sub.op_type in CHAIN and self._is_chain(view, sub)
                        and (j == root or view.uses(name) == 1 and not view.is_graph_output(name))):
                    inner.append(j)
                    if sub.op_type == "ReduceSum":
                        parts, nodes = self._stacked(view, sub)
                        inner += nodes
                        stack.extend(reversed(parts))
                    else:
                        stack.extend(reversed(sub.input))
                    continue
            leaves.append(name)
        return leaves, inner

    def _branch(self, view, name: str):
        """(kind, node index or None, x) of a leaf: ("op", j, x) for a Conv/ConvTranspose/MatMul/Gemm
        of x, ("affine", j, x) for a per-channel affine map of x, ("identity", None, name) otherwise."""
        j = view.producer_of(name)
        if j is not None:
            p = view.nodes[j]
            if p.domain in ("", "ai.onnx") and p.op_type in MERGEABLE and p.input and view.constant(p.input[0]) is None:
                return "op", j, p.input[0]
            if is_op(p, "BatchNormalization") or (p.domain in ("", "ai.onnx") and p.op_type in ARITH):
                try:
                    return "affine", j, affine_of(view, p).x
                except Refusal:
                    pass
        return "identity", None, name

    def _plan(self, view, leaves):
        """The merge of the leaves that read one x, when they are all the sum's leaves and at least
        one is a mergeable op; None when the sum is not a branch structure at all (a residual Add)."""
        branches = [self._branch(view, n) for n in leaves]
        ops = [b for b in branches if b[0] == "op"]
        if not ops:
            return None
        x = ops[0][2]
        same = [b for b in branches if b[2] == x]
        if len(same) < 2 or (len(same) == len(ops) == 1):
            return None
        kinds = {view.nodes[b[1]].op_type for b in ops if b[2] == x}
        if len(same) != len(branches):
            return None  # a sum of different paths (an inner Add may still be a branch structure)
        if len(kinds) != 1:
            return self._refusal(f"the branches mix {' and '.join(sorted(kinds))}")
        kind = kinds.pop()
        return lambda ctx, path, root, inner: self._merge(ctx, view, path, root, inner, leaves, branches, x, kind)

    @staticmethod
    def _refusal(reason):
        def raise_it(*_):
            raise Refusal(reason)
        return raise_it

    def _refused(self, ctx, view, path, node, leaves, reason, code):
        kept = Action(node=node_label(node), action="kept", graph=path, reason=f"parallel branches not merged: {reason}",
                      code=code.value)
        if kept not in ctx.report.branches:  # the fold loop meets it again each round: said once
            ctx.report.branches.append(kept)
        for name in leaves:
            j = view.producer_of(name)
            if j is not None and is_op(view.nodes[j], "BatchNormalization"):
                ctx.report.refuse(view.nodes[j].output[0], node_label(view.nodes[j]), path,
                                  "not merged with its parallel branches", reason, code)

    # -- the merge --------------------------------------------------------------------------
    def _merge(self, ctx, view, path, root, inner, leaves, branches, x, kind) -> bool:
        ops = []
        for name, (what, j, _) in zip(leaves, branches):
            if what == "identity":
                continue
            if view.uses(name) != 1 or view.is_graph_output(name):
                others = view.uses(name) - 1
                raise Refusal(f"the branch output '{name}' is " +
                              ("a graph output" if view.is_graph_output(name) else f"also read by {others} other node(s)"))
            if what == "op":
                ops.append(j)
        merge = {"Conv": self._conv, "ConvTranspose": self._conv, "MatMul": self._matmul, "Gemm": self._gemm}[kind]
        survivor, written, apply = merge(view, ops, branches, x, kind)
        # every check passed: apply, then remove the other branches and the Adds
        apply()
        root_out = view.nodes[root].output[0]
        for j in inner:  # the Adds (or the stack: Unsqueeze, Concat, ReduceSum) and their axes constants
            view.remove(j)
        for what, j, _ in branches:
            if j is not None and j != survivor:
                view.remove(j)
        view.rename_output(survivor, 0, root_out)
        view.invalidate()
        target = f"{kind} '{node_label(view.nodes[survivor])}'"
        names = []
        for what, j, _ in branches:
            if what == "identity":
                names.append(f"identity '{x}'")
                continue
            n = view.nodes[j]
            names.append(f"{n.op_type} '{node_label(n)}'" + (f" [{'x'.join(map(str, self._kernel(view, n)))}]"
                                                              if n.op_type in ("Conv", "ConvTranspose") else ""))
            if is_op(n, "BatchNormalization"):
                e = ctx.report.entry(n.output[0], node_label(n), path)
                e.action, e.target = "folded", target
                e.reason = f"merged with its parallel branches into {target}"
                e.tensors = list(written)
        ctx.report.branches.append(Action(
            node=node_label(view.nodes[root]), action="merged", target=target, graph=path, tensors=list(written),
            reason=f"{len(branches)} parallel branches on '{x}' ({', '.join(names)}) merged into one {kind}"))
        return True

    @staticmethod
    def _kernel(view, n):
        w = view.constant(n.input[1]) if len(n.input) > 1 else None
        return list(w.array.shape[2:]) if w is not None else []

    def _affine_st(self, view, j, x, c, rank):
        """(s, t) of an affine branch, or of x itself (j None), over c channels on axis 1."""
        if j is None:
            return np.ones(c), np.zeros(c)
        return affine_of(view, view.nodes[j]).st(c, 1 - rank, rank, "branch")

    def _conv(self, view, ops, branches, x, kind):
        transpose = kind == "ConvTranspose"
        info = []
        for j in ops:
            n = view.nodes[j]
            w = weight(view, n, 1, f"{kind} weight")
            if w is None or w.array.ndim < 3:
                raise Refusal(f"the {kind} '{node_label(n)}' weight is missing or has rank < 3")
            b = weight(view, n, 2, f"{kind} bias", ndim=1)
            nd = w.array.ndim - 2
            auto = get_attr(n, "auto_pad", b"NOTSET")
            auto = auto.decode() if isinstance(auto, bytes) else str(auto)
            if auto not in ("NOTSET", "VALID"):
                raise Refusal(f"{kind} '{node_label(n)}' uses auto_pad={auto}")
            pads = [0] * (2 * nd) if auto == "VALID" else _ints(n, "pads", [0] * (2 * nd))
            ks = _ints(n, "kernel_shape", w.array.shape[2:])
            if ks != list(w.array.shape[2:]) or len(pads) != 2 * nd:
                raise Refusal(f"{kind} '{node_label(n)}' has kernel_shape or pads that disagree with its weight")
            attrs = (int_attr(n, "group", 1), _ints(n, "strides", [1] * nd), _ints(n, "dilations", [1] * nd),
                     _ints(n, "output_padding", [0] * nd) if transpose else None,
                     _ints(n, "output_shape", []) if transpose else None)
            info.append((j, n, w, b, pads, attrs))
        first = info[0]
        for j, n, w, b, pads, attrs in info[1:]:
            if attrs != first[5]:
                raise Refusal(f"{kind} '{node_label(n)}' and '{node_label(first[1])}' differ in group, strides, "
                              "dilations or output padding")
            if w.data_type != first[2].data_type:
                raise Refusal(f"{kind} '{node_label(n)}' and '{node_label(first[1])}' have weights of different types")
            if w.array.ndim != first[2].array.ndim or w.array.shape[:2] != first[2].array.shape[:2]:
                raise Refusal(f"{kind} '{node_label(n)}' and '{node_label(first[1])}' have weights of shapes "
                              f"{list(w.array.shape)} and {list(first[2].array.shape)}")
        group, strides, dil = first[5][0], first[5][1], first[5][2]
        nd = first[2].array.ndim - 2
        big = [max(inf[2].array.shape[2 + d] for inf in info) for d in range(nd)]
        survivor = next((inf for inf in info if list(inf[2].array.shape[2:]) == big), None)
        if survivor is not None:
            target = survivor[4]
        else:  # asymmetric kernels (1x5 + 5x1): the merged one is larger than every branch's
            merged, apart = int(np.prod(big)), sum(int(np.prod(inf[2].array.shape[2:])) for inf in info)
            if merged > apart and not self.options.get("merge_larger_kernels"):
                shapes = " + ".join("x".join(map(str, inf[2].array.shape[2:])) for inf in info)
                raise Refusal(f"the {shapes} kernels would merge into one {'x'.join(map(str, big))} kernel, "
                              f"{merged} multiply-adds per output and channel where the branches take {apart}: "
                              "left as they are (--merge-larger-kernels merges them anyway)")
            survivor = info[0]
            # each dim's pads come from a branch whose kernel has the merged size in that dim
            at = [next(inf for inf in info if inf[2].array.shape[2 + d] == big[d])[4] for d in range(nd)]
            target = [at[d][d] for d in range(nd)] + [at[d][nd + d] for d in range(nd)]
        total = np.zeros(first[2].array.shape[:2] + tuple(big), dtype=np.float64)
        bias = None
        for j, n, w, b, pads, _ in info:
            off = []
            for d in range(nd):
                k = w.array.shape[2 + d]
                if (big[d] - k) % 2:
                    raise Refusal(f"the {'x'.join(map(str, w.array.shape[2:]))} kernel of '{node_label(n)}' cannot be "
                                  f"centred in the {'x'.join(map(str, big))} one (odd difference)")
                o = (big[d] - k) // 2
                if pads[d] + o * dil[d] != target[d] or pads[nd + d] + o * dil[d] != target[nd + d]:
                    raise Refusal(f"the kernels are not centred on the same position: '{node_label(n)}' has pads "
                                  f"{pads}, '{node_label(survivor[1])}' {target}")
                off.append(o)
            sl = (slice(None), slice(None)) + tuple(slice(o, o + w.array.shape[2 + d]) for d, o in enumerate(off))
            total[sl] += w.array.astype(np.float64)
            if b is not None:
                bias = (0 if bias is None else bias) + b.array.astype(np.float64)
        w0 = first[2]
        c_out = w0.array.shape[1] * group if transpose else w0.array.shape[0]
        c_in = w0.array.shape[0] if transpose else w0.array.shape[1] * group
        for what, j, _ in branches:
            if what == "op":
                continue
            if transpose:
                raise Refusal("identity or affine branches join only Conv merges, not ConvTranspose ones")
            if c_in != c_out:
                raise Refusal(f"an identity branch needs as many output as input channels ({c_out} vs {c_in})")
            if any(s != 1 for s in strides):
                raise Refusal(f"an identity branch needs stride 1 (strides {strides})")
            taps = []
            for d in range(nd):
                if target[d] + target[nd + d] != dil[d] * (big[d] - 1) or target[d] % dil[d]:
                    raise Refusal(f"an identity branch needs pads that keep the size (pads {target}, kernel {big})")
                taps.append(target[d] // dil[d])
            rank = view.index.rank(x)
            s, t = self._affine_st(view, j, x, c_out, rank if rank is not None else nd + 2)
            per = c_in // group
            o = np.arange(c_out)
            total[(o, o % per) + tuple(np.full(c_out, tp) for tp in taps)] += s
            bias = (0 if bias is None else bias) + t
        dtype = w0.data_type
        w_new = rounded(total, dtype, "merged kernel")
        b_new = None if bias is None or not np.any(bias) and all(inf[3] is None for inf in info) else \
            rounded(np.broadcast_to(np.asarray(bias, dtype=np.float64), (c_out,)).copy(),
                    next((inf[3].data_type for inf in info if inf[3] is not None), dtype), "merged bias")
        sj, sn = survivor[0], survivor[1]
        written = []

        def apply():
            written.append(view.set_constant(sj, 1, w_new, dtype, f"{node_label(sn)}_merged_weight"))
            if b_new is not None:
                b_type = next((inf[3].data_type for inf in info if inf[3] is not None), dtype)
                written.append(view.set_constant(sj, 2, b_new, b_type, f"{node_label(sn)}_merged_bias"))
            if get_attr(sn, "kernel_shape", None) is not None:
                set_attr(sn, "kernel_shape", big)
            if get_attr(sn, "auto_pad", None) is not None:
                del_attr(sn, "auto_pad")
            if any(target) or get_attr(sn, "pads", None) is not None:
                set_attr(sn, "pads", list(target))
        return sj, written, apply

    def _dense(self, view, ops, branches, x, kind, read):
        """MatMul/Gemm: (survivor, written, apply) with W = sum of every branch's op(W) [K, N]."""
        parts = [read(view.nodes[j]) for j in ops]  # (W64 [K, N], bias64 or None, data_type, node)
        if len({p[2] for p in parts}) != 1:
            raise Refusal(f"the {kind} branches have weights of different types")
        if len({p[0].shape for p in parts}) != 1:
            raise Refusal(f"the {kind} branches have weights of shapes {sorted({p[0].shape for p in parts})}")
        total = sum(p[0] for p in parts)
        bias = None
        for p in parts:
            if p[1] is not None:
                bias = p[1] if bias is None else bias + p[1]
        k, n = total.shape
        for what, j, _ in branches:
            if what == "op":
                continue
            rank = view.index.rank(x)
            if rank != 2:
                raise Refusal(f"an identity or affine branch of a {kind} needs a 2-D input (rank {rank})")
            if k != n:
                raise Refusal(f"an identity branch needs as many output as input features ({n} vs {k})")
            s, t = self._affine_st(view, j, x, n, 2)
            total[np.arange(n), np.arange(n)] += s
            bias = t if bias is None else bias + t
        dtype = parts[0][2]
        return total, bias, dtype

    def _matmul(self, view, ops, branches, x, kind):
        def read(node):
            w = weight(view, node, 1, "MatMul weight", ndim=2)
            if w is None:
                raise Refusal(f"MatMul '{node_label(node)}' has no constant weight")
            return w.array.astype(np.float64), None, w.data_type, node
        total, bias, dtype = self._dense(view, ops, branches, x, kind, read)
        if bias is not None and np.any(bias):
            raise Refusal("the merged MatMul would need a bias: an affine branch's shift has no MatMul to go into")
        w_new = rounded(total, dtype, "merged weight")
        sj = ops[0]
        sn = view.nodes[sj]
        written = []

        def apply():
            written.append(view.set_constant(sj, 1, w_new, dtype, f"{node_label(sn)}_merged_weight"))
        return sj, written, apply

    def _gemm(self, view, ops, branches, x, kind):
        def read(node):
            if int_attr(node, "transA", 0):
                raise Refusal(f"Gemm '{node_label(node)}' has transA=1")
            w = weight(view, node, 1, "Gemm B", ndim=2)
            if w is None:
                raise Refusal(f"Gemm '{node_label(node)}' has no constant B")
            alpha, beta = float_attr(node, "alpha", 1.0), float_attr(node, "beta", 1.0)
            b = w.array.astype(np.float64)
            b = alpha * (b.T if int_attr(node, "transB", 0) else b)
            c = weight(view, node, 2, "Gemm C", ndim=(0, 1, 2))
            cv = None
            if c is not None:
                ca = c.array.astype(np.float64)
                if ca.ndim == 2 and ca.shape[0] != 1:
                    raise Refusal(f"Gemm '{node_label(node)}' has a C of shape {list(ca.shape)}, not per column")
                cv = beta * np.broadcast_to(ca.reshape(-1), (b.shape[1],))
            return b, cv, w.data_type, node
        total, bias, dtype = self._dense(view, ops, branches, x, kind, read)
        sj = ops[0]
        sn = view.nodes[sj]
        trans = int_attr(sn, "transB", 0)
        w_new = rounded(total.T if trans else total, dtype, "merged weight")
        c_old = weight(view, sn, 2, "Gemm C", ndim=(0, 1, 2))
        c_type = c_old.data_type if c_old is not None else dtype
        c_new = None if bias is None else rounded(np.asarray(bias, dtype=np.float64), c_type, "merged C")
        written = []

        def apply():
            written.append(view.set_constant(sj, 1, w_new, dtype, f"{node_label(sn)}_merged_weight"))
            if c_new is not None:
                written.append(view.set_constant(sj, 2, c_new, c_type, f"{node_label(sn)}_merged_C"))
            set_attr(sn, "alpha", 1.0)
            set_attr(sn, "beta", 1.0)
        return sj, written, apply

