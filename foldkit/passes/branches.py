"""Merge a linear combination of branches on one input into one op (RepVGG, MobileOne, RepGhost,
ACNet, FastViT's RepMixer, RepViT, ...).

Networks trained with re-parameterizable blocks combine, on the same input x, Conv branches, per-
channel affine maps and the identity. After the Conv+BN folds, RepVGG's block is
``Conv(x, W1, b1) + Conv(x, W2, b2) + BN(x)``; FastViT's RepMixer is ``x + ls * (Conv(x) - BN(x))``.
Each is a tree whose root is an Add, Sub or Sum of two or more variables (or the stack-and-sum that
``torch.stack(branches).sum(0)`` exports), whose inner nodes are Add / Sub / Sum and per-channel
affine maps (an inference BN, Mul/Div by a per-channel or scalar constant, Add/Sub of one), each
read only inside the tree, and whose leaves are x itself or a Conv / ConvTranspose / MatMul / Gemm
of x. Such a tree is linear in its leaves, per output channel:

    y = sum_b c_b * op_b(x) + c_x * x + t

with float64 coefficient vectors c_b, c_x and shift t read off the tree, so it is one op
(:mod:`.branch_ops` computes its weight: sum_b diag(c_b) W_b, kernels padded and centred, plus
diag(c_x), rounded once to the weight's dtype). The first branch with the largest kernel survives:
it gets the merged weight and bias and the root's output name; the other branches, the inner nodes
and the root are removed. A leaf read twice in the tree (``BN(y) + y``) counts twice.

A tree whose leaves are not all x or ops of one x (a residual Add of two paths) is not a branch
structure and is left silently. Refused (graph unchanged, reason and code in the report) when a
branch output is also read outside the tree or is a graph output, the branches mix op types or
differ in group, strides, dilations or padding mode, a kernel cannot be centred, a weight is not a
constant float tensor, the dtypes differ, an affine constant is not per-channel on the output's
channel axis, or a merged value overflows.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from ..graph import get_attr, node_label
from ..report import Action
from .affine import ARITH, affine_of, never_per_channel
from .base import Pass, is_op
from .branch_ops import MERGES, kernel_of
from .common import Refusal, int_attr

CHAIN = ("Add", "Sub", "Sum", "ReduceSum")
MERGEABLE = tuple(MERGES)


class BranchMerge(Pass):
    name = "branches"
    stage = "fold"

    def run_graph(self, ctx, view, path):
        self.options = ctx.options
        changed = False
        for i in range(len(view.nodes) - 1, -1, -1):  # outermost sum first; its inner nodes go with it
            node = view.nodes[i]
            if i in view.removed or node.domain not in ("", "ai.onnx") or node.op_type not in CHAIN:
                continue
            if not self._is_chain(view, node):
                continue
            tree = self._tree(view, i)
            x = self._input(view, tree)
            if x is None:
                continue
            try:
                changed |= self._merge(ctx, view, path, i, tree, x)
            except Refusal as r:
                self._refused(ctx, view, path, node, tree, str(r), r.code)
        return changed

    # -- structure --------------------------------------------------------------------------
    def _is_chain(self, view, node) -> bool:
        """An Add or Sub of two variables (of a constant, it is an affine op), a Sum, or the
        stack-and-sum that ``torch.stack(branches).sum(0)`` exports."""
        if node.op_type == "ReduceSum":
            return self._stacked(view, node) is not None
        if node.op_type in ("Add", "Sub") and (len(node.input) != 2 or any(view.constant(n) is not None for n in node.input)):
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
        """The linear tree rooted at node ``root``: a list of items, each (kind, node index or leaf
        name, [(sign, child item)], ...), children after their parent; kinds "sum" (with the stack's
        Concat and Unsqueeze indices for a stack-and-sum), "affine" (with its Affine), "leaf".
        Built without recursion (a sum of thousands of terms is a valid model)."""
        items = []
        stack = [(view.nodes[root].output[0], None, 1)]
        while stack:
            name, parent, sign = stack.pop()
            k = len(items)
            if parent is not None:
                items[parent][2].append((sign, k))
            j = view.producer_of(name)
            inner = j is not None and (j == root or view.uses(name) == 1 and not view.is_graph_output(name))
            sub = view.nodes[j] if inner else None
            if inner and sub.domain in ("", "ai.onnx") and sub.op_type in CHAIN and self._is_chain(view, sub):
                if sub.op_type == "ReduceSum":
                    parts, nodes = self._stacked(view, sub)
                    items.append(("sum", j, [], nodes))
                    stack.extend((p, k, 1) for p in reversed(parts))
                else:
                    items.append(("sum", j, []))
                    signs = [1, -1] if sub.op_type == "Sub" else [1] * len(sub.input)
                    stack.extend((p, k, s) for p, s in reversed(list(zip(sub.input, signs))))
                continue
            a = self._affine(view, sub) if inner and j != root else None
            if a is not None:
                items.append(("affine", j, [], a))
                stack.append((a.x, k, 1))
                continue
            items.append(("leaf", name, []))
        return items

    @staticmethod
    def _affine(view, node):
        """The node as an affine map inside a tree, or None: then its output is a leaf."""
        if is_op(node, "BatchNormalization") or (node.domain in ("", "ai.onnx") and node.op_type in ARITH):
            try:
                a = affine_of(view, node)
            except Refusal:
                return None
            return None if never_per_channel(a) else a
        return None

    def _op_input(self, view, name):
        """x when ``name`` is the output of a Conv / ConvTranspose / MatMul / Gemm of a variable x."""
        j = view.producer_of(name)
        if j is None:
            return None
        p = view.nodes[j]
        if p.domain in ("", "ai.onnx") and p.op_type in MERGEABLE and p.input and p.input[0] \
                and p.output and p.output[0] == name and view.constant(p.input[0]) is None:
            return p.input[0]
        return None

    def _input(self, view, tree):
        """The x every leaf is or is an op of, or None: not a branch structure."""
        leaves = list(dict.fromkeys(it[1] for it in tree if it[0] == "leaf"))
        for x in dict.fromkeys(self._op_input(view, n) for n in leaves):
            if x is not None and all(n == x or self._op_input(view, n) == x for n in leaves):
                return x
        return None

    def _refused(self, ctx, view, path, node, tree, reason, code):
        kept = Action(node=node_label(node), action="kept", graph=path, reason=f"parallel branches not merged: {reason}",
                      code=code.value)
        if kept not in ctx.report.branches:  # the fold loop meets it again each round: said once
            ctx.report.branches.append(kept)
        for j in self._bns(view, tree):
            ctx.report.refuse(view.nodes[j].output[0], node_label(view.nodes[j]), path,
                              "not merged with its parallel branches", reason, code)

    @staticmethod
    def _bns(view, tree):
        """The BNs inside the tree (each is an affine item)."""
        return [it[1] for it in tree if it[0] == "affine" and is_op(view.nodes[it[1]], "BatchNormalization")]

    # -- the merge --------------------------------------------------------------------------
    def _merge(self, ctx, view, path, root, tree, x) -> bool:
        leaves = Counter(it[1] for it in tree if it[0] == "leaf")
        ops = [view.producer_of(n) for n in leaves if n != x]
        for name, times in leaves.items():
            if name == x:
                continue
            if view.uses(name) != times or view.is_graph_output(name):
                others = view.uses(name) - times
                raise Refusal(f"the branch output '{name}' is " +
                              ("a graph output" if view.is_graph_output(name) else f"also read by {others} other node(s)"))
        kinds = {view.nodes[j].op_type for j in ops}
        if len(kinds) != 1:
            raise Refusal(f"the branches mix {' and '.join(sorted(kinds))}")
        kind = kinds.pop()
        merge = MERGES[kind](view, ops, kind, self.options)
        c, neg, rank = merge.read()
        coefs, shift = self._coefficients(view, tree, c, neg, rank)
        by_op = {view.producer_of(n): v for n, v in coefs.items() if n != x}
        survivor, written, apply = merge.merge(by_op, coefs.get(x), shift)
        said = self._describe(view, tree, x)
        # every check passed: apply, then remove the other branches and the inner nodes
        apply()
        root_out = view.nodes[root].output[0]
        for it in tree:
            if it[0] != "leaf":
                view.remove(it[1])
                if it[0] == "sum" and len(it) > 3:  # the stack's Concat and Unsqueezes
                    for j in it[3]:
                        view.remove(j)
        for j in ops:
            if j != survivor:
                view.remove(j)
        view.rename_output(survivor, 0, root_out)
        view.invalidate()
        self._merged(ctx, view, path, root, x, kind, survivor, written, *said)
        return True

    @staticmethod
    def _coefficients(view, tree, c, neg, rank):
        """{leaf name: c_b [C]}, t [C] in float64, evaluated children first."""
        forms = [None] * len(tree)
        for k in range(len(tree) - 1, -1, -1):
            kind, ref, children = tree[k][:3]
            if kind == "leaf":
                forms[k] = ({ref: np.ones(c)}, np.zeros(c))
                continue
            coefs, shift = {}, np.zeros(c)
            for sign, ch in children:
                for n, v in forms[ch][0].items():
                    coefs[n] = coefs.get(n, 0) + sign * v
                shift = shift + sign * forms[ch][1]
            if kind == "affine":
                s, t = tree[k][3].st(c, neg, rank, "branch")
                coefs = {n: v * s for n, v in coefs.items()}
                shift = shift * s + t
            forms[k] = (coefs, shift)
            for _, ch in children:
                forms[ch] = None
        return forms[0]

    @staticmethod
    def _describe(view, tree, x):
        """(branch names, the affine nodes, the sum op counts) of a tree, said before it is removed."""
        names = []
        for it in tree:
            if it[0] != "leaf":
                continue
            if it[1] == x:
                names.append(f"identity '{x}'")
                continue
            n = view.nodes[view.producer_of(it[1])]
            names.append(f"{n.op_type} '{node_label(n)}'" + (f" [{'x'.join(map(str, kernel_of(view, n)))}]"
                                                              if n.op_type in ("Conv", "ConvTranspose") else ""))
        affine = [view.nodes[it[1]] for it in tree if it[0] == "affine"]
        sums = Counter(view.nodes[it[1]].op_type for it in tree if it[0] == "sum")
        return names, affine, sums

    def _merged(self, ctx, view, path, root, x, kind, survivor, written, names, affine, sums):
        target = f"{kind} '{node_label(view.nodes[survivor])}'"
        for n in affine:
            if is_op(n, "BatchNormalization"):
                e = ctx.report.entry(n.output[0], node_label(n), path)
                e.action, e.target = "folded", target
                e.reason = f"merged with its parallel branches into {target}"
                e.tensors = list(written)
        how = " and ".join(f"{v} {k}" for k, v in sorted(sums.items()))
        scaled = f", {len(affine)} per-channel affine op(s) ({', '.join(sorted({n.op_type for n in affine}))})" \
            if affine else ""
        ctx.report.branches.append(Action(
            node=node_label(view.nodes[root]), action="merged", target=target, graph=path, tensors=list(written),
            reason=f"{len(names)} parallel branches on '{x}' ({', '.join(names)}) combined by {how}{scaled} "
                   f"merged into one {kind}"))
