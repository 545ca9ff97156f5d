"""A quantized CNN before and after folding its BatchNorms into the quantized weights, interleaved.

    python benchmarks/qdq.py [--iters 30] [--runtime ort-cpu,openvino]

ResNet-18 from models/ (random weights, realistic BN statistics), exported unfolded at 1x3x224x224,
quantized by NNCF's ONNX post-training quantization (int8 weights per channel -> DequantizeLinear
-> Conv -> BatchNormalization: the BNs stay, as NNCF leaves them), then `foldkit fold`. Needs the
optional dev dependency nncf (`pip install nncf==3.4.0`). Writes benchmarks/results/qdq.md.
"""

import os
import subprocess
import sys
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
FOLDKIT = os.path.join(os.path.dirname(sys.executable), "foldkit")


def main():
    import nncf
    import numpy as np
    import onnx

    import models
    from foldkit.bench import BenchConfig, run_bench
    from foldkit.bench.core import to_markdown
    from zoo import export

    from options import latency_parser

    ap = latency_parser("qdq")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    factory, _ = models.REGISTRY["resnet18"]
    fp = os.path.join(args.out, "resnet18.onnx")
    export(factory(), (1, 3, 224, 224), fp)
    r = np.random.default_rng(0)
    data = nncf.Dataset([{"input": r.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(8)])
    q = nncf.quantize(onnx.load(fp), data, subset_size=8)
    qp = os.path.join(args.out, "resnet18.nncf-int8.onnx")
    onnx.save(q, qp)
    folded = os.path.join(args.out, "resnet18.nncf-int8.foldkit.onnx")
    rep = os.path.join(args.out, "report.json")
    subprocess.run([FOLDKIT, "fold", qp, "-o", folded, "--report", rep, "-q"], check=True)
    rows = ["| model | BatchNormalization | QuantizeLinear | DequantizeLinear | Conv |", "|---|---|---|---|---|"]
    for label, path in (("NNCF int8", qp), ("NNCF int8, foldkit", folded)):
        c = Counter(n.op_type for n in onnx.load(path).graph.node)
        rows.append(f"| {label} | {c['BatchNormalization']} | {c['QuantizeLinear']} | {c['DequantizeLinear']} | {c['Conv']} |")
    res = run_bench(BenchConfig(models=[qp, folded], runtimes=args.runtime.split(","), ort_opt_levels=["disable", "all"],
                                warmup=args.warmup, iters=args.iters, threads=args.threads))
    import json

    v = json.load(open(rep))["verification"]
    md = ["# A quantized ResNet-18 (NNCF ONNX PTQ) before and after `foldkit fold`", "",
          f"`python benchmarks/qdq.py --iters {args.iters} --runtime {args.runtime}"
          + (f" --threads {args.threads}" if args.threads else "") + "`", "", *rows, "",
          f"Verification ({v['method']}): max abs err {v['max_abs_err']:.3g}, max rel err {v['max_rel_err']:.3g}.", "",
          to_markdown(res)]
    print("\n".join(md))
    with open(os.path.join(ROOT, "benchmarks", "results", "qdq.md"), "w") as f:
        f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
