"""Tiny Keras 3 and tf_keras networks exported by tf2onnx 1.17: the committed corpus of
tests/data/exporters (tests/test_exporters.py), and with --full the full-size Keras applications for
benchmarks/exporters/compare.py.

Run in a venv of its own (TensorFlow is never a foldkit dependency):

    python3 -m venv /tmp/venv-tf
    /tmp/venv-tf/bin/pip install "tensorflow-cpu==2.21.*" "tf2onnx==1.17.*" "tf_keras==2.21.*"
    /tmp/venv-tf/bin/python benchmarks/exporters/tf_corpus.py [--full DIR]

Random weights, realistic BN statistics (moving mean ~ N(0, 0.5), variance in [0.5, 1.5), gamma ~
1 + N(0, 0.3), beta ~ N(0, 0.3)), fixed seeds: the same files on every run of the same versions.
Each network is written twice: with tf2onnx's own optimizer (the default) and without it
(`optimizers={}`: the raw NHWC layout, Transposes around every op).
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.path.dirname(os.path.dirname(HERE)), "tests", "data", "exporters")


def realistic(model, np, seed=0):
    r = np.random.default_rng(seed)
    for layer in model.layers:
        if "BatchNormalization" in type(layer).__name__:
            w = layer.get_weights()
            c = w[-1].shape[0]
            new = []
            names = [v.name for v in layer.weights]
            for name, v in zip(names, w):
                if "gamma" in name:
                    new.append((1 + 0.3 * r.standard_normal(c)).astype(v.dtype))
                elif "beta" in name:
                    new.append((0.3 * r.standard_normal(c)).astype(v.dtype))
                elif "mean" in name:
                    new.append((0.5 * r.standard_normal(c)).astype(v.dtype))
                else:
                    new.append((0.5 + r.random(c)).astype(v.dtype))
            layer.set_weights(new)
    return model


def tiny(k):
    """Conv + BN + ReLU, depthwise + BN, 1x1 + BN with a residual Add, Conv1D + BN, Dense + BN."""
    L = k.layers
    x = inp = L.Input((16, 16, 3), batch_size=1)
    x = L.Conv2D(8, 3, padding="same", use_bias=False)(x)
    x = L.ReLU()(L.BatchNormalization()(x))
    y = L.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    y = L.ReLU()(L.BatchNormalization()(y))
    y = L.BatchNormalization()(L.Conv2D(8, 1)(y))
    x = L.Add()([x, y])
    x = L.GlobalAveragePooling2D()(x)
    x = L.BatchNormalization()(L.Dense(6)(x))
    cnn = k.Model(inp, x)
    s = inp1 = L.Input((32, 4), batch_size=1)
    s = L.ReLU()(L.BatchNormalization()(L.Conv1D(8, 3, padding="same")(s)))
    s = L.BatchNormalization()(L.Conv1D(8, 3, padding="same")(s))
    conv1d = k.Model(inp1, s)
    return {"cnn": cnn, "conv1d": conv1d}


def full(k):
    apps = k.applications
    return {"mobilenet_v3_small": apps.MobileNetV3Small(weights=None, input_shape=(224, 224, 3)),
            "mobilenet_v2": apps.MobileNetV2(weights=None, input_shape=(224, 224, 3)),
            "resnet50": apps.ResNet50(weights=None, input_shape=(224, 224, 3)),
            "inception_v3": apps.InceptionV3(weights=None, input_shape=(299, 299, 3))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", default=None, help="write the full-size applications here instead")
    args = ap.parse_args()
    import numpy as np
    import tensorflow as tf
    import tf2onnx
    import keras
    import tf_keras

    out = args.full or OUT
    os.makedirs(out, exist_ok=True)
    for lib, k in (("keras3", keras), ("tf_keras", tf_keras)):
        nets = full(k) if args.full else tiny(k)
        for seed, (name, model) in enumerate(sorted(nets.items())):
            tf.random.set_seed(seed)
            np.random.seed(seed)
            realistic(model, np, seed)
            spec = [tf.TensorSpec((1,) + tuple(model.inputs[0].shape[1:]), tf.float32, name="input")]
            for tag, opts in (("", None), (".raw", {})):
                path = os.path.join(out, f"tf2onnx_{lib}_{name}{tag}.onnx")
                kw = {} if opts is None else {"optimizers": opts}
                tf2onnx.convert.from_keras(model, input_signature=spec, opset=17, output_path=path, **kw)
                print(path, os.path.getsize(path), file=sys.stderr)


if __name__ == "__main__":
    main()
