"""foldkit check: is this model ready to deploy? Findings with a code, a severity, the node and a fix.

| code  | severity | finding |
|-------|----------|---------|
| FK001 | error    | a BatchNormalization that `foldkit fold` would fold |
| FK002 | error    | a training-mode BatchNormalization |
| FK003 | warning  | a BatchNormalization that cannot be folded (the reason says why) |
| FK004 | warning  | numeric risk: folded values overflow or lose precision in float16 |
| FK005 | error    | invalid BN parameters (NaN, Inf, var + eps <= 0) or channel mismatch |
| FK006 | error    | onnx.checker (full check) fails |
| FK007 | error    | external data missing, unreadable or outside the model's folder |

The check never runs the model and never writes: it runs the fold pipeline on an in-memory copy
without verification and reads its report.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import onnx

from . import io as fio
from .text import printable, xml_safe

SEVERITIES = ("warning", "error")
FP16_MAX = 65504.0
FP16_TINY = 6.103515625e-05  # smallest normal float16


@dataclass
class Finding:
    code: str
    severity: str
    node: str
    message: str
    graph: str = "main"


@dataclass
class CheckResult:
    path: str
    findings: list = field(default_factory=list)
    bn_count: int = 0

    def failed(self, fail_on: str = "error") -> bool:
        level = SEVERITIES.index(fail_on)
        return any(SEVERITIES.index(f.severity) >= level for f in self.findings)

    def to_dict(self) -> dict:
        return {"path": self.path, "bn_count": self.bn_count, "findings": [asdict(f) for f in self.findings]}


INVALID_PARAM_MARKERS = ("NaN or Inf", "not positive", "channel count mismatch", "different lengths")


def _tensor_index(model) -> dict:
    """name -> TensorProto for every initializer and Constant value, built once per check so the
    check stays linear in the model's size."""
    from .graph import iter_graphs

    index = {}
    for g in iter_graphs(model.graph):
        for t in g.initializer:
            index.setdefault(t.name, t)
        for n in g.node:
            if n.op_type == "Constant" and n.output:
                for a in n.attribute:
                    if a.name == "value":
                        index.setdefault(n.output[0], a.t)
    return index


def _tensor_risk(data_type: int, blocks) -> Optional[str]:
    """The risk in a tensor given as arrays (blocks of it, or the whole), aggregated without
    float64 or abs() copies: memory stays about one block."""
    nonzero = tiny = 0
    peak = 0.0
    for arr in blocks:
        if not arr.size:
            continue
        if data_type == onnx.TensorProto.FLOAT16:
            nz = np.count_nonzero(arr)
            nonzero += nz
            tiny += nz - np.count_nonzero((arr >= FP16_TINY) | (arr <= -FP16_TINY) | ~np.isfinite(arr))
        elif data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE) and not np.isnan(arr).all():
            peak = max(peak, float(np.nanmax(arr)), -float(np.nanmin(arr)))
    if nonzero and tiny / nonzero > 0.01:
        return (f"{100 * tiny / nonzero:.1f}% of the folded float16 weights are subnormal and lose "
                f"precision; consider folding in float32 and converting afterwards")
    if peak > FP16_MAX:
        return (f"folded weights reach {peak:.3g}, beyond float16's range: the model will overflow if "
                f"deployed in fp16 (e.g. TensorRT --fp16); check this BN's running_var")
    return None


def _numeric_risk(index: dict, action, base_dir=None, payloads=None, seen=None) -> Optional[str]:
    """Risk in the tensors this fold wrote, each read once, one at a time (a deferred recipe
    block by block, never whole): the model's other tensors are never read."""
    from .wire import is_memory

    seen = {} if seen is None else seen
    for name in action.tensors:
        if name not in seen:
            t = index.get(name)
            if t is None or (is_memory(t) and (payloads is None or name not in payloads)):
                seen[name] = None
                continue
            if is_memory(t):
                blocks = payloads.arrays(name)
            else:
                blocks = [onnx.numpy_helper.to_array(t, base_dir or "")]
            seen[name] = _tensor_risk(t.data_type, blocks)
            del blocks
            files = getattr(payloads, "files", None)
            if files is not None:
                files.release()  # the source pages read for a recipe leave the resident set
        if seen[name]:
            return seen[name]
    return None


def check(path: str) -> CheckResult:
    """Check the model at ``path``. Raises InputError only when the file cannot be read as a model."""
    from . import wire

    fio.check_path(path)
    model = wire.lazy_load(path, fio.LAZY_THRESHOLD) or fio.read_model(path)
    result = CheckResult(path=str(path))
    base_dir = os.path.dirname(os.path.abspath(path))
    ext = fio.external_data_problems(model, base_dir)
    for name, sentence in ext:
        result.findings.append(Finding("FK007", "error", name, sentence + "; keep external data files beside the model"))
    if ext:
        return result  # nothing below can be trusted without the weights
    fio.validate(model, str(path))

    from .api import checker_error

    err = checker_error(model)
    if err:
        result.findings.append(Finding("FK006", "error", "model", f"onnx.checker (full check) fails: {err}"))
    from .api import fold_loaded

    # ``model`` is this call's own copy; defer: big folded weights stay recipes, computed one at a
    # time by the numeric-risk check below, so the check holds about one tensor, not the model
    folded = fold_loaded(model, base_dir, verify=False, check=False, defer=True)
    report = folded.report
    result.bn_count = report.bn_before
    index = _tensor_index(folded.model)
    seen = {}
    for a in report.actions:
        training = any(s.startswith("converted") for s in a.steps) or "training mode" in a.reason
        if training:
            result.findings.append(Finding("FK002", "error", a.node,
                                           "BatchNormalization is in training mode (normalizes with batch statistics); "
                                           "export with model.eval() or run `foldkit fold`" +
                                           (f" — {a.reason}" if a.action == "kept" else ""), a.graph))
        elif a.action in ("folded", "merged"):
            result.findings.append(Finding("FK001", "error", a.node,
                                           f"BatchNormalization can be folded into {a.target}; run `foldkit fold`", a.graph))
        elif a.action == "kept":
            if any(m in a.reason for m in INVALID_PARAM_MARKERS):
                result.findings.append(Finding("FK005", "error", a.node,
                                               f"invalid BatchNormalization: {a.reason}; fix the checkpoint's BN statistics", a.graph))
            elif "overflows" in a.reason:
                result.findings.append(Finding("FK004", "warning", a.node,
                                               f"numeric risk: {a.reason}", a.graph))
            else:
                result.findings.append(Finding("FK003", "warning", a.node,
                                               f"BatchNormalization cannot be folded: {a.reason}", a.graph))
        if a.action in ("folded", "merged"):
            risk = _numeric_risk(index, a, base_dir, folded.payloads, seen)
            if risk:
                result.findings.append(Finding("FK004", "warning", a.node, f"numeric risk after folding: {risk}", a.graph))
    return result


# --- output formats -----------------------------------------------------------------------------

def _gh_data(s: str) -> str:
    """A workflow command's message, escaped as GitHub's own toolkit does (@actions/core)."""
    return str(s).replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _gh_property(s: str) -> str:
    return _gh_data(s).replace(":", "%3A").replace(",", "%2C")


def to_github(result: CheckResult) -> str:
    lines = []
    for f in result.findings:
        props = f"file={_gh_property(printable(result.path))},title={_gh_property(printable(f'{f.code} {f.node}'))}"
        lines.append(f"::{f.severity} {props}::{_gh_data(printable(f.message))}")
    return "\n".join(lines) + ("\n" if lines else "")


def to_junit(result: CheckResult, fail_on: str = "error") -> str:
    """JUnit XML; every name and message made XML 1.0-legal (control characters escaped)."""
    import xml.etree.ElementTree as ET

    level = SEVERITIES.index(fail_on)
    failing = [f for f in result.findings if SEVERITIES.index(f.severity) >= level]
    path = xml_safe(result.path)
    suite = ET.Element("testsuite", name="foldkit check", tests=str(max(1, len(result.findings))),
                       failures=str(len(failing)), errors="0", skipped="0")
    if not result.findings:
        ET.SubElement(suite, "testcase", classname=path, name="deployment-ready")
    for f in result.findings:
        case = ET.SubElement(suite, "testcase", classname=path, name=xml_safe(f"{f.code} {f.node}"))
        message = xml_safe(f.message)
        if SEVERITIES.index(f.severity) >= level:
            el = ET.SubElement(case, "failure", type=f.code, message=message)
            el.text = f"[{f.severity}] {xml_safe(f.graph)}: {message}"
        else:
            ET.SubElement(case, "system-out").text = f"[{f.severity}] {message}"
    root = ET.Element("testsuites")
    root.append(suite)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
