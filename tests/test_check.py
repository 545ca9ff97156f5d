"""foldkit check: findings, formats, exit codes, external data, and a fuzz test over mutated models."""

import json
import os
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from foldkit.cli import main
from tests.helpers import F32, fill_output_shapes, tensor
from tests.helpers import conv_bn_model
from tests.helpers import base


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def save(m, tmp_path, name="m.onnx"):
    p = tmp_path / name
    onnx.save(m, str(p))
    return p


def test_foldable_bn_is_an_error_and_folded_model_passes(tmp_path):
    p = save(conv_bn_model(2), tmp_path)
    r = invoke("check", p, "--format", "json")
    assert r.exit_code == 1
    d = json.loads(r.output)
    assert [f["code"] for f in d["models"][0]["findings"]] == ["FK001"] and d["passed"] is False
    assert "foldkit fold" in d["models"][0]["findings"][0]["message"]
    out = tmp_path / "f.onnx"
    assert invoke("fold", p, "-o", out, "-q").exit_code == 0
    r = invoke("check", out)
    assert r.exit_code == 0 and "ready to deploy" in r.output


def test_training_mode_is_an_error(tmp_path):
    from tests.helpers import model
    r = invoke("check", save(model(17, training=True), tmp_path), "--format", "json")
    assert r.exit_code == 1
    assert "FK002" in [f["code"] for f in json.loads(r.output)["models"][0]["findings"]]


def test_unfoldable_bn_is_a_warning(tmp_path):
    p = save(fill_output_shapes(base(producer="Relu", bn_channels=4)), tmp_path)
    r = invoke("check", p, "--format", "json")
    assert r.exit_code == 0
    (f,) = json.loads(r.output)["models"][0]["findings"]
    assert f["code"] == "FK003" and f["severity"] == "warning" and "no weights" in f["message"]
    assert invoke("check", p, "--fail-on", "warning").exit_code == 1


@pytest.mark.parametrize("kwargs,code", [
    (dict(var=[1, np.nan, 1, 1, 1, 1]), "FK005"),
    (dict(var=[1, 1, -3, 1, 1, 1]), "FK005"),
    (dict(bn_channels=3), "FK005"),
])
def test_invalid_bn_parameters(tmp_path, kwargs, code):
    r = invoke("check", save(base(**kwargs), tmp_path), "--format", "json")
    assert r.exit_code == 1
    assert code in [f["code"] for f in json.loads(r.output)["models"][0]["findings"]]


def test_fp16_precision_and_overflow_risks(tmp_path):
    from tests.helpers import typed_conv_bn
    m = typed_conv_bn(np.float32, F32, scale=1.0)
    for t in m.graph.initializer:
        if t.name == "v":
            t.CopyFrom(tensor("v", np.full(6, 1e-9, np.float32)))
        if t.name == "s":
            t.CopyFrom(tensor("s", np.full(6, 100.0, np.float32)))
    r = invoke("check", save(m, tmp_path), "--format", "json")
    codes = [f["code"] for f in json.loads(r.output)["models"][0]["findings"]]
    assert "FK004" in codes and "FK001" in codes
    m16 = typed_conv_bn(np.float16, TensorProto.FLOAT16, scale=1.0)
    for t in m16.graph.initializer:
        if t.name == "s":
            t.CopyFrom(tensor("s", np.full(6, 1e-4, np.float16)))
    r = invoke("check", save(m16, tmp_path, "h.onnx"), "--format", "json")
    risks = [f for f in json.loads(r.output)["models"][0]["findings"] if f["code"] == "FK004"]
    assert risks and "subnormal" in risks[0]["message"]


def test_checker_failure_is_an_error(tmp_path):
    m = conv_bn_model(2)
    m.graph.node[0].op_type = "NoSuchOp"
    r = invoke("check", save(m, tmp_path), "--format", "json")
    assert r.exit_code == 1 and "FK006" in [f["code"] for f in json.loads(r.output)["models"][0]["findings"]]


def _external_model(tmp_path, location):
    m = conv_bn_model(2)
    w = m.graph.initializer[0]
    w.ClearField("raw_data")
    del w.float_data[:]
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value=location)
    w.external_data.add(key="length", value="10000")
    return save(m, tmp_path)


@pytest.mark.parametrize("location,msg", [
    ("../../etc/passwd", "outside the model's folder"),
    ("/etc/passwd", "not a relative path"),
    ("missing.bin", "is missing"),
])
def test_external_data_problems(tmp_path, location, msg):
    p = _external_model(tmp_path, location)
    r = invoke("check", p, "--format", "json")
    assert r.exit_code == 1
    (f,) = json.loads(r.output)["models"][0]["findings"]
    assert f["code"] == "FK007" and msg in f["message"]
    r = invoke("fold", p, "-o", tmp_path / "o.onnx")
    assert r.exit_code == 2 and msg in r.output and not (tmp_path / "o.onnx").exists()


def test_github_and_junit_formats(tmp_path):
    p = save(conv_bn_model(2), tmp_path)
    r = invoke("check", p, "--format", "github")
    summary, detail = r.output.splitlines()
    assert r.exit_code == 1 and summary.startswith(f"::error file={p},title=foldkit check::FAILED: 1 error(s)")
    assert detail.startswith(f"::error file={p},title=FK001 bn::")
    junit = tmp_path / "j.xml"
    r = invoke("check", p, "--format", "junit", "-o", junit)
    assert r.exit_code == 1
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("failures") == "1" and suite.find("testcase/failure").get("type") == "FK001"
    clean = tmp_path / "f.onnx"
    invoke("fold", p, "-o", clean, "-q")
    suite = ET.fromstring(invoke("check", clean, "--format", "junit").output.split("\n", 1)[1]).find("testsuite")
    assert suite.get("failures") == "0" and suite.find("testcase").get("name") == "deployment-ready"


def test_check_never_writes_or_modifies(tmp_path):
    p = save(conv_bn_model(2), tmp_path)
    before = p.read_bytes()
    invoke("check", p)
    assert p.read_bytes() == before and os.listdir(tmp_path) == ["m.onnx"]


# --- fuzz: mutated real models fail cleanly or succeed with a verified result ---------------

def _seed_model():
    m = conv_bn_model(2, group=2)
    return m.SerializeToString()


SEED = _seed_model()


@st.composite
def mutated(draw):
    kind = draw(st.sampled_from(["truncate", "flip", "drop_init", "attr", "dims", "input_name"]))
    if kind == "truncate":
        return SEED[: draw(st.integers(0, len(SEED) - 1))]
    if kind == "flip":
        data = bytearray(SEED)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    m = onnx.load_from_string(SEED)
    if kind == "drop_init":
        del m.graph.initializer[draw(st.integers(0, len(m.graph.initializer) - 1))]
    elif kind == "attr":
        node = m.graph.node[draw(st.integers(0, len(m.graph.node) - 1))]
        name = draw(st.sampled_from(["group", "epsilon", "pads", "strides", "kernel_shape", "training_mode"]))
        value = draw(st.one_of(st.integers(-3, 9), st.floats(-1, 1), st.just(float("nan")), st.lists(st.integers(-2, 5), max_size=5)))
        for a in list(node.attribute):
            if a.name == name:
                node.attribute.remove(a)
        try:
            node.attribute.append(helper.make_attribute(name, value))
        except Exception:
            pass
    elif kind == "dims":
        t = m.graph.initializer[draw(st.integers(0, len(m.graph.initializer) - 1))]
        t.dims[0] = draw(st.integers(0, 1 << 40))
    else:
        m.graph.node[0].input[0] = draw(st.sampled_from(["", "nope", "Y"]))
    return m.SerializeToString()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=mutated())
def test_fuzz_fold_and_check_fail_cleanly(tmp_path, data):
    p = tmp_path / "fuzz.onnx"
    p.write_bytes(data)
    out = tmp_path / "out.onnx"
    if out.exists():
        out.unlink()
    for args in (["fold", p, "-o", out], ["check", p]):
        r = invoke(*args)
        assert r.exit_code in (0, 1, 2), (args[0], r.exit_code, r.output)
        assert "Traceback" not in r.output and "internal error" not in r.output, r.output
        if r.exit_code == 2:
            assert r.output.startswith("foldkit: error:") and r.output.count("\n") == 1, r.output
        if args[0] == "fold":
            if r.exit_code == 0:
                assert out.exists() and ("passed" in r.output or "not needed" in r.output or "NOT POSSIBLE" in r.output)
            else:
                assert not out.exists()
    assert p.read_bytes() == data
    assert sorted(os.listdir(tmp_path)) in (["fuzz.onnx"], ["fuzz.onnx", "out.onnx"])


@pytest.mark.parametrize("dtype, onnx_type, scale, word", [(np.float32, F32, 1e5, "beyond float16"),
                                                           (np.float16, TensorProto.FLOAT16, 1e-6, "subnormal")])
def test_numeric_risk_in_a_big_weight_read_block_by_block(tmp_path, dtype, onnx_type, scale, word):
    """A weight over 1 MiB is folded as a deferred recipe; the risk check streams its blocks."""
    from tests.helpers import bn_inits, make_model, rng

    r = rng(3)
    c = 256
    w = r.standard_normal((c, c, 3, 3)).astype(dtype)
    names, bn = bn_inits("bn", c, r, dtype)
    bn[0] = tensor(names[0], np.full(c, scale, dtype))
    nodes = [helper.make_node("Conv", ["X", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c"] + names, ["Y"], name="bn")]
    m = make_model(nodes, [("X", onnx_type, [1, c, 4, 4])], [("Y", onnx_type, None)], [tensor("W", w)] + bn)
    assert w.nbytes >= 1 << 20
    res = invoke("check", save(m, tmp_path), "--format", "json")
    risks = [f for f in json.loads(res.output)["models"][0]["findings"] if f["code"] == "FK004"]
    assert risks and word in risks[0]["message"], res.output


# --- many models, folders, and the CI formats over all of them -------------------------------------

def _models(tmp_path):
    """(unfolded, folded) in a folder, plus a nested folded one and a non-ONNX file that is skipped."""
    d = tmp_path / "models"
    (d / "sub").mkdir(parents=True)
    bad = save(conv_bn_model(2), d, "a_unfolded.onnx")
    good = d / "b_folded.onnx"
    assert invoke("fold", bad, "-o", good, "-q").exit_code == 0
    nested = d / "sub" / "c.onnx"
    nested.write_bytes(good.read_bytes())
    (d / "notes.txt").write_text("not a model")
    return d, bad, good, nested


def test_check_many_models_worst_exit_code_and_every_model_named(tmp_path):
    d, bad, good, nested = _models(tmp_path)
    r = invoke("check", good, nested)
    assert r.exit_code == 0, r.output
    r = invoke("check", bad, good)
    assert r.exit_code == 1 and str(bad) in r.output and str(good) in r.output
    assert r.output.strip().endswith("1 of 2 model(s) ready to deploy")
    js = json.loads(invoke("check", d, "--format", "json").output)
    assert [m["path"] for m in js["models"]] == [str(bad), str(good), str(nested)]  # sorted, recursive, .onnx only
    assert [m["passed"] for m in js["models"]] == [False, True, True] and js["exit_code"] == 1
    assert js["schema_version"] == 1 and js["command"] == "check" and js["inputs"] == [str(bad), str(good), str(nested)]
    # named twice (as a file and through its folder): checked once
    assert len(json.loads(invoke("check", bad, d, "--format", "json").output)["models"]) == 3


def test_check_unreadable_model_is_exit_2_but_the_others_are_still_checked_and_recorded(tmp_path):
    d, bad, good, _ = _models(tmp_path)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    for fmt in ("json", "junit", "text"):
        out = tmp_path / f"r.{fmt}"
        r = invoke("check", broken, bad, good, "--format", fmt, "-o", out)
        assert r.exit_code == 2 and r.output.startswith("foldkit: error:") and r.output.count("\n") == 1, r.output
        assert out.exists(), fmt  # the record CI keeps is written whatever the outcome
    js = json.loads((tmp_path / "r.json").read_text())
    assert js["exit_code"] == 2 and js["models"][0]["error"] and js["models"][0]["findings"][0]["code"] == "FK008"
    assert [m["exit_code"] for m in js["models"]] == [2, 1, 0]
    root = ET.parse(tmp_path / "r.junit").getroot()
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == [str(broken), str(bad), str(good)]
    assert suites[0].get("errors") == "1" and suites[0].find("testcase/error").get("type") == "FK008"
    assert suites[1].get("failures") == "1" and suites[2].get("failures") == "0"
    assert all(float(s.get("time")) >= 0 for s in suites) and root.get("tests") == "3"
    # a single unreadable model, no -o: one stderr line, exit 2, as for every command
    r = invoke("check", broken)
    assert r.exit_code == 2 and r.output.count("\n") == 1


def test_a_bug_met_on_one_model_is_that_models_result_and_never_sinks_the_run(tmp_path, monkeypatch):
    """An internal error in one model (pytorchcv's sinet_cityscapes once raised StopIteration in the
    branch merge) is recorded for that model with exit code 3 and its message, in every format; the
    others are still checked, every -o record is written, the run's exit code is the worst one, and
    --debug still raises it."""
    import foldkit.check as fc

    d, bad, good, nested = _models(tmp_path)
    real = fc.check

    def buggy(path, data=None):
        if os.path.samefile(path, bad):
            raise StopIteration()
        return real(path, data=data)

    monkeypatch.setattr(fc, "check", buggy)
    for fmt in ("json", "junit", "text", "github"):
        out = tmp_path / f"r.{fmt}"
        r = invoke("check", bad, good, nested, "--format", fmt, "-o", out)
        assert r.exit_code == 3, (fmt, r.output)
        assert r.output.count("\n") == 1 and "internal error: StopIteration" in r.output, r.output  # one stderr line
        text = out.read_text()
        assert str(good) in text and str(nested) in text, (fmt, text)
        assert "FK013" in text or fmt in ("text", "github"), (fmt, text)  # those two: the summary line says it
        assert "internal error" in text, (fmt, text)
    js = json.loads((tmp_path / "r.json").read_text())
    assert [m["exit_code"] for m in js["models"]] == [3, 0, 0] and js["exit_code"] == 3
    assert js["models"][0]["error_code"] == "FK013" and js["models"][0]["findings"][0]["code"] == "FK013"
    suites = ET.parse(tmp_path / "r.junit").getroot().findall("testsuite")
    assert suites[0].get("errors") == "1" and suites[0].find("testcase/error").get("type") == "FK013"
    assert [s.get("errors") for s in suites[1:]] == ["0", "0"]
    # worst first: an unreadable model (2) beside it still leaves the run at 3
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    r = invoke("check", broken, bad, good)
    assert r.exit_code == 3 and sum(line.startswith("foldkit: error:") for line in r.output.splitlines()) == 2, r.output
    r = invoke("--debug", "check", bad, good)
    assert isinstance(r.exception, StopIteration)


def test_check_empty_folder_is_a_usage_error(tmp_path):
    (tmp_path / "empty").mkdir()
    r = invoke("check", tmp_path / "empty")
    assert r.exit_code == 2 and "no .onnx file" in r.output


def test_github_annotations_escape_like_the_toolkit_and_summaries_come_first(tmp_path, monkeypatch):
    d = tmp_path / "we%ird,na:me"
    d.mkdir()
    many = []
    for k in range(3):
        p = save(conv_bn_model(2), d, f"a,b:c{k}.onnx")
        many.append(p)
    summary_file = tmp_path / "summary.md"
    summary_file.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary_file))
    r = invoke("check", *many, "--format", "github")
    lines = r.output.splitlines()
    assert r.exit_code == 1 and len(lines) == 6
    # GitHub shows 10 annotations of a kind per step: one summary per model first, then the details
    assert all("title=foldkit check::" in ln for ln in lines[:3]) and all("FK001" in ln for ln in lines[3:])
    for k, ln in enumerate(lines[:3]):
        prop = ln.split(" ", 1)[1].split("::", 1)[0]
        file_prop = prop.split(",title=")[0][len("file="):]
        unescaped = file_prop.replace("%3A", ":").replace("%2C", ",").replace("%0D", "\r").replace("%0A", "\n").replace("%25", "%")
        assert unescaped == str(many[k]) and "," not in file_prop and ":" not in file_prop
    md = summary_file.read_text()
    assert md.startswith("earlier step\n### foldkit check: FAILED (0 of 3 model(s)")  # appended, per GitHub's protocol
    assert md.count("| FK001 |") == 3


def test_missing_external_data_file_is_one_finding_for_the_file(tmp_path):
    from onnx.external_data_helper import convert_model_to_external_data

    m = conv_bn_model(2)
    convert_model_to_external_data(m, all_tensors_to_one_file=True, location="w.data", size_threshold=0)
    onnx.save(m, str(tmp_path / "m.onnx"))
    os.remove(tmp_path / "w.data")
    r = invoke("check", tmp_path / "m.onnx", "--format", "json")
    (f,) = json.loads(r.output)["models"][0]["findings"]
    assert r.exit_code == 1 and f["code"] == "FK007" and f["node"] == "w.data" and "more tensor(s)" in f["message"]


def test_subnormal_folded_weights_are_a_numeric_risk(tmp_path):
    m = conv_bn_model(2)
    for t in m.graph.initializer:
        if t.name.endswith("scale") or "scale" in t.name:
            arr = onnx.numpy_helper.to_array(t).copy()
            arr[0] = 1e-39  # a gamma near 0: the folded channel is subnormal
            t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    r = invoke("check", save(m, tmp_path), "--format", "json")
    risks = [f for f in json.loads(r.output)["models"][0]["findings"] if f["code"] == "FK004"]
    assert risks and "subnormal" in risks[0]["message"], r.output


def test_every_refusal_code_has_a_finding_and_check_maps_codes_not_words():
    from foldkit.codes import FINDINGS, PRIORITY, Why

    assert set(FINDINGS) == set(Why) == set(PRIORITY)
    assert all(code in ("FK002", "FK003", "FK004", "FK005") for code, _ in FINDINGS.values())
    # a refusal reworded beyond recognition keeps its finding: check reads the code, not the words
    import foldkit
    import foldkit.math as fm

    m = base(var=[-5.0] * 6)
    (a,) = foldkit.fold(m, verify=False).report.actions
    assert a.action == "kept" and a.code == Why.INVALID_PARAMETERS.value
    real = fm.bn_scale_shift

    def reworded(*args, **kw):
        try:
            return real(*args, **kw)
        except fm.FoldArithmeticError as e:
            raise fm.FoldArithmeticError("these statistics are unusable", e.code) from None
    import foldkit.passes.common as pc

    pc.bn_scale_shift, saved = reworded, pc.bn_scale_shift
    try:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "m.onnx")
            onnx.save(m, p)
            r = invoke("check", p, "--format", "json")
    finally:
        pc.bn_scale_shift = saved
    (f,) = [f for f in json.loads(r.output)["models"][0]["findings"] if f["code"] != "FK006"]
    assert f["code"] == "FK005" and "unusable" in f["message"] and r.exit_code == 1
