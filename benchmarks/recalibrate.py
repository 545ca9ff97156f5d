"""Recalibration cost: throughput as a ratio to plain ONNX Runtime inference over the same data,
and peak memory as the data grows (it must stay flat: the data is streamed).

    python benchmarks/recalibrate.py [--size 112] [--files 4,16]

ResNet-18 from models/ exported unfolded, synthetic data in a folder of .npz files (64 samples
each). Writes benchmarks/results/recalibrate.md.
"""

import argparse
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
FOLDKIT = os.path.join(os.path.dirname(sys.executable), "foldkit")


def plain_inference(model_path, folder, batch):
    import onnx

    from foldkit.data import batches, model_inputs
    from foldkit.verify import _ort_session

    run = _ort_session(model_path)
    inputs = model_inputs(onnx.load(model_path))
    t = time.perf_counter()
    n = 0
    for b in batches(folder, inputs, batch):
        run(b)
        n += next(iter(b.values())).shape[0]
    return time.perf_counter() - t, n


def timed(cmd):
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    err = p.stderr.read().decode()
    p.stderr.close()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{cmd}: {err[-500:]}")
    return time.perf_counter() - t, usage.ru_maxrss / 1024


def main():
    import models
    from zoo import export

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--files", default="4,16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "recalibrate"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    factory, _ = models.REGISTRY["resnet18"]
    model = os.path.join(args.out, "resnet18.onnx")
    export(factory(), (1, 3, args.size, args.size), model)
    import onnx

    m = onnx.load(model)  # a dynamic batch for the data
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    onnx.save(m, model)
    r = np.random.default_rng(0)
    rows = ["| data | samples | plain ORT inference s | recalibrate --method batch s | ratio | peak RSS MB (batch) | "
            "recalibrate --method exact s (passes) |", "|---|---|---|---|---|---|---|"]
    for nfiles in (int(f) for f in args.files.split(",")):
        folder = os.path.join(args.out, f"data{nfiles}")
        os.makedirs(folder, exist_ok=True)
        for k in range(nfiles):
            p = os.path.join(folder, f"part{k:03d}.npz")
            if not os.path.exists(p):
                np.savez(p, input=r.standard_normal((64, 3, args.size, args.size)).astype(np.float32))
        plain, n = plain_inference(model, folder, args.batch)
        out = os.path.join(args.out, "rec.onnx")
        t_batch, rss = timed([FOLDKIT, "recalibrate", model, "--data", folder, "-o", out, "--no-fold", "-q",
                              "--batch-size", str(args.batch)])
        t_exact, _ = timed([FOLDKIT, "recalibrate", model, "--data", folder, "-o", out, "--no-fold", "-q",
                            "--method", "exact", "--batch-size", str(args.batch), "--report",
                            os.path.join(args.out, "exact.json")])
        import json

        passes = json.load(open(os.path.join(args.out, "exact.json")))["recalibration"]["passes"]
        rows.append(f"| {nfiles} files | {n} | {plain:.2f} | {t_batch:.2f} | {t_batch / plain:.2f} | {rss:.0f} | "
                    f"{t_exact:.2f} ({passes}) |")
        print(rows[-1], flush=True)
    md = ["# Recalibration cost (ResNet-18, unfolded, {0}x{0}, batch {1})".format(args.size, args.batch), "",
          f"`python benchmarks/recalibrate.py --size {args.size} --files {args.files}`; the recalibrate times include "
          "the process start and the model load.", "", *rows]
    with open(os.path.join(ROOT, "benchmarks", "results", "recalibrate.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
