"""Real input data: ``--data DATA`` for every command that takes it.

DATA is one of:

- a ``.npz`` file whose arrays are named after the model's inputs, samples along axis 0 (a model
  with a single input may use any one array; an array named ``label`` is never fed: it holds the
  labels of classifier data);
- a folder of such files, read in sorted file-name order, one file at a time (memory does not grow
  with the data set);
- ``FILE.py:FN`` (or ``MODULE:FN``): a function returning an iterable of {input name: array}
  dicts, samples along axis 0.

Batches: a ``FILE.py:FN`` source's items are its batches, used as they come (DataLoader-style
iterables whose batches the user chose: precise-BN statistics depend on them). ``.npz`` data has no
batches of its own: it is cut into consecutive slices of ``DEFAULT_BATCH`` samples in data order
(across file boundaries; the last one may be smaller). A ``batch_size`` given re-cuts any source
into such slices (and a model that fixes its batch size takes slices of that size);
:func:`batching` says which applies. ``max_samples`` stops after that many samples. Arrays are cast to the
model input's dtype when that is lossless for floats (float64 data into a float32 model); any other
mismatch is an error naming the input.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional

import numpy as np

from .errors import InputError

LABEL = "label"


class DataError(InputError):
    """``--data`` cannot be used with this model (exit 2): unreadable, missing arrays, wrong dtypes,
    or the model does not run on it."""
DEFAULT_BATCH = 32


def is_function(spec) -> bool:
    """Whether ``spec`` names a ``FILE.py:FN`` / ``MODULE:FN`` source (not a file or folder)."""
    if not isinstance(spec, (str, os.PathLike)):
        return False
    spec = os.fspath(spec)
    return not (os.path.isdir(spec) or spec.endswith(".npz") or os.path.isfile(spec)) and ":" in spec


def batching(spec, batch_size: Optional[int] = None, fixed: Optional[int] = None) -> str:
    """How the batches of ``spec`` are cut, in words (the reports say it)."""
    if fixed:
        return f"re-cut into slices of {fixed} samples: the model fixes its batch size"
    if batch_size:
        return f"re-cut into slices of {batch_size} samples (--batch-size)"
    if is_function(spec):
        return "as the function yields them"
    return f"slices of {DEFAULT_BATCH} samples in data order (.npz data has no batches of its own; --batch-size sets the size)"


def _sources(spec: str) -> Iterator[tuple]:
    """(where, {name: array}) chunks in data order."""
    if os.path.isdir(spec):
        files = sorted(f for f in os.listdir(spec) if f.endswith(".npz"))
        if not files:
            raise DataError(f"--data {spec}: a folder with no .npz file")
        for f in files:
            yield from _npz(os.path.join(spec, f))
    elif spec.endswith(".npz") or os.path.isfile(spec):
        if not os.path.isfile(spec):
            raise DataError(f"--data {spec}: no such file")
        yield from _npz(spec)
    elif ":" in spec:
        from .factory import _why, load_factory

        fn = load_factory(spec)
        try:
            for k, chunk in enumerate(fn()):
                if not isinstance(chunk, dict):
                    raise DataError(f"--data {spec}: item {k} is a {type(chunk).__name__}, not a dict of arrays")
                yield f"{spec} item {k}", {str(n): np.asarray(a) for n, a in chunk.items()}
        except DataError:
            raise
        except (Exception, SystemExit) as e:  # the user's code
            raise DataError(f"--data {spec}: the function failed: {_why(e)}") from None
    else:
        raise DataError(f"--data {spec}: expected a .npz file, a folder of them, or FILE.py:FUNCTION")


def _npz(path: str) -> Iterator[tuple]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {n: z[n] for n in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"--data {path}: not a readable .npz file ({str(e).splitlines()[0] if str(e) else e})") from None
    yield path, arrays


def _pick(where: str, arrays: dict, inputs: dict) -> dict:
    """The arrays to feed, by model input name, cast to the input's dtype; labels kept apart."""
    names = list(inputs)
    fed = {n: a for n, a in arrays.items() if n != LABEL}
    if len(names) == 1 and names[0] not in fed:
        if len(fed) != 1:
            raise DataError(f"--data {where}: no array named '{names[0]}' (the model's input), and "
                             f"{len(fed)} arrays to choose from ({', '.join(sorted(fed)[:5])})")
        fed = {names[0]: next(iter(fed.values()))}
    missing = [n for n in names if n not in fed]
    if missing:
        raise DataError(f"--data {where}: no array for the model input(s) {', '.join(missing)} "
                         f"(arrays: {', '.join(sorted(arrays)[:8])})")
    out = {}
    for n in names:
        a, want = np.asarray(fed[n]), inputs[n]
        if a.ndim == 0:
            raise DataError(f"--data {where}: '{n}' is a scalar; samples go along axis 0")
        if a.dtype != want:
            lossless_float = a.dtype.kind == "f" and np.dtype(want).kind == "f"
            same_kind_int = a.dtype.kind in "iu" and np.dtype(want).kind in "iu" and np.can_cast(a.dtype, want, "same_kind")
            if not (lossless_float or same_kind_int or a.dtype == np.bool_ and want == np.bool_):
                raise DataError(f"--data {where}: '{n}' holds {a.dtype}, the model input takes {np.dtype(want)}")
            a = a.astype(want)
        out[n] = a
    counts = {n: a.shape[0] for n, a in out.items()}
    if LABEL in arrays:
        counts[LABEL] = np.asarray(arrays[LABEL]).shape[0] if np.ndim(arrays[LABEL]) else -1
    if len(set(counts.values())) != 1:
        raise DataError(f"--data {where}: the arrays hold different numbers of samples ({counts})")
    if LABEL in arrays:
        out[LABEL] = np.asarray(arrays[LABEL])
    return out


def batches(spec: str, inputs: dict, batch_size: Optional[int] = None, max_samples: Optional[int] = None
            ) -> Iterator[dict]:
    """{input name: array} batches (plus ``label`` when the data has labels). ``inputs``: {name:
    numpy dtype} of the model's inputs, in order. ``batch_size`` None: a function's batches as they
    come, .npz data in slices of DEFAULT_BATCH (see the module doc)."""
    if batch_size is not None and int(batch_size) < 1:
        raise DataError("--batch-size must be positive")
    if max_samples is not None and max_samples < 1:
        raise DataError("--max-samples must be positive")
    recut = not (batch_size is None and is_function(spec))  # a function's batches come as they are
    size = int(batch_size or DEFAULT_BATCH)
    pending, held, seen, any_data = [], 0, 0, False
    for where, arrays in _sources(spec):
        chunk = _pick(where, arrays, inputs)
        n = next(iter(chunk.values())).shape[0]
        if n == 0:
            continue
        any_data = True
        if max_samples is not None:
            n = min(n, max_samples - seen)
            chunk = {k: v[:n] for k, v in chunk.items()}
        seen += n
        if not recut:
            yield chunk
        else:
            pending.append(chunk)
            held += n
            while held >= size:
                out, pending, held = _take(pending, size, held)
                yield out
        if max_samples is not None and seen >= max_samples:
            break
    if held:
        yield _take(pending, held, held)[0]
    if not any_data:
        raise DataError(f"--data {spec}: no samples")


def _take(pending: list, size: int, held: int):
    parts, need, rest = [], size, []
    for k, chunk in enumerate(pending):
        n = next(iter(chunk.values())).shape[0]
        if need == 0:
            rest.append(chunk)
        elif n <= need:
            parts.append(chunk)
            need -= n
        else:
            parts.append({a: v[:need] for a, v in chunk.items()})
            rest.append({a: v[need:] for a, v in chunk.items()})
            need = 0
    out = {a: np.concatenate([p[a] for p in parts]) if len(parts) > 1 else parts[0][a] for a in parts[0]}
    return out, rest, held - size


def model_inputs(model) -> dict:
    """{name: numpy dtype} of the graph inputs that are not initializers."""
    from .graph import np_dtype

    inits = {t.name for t in model.graph.initializer}
    out = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        if not i.type.HasField("tensor_type"):
            raise DataError(f"--data: input '{i.name}' is not a tensor")
        out[i.name] = np.dtype(np_dtype(i.type.tensor_type.elem_type))
    return out


def fixed_batch(model) -> Optional[int]:
    """The batch size the model fixes on its first input's first dimension, if any."""
    inits = {t.name for t in model.graph.initializer}
    for i in model.graph.input:
        if i.name in inits or not i.type.tensor_type.HasField("shape"):
            continue
        dims = i.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
        return None
    return None


def files(data) -> list:
    """The files a data spec reads (so that no output can be one of them); ``data`` as :func:`source`
    takes it."""
    if data is None or callable(data):
        return []
    spec = os.fspath(data if isinstance(data, (str, os.PathLike)) else data[0])
    if os.path.isdir(spec):
        return [os.path.join(spec, f) for f in sorted(os.listdir(spec)) if f.endswith(".npz")]
    if os.path.isfile(spec):
        return [spec]
    target = spec.rpartition(":")[0]
    return [target] if os.path.isfile(target) else []


def source(data, model):
    """``data`` (a spec, a (spec, batch_size, max_samples) tuple, or a callable returning batches) as
    a callable that streams ``model``'s batches anew each time (a model with a fixed batch uses its
    own); None stays None."""
    if data is None or callable(data):
        return data
    spec, batch_size, max_samples = (data, None, None) if isinstance(data, (str, os.PathLike)) else data
    inputs = model_inputs(model)
    size = fixed_batch(model) or batch_size
    return lambda: batches(os.fspath(spec), inputs, size, max_samples)
