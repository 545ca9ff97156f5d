"""PyTorch paths on a CUDA device: folding keeps a module where it is and its outputs, the
recalibrator computes its statistics on the device (and they are the BN inputs' float64
moments there), SyncBatchNorm reverts on the device. Skipped, with the reason, without one."""

import importlib

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device for PyTorch", allow_module_level=True)

from foldkit.moments import Moments  # noqa: E402
from foldkit.torch import fold_bn, recalibrate, revert_sync_batchnorm  # noqa: E402
from models.nets1d3d import audio_net, video_net  # noqa: E402
from models.resnet import resnet18  # noqa: E402
from models.unet import unet  # noqa: E402

R = importlib.import_module("foldkit.torch.recalibrate")  # the module (the package exports the function)


@pytest.fixture(autouse=True)
def exact_kernels():
    """float32 convolutions and matmuls in float32 (no TF32) and one algorithm each, so that the
    comparisons below are of the fold's arithmetic, not of kernels chosen per call."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
     torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = saved


@pytest.mark.parametrize("build, shape", [(lambda: resnet18(num_classes=10, width=16), (4, 3, 64, 64)),
                                          (lambda: unet(width=8), (2, 3, 32, 32)),
                                          (lambda: audio_net(), (4, 1, 400)),
                                          (lambda: video_net(), (2, 3, 8, 32, 32))])
def test_fold_bn_on_the_gpu_keeps_the_device_and_the_outputs(build, shape):
    model = build().cuda().eval()
    folded, report = fold_bn(model)
    assert {p.device.type for p in folded.parameters()} == {"cuda"}
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert report and all(r["action"] == "folded" for r in report)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        y, yf = model(x).double().cpu().numpy(), folded(x).double().cpu().numpy()
    np.testing.assert_allclose(yf, y, rtol=1e-4, atol=1e-4 * np.abs(y).max())


def test_syncbn_reverts_on_the_gpu():
    sync = torch.nn.SyncBatchNorm.convert_sync_batchnorm(resnet18(num_classes=10, width=16)).cuda().eval()
    plain = revert_sync_batchnorm(sync)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in plain.modules())
    assert {b.device.type for b in plain.buffers()} == {"cuda"}


def test_gpu_recalibration_stores_the_float64_moments_of_the_inputs_it_saw():
    """Batch mode on the device: each BN's stored statistics are the float64 moments of the inputs
    that BN received in the pass (captured here from the same pass), rounded once to float32."""
    model = resnet18(num_classes=10, width=16).cuda()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, 3, 32, 32, generator=g).cuda() for n in (8, 5, 8)]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    caught = {m: [] for m in bns}
    hooks = [m.register_forward_pre_hook(lambda mod, a: caught[mod].append(a[0].detach().double().cpu().numpy()))
             for m in bns]
    try:
        seen = recalibrate(model, batches, method="batch")
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == len(bns) and all(v > 0 for v in seen.values())
    for m in bns:
        ref = Moments()
        for x in caught[m]:
            ref.add(x, axis=1)
        assert m.running_mean.device.type == "cuda"
        np.testing.assert_allclose(m.running_mean.double().cpu().numpy(), ref.mean, rtol=2 ** -23, atol=1e-7)
        np.testing.assert_allclose(m.running_var.double().cpu().numpy(), ref.var, rtol=2 ** -22)


def test_moments_on_the_gpu_equal_the_cpus():
    x = torch.randn(16, 32, 56, 56, generator=torch.Generator().manual_seed(2))
    x[:, 3] += 1e5
    on_gpu, on_cpu = R._moments(x.cuda()), R._moments(x)
    assert on_gpu.count == on_cpu.count
    np.testing.assert_allclose(on_gpu.mean, on_cpu.mean, rtol=1e-14, atol=1e-12)  # values of scale 1 (and 1e5)
    np.testing.assert_allclose(on_gpu.var, on_cpu.var, rtol=1e-10)
