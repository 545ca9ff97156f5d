"""BN statistics on real data (scikit-learn's bundled digits): check --data flags damaged BNs,
recalibrate repairs them (both estimators meet their definitions against float64 computations
written here), the gate refuses a harmful update, torchrun with 2 ranks equals 1 rank, and the
PyTorch API does the same in place."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

pytest.importorskip("sklearn", reason="scikit-learn (test extra) ships the digits data set")
torch = pytest.importorskip("torch")

from foldkit.cli import main  # noqa: E402
from foldkit.stats import Moments  # noqa: E402
from tests import digits as D  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAMAGE = ("reset", "pruned", "averaged", "batch2")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("digits")
    healthy = D.trained()
    x, y, xt, yt = D.digits()
    paths = {"healthy": D.to_onnx(healthy, d / "healthy.onnx")}
    for kind in DAMAGE:
        paths[kind] = D.to_onnx(D.damaged(healthy, kind), d / f"{kind}.onnx")
    return {"dir": d, "paths": paths, "train": D.save_npz(d / "train.npz", x, y), "test": D.save_npz(d / "test.npz", xt, yt),
            "x": x, "healthy": healthy}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _stats(path):
    m = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    return [(n.name, inits[n.input[3]].astype(np.float64), inits[n.input[4]].astype(np.float64))
            for n in m.graph.node if n.op_type == "BatchNormalization"]


def _bn_inputs(path, x, batch_size=64, batch_mode=False):
    """Every BN input over the data, float64, computed here independently of foldkit.stats: the
    graph with each BN input added as an output, run on ONNX Runtime in inference mode."""
    import onnxruntime as ort

    m = onnx.load(str(path))
    xs = [n.input[0] for n in m.graph.node if n.op_type == "BatchNormalization"]
    for k, v in enumerate(xs):
        m.graph.node.append(helper.make_node("Identity", [v], [f"probe{k}"]))
        m.graph.output.append(helper.make_tensor_value_info(f"probe{k}", onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = [[] for _ in xs]
    for k in range(0, len(x), batch_size):
        got = sess.run(None, {"image": x[k:k + batch_size]})[1:]
        for acc, g in zip(outs, got):
            acc.append(np.moveaxis(np.asarray(g, np.float64), 1, 0).reshape(g.shape[1], -1))
    return [np.concatenate(o, axis=1) for o in outs]


def _batch_mode_probe(model):
    """The definition of precise BN, written here: every BN normalizes with its batch's statistics
    (train mode, running statistics frozen) and its inputs are kept, as float64, per channel."""
    seen = {}
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for b in bns:
        b.train()
        b.momentum = 0.0
        b.register_forward_pre_hook(lambda mod, a: seen.setdefault(mod, []).append(
            np.moveaxis(a[0].double().numpy(), 1, 0).reshape(a[0].shape[1], -1)))
    return bns, seen


# --- the estimator ---------------------------------------------------------------------------------

def test_moments_merge_is_exact_over_unequal_batches_never_an_average_of_variances():
    r = np.random.default_rng(0)
    parts = [r.normal(3, 2, (n, 4, 3)) * r.uniform(0.5, 2) for n in (1, 7, 64, 5, 2)]
    m = Moments()
    for p in parts:
        m.add(p, axis=1)
    allv = np.concatenate([np.moveaxis(p, 1, 0).reshape(4, -1) for p in parts], axis=1)
    np.testing.assert_allclose(m.mean, allv.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(m.var, allv.var(axis=1), rtol=1e-12)
    naive = np.mean([np.moveaxis(p, 1, 0).reshape(4, -1).var(axis=1) for p in parts], axis=0)
    assert np.max(np.abs(naive - allv.var(axis=1)) / allv.var(axis=1)) > 0.05  # what others do is wrong


# --- check --data ------------------------------------------------------------------------------------

def _independent_drift(path, x):
    """Per BN, (largest |mean shift| / running sd, largest var ratio either way) of its inputs in
    inference mode over ``x``, computed here from ``_bn_inputs`` in float64."""
    out = []
    m = onnx.load(str(path))
    eps = {n.name: next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
           for n in m.graph.node if n.op_type == "BatchNormalization"}
    for (name, mean, var), v in zip(_stats(path), _bn_inputs(path, x)):
        e = eps[name]
        shift = np.max(np.abs(v.mean(axis=1) - mean) / np.sqrt(var + e))
        r = (v.var(axis=1) + e) / (var + e)
        out.append((shift, max(np.max(r), 1 / np.min(r))))
    return out


def test_check_data_flags_every_damage_and_not_the_healthy_model(world):
    """FK012 exactly where an independent float64 measurement crosses the documented thresholds (the
    verdict never rests on how far a trained model happens to be from them)."""
    from foldkit.check import DRIFT_WARN_RATIO, DRIFT_WARN_SD

    flagged = {}
    for kind in ("healthy",) + DAMAGE:
        r = invoke("check", world["paths"][kind], "--data", world["train"], "--format", "json")
        findings = json.loads(r.output)["models"][0]["findings"]
        got = sorted(f["node"] for f in findings if f["code"] == "FK012")
        names = [n for n, _, _ in _stats(world["paths"][kind])]
        drift = _independent_drift(world["paths"][kind], world["x"])
        want = sorted(n for n, (shift, ratio) in zip(names, drift) if shift > DRIFT_WARN_SD or ratio > DRIFT_WARN_RATIO)
        assert got == want, (kind, got, drift)
        flagged[kind] = bool(got)
        if kind == "healthy":
            assert "FK010" not in [f["code"] for f in findings], r.output
    assert flagged["reset"], flagged  # statistics of 0 and 1 on a trained model: never near the data's
    r = invoke("check", world["paths"]["reset"], "--format", "json")  # no data: the reset is still visible
    assert "FK010" in [f["code"] for f in json.loads(r.output)["models"][0]["findings"]]


# --- recalibrate -------------------------------------------------------------------------------------

def _ort_pred(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1)


@pytest.mark.parametrize("kind", DAMAGE)
def test_recalibrate_predicts_as_a_float64_precise_bn_of_the_same_model(world, kind, tmp_path):
    """What recalibration can do, judged against an independent float64 precise BN of the same
    damaged model over the same batches (never against a margin of a trained number): every held-out
    prediction that is not a near-tie is the reference's, and the reported accuracy is the model's."""
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = invoke("recalibrate", world["paths"][kind], "--data", world["train"], "--eval-data", world["test"],
               "-o", out, "--report", rep)
    assert r.exit_code == 0, r.output
    d = json.loads(rep.read_text())
    assert d["command"] == "recalibrate" and d["bn_after"] == 0 and d["verification"]["passed"]
    assert d["recalibration"]["samples"] == len(world["x"]) and d["recalibration"]["batches"] == 41  # 1300 / 32
    _, _, xt, yt = D.digits()
    ref = D.precise_bn(D.damaged(world["healthy"], kind), world["x"], 32)
    pred = _ort_pred(out, xt)
    a = D.agrees(pred, D.logits(ref, xt), yt)
    assert a["disagree"] == 0, a
    assert a["acc"] >= a["ref_acc"] - a["allowed"], a
    assert d["metric"]["metric"] == "accuracy" and abs(d["metric"]["after"] - a["acc"]) <= a["allowed"], (d["metric"], a)


def test_exact_method_matches_its_definition(world, tmp_path):
    out = tmp_path / "exact.onnx"
    r = invoke("recalibrate", world["paths"]["batch2"], "--data", world["train"], "--method", "exact", "--no-fold",
               "-o", out, "--batch-size", "50")
    assert r.exit_code == 0, r.output
    # inference mode over the same data gives every BN an input with exactly its stored statistics
    for (name, mean, var), x in zip(_stats(out), _bn_inputs(out, world["x"])):
        np.testing.assert_allclose(mean, x.mean(axis=1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, x.var(axis=1), rtol=1e-5)


def test_batch_method_matches_precise_bn_computed_in_float64_with_torch(world, tmp_path):
    out = tmp_path / "batch.onnx"
    r = invoke("recalibrate", world["paths"]["reset"], "--data", world["train"], "--no-fold", "-o", out,
               "--batch-size", "64")
    assert r.exit_code == 0, r.output
    # the definition, written here: every BN normalizes with its batch's statistics; the population
    # statistics of all its inputs, float64 (torch in double precision, its own BN implementation)
    model = D.damaged(world["healthy"], "reset").double()
    bns, seen = _batch_mode_probe(model)
    with torch.no_grad():
        for k in range(0, len(world["x"]), 64):
            model(torch.from_numpy(world["x"][k:k + 64]).double())
    for (name, mean, var), b in zip(_stats(out), bns):
        x = np.concatenate(seen[b], axis=1)
        np.testing.assert_allclose(mean, x.mean(axis=1), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(var, x.var(axis=1), rtol=1e-4)


def test_the_gate_refuses_a_harmful_update(world, tmp_path):
    """Statistics from data that is not the deployment distribution harm the model. The gate is
    judged against the drop an independent float64 precise BN shows on the same models: a --max-drop
    of half that drop refuses the update, twice that drop lets it through (the same verdicts on any
    machine, whatever the trained accuracies)."""
    shifted_x = world["x"] * 4.0 + 1.0
    shifted = D.save_npz(tmp_path / "shifted.npz", shifted_x)
    _, _, xt, yt = D.digits()
    ref = D.logits(D.float64(world["healthy"]), xt)
    healthy = D.agrees(ref.argmax(1), ref, yt)
    harmed = D.agrees(np.zeros_like(yt), D.logits(D.precise_bn(world["healthy"], shifted_x, 32), xt), yt)
    drop = 100 * (healthy["ref_acc"] - harmed["ref_acc"])
    slack = 100 * (healthy["allowed"] + harmed["allowed"])  # near-ties either way
    assert drop > 2 * slack + 1, (drop, slack)  # the data does harm: a x4 + 1 shift of the pixels
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = invoke("recalibrate", world["paths"]["healthy"], "--data", shifted, "--eval-data", world["test"],
               "--max-drop", f"{drop / 2:.4f}", "-o", out, "--report", rep)
    assert r.exit_code == 1 and "worse by" in r.output and not out.exists(), r.output
    assert abs(-json.loads(rep.read_text())["metric"]["change_points"] - drop) <= slack + 1e-6, (drop, slack)  # 6 decimals
    r = invoke("recalibrate", world["paths"]["healthy"], "--data", shifted, "--eval-data", world["test"],
               "--max-drop", f"{2 * drop:.4f}", "-o", out)
    assert r.exit_code == 0 and out.exists(), r.output


def test_only_and_skip_node(world, tmp_path):
    names = [n for n, _, _ in _stats(world["paths"]["reset"])]
    out = tmp_path / "o.onnx"
    r = invoke("recalibrate", world["paths"]["reset"], "--data", world["train"], "--no-fold", "-o", out,
               "--skip-node", names[1])
    assert r.exit_code == 0, r.output
    after = _stats(out)
    assert not np.all(after[0][1] == 0) and np.all(after[1][1] == 0) and np.all(after[1][2] == 1)
    r = invoke("recalibrate", world["paths"]["reset"], "--data", world["train"], "-o", out, "--only", "nope")
    assert r.exit_code == 2 and "not a BatchNormalization" in r.output


def test_torchrun_two_ranks_equal_one(world, tmp_path):
    one, two = tmp_path / "one.onnx", tmp_path / "two.onnx"
    assert invoke("recalibrate", world["paths"]["batch2"], "--data", world["train"], "--no-fold", "-o", one).exit_code == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "cli.py"), "recalibrate", str(world["paths"]["batch2"]), "--data",
                        str(world["train"]), "--no-fold", "-o", str(two), "-q"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    for (n1, m1, v1), (n2, m2, v2) in zip(_stats(one), _stats(two)):
        np.testing.assert_allclose(m2, m1, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(v2, v1, rtol=1e-9)


CUTS = [0, 50, 67, 131, 300, 301, 700, 1000, 1300]  # uneven batches, as a user's loader may yield them


def _uneven_source(world, tmp_path):
    """FILE.py:FN yielding the training digits in the uneven batches CUTS, and, for a batch this
    rank does not own (i mod WORLD_SIZE != RANK), garbage: a rank must never use such a batch."""
    fn = tmp_path / "uneven.py"
    fn.write_text(f"import os\nimport numpy as np\nCUTS = {CUTS!r}\n"
                  "def batches():\n"
                  f"    x = np.load({str(world['train'])!r})['image']\n"
                  "    rank, size = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))\n"
                  "    for i, (a, b) in enumerate(zip(CUTS, CUTS[1:])):\n"
                  "        yield {'image': x[a:b] if i % size == rank else np.full_like(x[a:b], 1e4)}\n")
    return f"{fn}:batches"


def test_a_functions_batches_are_used_as_they_come_unless_batch_size_is_given(world, tmp_path):
    src = _uneven_source(world, tmp_path)
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = invoke("recalibrate", world["paths"]["reset"], "--data", src, "--no-fold", "-o", out, "--report", rep)
    assert r.exit_code == 0, r.output
    d = json.loads(rep.read_text())["recalibration"]
    assert d["batches"] == len(CUTS) - 1 and d["batching"] == "as the function yields them", d
    ref = D.precise_bn(D.damaged(world["healthy"], "reset"), world["x"], list(zip(CUTS, CUTS[1:])))
    bns = [m for m in ref.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for (name, mean, var), b in zip(_stats(out), bns):
        np.testing.assert_allclose(mean, b.running_mean.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(var, b.running_var.numpy(), rtol=1e-4)
    r = invoke("recalibrate", world["paths"]["reset"], "--data", src, "--no-fold", "-o", out, "--report", rep,
               "--batch-size", "32")
    assert r.exit_code == 0 and "re-cut into slices of 32" in r.output, r.output
    d = json.loads(rep.read_text())["recalibration"]
    assert d["batches"] == 41 and any("re-cut" in n for n in d["notes"]), d
    ref = D.precise_bn(D.damaged(world["healthy"], "reset"), world["x"], 32)
    for (name, mean, var), b in zip(_stats(out), [m for m in ref.modules() if isinstance(m, torch.nn.BatchNorm2d)]):
        np.testing.assert_allclose(mean, b.running_mean.numpy(), rtol=1e-4, atol=1e-5)


def test_torchrun_gives_rank_r_the_batches_the_source_yields_for_it(world, tmp_path):
    """Batch i, as the function yields it, goes to rank i mod world size: with a function that
    yields garbage for the batches a rank does not own, 2 ranks still equal 1 process."""
    src = _uneven_source(world, tmp_path)
    one, two = tmp_path / "one.onnx", tmp_path / "two.onnx"
    r = invoke("recalibrate", world["paths"]["batch2"], "--data", src, "--no-fold", "-o", one)
    assert r.exit_code == 0, r.output
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "cli.py"), "recalibrate", str(world["paths"]["batch2"]), "--data",
                        src, "--no-fold", "-o", str(two), "-q"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    for (n1, m1, v1), (n2, m2, v2) in zip(_stats(one), _stats(two)):
        np.testing.assert_allclose(m2, m1, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(v2, v1, rtol=1e-9)


# --- PyTorch ------------------------------------------------------------------------------------------

def test_torch_recalibrate_in_place_matches_float64_and_restores_state(world):
    from foldkit.torch import recalibrate

    model = D.damaged(world["healthy"], "reset")
    model[3].p = 0.5  # Dropout must stay off during the pass
    model.train()
    batches = [torch.from_numpy(world["x"][k:k + 100]) for k in range(0, len(world["x"]), 100)]
    seen = recalibrate(model, batches, method="batch")
    assert model.training and all(m.training for m in model.modules())  # state restored
    assert sorted(seen) == ["1", "5"] and seen["1"] == len(world["x"]) * 64
    ref = D.damaged(world["healthy"], "reset").eval()  # the same float32 model: the statistics of its BN
    ref[3].p = 0.5  # inputs computed here in float64
    bns, caught = _batch_mode_probe(ref)
    with torch.no_grad():
        for b in batches:
            ref(b)
    for b_new, b_ref in zip([m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)], bns):
        x = np.concatenate(caught[b_ref], axis=1)
        np.testing.assert_allclose(b_new.running_mean.double().numpy(), x.mean(axis=1), rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(b_new.running_var.double().numpy(), x.var(axis=1), rtol=1e-6)
    model.eval()
    _, _, xt, yt = D.digits()
    a = D.agrees(D.logits(model, xt).argmax(1), D.logits(D.precise_bn(ref, world["x"], 100), xt), yt)
    assert a["disagree"] == 0, a


@pytest.mark.parametrize("shape, layout", [((7, 3, 5, 4), "contiguous"), ((7, 3, 5, 4), "channels_last"), ((9, 4), "contiguous"),
                                           ((3, 2, 3, 4, 5), "contiguous"), ((5, 3, 11), "contiguous"), ((0, 3, 4, 4), "contiguous")])
def test_torch_moments_are_numpys_float64_moments_in_pieces(shape, layout, monkeypatch):
    """foldkit.torch's BN-input moments (computed where the input is, a few samples at a time)
    equal float64 numpy's over the whole input: several pieces, a channel offset by 1e5, any rank."""
    import importlib

    R = importlib.import_module("foldkit.torch.recalibrate")  # the module (the package exports the function)

    monkeypatch.setattr(R, "_PIECE", 50)  # a piece of one or two samples: several pieces per batch
    monkeypatch.setattr(R, "_MERGE_ROWS", 3)  # and rows merged into the running moments several times
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    if x.numel():
        x[:, 0] += 1e5
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    got = R._moments(x)
    if not x.numel():
        assert got.count == 0
        return
    ref = Moments()
    ref.add(x.double().numpy(), axis=1)
    assert got.count == ref.count == x.numel() // x.shape[1]
    np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-14, atol=1e-12)  # values of scale 1 (and 1e5)
    np.testing.assert_allclose(got.var, ref.var, rtol=1e-10)


def test_torch_moments_over_batches_of_other_sizes_and_resolutions(monkeypatch):
    """Rows of unequal counts (another resolution) are never merged as equal ones: the moments of
    batches of several sizes and spatial sizes equal numpy's over all their values."""
    import importlib

    R = importlib.import_module("foldkit.torch.recalibrate")
    monkeypatch.setattr(R, "_MERGE_ROWS", 4)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, 3, h, h, generator=g) * 2 + 7 for n, h in ((3, 4), (2, 4), (5, 6), (1, 3), (4, 6))]
    rows, ref = R._Rows(), Moments()
    for x in xs:
        rows.add(x)
        ref.add(x.double().numpy(), axis=1)
    got = rows.moments()
    assert got.count == ref.count
    np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-14)
    np.testing.assert_allclose(got.var, ref.var, rtol=1e-12)


def test_torch_recalibrate_exact_and_syncbn(world):
    from foldkit.torch import recalibrate

    sync = torch.nn.SyncBatchNorm.convert_sync_batchnorm(D.damaged(world["healthy"], "batch2"))
    batches = [torch.from_numpy(world["x"][k:k + 128]) for k in range(0, len(world["x"]), 128)]
    recalibrate(sync, batches, method="exact")
    sync.eval()
    caught = {}
    for m in sync.modules():
        if isinstance(m, torch.nn.SyncBatchNorm):
            m.register_forward_pre_hook(lambda mod, a: caught.setdefault(mod, []).append(
                np.moveaxis(a[0].double().numpy(), 1, 0).reshape(a[0].shape[1], -1)))
    with torch.no_grad():
        for b in batches:
            sync(b)
    for m, xs in caught.items():  # inference mode now gives every BN its stored statistics
        x = np.concatenate(xs, axis=1)
        np.testing.assert_allclose(m.running_mean.double().numpy(), x.mean(axis=1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m.running_var.double().numpy(), x.var(axis=1), rtol=1e-5)


def test_export_recalibrate(world, tmp_path):
    factory = tmp_path / "net.py"
    ckpt = tmp_path / "reset.pt"
    torch.save(D.damaged(world["healthy"], "reset").state_dict(), ckpt)
    factory.write_text(f"import sys\nsys.path.insert(0, {ROOT!r})\nfrom tests.digits import net\n"
                       "def build():\n    return net()\n")
    data = D.save_npz(tmp_path / "x.npz", world["x"])
    out, rep = tmp_path / "e.onnx", tmp_path / "e.json"
    r = invoke("export", "--model", f"{factory}:build", "--checkpoint", ckpt, "--input-shape", "1,1,8,8",
               "--dynamic-batch", "--recalibrate", data, "-o", out, "--report", rep, "-q")
    assert r.exit_code == 0, r.output
    d = json.loads(rep.read_text())
    assert d["recalibration"]["method"] == "batch" and d["bn_after"] == 0
    import onnxruntime as ort

    _, _, xt, yt = D.digits()
    pred = ort.InferenceSession(str(out)).run(None, {"input": xt})[0].argmax(1)
    a = D.agrees(pred, D.logits(D.precise_bn(D.damaged(world["healthy"], "reset"), world["x"], 32), xt), yt)
    assert a["disagree"] == 0, a


@pytest.mark.parametrize("opset", [8, 11, 13, 15, 17, 18])  # 8: Scan-8; before training_mode (14); axes as attributes before 13/18
def test_batch_method_normalizes_as_the_runtimes_training_mode_bn(opset):
    """--method batch normalizes each BN with its batch's statistics, merged in the graph from
    foldkit's float64 rows and fed to an inference-mode BN (any opset). The statistics stored for a
    BN behind it must be those of its inputs when ONNX Runtime's own training-mode BN (opset 15)
    does the normalizing: measured here in float64 numpy from that model's values, over batches of
    unequal sizes."""
    import onnxruntime as ort

    from foldkit.recalibration import recalibrate
    from tests.helpers import F32, bn_inits, make_model, rng, tensor

    r = rng(3)
    n1, b1 = bn_inits("a", 6, r)
    n2, b2 = bn_inits("b", 5, r)
    w1, w2 = r.standard_normal((6, 1, 3, 3)).astype(np.float32), r.standard_normal((5, 6, 3, 3)).astype(np.float32)

    def build(opset, training=False):
        extra = {"training_mode": 1} if training else {}
        return make_model([helper.make_node("Conv", ["image", "w1"], ["c1"], pads=[1] * 4),
                           helper.make_node("BatchNormalization", ["c1"] + n1, ["n1"] + (["rm", "rv"] if training else []),
                                            name="bn1", **extra),
                           helper.make_node("Relu", ["n1"], ["r1"]),
                           helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1] * 4),
                           helper.make_node("BatchNormalization", ["c2"] + n2, ["y"], name="bn2")],
                          [("image", F32, ["n", 1, 8, 8])], [("y", F32, ["n", 5, 8, 8])],
                          [tensor("w1", w1), tensor("w2", w2)] + b1 + b2, opset=opset, infer_outputs=False)
    xs = [(r.standard_normal((k, 1, 8, 8)) * 2 + 0.5).astype(np.float32) for k in (16, 5, 32)]
    ref = build(15, training=True)
    ref.graph.output.extend([helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None) for v in ("c1", "c2")])
    sess = ort.InferenceSession(ref.SerializeToString(), providers=["CPUExecutionProvider"])
    seen = [sess.run(["c1", "c2"], {"image": x}) for x in xs]
    m = build(opset)
    recalibrate(m, lambda: iter([{"image": x} for x in xs]), method="batch")
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
    for k, names in enumerate((n1, n2)):
        h = np.concatenate([np.moveaxis(s[k].astype(np.float64), 1, 0).reshape(s[k].shape[1], -1) for s in seen], axis=1)
        np.testing.assert_allclose(inits[names[2]], h.mean(axis=1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(inits[names[3]], h.var(axis=1), rtol=1e-5)


def test_data_the_model_cannot_take_is_one_line_exit_2(world, tmp_path):
    bad = D.save_npz(tmp_path / "bad.npz", np.zeros((4, 1, 5, 3), np.float32))  # not 8x8 digits
    for args in (["check", world["paths"]["healthy"], "--data", bad],
                 ["recalibrate", world["paths"]["reset"], "--data", bad, "-o", tmp_path / "o.onnx"]):
        r = invoke(*args)
        assert r.exit_code == 2 and r.output.startswith("foldkit: error: --data") and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("method", ["exact", "batch"])
@pytest.mark.parametrize("opset", [11, 17, 18])  # axes as attributes, ReduceSum's as an input, all as inputs
def test_a_batchnorm1d_over_n_by_c_is_recalibrated_exactly(opset, method):
    """A BN over a rank-2 [N, C] input (BatchNorm1d after a Linear) has no spatial axes: its moments
    are reduced over the samples alone. The stored statistics are the population statistics of the
    BN's inputs, computed here in float64 from ONNX Runtime's own MatMul outputs."""
    import onnxruntime as ort

    from foldkit.recalibration import recalibrate
    from tests.helpers import F32, make_model, rng, tensor

    r = rng(5)
    w = r.standard_normal((6, 5)).astype(np.float32)
    bn = [tensor(n, a) for n, a in (("g", np.ones(5, np.float32)), ("b", np.zeros(5, np.float32)),
                                    ("m", np.zeros(5, np.float32)), ("v", np.ones(5, np.float32)))]
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["h"]),
                    helper.make_node("BatchNormalization", ["h", "g", "b", "m", "v"], ["y"])],
                   [("x", F32, ["n", 6])], [("y", F32, ["n", 5])], [tensor("W", w)] + bn, opset=opset)
    xs = [(r.standard_normal((k, 6)) * 3 + 1).astype(np.float32) for k in (7, 13, 30)]
    probe = make_model([helper.make_node("MatMul", ["x", "W"], ["h"])], [("x", F32, ["n", 6])], [("h", F32, ["n", 5])],
                       [tensor("W", w)], opset=opset)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    h = np.concatenate([sess.run(None, {"x": x})[0].astype(np.float64) for x in xs])
    recalibrate(m, lambda: iter([{"x": x} for x in xs]), method=method)  # one BN: the same statistics
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
    bn_node = m.graph.node[1]
    np.testing.assert_allclose(inits[bn_node.input[3]], h.mean(axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(inits[bn_node.input[4]], h.var(axis=0), rtol=1e-6)


def test_a_bn_with_statistics_per_position_is_left_with_its_reason():
    """Opset <= 8 BN with spatial=0 keeps one mean and variance per (channel, position): per-channel
    moments do not fit it, so it is left as it is, with the reason; the BN after it is recalibrated,
    and the model still runs."""
    import onnxruntime as ort

    from foldkit.recalibration import recalibrate
    from tests.helpers import F32, make_model, rng, tensor

    r = rng(11)
    per_pos = [tensor(n, a) for n, a in (("g0", r.normal(1, .2, (3, 4, 4))), ("b0", r.normal(0, .2, (3, 4, 4))),
                                         ("m0", np.zeros((3, 4, 4))), ("v0", np.ones((3, 4, 4))))]
    per_pos = [numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name) for t in per_pos]
    bn = [tensor(n, a) for n, a in (("g", np.ones(3, np.float32)), ("b", np.zeros(3, np.float32)),
                                    ("m", np.zeros(3, np.float32)), ("v", np.ones(3, np.float32)))]
    m = make_model([helper.make_node("BatchNormalization", ["x", "g0", "b0", "m0", "v0"], ["h"], name="per_position",
                                     spatial=0),
                    helper.make_node("BatchNormalization", ["h", "g", "b", "m", "v"], ["y"], name="per_channel")],
                   [("x", F32, ["n", 3, 4, 4])], [("y", F32, ["n", 3, 4, 4])], per_pos + bn, opset=8, ir_version=3)
    xs = [(r.standard_normal((k, 3, 4, 4)) * 2 + 1).astype(np.float32) for k in (6, 9)]
    rec = recalibrate(m, lambda: iter([{"x": x} for x in xs]), method="exact")
    assert any(n.startswith("per_position: spatial=0") for n in rec["notes"]), rec["notes"]
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    assert inits["m0"].shape == (3, 4, 4) and not inits["m0"].any() and (inits["v0"] == 1).all()
    h = np.concatenate([((x - 0) / np.sqrt(1 + 1e-5)) * numpy_helper.to_array(per_pos[0]) + numpy_helper.to_array(per_pos[1])
                        for x in xs]).astype(np.float64)
    np.testing.assert_allclose(inits["m"], h.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inits["v"], h.var(axis=(0, 2, 3)), rtol=1e-5)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": xs[0]})[0].shape == (6, 3, 4, 4)
