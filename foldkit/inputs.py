"""Model inputs: the one ``--input-shape`` grammar every command takes, resolving it against the
model's declared shapes, and generating seeded inputs within the --max-input-mb cap (verification
and ``bench`` alike)."""

from __future__ import annotations

from typing import Optional

import numpy as np
from onnx import ModelProto, TensorProto

from .errors import InputError
from .graph import FLOAT_TYPES, np_dtype

SHAPE_GRAMMAR = "NAME:1,3,224,224, NAME:1x3x224x224 or NAME=1,3,224,224 (plain dims for a single-input model)"


def parse_dims(text: str, what: str = "--input-shape") -> list:
    """"1,3,224,224" or "1x3x224x224" (trtexec's form) -> [1, 3, 224, 224]; "" is a scalar."""
    parts = [d.strip() for d in text.replace("x", ",").replace("X", ",").split(",")]
    if parts == [""]:
        return []
    try:
        dims = [int(d) for d in parts]
    except ValueError:
        raise InputError(f"{what} '{text}': dimensions must be integers, as in 1,3,224,224 or 1x3x224x224") from None
    if any(d <= 0 for d in dims):
        raise InputError(f"{what} '{text}': dimensions must be positive integers")
    return dims


def parse_input_shapes(specs) -> dict:
    """One grammar for every command, the conventions users bring from other tools:
    ``name:1,3,224,224`` (onnxsim, onnxslim), ``name:1x3x224x224`` (trtexec) and ``name=1,3,224,224``.
    The separator is the last ``:`` or ``=`` (so TensorFlow names such as ``input:0`` work); plain
    dims name no input (key None) and are only accepted for a model with a single input."""
    shapes = {}
    for spec in specs or ():
        cut = max(spec.rfind("="), spec.rfind(":"))
        name, dims = (spec[:cut], spec[cut + 1:]) if cut >= 0 else (None, spec)
        if name == "":
            raise InputError(f"--input-shape '{spec}': expected {SHAPE_GRAMMAR}")
        if cut < 0 and not spec.strip():
            raise InputError(f"--input-shape '{spec}': expected {SHAPE_GRAMMAR}")
        if name in shapes:
            raise InputError(f"--input-shape given twice for {'the input' if name is None else repr(name)}")
        shapes[name] = parse_dims(dims)
    return shapes


def resolve_input_shapes(model: ModelProto, input_shapes: Optional[dict]) -> dict:
    """Name the plain-dims entry (key None) after the model's only input; unknown names refused."""
    shapes = dict(input_shapes or {})
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    if None in shapes:
        dims = shapes.pop(None)
        if len(names) != 1:
            raise InputShapeError(f"--input-shape without a name only fits a model with one input; this one has "
                             f"{len(names)} ({', '.join(names[:5])}): use {SHAPE_GRAMMAR.split(' (')[0]}")
        if names[0] in shapes:
            raise InputShapeError(f"--input-shape given twice for '{names[0]}'")
        shapes[names[0]] = dims
    unknown = set(shapes) - set(names)
    if unknown:
        raise InputShapeError(f"--input-shape names {sorted(unknown)}, which are not inputs of the model "
                         f"(its inputs: {', '.join(names[:10]) or 'none'})")
    return shapes


DEFAULT_MAX_INPUT_BYTES = 1 << 30  # generated inputs in all; --max-input-mb raises it


def make_inputs(model: ModelProto, input_shapes: Optional[dict] = None, seed: int = 0, batch: Optional[int] = None,
                max_bytes: Optional[int] = None) -> dict:
    """Seeded random feeds for every graph input that is not an initializer, at most ``max_bytes``
    in all (default 1 GiB): the total is computed from the shapes before anything is allocated.

    Symbolic or unknown dimensions take the size given in ``input_shapes`` for that input, else
    ``batch`` for the first dimension, else 1.
    """
    input_shapes = resolve_input_shapes(model, input_shapes)
    inits = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = {}
    limit = DEFAULT_MAX_INPUT_BYTES if max_bytes is None else int(max_bytes)
    plans = []
    total = 0
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        if not inp.type.HasField("tensor_type"):
            raise InputError(f"input '{inp.name}' is not a tensor; foldkit cannot generate data for it (use --no-verify)")
        tt = inp.type.tensor_type
        if inp.name in input_shapes:
            shape = list(input_shapes[inp.name])
            if tt.HasField("shape"):
                if len(shape) != len(tt.shape.dim):
                    raise InputShapeError(f"--input-shape for '{inp.name}' has {len(shape)} dimensions, the model declares {len(tt.shape.dim)}")
                for k, (d, given) in enumerate(zip(tt.shape.dim, shape)):
                    if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != given:
                        raise InputShapeError(f"--input-shape for '{inp.name}': dimension {k} is fixed to {d.dim_value} in the model, not {given}")
        elif tt.HasField("shape"):
            shape = []
            for k, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value") and d.dim_value > 0:
                    shape.append(d.dim_value)
                else:
                    shape.append(batch if (batch and k == 0) else 1)
        else:
            raise InputError(f"input '{inp.name}' has no declared shape; give one with --input-shape {inp.name}:D0,D1,...")
        if any(d <= 0 for d in shape):
            raise InputError(f"input '{inp.name}' of shape {shape}: dimensions must be positive "
                             f"(give sizes with --input-shape {inp.name}:D0,D1,...)")
        try:
            dtype = np_dtype(tt.elem_type)
        except (KeyError, TypeError, ValueError):
            raise InputError(f"input '{inp.name}' has an undefined element type ({tt.elem_type})") from None
        numel = 1
        for d in shape:
            numel *= int(d)
        total += numel * dtype.itemsize
        if total > limit:
            raise InputsTooLarge(f"generated inputs would take {total / 2 ** 20:,.0f} MiB at least (input '{inp.name}' "
                             f"of shape {shape}), over the {limit / 2 ** 20:,.0f} MiB cap; raise it with "
                             f"--max-input-mb, give smaller sizes with --input-shape, or use --no-verify")
        plans.append((inp, tt, shape, dtype))
    for inp, tt, shape, dtype in plans:
        if tt.elem_type in FLOAT_TYPES:
            arr = rng.standard_normal(shape).astype(dtype)
        elif tt.elem_type == TensorProto.BOOL:
            arr = rng.random(shape) < 0.5
        elif np.issubdtype(dtype, np.integer):
            arr = rng.integers(0, 2, size=shape).astype(dtype)
        else:
            raise InputError(f"input '{inp.name}' has type {TensorProto.DataType.Name(tt.elem_type)}, which foldkit cannot generate")
        feeds[inp.name] = np.asarray(arr, dtype=dtype)  # rank-0 inputs must be arrays, not numpy scalars
    return feeds


class InputsTooLarge(InputError):
    """The generated inputs would exceed the --max-input-mb cap."""


class InputShapeError(InputError):
    """An --input-shape that does not fit the model (a usage error, never a reason to skip a check)."""
