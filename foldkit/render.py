"""Human-readable tables (rich) for the terminal."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def console() -> Console:
    import sys

    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 120, highlight=False, soft_wrap=False)


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
        table.add_row(node, f"[{style}]{a.action}[/{style}]" if style else a.action, where or "")
    if report.actions:
        c.print(table)
    else:
        c.print("No BatchNormalization nodes.")
    for note in report.notes:
        c.print(f"note: {note}")
    v = report.verification
    if v:
        status = "[green]passed[/green]" if v["passed"] else "[red]FAILED[/red]"
        c.print(f"verification ({v['backend']}, vs {v['reference']}): {status}  max abs err {v['max_abs_err']:.3g}, "
                f"max rel err {v['max_rel_err']:.3g} (atol {v['atol']:g}, rtol {v['rtol']:g})")
    elif v is None and output is not None:
        c.print("verification: skipped (--no-verify)")
    if output is not None:
        c.print(f"wrote {output}")


def print_export_report(rep: dict, output) -> None:
    from .report import Action, Report

    c = console()
    c.print(f"exported {rep['model']} with the {rep['exporter']} exporter (opset {rep['opset']}): "
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
    c.print(f"wrote {output}")


def print_check(result, fail_on: str) -> None:
    c = console()
    if result.findings:
        table = Table()
        for col in ("severity", "code", "node", "how to fix"):
            table.add_column(col, overflow="fold")
        for f in result.findings:
            style = "red" if f.severity == "error" else "yellow"
            node = f.node if f.graph == "main" else f"{f.node} [{f.graph}]"
            table.add_row(f"[{style}]{f.severity}[/{style}]", f.code, node, f.message)
        c.print(table)
    verdict = "[red]FAILED[/red]" if result.failed(fail_on) else "[green]ready to deploy[/green]"
    c.print(f"{result.path}: {verdict} ({len(result.findings)} finding(s), {result.bn_count} BatchNormalization, "
            f"fail-on {fail_on})")
