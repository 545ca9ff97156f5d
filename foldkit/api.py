"""foldkit.fold(): the whole ONNX pipeline behind one call."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import onnx
from onnx import ModelProto

from . import io as fio
from .errors import InputError, VerificationError
from .graph import iter_graphs, node_label
from .passes import DEFAULT_PASSES, FINAL_PASSES, PASS_NAMES
from .passes.base import FoldContext, Pass, is_op
from .report import Report
from .verify import verify as run_verify

MAX_ROUNDS = 8


@dataclass
class FoldResult:
    model: ModelProto
    report: Report

    def save(self, path, input_path=None, in_place=False):
        fio.save_model(self.model, path, input_path=input_path, in_place=in_place)


def count_bn(model: ModelProto) -> int:
    return sum(is_op(n, "BatchNormalization") for g in iter_graphs(model.graph) for n in g.node)


def _register_bns(model: ModelProto, report: Report) -> None:
    def visit(graph, path):
        for n in graph.node:
            if is_op(n, "BatchNormalization"):
                report.entry(n.output[0], node_label(n), path)
            for a in n.attribute:
                subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
                for k, sub in enumerate(subs):
                    visit(sub, f"{path}/{node_label(n)}.{a.name if len(subs) == 1 else f'{a.name}[{k}]'}")
    visit(model.graph, "main")


def _select(passes: Optional[Sequence[Pass]], skip: Iterable[str]) -> list:
    skip = list(skip or ())
    passes = list(passes if passes is not None else DEFAULT_PASSES)
    names = {p.name for p in passes} | set(PASS_NAMES)
    bad = [s for s in skip if s not in names]
    if bad:
        raise InputError(f"--skip {bad[0]!r}: unknown pass (passes: {', '.join(PASS_NAMES)})")
    return [p for p in passes if p.name not in skip]


def load(model_or_path: Union[str, os.PathLike, ModelProto, bytes]) -> ModelProto:
    if isinstance(model_or_path, ModelProto):
        m = ModelProto()
        m.CopyFrom(model_or_path)  # never mutate the caller's model
        fio.validate(m)
        return m
    if isinstance(model_or_path, (bytes, bytearray)):
        m = fio.parse_model(bytes(model_or_path))
        fio.validate(m)
        return m
    return fio.load_model(model_or_path)


def checker_error(model: ModelProto) -> Optional[str]:
    """The first line of onnx.checker's full-check complaint, or None when the model passes."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # checker raises ValidationError, shape inference InferenceError
        return (str(e).strip().splitlines() or [type(e).__name__])[0]
    return None


def _checker(m: ModelProto, original_bytes: Optional[bytes], report: Report) -> None:
    err = checker_error(m)
    if err is None:
        return
    before = checker_error(fio.parse_model(original_bytes)) if original_bytes else "unknown"
    if before is None:
        raise VerificationError(f"the folded model fails onnx.checker although the input passes: {err}")
    report.notes.append(f"the input model already fails onnx.checker (full check): {before}")


def fold(model: Union[str, os.PathLike, ModelProto, bytes], *, verify: bool = True, atol: Optional[float] = None,
         rtol: Optional[float] = None, input_shapes: Optional[dict] = None, skip: Iterable[str] = (),
         passes: Optional[Sequence[Pass]] = None, seed: int = 0, lower_standalone: bool = False,
         check: bool = True) -> FoldResult:
    """Fold every BatchNormalization that can be folded exactly; explain every one left.

    ``model`` is a path, serialized bytes or a ModelProto (copied, never mutated). Raises InputError
    for unusable input and VerificationError (with ``.result`` holding the FoldResult) when the folded
    model does not match the original within (atol, rtol) on ONNX Runtime.
    """
    m = load(model)
    report = Report()
    report.bn_before = count_bn(m)
    _register_bns(m, report)
    selected = _select(passes, skip)
    ctx = FoldContext(m, report, lower_standalone=lower_standalone)
    ctx.converted_training = False

    first, rest = selected[:1], selected[1:]
    if first and first[0].name != "inference-mode":
        first, rest = [], selected
    for p in first:
        p.run(ctx)
        report.passes.append(p.name)
    reference_bytes = fio.serialize(m) if (verify or check) else None
    if ctx.converted_training:
        report.notes.append("training-mode BN was converted to inference mode; verification compares "
                            "against the model after that conversion, since it changes outputs by design")

    folds = [p for p in rest if p.name not in FINAL_PASSES]
    for _ in range(MAX_ROUNDS):
        changed = False
        for p in folds:
            changed |= p.run(ctx)
        if not changed:
            break
    report.passes.extend(p.name for p in folds)
    for p in rest:
        if p.name in FINAL_PASSES:
            if p.run(ctx) or p.name == "cleanup":
                report.passes.append(p.name)

    report.bn_after = count_bn(m)
    report.finish()
    result = FoldResult(m, report)

    if check:
        _checker(m, reference_bytes, report)
    if verify:
        reference = fio.parse_model(reference_bytes)
        candidate_bytes = fio.serialize(m)
        try:
            vr = run_verify(reference, m, atol=atol, rtol=rtol, input_shapes=input_shapes, seed=seed,
                            reference_bytes=reference_bytes, candidate_bytes=candidate_bytes,
                            reference_label="inference-mode original" if ctx.converted_training else "original")
        except InputError:
            raise
        report.verification = vr.to_dict()
        if not vr.passed:
            worst = max(vr.outputs, key=lambda d: d["max_abs_err"])
            raise VerificationError(
                f"verification failed: output '{worst['name']}' differs by {worst['max_abs_err']:.3g} "
                f"(relative {worst['max_rel_err']:.3g}; tolerance atol={vr.atol:g} + rtol={vr.rtol:g} x scale)"
                + (f" [{worst['detail']}]" if worst.get("detail") else ""), result)
    return result
