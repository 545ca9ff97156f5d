"""Property tests: the arithmetic on its own, and random Conv/BN chains on ONNX Runtime."""

from types import SimpleNamespace

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from foldkit.math import bn_scale_shift, fold_into_conv_consumer, fold_into_producer
from tests.helpers import F32, fold_and_compare, make_model, tensor

finite = st.floats(-4, 4, allow_nan=False, width=64)


@st.composite
def bn_params(draw, c):
    g = np.array(draw(st.lists(finite, min_size=c, max_size=c)))
    b = np.array(draw(st.lists(finite, min_size=c, max_size=c)))
    m = np.array(draw(st.lists(finite, min_size=c, max_size=c)))
    v = np.array(draw(st.lists(st.floats(0.01, 10), min_size=c, max_size=c)))
    return g, b, m, v


@settings(max_examples=60, deadline=None)
@given(data=st.data(), c=st.integers(1, 6), k=st.integers(1, 5), n=st.integers(1, 4))
def test_producer_fold_equals_bn_after_linear(data, c, k, n):
    """For a 1x1 conv (a matmul per pixel): BN(W x + b) == W' x + b' in float64."""
    g, b_, m, v = data.draw(bn_params(c))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    w = rng.standard_normal((c, k, 1, 1))
    b = rng.standard_normal(c)
    x = rng.standard_normal((n, k))
    s, t = bn_scale_shift(g, b_, m, v, 1e-5)
    z = x @ w[:, :, 0, 0].T + b
    expected = g * (z - m) / np.sqrt(v + 1e-5) + b_
    w2, b2 = fold_into_producer(w, b, s, t, "conv")
    np.testing.assert_allclose(x @ w2[:, :, 0, 0].T + b2, expected, rtol=1e-10, atol=1e-10)


@st.composite
def grouped_1x1(draw, bn_side):
    """A grouped 1x1 layer's layout (groups, channels per group in and out, in all), BN parameters
    for its ``bn_side`` ("in" or "out") channels and a seeded generator."""
    groups, cpg_in, cpg_out = (draw(st.integers(1, 3)) for _ in range(3))
    c_in, c_out = groups * cpg_in, groups * cpg_out
    bn = draw(bn_params(c_in if bn_side == "in" else c_out))
    return SimpleNamespace(groups=groups, cpg_in=cpg_in, cpg_out=cpg_out, c_in=c_in, c_out=c_out, bn=bn,
                           rng=np.random.default_rng(draw(st.integers(0, 2**16))))


def block_diagonal(x, layer, block):
    """A grouped 1x1 layer as a block-diagonal matmul: group ``gi`` maps its input channels of
    ``x`` by ``block(gi)`` (cpg_in x cpg_out) to its output channels."""
    y = np.zeros((x.shape[0], layer.c_out))
    for gi in range(layer.groups):
        y[:, gi * layer.cpg_out:(gi + 1) * layer.cpg_out] = x[:, gi * layer.cpg_in:(gi + 1) * layer.cpg_in] @ block(gi)
    return y


@settings(max_examples=60, deadline=None)
@given(layer=grouped_1x1("out"))
def test_conv_transpose_layout(layer):
    """ConvTranspose 1x1 with groups as a block-diagonal matmul: the scale must land on the right columns."""
    w = layer.rng.standard_normal((layer.c_in, layer.cpg_out, 1, 1))
    x = layer.rng.standard_normal((3, layer.c_in))

    def convt(w, b):  # ConvTranspose weights are (in, out per group): group gi's rows
        return block_diagonal(x, layer, lambda gi: w[gi * layer.cpg_in:(gi + 1) * layer.cpg_in, :, 0, 0]) + b

    s, t = bn_scale_shift(*layer.bn, 1e-3)
    w2, b2 = fold_into_producer(w, None, s, t, "conv_transpose", layer.groups)
    np.testing.assert_allclose(convt(w2, b2), s * convt(w, 0) + t, rtol=1e-10, atol=1e-10)


@settings(max_examples=60, deadline=None)
@given(layer=grouped_1x1("in"))
def test_consumer_fold_grouped(layer):
    """A BN before a grouped 1x1 Conv folded into it: each group's weights take its own channels' scale."""
    w = layer.rng.standard_normal((layer.c_out, layer.cpg_in, 1, 1))
    b = layer.rng.standard_normal(layer.c_out)
    x = layer.rng.standard_normal((3, layer.c_in))

    def conv(x, w, b):  # Conv weights are (out, in per group): group gi's rows, transposed
        return block_diagonal(x, layer, lambda gi: w[gi * layer.cpg_out:(gi + 1) * layer.cpg_out, :, 0, 0].T) + b

    s, t = bn_scale_shift(*layer.bn, 1e-5)
    w2, b2 = fold_into_conv_consumer(w, b, s, t, layer.groups)
    np.testing.assert_allclose(conv(x, w2, b2), conv(s * x + t, w, b), rtol=1e-9, atol=1e-9)


@st.composite
def conv_bn_chain(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    nodes, inits, cur = [], [], "X"
    c_cur = 3
    for i in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["conv", "bn", "relu", "convT"]))
        out = f"t{i}"
        if op in ("conv", "convT"):
            group = draw(st.sampled_from([g for g in (1, 2, 3) if c_cur % g == 0]))
            c_new = group * draw(st.integers(1, 2))
            k = draw(st.sampled_from([1, 3]))
            shape = (c_new, c_cur // group, k, k) if op == "conv" else (c_cur, c_new // group, k, k)
            inits.append(tensor(f"w{i}", rng.standard_normal(shape).astype(np.float32)))
            ins = [cur, f"w{i}"]
            if draw(st.booleans()):
                inits.append(tensor(f"b{i}", rng.standard_normal(c_new).astype(np.float32)))
                ins.append(f"b{i}")
            pads = [k // 2] * 4
            nodes.append(helper.make_node("Conv" if op == "conv" else "ConvTranspose", ins, [out], group=group, pads=pads))
            c_cur = c_new
        elif op == "bn":
            arrs = [rng.normal(1, .3, c_cur), rng.normal(0, .5, c_cur), rng.normal(0, .5, c_cur), rng.uniform(.2, 2, c_cur)]
            names = [f"bn{i}_{k}" for k in range(4)]
            inits += [tensor(n, a.astype(np.float32)) for n, a in zip(names, arrs)]
            nodes.append(helper.make_node("BatchNormalization", [cur] + names, [out]))
        else:
            nodes.append(helper.make_node("Relu", [cur], [out]))
        cur = out
    nodes.append(helper.make_node("Identity", [cur], ["Y"]))
    return make_model(nodes, [("X", F32, [1, 3, 4, 4])], [("Y", F32, None)], inits)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_bn_chain())
def test_random_chains(model):
    from tests.helpers import op_count
    import foldkit
    res = foldkit.fold(model, verify=False)
    fold_and_compare(model, rtol=1e-5, atol=1e-5, bn_after=op_count(res.model, "BatchNormalization"))
    # a BN right after a Conv/ConvTranspose never survives
    producers = {n.output[0]: n.op_type for n in res.model.graph.node}
    for n in res.model.graph.node:
        if n.op_type == "BatchNormalization":
            assert producers.get(n.input[0]) not in ("Conv", "ConvTranspose")


def test_blocked_scaling_is_bit_identical_to_the_plain_formula():
    """The cache-blocked kernel used for big weights computes the same float64 products and the
    same single rounding as output_channel_scale + round_to."""
    import foldkit.math as fm
    rng = np.random.default_rng(3)
    for shape, dtype in (((300, 40, 3, 3), np.float32), ((257, 1100), np.float32), ((64, 32, 5, 5), np.float16)):
        w = rng.standard_normal(shape).astype(dtype)
        s = rng.uniform(0.1, 3, shape[0])
        old = fm.BLOCK_ELEMENTS
        fm.BLOCK_ELEMENTS = 1024  # force several blocks
        try:
            blocked = fm.scale_output_channels_rounded(w, s, "conv", 1, dtype)
        finally:
            fm.BLOCK_ELEMENTS = old
        plain = fm.round_to(fm.output_channel_scale(w.astype(np.float64), s, "conv", 1), dtype)
        assert blocked.dtype == dtype and np.array_equal(blocked, plain)


def test_blocked_scaling_refuses_overflow():
    import pytest
    import foldkit.math as fm
    w = np.full((64, 64, 3, 3), 60000, np.float16)
    old = fm.BLOCK_ELEMENTS
    fm.BLOCK_ELEMENTS = 256
    try:
        with pytest.raises(fm.FoldArithmeticError, match="overflows float16"):
            fm.scale_output_channels_rounded(w, np.full(64, 2.0), "conv", 1, np.float16)
    finally:
        fm.BLOCK_ELEMENTS = old


SPECIAL = st.sampled_from([0.0, -0.0, 1.0, -2.5, 6e4, -6.5e4, 3e38, -3.3e38, 1e-40, np.inf, -np.inf, np.nan])


@settings(max_examples=150, deadline=None)
@given(data=st.data(), kind=st.sampled_from(["conv", "rows", "cols"]),
       dtype=st.sampled_from([np.float16, np.float32, np.float64]),
       rows=st.integers(1, 9), cols=st.integers(1, 9), block=st.integers(1, 20))
def test_scaled_channels_match_round_to_exactly(data, kind, dtype, rows, cols, block):
    """ScaledChannels (the streamed kernel for big weights) refuses exactly when round_to refuses,
    with its row-maxima overflow check, and otherwise gives the same bits, whatever the values:
    Inf, NaN, subnormals, values near the dtype's limit, scales that overflow float64."""
    import pytest
    import foldkit.math as fm
    shape = (rows, cols, 2) if kind == "conv" else (rows, cols)
    n = int(np.prod(shape))
    with np.errstate(over="ignore"):
        w = np.array(data.draw(st.lists(st.one_of(SPECIAL, finite), min_size=n, max_size=n))).astype(dtype).reshape(shape)
    c = cols if kind == "cols" else rows
    s = np.array(data.draw(st.lists(st.one_of(finite, st.sampled_from([1e-3, 7e4, 1e35, 1e300, -1e300])),
                                    min_size=c, max_size=c)))
    old = fm.BLOCK_ELEMENTS
    fm.BLOCK_ELEMENTS = block
    try:
        try:
            with np.errstate(all="ignore"):
                product = fm.output_channel_scale(w.astype(np.float64), s, kind, 1)
            plain = fm.round_to(product, dtype)
        except fm.FoldArithmeticError:
            plain = None
        recipe = fm.ScaledChannels(w, s, kind, dtype)
        if plain is None:
            with pytest.raises(fm.FoldArithmeticError):
                recipe.check()
            return
        recipe.check()
        streamed = np.concatenate([b.copy() for b in recipe.blocks()]) if rows else recipe.array()
    finally:
        fm.BLOCK_ELEMENTS = old
    assert streamed.tobytes() == plain.tobytes()
    assert recipe.array().tobytes() == plain.tobytes()
