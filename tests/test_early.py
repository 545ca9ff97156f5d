"""The original's half of verification runs on a worker thread while the folds and the write go on
(foldkit.early), and the written file runs with its tensors mapped from it (foldkit.backends). Both
are speed-ups only: the verdicts, reports and errors are the ones the plain order gives; a worker
that is not needed stops; it prints nothing; and a written file that is wrong still fails."""

import json
import os
import threading

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto

import foldkit
import foldkit.api as api
from foldkit.cli import main
from tests.helpers import _ill_conditioned, conv_bn_model, typed_conv_bn


def _workers():
    return [t for t in threading.enumerate() if t.name == "foldkit-reference-run"]


def _fold_cli(tmp_path, m, *extra):
    p, out, rep = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(m, str(p))
    r = CliRunner().invoke(main, ["fold", str(p), "-o", str(out), "--report", str(rep), *extra])
    return r, out, (json.loads(rep.read_text()) if rep.exists() else None)


def _random_model():
    m = conv_bn_model(2)
    g = m.graph
    g.node[1].output[0] = "bn_out"
    g.node.extend([onnx.helper.make_node("RandomNormalLike", ["bn_out"], ["noise"]),
                   onnx.helper.make_node("Add", ["bn_out", "noise"], ["Y"])])
    return m


MODELS = {
    "conv+bn": lambda: conv_bn_model(2, c_in=16, c_out=32),
    "grouped conv1d": lambda: conv_bn_model(1, group=2),
    "ill-conditioned (noise floor)": lambda: _ill_conditioned(),
    "float64 conv (reference evaluator)": lambda: typed_conv_bn(np.float64, TensorProto.DOUBLE),
    "random outputs": _random_model,
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_early_run_gives_the_report_the_plain_order_gives(tmp_path, monkeypatch, name):
    r1, out1, early = _fold_cli(tmp_path, MODELS[name](), "--skip", "branches") if "ill" in name else \
        _fold_cli(tmp_path, MODELS[name]())
    bytes1 = out1.read_bytes() if out1.exists() else None
    monkeypatch.setattr(api, "ReferenceRun", lambda *a, **k: None)  # the plain order: both halves after the write
    (tmp_path / "o.onnx").unlink(missing_ok=True)
    r2, out2, plain = _fold_cli(tmp_path, MODELS[name](), "--skip", "branches") if "ill" in name else \
        _fold_cli(tmp_path, MODELS[name]())
    assert r1.exit_code == r2.exit_code == 0, (r1.output, r2.output)
    assert early["verification"] == plain["verification"]
    assert bytes1 == (out2.read_bytes() if out2.exists() else None)
    assert not _workers()


def test_an_input_shape_error_met_by_the_worker_is_the_same_usage_error(tmp_path):
    m = conv_bn_model(2)
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p))
    r = CliRunner().invoke(main, ["fold", str(p), "-o", str(tmp_path / "o.onnx"), "--input-shape", "X:1,2,3"])
    assert r.exit_code == 2 and "--input-shape for 'X' has 3 dimensions" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o.onnx").exists()


def test_a_fold_that_fails_stops_its_worker(tmp_path, monkeypatch):
    """A pass that raises after the worker started: the error is the fold's, and the worker ends."""
    from foldkit.passes.fold_into_producer import FoldIntoProducer

    def broken(self, ctx):
        raise MemoryError("out of memory in a pass")
    monkeypatch.setattr(FoldIntoProducer, "run", broken)
    with pytest.raises(MemoryError):
        foldkit.fold(conv_bn_model(2, c_in=16, c_out=32))
    for t in _workers():
        t.join(60)
    assert not _workers()


def test_nothing_to_compare_cancels_the_worker_and_the_run_is_computed_if_asked():
    """Every BN refused: the worker is cancelled; its result, asked anyway, is computed in line."""
    from foldkit.early import ReferenceRun
    from foldkit.io import serialize

    m = conv_bn_model(2)
    job = ReferenceRun(serialize(m))
    job.cancel()
    stage = job.result()
    assert stage.why is None and stage.backend == "onnxruntime-cpu" and len(stage.ref_out) == 1
    assert not _workers()


def test_the_worker_prints_nothing_where_ort_cannot_run_the_model(tmp_path, capfd):
    """No ORT kernel for a float64 Conv: ORT's wrapper would print an "EP Error" banner while it
    falls back; on the worker nothing may reach stdout (a --json report goes there)."""
    r, out, rep = _fold_cli(tmp_path, typed_conv_bn(np.float64, TensorProto.DOUBLE))
    captured = capfd.readouterr()
    assert r.exit_code == 0 and rep["verification"]["backend"] == "onnx-reference"
    assert "EP Error" not in captured.out + captured.err + r.output


@pytest.mark.parametrize("damage", ["one weight changed", "file truncated"])
def test_a_damaged_written_file_still_fails_verification(tmp_path, monkeypatch, damage):
    """The written file runs with its tensors mapped from it: a folded weight changed on disk after
    the write, or a file cut short, fails verification (exit 1) and nothing takes the name."""
    from foldkit import wire

    real = wire.write_model

    def damaging(model, out, *a, **k):
        real(model, out, *a, **k)
        out.flush()
        fd, size = out.fileno(), os.fstat(out.fileno()).st_size
        if damage == "file truncated":
            os.ftruncate(fd, size // 2)
        else:  # the folded weight W: the largest tensor, right after its header
            w = np.frombuffer(os.pread(fd, size, 0), np.uint8)
            folded = foldkit.fold(conv_bn_model(2, c_in=16, c_out=32), verify=False).model
            want = next(t for t in folded.graph.initializer if t.name == "W").raw_data
            at = w.tobytes().find(want)
            assert at > 0
            os.pwrite(fd, np.float32(1e3).tobytes(), at + 4 * 17)
    monkeypatch.setattr(wire, "write_model", damaging)
    (tmp_path / "o.onnx").write_bytes(b"previous")
    r, out, rep = _fold_cli(tmp_path, conv_bn_model(2, c_in=16, c_out=32))
    assert r.exit_code == 1 and "verification failed" in r.output, r.output
    assert out.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "o.onnx", "r.json"]
    assert not rep["verification"]["passed"]
