"""`foldkit check` as it scales: time against the number of BatchNorms (goal: linear, like fold) and
peak memory against the largest tensor it must read (goal: <= 1.5x that tensor plus a constant).

    python benchmarks/check_scaling.py [--out benchmarks/out]

Each measurement is a fresh process (`foldkit check --format json`), wall time around it and peak
memory from os.wait4's ru_maxrss. The constant is measured in the same run: check on a model whose
tensors are all tiny. Models:

- chain-N: N Conv(1x1, 4 channels) + BN pairs, for N = 500, 1000, 2000, 4000 (time per BN, and
  the ratio of the largest to the smallest N's time per BN: 1.0 is linear);
- wide-460MB: 12 Conv(1024x1024x3x3) + BN, 453 MB, largest tensor 37.7 MB (peak RSS less the
  constant, over the largest tensor).
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FOLDKIT = os.path.join(os.path.dirname(sys.executable), "foldkit")


def chain(n, c=4, k=1, seed=0):
    import numpy as np
    from onnx import helper

    from tests.helpers import F32, bn_inits, rng, tensor

    r = rng(seed)
    nodes, inits, prev = [], [], "X"
    for i in range(n):
        inits.append(tensor(f"W{i}", r.standard_normal((c, c, k, k)).astype(np.float32)))
        names, bn = bn_inits(f"bn{i}", c, r)
        inits += bn
        pads = [k // 2] * 4
        nodes.append(helper.make_node("Conv", [prev, f"W{i}"], [f"c{i}"], name=f"conv{i}", pads=pads))
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}"] + names, [f"b{i}"], name=f"bn{i}"))
        prev = f"b{i}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", F32, [1, c, 4, 4])],
                          [helper.make_tensor_value_info(prev, F32, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def run(path):
    t0 = time.perf_counter()
    pid = os.spawnv(os.P_NOWAIT, FOLDKIT, [FOLDKIT, "check", path, "--format", "json", "-o", os.devnull])
    _, status, usage = os.wait4(pid, 0)
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def main():
    import onnx

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for n in (1, 500, 1000, 2000, 4000):
        p = os.path.join(args.out, f"chain{n}.onnx")
        onnx.save(chain(n), p)
        wall, rss, code = run(p)
        rows.append({"model": f"chain-{n}", "bn": n, "wall_s": round(wall, 3), "peak_mb": round(rss, 1), "exit": code})
        print(rows[-1], flush=True)
    wide = os.path.join(args.out, "wide460.onnx")
    onnx.save(chain(12, c=1024, k=3), wide)
    wall, rss, code = run(wide)
    largest_mb = 1024 * 1024 * 9 * 4 / 2 ** 20
    base = rows[0]["peak_mb"]
    rows.append({"model": "wide-460MB", "bn": 12, "wall_s": round(wall, 3), "peak_mb": round(rss, 1), "exit": code,
                 "file_mb": round(os.path.getsize(wide) / 2 ** 20, 1), "largest_tensor_mb": round(largest_mb, 1),
                 "constant_mb": base, "peak_over_largest": round((rss - base) / largest_mb, 2)})
    print(rows[-1], flush=True)
    t = {r["bn"]: r["wall_s"] for r in rows[:5]}
    # marginal cost per BN, start-up excluded: the last doubling against the first (1.0 = linear)
    summary = {"time_per_bn_ratio_4000_over_500": round(((t[4000] - t[2000]) / 2000) / ((t[1000] - t[500]) / 500), 2),
               "peak_over_largest_tensor": rows[-1]["peak_over_largest"]}
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", "check_scaling.json"), "w") as f:
        json.dump({"rows": rows, "summary": summary}, f, indent=1)
    lines = ["| model | BN | wall s | peak MB |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['bn']} | {r['wall_s']:.2f} | {r['peak_mb']:.0f} |" for r in rows]
    lines.append("")
    lines.append(f"marginal time per BN, 2000->4000 over 500->1000: {summary['time_per_bn_ratio_4000_over_500']}x "
                 f"(1.0 = linear); "
                 f"peak RSS less the constant ({base:.0f} MB) over the largest tensor: "
                 f"{summary['peak_over_largest_tensor']}x (goal <= 1.5x)")
    with open(os.path.join(ROOT, "benchmarks", "results", "check_scaling.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
