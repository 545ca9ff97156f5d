"""What each tool leaves of the BatchNormalizations and per-channel affine ops in exports made by
other exporters (tf2onnx, jax2onnx, paddle2onnx): the committed tiny corpus (tests/data/exporters)
and, where given, full-size exports (tf_corpus.py --full DIR).

    python benchmarks/exporters/compare.py [DIR ...]   ->  benchmarks/results/exporters.md

Per model and tool: BN left, per-channel affine ops left (a Mul/Add/Sub/Div whose other input is a
constant with at most one dim above 1 and more than one element, not a MatMul's bias: the same
count for every tool's output), nodes, and errors (the tool failed, or its output differs from the
original's on ONNX Runtime by more than 1e-4 relative to the output's largest magnitude). foldkit
runs as users run it (`foldkit fold`, verified); onnxslim, onnxscript's rewriter, onnxoptimizer
(fuse_bn_into_conv) and ONNX Runtime's offline optimizer (basic level) as fold_speed.py runs them.
"""

import glob
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
FOLDKIT = os.path.join(os.path.dirname(sys.executable), "foldkit")
CORPUS = os.path.join(ROOT, "tests", "data", "exporters")
TOOLS = ("foldkit", "onnxslim", "onnxscript", "onnxoptimizer", "ort-offline")
SLIM = "import onnx, onnxslim, sys\nonnx.save(onnxslim.slim(sys.argv[1]), sys.argv[2])\n"


def counts(path):
    """(BN, per-channel affine ops, nodes) of the main graph."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    m = onnx.load(path)
    g = m.graph
    consts = {t.name: numpy_helper.to_array(t).shape for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = tuple(n.attribute[0].t.dims)
    producer = {o: n for n in g.node for o in n.output}
    uses = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    affine = 0
    for n in g.node:
        if n.op_type not in ("Mul", "Add", "Sub", "Div") or len(n.input) != 2:
            continue
        shapes = [consts.get(i) for i in n.input]
        if (shapes[0] is None) == (shapes[1] is None):
            continue
        shape = shapes[0] if shapes[0] is not None else shapes[1]
        x = n.input[1] if shapes[0] is not None else n.input[0]
        if int(np.prod(shape)) <= 1 or sum(d != 1 for d in shape) > 1:
            continue
        p = producer.get(x)
        if n.op_type in ("Add", "Sub") and p is not None and p.op_type == "MatMul" and uses.get(x) == 1:
            continue  # the MatMul's bias
        affine += 1
    return sum(n.op_type == "BatchNormalization" for n in g.node), affine, len(g.node)


def agrees(src, dst):
    import numpy as np
    import onnxruntime as ort


    a = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(dst, providers=["CPUExecutionProvider"])
    r = np.random.default_rng(0)
    feeds = {}
    for i in a.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        feeds[i.name] = r.standard_normal(shape).astype(np.float32)
    for x, y in zip(a.run(None, feeds), b.run(None, feeds)):
        scale = max(float(np.abs(x).max()), 1e-30)
        if x.shape != y.shape or float(np.abs(x - y).max()) > 1e-4 * scale:
            return False
    return True


def run_tool(tool, src, dst):
    from fold_speed import SNIPPETS

    if tool == "foldkit":
        cmd = [FOLDKIT, "fold", src, "-o", dst, "-q"]
    else:
        cmd = [sys.executable, "-c", SLIM if tool == "onnxslim" else SNIPPETS[tool], src, dst]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0 or not os.path.exists(dst):
        lines = (p.stderr or p.stdout).strip().splitlines()
        return f"exit {p.returncode}: {lines[-1][:80] if lines else ''}"
    return None if agrees(src, dst) else "outputs differ"


def main():
    dirs = [CORPUS] + sys.argv[1:]
    models = sorted(p for d in dirs for p in glob.glob(os.path.join(d, "*.onnx")))
    rows = ["| model | original BN / affine / nodes | " + " | ".join(TOOLS) + " |",
            "|---|---|" + "---|" * len(TOOLS)]
    behind = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in models:
            name = os.path.basename(src)[:-5]
            cells, left = [], {}
            for tool in TOOLS:
                dst = os.path.join(tmp, f"{name}.{tool}.onnx")
                err = run_tool(tool, src, dst)
                if err:
                    cells.append(f"error ({err})")
                    continue
                bn, aff, nodes = counts(dst)
                left[tool] = (bn, aff)
                cells.append(f"{bn} / {aff} / {nodes}")
            if "foldkit" in left and any(left[t][0] < left["foldkit"][0] or left[t][1] < left["foldkit"][1]
                                         for t in left):
                behind.append(name)
            bn, aff, nodes = counts(src)
            rows.append(f"| {name} | {bn} / {aff} / {nodes} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    import onnxruntime

    versions = []
    for mod in ("onnxslim", "onnxscript", "onnxoptimizer"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except Exception:
            versions.append(f"{mod} not installed")
    md = ["# BatchNormalization and per-channel affine ops left, by exporter and tool", "",
          f"`python benchmarks/exporters/compare.py {' '.join(sys.argv[1:])}`".replace(ROOT + "/", ""), "",
          "Each cell: BN left / per-channel affine ops left / nodes (see the script's docstring for the count).", ""]
    md += rows + ["", f"onnxruntime {onnxruntime.__version__}, " + ", ".join(versions) + ".",
                  "", f"foldkit behind another tool on: {', '.join(behind) or 'no model'}."]
    out = os.path.join(ROOT, "benchmarks", "results", "exporters.md")
    with open(out, "w") as f:
        f.write("\n".join(md) + "\n")
    print(out)


if __name__ == "__main__":
    main()
