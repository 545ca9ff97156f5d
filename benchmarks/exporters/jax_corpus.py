"""Tiny Flax (nnx) and plain-JAX networks exported by jax2onnx 0.17.1: part of the committed corpus
of tests/data/exporters (tests/test_exporters.py).

Run in a venv of its own (JAX is never a foldkit dependency):

    python3 -m venv /tmp/venv-jax
    /tmp/venv-jax/bin/pip install jax flax "jax2onnx==0.17.1"
    /tmp/venv-jax/bin/python benchmarks/exporters/jax_corpus.py

- flax_cnn: nnx.Conv + nnx.BatchNorm (inference: running averages) + relu, twice, NHWC as Flax
  computes (jax2onnx writes a Transpose to NCHW, native BatchNormalization nodes, and a Transpose
  back; its normalization modes give the same file here);
- jax_cnn: plain jax.lax convolutions with BN written out in primitives,
  ``(x - mean) * rsqrt(var + eps) * gamma + beta``, on constants.
Random weights, realistic BN statistics, fixed seeds, opset 17.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.path.dirname(os.path.dirname(HERE)), "tests", "data", "exporters")


def main():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax2onnx import to_onnx
    import onnx

    os.makedirs(OUT, exist_ok=True)
    r = np.random.default_rng(0)

    def stats(bn, c):
        bn.scale.value = jnp.asarray(1 + 0.3 * r.standard_normal(c), jnp.float32)
        bn.bias.value = jnp.asarray(0.3 * r.standard_normal(c), jnp.float32)
        bn.mean.value = jnp.asarray(0.5 * r.standard_normal(c), jnp.float32)
        bn.var.value = jnp.asarray(0.5 + r.random(c), jnp.float32)

    class CNN(nnx.Module):
        def __init__(self, rngs):
            self.c1 = nnx.Conv(3, 8, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
            self.b1 = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
            self.c2 = nnx.Conv(8, 8, (3, 3), padding="SAME", rngs=rngs)
            self.b2 = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.b1(self.c1(x)))
            return nnx.relu(self.b2(self.c2(x)))

    net = CNN(nnx.Rngs(0))
    stats(net.b1, 8)
    stats(net.b2, 8)
    m = to_onnx(net, [(1, 16, 16, 3)], opset=17, model_name="flax_cnn")
    path = os.path.join(OUT, "jax2onnx_flax_cnn.onnx")
    onnx.save(m, path)
    print(path, os.path.getsize(path), file=sys.stderr)

    w1 = jnp.asarray(0.3 * r.standard_normal((8, 3, 3, 3)), jnp.float32)
    w2 = jnp.asarray(0.3 * r.standard_normal((8, 8, 3, 3)), jnp.float32)
    bn = [tuple(jnp.asarray(a, jnp.float32) for a in (1 + 0.3 * r.standard_normal(8), 0.3 * r.standard_normal(8),
                                                      0.5 * r.standard_normal(8), 0.5 + r.random(8)))
          for _ in range(2)]

    def plain(x):  # NCHW, BN in primitives on constants
        for w, (g, b, mu, var) in zip((w1, w2), bn):
            x = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME")
            sh = (1, -1, 1, 1)
            x = (x - mu.reshape(sh)) * jax.lax.rsqrt(var.reshape(sh) + 1e-5) * g.reshape(sh) + b.reshape(sh)
            x = jax.nn.relu(x)
        return x

    m = to_onnx(plain, [(1, 3, 16, 16)], opset=17, model_name="jax_cnn")
    path = os.path.join(OUT, "jax2onnx_jax_cnn.onnx")
    onnx.save(m, path)
    print(path, os.path.getsize(path), file=sys.stderr)


if __name__ == "__main__":
    main()
