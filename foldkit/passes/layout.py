"""Where the channels of a tensor go through layout ops (Transpose, Reshape, Flatten, Squeeze,
Unsqueeze, Identity), so that a per-channel map after them can fold into the op before them.

A per-channel map y = s[c] * v + t[c] commutes with an op that only moves elements, as long as
every element keeps its channel: the map applied before the layout ops, on the producer's own
channel axis, gives the same values. That holds when the channel axis survives as an axis of its
own, with the same extent, in the same order:

- Transpose(perm): axis a goes to perm.index(a);
- Reshape, Flatten, Squeeze, Unsqueeze (row-major moves of the same elements): axis a of dims d
  goes to axis b of dims e where e[b] = d[a] and the products of the dims before it are the same
  (d[:a] vs e[:b]) or those after it are (d[a+1:] vs e[b+1:]): a reshape keeps the element count,
  so one side equal makes the other equal. A symbolic dim counts as a factor of its own; an
  unknown dim only on the other side does not matter. The dims come from shape inference (or the
  model's value_info).

Anything else, or an unknown dim, and the channels cannot be shown to survive: the fold is refused
with that reason.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

import numpy as np

from ..graph import get_attr, node_label
from .common import Refusal

LAYOUT = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")


def is_layout(node) -> bool:
    return node.domain in ("", "ai.onnx") and node.op_type in LAYOUT


def _product(dims):
    """The product of dims as (int, symbols counted), or None when a dim is unknown."""
    n, symbols = 1, Counter()
    for d in dims:
        if d is None:
            return None
        if isinstance(d, int):
            n *= d
        else:
            symbols[d] += 1
    return n, symbols


def moved_axis(view, node, axis: int, rank: int) -> tuple:
    """(axis, rank) of the channels after layout op ``node`` when they are on ``axis`` (>= 0) of its
    input, or Refusal."""
    label = f"{node.op_type} '{node_label(node)}'"
    if node.op_type == "Identity":
        return axis, rank
    if node.op_type == "Transpose":
        perm = get_attr(node, "perm", None)
        perm = list(range(rank))[::-1] if perm is None else [int(p) % rank for p in perm]
        if sorted(perm) != list(range(rank)):
            raise Refusal(f"{label} has a perm that is not a permutation of {rank} axes")
        return perm.index(axis), rank
    if node.op_type in ("Squeeze", "Unsqueeze"):
        moved = _by_axes(view, node, axis, rank)
        if moved is not None:
            return moved
    d_in, d_out = view.index.dims(node.input[0]), view.index.dims(node.output[0])
    if d_in is None or d_out is None or len(d_in) != rank or d_in[axis] is None:
        raise Refusal(f"the shapes around {label} are not known, so the channels cannot be shown to stay an axis")
    c = d_in[axis]
    before, after = _product(d_in[:axis]), _product(d_in[axis + 1:])
    # a reshape keeps the element count, so with the channel extent equal, equal products on one side
    # mean equal products on the other (an unknown dim there does not matter)
    for b, e in enumerate(d_out):
        if e != c:
            continue
        pb, pa = _product(d_out[:b]), _product(d_out[b + 1:])
        if before is not None and pb == before or after is not None and pa == after:
            return b, len(d_out)
    raise Refusal(f"{label} reshapes {list(d_in)} to {list(d_out)}: the {c} channels on axis {axis} do not stay "
                  "an axis of their own")


def _by_axes(view, node, axis: int, rank: int):
    """Squeeze / Unsqueeze with known axes: the move needs no dims (ONNX requires a squeezed dim to
    be 1). None when the axes are not known."""
    if len(node.input) > 1 and node.input[1]:
        c = view.constant(node.input[1])
        axes = None if c is None else [int(a) for a in np.asarray(c.array).reshape(-1)]
    else:
        a = get_attr(node, "axes", None)
        axes = None if a is None else [int(v) for v in a]
    if not axes:
        return None
    out = rank + len(axes) if node.op_type == "Unsqueeze" else rank
    if any(not -out <= a < out for a in axes):
        return None
    if node.op_type == "Unsqueeze":
        inserted = {a % out for a in axes}
        if len(inserted) != len(axes):
            return None
        kept = [p for p in range(out) if p not in inserted]
        return kept[axis], out
    squeezed = {a % rank for a in axes}
    if axis in squeezed:
        raise Refusal(f"{node.op_type} '{node_label(node)}' removes the channel axis")
    return axis - sum(a < axis for a in squeezed), rank - len(squeezed)


SHAPE_ONLY = ("Shape", "Size")  # readers of a value's dims, not of its values


def shape_readers(view, name: str) -> list:
    """(node index, input position) of the Shape / Size nodes reading ``name``."""
    return [(j, q) for j, q in view.consumers(name)
            if view.nodes[j].op_type in SHAPE_ONLY and view.nodes[j].domain in ("", "ai.onnx")]


def data_uses(view, name: str) -> int:
    """How many reads of ``name`` need its values (its uses, less the Shape / Size readers)."""
    return view.uses(name) - len(shape_readers(view, name))


def through_layout(view, name: str):
    """The layout ops that compute ``name`` from a non-layout producer, each read only by the next:
    (the producer's output, [layout node indices, first to last]). None when ``name`` is not the
    output of a layout op."""
    chain, cur = [], name
    while True:
        j = view.producer_of(cur)
        if j is None or not is_layout(view.nodes[j]) or not view.nodes[j].input or not view.nodes[j].input[0]:
            break
        if cur != name and (view.uses(cur) != 1 or view.is_graph_output(cur)):
            break
        chain.append(j)
        cur = view.nodes[j].input[0]
    if not chain:
        return None
    return cur, chain[::-1]


def channel_axis_after(view, chain, axis: int, rank: int) -> tuple:
    """(axis as a negative index, rank) of the channels at the end of the layout ``chain``."""
    for j in chain:
        axis, rank = moved_axis(view, view.nodes[j], axis, rank)
    return axis - rank, rank


class Moved:
    """A per-channel map read on the axis the channels have after layout ops: ``st`` answers for the
    producer's channels, whatever axis the producer's plan names."""

    def __init__(self, aff, neg: int, rank: int, x: str, x_after: str):
        self.aff, self.neg, self.rank = aff, neg, rank
        self.node, self.x, self.x_after = aff.node, x, x_after  # the producer's output, the map's input
        self.is_bn = getattr(aff, "is_bn", False)
        self.shift_only = getattr(aff, "shift_only", False)

    def st(self, c, neg, rank, op):
        return self.aff.st(c, self.neg, self.rank, op)


def producer_axis(view, p, z: str) -> Optional[tuple]:
    """(axis >= 0, rank) of the output channels of producer ``p`` (output ``z``), or None."""
    rank = view.index.rank(z)
    if p.op_type in ("Conv", "ConvTranspose"):
        w = view.constant(p.input[1]) if len(p.input) > 1 else None
        r = w.array.ndim if w is not None else rank
        return (1, r) if r else None
    if p.op_type == "Gemm":
        return 1, 2
    if p.op_type in ("MatMul", "Add") and rank:
        return rank - 1, rank
    return None
