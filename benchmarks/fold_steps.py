"""What each step of `foldkit fold` costs, on ResNet-50 (or any model), as the user runs it.

    python benchmarks/fold_steps.py [--model benchmarks/out/resnet50.onnx] [--runs 9] [--no-verify]

Each run is a fresh process (`python -c`, timed around it, output unlinked and `sync` first, as in
fold_speed.py) that wraps foldkit's own functions with clocks and then runs the CLI. Steps on the
main thread follow one another; the early run of the original (foldkit.early) overlaps them on its
worker thread, and the main thread waits for it only where "wait for the original's run" says.
Medians over the runs; writes benchmarks/results/fold_steps.md (or fold_steps_no_verify.md).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = r'''
import json, sys, threading, time
T0 = time.perf_counter()
marks = []
def mark(what):
    marks.append((what, threading.current_thread().name != "MainThread", time.perf_counter() - T0))
import foldkit.cli, foldkit.api as A, foldkit.early as E, foldkit.verify as V, foldkit.backends as B
import foldkit.wire as W, foldkit.writing as WR
mark("imported")
def wrap(mod, name, before, after):
    real = getattr(mod, name)
    def f(*a, **k):
        mark(before)
        try:
            return real(*a, **k)
        finally:
            mark(after)
    setattr(mod, name, f)
wrap(A, "load", "load:start", "load:end")
wrap(A, "_checker", "checker:start", "checker:end")
wrap(W, "write_model", "write:start", "write:end")
wrap(E.ReferenceRun, "_work", "worker:start", "worker:end")
wrap(E.ReferenceRun, "result", "wait:start", "wait:end")
wrap(B, "_ort_session", "session:start", "session:end")
wrap(V, "run", "run:start", "run:end")
def done():  # atexit: after the command returned and other threads ended, on either way out
    mark("end")
    print(json.dumps(marks), flush=True)
import atexit
atexit.register(done)
sys.argv = ["foldkit", "fold"] + sys.argv[1:]
from foldkit.entry import run
run(prog_name="foldkit")  # as the console script: ends with its quick exit
'''


def one(model, out, verify):
    if os.path.exists(out):
        os.unlink(out)
    os.sync()
    args = [model, "-o", out, "-q"] + ([] if verify else ["--no-verify"])
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", PROBE] + args, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(p.stderr[-500:])
    marks = json.loads(p.stdout.strip().splitlines()[-1])
    return wall, marks


def steps(wall, marks):
    """(step, thread, seconds) from one run's marks."""
    main = {}
    side = {}
    for what, worker, t in marks:
        table = side if worker else main
        table.setdefault(what, []).append(t)
    first = lambda d, k: d.get(k, [None])[0]  # noqa: E731
    last = lambda d, k: d.get(k, [None])[-1]  # noqa: E731
    end = first(main, "end")
    out = [("interpreter start and exit", "main", wall - end)]
    out.append(("imports (numpy, onnx, click, foldkit)", "main", first(main, "imported")))
    out.append(("output guard, input checks, lazy load", "main", last(main, "load:end") - first(main, "imported")))
    write0, write1 = first(main, "write:start"), last(main, "write:end")
    checker0, checker1 = first(main, "checker:start"), first(main, "checker:end")
    fold_end = checker0 if checker0 is not None else write0
    out.append(("passes (inference mode, folds, cleanup) and report", "main", fold_end - last(main, "load:end")))
    if checker0 is not None:
        out.append(("onnx.checker on the folded model", "main", checker1 - checker0))
    out.append(("write (folded weights computed as streamed)", "main", write1 - write0))
    if "wait:start" in main:
        out.append(("wait for the original's run", "main", first(main, "wait:end") - first(main, "wait:start")))
        s0 = [t for t in main.get("session:start", []) if t > write1]
        s1 = [t for t in main.get("session:end", []) if t > write1]
        r1 = [t for t in main.get("run:end", []) if t > write1]
        if s0 and s1 and r1:
            out.append(("folded model: ORT session on the written file", "main", s1[0] - s0[0]))
            out.append(("folded model: ORT run", "main", r1[0] - s1[0]))
        out.append(("compare, commit (rename), report", "main", end - (r1[0] if r1 else first(main, "wait:end"))))
    else:
        out.append(("commit (rename), report", "main", end - write1))
    if "worker:start" in side:
        w0 = first(side, "worker:start")
        out.append(("original: import onnxruntime, inputs", "worker", first(side, "session:start") - w0))
        out.append(("original: ORT session", "worker", first(side, "session:end") - first(side, "session:start")))
        out.append(("original: ORT run", "worker", first(side, "run:end") - first(side, "session:end")))
    out.append(("total (wall, whole process)", "", wall))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "benchmarks", "out", "resnet50.onnx"))
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--no-verify", action="store_true")
    args = ap.parse_args()
    if not os.path.exists(args.model):
        subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "make_models.py"),
                        os.path.dirname(args.model)], check=True)
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(ROOT, "foldkit")], check=True,
                   env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"})
    out = os.path.join(os.path.dirname(os.path.abspath(args.model)), "steps.onnx")
    runs = [steps(*one(args.model, out, not args.no_verify)) for _ in range(args.runs)]
    names = [(s, th) for s, th, _ in runs[0]]
    rows = ["| step | thread | median ms |", "|---|---|---|"]
    for k, (name, thread) in enumerate(names):
        rows.append(f"| {name} | {thread} | {1000 * statistics.median(r[k][2] for r in runs):.0f} |")
    mode = "--no-verify" if args.no_verify else "verified (the default)"
    md = "\n".join([f"`foldkit fold {os.path.basename(args.model)}`, {mode}: `python benchmarks/fold_steps.py"
                    f"{' --no-verify' if args.no_verify else ''} --runs {args.runs}`, {os.cpu_count()} cores; "
                    "medians of fresh processes. Worker rows overlap the main thread's.", "", *rows])
    print(md)
    name = "fold_steps_no_verify.md" if args.no_verify else "fold_steps.md"
    with open(os.path.join(ROOT, "benchmarks", "results", name), "w") as f:
        f.write(md + "\n")


if __name__ == "__main__":
    main()
