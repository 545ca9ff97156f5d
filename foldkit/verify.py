"""Run the original and the rewritten model on the same inputs and compare every output.

The runtime is ONNX Runtime on CPU with every graph optimization disabled (so ORT's own Conv+BN
fusion cannot hide a wrong fold). Where ORT has no CPU kernel for the model's types (bfloat16, a
float64 Conv) both models run on ONNX's reference evaluator instead; the result names the backend.

Comparison is scale-aware, per output::

    passed  iff  max|new - ref| <= atol + rtol * max|ref|
    max_rel_err = max|new - ref| / max|ref|

so a deep network's large activations are judged relative to their own magnitude. NaN/Inf must
appear in the same places in both. Integer and bool outputs must match exactly.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import onnx
from onnx import ModelProto, TensorProto

from .errors import InputError
from .graph import FLOAT_TYPES, iter_graphs, np_dtype

# (atol, rtol) per float type, from the least precise type in the model
DEFAULT_TOLERANCES = {
    TensorProto.DOUBLE: (1e-10, 1e-10),
    TensorProto.FLOAT: (1e-5, 1e-5),
    TensorProto.FLOAT16: (2e-3, 5e-3),
    TensorProto.BFLOAT16: (2e-2, 4e-2),
}
_PRECISION_ORDER = [TensorProto.BFLOAT16, TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE]


def model_float_type(model: ModelProto) -> int:
    """The least precise float type among the model's outputs and initializers."""
    types = {o.type.tensor_type.elem_type for o in model.graph.output}
    for g in iter_graphs(model.graph):
        types.update(t.data_type for t in g.initializer)
    for t in _PRECISION_ORDER:
        if t in types:
            return t
    return TensorProto.FLOAT


def default_tolerances(model: ModelProto):
    return DEFAULT_TOLERANCES[model_float_type(model)]


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


class _BackendUnavailable(Exception):
    pass


class _ReferenceFailed(Exception):
    """ONNX's reference evaluator (the fallback backend) could not run the model."""


def ort_source(path: str, base_dir: Optional[str] = None):
    """(what to hand ort.InferenceSession, the folder its external data is read from): the path,
    or for a file name that is not UTF-8 (which ORT cannot take) the file's bytes and its folder."""
    try:
        path.encode("utf-8")
        return path, base_dir
    except UnicodeEncodeError:
        with open(path, "rb") as f:
            return f.read(), os.path.dirname(os.path.abspath(path))


def _ort_session(source, base_dir: Optional[str] = None, mem_pattern: bool = True):
    """``source``: serialized bytes, or a model file's path (its external data beside it).
    ``mem_pattern=False``: no pre-planned memory pattern (ORT plans one block for every intermediate
    of a run, which for foldkit's statistics graph is 1.7x the memory the tensors need at once)."""
    import onnxruntime as ort

    if isinstance(source, str):
        source, base_dir = ort_source(source, base_dir)
    so = ort.SessionOptions()
    so.enable_mem_pattern = mem_pattern
    if base_dir and not isinstance(source, str):  # tensors left on disk are read from the model's folder
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", base_dir)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4  # errors surface as exceptions; keep ORT's own log off stderr
    try:
        # ORT's wrapper prints "EP Error" banners on failure; the exception says the same in one line
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            sess = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        msg = str(e)
        if "NOT_IMPLEMENTED" in msg or "Could not find an implementation" in msg or "Type Error" in msg:
            raise _BackendUnavailable(msg.splitlines()[0]) from None
        raise
    ro = ort.RunOptions()
    ro.log_severity_level = 4
    return lambda feeds: sess.run(None, feeds, ro)


def runner(model: Optional[ModelProto], model_bytes: Optional[bytes] = None, backend: Optional[str] = None,
           base_dir: Optional[str] = None, path: Optional[str] = None):
    """(feeds -> outputs, backend_name), the session made once: for running many batches."""
    if backend in (None, "onnxruntime"):
        try:
            data = path if path is not None else model_bytes if model_bytes is not None else model.SerializeToString()
            return _ort_session(data, base_dir), "onnxruntime-cpu"
        except _BackendUnavailable:
            if backend == "onnxruntime":
                raise
    from onnx.reference import ReferenceEvaluator

    try:
        if path is not None:
            ev = ReferenceEvaluator(onnx.load(path))
        else:
            full = model
            if base_dir and any(t.data_location == TensorProto.EXTERNAL for g in iter_graphs(model.graph)
                                for t in g.initializer):
                full = ModelProto()
                full.CopyFrom(model)
                onnx.external_data_helper.load_external_data_for_model(full, base_dir)
            ev = ReferenceEvaluator(full)
    except Exception as e:
        raise _ReferenceFailed(_first_line(e)) from None

    def go(feeds):
        try:
            return ev.run(None, feeds)
        except Exception as e:
            raise _ReferenceFailed(_first_line(e)) from None
    return go, "onnx-reference"


def _same_backend(ran: str) -> str:
    """The ``backend`` argument that runs a model where the one reported as ``ran`` ran."""
    return "onnxruntime" if ran == "onnxruntime-cpu" else "reference"


def run(model: Optional[ModelProto], feeds: dict, model_bytes: Optional[bytes] = None, backend: Optional[str] = None,
        base_dir: Optional[str] = None, path: Optional[str] = None):
    """Returns (outputs, backend_name). ``path``: run the model file there (``model`` unused)."""
    go, name = runner(model, model_bytes, backend, base_dir, path)
    return go(feeds), name


@dataclass
class OutputDiff:
    name: str
    max_abs_err: float
    max_rel_err: float
    passed: bool
    detail: str = ""
    noise_floor: Optional[float] = None


@dataclass
class VerificationResult:
    passed: bool
    max_abs_err: float
    max_rel_err: float
    atol: float
    rtol: float
    backend: str
    reference: str
    outputs: list = field(default_factory=list)
    inputs: dict = field(default_factory=dict)  # the shape of every generated input: {name: [dims]}
    seed: int = 0
    method: str = "end-to-end"  # or "local" (each rewrite's region), "unverified", "unchanged"
    data: Optional[dict] = None  # with --data: the source, samples and batches run, top-1 agreement
    end_to_end: Optional[str] = None  # why the whole model was not compared element-wise, if it was not
    local: Optional[str] = None  # what the local checks ran

    def to_dict(self) -> dict:
        return asdict(self)


def compare(name: str, ref, new, atol: float, rtol: float) -> OutputDiff:
    ref, new = np.asarray(ref), np.asarray(new)
    if ref.shape != new.shape:
        return OutputDiff(name, float("inf"), float("inf"), False, f"shape {list(new.shape)} != {list(ref.shape)}")
    if ref.dtype != new.dtype:
        return OutputDiff(name, float("inf"), float("inf"), False, f"dtype {new.dtype} != {ref.dtype}")
    if not (np.issubdtype(ref.dtype, np.floating) or ref.dtype.name == "bfloat16"):
        ok = bool(np.array_equal(ref, new))
        return OutputDiff(name, 0.0 if ok else float("inf"), 0.0 if ok else float("inf"), ok)
    r, n = ref.astype(np.float64), new.astype(np.float64)
    finite = np.isfinite(r)
    same_nonfinite = np.array_equal(np.isnan(r), np.isnan(n)) and np.array_equal(np.where(np.isinf(r), r, 0), np.where(np.isinf(n), n, 0))
    if r.size == 0:
        return OutputDiff(name, 0.0, 0.0, True)
    diff = np.abs(n[finite] - r[finite])
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(r[finite]).max()) if diff.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    passed = same_nonfinite and max_abs <= atol + rtol * scale
    return OutputDiff(name, max_abs, max_rel, passed, "" if same_nonfinite else "NaN/Inf positions differ")


RANDOM_OPS = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial")
NOISE_MARGIN = 4.0  # an error within this many times the 1-ulp noise floor is the model's own rounding


def _first_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:300]


def _backend_name(backend: Optional[str]) -> str:
    return "ONNX's reference evaluator" if backend == "onnx-reference" else "ONNX Runtime"


def _same_bits(a: list, b: list) -> bool:
    for x, y in zip(a, b):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.dtype.kind in "fc" or x.dtype.name == "bfloat16":
            if not np.array_equal(x.astype(np.float64), y.astype(np.float64), equal_nan=True):
                return False
        elif x.dtype == object:
            if not all(p == q for p, q in zip(x.reshape(-1), y.reshape(-1))):
                return False
        elif not np.array_equal(x, y):
            return False
    return True


def _has_random_ops(model: ModelProto) -> bool:
    return any(n.op_type in RANDOM_OPS for g in iter_graphs(model.graph) for n in g.node)


def _perturbed(model: ModelProto, names: set, base_dir: Optional[str], seed: int) -> ModelProto:
    """``model`` with every float initializer in ``names`` moved by one ulp (random direction)."""
    from onnx import numpy_helper

    m = ModelProto()
    m.CopyFrom(model)
    rng = np.random.default_rng(seed + 7)
    for t in m.graph.initializer:
        if t.name not in names or t.data_type not in FLOAT_TYPES:
            continue
        arr = numpy_helper.to_array(t, base_dir or "")
        a = np.asarray(arr)
        wide = a.astype(np.float64) if a.dtype.name == "bfloat16" else a
        if a.dtype.name == "bfloat16":
            up = np.nextafter(a.astype(np.float32), np.float32(np.inf)).astype(a.dtype)  # coarse, fine for a floor
            down = np.nextafter(a.astype(np.float32), np.float32(-np.inf)).astype(a.dtype)
        else:
            up, down = np.nextafter(wide, np.inf), np.nextafter(wide, -np.inf)
        new = np.where(rng.random(a.shape) < 0.5, up, down).astype(a.dtype)
        new = np.where(np.isfinite(a.astype(np.float64)), new, a)
        t.CopyFrom(numpy_helper.from_array(new, t.name))
    return m


def verify(reference: ModelProto, candidate: Optional[ModelProto], *, atol=None, rtol=None, input_shapes=None,
           seed: int = 0, reference_bytes: Optional[bytes] = None, candidate_bytes: Optional[bytes] = None,
           reference_label: str = "original", base_dir: Optional[str] = None,
           candidate_path: Optional[str] = None, max_input_bytes: Optional[int] = None,
           written: Optional[set] = None, data=None) -> VerificationResult:
    """Run ``reference`` and the candidate (a ModelProto, or the model file at ``candidate_path``)
    on the same inputs and compare their outputs (``method: end-to-end``). ``base_dir``: where
    tensors the models leave on disk are read from (not used for ``candidate_path``, whose data
    lies beside it). ``written``: the constants the rewrites wrote.

    When the whole model cannot run on generated inputs (strings, sequences, ops no backend has,
    value constraints), or its outputs are random, each rewrite's own region is checked instead
    (``method: local``, see foldkit.regions), and ``end_to_end`` says why. An end-to-end error over
    the tolerance but within the model's own rounding noise (the output change when every weight
    the rewrites read moves by one ulp) passes, with that ``noise_floor`` reported."""
    d_atol, d_rtol = default_tolerances(reference)
    tolerances_default = atol is None and rtol is None  # the noise floor never overrides tolerances given
    atol = d_atol if atol is None else float(atol)
    rtol = d_rtol if rtol is None else float(rtol)
    if data is not None:
        return _verify_data(reference, candidate, reference_bytes, candidate_bytes, candidate_path, base_dir, data,
                            atol, rtol, reference_label, seed, written if tolerances_default else None, input_shapes)
    why, backend, shapes, nondet, run_failed = None, None, {}, False, False
    try:
        feeds = make_inputs(reference, input_shapes, seed, max_bytes=max_input_bytes)
        shapes = {k: [int(d) for d in np.shape(v)] for k, v in feeds.items()}
    except InputError as e:
        if isinstance(e, InputShapeError):
            raise  # the user's --input-shape does not fit the model: a usage error
        why = (f"its generated inputs would be too large: {e}" if isinstance(e, InputsTooLarge)
               else f"foldkit cannot generate inputs for it: {e}")
    if why is None:
        try:
            ref_out, backend = run(reference, feeds, reference_bytes, base_dir=base_dir)
        except Exception as e:
            tried = "onnx-reference" if isinstance(e, _ReferenceFailed) else "onnxruntime-cpu"
            why = f"the original does not run on {_backend_name(tried)} with generated inputs: {_first_line(e)}"
            run_failed = True
    if why is None:
        same_backend = _same_backend(backend)
        try:
            new_out, _ = run(candidate, feeds, candidate_bytes, backend=same_backend, base_dir=base_dir,
                             path=candidate_path)
        except Exception as e:  # the original ran, the rewritten model does not: that is a failed verification
            detail = _first_line(e)
            names = [o.name for o in reference.graph.output]
            return VerificationResult(False, float("inf"), float("inf"), atol, rtol, backend, reference_label,
                                      [asdict(OutputDiff(n, float("inf"), float("inf"), False, f"does not run: {detail}"))
                                       for n in names], inputs=shapes, seed=seed)
        names = [o.name for o in reference.graph.output]
        random_ops = _has_random_ops(reference)
        nondet = random_ops
        if not nondet:
            diffs = [compare(n, a, b, atol, rtol) for n, a, b in zip(names, ref_out, new_out)]
            if not all(d.passed for d in diffs):
                # a difference means something only if the original gives the same outputs twice:
                # only a verification that would fail pays for the second run (and its session)
                try:
                    again, _ = run(reference, feeds, reference_bytes, base_dir=base_dir, backend=same_backend)
                    nondet = not _same_bits(ref_out, again)
                except Exception:
                    nondet = True
        if nondet:
            diffs = [OutputDiff(n, 0.0, 0.0, np.shape(a) == np.shape(b) and np.asarray(a).dtype == np.asarray(b).dtype,
                                "random outputs: compared by shape and type only")
                     for n, a, b in zip(names, ref_out, new_out)]
            why = ("its outputs are random (" + ("it has random ops" if random_ops else
                                                 "two runs of the original disagree") + "): compared by shape and type only")
            if not all(d.passed for d in diffs):
                return VerificationResult(False, float("inf"), float("inf"), atol, rtol, backend, reference_label,
                                          [asdict(d) for d in diffs], inputs=shapes, seed=seed, end_to_end=why)
        else:
            if not all(d.passed for d in diffs) and written and tolerances_default:
                diffs = _with_noise_floor(diffs, reference, candidate, candidate_path, reference_bytes, feeds, ref_out,
                                          written, base_dir, seed, atol, rtol, input_shapes)
            res = VerificationResult(
                passed=all(d.passed for d in diffs),
                max_abs_err=max((d.max_abs_err for d in diffs), default=0.0),
                max_rel_err=max((d.max_rel_err for d in diffs), default=0.0),
                atol=atol, rtol=rtol, backend=backend, reference=reference_label,
                outputs=[asdict(d) for d in diffs], inputs=shapes, seed=seed,
            )
            return res
    # the local checks decide, for a valid model; an invalid one that does not run is the input's problem
    from .api import checker_error

    invalid = checker_error(reference) if run_failed else None
    if invalid is not None:
        raise InputError(f"the original model does not run ({why.split(': ', 1)[-1]}) and fails onnx.checker: "
                         f"{invalid}")
    res = _verify_local(reference, candidate, candidate_path, written or set(), input_shapes, seed, atol, rtol,
                        base_dir, reference_label, why, shapes, max_input_bytes)
    if res.method == "unverified":
        invalid = checker_error(reference)
        if invalid is not None:  # nothing could be checked, and the input is not a valid model
            raise InputError(f"the model cannot be verified ({why}; {res.local}) and fails onnx.checker: {invalid}")
    return res


def _verify_data(reference, candidate, reference_bytes, candidate_bytes, candidate_path, base_dir, data, atol, rtol,
                 reference_label, seed, written, input_shapes):
    """End to end on real samples: every batch of ``data`` (a callable giving the batches, see
    foldkit.data) through both models; per output the worst error over all batches, and for
    classifier-like outputs ([N, K] floats, K >= 2) the share of samples whose top-1 class agrees."""
    from .data import LABEL

    try:
        ref_run, backend = runner(reference, reference_bytes, base_dir=base_dir)
    except Exception as e:
        raise InputError(f"--data: the original model cannot be loaded: {_first_line(e)}") from None
    cand_run, _ = runner(candidate, candidate_bytes, backend=_same_backend(backend),
                         base_dir=base_dir, path=candidate_path)
    names = [o.name for o in reference.graph.output]
    worst = {n: [0.0, 0.0, True, ""] for n in names}  # max abs, scale, same non-finite, detail
    agree = {n: [0, 0] for n in names}
    samples = nbatches = 0
    first = None
    random = _has_random_ops(reference)
    shapes = {}
    for batch in data():
        feeds = {k: v for k, v in batch.items() if k != LABEL}
        shapes = {k: [int(d) for d in np.shape(v)] for k, v in feeds.items()}
        try:
            a = ref_run(feeds)
        except Exception as e:
            raise InputError(f"--data: the original model does not run on the data (batch {nbatches}, "
                             f"shapes {shapes}): {_first_line(e)}") from None
        try:
            b = cand_run(feeds)
        except Exception as e:
            return VerificationResult(False, float("inf"), float("inf"), atol, rtol, backend, reference_label,
                                      [asdict(OutputDiff(n, float("inf"), float("inf"), False,
                                                         f"does not run: {_first_line(e)}")) for n in names],
                                      inputs=shapes, seed=seed)
        if first is None:
            first = (feeds, a)
        nbatches += 1
        samples += next(iter(feeds.values())).shape[0] if feeds and np.ndim(next(iter(feeds.values()))) else 1
        for n, x, y in zip(names, a, b):
            x, y = np.asarray(x), np.asarray(y)
            if x.shape != y.shape or x.dtype != y.dtype:
                worst[n] = [float("inf"), 0.0, False, f"shape/dtype {list(y.shape)} {y.dtype} != {list(x.shape)} {x.dtype}"]
                continue
            if random:
                continue
            d = compare(n, x, y, atol, rtol)
            if x.dtype.kind == "f" or x.dtype.name == "bfloat16":
                x64 = x.astype(np.float64)
                fin = np.isfinite(x64)
                worst[n][1] = max(worst[n][1], float(np.abs(x64[fin]).max()) if fin.any() else 0.0)
                if x.ndim == 2 and x.shape[1] >= 2:
                    agree[n][0] += int(np.sum(np.argmax(x, 1) == np.argmax(y, 1)))
                    agree[n][1] += x.shape[0]
            elif not d.passed:
                worst[n][3] = "integer outputs differ"
            worst[n][0] = max(worst[n][0], d.max_abs_err)
            if d.detail:
                worst[n][2], worst[n][3] = False, d.detail
    diffs = []
    for n in names:
        m_abs, scale, same, detail = worst[n]
        rel = m_abs / scale if scale > 0 else (0.0 if m_abs == 0 else float("inf"))
        ok = same and not detail.startswith(("shape", "integer")) and m_abs <= atol + rtol * scale
        diffs.append(OutputDiff(n, m_abs, rel, ok, "random outputs: compared by shape and type only" if random else detail))
    if written and first is not None and not all(d.passed for d in diffs):
        diffs = _with_noise_floor(diffs, reference, candidate, candidate_path, reference_bytes, first[0], first[1],
                                  written, base_dir, seed, atol, rtol, input_shapes)
    top1 = {n: round(c / t, 6) for n, (c, t) in agree.items() if t}
    return VerificationResult(
        passed=all(d.passed for d in diffs), max_abs_err=max((d.max_abs_err for d in diffs), default=0.0),
        max_rel_err=max((d.max_rel_err for d in diffs), default=0.0), atol=atol, rtol=rtol, backend=backend,
        reference=reference_label, outputs=[asdict(d) for d in diffs], inputs=shapes, seed=seed,
        data={"samples": samples, "batches": nbatches, "top1_agreement": top1},
        end_to_end="its outputs are random: compared by shape and type only" if random else None)


def _candidate_model(candidate, candidate_path):
    if candidate is not None:
        return candidate, None
    return onnx.load(candidate_path, load_external_data=False), os.path.dirname(os.path.abspath(candidate_path))


def _run_regions(regions, seed, base_dir, cand_dir):
    from .regions import feeds_for

    feeds = feeds_for(regions, seed)
    ref_out, backend = run(regions.reference, feeds, base_dir=base_dir)
    new_out, _ = run(regions.candidate, feeds, backend=_same_backend(backend),
                     base_dir=cand_dir if cand_dir is not None else base_dir)
    return feeds, ref_out, new_out, backend


def _with_noise_floor(diffs, reference, candidate, candidate_path, reference_bytes, feeds, ref_out, written, base_dir,
                      seed, atol, rtol, input_shapes):
    """Outputs over the tolerance are judged against the model's own rounding noise: the output
    change when every weight the rewrites read moves by one ulp."""
    from .regions import cut

    try:
        cand, _ = _candidate_model(candidate, candidate_path)
        regions = cut(reference, cand, written, input_shapes)
        names = {t.name for t in regions.reference.graph.initializer} if regions.reference is not None else set()
        if not names:
            return diffs
        shaken = _perturbed(reference, names, base_dir, seed)
        shaken_out, _ = run(shaken, feeds, base_dir=base_dir)
    except Exception:  # no floor could be measured: the plain tolerance stands
        return diffs
    out = []
    for d, a, b in zip(diffs, ref_out, shaken_out):
        if d.passed or not np.issubdtype(np.asarray(a).dtype, np.floating):
            out.append(d)
            continue
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        fin = np.isfinite(a64) & np.isfinite(b64)
        floor = float(np.max(np.abs(a64[fin] - b64[fin]))) if fin.any() else 0.0
        ok = d.detail == "" and floor > 0 and d.max_abs_err <= NOISE_MARGIN * floor
        out.append(OutputDiff(d.name, d.max_abs_err, d.max_rel_err, ok,
                              f"noise floor {floor:.3g} (1 ulp on the rewritten weights); "
                              f"{'within' if ok else 'over'} {NOISE_MARGIN:g}x of it", noise_floor=floor))
    return out


def _verify_local(reference, candidate, candidate_path, written, input_shapes, seed, atol, rtol, base_dir,
                  reference_label, why, shapes, max_input_bytes=None):
    from .regions import cut, shrink

    cand, cand_dir = _candidate_model(candidate, candidate_path)
    regions = cut(reference, cand, written, input_shapes)
    if regions.count:
        shrink(regions, DEFAULT_MAX_INPUT_BYTES if max_input_bytes is None else int(max_input_bytes))
    note = "; ".join(regions.skipped)
    if not regions.count:
        return VerificationResult(True, 0.0, 0.0, atol, rtol, "none", reference_label, [], inputs=shapes, seed=seed,
                                  method="unverified", end_to_end=why,
                                  local=f"no rewritten region could be run on its own{': ' + note if note else ''}")
    try:
        feeds, ref_out, new_out, backend = _run_regions(regions, seed, base_dir, cand_dir)
    except Exception as e:
        return VerificationResult(True, 0.0, 0.0, atol, rtol, "none", reference_label, [], inputs=shapes, seed=seed,
                                  method="unverified", end_to_end=why,
                                  local=f"the rewritten regions do not run on their own: {_first_line(e)}")
    diffs = [compare(n, a, b, atol, rtol) for n, a, b in zip(regions.outputs, ref_out, new_out)]
    return VerificationResult(
        passed=all(d.passed for d in diffs), max_abs_err=max((d.max_abs_err for d in diffs), default=0.0),
        max_rel_err=max((d.max_rel_err for d in diffs), default=0.0), atol=atol, rtol=rtol, backend=backend,
        reference=reference_label, outputs=[asdict(d) for d in diffs], inputs=shapes, seed=seed, method="local",
        end_to_end=why, local=(f"{regions.count} rewritten region(s) run on their own, inputs "
                               + ", ".join(f"{k}{list(np.shape(v))}" for k, v in list(feeds.items())[:6])
                               + (" ..." if len(feeds) > 6 else "")
                               + (f" (sizes not known from shape inference, defaults used: {', '.join(regions.defaulted)}; "
                                  "give them with --input-shape)" if regions.defaulted else "")
                               + (f"; {note}" if note else "")))
