"""Verification that never refuses a valid model: unchanged models are copied, models that cannot run
on generated inputs are checked region by region, random models are detected, and the tolerance
knows the model's own rounding noise; wrong folds still fail."""

import glob
import json
import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import foldkit
from foldkit.cli import main
from tests.helpers import F32, _classifier, _ill_conditioned, _mixconv, bn_inits, make_model, rng, tensor

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data")


def fold_cli(tmp_path, model, *extra):
    p = tmp_path / "m.onnx"
    onnx.save(model, str(p))
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = CliRunner().invoke(main, ["fold", str(p), "-o", str(out), "--report", str(rep), *map(str, extra)])
    report = json.loads(rep.read_text()) if rep.exists() else None
    return r, p, out, report


# --- valid models with no BN: exit 0, the input's bytes, no run -----------------------------------

def _bn_free_corpus():
    S, I64 = TensorProto.STRING, TensorProto.INT64
    seq = helper.make_tensor_sequence_value_info
    corpus = {
        "string input": make_model([helper.make_node("StringNormalizer", ["s"], ["y"], case_change_action="LOWER")],
                                   [("s", S, [3])], [("y", S, None)], opset=17, infer_outputs=False),
        "resize with scales input": make_model([helper.make_node("Resize", ["x", "", "scales"], ["y"])],
                                               [("x", F32, [1, 1, 4, 4]), ("scales", F32, [4])], [("y", F32, None)],
                                               infer_outputs=False),
        "mod by an integer input": make_model([helper.make_node("Mod", ["a", "b"], ["y"])],
                                              [("a", I64, [4]), ("b", I64, [4])], [("y", I64, None)]),
        "non-max suppression": make_model(
            [helper.make_node("NonMaxSuppression", ["boxes", "scores", "k"], ["y"])],
            [("boxes", F32, [1, 6, 4]), ("scores", F32, [1, 1, 6]), ("k", I64, [1])], [("y", I64, None)],
            infer_outputs=False),
        "random op": make_model([helper.make_node("RandomNormalLike", ["x"], ["r"]), helper.make_node("Add", ["x", "r"], ["y"])],
                                [("x", F32, [2, 3])], [("y", F32, None)]),
        "float8 input": make_model([helper.make_node("Cast", ["x"], ["y"], to=F32)],
                                   [("x", TensorProto.FLOAT8E4M3FN, [4])], [("y", F32, None)], opset=19),
    }
    g = helper.make_graph([helper.make_node("SequenceLength", ["s"], ["y"])], "g", [seq("s", F32, None)],
                          [helper.make_tensor_value_info("y", I64, [])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    corpus["sequence input"] = m
    og = helper.make_graph([helper.make_node("OptionalHasElement", ["o"], ["y"])], "g",
                           [helper.make_value_info("o", helper.make_optional_type_proto(
                               helper.make_tensor_type_proto(F32, [2])))],
                           [helper.make_tensor_value_info("y", TensorProto.BOOL, [])])
    om = helper.make_model(og, opset_imports=[helper.make_opsetid("", 18)])
    om.ir_version = 8
    corpus["optional input"] = om
    return corpus


@pytest.mark.parametrize("name", sorted(_bn_free_corpus()))
def test_valid_bn_free_models_are_exit_0_and_byte_identical(tmp_path, name):
    r, p, out, report = fold_cli(tmp_path, _bn_free_corpus()[name])
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == p.read_bytes()
    assert report["verification"]["method"] == "unchanged" and report["verification"]["passed"]
    assert "not needed" in r.output


# --- a BN fold in a model that cannot run end to end: the local checks decide --------------------

def _conv_bn_plus(extra_nodes, extra_inputs, extra_outputs, opset=17, seed=0, c=4):
    r = rng(seed)
    names, bn = bn_inits("bn", c, r)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4),
             helper.make_node("BatchNormalization", ["c"] + names, ["b"], name="bn"),
             helper.make_node("Relu", ["b"], ["y"], name="relu")] + extra_nodes
    return make_model(nodes, [("x", F32, [1, c, 6, 6])] + extra_inputs, [("y", F32, None)] + extra_outputs,
                      [tensor("w", r.standard_normal((c, c, 3, 3)).astype(np.float32))] + bn, opset=opset)


CANNOT_RUN = {
    "a string input": lambda: _conv_bn_plus([helper.make_node("StringNormalizer", ["s"], ["t"])],
                                            [("s", TensorProto.STRING, [2])], [("t", TensorProto.STRING, None)]),
    "a Resize whose scales are an input": lambda: _conv_bn_plus(
        [helper.make_node("Resize", ["y", "", "scales"], ["z"])], [("scales", F32, [4])], [("z", F32, [1, 4, None, None])]),
    "an integer divisor input": lambda: _conv_bn_plus([helper.make_node("Mod", ["a", "d"], ["m"])],
                                                      [("a", TensorProto.INT64, [3]), ("d", TensorProto.INT64, [3])],
                                                      [("m", TensorProto.INT64, None)]),
}


@pytest.mark.parametrize("case", sorted(CANNOT_RUN))
def test_fold_in_a_model_that_cannot_run_is_verified_locally(tmp_path, case):
    r, p, out, report = fold_cli(tmp_path, CANNOT_RUN[case]())
    v = report["verification"]
    assert r.exit_code == 0, r.output
    assert report["bn_after"] == 0 and v["method"] == "local" and v["passed"], v
    assert v["end_to_end"] and "1 rewritten region" in v["local"] and v["outputs"][0]["name"] == "b"
    assert v["max_abs_err"] < 1e-5


def test_a_wrong_fold_fails_the_local_check(tmp_path, monkeypatch):
    import foldkit.passes.fold_into_producer as fip

    monkeypatch.setattr(fip, "fold_bias", lambda b, s, t: np.zeros_like(s))  # the bug: the BN's shift dropped
    r, p, out, report = fold_cli(tmp_path, CANNOT_RUN["a string input"]())
    assert r.exit_code == 1 and not out.exists(), r.output
    assert report["verification"]["method"] == "local" and not report["verification"]["passed"]
    assert "verification failed (local): region output 'b'" in r.output


def test_random_model_is_detected_and_every_run_gives_the_same_exit_code(tmp_path):
    m = _conv_bn_plus([helper.make_node("RandomUniformLike", ["y"], ["n"]), helper.make_node("Add", ["y", "n"], ["z"])],
                      [], [("z", F32, None)])
    codes = set()
    for _ in range(3):
        r, p, out, report = fold_cli(tmp_path, m)
        codes.add(r.exit_code)
    assert codes == {0}
    v = report["verification"]
    assert v["method"] == "local" and "random" in v["end_to_end"] and v["passed"]


def _counting_runner(monkeypatch, noisy_reference=False):
    """Wrap foldkit.backends.runner (every run of a model goes through it, verify's included):
    count the runs of the original (the first model a verification runs); with ``noisy_reference``
    its outputs differ from run to run, as a nondeterministic kernel's would, though the model has
    no random op."""
    from foldkit import backends as fb, verify as fv

    real, runs, first = fb.runner, [], []

    def counting(model, model_bytes=None, *args, **kwargs):
        go, name = real(model, model_bytes, *args, **kwargs)
        if not first:
            first.append(model_bytes)
        if model_bytes is None or model_bytes != first[0]:
            return go, name

        def run_reference(feeds):
            runs.append(1)
            out = go(feeds)
            return [o + np.float32(len(runs) * 1e-2) for o in out] if noisy_reference else out
        return run_reference, name
    monkeypatch.setattr(fb, "runner", counting)
    monkeypatch.setattr(fv, "runner", counting)  # verify's own streaming comparison calls it by this name
    return runs


def test_a_passing_verification_runs_the_original_once(monkeypatch):
    """Determinism is asked of the original only when the comparison fails: a passing check pays
    for one run of each model."""
    runs = _counting_runner(monkeypatch)
    res = foldkit.fold(_conv_bn_plus([], [], []))
    assert res.report.verification["method"] == "end-to-end" and res.report.verification["passed"]
    assert len(runs) == 1


def test_an_original_that_disagrees_with_itself_is_verified_locally(monkeypatch):
    """No random op, but two runs of the original differ (a nondeterministic kernel): the output
    comparison cannot decide, so each rewrite's region is checked instead, and it passes."""
    runs = _counting_runner(monkeypatch, noisy_reference=True)
    res = foldkit.fold(_conv_bn_plus([], [], []))
    v = res.report.verification
    assert len(runs) == 2 and v["method"] == "local" and v["passed"]
    assert "two runs of the original disagree" in v["end_to_end"]


# --- the noise floor: ill-conditioned but exact folds pass; wrong ones still fail -----------------


# BN(Conv(x)) - Conv2(x) is also a linear combination of two branches on x, which the branch merge
# computes in float64 and rounds once; the Conv+BN fold (what the floor is for) runs with it skipped.
def test_exact_fold_of_an_ill_conditioned_model_passes_within_its_noise_floor(tmp_path):
    r, p, out, report = fold_cli(tmp_path, _ill_conditioned(), "--skip", "branches")
    v = report["verification"]
    assert r.exit_code == 0, r.output
    o = v["outputs"][0]
    assert o["max_rel_err"] > v["rtol"], "the case must be over the plain tolerance to test the floor"
    assert o["noise_floor"] > 0 and "within" in o["detail"] and "noise floor" in r.output
    # tolerances given explicitly are never relaxed by the floor
    r2, *_ = fold_cli(tmp_path, _ill_conditioned(), "--rtol", "1e-5", "--atol", "1e-6", "--skip", "branches")
    assert r2.exit_code == 1


def test_the_ill_conditioned_difference_merged_into_one_conv_is_exact(tmp_path):
    """Merged, the near-cancelling difference is one kernel computed in float64 and rounded once
    (the unfolded model's own float32 output is the noisy side here: verification passes on the floor)."""
    m = _ill_conditioned()
    r, p, out, report = fold_cli(tmp_path, m)
    assert r.exit_code == 0, r.output
    folded = onnx.load(str(out))
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    w = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
    s = w["g"] / np.sqrt(w["v"] + 1e-5)
    want_w = (w["w"] * s[:, None, None, None] - w["w2"]).astype(np.float32)
    want_b = (w["be"] - w["mu"] * s - w["b2"]).astype(np.float32)
    got = {t.name: onnx.numpy_helper.to_array(t) for t in folded.graph.initializer}
    conv = folded.graph.node[0]
    assert np.array_equal(got[conv.input[1]], want_w) and np.array_equal(got[conv.input[2]], want_b)


def test_a_wrong_channel_axis_still_fails_despite_the_floor(tmp_path, monkeypatch):
    import foldkit.passes.fold_into_producer as fip

    real = fip.scaled_weight
    monkeypatch.setattr(fip, "scaled_weight", lambda w, s, kind, group: real(w, s[::-1].copy(), kind, group))
    r, p, out, report = fold_cli(tmp_path, _ill_conditioned(), "--skip", "branches")
    assert r.exit_code == 1 and not out.exists()
    assert "over" in report["verification"]["outputs"][0]["detail"]


# --- ONNX's own backend node tests: every valid model folds, exit 0 ------------------------------

@pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED, "onnx-node-6be0677f.tar.xz")),
                    reason="../shared/data/onnx-node-6be0677f.tar.xz is not here")
def test_onnx_backend_node_models_are_never_refused(tmp_path_factory):
    import tarfile

    root = tmp_path_factory.mktemp("node")
    with tarfile.open(os.path.join(SHARED, "onnx-node-6be0677f.tar.xz")) as t:
        t.extractall(root, filter="data")
    models = sorted(glob.glob(str(root / "**" / "model.onnx"), recursive=True))
    assert len(models) > 1000
    out = tmp_path_factory.mktemp("out") / "o.onnx"
    bad = {}
    for m in models:
        r = CliRunner().invoke(main, ["fold", m, "-o", str(out), "-q"])
        if r.exit_code != 0:
            bad[m.split(os.sep)[-2]] = (r.exit_code, r.output.strip()[:200])
        elif foldkit.fold(m, verify=False).report.unchanged and out.read_bytes() != open(m, "rb").read():
            bad[m.split(os.sep)[-2]] = ("changed", "")
    assert not bad, dict(list(bad.items())[:10])


# --- weights and BN parameters computed from constants ------------------------------------------

def _with_weight_subgraph(weight_nodes, weight_inits, w_name, bn_nodes=(), bn_names=None, bn_inits_=(), c=4, seed=9):
    from tests.helpers import fold_and_compare, op_count

    r = rng(seed)
    names, bn = bn_inits("bn", c, r)
    names = bn_names or names
    nodes = list(weight_nodes) + list(bn_nodes) + [
        helper.make_node("Conv", ["x", w_name], ["cv"], name="conv", pads=[1] * 4),
        helper.make_node("BatchNormalization", ["cv"] + names, ["y"], name="bn")]
    m = make_model(nodes, [("x", F32, [1, c, 6, 6])], [("y", F32, None)],
                   list(weight_inits) + (list(bn_inits_) if bn_names else bn))
    res = fold_and_compare(m, rtol=1e-5, atol=1e-5)
    assert op_count(res.model, "Conv") == 1 and len(res.model.graph.node) == 1, \
        [n.op_type for n in res.model.graph.node]  # the constant subgraph is gone
    return res


def test_pruning_mask_and_sign_and_slice_weights_fold():
    r = rng(10)
    w = r.standard_normal((4, 4, 3, 3)).astype(np.float32)
    mask = (r.random((4, 4, 3, 3)) < 0.6).astype(np.float32)
    _with_weight_subgraph([helper.make_node("Mul", ["w", "mask"], ["wm"])], [tensor("w", w), tensor("mask", mask)], "wm")
    _with_weight_subgraph([helper.make_node("Sign", ["w"], ["sg"]), helper.make_node("Mul", ["sg", "alpha"], ["wb"])],
                          [tensor("w", w), tensor("alpha", np.array(0.37, np.float32))], "wb")  # binarized weights
    big = r.standard_normal((8, 6, 5, 5)).astype(np.float32)
    i64 = lambda v: tensor(v[0], np.array(v[1], np.int64))  # noqa: E731
    _with_weight_subgraph([helper.make_node("Slice", ["big", "s0", "e0", "a0"], ["half"]),
                           helper.make_node("Slice", ["half", "s1", "e1", "a1"], ["wsl"])],
                          [tensor("big", big), i64(("s0", [0, 1])), i64(("e0", [4, 5])), i64(("a0", [0, 1])),
                           i64(("s1", [1, 1])), i64(("e1", [4, 4])), i64(("a1", [2, 3]))], "wsl")
    _with_weight_subgraph([helper.make_node("Cast", ["w64"], ["wc"], to=F32)],
                          [tensor("w64", w.astype(np.float64))], "wc")
    parts = [tensor("wa", w[:2]), tensor("wb_", w[2:])]
    _with_weight_subgraph([helper.make_node("Concat", ["wa", "wb_"], ["wcat"], axis=0)], parts, "wcat")
    _with_weight_subgraph([helper.make_node("Where", ["keep", "w", "zero"], ["ww"])],
                          [tensor("keep", mask.astype(bool)), tensor("w", w), tensor("zero", np.float32(0))], "ww")
    _with_weight_subgraph([helper.make_node("Expand", ["row", "shape"], ["we"])],
                          [tensor("row", w[:1]), tensor("shape", np.array([4, 4, 3, 3], np.int64))], "we")


def test_bn_parameters_from_constant_of_shape_fold():
    """Old model-zoo conversions: gamma = ConstantOfShape(1), beta = ConstantOfShape(0)."""
    r = rng(11)
    one = helper.make_tensor("one", F32, [1], [1.0])
    zero = helper.make_tensor("zero", F32, [1], [0.0])
    nodes = [helper.make_node("ConstantOfShape", ["cshape"], ["gamma"], value=one),
             helper.make_node("ConstantOfShape", ["cshape"], ["beta"], value=zero)]
    inits = [tensor("cshape", np.array([4], np.int64)), tensor("mean", r.normal(0, 1, 4).astype(np.float32)),
             tensor("var", r.uniform(0.5, 2, 4).astype(np.float32)),
             tensor("w", r.standard_normal((4, 4, 3, 3)).astype(np.float32))]
    res = _with_weight_subgraph([], inits, "w", bn_nodes=nodes, bn_names=["gamma", "beta", "mean", "var"])
    assert res.report.bn_after == 0


def test_a_computed_weight_read_elsewhere_is_kept_for_its_other_reader():
    from tests.helpers import fold_and_compare, op_count

    r = rng(12)
    names, bn = bn_inits("bn", 4, r)
    nodes = [helper.make_node("Mul", ["w", "mask"], ["wm"]),
             helper.make_node("Conv", ["x", "wm"], ["cv"], name="conv", pads=[1] * 4),
             helper.make_node("BatchNormalization", ["cv"] + names, ["y"], name="bn"),
             helper.make_node("Conv", ["x", "wm"], ["z"], name="other", pads=[1] * 4)]
    m = make_model(nodes, [("x", F32, [1, 4, 6, 6])], [("y", F32, None), ("z", F32, None)],
                   [tensor("w", r.standard_normal((4, 4, 3, 3)).astype(np.float32)),
                    tensor("mask", (r.random((4, 4, 3, 3)) < 0.5).astype(np.float32))] + bn)
    res = fold_and_compare(m, rtol=1e-5, atol=1e-5)
    assert op_count(res.model, "Mul") == 1 and op_count(res.model, "BatchNormalization") == 0


# --- a BN after a Concat of convolutions is split per branch -------------------------------------


@pytest.mark.parametrize("third", ["Conv", "ConvTranspose"])
def test_mixconv_bn_after_concat_is_split_into_each_branch(third):
    from tests.helpers import fold_and_compare, op_count

    res = fold_and_compare(_mixconv(third), rtol=1e-5, atol=1e-5)
    (a,) = res.report.actions
    assert a.action == "folded" and a.target.startswith("Concat 'cat' split into Conv 'k3', Conv 'k5'")
    assert op_count(res.model, "Concat") == 1


def test_concat_with_a_branch_without_weights_is_refused_unchanged():
    m = _mixconv("MaxPool")
    res = foldkit.fold(m, verify=False)
    (a,) = res.report.actions
    assert a.action == "kept" and "not a Conv, ConvTranspose or Gemm" in a.reason
    assert res.model.SerializeToString() == m.SerializeToString()


def test_freeze_initializer_inputs_makes_listed_weights_fold_and_says_so(tmp_path):
    r = rng(14)
    names, bn = bn_inits("bn", 4, r)
    w = tensor("w", r.standard_normal((4, 4, 3, 3)).astype(np.float32))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4),
             helper.make_node("BatchNormalization", ["c"] + names, ["y"], name="bn")]
    listed = [("x", F32, [1, 4, 5, 5]), ("w", F32, [4, 4, 3, 3])] + [(n, F32, [4]) for n in names]
    m = make_model(nodes, listed, [("y", F32, None)], [w] + bn, opset=11, ir_version=6)
    r1, p, out, rep = fold_cli(tmp_path, m)
    assert r1.exit_code == 0 and rep["bn_after"] == 1 and "--freeze-initializer-inputs" in rep["actions"][0]["reason"]
    r2, p, out, rep = fold_cli(tmp_path, m, "--freeze-initializer-inputs")
    assert r2.exit_code == 0 and rep["bn_after"] == 0, r2.output
    assert sorted(rep["frozen_inputs"]) == sorted(["w"] + names) and "interface" in " ".join(rep["notes"])
    folded = onnx.load(str(out))
    assert [i.name for i in folded.graph.input] == ["x"] and rep["verification"]["passed"]


# --- --data: real samples for the end-to-end check -----------------------------------------------


def test_fold_with_real_data_npz_folder_and_function(tmp_path):
    r = rng(16)
    x = r.standard_normal((70, 1, 8, 8))  # float64 data: cast to the model's float32
    np.savez(tmp_path / "d.npz", img=x, label=r.integers(0, 10, 70))
    res, p, out, rep = fold_cli(tmp_path, _classifier(), "--data", tmp_path / "d.npz", "--batch-size", "32")
    v = rep["verification"]
    assert res.exit_code == 0, res.output
    assert v["data"] == {"samples": 70, "batches": 3, "top1_agreement": {"logits": 1.0}}
    assert v["inputs"] == {"img": [6, 1, 8, 8]} and "top-1 agreement logits 100.00%" in res.output
    folder = tmp_path / "parts"
    folder.mkdir()
    np.savez(folder / "b.npz", anything=x[40:])  # a single-input model may use any one array name
    np.savez(folder / "a.npz", anything=x[:40])
    res, *_, rep = fold_cli(tmp_path, _classifier(), "--data", folder, "--max-samples", "50")
    assert res.exit_code == 0 and rep["verification"]["data"]["samples"] == 50
    (tmp_path / "feed.py").write_text("import numpy as np\n"
                                      "def batches():\n"
                                      "    r = np.random.default_rng(0)\n"
                                      "    for _ in range(3):\n"
                                      "        yield {'img': r.standard_normal((5, 1, 8, 8)).astype(np.float32)}\n")
    res, *_, rep = fold_cli(tmp_path, _classifier(), "--data", f"{tmp_path / 'feed.py'}:batches", "--batch-size", "4")
    assert res.exit_code == 0 and rep["verification"]["data"] == {"samples": 15, "batches": 4,
                                                                    "top1_agreement": {"logits": 1.0}}


def test_data_errors_are_one_line_exit_2(tmp_path):
    np.savez(tmp_path / "bad.npz", a=np.zeros((3, 1, 8, 8)), b=np.zeros((3, 1, 8, 8)))
    np.savez(tmp_path / "ints.npz", img=np.zeros((3, 1, 8, 8), dtype=np.int32))
    for spec, needle in ((tmp_path / "bad.npz", "no array named 'img'"), (tmp_path / "missing.npz", "no such file"),
                         (tmp_path / "ints.npz", "holds int32")):
        res, p, out, rep = fold_cli(tmp_path, _classifier(), "--data", spec)
        assert res.exit_code == 2 and needle in res.output and res.output.count("\n") == 1, res.output
        assert not out.exists()


def test_a_wrong_fold_fails_on_real_data(tmp_path, monkeypatch):
    import foldkit.passes.fold_into_producer as fip

    monkeypatch.setattr(fip, "fold_bias", lambda b, s, t: np.zeros_like(s))
    np.savez(tmp_path / "d.npz", img=rng(17).standard_normal((8, 1, 8, 8)).astype(np.float32))
    res, p, out, rep = fold_cli(tmp_path, _classifier(), "--data", tmp_path / "d.npz")
    assert res.exit_code == 1 and not out.exists() and not rep["verification"]["passed"]


def _symbolic(m, dims):
    """``m`` with the named dims of its first input and output symbolic."""
    for v in (m.graph.input[0], m.graph.output[0]):
        for k in dims:
            v.type.tensor_type.shape.dim[k].dim_param = f"d{k}"
    return m


def _matmul_mul(r):
    from tests.helpers import F32, make_model, tensor

    w = r.standard_normal((64, 5)).astype(np.float32)  # K = 64: over the cut size, fixed by the weight
    s = r.uniform(0.5, 2, 5).astype(np.float32)
    return make_model([helper.make_node("MatMul", ["X", "W"], ["m"]), helper.make_node("Mul", ["m", "s"], ["Y"])],
                      [("X", F32, [2, 3, 64])], [("Y", F32, [2, 3, 5])], [tensor("W", w), tensor("s", s)])


@pytest.mark.parametrize("case", ["conv", "matmul"])
def test_local_verification_cuts_every_dim_the_rewrite_does_not_depend_on(tmp_path, case):
    """Sizes far over --max-input-mb (a batch of 2**32): the region runs at batch 1 with its other free
    dims cut, and the dims the weights fix (channels, the MatMul's K) kept; verified, not 'NOT POSSIBLE'."""
    from tests.helpers import conv_bn_model, rng

    if case == "conv":
        m, shape, fixed = _symbolic(conv_bn_model(seed=1), (0, 2, 3)), "X=4294967296,4,4294967296,8", {1: 4}
    else:
        m, shape, fixed = _symbolic(_matmul_mul(rng(2)), (0, 1)), "X=4294967296,4294967296,64", {2: 64}
    src, dst, rep = tmp_path / "m.onnx", tmp_path / "f.onnx", tmp_path / "r.json"
    onnx.save(m, str(src))
    r = CliRunner().invoke(main, ["fold", str(src), "-o", str(dst), "--input-shape", shape, "--report", str(rep)])
    assert r.exit_code == 0, r.output
    v = json.loads(rep.read_text())["verification"]
    assert v["method"] == "local" and v["passed"], v
    dims = [int(d) for d in v["local"].split("X[")[1].split("]")[0].split(",")]
    assert dims[0] == 1 and all(dims[k] == n for k, n in fixed.items()), v["local"]
    assert all(d <= 16 for k, d in enumerate(dims) if k not in fixed), v["local"]
