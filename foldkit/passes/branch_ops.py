"""The merged weight of a linear combination of branches on one input (see :mod:`.branches`).

A merge reads its branches first (:meth:`Branches.read`: every check that does not depend on the
coefficients, and the output channels C, the rank and the channel axis the coefficients live on),
then computes, in float64 and rounded once to the weight's dtype,

    W = sum_b diag(c_b) W_b  (+ diag(c_x) for the identity),   bias = sum_b c_b * bias_b + t

where c_b is branch b's per-output-channel coefficient and t the constant shift the combination adds.

- Conv / ConvTranspose: kernels zero-padded to the largest size K (per spatial dim, (K - k) / 2
  zeros each side, so K - k must be even), which moves the taps by (K - k) / 2 * dilation, so a
  branch's pads plus that offset must equal the merged pads. The identity is a kernel with c_x[o] at
  the tap that reads input channel o at the output's own position (as many output as input
  channels, stride 1, pads that keep the size). Asymmetric kernels merge where the merged kernel
  costs no more multiply-adds than the branches together (ACNet's 3x3 + 1x3 + 3x1); where it would
  cost more (SINet's 1x5 + 5x1 into 5x5), the branches are left unless ``merge_larger_kernels``.
- MatMul / Gemm (transA = 0; alpha and beta multiplied in): W is [K, N], the identity diag(c_x)
  (K = N). A MatMul has no bias: a combination that needs one is refused.

The first branch with the merged kernel size survives, with the merged weight and bias.
"""

from __future__ import annotations

import numpy as np

from ..graph import del_attr, get_attr, node_label, set_attr
from ..math import output_channel_scale
from .common import Refusal, float_attr, int_attr, rounded, weight


def _ints(node, name, default):
    v = get_attr(node, name, None)
    if v is None:
        return list(default)
    try:
        return [int(x) for x in v]
    except (TypeError, ValueError):
        raise Refusal(f"{node.op_type} '{node_label(node)}' has a non-integer {name}") from None


def kernel_of(view, n):
    w = view.constant(n.input[1]) if len(n.input) > 1 else None
    return list(w.array.shape[2:]) if w is not None else []


class ConvBranches:
    """Conv or ConvTranspose branches: ``read`` checks them, ``merge`` writes the one op."""

    def __init__(self, view, ops, kind, options):
        self.view, self.ops, self.kind, self.options = view, ops, kind, options
        self.transpose = kind == "ConvTranspose"

    def read(self):
        kind, view = self.kind, self.view
        info = []
        for j in self.ops:
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
                     _ints(n, "output_padding", [0] * nd) if self.transpose else None,
                     _ints(n, "output_shape", []) if self.transpose else None)
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
        self.info = info
        self.group, self.strides, self.dil = first[5][0], first[5][1], first[5][2]
        nd = self.nd = first[2].array.ndim - 2
        big = self.big = [max(inf[2].array.shape[2 + d] for inf in info) for d in range(nd)]
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
        self.survivor, self.target = survivor, target
        self.offsets = []
        for j, n, w, b, pads, _ in info:
            off = []
            for d in range(nd):
                k = w.array.shape[2 + d]
                if (big[d] - k) % 2:
                    raise Refusal(f"the {'x'.join(map(str, w.array.shape[2:]))} kernel of '{node_label(n)}' cannot be "
                                  f"centred in the {'x'.join(map(str, big))} one (odd difference)")
                o = (big[d] - k) // 2
                if pads[d] + o * self.dil[d] != target[d] or pads[nd + d] + o * self.dil[d] != target[nd + d]:
                    raise Refusal(f"the kernels are not centred on the same position: '{node_label(n)}' has pads "
                                  f"{pads}, '{node_label(survivor[1])}' {target}")
                off.append(o)
            self.offsets.append(off)
        w0 = first[2].array
        self.c_out = w0.shape[1] * self.group if self.transpose else w0.shape[0]
        self.c_in = w0.shape[0] if self.transpose else w0.shape[1] * self.group
        rank = nd + 2
        return self.c_out, 1 - rank, rank

    def merge(self, coefs, ident, shift):
        """(survivor index, written names, apply) for per-branch coefficients ``coefs`` (node index ->
        [C]), the identity's ``ident`` ([C] or None) and the constant shift ([C])."""
        nd, big, target, group = self.nd, self.big, self.target, self.group
        first = self.info[0]
        total = np.zeros(first[2].array.shape[:2] + tuple(big), dtype=np.float64)
        bias = np.asarray(shift, dtype=np.float64).copy()
        for (j, n, w, b, pads, _), off in zip(self.info, self.offsets):
            sl = (slice(None), slice(None)) + tuple(slice(o, o + w.array.shape[2 + d]) for d, o in enumerate(off))
            total[sl] += output_channel_scale(w.array.astype(np.float64), coefs[j],
                                              "conv_transpose" if self.transpose else "conv", group)
            if b is not None:
                bias += coefs[j] * b.array.astype(np.float64)
        if ident is not None:
            if self.transpose:
                raise Refusal("an identity branch joins only Conv merges, not ConvTranspose ones")
            if self.c_in != self.c_out:
                raise Refusal(f"an identity branch needs as many output as input channels ({self.c_out} vs {self.c_in})")
            if any(s != 1 for s in self.strides):
                raise Refusal(f"an identity branch needs stride 1 (strides {self.strides})")
            taps = []
            for d in range(nd):
                if target[d] + target[nd + d] != self.dil[d] * (big[d] - 1) or target[d] % self.dil[d]:
                    raise Refusal(f"an identity branch needs pads that keep the size (pads {target}, kernel {big})")
                taps.append(target[d] // self.dil[d])
            per = self.c_in // group
            o = np.arange(self.c_out)
            total[(o, o % per) + tuple(np.full(self.c_out, tp) for tp in taps)] += ident
        dtype = first[2].data_type
        b_type = next((inf[3].data_type for inf in self.info if inf[3] is not None), dtype)
        w_new = rounded(total, dtype, "merged kernel")
        b_new = None if not np.any(bias) and all(inf[3] is None for inf in self.info) else \
            rounded(bias, b_type, "merged bias")
        sj, sn = self.survivor[0], self.survivor[1]
        view, written = self.view, []

        def apply():
            written.append(view.set_constant(sj, 1, w_new, dtype, f"{node_label(sn)}_merged_weight"))
            if b_new is not None:
                written.append(view.set_constant(sj, 2, b_new, b_type, f"{node_label(sn)}_merged_bias"))
            if get_attr(sn, "kernel_shape", None) is not None:
                set_attr(sn, "kernel_shape", big)
            if get_attr(sn, "auto_pad", None) is not None:
                del_attr(sn, "auto_pad")
            if any(target) or get_attr(sn, "pads", None) is not None:
                set_attr(sn, "pads", list(target))
        return sj, written, apply


class DenseBranches:
    """MatMul or Gemm branches, each read as W [K, N] (float64) and an optional bias [N]."""

    def __init__(self, view, ops, kind, options):
        self.view, self.ops, self.kind = view, ops, kind

    def _read(self, node):
        view = self.view
        if self.kind == "MatMul":
            w = weight(view, node, 1, "MatMul weight", ndim=2)
            if w is None:
                raise Refusal(f"MatMul '{node_label(node)}' has no constant weight")
            return w.array.astype(np.float64), None, w.data_type
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
        return b, cv, w.data_type

    def read(self):
        parts = self.parts = [self._read(self.view.nodes[j]) for j in self.ops]
        if len({p[2] for p in parts}) != 1:
            raise Refusal(f"the {self.kind} branches have weights of different types")
        if len({p[0].shape for p in parts}) != 1:
            raise Refusal(f"the {self.kind} branches have weights of shapes {sorted({p[0].shape for p in parts})}")
        self.k, self.n = parts[0][0].shape
        x = self.view.nodes[self.ops[0]].input[0]
        return self.n, -1, 2 if self.kind == "Gemm" else self.view.index.rank(x)

    def merge(self, coefs, ident, shift):
        kind, view = self.kind, self.view
        total = sum(p[0] * coefs[j][None, :] for j, p in zip(self.ops, self.parts))
        bias = np.asarray(shift, dtype=np.float64).copy()
        has_bias = any(p[1] is not None for p in self.parts)
        for j, p in zip(self.ops, self.parts):
            if p[1] is not None:
                bias += coefs[j] * p[1]
        if ident is not None:
            if self.k != self.n:
                raise Refusal(f"an identity branch needs as many output as input features ({self.n} vs {self.k})")
            total[np.arange(self.n), np.arange(self.n)] += ident
        dtype = self.parts[0][2]
        sj = self.ops[0]
        sn = view.nodes[sj]
        written = []
        if kind == "MatMul":
            if np.any(bias):
                raise Refusal("the merged MatMul would need a bias: an affine branch's shift has no MatMul to go into")
            w_new = rounded(total, dtype, "merged weight")

            def apply():
                written.append(view.set_constant(sj, 1, w_new, dtype, f"{node_label(sn)}_merged_weight"))
            return sj, written, apply
        trans = int_attr(sn, "transB", 0)
        w_new = rounded(total.T if trans else total, dtype, "merged weight")
        c_old = weight(view, sn, 2, "Gemm C", ndim=(0, 1, 2))
        c_type = c_old.data_type if c_old is not None else dtype
        c_new = rounded(bias, c_type, "merged C") if has_bias or np.any(bias) else None

        def apply():
            written.append(view.set_constant(sj, 1, w_new, dtype, f"{node_label(sn)}_merged_weight"))
            if c_new is not None:
                written.append(view.set_constant(sj, 2, c_new, c_type, f"{node_label(sn)}_merged_C"))
            set_attr(sn, "alpha", 1.0)
            set_attr(sn, "beta", 1.0)
        return sj, written, apply


MERGES = {"Conv": ConvBranches, "ConvTranspose": ConvBranches, "MatMul": DenseBranches, "Gemm": DenseBranches}
