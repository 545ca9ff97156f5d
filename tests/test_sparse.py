"""Sparse initializers are constants like any other: BN parameters or a pruned conv weight stored
sparse fold exactly as their dense twins do, a bad sparse layout is a one-line exit 2 naming the
tensor, and the checker view types them (onnx's own full check fails on a valid sparse weight)."""

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

import foldkit
from foldkit.cli import main
from tests.helpers import conv_bn_model, ort_run, random_feeds


def _sparse(model, names, coordinates=False, prune=0.0):
    """``model`` with the initializers ``names`` stored as sparse initializers (linear indices, or
    [NNZ, rank] coordinates); ``prune`` zeroes that fraction of the conv weight W first."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = []
    for t in m.graph.initializer:
        if t.name not in names:
            keep.append(t)
            continue
        a = numpy_helper.to_array(t).copy()
        if prune and t.name == "W":
            a[np.abs(a) < np.quantile(np.abs(a), prune)] = 0
        nz = np.nonzero(a.reshape(-1))[0]
        idx = np.stack(np.unravel_index(nz, a.shape), axis=1) if coordinates else nz
        m.graph.sparse_initializer.append(helper.make_sparse_tensor(
            numpy_helper.from_array(a.reshape(-1)[nz], t.name), numpy_helper.from_array(idx.astype(np.int64), t.name + "_i"),
            list(a.shape)))
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return m


def _dense_twin(sparse):
    """The same model with every sparse initializer written dense (the reference)."""
    m = onnx.ModelProto()
    m.CopyFrom(sparse)
    for sp in m.graph.sparse_initializer:
        dense = np.zeros(int(np.prod(sp.dims)), numpy_helper.to_array(sp.values).dtype)
        idx = numpy_helper.to_array(sp.indices)
        lin = np.ravel_multi_index(tuple(idx.T), list(sp.dims)) if idx.ndim == 2 else idx
        dense[lin] = numpy_helper.to_array(sp.values)
        m.graph.initializer.append(numpy_helper.from_array(dense.reshape(list(sp.dims)), sp.values.name))
    del m.graph.sparse_initializer[:]
    return m


BN = ["bn_scale", "bn_B", "bn_mean", "bn_var"]


def test_conv_bn_names():
    assert set(BN) <= {t.name for t in conv_bn_model().graph.initializer}


@pytest.mark.parametrize("coordinates", [False, True])
@pytest.mark.parametrize("which", ["bn", "weight", "all"])
def test_sparse_initializers_fold_as_their_dense_twins(which, coordinates):
    base = conv_bn_model(seed=7)
    names = {"bn": BN, "weight": ["W"], "all": BN + ["W", "Bc"]}[which]
    sparse = _sparse(base, names, coordinates, prune=0.5 if "W" in names else 0.0)
    dense = _dense_twin(sparse)
    got, want = foldkit.fold(sparse, verify=False).model, foldkit.fold(dense, verify=False).model
    assert sum(n.op_type == "BatchNormalization" for n in got.graph.node) == 0
    def weights(m):  # the Conv's weight and bias, by position (a sparse original is not rewritten in place)
        inits = {t.name: t for t in m.graph.initializer}
        (conv,) = [n for n in m.graph.node if n.op_type == "Conv"]
        return [numpy_helper.to_array(inits[n]).tobytes() for n in conv.input[1:]]

    assert weights(got) == weights(want)  # the same folded bytes, rounded once
    assert len(got.graph.sparse_initializer) == 0  # the sparse originals were released
    onnx.checker.check_model(got, full_check=True)
    feeds = random_feeds(sparse)
    ref = ort_run(sparse, feeds)[0]
    np.testing.assert_allclose(ort_run(got, feeds)[0], ref, rtol=1e-5, atol=1e-5)


def test_a_sparse_weight_nothing_reads_is_kept_and_the_checker_view_types_it(tmp_path):
    m = _sparse(conv_bn_model(seed=2), ["W"], prune=0.5)
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p))
    with pytest.raises(Exception, match="weight tensor"):  # onnx's own full check does not type it
        onnx.checker.check_model(m, full_check=True)
    r = CliRunner().invoke(main, ["check", str(p), "--format", "json"])
    assert "FK006" not in r.output and "FK001" in r.output, r.output
    r = CliRunner().invoke(main, ["fold", str(p), "-o", str(tmp_path / "f.onnx"), "--skip", "producer",
                                  "--skip", "consumer", "--skip", "lower"])
    assert r.exit_code == 0, r.output
    out = onnx.load(str(tmp_path / "f.onnx"))
    assert [sp.values.name for sp in out.graph.sparse_initializer] == ["W"]


@pytest.mark.parametrize("index, coordinates", [(10 ** 6, False), (-1, False), (99, True)])
def test_a_sparse_index_outside_the_dims_is_one_line_exit_2(tmp_path, index, coordinates):
    m = _sparse(conv_bn_model(seed=3), BN, coordinates)
    sp = m.graph.sparse_initializer[0]
    idx = numpy_helper.to_array(sp.indices).copy()
    idx.flat[0] = index
    sp.indices.CopyFrom(numpy_helper.from_array(idx, sp.indices.name))
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p))
    r = CliRunner().invoke(main, ["fold", str(p), "-o", str(tmp_path / "f.onnx")])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "sparse initializer 'bn_scale'" in r.output, r.output
    assert not (tmp_path / "f.onnx").exists()
