"""Human-readable tables (rich) for the terminal."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .text import printable


def esc(text) -> str:
    """User text (node names, paths, reasons) as literal text: no markup, no control characters."""
    return escape(printable(text))


def console() -> Console:
    import sys

    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 120, highlight=False, soft_wrap=False,
                   emoji=False)


def print_fold_report(report, output=None) -> None:
    c = console()
    c.print(f"BatchNormalization nodes: {report.bn_before} before, {report.bn_after} after")
    table = Table()
    table.add_column("BN node", overflow="fold")
    table.add_column("action")
    table.add_column("into / why", overflow="fold")
    for a in report.actions:
        where = a.target if a.action in ("folded", "merged") else a.reason
        node = a.node if a.graph == "main" else f"{a.node}  [{a.graph}]"
        style = {"folded": "green", "merged": "green", "lowered": "cyan", "kept": "yellow"}.get(a.action, "")
        table.add_row(esc(node), f"[{style}]{a.action}[/{style}]" if style else a.action, esc(where or ""))
    if report.actions:
        c.print(table)
    else:
        c.print("No BatchNormalization nodes.")
    for note in report.notes:
        c.print(f"note: {esc(note)}")
    v = report.verification
    if v:
        status = "[green]passed[/green]" if v["passed"] else "[red]FAILED[/red]"
        c.print(f"verification ({v['backend']}, vs {v['reference']}): {status}  max abs err {v['max_abs_err']:.3g}, "
                f"max rel err {v['max_rel_err']:.3g} (atol {v['atol']:g}, rtol {v['rtol']:g})")
    elif v is None and output is not None:
        c.print("verification: skipped (--no-verify)")
    if output is not None:
        c.print(f"wrote {esc(str(output))}")


def print_export_report(rep: dict, output) -> None:
    from .report import Action, Report

    c = console()
    c.print(f"exported {esc(str(rep['model']))} with the {rep['exporter']} exporter (opset {rep['opset']}): "
            f"{rep['bn_exported']} BatchNormalization nodes")
    if rep.get("fold"):
        f = rep["fold"]
        r = Report(bn_before=f["bn_before"], bn_after=f["bn_after"], actions=[Action(**a) for a in f["actions"]],
                   verification=f["verification"], notes=f["notes"])
        print_fold_report(r)
    p = rep["parity"]
    status = "[green]passed[/green]" if p["passed"] else "[red]FAILED[/red]"
    c.print(f"parity PyTorch vs {p['backend']}: {status}  max abs err {p['max_abs_err']:.3g}, "
            f"max rel err {p['max_rel_err']:.3g} (atol {p['atol']:g}, rtol {p['rtol']:g})")
    c.print(f"wrote {esc(str(output))}")


def print_check(result, fail_on: str) -> None:
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
        import sys

        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = None
        if sys.stderr.isatty():
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


def print_bench(result) -> None:
    c = console()
    table = Table()
    for col in ("runtime", "batch", "model", "p50 ms", "p90 ms", "p99 ms", "items/s", "vs first (95% CI)", "load s"):
        table.add_column(col, overflow="fold")
    for r in result.rows:
        v = r["vs_first"]
        if v is None:
            ratio = "baseline"
        else:
            ratio = f"{v['ratio']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"
            ratio = ratio + " (too few rounds)" if not v.get("enough_rounds", True) else \
                ratio if v["significant"] else ratio + " (noise)"
        table.add_row(esc(r["runtime"]), str(r["batch"]), esc(r["model"]), f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}",
                      f"{r['p99_ms']:.3f}", f"{r['throughput_per_s']:.1f}", ratio, f"{r['load_s']:.3f}")
    c.print(table)
    for u in result.unavailable:
        c.print(f"[yellow]unavailable[/yellow] {esc(u['runtime'])} (batch {u['batch']}): {esc(u['reason'])}")
    m = result.machine
    c.print(f"machine: {esc(str(m.get('processor')))}, {m.get('cpu_count')} cores, onnxruntime {m.get('onnxruntime', '-')}"
            + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"))
