"""foldkit fold through click's CliRunner and a real subprocess; bad input and atomic writes."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from foldkit.cli import main
from tests.helpers import op_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_fold_writes_model_and_report(conv_bn_path, tmp_path):
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    r = invoke("fold", conv_bn_path, "-o", out, "--report", rep)
    assert r.exit_code == 0, r.output
    assert "folded" in r.output and "passed" in r.output
    report = json.loads(rep.read_text())
    assert report["bn_before"] == 1 and report["bn_after"] == 0
    assert report["actions"][0]["node"] == "bn" and report["actions"][0]["action"] == "folded"
    assert report["actions"][0]["target"] == "Conv 'conv'"
    assert report["verification"]["passed"] is True
    assert {"max_abs_err", "max_rel_err", "atol", "rtol"} <= set(report["verification"])
    assert op_count(onnx.load(str(out)), "BatchNormalization") == 0


def test_fold_output_is_byte_identical_across_runs(conv_bn_path, tmp_path):
    for name in ("a.onnx", "b.onnx"):
        assert invoke("fold", conv_bn_path, "-o", tmp_path / name, "-q").exit_code == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert invoke("fold", tmp_path / "a.onnx", "-o", tmp_path / "c.onnx", "-q").exit_code == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "c.onnx").read_bytes()


def test_verification_failure_exits_1_and_writes_nothing(conv_bn_path, tmp_path):
    out = tmp_path / "out.onnx"
    r = invoke("fold", conv_bn_path, "-o", out, "--atol", "0", "--rtol", "0")
    assert r.exit_code == 1
    assert "verification failed" in r.output
    assert not out.exists() and os.listdir(tmp_path) == ["model.onnx"]


def test_no_verify(conv_bn_path, tmp_path):
    r = invoke("fold", conv_bn_path, "-o", tmp_path / "o.onnx", "--no-verify", "--report", tmp_path / "r.json")
    assert r.exit_code == 0 and "skipped" in r.output
    assert json.loads((tmp_path / "r.json").read_text())["verification"] is None


def test_input_shape_and_skip(conv_bn_path, tmp_path):
    r = invoke("fold", conv_bn_path, "-o", tmp_path / "o.onnx", "--input-shape", "X=2,4,5,5", "--skip", "producer")
    assert r.exit_code == 0 and "kept" in r.output
    r = invoke("fold", conv_bn_path, "-o", tmp_path / "o.onnx", "--input-shape", "X=3,4,5,5")
    assert r.exit_code == 2 and "dimension 0 is fixed to 2 in the model, not 3" in r.output
    r = invoke("fold", conv_bn_path, "-o", tmp_path / "o.onnx", "--skip", "nonsense")
    assert r.exit_code == 2 and "unknown pass" in r.output
    r = invoke("fold", conv_bn_path, "-o", tmp_path / "o.onnx", "--input-shape", "nope=1")
    assert r.exit_code == 2 and "not inputs of the model" in r.output


BAD = {
    "missing": None,
    "directory": "dir",
    "empty": b"",
    "random": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
    "text": b"this is not a model\n",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_inputs(kind, tmp_path):
    p = tmp_path / "in.onnx"
    if kind == "directory":
        p.mkdir()
    elif BAD[kind] is not None:
        p.write_bytes(BAD[kind])
    out = tmp_path / "out.onnx"
    r = invoke("fold", p, "-o", out)
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert line.startswith("foldkit: error:") and "\n" not in line and "Traceback" not in line
    assert not out.exists()


def test_truncated_model(conv_bn_path, tmp_path):
    data = conv_bn_path.read_bytes()
    p = tmp_path / "t.onnx"
    p.write_bytes(data[: len(data) // 2])
    r = invoke("fold", p, "-o", tmp_path / "o.onnx")
    assert r.exit_code == 2 and "foldkit: error:" in r.output


def test_dangling_reference(tmp_path):
    from tests.helpers import conv_bn_model
    m = conv_bn_model(2)
    del m.graph.initializer[0]  # W
    p = tmp_path / "d.onnx"
    onnx.save(m, str(p))
    r = invoke("fold", p, "-o", tmp_path / "o.onnx")
    assert r.exit_code == 2 and "reads 'W', which does not exist" in r.output


def test_refuses_to_overwrite_input_unless_in_place(conv_bn_path):
    before = conv_bn_path.read_bytes()
    r = invoke("fold", conv_bn_path, "-o", conv_bn_path)
    assert r.exit_code == 2 and "--in-place" in r.output
    assert conv_bn_path.read_bytes() == before
    r = invoke("fold", conv_bn_path, "-o", conv_bn_path, "--in-place")
    assert r.exit_code == 0 and conv_bn_path.read_bytes() != before


def test_output_folder_missing(conv_bn_path, tmp_path):
    r = invoke("fold", conv_bn_path, "-o", tmp_path / "nope" / "o.onnx")
    assert r.exit_code == 2 and "does not exist" in r.output


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    from foldkit import io as fio
    target = tmp_path / "o.onnx"
    target.write_bytes(b"old")

    def boom(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        fio.atomic_write(str(target), b"new contents", durable=True)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["o.onnx"]


def test_subprocess_fold(conv_bn_path, tmp_path):
    out = tmp_path / "o.onnx"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), "fold", str(conv_bn_path), "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "passed" in p.stdout and out.exists()
    p = subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), "fold", str(tmp_path / "none.onnx"), "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_write_leaves_no_partial_file(tmp_path, sig):
    """A fold interrupted while writing leaves neither the output nor a temp file."""
    script = f"""
import os, sys, time
sys.path.insert(0, {ROOT!r})
from foldkit import io as fio
from foldkit.cli import _sigterm
import signal
signal.signal(signal.SIGTERM, _sigterm)
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job inherits SIGINT ignored
real = os.fsync
def slow(fd):
    print("writing", flush=True)
    time.sleep(30)
os.fsync = slow
fio.atomic_write({str(tmp_path / 'o.onnx')!r}, b"x" * 1000, durable=True)
"""
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
        p.send_signal(sig)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode != 0
    assert os.listdir(tmp_path) == []


def test_fsync_is_opt_in_and_writes_the_same_bytes(conv_bn_path, tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    assert invoke("fold", conv_bn_path, "-o", tmp_path / "a.onnx", "-q", "--report", tmp_path / "a.json").exit_code == 0
    assert calls == []
    assert invoke("fold", conv_bn_path, "-o", tmp_path / "b.onnx", "-q", "--fsync", "--report", tmp_path / "b.json").exit_code == 0
    assert len(calls) == 2  # the model and the report
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert invoke("fold", conv_bn_path, "-o", tmp_path / "c.onnx", "-q", "--no-fsync").exit_code == 0
    assert len(calls) == 2


QUICK_EXIT_PROBE = """
import atexit, sys, threading, time
from foldkit.entry import run
here = sys.argv.pop(1)
class Teardown:
    def __del__(self, open=open, path=here + "/teardown"):  # builtins may be gone by then
        open(path, "w").close()
keep = Teardown()
atexit.register(lambda: open(here + "/atexit", "w").close())
def late():
    time.sleep(0.3)
    open(here + "/thread", "w").close()
threading.Thread(target=late).start()
run(prog_name="foldkit")
"""


def test_fold_and_check_end_as_python_would_less_the_module_teardown(conv_bn_path, tmp_path):
    def probe(*args):
        for f in ("teardown", "atexit", "thread"):
            (tmp_path / f).unlink(missing_ok=True)
        p = subprocess.run([sys.executable, "-c", QUICK_EXIT_PROBE, str(tmp_path), *map(str, args)],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
        return p, {f for f in ("teardown", "atexit", "thread") if (tmp_path / f).exists()}

    out = tmp_path / "o.onnx"
    p, left = probe("fold", conv_bn_path, "-o", out, "-v")
    assert p.returncode == 0 and out.exists(), p.stderr
    assert "folded: bn into Conv 'conv'" in p.stdout  # stdout (a pipe: block-buffered) was flushed
    assert left == {"atexit", "thread"}  # other threads joined, atexit handlers run; no module teardown
    p, left = probe("check", conv_bn_path, "--format", "json")
    assert p.returncode == 1 and json.loads(p.stdout)["exit_code"] == 1, p.stdout + p.stderr  # the exit code kept
    assert left == {"atexit", "thread"}
    # a command that may run user code (a FILE.py:FN data loader) ends as Python's exit does
    p, left = probe("check", conv_bn_path, "--data", tmp_path / "missing.npz")
    assert p.returncode == 2 and left == {"teardown", "atexit", "thread"}, p.stderr


def test_python_dash_m_foldkit(conv_bn_path, tmp_path):
    out = tmp_path / "o.onnx"
    p = subprocess.run([sys.executable, "-m", "foldkit", "fold", str(conv_bn_path), "-o", str(out), "-q"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0 and out.exists(), p.stderr
    p = subprocess.run([sys.executable, "-m", "foldkit", "--version"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 0 and p.stdout.startswith("foldkit 0.1.0 (distribution foldkit-onnx)"), p.stdout + p.stderr
