"""Conventions every command keeps: -q/-v, --version, JSON envelopes, plain output off a terminal,
ASCII terminals, the report written on a verification failure, and the public API's shape."""

import json
import os
import subprocess
import sys
import warnings

import onnx
import pytest
from click.testing import CliRunner

import foldkit
from foldkit.cli import main
from tests.helpers import conv_bn_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def model(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(2), str(p))
    return p


@pytest.mark.parametrize("command", ["fold", "check", "bench", "export"])
def test_every_command_takes_quiet_and_verbose(command):
    out = invoke(command, "--help").output
    assert "-q, --quiet" in out and "-v, --verbose" in out


def test_version_everywhere():
    from foldkit import __version__

    assert __version__ in invoke("--version").output
    r = subprocess.run([sys.executable, "-m", "foldkit", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and __version__ in r.stdout and "foldkit-onnx" in r.stdout


def test_quiet_prints_nothing_and_verbose_lists_every_bn(model, tmp_path):
    r = invoke("fold", model, "-o", tmp_path / "o.onnx", "-q")
    assert r.exit_code == 0 and r.output == ""
    r = invoke("check", tmp_path / "o.onnx", "-q")
    assert r.exit_code == 0 and r.output == ""
    short = invoke("fold", model, "-o", tmp_path / "o.onnx").output
    assert "folded: bn" not in short and "1 folded" in short  # the summary; every BN only with -v
    long = invoke("fold", model, "-o", tmp_path / "o.onnx", "-v").output
    assert "folded: bn into Conv" in long


def test_plain_output_when_not_a_terminal_names_printed_as_they_are(tmp_path):
    m = conv_bn_model(2)
    bn = next(n for n in m.graph.node if n.op_type == "BatchNormalization")
    bn.name = "bn,1:x::y [bold]:smile:"
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p))
    r = invoke("fold", p, "-o", tmp_path / "o.onnx", "-v")
    lines = r.output.splitlines()
    assert "folded: bn,1:x::y [bold]:smile: into Conv 'conv'" in lines, r.output
    assert not any(ch in r.output for ch in "┃│━╭") and "\U0001f604" not in r.output  # no box drawing, no emoji
    r = invoke("check", p)
    assert r.exit_code == 1 and f"{p}: error FK001 bn,1:x::y [bold]:smile:: " in r.output


def test_an_ascii_only_terminal_never_crashes(tmp_path):
    m = conv_bn_model(2)
    next(n for n in m.graph.node if n.op_type == "BatchNormalization").name = "bn_é_中"
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p))
    env = dict(os.environ, PYTHONIOENCODING="ascii", LC_ALL="C", LANG="C")
    for args in (["fold", str(p), "-o", str(tmp_path / "o.onnx"), "-v"], ["check", str(p)],
                 ["check", str(p), "--format", "github"], ["fold", str(tmp_path / "missing_é.onnx"), "-o", "x.onnx"]):
        r = subprocess.run([sys.executable, "-m", "foldkit", *args], capture_output=True, env=env, cwd=tmp_path)
        assert r.returncode in (0, 1, 2) and b"Traceback" not in r.stderr, (args, r.stderr)
        # the name reaches the log, escaped or (click re-encodes a misdeclared ASCII stdout) as UTF-8
        assert b"bn_\\xe9_\\u4e2d" in r.stdout or "bn_é_中".encode() in r.stdout or r.returncode == 2, (args, r.stdout)


def test_report_is_written_on_verification_failure_and_the_model_is_not(model, tmp_path):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = invoke("fold", model, "-o", out, "--report", rep, "--atol", "0", "--rtol", "0")
    assert r.exit_code == 1 and not out.exists()
    d = json.loads(rep.read_text())
    assert d["verification"]["passed"] is False and d["verification"]["outputs"][0]["max_abs_err"] > 0


def _envelope(d, command, inputs):
    assert d["schema_version"] == 1 and d["tool"] == "foldkit" and d["version"] == foldkit.__version__
    assert d["command"] == command and d["inputs"] == [str(i) for i in inputs]
    assert "seed" in d and "input_shapes" in d


def test_every_json_output_has_the_envelope(model, tmp_path):
    rep = tmp_path / "r.json"
    assert invoke("fold", model, "-o", tmp_path / "o.onnx", "--report", rep, "-q").exit_code == 0
    d = json.loads(rep.read_text())
    _envelope(d, "fold", [model])
    assert d["input_shapes"] == {"X": [2, 4, 5, 5]} and d["seed"] == 0  # what verification really fed
    r = invoke("check", model, tmp_path / "o.onnx", "--format", "json")
    _envelope(json.loads(r.output), "check", [model, tmp_path / "o.onnx"])
    b = tmp_path / "b.json"
    assert invoke("bench", model, "--iters", "2", "--warmup", "0", "--json", b, "-q").exit_code == 0
    d = json.loads(b.read_text())
    _envelope(d, "bench", [model])
    assert list(d["input_shapes"].values()) == [{"X": [2, 4, 5, 5]}, {"X": [2, 4, 5, 5]}]


def test_export_report_shares_the_fold_report_layout(tmp_path):
    pytest.importorskip("torch")
    net = tmp_path / "net.py"
    net.write_text("import torch.nn as nn\n"
                   "def build():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())\n")
    fold_rep, exp_rep = tmp_path / "f.json", tmp_path / "e.json"
    r = invoke("export", "--model", f"{net}:build", "--input-shape", "1x3x8x8", "-o", tmp_path / "n.onnx",
               "--report", exp_rep, "-q")
    assert r.exit_code == 0, r.output
    assert invoke("fold", tmp_path / "n.onnx", "-o", tmp_path / "n2.onnx", "--report", fold_rep, "-q").exit_code == 0
    e, f = json.loads(exp_rep.read_text()), json.loads(fold_rep.read_text())
    assert set(f) <= set(e) and set(e) - set(f) == {"export", "parity"}
    _envelope(e, "export", [f"{net}:build"])
    assert e["input_shapes"] == {"input": [1, 3, 8, 8]} and e["export"]["bn_exported"] == 1 and e["bn_after"] == 0


def test_public_api_check_is_callable_and_the_module_still_importable(model):
    from foldkit.check import check

    assert [f.code for f in foldkit.check(str(model)).findings] == ["FK001"]
    assert [f.code for f in check(str(model)).findings] == ["FK001"]
    import foldkit.check as check_module

    assert check_module.check is check and callable(foldkit.check)


def test_memory_knobs_are_not_main_parameters_but_old_calls_still_work(model, tmp_path):
    import inspect

    params = inspect.signature(foldkit.fold).parameters
    assert not {"lazy", "defer", "spill_dir", "spill_above"} & set(params) and "memory" in params
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = foldkit.fold(str(model), lazy=True, defer=False)
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    new = foldkit.fold(str(model), memory=foldkit.MemoryPolicy(lazy=True))
    assert old.report.bn_after == new.report.bn_after == 0
    with pytest.raises(TypeError):
        foldkit.fold(str(model), bogus=1)
    res = foldkit.fold_file(model, tmp_path / "o.onnx", report=str(tmp_path / "r.json"))
    assert res.report.bn_after == 0 and (tmp_path / "o.onnx").exists() and (tmp_path / "r.json").exists()


def test_fold_file_and_the_cli_write_the_same_bytes(model, tmp_path):
    foldkit.fold_file(model, tmp_path / "api.onnx")
    assert invoke("fold", model, "-o", tmp_path / "cli.onnx", "-q").exit_code == 0
    assert (tmp_path / "api.onnx").read_bytes() == (tmp_path / "cli.onnx").read_bytes()


def test_one_options_object_for_fold_fold_loaded_and_fold_file(model, tmp_path):
    opts = foldkit.FoldOptions(verify=False, skip=("producer",))
    a = foldkit.fold(str(model), opts)
    b = foldkit.fold(str(model), verify=False, skip=("producer",))
    assert a.model.SerializeToString() == b.model.SerializeToString() and a.report.verification is None
    c = foldkit.fold(str(model), opts, skip=())  # a keyword overrides the options object's field
    assert c.report.bn_after == 0 and a.report.bn_after == 1
    foldkit.fold_file(model, tmp_path / "o.onnx", opts)
    assert foldkit.fold(str(tmp_path / "o.onnx"), verify=False).report.bn_before == 1
    with pytest.raises(TypeError):
        foldkit.FoldOptions(bogus=1)
