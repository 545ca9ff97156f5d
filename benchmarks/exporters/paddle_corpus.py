"""Tiny PaddlePaddle networks exported by paddle2onnx 2.1.0: part of the committed corpus of
tests/data/exporters (tests/test_exporters.py).

paddle2onnx pins onnx 1.17, so it gets a venv of its own (Paddle is never a foldkit dependency):

    python3 -m venv /tmp/venv-paddle
    /tmp/venv-paddle/bin/pip install "paddlepaddle==3.3.1" "paddle2onnx==2.1.0" packaging
    /tmp/venv-paddle/bin/python benchmarks/exporters/paddle_corpus.py

paddle_cnn: Conv2D + BatchNorm2D + ReLU, a depthwise Conv2D + BatchNorm2D, a residual Add, pooling,
Linear + BatchNorm1D; paddle_conv1d: Conv1D + BatchNorm1D twice. Each saved with paddle.jit.save
in eval mode and exported at opset 17 (with or without paddle2onnx's optimizer, the same file: its
constant folding runs either way). Random weights, realistic BN statistics, fixed seeds.
"""

import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.path.dirname(os.path.dirname(HERE)), "tests", "data", "exporters")


def main():
    import numpy as np
    import paddle
    import paddle2onnx
    from paddle import nn

    paddle.seed(0)
    r = np.random.default_rng(0)

    class CNN(nn.Layer):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2D(3, 8, 3, padding=1, bias_attr=False), nn.BatchNorm2D(8)
            self.c2, self.b2 = nn.Conv2D(8, 8, 3, padding=1, groups=8, bias_attr=False), nn.BatchNorm2D(8)
            self.fc, self.b3 = nn.Linear(8, 6), nn.BatchNorm1D(6)

        def forward(self, x):
            x = nn.functional.relu(self.b1(self.c1(x)))
            x = x + self.b2(self.c2(x))
            x = paddle.mean(x, axis=[2, 3])
            return self.b3(self.fc(x))

    class Conv1D(nn.Layer):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv1D(4, 8, 3, padding=1), nn.BatchNorm1D(8)
            self.c2, self.b2 = nn.Conv1D(8, 8, 3, padding=1), nn.BatchNorm1D(8)

        def forward(self, x):
            return self.b2(self.c2(nn.functional.relu(self.b1(self.c1(x)))))

    for name, net, shape in (("cnn", CNN(), [1, 3, 16, 16]), ("conv1d", Conv1D(), [1, 4, 32])):
        for layer in net.sublayers():
            if isinstance(layer, (nn.BatchNorm1D, nn.BatchNorm2D)):
                c = layer.weight.shape[0]
                layer.weight.set_value((1 + 0.3 * r.standard_normal(c)).astype("float32"))
                layer.bias.set_value((0.3 * r.standard_normal(c)).astype("float32"))
                layer._mean.set_value((0.5 * r.standard_normal(c)).astype("float32"))
                layer._variance.set_value((0.5 + r.random(c)).astype("float32"))
        net.eval()
        with tempfile.TemporaryDirectory() as tmp:
            prefix = os.path.join(tmp, name)
            paddle.jit.save(net, prefix, input_spec=[paddle.static.InputSpec(shape, "float32", "x")])
            model = next(prefix + ext for ext in (".json", ".pdmodel") if os.path.exists(prefix + ext))
            path = os.path.join(OUT, f"paddle2onnx_{name}.onnx")
            paddle2onnx.export(model, prefix + ".pdiparams", path, opset_version=17)
            print(path, os.path.getsize(path), file=sys.stderr)


if __name__ == "__main__":
    main()
