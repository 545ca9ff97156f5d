"""Re-parameterizable networks exported without their reparameterize step: what is left after
each tool, and the latency of unmerged vs merged, interleaved in one run per network.

    python benchmarks/reparam.py [--iters 30] [--runtime ort-cpu,openvino] [--size 224]

Networks: RepVGG-A0 (repvgg-pytorch), MobileOne-S0 (mobileone-pytorch), FastViT-T8 and RepViT-M0.9
(timm 1.0.29, through tests/third_party.py), random weights with realistic BN statistics (and layer
scales in [0.5, 1.5)), batch 1; `--networks` picks some. Variants: the unfolded export; foldkit with `--skip branches`
(every Conv+BN folded, the identity BN and the parallel convolutions kept: what the other tools
reach at best); foldkit (branches merged); the package's own deploy-mode model (the reference).
Also the BN and Conv counts each comparison tool leaves. Writes benchmarks/results/reparam.md.
"""

import contextlib
import copy
import io
import os
import subprocess
import sys
import warnings
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
FOLDKIT = os.path.join(os.path.dirname(sys.executable), "foldkit")


def networks():
    import torch

    from tests.test_real_reparam import _realistic_bn

    out = {}
    try:
        import repvgg_pytorch as rp

        with contextlib.redirect_stdout(io.StringIO()):
            train = _realistic_bn(rp.get_RepVGG_func_by_name("RepVGG-A0")(deploy=False))
        out["RepVGG-A0"] = (train, rp.repvgg_model_convert(copy.deepcopy(train), do_copy=False).eval())
    except ImportError:
        print("repvgg-pytorch not installed: pip install --no-deps repvgg-pytorch", file=sys.stderr)
    try:
        import mobileone_pytorch as mo

        train = _realistic_bn(mo.mobileone_s0())
        out["MobileOne-S0"] = (train, copy.deepcopy(train).reparametrize().eval())
    except ImportError:
        print("mobileone-pytorch not installed: pip install --no-deps mobileone-pytorch", file=sys.stderr)
    try:
        from tests.third_party import import_timm

        timm = import_timm()
        from timm.utils.model import reparameterize_model

        for label, name in (("FastViT-T8", "fastvit_t8"), ("RepViT-M0.9", "repvit_m0_9")):
            torch.manual_seed(0)
            train = _realistic_bn(timm.create_model(name, pretrained=False), layer_scales=True)
            out[label] = (train, reparameterize_model(copy.deepcopy(train)).eval())
    except ImportError as e:
        print(f"{e}: pip install --no-deps timm==1.0.29", file=sys.stderr)
    del torch
    return out


def export(module, size, path):
    import torch

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(1, 3, size, size),), path, dynamo=False, opset_version=17,
                          do_constant_folding=False, input_names=["input"], output_names=["output"])


def counts(path):
    import onnx

    c = Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node)
    return c["BatchNormalization"], c["Conv"], c["Add"] + c["Sum"] + c["ReduceSum"]


def main():
    from fold_speed import SNIPPETS

    from foldkit.bench import BenchConfig, run_bench
    from foldkit.bench.core import to_markdown

    from options import latency_parser

    ap = latency_parser("reparam")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--networks", default=None, help="comma-separated subset, e.g. FastViT-T8,RepViT-M0.9")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    md = ["# Re-parameterizable networks exported unmerged", "",
          f"`python benchmarks/reparam.py --size {args.size} --iters {args.iters} --runtime {args.runtime}`", ""]
    chosen = set(args.networks.split(",")) if args.networks else None
    for name, (train, deploy) in networks().items():
        if chosen is not None and name not in chosen:
            continue
        orig = os.path.join(args.out, f"{name}.onnx")
        export(train, args.size, orig)
        ref = os.path.join(args.out, f"{name}.deploy.onnx")
        export(deploy, args.size, ref)
        unmerged = os.path.join(args.out, f"{name}.foldkit-skip-branches.onnx")
        subprocess.run([FOLDKIT, "fold", orig, "-o", unmerged, "--skip", "branches", "-q"], check=True)
        merged = os.path.join(args.out, f"{name}.foldkit.onnx")
        subprocess.run([FOLDKIT, "fold", orig, "-o", merged, "-q"], check=True)
        table = ["| variant | BN left | Conv | Add/Sum/ReduceSum |", "|---|---|---|---|"]
        for label, path in (("unfolded export", orig), ("foldkit --skip branches", unmerged), ("foldkit", merged),
                            ("package's deploy model", ref)):
            table.append(f"| {label} | " + " | ".join(map(str, counts(path))) + " |")
        for tool in ("onnxoptimizer", "onnxscript", "ort-offline"):
            dst = os.path.join(args.out, f"{name}.{tool}.onnx")
            p = subprocess.run([sys.executable, "-c", SNIPPETS[tool], orig, dst], capture_output=True, text=True)
            if p.returncode == 0:
                table.append(f"| {tool} | " + " | ".join(map(str, counts(dst))) + " |")
        res = run_bench(BenchConfig(models=[orig, unmerged, merged, ref], runtimes=args.runtime.split(","),
                                    ort_opt_levels=["disable", "all"], warmup=args.warmup, iters=args.iters,
                                    threads=args.threads))
        md += [f"## {name}, batch 1, {args.size}x{args.size}", ""] + table + ["", to_markdown(res)]
        print("\n".join(md[-len(table) - 4:]), flush=True)
    results = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, "reparam.md" if chosen is None else f"reparam_{'_'.join(sorted(chosen))}.md"),
              "w") as f:
        f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
