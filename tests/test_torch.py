"""The PyTorch side: SyncBN reversion, eager folding, checkpoints, export of every reference network."""

import json
import os
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")
from torch import nn  # noqa: E402

import models  # noqa: E402
from foldkit.errors import InputError  # noqa: E402
from foldkit.torch import BatchNormNd, export, fold_bn, load_checkpoint, revert_sync_batchnorm  # noqa: E402
from foldkit.torch.export import apply_state_dict, extract_state_dict  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4))
        self.lst = nn.ModuleList([nn.SyncBatchNorm(4, affine=False), nn.SyncBatchNorm(4, track_running_stats=False)])
        self.dct = nn.ModuleDict({"a": nn.SyncBatchNorm(4, eps=1e-3, momentum=None)})

    def forward(self, x):
        x = self.seq(x)
        for m in self.lst:
            x = m(x)
        return self.dct["a"](x)


def test_revert_sync_batchnorm_keeps_every_attribute():
    m = Custom()
    models.randomize_bn(m, 3)
    m.seq[1].weight.requires_grad_(False)
    syncs = [(n, mod) for n, mod in m.named_modules() if isinstance(mod, nn.SyncBatchNorm)]
    m.train()
    out = revert_sync_batchnorm(m)
    assert out is m
    for name, old in syncs:
        new = m.get_submodule(name)
        assert type(new) is BatchNormNd
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
            assert getattr(new, attr) == getattr(old, attr), attr
        for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            a, b = getattr(old, attr), getattr(new, attr)
            assert (a is None and b is None) or torch.equal(a, b), attr
        if old.affine:
            assert new.weight.requires_grad == old.weight.requires_grad
            assert new.weight.dtype == old.weight.dtype and new.weight.device == old.weight.device
    assert not any(isinstance(x, nn.SyncBatchNorm) for x in m.modules())


def test_reverted_model_trains_on_cpu_and_matches_plain_bn():
    """SyncBatchNorm's forward needs a process group in training; after reversion one CPU suffices."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4))
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Conv3d(2, 4, 3), nn.SyncBatchNorm(4)))
    sync.load_state_dict(ref.state_dict())
    reverted = revert_sync_batchnorm(sync)
    x = torch.randn(3, 2, 5, 5, 5)
    ref.train(), reverted.train()
    opt = torch.optim.SGD(reverted.parameters(), lr=0.1)
    y = reverted(x)
    assert torch.allclose(y, ref(x), atol=1e-6)
    y.square().mean().backward()
    opt.step()  # a training step on CPU, no process group
    assert torch.allclose(reverted[1].running_mean, ref[1].running_mean)
    ref.eval(), reverted.eval()
    x2 = torch.randn(2, 2, 4, 4, 4)
    assert reverted(x2).shape == ref(x2).shape


@pytest.mark.parametrize("rank", [2, 3, 4, 5, 6])
def test_batchnormnd_any_rank(rank):
    bn = BatchNormNd(3).eval()
    models.randomize_bn(bn)
    x = torch.randn(*([2, 3] + [2] * (rank - 2)))
    expected = torch.nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    assert torch.allclose(bn(x), expected)


@pytest.mark.parametrize("name", list(models.REGISTRY))
def test_fold_bn_eager(name):
    factory, shape = models.REGISTRY[name]
    small = {"resnet18": (1, 3, 64, 64), "resnet50": (1, 3, 64, 64), "mobilenet_v2": (1, 3, 64, 64),
             "preact_resnet18": (1, 3, 32, 32), "unet": (1, 3, 32, 32), "audio_net": (2, 1, 2000),
             "video_net": (1, 3, 4, 16, 16), "mlp_bn": (4, 64)}[name]
    model = factory(syncbn=True)
    x = torch.randn(*small)
    with torch.no_grad():
        ref = revert_sync_batchnorm(factory()).eval()(x)
        folded, report = fold_bn(model)
        got = folded(x)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())  # the README: within 1e-5
    remaining = [m for m in folded.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    kept = [r for r in report if r["action"] == "kept"]
    assert len(remaining) == len(kept)
    assert all(r["reason"] for r in kept)
    if name in ("resnet18", "resnet50", "mobilenet_v2", "video_net", "audio_net"):
        assert not kept
    if name == "preact_resnet18":
        assert kept and all("does not come from" in r["reason"] or "used" in r["reason"] for r in kept)


def test_fold_bn_never_folds_across_shared_output():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            c = self.conv(x)
            return self.bn(c) + c

    m = Shared().eval()
    models.randomize_bn(m)
    folded, report = fold_bn(m)
    assert report[0]["action"] == "kept" and "used 2 times" in report[0]["reason"]
    x = torch.randn(1, 3, 4, 4)
    assert torch.allclose(folded(x), m(x))


def test_fold_bn_untraceable_falls_back_to_sequential():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
            self.b = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.a(x)
            if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                y = y * 2
            return self.b(y)

    m = Dynamic().eval()
    models.randomize_bn(m)
    folded, report = fold_bn(m)
    acts = {r["bn"]: r["action"] for r in report}
    assert acts == {"a.1": "folded", "b": "kept"}
    x = torch.randn(1, 3, 6, 6)
    assert torch.allclose(folded(x), m(x), atol=1e-5)


def test_grouped_conv_transpose_eager():
    m = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)).eval()
    models.randomize_bn(m)
    folded, report = fold_bn(m)
    x = torch.randn(1, 4, 5, 5)
    assert report[0]["action"] == "folded"
    assert torch.allclose(folded(x), m(x), atol=1e-5)


# --- checkpoints -------------------------------------------------------------------------------

def _ddp_style_checkpoint(path, model, wrap="state_dict"):
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({wrap: sd, "epoch": 3, "optimizer": {"lr": torch.tensor(0.1)}} if wrap else sd, path)


@pytest.mark.parametrize("wrap", [None, "state_dict", "model", "ema"])
def test_checkpoint_written_like_ddp_loads(tmp_path, wrap):
    src = models.resnet18(width=8, syncbn=True, seed=1)
    p = tmp_path / "ckpt.pt"
    _ddp_style_checkpoint(p, src, wrap)
    sd = load_checkpoint(str(p))
    dst = models.resnet18(width=8, seed=2)
    apply_state_dict(dst, sd)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_untrusted_pickle_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"state_dict": {}, "x": Evil()}, f)
    with pytest.raises(InputError, match="arbitrary unpickling.*--trust-checkpoint"):
        load_checkpoint(str(p))


def test_key_mismatch_lists_keys():
    m = models.mlp_bn()
    sd = dict(m.state_dict())
    sd.pop("fc1.weight")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(InputError, match=r"missing keys: fc1.weight; unexpected keys: extra.weight"):
        apply_state_dict(m, sd)


def test_extract_state_dict_rejects_non_state_dict():
    with pytest.raises(InputError, match="no state_dict found"):
        extract_state_dict({"epoch": 3})


# --- export ------------------------------------------------------------------------------------

EXPORT_CASES = {
    "resnet18": ("models/resnet.py:resnet18", [1, 3, 64, 64], {"width": 16}),
    "resnet50": ("models/resnet.py:resnet50", [1, 3, 64, 64], {"width": 8}),
    "mobilenet_v2": ("models/mobilenet.py:mobilenet_v2", [1, 3, 64, 64], {"width_mult": 0.5}),
    "preact_resnet18": ("models/resnet.py:preact_resnet18", [1, 3, 32, 32], {"width": 8}),
    "unet": ("models/unet.py:unet", [1, 3, 32, 32], {}),
    "audio_net": ("models/nets1d3d.py:audio_net", [2, 1, 4000], {}),
    "video_net": ("models/nets1d3d.py:video_net", [1, 3, 4, 16, 16], {}),
    "mlp_bn": ("models.mlp:mlp_bn", [4, 64], {}),
}


@pytest.mark.parametrize("name", list(EXPORT_CASES))
def test_export_every_architecture(name, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    spec, shape, kwargs = EXPORT_CASES[name]
    out = tmp_path / "m.onnx"
    res = export(spec, str(out), [shape], model_args=dict(kwargs, syncbn=True))
    rep = res.report
    assert out.exists()
    assert rep["parity"]["passed"] and rep["parity"]["max_rel_err"] < 1e-5
    assert rep["verification"]["passed"]
    assert rep["export"]["bn_exported"] > 0
    kept = [a for a in rep["actions"] if a["action"] == "kept"]
    assert rep["bn_after"] == len(kept) and all(a["reason"] for a in kept)
    if name not in ("preact_resnet18", "mlp_bn"):
        assert rep["bn_after"] == 0, kept


def test_export_dynamo(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    res = export("models/resnet.py:resnet18", str(tmp_path / "d.onnx"), [[1, 3, 32, 32]], exporter="dynamo",
                 model_args={"width": 8}, dynamic_batch=True)
    assert res.report["bn_after"] == 0 and res.report["parity"]["passed"]


def test_export_cli_with_checkpoint(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from foldkit.cli import main

    monkeypatch.chdir(ROOT)
    ck = tmp_path / "c.pt"
    _ddp_style_checkpoint(ck, models.resnet18(width=8, syncbn=True, seed=5))
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = CliRunner().invoke(main, ["export", "--model", "models/resnet.py:resnet18", "--model-arg", "width=8",
                                  "--checkpoint", str(ck), "--input-shape", "1,3,32,32", "-o", str(out), "--report", str(rep)])
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    assert report["export"]["bn_exported"] == 20 and report["bn_after"] == 0
    # the exported weights are the checkpoint's, not the factory's seed
    import onnxruntime as ort
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    y = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        ref = models.resnet18(width=8, seed=5)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("args,msg", [
    (["--model", "nope.py:f"], "no such file"),
    (["--model", "models/resnet.py:nothing"], "has no callable 'nothing'"),
    (["--model", "models/resnet.py"], "expected FILE.py:FUNCTION"),
    (["--model", "models/resnet.py:resnet18", "--checkpoint", "missing.pt"], "no such checkpoint"),
])
def test_export_bad_usage(args, msg, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from foldkit.cli import main

    monkeypatch.chdir(ROOT)
    r = CliRunner().invoke(main, ["export"] + args + ["--input-shape", "1,3,32,32", "-o", str(tmp_path / "o.onnx")])
    assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o.onnx").exists()
