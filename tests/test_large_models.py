"""Lazy loading (weights stay on disk), streaming writes, external data in and out.

Speed and peak-memory goals are measured by benchmarks/fold_speed.py, not asserted here.
"""

import io
import os
import re

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, numpy_helper

import foldkit
from foldkit.api import MemoryPolicy
from foldkit import io as fio
from foldkit.cli import main
from foldkit.wire import lazy_load, write_model
from tests.helpers import ort_run, random_feeds
from tests.helpers import conv_bn_model


def data_name(model_path):
    """The one external-data file the model at ``model_path`` names."""
    header = onnx.load(str(model_path), load_external_data=False)
    (loc,) = {e.value for t in header.graph.initializer for e in t.external_data if e.key == "location"}
    return loc


def _models():
    m1 = conv_bn_model(2, group=2)
    m1.doc_string = "d"
    onnx.helper.set_model_props(m1, {"k": "v"})
    m2 = conv_bn_model(3, transpose=True, group=3, c_in=6, c_out=6, spatial=3)
    return {"conv": m1, "convT": m2}


@pytest.mark.parametrize("name", ["conv", "convT"])
@pytest.mark.parametrize("threshold", [1, 64, 10 ** 9])
def test_lazy_load_and_write_are_byte_identical(tmp_path, name, threshold):
    m = _models()[name]
    p = tmp_path / "m.onnx"
    p.write_bytes(m.SerializeToString(deterministic=True))
    lazy = lazy_load(str(p), threshold)
    if threshold == 10 ** 9:
        assert lazy is None  # nothing to leave on disk: the caller loads normally
        return
    assert any(t.data_location == TensorProto.EXTERNAL for t in lazy.graph.initializer)
    buf = io.BytesIO()
    write_model(lazy, buf, str(tmp_path))
    assert buf.getvalue() == m.SerializeToString(deterministic=True)


def test_cli_fold_lazy_equals_in_memory_fold(tmp_path):
    m = conv_bn_model(2, group=2)
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p))
    out = tmp_path / "o.onnx"
    assert CliRunner().invoke(main, ["fold", str(p), "-o", str(out), "-q"]).exit_code == 0
    in_memory = foldkit.fold(m).model.SerializeToString(deterministic=True)
    assert out.read_bytes() == in_memory
    lazy = foldkit.fold(str(p), memory=MemoryPolicy(lazy=True))
    assert lazy.report.verification["passed"]
    # a weight the fold does not touch stays on disk until the model is saved
    m2 = conv_bn_model(2, group=2)
    m2.graph.node.append(onnx.helper.make_node("Conv", ["X", "W2"], ["Y2"]))
    m2.graph.initializer.append(numpy_helper.from_array(np.ones((32, 4, 3, 3), np.float32), "W2"))
    m2.graph.output.append(onnx.helper.make_tensor_value_info("Y2", TensorProto.FLOAT, [2, 32, 3, 3]))
    p2 = tmp_path / "m2.onnx"
    onnx.save(m2, str(p2))
    lazy2 = foldkit.fold(str(p2), memory=MemoryPolicy(lazy=True))
    assert [t.name for t in lazy2.model.graph.initializer if t.data_location == TensorProto.EXTERNAL] == ["W2"]
    lazy2.save(str(tmp_path / "o2.onnx"))
    assert (tmp_path / "o2.onnx").read_bytes() == foldkit.fold(m2).model.SerializeToString(deterministic=True)


def _external_input(tmp_path):
    m = conv_bn_model(2, c_in=16, c_out=32)
    p = tmp_path / "ext.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(m)  # onnx.save with external data rewrites the model it is given
    onnx.save(copy, str(p), save_as_external_data=True, location="ext.onnx.weights", size_threshold=64)
    return m, p


def test_fold_external_data_input(tmp_path):
    m, p = _external_input(tmp_path)
    out = tmp_path / "o.onnx"
    r = CliRunner().invoke(main, ["fold", str(p), "-o", str(out)])
    assert r.exit_code == 0 and "passed" in r.output, r.output
    folded = onnx.load(str(out))  # self-contained (small model: no external data by default)
    assert not any(True for _ in fio.external_tensors(folded))
    feeds = random_feeds(m)
    ref = ort_run(m, feeds)[0]
    np.testing.assert_allclose(ort_run(folded, feeds)[0], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_external_data_with_no_tensor_big_enough_writes_no_data_file_and_removes_the_old_one(tmp_path):
    """--external-data moves tensors of 1 KiB or more; a model with none gets no (empty) data file,
    and the data file of the pair it replaces, which nothing names any more, is removed."""
    big, p_big = _external_input(tmp_path)
    out = tmp_path / "o.onnx"
    assert CliRunner().invoke(main, ["fold", str(p_big), "-o", str(out), "--external-data", "-q"]).exit_code == 0
    old = tmp_path / data_name(out)
    assert old.exists()
    small = conv_bn_model(c_in=2, c_out=2, k=1, seed=3)  # every tensor under 1 KiB
    p_small = tmp_path / "small.onnx"
    onnx.save(small, str(p_small))
    r = CliRunner().invoke(main, ["fold", str(p_small), "-o", str(out), "--external-data", "-q"])
    assert r.exit_code == 0, r.output
    assert not old.exists() and not [f for f in os.listdir(tmp_path) if f.startswith("o.onnx.")]
    assert not [t for t in onnx.load(str(out)).graph.initializer if t.data_location == TensorProto.EXTERNAL]
    feeds = random_feeds(small)
    np.testing.assert_allclose(ort_run(onnx.load(str(out)), feeds)[0], ort_run(small, feeds)[0], rtol=1e-5, atol=1e-6)


def test_fold_external_data_output(tmp_path):
    m, p = _external_input(tmp_path)
    out = tmp_path / "o.onnx"
    r = CliRunner().invoke(main, ["fold", str(p), "-o", str(out), "--external-data", "-q"])
    assert r.exit_code == 0, r.output
    header = onnx.load(str(out), load_external_data=False)
    locs = {e.value for t in header.graph.initializer for e in t.external_data if e.key == "location"}
    assert len(locs) == 1 and re.fullmatch(r"o\.onnx\.[0-9a-f]{16}\.data", locs.pop())
    data = tmp_path / data_name(out)
    assert data.exists()
    offsets = [int(e.value) for t in header.graph.initializer for e in t.external_data if e.key == "offset"]
    assert all(o % 4096 == 0 for o in offsets)
    folded = onnx.load(str(out))
    feeds = random_feeds(m)
    ref = ort_run(m, feeds)[0]
    np.testing.assert_allclose(ort_run(folded, feeds)[0], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # the same folded model, externalised twice, gives identical bytes
    out2 = tmp_path / "o2.onnx"
    CliRunner().invoke(main, ["fold", str(p), "-o", str(out2), "--external-data", "-q"])
    assert data.read_bytes() == (tmp_path / data_name(out2)).read_bytes()
    assert data_name(out)[len("o.onnx"):] == data_name(out2)[len("o2.onnx"):]  # named after the content


def test_in_place_fold_of_lazy_model(tmp_path):
    m = conv_bn_model(2, c_in=16, c_out=32)
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p))
    r = CliRunner().invoke(main, ["fold", str(p), "-o", str(p), "--in-place", "-q"])
    assert r.exit_code == 0, r.output
    folded = onnx.load(str(p))
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_lazy_model_with_subgraph_initializers(tmp_path):
    """Subgraph initializers stay inside the skeleton; only top-level ones are left on disk."""
    from tests.helpers import _branch
    from tests.helpers import F32, make_model, rng, tensor
    r = rng(60)
    then_g = _branch("then", "W", "tb", r, "t_out")
    else_g = _branch("else", "W", "eb", r, "e_out")
    nodes = [onnx.helper.make_node("If", ["cond"], ["Y"], then_branch=then_g, else_branch=else_g)]
    m = make_model(nodes, [("cond", TensorProto.BOOL, []), ("X", F32, [1, 4, 5, 5])], [("Y", F32, [1, 6, 5, 5])],
                   [tensor("W", r.standard_normal((6, 4, 3, 3)).astype(np.float32))])
    p = tmp_path / "if.onnx"
    onnx.save(m, str(p))
    out = tmp_path / "o.onnx"
    res = CliRunner().invoke(main, ["fold", str(p), "-o", str(out), "--report", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert out.read_bytes() == foldkit.fold(m).model.SerializeToString(deterministic=True)


def test_deferred_payloads_give_identical_bytes(tmp_path, monkeypatch):
    """The CLI keeps folded tensors as arrays until writing (defer); the file must not change."""
    from foldkit.tensors import TensorStore
    monkeypatch.setattr(TensorStore, "DEFER_BYTES", 1)
    m = conv_bn_model(2, c_in=16, c_out=32)
    m.graph.node.append(onnx.helper.make_node("Conv", ["X", "W2"], ["Y2"]))
    m.graph.initializer.append(numpy_helper.from_array(np.ones((32, 16, 3, 3), np.float32), "W2"))
    m.graph.output.append(onnx.helper.make_tensor_value_info("Y2", TensorProto.FLOAT, [2, 32, 3, 3]))
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p))
    expected = foldkit.fold(m).model.SerializeToString(deterministic=True)
    for args in ([], ["--no-verify"], ["--external-data"]):
        out = tmp_path / f"o{len(args)}{args[0] if args else ''}.onnx"
        r = CliRunner().invoke(main, ["fold", str(p), "-o", str(out), "-q"] + args)
        assert r.exit_code == 0, r.output
        if args == ["--external-data"]:
            assert onnx.load(str(out)).graph.initializer[0].raw_data  # loads with its data file
        else:
            assert out.read_bytes() == expected
    res = foldkit.fold(str(p), verify=False, memory=MemoryPolicy(lazy=True, defer=True))
    from foldkit.wire import is_memory
    assert any(is_memory(t) for t in res.model.graph.initializer)
    res.materialize()
    assert not any(is_memory(t) for t in res.model.graph.initializer)


@pytest.mark.parametrize("verify", [False, True])
def test_spilled_payloads_give_identical_bytes_and_leave_nothing(tmp_path, monkeypatch, verify):
    from foldkit.tensors import TensorStore
    monkeypatch.setattr(TensorStore, "DEFER_BYTES", 1)
    m = conv_bn_model(2, c_in=16, c_out=32, group=2)
    src = tmp_path / "src"
    spill = tmp_path / "spill"
    src.mkdir()
    spill.mkdir()
    p = src / "m.onnx"
    onnx.save(m, str(p))
    res = foldkit.fold(str(p), verify=verify, memory=MemoryPolicy(lazy=True, spill_dir=str(spill)))
    assert os.listdir(spill) == []  # the spill file is unlinked at creation
    out = tmp_path / "o.onnx"
    res.save(str(out))
    assert out.read_bytes() == foldkit.fold(m).model.SerializeToString(deterministic=True)
    assert os.listdir(spill) == []


@pytest.mark.parametrize("external", [False, True])
def test_interrupted_streaming_save_leaves_nothing(tmp_path, monkeypatch, external):
    """A SIGINT/SIGTERM (KeyboardInterrupt/SystemExit) in the middle of streaming tensors out leaves
    neither the model nor its data file, and keeps an existing output as it was."""
    from foldkit import wire
    from foldkit.tensors import TensorStore
    monkeypatch.setattr(TensorStore, "DEFER_BYTES", 1)  # folded tensors stream through the writer too
    m = conv_bn_model(2, c_in=16, c_out=32)
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p))
    res = foldkit.fold(str(p), verify=False, memory=MemoryPolicy(lazy=True, defer=True))
    out = tmp_path / "o.onnx"
    out.write_bytes(b"previous")
    real = wire.Source.copy_to

    def interrupted(self, f):
        real(self, f)
        raise SystemExit(143)

    monkeypatch.setattr(wire.Source, "copy_to", interrupted)
    with pytest.raises(SystemExit):
        res.save(str(out), external=external)
    assert out.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "o.onnx"]


# -- big weights are folded while they are written (ScaledChannels recipes) ------------------------
# BLOCK_ELEMENTS is made tiny so that small test weights take the path of a multi-GB model's: each
# folded weight is kept as a recipe, computed block by block only when the writer streams it.

def _gemm_bn(trans_b):
    from tests.helpers import F32, bn_inits, make_model, rng, tensor
    r = rng(21)
    w = r.standard_normal((24, 16) if trans_b else (16, 24)).astype(np.float32)
    names, bn = bn_inits("bn", 24, r)
    nodes = [onnx.helper.make_node("Gemm", ["A", "B"], ["g"], transB=trans_b),
             onnx.helper.make_node("BatchNormalization", ["g"] + names, ["Y"])]
    return make_model(nodes, [("A", F32, [3, 16])], [("Y", F32, None)], [tensor("B", w)] + bn)


def _matmul_add_bn():
    from tests.helpers import F32, bn_inits, make_model, rng, tensor
    r = rng(22)
    names, bn = bn_inits("bn", 24, r)
    nodes = [onnx.helper.make_node("MatMul", ["X", "W"], ["mm"]), onnx.helper.make_node("Add", ["mm", "b"], ["a"]),
             onnx.helper.make_node("BatchNormalization", ["a"] + names, ["Y"])]
    inits = [tensor("W", r.standard_normal((16, 24)).astype(np.float32)), tensor("b", r.standard_normal(24).astype(np.float32))]
    return make_model(nodes, [("X", F32, [3, 16])], [("Y", F32, None)], inits + bn)


def _conv_bn_bn():
    from tests.helpers import bn_inits, rng
    m = conv_bn_model(2, c_in=8, c_out=12)
    names, bn2 = bn_inits("bn2", 12, rng(23))
    m.graph.node[1].output[0] = "mid"
    m.graph.node.append(onnx.helper.make_node("BatchNormalization", ["mid"] + names, ["Y"], name="bn2"))
    m.graph.initializer.extend(bn2)
    return m


def _shared_weight():
    from tests.helpers import F32, bn_inits, make_model, rng, tensor
    r = rng(24)
    names, bn = bn_inits("bn", 12, r)
    nodes = [onnx.helper.make_node("Conv", ["X", "W"], ["c1"], pads=[1, 1, 1, 1]),
             onnx.helper.make_node("BatchNormalization", ["c1"] + names, ["Y1"]),
             onnx.helper.make_node("Conv", ["X", "W"], ["Y2"], pads=[1, 1, 1, 1])]
    w = r.standard_normal((12, 8, 3, 3)).astype(np.float32)
    return make_model(nodes, [("X", F32, [1, 8, 5, 5])], [("Y1", F32, None), ("Y2", F32, None)], [tensor("W", w)] + bn)


def _constant_nodes():
    m = conv_bn_model(2, c_in=8, c_out=12)
    g = m.graph
    consts = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in g.initializer]
    nodes = consts + list(g.node)
    del g.initializer[:]
    del g.node[:]
    g.node.extend(nodes)
    return m


def _fp16_conv_bn():
    from tests.helpers import typed_conv_bn
    return typed_conv_bn(np.float16, TensorProto.FLOAT16)


RECIPE_MODELS = {
    "conv": lambda: conv_bn_model(2, c_in=16, c_out=32), "conv3d": lambda: conv_bn_model(3, c_in=4, c_out=8, group=2),
    "gemm_rows": lambda: _gemm_bn(1), "gemm_cols": lambda: _gemm_bn(0), "matmul_add": _matmul_add_bn,
    "conv_bn_bn": _conv_bn_bn, "shared_weight": _shared_weight, "fp16": _fp16_conv_bn,
    "constant_nodes": _constant_nodes,
}


@pytest.fixture
def tiny_blocks(monkeypatch):
    import foldkit.math as fm
    from foldkit.tensors import TensorStore
    monkeypatch.setattr(fm, "BLOCK_ELEMENTS", 16)
    monkeypatch.setattr(TensorStore, "DEFER_BYTES", 1)
    return fm


@pytest.mark.parametrize("name", sorted(RECIPE_MODELS))
def test_streamed_folds_equal_the_plain_formula(tmp_path, monkeypatch, name):
    import foldkit.math as fm
    from foldkit.tensors import TensorStore
    m = RECIPE_MODELS[name]()
    plain = foldkit.fold(m, verify=False)  # small weights: the plain float64 formula, in memory
    expected = plain.model.SerializeToString(deterministic=True)
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p))
    monkeypatch.setattr(fm, "BLOCK_ELEMENTS", 16)
    monkeypatch.setattr(TensorStore, "DEFER_BYTES", 1)
    made = []
    real_init = fm.ScaledChannels.__init__
    monkeypatch.setattr(fm.ScaledChannels, "__init__", lambda self, *a: (made.append(1), real_init(self, *a))[1])
    out = tmp_path / "o.onnx"
    r = CliRunner().invoke(main, ["fold", str(p), "-o", str(out), "-q", "--no-verify"])
    assert r.exit_code == 0, r.output
    assert made, "no recipe was used"
    assert out.read_bytes() == expected
    # not deferred (the API's default): the recipe becomes the TensorProto's bytes at once
    assert foldkit.fold(m, verify=False).model.SerializeToString(deterministic=True) == expected
    feeds = random_feeds(m)
    for a, b in zip(ort_run(m, feeds), ort_run(onnx.load(str(out)), feeds)):
        np.testing.assert_allclose(b, a, rtol=5e-3 if name == "fp16" else 1e-5, atol=5e-3 if name == "fp16" else 1e-5)
    # spilled (the external-data regime) and external data out: the same tensors
    spill = tmp_path / "spill"
    spill.mkdir()
    res = foldkit.fold(str(p), verify=False, memory=MemoryPolicy(lazy=True, spill_dir=str(spill)))
    res.save(str(tmp_path / "s.onnx"))
    assert (tmp_path / "s.onnx").read_bytes() == expected
    r = CliRunner().invoke(main, ["fold", str(p), "-o", str(tmp_path / "e.onnx"), "-q", "--external-data"])
    assert r.exit_code == 0, r.output
    got = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "e.onnx")).graph.initializer}
    want = {t.name: numpy_helper.to_array(t) for t in plain.model.graph.initializer}
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_streamed_fold_refuses_overflow_and_changes_nothing(tmp_path, tiny_blocks):
    from tests.helpers import typed_conv_bn
    m = typed_conv_bn(np.float16, TensorProto.FLOAT16, scale=6e4)
    for t in m.graph.initializer:
        if t.name == "v":
            t.CopyFrom(numpy_helper.from_array(np.full(6, 1e-6, np.float16), "v"))
    res = foldkit.fold(m, verify=False, memory=MemoryPolicy(defer=True))
    assert res.report.bn_after == 1 and "overflows float16" in res.report.actions[0].reason
    assert res.model.SerializeToString() == m.SerializeToString()


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("case", ["fits", "bound over, no channel over", "one channel over", "inf weight", "nan weight",
                                  "zero scale"])
def test_the_overflow_check_decides_as_the_plain_formula(case, dtype):
    """ScaledChannels.check first bounds the whole weight at once (largest |w| times largest |s|);
    only a bound that does not fit goes channel by channel. Either way it refuses exactly when
    round_to of the float64 products would (a finite product that rounds to Inf), no more."""
    from foldkit.math import FoldArithmeticError, ScaledChannels, round_to
    big = float(np.finfo(dtype).max)
    w = np.random.default_rng(5).standard_normal((4, 3, 2, 2)).astype(dtype)
    s = np.array([1.0, 0.5, 2.0, 1.0])
    if case == "bound over, no channel over":  # channel 0 holds the largest |w|, channel 2 the largest s
        w[0, 0, 0, 0] = dtype(big / 1.5)
        s = np.array([1.0, 0.5, 1.9, 1.0])
    elif case == "one channel over":
        w[2, 1, 1, 0] = dtype(big / 1.5)
    elif case == "inf weight":
        w[1, 0, 0, 1] = np.inf
    elif case == "nan weight":
        w[3, 2, 1, 1] = np.nan
    elif case == "zero scale":
        s = np.zeros(4)
    with np.errstate(over="ignore", invalid="ignore"):
        products = w.astype(np.float64) * s.reshape(-1, 1, 1, 1)
    try:
        round_to(products, dtype)
        plain = None
    except FoldArithmeticError as e:
        plain = e
    try:
        ScaledChannels(w, s, "conv", dtype).check()
        checked = None
    except FoldArithmeticError as e:
        checked = e
    assert (plain is None) == (checked is None)
    assert (checked is not None) == (case == "one channel over")


def test_streamed_fold_keeps_little_memory(tmp_path, tiny_blocks):
    """The folded weight is never held whole: a recipe stays a recipe until it is written."""
    from foldkit.math import ScaledChannels
    from foldkit.wire import is_memory
    m = conv_bn_model(2, c_in=16, c_out=32)
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p))
    res = foldkit.fold(str(p), verify=False, memory=MemoryPolicy(lazy=True, defer=True))
    held = [t.name for t in res.model.graph.initializer if is_memory(t)]
    assert "W" in held and isinstance(dict.__getitem__(res.tensors.payloads, "W"), ScaledChannels)
    res.save(str(tmp_path / "o.onnx"))
    assert isinstance(dict.__getitem__(res.tensors.payloads, "W"), ScaledChannels)  # streamed, not materialized
    assert (tmp_path / "o.onnx").read_bytes() == foldkit.fold(m, verify=False).model.SerializeToString(deterministic=True)


# -- verification of the files as written (defer, or a model over 2 GB) ----------------------------

def test_deferred_verification_runs_on_the_written_files(tmp_path):
    m = conv_bn_model(2, c_in=16, c_out=32)
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p))
    res = foldkit.fold(str(p), memory=MemoryPolicy(lazy=True, defer=True))
    assert res.report.verification is None and res.pending is not None
    seen = []
    real = res.pending.run
    res.pending.run = lambda result, path: (seen.append(sorted(os.listdir(os.path.dirname(path)))), real(result, path))
    res.save(str(tmp_path / "o.onnx"), external=True)
    data = data_name(tmp_path / "o.onnx")
    assert seen == [sorted(["o.onnx", data])]  # the pair, under its final names, before the rename
    v = res.report.verification
    assert v["passed"] and v["backend"] == "onnxruntime-cpu"
    assert sorted(os.listdir(tmp_path)) == sorted(["m.onnx", "o.onnx", data])
    feeds = random_feeds(m)
    for a, b in zip(ort_run(m, feeds), ort_run(onnx.load(str(tmp_path / "o.onnx")), feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("external", [False, True])
def test_deferred_verification_failure_writes_nothing(tmp_path, external):
    m = conv_bn_model(2, c_in=16, c_out=32)
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p))
    (tmp_path / "o.onnx").write_bytes(b"previous")
    (tmp_path / "o.onnx.data").write_bytes(b"previous data")
    args = ["fold", str(p), "-o", str(tmp_path / "o.onnx"), "--atol", "0", "--rtol", "0"]
    r = CliRunner().invoke(main, args + (["--external-data"] if external else []))
    assert r.exit_code == 1 and "verification failed" in r.output
    assert (tmp_path / "o.onnx").read_bytes() == b"previous"
    assert (tmp_path / "o.onnx.data").read_bytes() == b"previous data"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "o.onnx", "o.onnx.data"]


def test_model_over_the_protobuf_limit_is_verified_from_its_files(tmp_path, monkeypatch):
    """The 2 GB limit made small: the API's fold() cannot verify in memory, so save() does."""
    from foldkit import wire
    monkeypatch.setattr(wire, "TWO_GB", 4096)
    m = conv_bn_model(2, c_in=16, c_out=32)
    res = foldkit.fold(m)
    assert res.report.verification is None
    res.save(str(tmp_path / "o.onnx"))
    assert res.report.verification["passed"]
    assert sorted(os.listdir(tmp_path)) == sorted(["o.onnx", data_name(tmp_path / "o.onnx")])


def test_deferred_verification_with_the_reference_evaluator(tmp_path):
    """float64 Conv is not in ONNX Runtime's CPU kernels: both sides run on ONNX's evaluator, the
    folded one loaded from its written file."""
    from tests.helpers import typed_conv_bn
    m = typed_conv_bn(np.float64, TensorProto.DOUBLE)
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p))
    r = CliRunner().invoke(main, ["fold", str(p), "-o", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    import json
    v = json.loads((tmp_path / "r.json").read_text())["verification"]
    assert v["passed"] and v["backend"] == "onnx-reference"


def test_tensor_locations_are_named_by_one_function(tmp_path):
    """foldkit.tensors.location_of: inline, in file (lazy load), in memory, recipe, spilled."""
    from foldkit.api import MemoryPolicy
    from foldkit.tensors import Location, location_of

    m = conv_bn_model(2, c_in=64, c_out=256, k=5)  # a weight of 1.6 MB: deferred
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p))
    assert {location_of(t) for t in m.graph.initializer} == {Location.INLINE}
    from foldkit import io as fio

    lazy = fio.load_model(str(p), lazy=True)  # the big weight stays in the source file
    assert location_of(next(t for t in lazy.graph.initializer if t.name == "W")) is Location.IN_FILE
    deferred = foldkit.fold(str(p), verify=False, memory=MemoryPolicy(lazy=True, defer=True))
    kinds = {location_of(t, deferred.tensors) for t in deferred.model.graph.initializer}
    assert kinds & {Location.RECIPE, Location.IN_MEMORY}, kinds
    spilled = foldkit.fold(str(p), verify=False, memory=MemoryPolicy(lazy=True, spill_dir=str(tmp_path)))
    kinds = {location_of(t, spilled.tensors) for t in spilled.model.graph.initializer}
    assert kinds & {Location.RECIPE, Location.SPILLED}, kinds


def test_deprecated_fold_result_attributes_still_work(tmp_path):
    """FoldResult.payloads and .verify_before_commit became .tensors and .pending: the old names
    still answer, with a DeprecationWarning."""
    m = conv_bn_model(2, c_in=16, c_out=32)
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p))
    res = foldkit.fold(str(p), memory=MemoryPolicy(lazy=True, defer=True))
    with pytest.warns(DeprecationWarning, match="FoldResult.tensors"):
        assert res.payloads is res.tensors.payloads
    with pytest.warns(DeprecationWarning, match="FoldResult.pending"):
        run = res.verify_before_commit
    out = tmp_path / "o.onnx"
    res.save(str(out))  # the pending verification runs on the written file
    assert res.report.verification["passed"] and callable(run)


def test_spilling_waits_for_a_model_over_spill_above(tmp_path):
    """spill_dir is used only when the model's tensors total spill_above bytes or more (decided
    from the headers); below it the folded tensors wait in memory, and the bytes are the same."""
    from foldkit.tensors import Location, location_of

    m = conv_bn_model(2, c_in=64, c_out=256, k=5)  # a 1.6 MB weight: deferred
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p))
    from foldkit.wire import payload_nbytes

    size = sum(payload_nbytes(t) for t in m.graph.initializer)
    got = {}
    for label, above in (("over", size), ("under", size + 1)):
        res = foldkit.fold(str(p), verify=False,
                           memory=MemoryPolicy(lazy=True, spill_dir=str(tmp_path), spill_above=above))
        got[label] = {location_of(t, res.tensors) for t in res.model.graph.initializer}
        res.save(str(tmp_path / f"{label}.onnx"))
    assert Location.SPILLED in got["over"] or Location.RECIPE in got["over"]
    assert Location.SPILLED not in got["under"]
    assert (tmp_path / "over.onnx").read_bytes() == (tmp_path / "under.onnx").read_bytes()


@pytest.mark.parametrize("when", ["before it is mapped", "after it is read", "while the output is written"])
def test_an_input_truncated_while_it_is_read_never_leaves_a_partial_output(tmp_path, when):
    """A model file truncated by another process while `fold` reads it: before its tensors are
    memory-mapped, or any time before the output takes its name, a one-line exit 2 naming the file
    (the input's state is checked again right before the commit); while a folded weight is being
    computed from the mapped original into the output, the documented limit: the process ends with
    SIGBUS, as SIGKILL would. The output path is never written, partially or at all."""
    import signal
    import subprocess
    import sys

    src, dst = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(conv_bn_model(c_in=512, c_out=512, seed=5), str(src))  # 9.4 MB: folded block by block as it is written
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = f"""
import os, sys
sys.path.insert(0, {root!r})
import foldkit.math
from foldkit.passes.cleanup import Cleanup
from foldkit.passes.fold_into_producer import FoldIntoProducer
cls, attr = {{"before it is mapped": (FoldIntoProducer, "run_graph"), "after it is read": (Cleanup, "run"),
              "while the output is written": (foldkit.math.ScaledChannels, "blocks")}}[{when!r}]
real = getattr(cls, attr)
def truncating(self, *a, **k):
    os.truncate({str(src)!r}, 64)  # another process rewrote the model
    return real(self, *a, **k)
setattr(cls, attr, truncating)
from foldkit.entry import run
sys.argv = ["foldkit", "fold", {str(src)!r}, "-o", {str(dst)!r}]
run()
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    if when != "while the output is written":
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and "changed while foldkit read it" in p.stderr, p.stderr
    else:
        assert p.returncode == -signal.SIGBUS, (p.returncode, p.stderr[-500:])
    assert not dst.exists()
