"""foldkit bench: CPU measurements for real; GPU runners run when a GPU exists and skip with a reason otherwise."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from foldkit.bench import BenchConfig, run_bench
from foldkit.bench.runners import OrtRunner, TrtRunner, Unavailable
from foldkit.bench.stats import paired_ratio, summarize
from foldkit.cli import main
from tests.helpers import conv_bn_model


def _has_cuda_ort():
    import onnxruntime as ort
    return "CUDAExecutionProvider" in ort.get_available_providers()


def _has_trt():
    try:
        import tensorrt  # noqa: F401
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.fixture
def pair(tmp_path):
    m = conv_bn_model(2, c_in=8, c_out=16, spatial=16)
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    a = tmp_path / "a.onnx"
    onnx.save(m, str(a))
    b = tmp_path / "b.onnx"
    assert CliRunner().invoke(main, ["fold", str(a), "-o", str(b), "-q"]).exit_code == 0
    return a, b


def test_paired_ratio_detects_a_real_speedup_and_not_noise():
    rng = np.random.default_rng(0)
    base = rng.normal(10e6, 0.5e6, 200)
    fast = base * 0.5 * rng.normal(1, 0.02, 200)
    r = paired_ratio(fast, base)
    assert 0.48 < r["ratio"] < 0.52 and r["significant"] and r["ci95"][1] < 1
    same = base * rng.normal(1, 0.05, 200)
    assert not paired_ratio(same, base)["significant"]


def test_summarize():
    s = summarize([1e6, 2e6, 3e6, 4e6], batch=8)
    assert s["p50_ms"] == 2.5 and s["mean_ms"] == 2.5 and s["throughput_per_s"] == pytest.approx(3200)


def test_run_bench_interleaved_cpu(pair):
    a, b = pair
    res = run_bench(BenchConfig(models=[str(a), str(b)], ort_opt_levels=["disable", "all"], batches=[1, 4],
                                warmup=2, iters=8))
    assert len(res.rows) == 2 * 2 * 2
    for row in res.rows:
        assert row["n"] == 8 and len(row["samples_ms"]) == 8
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["load_s"] > 0
    firsts = [r for r in res.rows if r["model"] == "a.onnx"]
    assert all(r["vs_first"] is None for r in firsts)
    assert all(r["vs_first"]["ratio"] > 0 for r in res.rows if r["model"] == "b.onnx")
    assert {r["runtime"] for r in res.rows} == {"ort-cpu[disable]", "ort-cpu[all]"}


def test_unavailable_runtime_is_reported_and_others_run(pair):
    a, b = pair
    res = run_bench(BenchConfig(models=[str(a), str(b)], runtimes=["ort-cpu", "trt"], ort_opt_levels=["all"],
                                warmup=1, iters=3))
    assert len(res.rows) == 2
    if not _has_trt():
        assert res.unavailable and res.unavailable[0]["runtime"] == "trt"


def test_fixed_batch_is_unavailable_with_reason(tmp_path):
    p = tmp_path / "f.onnx"
    onnx.save(conv_bn_model(2), str(p))
    res = run_bench(BenchConfig(models=[str(p)], ort_opt_levels=["all"], batches=[4], warmup=0, iters=2))
    assert not res.rows and "fixed batch of 2" in res.unavailable[0]["reason"]


def test_cli_bench_outputs(pair, tmp_path):
    a, b = pair
    j, md, png = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "b.png"
    r = CliRunner().invoke(main, ["bench", str(a), str(b), "--iters", "4", "--warmup", "1", "--batch", "1,2",
                                  "--json", str(j), "--markdown", str(md), "--plot", str(png)])
    assert r.exit_code == 0, r.output
    d = json.loads(j.read_text())
    assert len(d["rows"]) == 8 and d["machine"]["cpu_count"] >= 1
    m = d["machine"]  # every latency table names the CPU, its int8 features and the threads
    assert m["cpu_model"] and isinstance(m["int8_features"], list) and "runtime default" in str(m["threads"])
    assert "| ort-cpu[disable] | 1 | a.onnx |" in md.read_text() and "int8 features:" in md.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = CliRunner().invoke(main, ["bench", str(a), "--runtime", "nope"])
    assert r.exit_code == 2 and "--runtime 'nope'" in r.output


@pytest.fixture
def mlp_onnx(tmp_path, monkeypatch):
    """models/mlp.py:mlp_bn exported (unfolded) for the torch runtimes, from the checkout's root."""
    pytest.importorskip("torch", reason="the torch extra is not installed")
    import os
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    m = tmp_path / "mlp.onnx"
    r = CliRunner().invoke(main, ["export", "--model", "models/mlp.py:mlp_bn", "--input-shape", "4,64", "-o", str(m), "-q"])
    assert r.exit_code == 0, r.output
    return m


def test_torch_runtime(mlp_onnx):
    m = mlp_onnx
    res = run_bench(BenchConfig(models=[str(m)], runtimes=["torch"], batches=[4], warmup=1, iters=3,
                                torch_model="models/mlp.py:mlp_bn"))
    assert [row["model"] for row in res.rows] == ["pytorch models/mlp.py:mlp_bn", "pytorch models/mlp.py:mlp_bn (fold_bn)"]


def _has_cuda_torch():
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _has_cuda_torch(), reason="no CUDA device for PyTorch")
def test_torch_cuda_runtime_times_both_modules_on_the_gpu(mlp_onnx):
    m = mlp_onnx
    res = run_bench(BenchConfig(models=[str(m)], runtimes=["torch-cuda"], batches=[4], warmup=2, iters=5,
                                torch_model="models/mlp.py:mlp_bn"))
    assert not res.unavailable, res.unavailable
    assert [(row["model"], row["runtime"]) for row in res.rows] == [
        ("pytorch models/mlp.py:mlp_bn", "torch-cuda"), ("pytorch models/mlp.py:mlp_bn (fold_bn)", "torch-cuda")]
    assert all(row["p50_ms"] > 0 for row in res.rows)


@pytest.mark.skipif(_has_cuda_torch(), reason="a CUDA device is present (the runtime then runs)")
def test_torch_cuda_runtime_without_a_gpu_is_an_unavailable_entry(mlp_onnx):
    m = mlp_onnx
    res = run_bench(BenchConfig(models=[str(m)], runtimes=["torch", "torch-cuda"], batches=[4], warmup=1, iters=3,
                                torch_model="models/mlp.py:mlp_bn"))
    assert [row["runtime"] for row in res.rows] == ["torch", "torch"]
    assert res.unavailable == [{"runtime": "torch-cuda", "batch": 4, "reason": "no CUDA device"}]


@pytest.mark.skipif(not _has_cuda_ort(), reason="no CUDAExecutionProvider (needs onnxruntime-gpu and an NVIDIA GPU)")
def test_ort_cuda_runner_with_io_binding(pair):
    a, b = pair
    res = run_bench(BenchConfig(models=[str(a), str(b)], runtimes=["ort-cuda"], ort_opt_levels=["disable", "all"],
                                warmup=3, iters=10))
    assert len(res.rows) == 4 and not res.unavailable


@pytest.mark.skipif(not _has_trt(), reason="TensorRT or a CUDA device is not available")
def test_tensorrt_runner_fp32_and_fp16(pair, tmp_path):
    a, b = pair
    for fp16 in (False, True):
        res = run_bench(BenchConfig(models=[str(a), str(b)], runtimes=["trt"], warmup=3, iters=10, fp16=fp16,
                                    cache_dir=str(tmp_path / "cache")))
        assert len(res.rows) == 2 and not res.unavailable
    assert len(list((tmp_path / "cache").iterdir())) == 4  # two models x two precisions, cached


def test_gpu_runners_report_unavailable_without_gpu(pair):
    a, _ = pair
    feeds = {"X": np.zeros((1, 8, 16, 16), np.float32)}
    if not _has_cuda_ort():
        with pytest.raises(Unavailable, match="CUDAExecutionProvider is not available"):
            OrtRunner(str(a), feeds, "ort-cuda").__enter__()
    if not _has_trt():
        with pytest.raises(Unavailable):
            TrtRunner(str(a), feeds).__enter__()


# --- one input-shape grammar, and --batch reconciled with it -----------------------------------------

@pytest.mark.parametrize("spec", ["X:4,8,16,16", "X:4x8x16x16", "X=4,8,16,16", "4,8,16,16", "4x8x16x16"])
def test_every_input_shape_convention_gives_the_same_batch_and_the_table_says_it(pair, tmp_path, spec):
    a, b = pair
    out = tmp_path / "b.json"
    r = CliRunner().invoke(main, ["bench", str(a), str(b), "--input-shape", spec, "--iters", "3", "--warmup", "0",
                                  "--ort-opt-level", "disable", "--json", str(out)])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())["rows"]
    assert {row["batch"] for row in rows} == {4}  # what really ran, not the --batch default


def test_batch_and_input_shape_that_disagree_are_refused(pair):
    a, b = pair
    r = CliRunner().invoke(main, ["bench", str(a), "--input-shape", "X:4,8,16,16", "--batch", "2", "--iters", "2"])
    assert r.exit_code == 2 and "disagree on the batch size" in r.output and r.output.count("\n") == 1
    r = CliRunner().invoke(main, ["bench", str(a), "--input-shape", "X:4,8,16,16", "--batch", "4", "--iters", "2",
                                  "--warmup", "0", "--ort-opt-level", "disable"])
    assert r.exit_code == 0, r.output


def test_input_shape_grammar_errors_are_one_line_and_plain_dims_need_a_single_input(tmp_path):
    from foldkit.errors import InputError
    from foldkit.verify import parse_input_shapes, resolve_input_shapes

    assert parse_input_shapes(["input:0:1x3x2x2"]) == {"input:0": [1, 3, 2, 2]}  # TensorFlow-style names
    assert parse_input_shapes(["a=b:1,2"]) == {"a=b": [1, 2]}
    assert parse_input_shapes(["s:"]) == {"s": []}  # a scalar input
    for bad in ["x:0,3", "x:-1,3", "x:1,a", ":1,2", "", "x:1,,2"]:
        with pytest.raises(InputError):
            parse_input_shapes([bad])
    with pytest.raises(InputError, match="given twice"):
        parse_input_shapes(["1,2", "3,4"])
    two = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 2] a, float[N, 2] b) => (float[N, 2] c) { c = Add(a, b) }""")
    with pytest.raises(InputError, match="only fits a model with one input"):
        resolve_input_shapes(two, parse_input_shapes(["1,2"]))
    with pytest.raises(InputError, match="not inputs of the model"):
        resolve_input_shapes(two, parse_input_shapes(["zz:1,2"]))
    assert resolve_input_shapes(two, parse_input_shapes(["a:3,2", "b=3x2"])) == {"a": [3, 2], "b": [3, 2]}


def test_too_few_rounds_are_reported_as_such():
    rng = np.random.default_rng(0)
    base = rng.normal(10e6, 0.1e6, 5)
    r = paired_ratio(base * 0.5, base)
    assert not r["enough_rounds"] and not r["significant"] and "too few" in r["note"]
    assert paired_ratio(np.tile(base, 5) * 0.5, np.tile(base, 5))["significant"]


def _without_torch(args, cwd):
    """Run the CLI in a fresh interpreter in which `import torch` fails, as on a core-only install."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "from foldkit.cli import main\nsys.argv = ['foldkit'] + sys.argv[1:]\nmain()")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_bench_works_without_torch_and_torch_runtime_says_what_to_install(pair, tmp_path):
    a, b = pair
    r = _without_torch(["bench", str(a), str(b), "--iters", "2", "--warmup", "0", "--ort-opt-level", "disable",
                        "--json", str(tmp_path / "b.json")], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "torch" not in json.loads((tmp_path / "b.json").read_text())["machine"]
    r = _without_torch(["bench", str(a), "--runtime", "torch", "--model", "x.py:f", "--model-arg", "k=1",
                        "--iters", "2"], tmp_path)
    assert r.returncode == 2 and "foldkit-onnx[torch]" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _without_torch(["export", "--model", "x.py:f", "--input-shape", "1,3", "-o", str(tmp_path / "o.onnx")], tmp_path)
    assert r.returncode == 2 and "foldkit-onnx[torch]" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_model_arg_values_must_be_python_literals():
    from foldkit.errors import InputError
    from foldkit.factory import parse_model_args

    assert parse_model_args(["n=3", "s='a'", "t=(1, 2)", "f=None", "d={'k': 1.5}"]) == \
        {"n": 3, "s": "a", "t": (1, 2), "f": None, "d": {"k": 1.5}}
    for bad in ["name=resnet", "x=1+", "x=__import__('os')", "=3", "3=4"]:
        with pytest.raises(InputError):
            parse_model_args([bad])


def test_module_factory_is_found_in_the_current_folder_as_python_m_does(tmp_path):
    pkg = tmp_path / "mynets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tiny.py").write_text("def build(width=2):\n    return width\n")
    import subprocess
    import sys

    code = ("import sys; sys.path = [p for p in sys.path if p not in ('', '.')] ; import os\n"
            "from foldkit.factory import load_factory\nprint(load_factory('mynets.tiny:build')(width=5))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "5", r.stderr


def test_openvino_runner_joins_the_interleaved_rounds(pair):
    pytest.importorskip("openvino", reason="openvino is not installed (the bench extra)")
    a, b = pair
    res = run_bench(BenchConfig(models=[str(a), str(b)], runtimes=["openvino", "ort-cpu"], ort_opt_levels=["disable"],
                                batches=[1, 2], warmup=1, iters=4))
    assert not res.unavailable, res.unavailable
    ov_rows = [r for r in res.rows if r["runtime"] == "openvino"]
    assert [(r["model"], r["batch"]) for r in ov_rows] == [("a.onnx", 1), ("b.onnx", 1), ("a.onnx", 2), ("b.onnx", 2)]
    assert all(r["n"] == 4 and r["p50_ms"] > 0 for r in ov_rows) and ov_rows[1]["vs_first"]["rounds"] == 4


def test_openvino_computes_what_onnx_runtime_computes_on_the_folded_model(pair):
    ov = pytest.importorskip("openvino", reason="openvino is not installed (the bench extra)")
    import onnxruntime as ort

    a, b = pair
    x = np.random.default_rng(0).standard_normal((1, 8, 16, 16)).astype(np.float32)
    core = ov.Core()
    for path in (a, b):
        compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        got = compiled({"X": x})[0]
        want = ort.InferenceSession(str(a)).run(None, {"X": x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_plot_answers_is_it_faster_and_is_deterministic(pair, tmp_path):
    pytest.importorskip("matplotlib")
    from foldkit.bench.core import plot_png

    a, b = pair
    res = run_bench(BenchConfig(models=[str(a), str(b)], ort_opt_levels=["disable", "all"], batches=[1], warmup=0,
                                iters=6))
    png = plot_png(res)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == plot_png(res)  # same result, same bytes
    import matplotlib.image as mpimg
    import io as _io

    h, w = mpimg.imread(_io.BytesIO(png)).shape[:2]
    assert w > 800 and h > 150  # one row per runtime and batch, labels beside it
    r = CliRunner().invoke(main, ["bench", str(a), "--plot", str(tmp_path / "p.png"), "--iters", "2"])
    assert r.exit_code == 2 and "at least two models" in r.output and not (tmp_path / "p.png").exists()


def test_runner_lifecycle_is_guarded_and_the_torch_runner_restores_the_callers_module(pair):
    from foldkit.bench.runners import TorchRunner

    a, _ = pair
    feeds = {"X": np.zeros((1, 8, 16, 16), np.float32)}
    r = OrtRunner(str(a), feeds, "ort-cpu", "disable")
    with pytest.raises(RuntimeError, match="not active"):
        r.infer()
    with r:
        assert r.is_active and r.infer() > 0
        with pytest.raises(RuntimeError, match="already active"):
            r.activate()
    assert not r.is_active
    torch = pytest.importorskip("torch")
    module = torch.nn.Sequential(torch.nn.Conv2d(8, 4, 3), torch.nn.BatchNorm2d(4)).train()
    with TorchRunner(None, feeds, module=module) as t:
        assert not module.training and t.infer() > 0  # eval while measured
    assert module.training  # the caller's module as it was


def test_run_bench_deactivates_every_runner_when_one_fails(pair, monkeypatch):
    from foldkit.bench import runners

    a, b = pair
    states = []
    real = runners.OrtRunner.infer_impl

    def failing(self):
        states.append(self)
        if len(states) > 3:
            raise RuntimeError("boom")
        return real(self)
    monkeypatch.setattr(runners.OrtRunner, "infer_impl", failing)
    res = run_bench(BenchConfig(models=[str(a), str(b)], ort_opt_levels=["disable"], batches=[1], warmup=1, iters=4))
    assert res.unavailable and "boom" in res.unavailable[0]["reason"]
    assert states and not any(s.is_active for s in states)


def test_a_bug_in_one_group_is_its_result_and_the_others_are_measured_and_written(pair, tmp_path, monkeypatch):
    """As for check: an internal error met in one runtime/batch group is that group's entry (reason,
    internal), every other group is measured, --json and --markdown are written, the run exits 3 with
    one stderr line per bug, and --debug raises it."""
    import foldkit.bench.core as core

    a, b = pair
    real = core._measure

    def buggy(runners, warmup, iters, tick):
        if any(getattr(r, "opt_level", None) == "disable" for r in runners):
            raise KeyError("a bug")
        return real(runners, warmup, iters, tick)

    monkeypatch.setattr(core, "_measure", buggy)
    j, md = tmp_path / "b.json", tmp_path / "b.md"
    r = CliRunner().invoke(main, ["bench", str(a), str(b), "--iters", "4", "--warmup", "1", "--ort-opt-level",
                                  "disable,all", "--json", str(j), "--markdown", str(md), "-q"])
    assert r.exit_code == 3, r.output
    assert r.stderr.count("\n") == 1 and "internal error: KeyError" in r.stderr and "ort-cpu[disable]" in r.stderr
    d = json.loads(j.read_text())
    assert {row["runtime"] for row in d["rows"]} == {"ort-cpu[all]"} and len(d["rows"]) == 2
    (u,) = d["unavailable"]
    assert u["internal"] and u["runtime"] == "ort-cpu[disable]" and "internal error" in u["reason"]
    assert "ort-cpu[disable]" in md.read_text()
    r = CliRunner().invoke(main, ["--debug", "bench", str(a), str(b), "--iters", "4", "--ort-opt-level", "disable"])
    assert isinstance(r.exception, KeyError)
