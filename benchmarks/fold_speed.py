"""Fold speed and peak memory, as whole processes, interleaved, against the tools users compare with.

    python benchmarks/fold_speed.py [--rounds N] [--out benchmarks/out]

Each round runs every tool once on each model, in an order that rotates between rounds, as a fresh
process; wall time is measured around the process and peak memory is the child's ru_maxrss
(os.wait4). Before each process the page cache is put in the same state for every tool: `sync`
(so nobody pays for the previous tool's writeback) and then the input read once (warm, the
default: the model was just exported or downloaded) or, with --cold, every cache dropped (needs
root). Tools:

- foldkit:       `foldkit fold IN -o OUT --no-verify -q` (the console script; also timed with
                 `--fsync`, and as "foldkit verify": the default, which also runs both models on ORT)
- onnxoptimizer: onnx.load -> onnxoptimizer.optimize(["fuse_bn_into_conv"]) -> onnx.save
- onnxscript:    onnx_ir.load -> rewrite(fuse_batchnorm_into_{conv,conv_transpose,gemm}) -> onnx_ir.save
- ort-offline:   ONNX Runtime, ORT_ENABLE_BASIC, optimized_model_filepath (session creation writes it)

Ratios are foldkit's median wall time over each other tool's (none of them fsyncs its output, and
neither does foldkit by default) and, in parentheses, foldkit's with --fsync; each tool's output BN
count is reported so that a tool that did less work is visible.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)

SNIPPETS = {
    "onnxoptimizer": "import onnx, onnxoptimizer, sys\n"
                     "m = onnx.load(sys.argv[1])\n"
                     "m = onnxoptimizer.optimize(m, ['fuse_bn_into_conv'])\n"
                     "onnx.save(m, sys.argv[2], save_as_external_data=m.ByteSize() > 2**31 - 2**24)\n",
    "onnxscript": "import sys, onnx_ir as ir\n"
                  "from onnxscript.rewriter import rewrite\n"
                  "from onnxscript.rewriter.rules.common import fuse_batchnorm_into_conv_rule as a, "
                  "fuse_batchnorm_into_conv_transpose_rule as b, fuse_batchnorm_into_gemm_rule as c\n"
                  "m = ir.load(sys.argv[1])\n"
                  "m = rewrite(m, [a, b, c])\n"
                  "big = sum(v.const_value.nbytes for v in m.graph.initializers.values() if v.const_value is not None) > 2**31 - 2**24\n"
                  "ir.save(m, sys.argv[2], external_data=(sys.argv[2].rsplit('/', 1)[-1] + '.data') if big else None)\n",
    "ort-offline": "import sys, onnxruntime as ort\n"
                   "so = ort.SessionOptions()\n"
                   "so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC\n"
                   "so.optimized_model_filepath = sys.argv[2]\n"
                   "ort.InferenceSession(sys.argv[1], so, providers=['CPUExecutionProvider'])\n",
}


def command(tool, src, dst):
    if tool == "foldkit":
        return [os.path.join(BIN, "foldkit"), "fold", src, "-o", dst, "--no-verify", "-q"]
    if tool == "foldkit verify":  # the default command: the output is checked on ONNX Runtime too
        return [os.path.join(BIN, "foldkit"), "fold", src, "-o", dst, "-q"]
    if tool == "foldkit --fsync":  # durable: survives a power loss, at the disk's write speed
        return [os.path.join(BIN, "foldkit"), "fold", src, "-o", dst, "--no-verify", "--fsync", "-q"]
    return [sys.executable, "-c", SNIPPETS[tool], src, dst]


def run(cmd):
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    err = p.stderr.read().decode(errors="replace").strip().splitlines()
    p.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss / 1024.0, code, (err[-1] if err else "")


def prepare(src, cold):
    """The same cache state before every run: nothing dirty, and the input warm (or cold)."""
    os.sync()
    if cold:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return
    for path in (src, src + ".data"):
        if os.path.exists(path):
            with open(path, "rb", buffering=0) as f:
                buf = bytearray(16 << 20)
                while f.readinto(buf):
                    pass


COUNT_BN = ("import sys, onnx\n"
            "sys.path.insert(0, sys.argv[2])\n"
            "from foldkit.wire import lazy_load\n"
            "m = lazy_load(sys.argv[1], 1024) or onnx.load(sys.argv[1], load_external_data=False)\n"
            "print(sum(n.op_type == 'BatchNormalization' for n in m.graph.node))\n")


def bn_count(path):
    """Counted in a child process: this one must stay small (it imports neither onnx nor numpy),
    or every tool it forks later would start from its RSS, and ru_maxrss would report that."""
    return int(subprocess.run([sys.executable, "-c", COUNT_BN, path, ROOT], check=True, capture_output=True,
                              text=True).stdout)


def data_files(path):
    """``path``'s external-data files: foldkit names them after their content (NAME.<hash>.data)."""
    import glob

    return [f for f in [path + ".data"] + glob.glob(glob.escape(path) + ".*.data") if os.path.exists(f)]


def file_size(path):
    return os.path.getsize(path) + sum(os.path.getsize(f) for f in data_files(path))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every run (root only)")
    ap.add_argument("--models", default="resnet50,wide_1p5gb,wide_2p3gb")
    args = ap.parse_args()
    # generate in a child: a parent grown to several GB would hand its RSS high-water mark to every
    # tool process it forks, and ru_maxrss would report that instead of the tool's own peak
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "make_models.py"), args.out], check=True)
    # every tool starts from compiled bytecode, as pip leaves an installed package: the others' is in
    # site-packages, foldkit's (an editable install here) is written now, which PYTHONDONTWRITEBYTECODE
    # would otherwise prevent, making each foldkit process compile its modules (~0.1 s) first
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(ROOT, "foldkit")], check=True,
                   env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"})
    plan = {
        "resnet50": ["foldkit", "foldkit --fsync", "foldkit verify", "onnxoptimizer", "onnxscript", "ort-offline"],
        "wide_1p5gb": ["foldkit", "foldkit --fsync", "foldkit verify", "onnxoptimizer", "onnxscript", "ort-offline"],
        "wide_2p3gb": ["foldkit", "foldkit --fsync", "foldkit verify", "onnxscript"],  # protobuf's 2 GB limit rules out the others
    }
    results = []
    for name in args.models.split(","):
        src = os.path.join(args.out, name + ".onnx")
        tools = plan[name]
        rounds = args.rounds
        samples = {t: [] for t in tools}
        for r in range(rounds):
            order = tools[r % len(tools):] + tools[:r % len(tools)]
            for tool in order:
                dst = os.path.join(args.out, f"{name}.{tool.replace(' --', '-').replace(' ', '-')}.onnx")
                for f in [dst] + data_files(dst):
                    if os.path.exists(f):
                        os.unlink(f)
                prepare(src, args.cold)
                wall, rss, code, err = run(command(tool, src, dst))
                samples[tool].append((wall, rss, code, err, bn_count(dst) if code == 0 and os.path.exists(dst) else None))
                print(f"{name} round {r} {tool}: {wall:.2f}s, {rss:.0f} MB, exit {code} {err[:80]}", flush=True)
        size_mb = file_size(src) / 2 ** 20
        for tool in tools:
            ok = [s for s in samples[tool] if s[2] == 0]
            results.append({
                "model": name, "size_mb": round(size_mb, 1), "tool": tool,
                "median_s": round(statistics.median(s[0] for s in ok), 3) if ok else None,
                "walls_s": [round(s[0], 3) for s in ok],
                "peak_rss_mb": round(max(s[1] for s in ok), 1) if ok else None,
                "bn_after": ok[0][4] if ok else None, "failed": None if ok else samples[tool][0][3],
                "bn_before": bn_count(src),
            })
    lines = [f"Input cache: {'cold (dropped before every run)' if args.cold else 'warm (read once before every run)'}; "
             f"{args.rounds} rounds; `sync` before every run.", "",
             "| model | size MB | tool | median wall s | range s | peak RSS MB | RSS / size | BN before -> after | foldkit time / this tool (with --fsync) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == name]
        fk = next(r for r in rows if r["tool"] == "foldkit")
        durable = next((r for r in rows if r["tool"] == "foldkit --fsync"), fk)
        for r in rows:
            if r["median_s"] is None:
                lines.append(f"| {name} | {r['size_mb']} | {r['tool']} | failed: {r['failed'][:60]} | | | | | |")
                continue
            ratio = "" if r["tool"].startswith("foldkit") or fk["median_s"] is None else \
                f"{fk['median_s'] / r['median_s']:.2f} ({durable['median_s'] / r['median_s']:.2f})"
            lines.append(f"| {name} | {r['size_mb']} | {r['tool']} | {r['median_s']:.2f} | "
                         f"{min(r['walls_s']):.2f}-{max(r['walls_s']):.2f} | {r['peak_rss_mb']:.0f} | "
                         f"{r['peak_rss_mb'] / r['size_mb']:.2f} | {r['bn_before']} -> {r['bn_after']} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    stem = os.path.join(ROOT, "benchmarks", "results", "fold_speed" + ("_cold" if args.cold else ""))
    with open(stem + ".md", "w") as f:
        f.write(table + "\n")
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
