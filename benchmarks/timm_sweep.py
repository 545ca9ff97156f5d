"""Real network definitions from timm (random weights, realistic BN statistics and layer scales),
exported by torch.onnx unfolded and folded by `foldkit fold` as users run it: exit code, BN before
and after, per-channel maps left, branch merges, and the folded model against PyTorch.

    python benchmarks/timm_sweep.py [NAME ...]   ->  benchmarks/results/timm_sweep.md

timm is installed by `make` (--no-deps; tests/third_party.py stands in for torchvision). Inputs are
96x96 for convolutional networks and 224x224 for those with attention or fixed position tables.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FOLDKIT = os.path.join(os.path.dirname(sys.executable), "foldkit")
DEFAULT = ["resnet18", "mobilenetv3_small_050", "efficientnet_b0", "regnetx_002", "ghostnet_100", "repghostnet_050",
           "mobileone_s0", "repvgg_a0", "convnext_atto", "mobilevit_xxs", "efficientvit_b0", "levit_128s",
           "hrnet_w18_small", "dla34", "densenet121", "inception_v3", "cspresnet50", "rexnet_100", "tinynet_e",
           "mixnet_s", "fastvit_t8", "fastvit_sa12", "repvit_m0_9"]
FULL_SIZE = ("levit", "vit", "efficientvit", "fastvit", "mobilevit")


def main():
    import numpy as np
    import onnxruntime as ort
    import torch

    from tests.test_real_reparam import _realistic_bn
    from tests.third_party import import_timm

    timm = import_timm()
    names = sys.argv[1:] or DEFAULT
    rows = ["| network | input | exit | BN before -> after | maps left | branch merges | max rel err vs PyTorch | fold s |",
            "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            torch.manual_seed(0)
            model = _realistic_bn(timm.create_model(name, pretrained=False, num_classes=10), layer_scales=True)
            size = 224 if any(k in name for k in FULL_SIZE) else 96
            x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
            src, dst, rep = (os.path.join(tmp, f"{name}{s}") for s in (".onnx", ".folded.onnx", ".json"))
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (x,), src, dynamo=False, opset_version=17, do_constant_folding=False)
            t = time.perf_counter()
            p = subprocess.run([FOLDKIT, "fold", src, "-o", dst, "--report", rep, "-q"], capture_output=True, text=True)
            wall = time.perf_counter() - t
            if p.returncode != 0:
                rows.append(f"| {name} | {size} | {p.returncode} | | | | {p.stderr.strip()[:80]} | {wall:.2f} |")
                continue
            r = json.load(open(rep))
            with torch.no_grad():
                ref = model(x).numpy()
            s = ort.InferenceSession(dst, providers=["CPUExecutionProvider"])
            out = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
            err = float(np.abs(out - ref).max() / max(float(np.abs(ref).max()), 1e-30))
            left = sum(a["action"] == "kept" for a in r["affine_actions"])
            merged = sum(a["action"] == "merged" for a in r["branch_actions"])
            rows.append(f"| {name} | {size} | 0 | {r['bn_before']} -> {r['bn_after']} | {left} | {merged} | {err:.1e} | {wall:.2f} |")
            print(rows[-1], flush=True)
    import timm as t_

    md = ["# timm networks, exported unfolded and folded", "", "`python benchmarks/timm_sweep.py`", ""] + rows + [
        "", f"timm {t_.__version__}, torch {torch.__version__}, onnxruntime {ort.__version__}; fold s: the whole "
        "`foldkit fold` process (verified), on this machine."]
    with open(os.path.join(ROOT, "benchmarks", "results", "timm_sweep.md"), "w") as f:
        f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
