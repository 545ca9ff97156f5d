"""Latency of every reference network: original vs foldkit vs the network built without BN (the
limit folding can reach), and the outputs of onnxoptimizer, onnxscript and ORT's offline optimizer,
interleaved in one run per network on each ONNX Runtime optimization level.

    python benchmarks/zoo.py [--iters 30] [--runtime ort-cpu] [--models resnet18,...]

Writes benchmarks/results/zoo.md and zoo.json. Ratios are per-round medians against the original
with 95% bootstrap intervals; "~" marks a ratio indistinguishable from 1.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

SHAPES = {  # batch 1, sizes users deploy at
    "resnet18": (1, 3, 224, 224), "resnet50": (1, 3, 224, 224), "mobilenet_v2": (1, 3, 224, 224),
    "preact_resnet18": (1, 3, 224, 224), "unet": (1, 3, 256, 256), "audio_net": (1, 1, 16000),
    "video_net": (1, 3, 8, 112, 112), "mlp_bn": (64, 64),
}


def without_bn(module):
    import torch

    for name, child in module.named_children():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            setattr(module, name, torch.nn.Identity())
        else:
            without_bn(child)
    return module


def export(module, shape, path):
    import torch

    with torch.no_grad():
        torch.onnx.export(module.eval(), (torch.randn(*shape),), path, dynamo=False, opset_version=17,
                          do_constant_folding=False, input_names=["input"], output_names=["output"])


def main():
    from fold_speed import SNIPPETS

    import models
    from foldkit.bench import BenchConfig, run_bench
    from foldkit.bench.core import to_markdown

    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--runtime", default="ort-cpu")
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "zoo"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    all_rows, md = [], []
    for name in args.models.split(","):
        factory, _ = models.REGISTRY[name]
        shape = SHAPES[name]
        orig = os.path.join(args.out, f"{name}.onnx")
        export(factory(), shape, orig)
        variants = {"original": orig}
        folded = os.path.join(args.out, f"{name}.foldkit.onnx")
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "foldkit"), "fold", orig, "-o", folded, "-q"],
                       check=True)
        variants["foldkit"] = folded
        nobn = os.path.join(args.out, f"{name}.no_bn.onnx")
        export(without_bn(factory()), shape, nobn)
        variants["built without BN"] = nobn
        for tool in ("onnxoptimizer", "onnxscript", "ort-offline"):
            dst = os.path.join(args.out, f"{name}.{tool}.onnx")
            p = subprocess.run([sys.executable, "-c", SNIPPETS[tool], orig, dst], capture_output=True, text=True)
            if p.returncode == 0:
                variants[tool] = dst
        labels = {path: label for label, path in variants.items()}
        res = run_bench(BenchConfig(models=list(variants.values()), runtimes=args.runtime.split(","),
                                    ort_opt_levels=["disable", "all"], batches=[shape[0]], warmup=args.warmup,
                                    iters=args.iters))
        import onnx
        for row in res.rows:
            path = os.path.join(args.out, row["model"])
            row["variant"] = labels.get(path, row["model"])
            row["network"] = name
            m = onnx.load(path, load_external_data=False)
            row["bn_left"] = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
            row.pop("samples_ms")
            row["model"] = f"{row['variant']} ({row['bn_left']} BN)"
        all_rows += res.rows
        md.append((name, f"### {name} {list(shape)}\n\n" + to_markdown(res)))
        print(md[-1][1], flush=True)
    # a run over some networks replaces their results and keeps the others'
    results = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(results, exist_ok=True)
    done = {name for name, _ in md}
    try:
        with open(os.path.join(results, "zoo.json")) as f:
            old_rows = [r for r in json.load(f) if r["network"] not in done]
        with open(os.path.join(results, "zoo.md")) as f:
            old_md = [("", part if part.startswith("### ") else "### " + part)
                      for part in f.read().split("\n### ") if part.strip() and part.split()[0].lstrip("#") not in done]
    except (OSError, ValueError):
        old_rows, old_md = [], []
    order = list(SHAPES)
    sections = sorted(old_md + md, key=lambda s: order.index(s[1].split()[1]) if s[1].split()[1] in order else 99)
    rows = sorted(old_rows + all_rows, key=lambda r: order.index(r["network"]))
    with open(os.path.join(results, "zoo.md"), "w") as f:
        f.write("\n".join(s for _, s in sections))
    with open(os.path.join(results, "zoo.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
