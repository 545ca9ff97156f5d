"""foldkit check: is this model ready to deploy? Findings with a code, a severity, the node and a fix.

| code  | severity | finding |
|-------|----------|---------|
| FK001 | error    | a BatchNormalization that `foldkit fold` would fold |
| FK002 | error    | a training-mode BatchNormalization |
| FK003 | warning  | a BatchNormalization that cannot be folded (the reason says why) |
| FK004 | warning  | numeric risk: folded values overflow or lose precision in float16, or are subnormal |
| FK005 | error    | invalid BN parameters (NaN, Inf, var + eps <= 0) or channel mismatch |
| FK006 | error    | onnx.checker (full check) fails |
| FK007 | error    | external data missing, unreadable or outside the model's folder |
| FK008 | error    | the file cannot be read as an ONNX model (exit code 2) |
| FK009 | warning  | parallel branches (RepVGG-style) that `foldkit fold` merges into one op |
| FK010 | warning  | BN statistics that look never updated (every mean 0 and every var 1) |
| FK011 | warning  | a channel whose running var is at most 10 x eps (near collapse: the folded scale explodes) |
| FK012 | warning/error | (--data) running statistics far from the data's: `foldkit recalibrate` is the fix |
| FK013 | error    | foldkit itself failed on this model (internal error, exit code 3: a bug in foldkit; the other models are still checked) |
| FK014 | warning  | a per-channel Mul/Add/Sub/Div by a constant (a decomposed BN, a layer scale): one `foldkit fold` folds, or one it leaves, with the reason |

The check never runs the model and never writes: it runs the fold pipeline on an in-memory copy
without verification and reads its report.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import onnx

from . import io as fio
from .text import printable, xml_safe
from .wire import is_memory

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


UNREADABLE, INTERNAL = "FK008", "FK013"


@dataclass
class CheckResult:
    """The findings for one model. ``error`` is set, with one finding of code ``error_code``, when
    the model could not be checked at all: FK008 when the file cannot be read as a model (exit code
    2), FK013 when foldkit failed on it (an internal error, exit code 3)."""

    path: str
    findings: list = field(default_factory=list)
    bn_count: int = 0
    error: Optional[str] = None
    time_s: float = 0.0
    error_code: str = UNREADABLE

    @classmethod
    def failure(cls, path, message: str, code: str = UNREADABLE) -> "CheckResult":
        r = cls(path=str(path), error=message, error_code=code)
        r.findings.append(Finding(code, "error", "model", message))
        return r

    @property
    def verdict(self) -> str:
        """One word for a model that could not be checked."""
        return "internal error" if self.error_code == INTERNAL else "unreadable"

    def failed(self, fail_on: str = "error") -> bool:
        level = SEVERITIES.index(fail_on)
        return any(SEVERITIES.index(f.severity) >= level for f in self.findings)

    def exit_code(self, fail_on: str = "error") -> int:
        from .errors import EXIT_FAILED, EXIT_INTERNAL, EXIT_USAGE

        if self.error is not None:
            return EXIT_INTERNAL if self.error_code == INTERNAL else EXIT_USAGE
        return EXIT_FAILED if self.failed(fail_on) else 0

    def counts(self) -> dict:
        return {s: sum(f.severity == s for f in self.findings) for s in ("error", "warning")}

    def to_dict(self, fail_on: str = "error") -> dict:
        return {"path": self.path, "passed": not self.failed(fail_on) and self.error is None,
                "exit_code": self.exit_code(fail_on), "error": self.error,
                "error_code": self.error_code if self.error is not None else None, "bn_count": self.bn_count,
                "time_s": round(self.time_s, 6), "findings": [asdict(f) for f in self.findings]}


def expand_models(paths) -> list:
    """The models to check: each path given, a folder replaced by the ``*.onnx`` files under it (in
    sorted order, recursively, hidden folders skipped); the same file named twice is checked once."""
    from .errors import InputError

    out, seen = [], set()
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            found = []
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(".onnx")]
            if not found:
                raise InputError(f"{p}: a folder with no .onnx file under it")
        else:
            found = [p]
        for f in found:
            try:
                st = os.stat(f)
                key = (st.st_dev, st.st_ino)
            except OSError:
                key = os.path.abspath(f)
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def check_many(paths, data=None, on_internal=None) -> list:
    """:func:`check` on every model (folders expanded). One model never sinks the run: a model that
    cannot be read gives a result with ``error`` set and one FK008 finding (exit code 2), one that
    foldkit fails on (a bug) one FK013 finding (exit code 3), and the others are still checked.
    ``on_internal(exception)`` is called first for such a bug and may raise it instead (--debug).
    ``data``: a --data spec (or (spec, batch_size, max_samples)) for the FK012 statistics findings."""
    from .data import DataError
    from .errors import FoldkitError, internal_message

    results = []
    for p in expand_models(paths):
        start = time.perf_counter()
        try:
            r = check(p, data=data)
        except DataError:
            raise  # the data does not fit: a usage error for the whole command
        except FoldkitError as e:
            r = CheckResult.failure(p, str(e))
        except MemoryError:
            r = CheckResult.failure(p, f"{p}: out of memory while checking it")
        except Exception as e:  # a bug in foldkit met on this model: its result, not the run's end
            if on_internal is not None:
                on_internal(e)
            r = CheckResult.failure(p, f"{p}: {internal_message(e)}", INTERNAL)
        r.time_s = time.perf_counter() - start
        results.append(r)
    return results


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
    nonzero = tiny = sub32 = 0
    peak = 0.0
    for arr in blocks:
        if not arr.size:
            continue
        if data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            small = np.finfo(arr.dtype).tiny
            sub32 += int(np.count_nonzero((arr != 0) & (arr > -small) & (arr < small)))
        if data_type == onnx.TensorProto.FLOAT16:
            nz = np.count_nonzero(arr)
            nonzero += nz
            tiny += nz - np.count_nonzero((arr >= FP16_TINY) | (arr <= -FP16_TINY) | ~np.isfinite(arr))
        elif data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE) and not np.isnan(arr).all():
            peak = max(peak, float(np.nanmax(arr)), -float(np.nanmin(arr)))
    if nonzero and tiny / nonzero > 0.01:
        return (f"{100 * tiny / nonzero:.1f}% of the folded float16 weights are subnormal and lose "
                f"precision; consider folding in float32 and converting afterwards")
    if sub32:
        return (f"{sub32} folded value(s) are subnormal: CPUs compute with them several times slower "
                f"(denormal stalls, 5-7x seen); check this BN's scale (a gamma near 0?)")
    if peak > FP16_MAX:
        return (f"folded weights reach {peak:.3g}, beyond float16's range: the model will overflow if "
                f"deployed in fp16 (e.g. TensorRT --fp16); check this BN's running_var")
    return None


def _numeric_risk(index: dict, action, tensors, seen=None) -> Optional[str]:
    """Risk in the tensors this fold wrote, each read once, one at a time, through the fold's
    TensorStore (a deferred recipe block by block, never whole): the model's other tensors are
    never read."""
    seen = {} if seen is None else seen
    for name in action.tensors:
        if name not in seen:
            t = index.get(name)
            if t is None or (is_memory(t) and name not in tensors):
                seen[name] = None
                continue
            seen[name] = _tensor_risk(t.data_type, tensors.blocks(t))
        if seen[name]:
            return seen[name]
    return None


def check(path: str, data=None) -> CheckResult:
    """Check the model at ``path``. Raises InputError only when the file cannot be read as a model
    (or ``data``, with which the FK012 statistics findings are measured, does not fit it)."""
    from . import wire

    fio.check_path(path)
    model = wire.lazy_load(path, fio.LAZY_THRESHOLD) or fio.read_model(path)
    result = CheckResult(path=str(path))
    base_dir = os.path.dirname(os.path.abspath(path))
    ext = fio.external_data_findings(model, base_dir)
    for subject, _, sentence in ext:
        result.findings.append(Finding("FK007", "error", subject, sentence + "; keep external data files beside the model"))
    if ext:
        return result  # nothing below can be trusted without the weights
    fio.validate(model, str(path))

    from .checker import checker_error

    err = checker_error(model)
    if err:
        result.findings.append(Finding("FK006", "error", "model", f"onnx.checker (full check) fails: {err}"))
    result.findings += _statistics_findings(model, base_dir)
    if data is not None:
        result.findings += _with_data(path, data)
    from .api import fold_loaded

    # ``model`` is this call's own copy; defer: big folded weights stay recipes, computed one at a
    # time by the numeric-risk check below, so the check holds about one tensor, not the model
    folded = fold_loaded(model, base_dir, verify=False, check=False, defer=True)
    report = folded.report
    result.bn_count = report.bn_before
    index = _tensor_index(folded.model)
    seen = {}
    from .codes import FINDINGS, Why

    for a in report.actions:
        converted = any(s.startswith("converted") for s in a.steps)
        code = Why(a.code) if a.code else None
        if converted or code is Why.TRAINING_MODE:
            result.findings.append(Finding("FK002", "error", a.node,
                                           "BatchNormalization is in training mode (normalizes with batch statistics); "
                                           "export with model.eval() or run `foldkit fold`" +
                                           (f" — {a.reason}" if a.action == "kept" else ""), a.graph))
        elif a.action in ("folded", "merged"):
            result.findings.append(Finding("FK001", "error", a.node,
                                           f"BatchNormalization can be folded into {a.target}; run `foldkit fold`", a.graph))
        elif a.action == "kept":
            fk, severity = FINDINGS[code or Why.NOT_APPLICABLE]
            text = {"FK005": f"invalid BatchNormalization: {a.reason}; fix the checkpoint's BN statistics",
                    "FK004": f"numeric risk: {a.reason}"}.get(fk, f"BatchNormalization cannot be folded: {a.reason}")
            result.findings.append(Finding(fk, severity, a.node, text, a.graph))
        if a.action in ("folded", "merged"):
            risk = _numeric_risk(index, a, folded.tensors, seen)
            if risk:
                result.findings.append(Finding("FK004", "warning", a.node, f"numeric risk after folding: {risk}", a.graph))
    for a in report.affine:
        if a.action == "folded":
            result.findings.append(Finding("FK014", "warning", a.node,
                                           f"{a.reason.replace(' folded into ', ' can be folded into ')}; run `foldkit fold`",
                                           a.graph))
        elif a.action == "kept":
            result.findings.append(Finding("FK014", "warning", a.node, f"per-channel op left: {a.reason}", a.graph))
    for b in report.branches:
        if b.action == "merged":
            result.findings.append(Finding("FK009", "warning", b.node,
                                           f"{b.reason.replace(' merged into one', ' can be merged into one')}: run "
                                           "`foldkit fold` (fewer convolutions, same outputs)", b.graph))
    return result


COLLAPSE_EPS = 10.0  # FK011: var <= this many eps
DRIFT_WARN_SD, DRIFT_ERROR_SD = 0.5, 3.0  # FK012: largest |mean shift| / running sd
DRIFT_WARN_RATIO, DRIFT_ERROR_RATIO = 2.0, 10.0  # FK012: largest var ratio either way


def _statistics_findings(model, base_dir) -> list:
    """FK010 / FK011 from the BN parameters alone (no data needed)."""
    from .graph import GraphView, ModelIndex, attr_float, node_label

    out = []
    view = GraphView(model.graph, ModelIndex(model, base_dir))
    for n in model.graph.node:
        if n.op_type != "BatchNormalization" or n.domain not in ("", "ai.onnx") or len(n.input) < 5:
            continue
        mean, var = view.constant(n.input[3]), view.constant(n.input[4])
        if mean is None or var is None:
            continue
        m, v = np.asarray(mean.array, np.float64), np.asarray(var.array, np.float64)
        if not (np.all(np.isfinite(m)) and np.all(np.isfinite(v))):
            continue  # FK005 says so
        try:
            eps = attr_float(n, "epsilon", 1e-5)
        except ValueError:
            continue
        label = node_label(n)
        if m.size and np.all(m == 0) and np.all(v == 1):
            out.append(Finding("FK010", "warning", label,
                               "running statistics look never updated (every mean 0, every var 1): the model "
                               "normalizes with defaults; `foldkit recalibrate --data DATA` re-estimates them"))
        low = np.nonzero((v + eps > 0) & (v <= COLLAPSE_EPS * eps))[0]  # var + eps <= 0 is FK005
        if low.size:
            out.append(Finding("FK011", "warning", label,
                               f"{low.size} channel(s) (first: {int(low[0])}) have running var <= {COLLAPSE_EPS:g} x eps "
                               f"({v[low[0]]:.3g}): the folded scale 1/sqrt(var + eps) explodes; check the channel "
                               "(pruned?) or `foldkit recalibrate`"))
    return out


def _with_data(path, data) -> list:
    from .data import source

    full = fio.load_model(path)
    return drift_findings(full, source(data, full))


def drift_findings(model, batches) -> list:
    """FK012 per BN from foldkit.stats.drift: a warning above the warn thresholds, an error above
    the error thresholds (documented in the README)."""
    from .stats import drift

    out = []
    for d in drift(model, batches):
        shift, hi, lo = d["max_mean_shift_sd"], d["max_var_ratio"], d["min_var_ratio"]
        ratio = max(hi, 1.0 / lo if lo > 0 else float("inf"))
        if shift <= DRIFT_WARN_SD and ratio <= DRIFT_WARN_RATIO:
            continue
        severity = "error" if shift > DRIFT_ERROR_SD or ratio > DRIFT_ERROR_RATIO else "warning"
        out.append(Finding("FK012", severity, d["node"],
                           f"running statistics are far from the data's: mean shift up to {shift:.3g} running sd "
                           f"(channel {d['worst_channel']}), var ratio {lo:.3g}..{hi:.3g}; "
                           "`foldkit recalibrate --data DATA` re-estimates them"))
    return out


# --- output formats -----------------------------------------------------------------------------

def _gh_data(s: str) -> str:
    """A workflow command's message, escaped as GitHub's own toolkit does (@actions/core)."""
    return str(s).replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _gh_property(s: str) -> str:
    return _gh_data(s).replace(":", "%3A").replace(",", "%2C")


def _summary(r: CheckResult, fail_on: str) -> str:
    if r.error is not None:
        if r.error_code == INTERNAL:
            return f"not checked: foldkit failed on it (a bug in foldkit, exit code 3): {r.error}"
        return f"cannot be read as an ONNX model: {r.error}"
    c = r.counts()
    codes = {}
    for f in r.findings:
        codes[f.code] = codes.get(f.code, 0) + 1
    verdict = "FAILED" if r.failed(fail_on) else "ready to deploy"
    detail = ", ".join(f"{k} x{v}" for k, v in sorted(codes.items()))
    return (f"{verdict}: {c['error']} error(s), {c['warning']} warning(s), {r.bn_count} BatchNormalization"
            + (f" ({detail})" if detail else ""))


def to_github(results, fail_on: str = "error") -> str:
    """GitHub Actions workflow commands. GitHub shows only 10 annotations of a kind per step, so one
    summary annotation per model comes first (error for a failing model, notice otherwise), then
    every finding."""
    results = [results] if isinstance(results, CheckResult) else list(results)
    lines = []
    for r in results:
        kind = "error" if r.exit_code(fail_on) else "notice"
        props = f"file={_gh_property(printable(r.path))},title={_gh_property('foldkit check')}"
        lines.append(f"::{kind} {props}::{_gh_data(printable(_summary(r, fail_on)))}")
    for r in results:
        for f in r.findings:
            if f.code in (UNREADABLE, INTERNAL) and r.error is not None:
                continue  # the summary says it
            props = f"file={_gh_property(printable(r.path))},title={_gh_property(printable(f'{f.code} {f.node}'))}"
            lines.append(f"::{f.severity} {props}::{_gh_data(printable(f.message))}")
    return "\n".join(lines) + ("\n" if lines else "")


def _md_cell(s) -> str:
    return printable(str(s)).replace("|", "\\|").replace("`", "'")


def to_markdown(results, fail_on: str = "error") -> str:
    """A job summary (``GITHUB_STEP_SUMMARY``): one line per model, then a table of every finding."""
    results = list(results)
    failed = sum(bool(r.exit_code(fail_on)) for r in results)
    out = [f"### foldkit check: {'FAILED' if failed else 'passed'} "
           f"({len(results) - failed} of {len(results)} model(s) ready to deploy, fail-on {fail_on})", "",
           "| model | result | errors | warnings | BatchNormalization |", "|---|---|---|---|---|"]
    for r in results:
        c = r.counts()
        verdict = r.verdict if r.error is not None else "FAILED" if r.failed(fail_on) else "ready"
        out.append(f"| {_md_cell(r.path)} | {verdict} | {c['error']} | {c['warning']} | {r.bn_count} |")
    rows = [(r, f) for r in results for f in r.findings]
    if rows:
        out += ["", "| model | severity | code | node | finding |", "|---|---|---|---|---|"]
        out += [f"| {_md_cell(r.path)} | {f.severity} | {f.code} | {_md_cell(f.node)} | {_md_cell(f.message)} |"
                for r, f in rows]
    return "\n".join(out) + "\n\n"


def to_text(results, fail_on: str = "error", unreadable: bool = True) -> str:
    """Plain lines, one finding per line, then one verdict line per model (and a total for several).
    ``unreadable=False`` leaves out the models that could not be read (the command's stderr names them)."""
    results = [results] if isinstance(results, CheckResult) else list(results)
    lines = []
    for r in results:
        if r.error is not None and not unreadable:
            continue
        for f in r.findings:
            node = f.node if f.graph == "main" else f"{f.node} [{f.graph}]"
            lines.append(f"{printable(r.path)}: {f.severity} {f.code} {printable(node)}: {printable(f.message)}")
        lines.append(f"{printable(r.path)}: {_summary(r, fail_on) if r.error is None else r.verdict} "
                     f"(fail-on {fail_on})")
    if len(results) > 1:
        bad = sum(bool(r.exit_code(fail_on)) for r in results)
        lines.append(f"{len(results) - bad} of {len(results)} model(s) ready to deploy")
    return "\n".join(lines) + ("\n" if lines else "")


def to_junit(results, fail_on: str = "error") -> str:
    """JUnit XML: one testsuite per model (with its time); every name and message made XML
    1.0-legal (control characters escaped). An unreadable model is a testsuite with one error."""
    import xml.etree.ElementTree as ET

    results = [results] if isinstance(results, CheckResult) else list(results)
    level = SEVERITIES.index(fail_on)
    root = ET.Element("testsuites", name="foldkit check")
    totals = {"tests": 0, "failures": 0, "errors": 0}
    for r in results:
        path = xml_safe(r.path)
        failing = [f for f in r.findings if SEVERITIES.index(f.severity) >= level and r.error is None]
        tests = max(1, len(r.findings))
        errors = int(r.error is not None)
        suite = ET.SubElement(root, "testsuite", name=path, tests=str(tests), failures=str(len(failing)),
                              errors=str(errors), skipped="0", time=f"{r.time_s:.3f}")
        totals["tests"] += tests
        totals["failures"] += len(failing)
        totals["errors"] += errors
        if r.error is not None:
            name = "foldkit checks it" if r.error_code == INTERNAL else "readable ONNX model"
            case = ET.SubElement(suite, "testcase", classname=path, name=name)
            ET.SubElement(case, "error", type=r.error_code, message=xml_safe(r.error)).text = xml_safe(r.error)
            continue
        if not r.findings:
            ET.SubElement(suite, "testcase", classname=path, name="deployment-ready")
        for f in r.findings:
            case = ET.SubElement(suite, "testcase", classname=path, name=xml_safe(f"{f.code} {f.node}"))
            message = xml_safe(f.message)
            if SEVERITIES.index(f.severity) >= level:
                el = ET.SubElement(case, "failure", type=f.code, message=message)
                el.text = f"[{f.severity}] {xml_safe(f.graph)}: {message}"
            else:
                ET.SubElement(case, "system-out").text = f"[{f.severity}] {message}"
    for k, v in totals.items():
        root.set(k, str(v))
    root.set("time", f"{sum(r.time_s for r in results):.3f}")
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


class _CallableModule(type(os)):
    """``foldkit.check(path)`` calls :func:`check`, and ``from foldkit.check import check`` keeps
    working: once the submodule is imported, Python binds ``foldkit.check`` to the module, so the
    module itself is made callable (module ``__class__`` assignment, PEP 549's documented idiom)."""

    def __call__(self, path):
        return check(path)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
