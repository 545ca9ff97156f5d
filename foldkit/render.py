"""What the commands print. On a terminal: a short summary, and rich tables with ``-v``. When stdout
is not a terminal (a pipe, a CI log, a file): plain lines, one action or finding per line, no markup,
no box drawing. Either way every user string (node names, paths, reasons) is printed as it is:
control characters escaped, rich markup and emoji codes never interpreted.
"""

from __future__ import annotations

import sys

from .text import printable


def esc(text) -> str:
    """User text as literal rich text: no markup, no control characters."""
    from rich.markup import escape

    return escape(printable(text))


def fancy() -> bool:
    """Rich output only on a terminal."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def console():
    from rich.console import Console

    return Console(file=sys.stdout, highlight=False, soft_wrap=False, emoji=False, markup=True)


def _out(line: str = "") -> None:
    """One plain line (the stream escapes what its encoding cannot hold: see cli.main)."""
    print(line, file=sys.stdout)


def _counts(actions) -> str:
    order = ("folded", "merged", "lowered", "converted", "kept")
    n = {k: sum(a.action == k for a in actions) for k in order}
    return ", ".join(f"{v} {k}" for k, v in n.items() if v)


def _verification_line(v) -> str:
    method = v.get("method", "end-to-end")
    if method == "unchanged":
        return f"verification: not needed ({v['detail']})"
    if method == "unverified":
        return f"verification: NOT POSSIBLE: {v.get('end_to_end')}; {v.get('local')}"
    status = "passed" if v["passed"] else "FAILED"
    line = (f"verification ({method}, {v['backend']}, vs {v['reference']}): {status}  max abs err "
            f"{v['max_abs_err']:.3g}, max rel err {v['max_rel_err']:.3g} (atol {v['atol']:g}, rtol {v['rtol']:g})")
    floors = [o["noise_floor"] for o in v.get("outputs", []) if o.get("noise_floor") is not None]
    if floors:
        line += f"; noise floor {max(floors):.3g} (the model's own rounding)"
    if v.get("data"):
        d = v["data"]
        top1 = ", ".join(f"{k} {100 * a:.2f}%" for k, a in d["top1_agreement"].items())
        line += f"\n  on {d['samples']} real samples ({d['batches']} batches)" + (f"; top-1 agreement {top1}" if top1 else "")
    if v.get("end_to_end"):
        line += f"\n  whole model not compared element-wise: {v['end_to_end']}"
    if method == "local" and v.get("local"):
        line += f"\n  local: {v['local']}"
    return line


def print_fold_report(report, output=None, verbose: int = 0, verified: bool = True) -> None:
    """The summary (BN before -> after, what was left and why, verification); every BN with ``verbose``."""
    head = f"BatchNormalization nodes: {report.bn_before} before, {report.bn_after} after"
    if report.actions:
        head += f" ({_counts(report.actions)})"
    folded_affine = sum(a.action == "folded" for a in report.affine)
    kept_affine = [a for a in report.affine if a.action == "kept"]
    if folded_affine:
        head += f"; {folded_affine} per-channel Mul/Add folded"
    if kept_affine:
        head += f"; {len(kept_affine)} per-channel Mul/Add kept"
    merged = [b for b in report.branches if b.action == "merged"]
    if merged:
        head += f"; {len(merged)} sets of parallel branches merged"
    shown = report.actions if verbose else [a for a in report.actions if a.action in ("kept", "lowered")]
    shown = shown + kept_affine  # each per-channel Mul/Add left, with its reason, as a BN left
    if fancy():
        from rich.table import Table

        c = console()
        c.print(esc(head))
        if shown:
            table = Table()
            table.add_column("node", overflow="fold")
            table.add_column("action")
            table.add_column("into / why", overflow="fold")
            for a in shown:
                where = a.target if a.action in ("folded", "merged") else a.reason
                node = a.node if a.graph == "main" else f"{a.node}  [{a.graph}]"
                style = {"folded": "green", "merged": "green", "lowered": "cyan", "kept": "yellow"}.get(a.action, "")
                table.add_row(esc(node), f"[{style}]{a.action}[/{style}]" if style else a.action, esc(where or ""))
            c.print(table)
        if not verbose and len(shown) - len(kept_affine) < len(report.actions):
            c.print(f"({len(report.actions) - len(shown) + len(kept_affine)} folded BN not listed: -v lists every one)")
    else:
        _out(printable(head))
        for a in shown:
            where = a.target if a.action in ("folded", "merged") else a.reason
            node = a.node if a.graph == "main" else f"{a.node} [{a.graph}]"
            link = "into" if a.action in ("folded", "merged") else "because"
            _out(f"{a.action}: {printable(node)}" + (f" {link} {printable(where)}" if where else ""))
    for b in report.branches if verbose else [b for b in report.branches if b.action != "merged"]:
        _out(f"branches {b.action}: {printable(b.node)}: {printable(b.reason)}")
    for note in report.notes:
        _out(f"note: {printable(note)}")
    v = report.verification
    if v:
        _out(_verification_line(v))
    elif v is None and output is not None and not verified:
        _out("verification: skipped (--no-verify)")
    if output is not None:
        _out(f"wrote {printable(str(output))}")


def print_export_report(rep: dict, output, verbose: int = 0) -> None:
    from .report import Action, Report

    e = rep["export"]
    _out(f"exported {printable(str(e['model']))} with the {e['exporter']} exporter (opset {e['opset']}): "
         f"{e['bn_exported']} BatchNormalization nodes")
    if e["folded"]:
        r = Report(bn_before=rep["bn_before"], bn_after=rep["bn_after"], actions=[Action(**a) for a in rep["actions"]],
                   verification=rep["verification"], notes=rep["notes"],
                   affine=[Action(**a) for a in rep.get("affine_actions", [])],
                   branches=[Action(**a) for a in rep.get("branch_actions", [])])
        print_fold_report(r, verbose=verbose)
    p = rep["parity"]
    _out(f"parity PyTorch vs {p['backend']}: {'passed' if p['passed'] else 'FAILED'}  max abs err "
         f"{p['max_abs_err']:.3g}, max rel err {p['max_rel_err']:.3g} (atol {p['atol']:g}, rtol {p['rtol']:g})")
    _out(f"wrote {printable(str(output))}")


def print_check(result, fail_on: str) -> None:
    """A rich table (terminal only; plain output is check.to_text)."""
    from rich.table import Table

    c = console()
    if result.findings:
        table = Table()
        for col in ("severity", "code", "node", "how to fix"):
            table.add_column(col, overflow="fold")
        for f in result.findings:
            style = "red" if f.severity == "error" else "yellow"
            node = f.node if f.graph == "main" else f"{f.node} [{f.graph}]"
            table.add_row(f"[{style}]{f.severity}[/{style}]", f.code, esc(node), esc(f.message))
        c.print(table)
    verdict = "[red]FAILED[/red]" if result.failed(fail_on) else "[green]ready to deploy[/green]"
    c.print(f"{esc(result.path)}: {verdict} ({len(result.findings)} finding(s), {result.bn_count} BatchNormalization, "
            f"fail-on {fail_on})")


class progress_bar:
    """A rich progress bar on stderr (only on a terminal); yields a factory total -> tick()."""

    def __enter__(self):
        self.progress = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("benchmarking"), BarColumn(), TimeRemainingColumn(),
                                     console=Console(file=sys.stderr), transient=True)
            self.progress.start()

        def make(total):
            if self.progress is None:
                return lambda: None
            task = self.progress.add_task("bench", total=total)
            return lambda: self.progress.advance(task)
        return make

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()
        return False


def ratio_text(v) -> str:
    if v is None:
        return "baseline"
    text = f"{v['ratio']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"
    if not v.get("enough_rounds", True):
        return text + " (too few rounds)"
    return text if v["significant"] else text + " (noise)"


def print_bench(result, verbose: int = 0) -> None:
    cols = ("runtime", "batch", "model", "p50 ms", "p90 ms", "p99 ms", "items/s", "vs first (95% CI)", "load s")
    rows = [(r["runtime"], str(r["batch"]), r["model"], f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}",
             f"{r['p99_ms']:.3f}", f"{r['throughput_per_s']:.1f}", ratio_text(r["vs_first"]), f"{r['load_s']:.3f}")
            for r in result.rows]
    m = result.machine
    machine = (f"machine: {m.get('processor')}, {m.get('cpu_count')} cores, onnxruntime {m.get('onnxruntime', '-')}"
               + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"))
    if fancy():
        from rich.table import Table

        c = console()
        table = Table()
        for col in cols:
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(*(esc(x) for x in row))
        c.print(table)
    else:
        for rt, b, model, p50, p90, p99, items, ratio, load in rows:
            _out(f"{printable(rt)} batch {b} {printable(model)}: p50 {p50} ms, p90 {p90} ms, p99 {p99} ms, "
                 f"{items} items/s, vs first {ratio}, load {load} s")
    for u in result.unavailable:
        _out(f"unavailable: {printable(u['runtime'])} (batch {u['batch']}): {printable(u['reason'])}")
    _out(printable(machine))
