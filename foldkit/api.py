"""foldkit.fold(): the whole ONNX pipeline behind one call."""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import onnx
from onnx import ModelProto

from . import io as fio
from .data import files as data_files, source as data_source
from .errors import InputError, VerificationError
from .graph import iter_graphs, node_label, subgraph_paths
from .passes import DEFAULT_PASSES, PASS_NAMES
from .passes.base import FoldContext, Pass, is_op
from .passes.affine import report_left
from .report import Report
from .tensors import TensorStore
from .checker import checker_error  # noqa: F401 (foldkit.api.checker_error, as before)
from .early import ReferenceRun
from .verify import verify as run_verify
from .wire import needs_external

MAX_ROUNDS = 8


@dataclass
class PendingVerification:
    """The verification fold() could not run in memory (its folded tensors wait in a TensorStore,
    or the model is over protobuf's 2 GB): :meth:`FoldResult.save` runs it on the files as written,
    before they take their names, and writes nothing if it fails."""

    reference_bytes: bytes  # the model verification compares against, serialized
    options: dict  # foldkit.verify.verify's keyword arguments

    def run(self, result: "FoldResult", candidate_path: str) -> None:
        """Verify the written model at ``candidate_path``; record the outcome in ``result.report``
        and raise VerificationError on failure."""
        _verify(result, self.reference_bytes, self.options, candidate_path)

    def cancel(self) -> None:
        """It will not run: stop the original's run started early for it (foldkit.early), if any."""
        if self.options.get("reference_run") is not None:
            self.options["reference_run"].cancel()


@dataclass
class FoldResult:
    """The folded model and its report. When the input was loaded lazily, ``model`` still refers to
    the input file for the tensors it did not change (``base_dir`` is that file's folder): write it
    with :meth:`save`, which streams them. ``tensors`` holds the folded tensors kept out of the proto
    until saved (``memory=MemoryPolicy(defer=True)``); ``pending`` is the verification left to save()."""

    model: ModelProto
    report: Report
    base_dir: Optional[str] = None
    tensors: Optional[TensorStore] = None
    pending: Optional[PendingVerification] = None

    def save(self, path, input_path=None, in_place=False, external=None, durable=False, inputs_state=None):
        """Write atomically (temp file + rename: never a partial file); ``durable`` also fsyncs
        before the rename, so the file survives a power loss. Raises VerificationError, writing
        nothing, when the verification fold() left to this call fails. When nothing was rewritten,
        the output is a byte-for-byte copy of ``input_path`` (a single-file model).
        ``inputs_state`` (foldkit.io.file_state of the input's files when they were read): checked
        before writing and again right before the output takes its name; an input that changed
        since is an InputError."""
        unchanged = (lambda: fio.check_unchanged(inputs_state)) if inputs_state else (lambda: None)
        unchanged()  # before the write reads the mapped input again (a truncated map faults: SIGBUS)
        if (self.report.unchanged and input_path is not None and not external and os.path.isfile(input_path)
                and self._single_file(input_path)):
            if in_place and fio.same_file(path, input_path):
                return None  # nothing to write: the file already is the output
            fio.copy_atomic(input_path, path, durable=durable)
            return None
        pending = self.pending

        def before_commit(written):
            if pending:
                pending.run(self, written)
            unchanged()

        return fio.save_model(self.model, path, input_path=input_path, in_place=in_place, base_dir=self.base_dir,
                              external=external, tensors=self.tensors, durable=durable, before_commit=before_commit)

    def _single_file(self, input_path) -> bool:
        """The input holds all its tensors (a lazy load's references point into the file itself)."""
        own = os.path.basename(os.fspath(input_path))
        return all(next((e.value for e in t.external_data if e.key == "location"), "") == own
                   for t in fio.external_tensors(self.model))

    def materialize(self) -> ModelProto:
        """Put the folded tensors ``tensors`` holds into ``model`` (a self-contained proto but for
        tensors a lazy load left in the input file)."""
        if self.tensors is not None:
            self.tensors.materialize(self.model)
        return self.model

    @property
    def payloads(self):
        """Deprecated: the payload store inside ``tensors`` (use ``tensors``, a TensorStore)."""
        warnings.warn("FoldResult.payloads is deprecated; use FoldResult.tensors (a foldkit.tensors.TensorStore)",
                      DeprecationWarning, stacklevel=2)
        return self.tensors.payloads if self.tensors is not None else None

    @property
    def verify_before_commit(self) -> Optional[Callable[[str], None]]:
        """Deprecated: the pending verification as a callable (use ``pending``)."""
        warnings.warn("FoldResult.verify_before_commit is deprecated; use FoldResult.pending",
                      DeprecationWarning, stacklevel=2)
        return functools.partial(self.pending.run, self) if self.pending is not None else None


def count_bn(model: ModelProto) -> int:
    return sum(is_op(n, "BatchNormalization") for g in iter_graphs(model.graph) for n in g.node)


def _register_bns(model: ModelProto, report: Report) -> None:
    def visit(graph, path):
        for n in graph.node:
            if is_op(n, "BatchNormalization"):
                report.entry(n.output[0], node_label(n), path)
            for sub, sub_path in subgraph_paths(n, path):
                visit(sub, sub_path)
    visit(model.graph, "main")


def _select(passes: Optional[Sequence[Pass]], skip: Iterable[str]) -> list:
    skip = list(skip or ())
    passes = list(passes if passes is not None else DEFAULT_PASSES)
    names = {p.name for p in passes} | set(PASS_NAMES)
    bad = [s for s in skip if s not in names]
    if bad:
        raise InputError(f"--skip {bad[0]!r}: unknown pass (passes: {', '.join(PASS_NAMES)})")
    return [p for p in passes if p.name not in skip]


LAZY_ABOVE = 256 << 20  # files larger than this load lazily by default


def load(model_or_path: Union[str, os.PathLike, ModelProto, bytes], lazy: Optional[bool] = None):
    """(ModelProto, base_dir or None)."""
    if isinstance(model_or_path, ModelProto):
        m = ModelProto()
        m.CopyFrom(model_or_path)  # never mutate the caller's model
        fio.validate(m)
        return m, None
    if isinstance(model_or_path, (bytes, bytearray)):
        m = fio.parse_model(bytes(model_or_path))
        fio.validate(m)
        return m, None
    path = os.fspath(model_or_path)
    if lazy is None:
        lazy = os.path.isfile(path) and os.path.getsize(path) > LAZY_ABOVE
    return fio.load_model(path, lazy=lazy), os.path.dirname(os.path.abspath(path))


def _checker(m: ModelProto, original_bytes: Optional[bytes], report: Report) -> None:
    err = checker_error(m)
    if err is None:
        return
    before = checker_error(fio.parse_model(original_bytes)) if original_bytes else "unknown"
    if before is None:
        raise VerificationError(f"the folded model fails onnx.checker although the input passes: {err}")
    report.notes.append(f"the input model already fails onnx.checker (full check): {before}")


@dataclass(frozen=True)
class MemoryPolicy:
    """How tensors are held while folding (the knobs :func:`fold_file` sets for you).

    ``lazy``: read weights from the file only when a pass needs them (None: for files over 256 MiB).
    ``defer``: keep folded tensors of 1 MiB or more out of the proto until save (big per-channel
    scaled weights as recipes the writer computes block by block). ``spill_dir``: keep those arrays
    in an unlinked temp file there instead of RAM when the model's tensors total ``spill_above``
    bytes or more."""

    lazy: Optional[bool] = None
    defer: bool = False
    spill_dir: Optional[str] = None
    spill_above: int = 0


_LEGACY_MEMORY = ("lazy", "defer", "spill_dir", "spill_above")


def _memory(memory: Optional[MemoryPolicy], legacy: dict) -> MemoryPolicy:
    """``memory``, with the deprecated keyword arguments (only _LEGACY_MEMORY names) applied."""
    if legacy:
        import warnings

        warnings.warn(f"fold({', '.join(f'{k}=' for k in legacy)}...) is deprecated: pass "
                      "memory=foldkit.MemoryPolicy(...), or use foldkit.fold_file(), which chooses it",
                      DeprecationWarning, stacklevel=3)
        base = memory or MemoryPolicy()
        memory = MemoryPolicy(**{k: legacy.get(k, getattr(base, k)) for k in _LEGACY_MEMORY})
    return memory or MemoryPolicy()


@dataclass(frozen=True)
class FoldOptions:
    """What :func:`fold`, :func:`fold_loaded` and :func:`fold_file` do (how tensors are held is a
    separate :class:`MemoryPolicy`). Each field is also accepted as a keyword argument."""

    verify: bool = True
    atol: Optional[float] = None
    rtol: Optional[float] = None
    input_shapes: Optional[dict] = None
    skip: Iterable[str] = ()
    passes: Optional[Sequence[Pass]] = None
    seed: int = 0
    lower_standalone: bool = False
    check: bool = True
    max_input_bytes: Optional[int] = None
    freeze_initializer_inputs: bool = False
    data: object = None
    qdq_reflect: bool = False
    merge_larger_kernels: bool = False


def _options(options: Optional[FoldOptions], kwargs: dict, who: str = "fold") -> FoldOptions:
    from dataclasses import fields, replace

    names = {f.name for f in fields(FoldOptions)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"{who}() got an unexpected keyword argument {unknown[0]!r}")
    return replace(options or FoldOptions(), **kwargs)


def fold(model: Union[str, os.PathLike, ModelProto, bytes], options: Optional[FoldOptions] = None, *,
         memory: Optional[MemoryPolicy] = None, **kwargs) -> FoldResult:
    """Fold every BatchNormalization that can be folded exactly; explain every one left.

    ``model`` is a path, serialized bytes or a ModelProto (copied, never mutated). A path loads lazily
    (weights stay on disk until a pass needs them) for files over 256 MiB and for models with
    external data. ``memory`` (a :class:`MemoryPolicy`) changes how tensors are held; with
    ``defer`` (or a folded model over protobuf's 2 GB), verification runs in
    :meth:`FoldResult.save`, on the files as written, before they take their names (call
    :meth:`FoldResult.materialize` for a self-contained ``model``). For file to file, use
    :func:`fold_file`, which chooses the policy as the CLI does. The keyword arguments ``lazy``,
    ``defer``, ``spill_dir`` and ``spill_above`` still work, with a DeprecationWarning.

    ``data``: real samples for the end-to-end check (a --data spec, a (spec, batch_size,
    max_samples) tuple, or a callable returning {input: array} batches; see foldkit.data).
    ``freeze_initializer_inputs``: drop initializers from the graph inputs so that they fold (the
    interface changes; reported). ``qdq_reflect``: the exact reflected encoding for quantized
    weights where plain negation cannot be used (see foldkit.passes.qdq). ``merge_larger_kernels``:
    merge parallel convolutions even where the merged kernel costs more multiply-adds than the
    branches together (1x5 + 5x1 into 5x5; left as they are by default, with the reason).

    Raises InputError for unusable input and VerificationError (with ``.result`` holding the
    FoldResult) when the folded model does not match the original within (atol, rtol) on ONNX
    Runtime (see foldkit.verify for the methods: unchanged, end-to-end, local).
    """
    legacy = {k: kwargs.pop(k) for k in list(kwargs) if k in _LEGACY_MEMORY}
    opts = _options(options, kwargs)
    mem = _memory(memory, legacy)
    m, base_dir = load(model, mem.lazy)
    inputs = [os.fspath(model)] if isinstance(model, (str, os.PathLike)) else []
    try:
        result = fold_loaded(m, base_dir, opts, defer=mem.defer, spill_dir=mem.spill_dir, spill_above=mem.spill_above)
    except VerificationError as e:
        if e.result is not None:
            e.result.report.inputs = inputs
        raise
    result.report.inputs = inputs
    return result


SPILL_ABOVE = 2 ** 31 - 2 ** 24  # protobuf's limit, less a margin: the external-data regime


def fold_file(src: Union[str, os.PathLike], dst: Union[str, os.PathLike], fold_options: Optional[FoldOptions] = None,
              *, report: Optional[str] = None, external: Optional[bool] = None, durable: bool = False,
              in_place: bool = False, **options) -> FoldResult:
    """Fold the model file ``src`` into ``dst``, as ``foldkit fold`` does: every output checked
    before any work (never an input, unless ``in_place`` for ``dst``), weights read lazily, big
    folded tensors streamed (spilled beside ``dst`` for models in the external-data regime),
    verification on the written files before they take their names, atomic writes (``durable``
    also fsyncs). ``report``: where to write the JSON report, also when verification fails (the
    model is then not written). ``external``: tensors to ``dst.<hash>.data`` (None: only over 2 GB).
    ``fold_options`` / ``options`` are :func:`fold`'s. Returns the FoldResult; raises as :func:`fold` does."""
    from .wire import needs_external as wire_needs_external

    src, dst = os.fspath(src), os.fspath(dst)
    data = options.get("data", fold_options.data if fold_options is not None else None)
    src_files = fio.model_files(src)
    fio.guard_outputs({"-o": dst, "--report": report}, src_files + data_files(data),
                      allow_same={"-o": src} if in_place else None)
    memory = MemoryPolicy(lazy=True, defer=True, spill_dir=os.path.dirname(os.path.abspath(dst)),
                          spill_above=0 if external else SPILL_ABOVE)
    state = fio.file_state(src_files)  # the files as read: the commit checks them again
    result = None
    try:
        result = fold(src, fold_options, memory=memory, **options)
        if external is False and wire_needs_external(result.model):
            raise InputError(f"{dst}: the folded model exceeds protobuf's 2 GB limit; it needs --external-data")
        result.save(dst, input_path=src, in_place=in_place, external=external, durable=durable, inputs_state=state)
    except BaseException as e:
        if result is not None and result.pending is not None:
            result.pending.cancel()  # the save did not get to it, or it already ran
        if not isinstance(e, VerificationError):
            raise
        if e.result is not None:
            e.result.report.inputs = [src]
            if report:  # what the user needs now: which output differed, by how much
                fio.atomic_write(report, e.result.report.to_json().encode(), durable=durable)
        raise
    if report:
        fio.atomic_write(report, result.report.to_json().encode(), durable=durable)
    return result


def fold_loaded(m: ModelProto, base_dir: Optional[str], options: Optional[FoldOptions] = None, *,
                defer: bool = False, spill_dir: Optional[str] = None, spill_above: int = 0, **kwargs) -> FoldResult:
    """:func:`fold` on a model this call may change in place; tensors on disk are read from ``base_dir``."""
    o = _options(options, kwargs, "fold_loaded")
    verify, input_shapes, skip, passes = o.verify, o.input_shapes, o.skip, o.passes
    seed, lower_standalone, check, max_input_bytes = o.seed, o.lower_standalone, o.check, o.max_input_bytes
    freeze_initializer_inputs, data, qdq_reflect = o.freeze_initializer_inputs, o.data, o.qdq_reflect
    merge_larger_kernels = o.merge_larger_kernels
    report = Report(seed=seed, input_shapes={("" if k is None else k): list(v) for k, v in (input_shapes or {}).items()}
                    or None)
    report.bn_before = count_bn(m)
    _register_bns(m, report)
    selected = _select(passes, skip)
    ctx = FoldContext(m, report, base_dir, defer=defer, spill_dir=spill_dir, spill_above=spill_above,
                      lower_standalone=lower_standalone, qdq_reflect=qdq_reflect,
                      merge_larger_kernels=merge_larger_kernels)
    first = [p for p in selected if p.stage == "inference-mode"]
    folds = [p for p in selected if p.stage == "fold"]
    final = [p for p in selected if p.stage == "final"]
    rewritten = False
    if freeze_initializer_inputs:
        rewritten |= _freeze_initializer_inputs(m, report)
    for p in first:
        rewritten |= bool(p.run(ctx))
        report.passes.append(p.name)
    reference_bytes = fio.serialize(m) if (verify or check) else None
    if ctx.converted_training:
        report.notes.append("training-mode BN was converted to inference mode; verification compares "
                            "against the model after that conversion, since it changes outputs by design")
    early = None
    if verify and data is None and (report.bn_before or ctx.converted_training):  # a fold is likely: see foldkit.early
        early = ReferenceRun(reference_bytes, input_shapes=input_shapes, seed=seed, max_input_bytes=max_input_bytes,
                             base_dir=base_dir)
    try:
        return _fold_and_check(m, base_dir, o, ctx, report, folds, final, rewritten, reference_bytes, early, defer)
    except BaseException:
        if early is not None:
            early.cancel()  # nobody will read it
        raise


def _fold_and_check(m, base_dir, o, ctx, report, folds, final, rewritten, reference_bytes, early,
                    defer) -> FoldResult:
    """fold_loaded from the fold passes on (``early``: the original's run, already under way)."""
    verify, check = o.verify, o.check
    for _ in range(MAX_ROUNDS):
        changed = False
        for p in folds:
            changed |= p.run(ctx)
        rewritten |= changed
        if not changed:
            break
    else:
        if folds:
            report.notes.append(f"the fold passes were still changing the model after {MAX_ROUNDS} rounds "
                                "(the round limit); what they did is verified, more rounds might fold more")
    report.passes.extend(p.name for p in folds)
    for p in final:
        done = bool(p.run(ctx))
        rewritten |= done
        if done or p.name == "cleanup":
            report.passes.append(p.name)
    report.unchanged = not rewritten
    if folds:
        report_left(ctx)  # every per-channel Mul/Add left, with its reason

    report.bn_after = count_bn(m)
    report.finish()
    result = FoldResult(m, report, base_dir, ctx.index.tensors)

    if check and rewritten:
        _checker(m, reference_bytes, report)
    if verify and not rewritten:  # nothing to compare: the output is the input's bytes
        if early is not None:
            early.cancel()
        report.verification = {"method": "unchanged", "passed": True, "max_abs_err": 0.0, "max_rel_err": 0.0,
                               "outputs": [], "end_to_end": None, "local": None,
                               "detail": "nothing was rewritten, so the output is the input's bytes; no run needed"}
    elif verify:
        options = dict(atol=o.atol, rtol=o.rtol, input_shapes=o.input_shapes, seed=o.seed, base_dir=base_dir,
                       max_input_bytes=o.max_input_bytes, data=data_source(o.data, m),
                       reference_label="inference-mode original" if ctx.converted_training else "original",
                       reference_run=early)
        if defer or needs_external(m):  # payloads stay out of the proto, or it cannot be one buffer
            result.pending = PendingVerification(reference_bytes, options)
        else:
            result.materialize()  # ORT needs the payloads in the proto
            _verify(result, reference_bytes, options)
    return result


def _freeze_initializer_inputs(m: ModelProto, report: Report) -> bool:
    """Remove the main graph's inputs that are initializers (so that they count as constants and
    fold). It changes the model's interface: those values can no longer be fed at run time."""
    if m.ir_version < 4:  # every initializer must be an input there; they already count as constants
        report.notes.append("--freeze-initializer-inputs: IR version < 4, where initializers are constants already")
        return False
    inits = {t.name for t in m.graph.initializer}
    frozen = [i.name for i in m.graph.input if i.name in inits]
    if not frozen:
        return False
    keep = [i for i in m.graph.input if i.name not in inits]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    report.notes.append(f"--freeze-initializer-inputs removed {len(frozen)} initializer(s) from the graph inputs "
                        f"({', '.join(frozen[:5])}{', ...' if len(frozen) > 5 else ''}): the model's interface "
                        "changed, they can no longer be fed at run time")
    report.frozen_inputs = frozen
    return True


def _verify(result: FoldResult, reference_bytes: bytes, options: dict, candidate_path: Optional[str] = None) -> None:
    """Compare the folded model (``result.model``, or the file at ``candidate_path``) with the
    original on ONNX Runtime; record the outcome in the report, raise VerificationError on failure."""
    reference = fio.parse_model(reference_bytes)
    candidate = result.model if candidate_path is None else None
    rep = result.report
    written = {t for a in list(rep.actions) + list(rep.affine) + list(rep.branches) for t in a.tensors}
    vr = run_verify(reference, candidate, reference_bytes=reference_bytes, candidate_path=candidate_path,
                    candidate_bytes=fio.serialize(candidate) if candidate is not None else None, written=written,
                    **options)
    result.report.verification = vr.to_dict()
    if not vr.passed:
        worst = max(vr.outputs, key=lambda d: d["max_abs_err"])
        where = "region output" if vr.method == "local" else "output"
        raise VerificationError(
            f"verification failed ({vr.method}): {where} '{worst['name']}' differs by {worst['max_abs_err']:.3g} "
            f"(relative {worst['max_rel_err']:.3g}; tolerance atol={vr.atol:g} + rtol={vr.rtol:g} x scale)"
            + (f" [{worst['detail']}]" if worst.get("detail") else ""), result)
