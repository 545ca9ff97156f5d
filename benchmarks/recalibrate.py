"""Recalibration cost at real sizes: `foldkit recalibrate --method batch --no-fold` against plain ONNX
Runtime inference over the same batches of the same data, both as whole processes on this machine
(process start, model load and data reading included in both), as time and peak-memory ratios.
Goal: at most 1.2x the time and 1.5x the peak memory of plain inference, at every size and batch.

    python benchmarks/recalibrate.py [--models resnet18,resnet50] [--sizes 112,224] [--batches 8,32]
                                     [--samples 128] [--exact]

Reference networks from models/, exported unfolded with a dynamic batch; synthetic data in a folder
of .npz files (32 samples each), streamed. Writes benchmarks/results/recalibrate.md.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
FOLDKIT = os.path.join(os.path.dirname(sys.executable), "foldkit")


def plain_inference(model_path, folder, batch, level="none"):
    """The baseline, run in its own process: an ONNX Runtime session made from the file (nothing
    parsed in Python) over the batches foldkit's data reader yields. ``level``: "none", the session
    foldkit measures statistics with (no graph optimizations: the model as written, op by op), or
    "all", ONNX Runtime's defaults (its fusions and NCHWc layouts, which fold the BNs away)."""
    import onnxruntime as ort

    from foldkit.data import batches

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if level == "none"
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    so.log_severity_level = 4
    sess = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
    inputs = {i.name: np.dtype(types[i.type]) for i in sess.get_inputs()}
    for b in batches(folder, inputs, batch):
        sess.run(None, b)


def timed(cmd):
    """(seconds, peak RSS in MB) of a whole process."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    err = p.stderr.read().decode()
    p.stderr.close()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{cmd}: {err[-500:]}")
    return time.perf_counter() - t, usage.ru_maxrss / 1024


def _model(name, size, out):
    """The exported model's path; exported in a child process, so that this one stays small: a
    child's peak RSS (ru_maxrss) starts from the size of the process it was forked from."""
    path = os.path.join(out, f"{name}_{size}.onnx")
    if not os.path.exists(path):
        subprocess.run([sys.executable, os.path.abspath(__file__), "--export", name, str(size), out], check=True)
    return path


def _export(name, size, out):
    import onnx

    import models
    from zoo import export

    path = os.path.join(out, f"{name}_{size}.onnx")
    if not os.path.exists(path):
        factory, _ = models.REGISTRY[name]
        export(factory(), (1, 3, size, size), path)
        m = onnx.load(path)  # a dynamic batch for the data
        m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
        m.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
        onnx.save(m, path)
    return path


def _data(size, samples, out):
    folder = os.path.join(out, f"data_{size}_{samples}")
    os.makedirs(folder, exist_ok=True)
    r = np.random.default_rng(0)
    for k in range(0, samples, 32):
        p = os.path.join(folder, f"part{k // 32:03d}.npz")
        if not os.path.exists(p):
            np.savez(p, input=r.standard_normal((min(32, samples - k), 3, size, size)).astype(np.float32))
    return folder


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--sizes", default="112,224")
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--exact", action="store_true", help="also time --method exact")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved runs of each; medians are reported")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "recalibrate"))
    ap.add_argument("--plain", nargs=4, metavar=("MODEL", "DATA", "BATCH", "LEVEL"), help=argparse.SUPPRESS)
    ap.add_argument("--export", nargs=3, metavar=("NAME", "SIZE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.export:
        return _export(args.export[0], int(args.export[1]), args.export[2])
    if args.plain:
        return plain_inference(args.plain[0], args.plain[1], int(args.plain[2]), args.plain[3])
    os.makedirs(args.out, exist_ok=True)
    rows = ["| model | resolution | batch | plain ORT s | recalibrate s | time ratio | plain peak MB | "
            "recalibrate peak MB | memory ratio | plain ORT, defaults s | time ratio to it |"
            + (" exact s (passes) |" if args.exact else ""),
            "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.exact else "")]
    for name in args.models.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            model, folder = _model(name, size, args.out), _data(size, args.samples, args.out)
            for batch in (int(b) for b in args.batches.split(",")):
                out = os.path.join(args.out, "rec.onnx")
                plain_cmd = [sys.executable, os.path.abspath(__file__), "--plain", model, folder, str(batch), "none"]
                default_cmd = plain_cmd[:-1] + ["all"]
                rec_cmd = [FOLDKIT, "recalibrate", model, "--data", folder, "-o", out, "--no-fold", "-q",
                           "--batch-size", str(batch)]
                runs = [(timed(plain_cmd), timed(rec_cmd), timed(default_cmd)) for _ in range(args.rounds)]  # interleaved
                t_plain = statistics.median(p[0] for p, _, _ in runs)
                t_rec = statistics.median(r[0] for _, r, _ in runs)
                t_default = statistics.median(d[0] for _, _, d in runs)
                m_plain, m_rec = max(p[1] for p, _, _ in runs), max(r[1] for _, r, _ in runs)
                row = (f"| {name} | {size}x{size} | {batch} | {t_plain:.2f} | {t_rec:.2f} | {t_rec / t_plain:.2f}x | "
                       f"{m_plain:.0f} | {m_rec:.0f} | {m_rec / m_plain:.2f}x | {t_default:.2f} | {t_rec / t_default:.2f}x |")
                if args.exact:
                    rep = os.path.join(args.out, "exact.json")
                    t_exact, _ = timed([FOLDKIT, "recalibrate", model, "--data", folder, "-o", out, "--no-fold", "-q",
                                        "--method", "exact", "--batch-size", str(batch), "--report", rep])
                    with open(rep) as f:
                        row += f" {t_exact:.2f} ({json.load(f)['recalibration']['passes']}) |"
                rows.append(row)
                print(row, flush=True)
    md = [f"# Recalibration cost ({args.samples} samples, `--method batch --no-fold`)", "",
          f"`python benchmarks/recalibrate.py --models {args.models} --sizes {args.sizes} --batches {args.batches} "
          f"--samples {args.samples} --rounds {args.rounds}`, on {platform.processor() or platform.machine()} "
          f"({os.cpu_count()} cores). Every column is a whole process (start, model load and data reading included) "
          f"over the same batches, run {args.rounds} times interleaved: median times, highest peaks; "
          "goal: at most 1.2x the time and 1.5x the peak memory of plain inference. \"plain ORT\" is ONNX Runtime "
          "with the session foldkit measures statistics with (no graph optimizations: the model as written); "
          "\"defaults\" is ONNX Runtime's default optimizations (fusions, NCHWc layouts: BNs fused away, so "
          "nothing in it could be measured).", "", *rows]
    with open(os.path.join(ROOT, "benchmarks", "results", "recalibrate.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
