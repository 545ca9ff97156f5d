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

import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import onnx
from onnx import ModelProto, TensorProto

from .errors import InputError
from .graph import FLOAT_TYPES, iter_graphs
from .backends import (_BackendUnavailable, _ReferenceFailed, _first_line, _ort_session, _same_backend,  # noqa: F401
                       ort_source, run, runner)
from .inputs import (DEFAULT_MAX_INPUT_BYTES, SHAPE_GRAMMAR, InputShapeError, InputsTooLarge,  # noqa: F401
                     make_inputs, parse_dims, parse_input_shapes, resolve_input_shapes)
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


@dataclass
class ReferenceStage:
    """The original's half of an end-to-end check on generated inputs: the feeds and the original's
    outputs, or why the whole model cannot be compared (``why``; ``run_failed``: it did not run)."""

    feeds: dict
    shapes: dict
    ref_out: Optional[list]
    backend: Optional[str]
    why: Optional[str]
    run_failed: bool
    threads: Optional[int] = None  # ORT's intra-op threads for the original's runs (None: its default)


def reference_stage(reference: ModelProto, reference_bytes: Optional[bytes] = None, input_shapes=None, seed: int = 0,
                    max_input_bytes: Optional[int] = None, base_dir: Optional[str] = None, run_options=None,
                    worker: bool = False, threads: Optional[int] = None) -> ReferenceStage:
    """Generate the inputs and run the original on them (see :func:`verify`); a usage error in
    ``input_shapes`` raises InputShapeError. ``run_options``, ``worker``, ``threads``: see
    foldkit.backends (every later run of the original in this verification uses the same threads)."""
    why, backend, shapes, feeds, ref_out, run_failed = None, None, {}, {}, None, False
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
            ref_out, backend = run(reference, feeds, reference_bytes, base_dir=base_dir, run_options=run_options,
                                   worker=worker, threads=threads)
        except Exception as e:
            tried = "onnx-reference" if isinstance(e, _ReferenceFailed) else "onnxruntime-cpu"
            why = f"the original does not run on {_backend_name(tried)} with generated inputs: {_first_line(e)}"
            run_failed = True
    return ReferenceStage(feeds, shapes, ref_out, backend, why, run_failed, threads)


def verify(reference: ModelProto, candidate: Optional[ModelProto], *, atol=None, rtol=None, input_shapes=None,
           seed: int = 0, reference_bytes: Optional[bytes] = None, candidate_bytes: Optional[bytes] = None,
           reference_label: str = "original", base_dir: Optional[str] = None,
           candidate_path: Optional[str] = None, max_input_bytes: Optional[int] = None,
           written: Optional[set] = None, data=None, reference_run=None) -> VerificationResult:
    """Run ``reference`` and the candidate (a ModelProto, or the model file at ``candidate_path``)
    on the same inputs and compare their outputs (``method: end-to-end``). ``base_dir``: where
    tensors the models leave on disk are read from (not used for ``candidate_path``, whose data
    lies beside it). ``written``: the constants the rewrites wrote.

    When the whole model cannot run on generated inputs (strings, sequences, ops no backend has,
    value constraints), or its outputs are random, each rewrite's own region is checked instead
    (``method: local``, see foldkit.regions), and ``end_to_end`` says why. An end-to-end error over
    the tolerance but within the model's own rounding noise (the output change when every weight
    the rewrites read moves by one ulp) passes, with that ``noise_floor`` reported.

    ``reference_run``: the original's half already under way (foldkit.early.ReferenceRun, started
    with these inputs' options while the folds ran); its outcome is the one computed here otherwise."""
    d_atol, d_rtol = default_tolerances(reference)
    tolerances_default = atol is None and rtol is None  # the noise floor never overrides tolerances given
    atol = d_atol if atol is None else float(atol)
    rtol = d_rtol if rtol is None else float(rtol)
    if data is not None:
        return _verify_data(reference, candidate, reference_bytes, candidate_bytes, candidate_path, base_dir, data,
                            atol, rtol, reference_label, seed, written if tolerances_default else None, input_shapes)
    stage = reference_run.result() if reference_run is not None else \
        reference_stage(reference, reference_bytes, input_shapes, seed, max_input_bytes, base_dir)
    feeds, shapes, ref_out, backend, why, run_failed = (stage.feeds, stage.shapes, stage.ref_out, stage.backend,
                                                         stage.why, stage.run_failed)
    nondet = False
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
                    again, _ = run(reference, feeds, reference_bytes, base_dir=base_dir, backend=same_backend,
                                   threads=stage.threads)
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
                                          written, base_dir, seed, atol, rtol, input_shapes, stage.threads)
            res = VerificationResult(
                passed=all(d.passed for d in diffs),
                max_abs_err=max((d.max_abs_err for d in diffs), default=0.0),
                max_rel_err=max((d.max_rel_err for d in diffs), default=0.0),
                atol=atol, rtol=rtol, backend=backend, reference=reference_label,
                outputs=[asdict(d) for d in diffs], inputs=shapes, seed=seed,
            )
            return res
    # the local checks decide, for a valid model; an invalid one that does not run is the input's problem
    from .checker import checker_error

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
                      seed, atol, rtol, input_shapes, threads=None):
    """Outputs over the tolerance are judged against the model's own rounding noise: the output
    change when every weight the rewrites read moves by one ulp (``threads``: those ``ref_out``
    was computed with, so that the floor is the weights' noise alone)."""
    from .regions import cut

    try:
        cand, _ = _candidate_model(candidate, candidate_path)
        regions = cut(reference, cand, written, input_shapes)
        names = {t.name for t in regions.reference.graph.initializer} if regions.reference is not None else set()
        if not names:
            return diffs
        shaken = _perturbed(reference, names, base_dir, seed)
        shaken_out, _ = run(shaken, feeds, base_dir=base_dir, threads=threads)
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
