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
from tests.test_fold_into_producer import conv_bn_model
from tests.test_refusals import base


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
    assert [f["code"] for f in d["findings"]] == ["FK001"] and d["passed"] is False
    assert "foldkit fold" in d["findings"][0]["message"]
    out = tmp_path / "f.onnx"
    assert invoke("fold", p, "-o", out, "-q").exit_code == 0
    r = invoke("check", out)
    assert r.exit_code == 0 and "ready to deploy" in r.output


def test_training_mode_is_an_error(tmp_path):
    from tests.test_inference_mode import model
    r = invoke("check", save(model(17, training=True), tmp_path), "--format", "json")
    assert r.exit_code == 1
    assert "FK002" in [f["code"] for f in json.loads(r.output)["findings"]]


def test_unfoldable_bn_is_a_warning(tmp_path):
    p = save(fill_output_shapes(base(producer="Relu", bn_channels=4)), tmp_path)
    r = invoke("check", p, "--format", "json")
    assert r.exit_code == 0
    (f,) = json.loads(r.output)["findings"]
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
    assert code in [f["code"] for f in json.loads(r.output)["findings"]]


def test_fp16_precision_and_overflow_risks(tmp_path):
    from tests.test_dtypes_and_scopes import typed_conv_bn
    m = typed_conv_bn(np.float32, F32, scale=1.0)
    for t in m.graph.initializer:
        if t.name == "v":
            t.CopyFrom(tensor("v", np.full(6, 1e-9, np.float32)))
        if t.name == "s":
            t.CopyFrom(tensor("s", np.full(6, 100.0, np.float32)))
    r = invoke("check", save(m, tmp_path), "--format", "json")
    codes = [f["code"] for f in json.loads(r.output)["findings"]]
    assert "FK004" in codes and "FK001" in codes
    m16 = typed_conv_bn(np.float16, TensorProto.FLOAT16, scale=1.0)
    for t in m16.graph.initializer:
        if t.name == "s":
            t.CopyFrom(tensor("s", np.full(6, 1e-4, np.float16)))
    r = invoke("check", save(m16, tmp_path, "h.onnx"), "--format", "json")
    risks = [f for f in json.loads(r.output)["findings"] if f["code"] == "FK004"]
    assert risks and "subnormal" in risks[0]["message"]


def test_checker_failure_is_an_error(tmp_path):
    m = conv_bn_model(2)
    m.graph.node[0].op_type = "NoSuchOp"
    r = invoke("check", save(m, tmp_path), "--format", "json")
    assert r.exit_code == 1 and "FK006" in [f["code"] for f in json.loads(r.output)["findings"]]


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
    (f,) = json.loads(r.output)["findings"]
    assert f["code"] == "FK007" and msg in f["message"]
    r = invoke("fold", p, "-o", tmp_path / "o.onnx")
    assert r.exit_code == 2 and msg in r.output and not (tmp_path / "o.onnx").exists()


def test_github_and_junit_formats(tmp_path):
    p = save(conv_bn_model(2), tmp_path)
    r = invoke("check", p, "--format", "github")
    assert r.exit_code == 1 and r.output.startswith(f"::error file={p},title=FK001 bn::")
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
                assert out.exists() and "passed" in r.output
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
    risks = [f for f in json.loads(res.output)["findings"] if f["code"] == "FK004"]
    assert risks and word in risks[0]["message"], res.output
