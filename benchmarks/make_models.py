"""Models for the fold-speed benchmark: ResNet-50 (exported from models/) and synthetic giants.

    python benchmarks/make_models.py OUT_DIR

- resnet50.onnx      ResNet-50, unfolded (~98 MB, 53 BN), from models/resnet.py via foldkit export
- wide_1p5gb.onnx    40 x (Conv 1024x1024x3x3 + BN + Relu), single file (~1.5 GB)
- wide_2p3gb.onnx    60 layers with external data (wide_2p3gb.onnx.data, ~2.3 GB)
"""

import os
import subprocess
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wide_model(layers: int, channels: int = 1024, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits, cur = [], [], "input"
    c = channels
    scale = np.float32(1.0 / np.sqrt(9 * c))
    for i in range(layers):
        w = rng.standard_normal((c, c, 3, 3), dtype=np.float32)
        w *= scale
        inits.append(numpy_helper.from_array(w, f"conv{i}.weight"))
        del w
        for name, arr in (("scale", rng.normal(1, .2, c)), ("B", rng.normal(0, .2, c)),
                          ("mean", rng.normal(0, .5, c)), ("var", rng.uniform(.3, 2, c))):
            inits.append(numpy_helper.from_array(arr.astype(np.float32), f"bn{i}.{name}"))
        nodes += [helper.make_node("Conv", [cur, f"conv{i}.weight"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"),
                  helper.make_node("BatchNormalization", [f"c{i}"] + [f"bn{i}.{k}" for k in ("scale", "B", "mean", "var")],
                                   [f"b{i}"], name=f"bn{i}"),
                  helper.make_node("Relu", [f"b{i}"], [f"r{i}" if i < layers - 1 else "output"])]
        cur = f"r{i}"
    g = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, c, 8, 8])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, c, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def main(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    r50 = os.path.join(out_dir, "resnet50.onnx")
    if not os.path.exists(r50):
        subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), "export", "--model",
                        os.path.join(ROOT, "models", "resnet.py") + ":resnet50", "--input-shape", "1,3,224,224",
                        "--no-fold", "-q", "-o", r50], check=True)
    big = os.path.join(out_dir, "wide_1p5gb.onnx")
    if not os.path.exists(big):
        onnx.save(wide_model(40), big)
    huge = os.path.join(out_dir, "wide_2p3gb.onnx")
    if not os.path.exists(huge):
        onnx.save(wide_model(60, seed=1), huge, save_as_external_data=True, location="wide_2p3gb.onnx.data",
                  size_threshold=1024)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "benchmarks", "out"))
