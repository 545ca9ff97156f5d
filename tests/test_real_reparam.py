"""Re-parameterizable networks from pure-torch packages nobody here wrote (repvgg-pytorch,
mobileone-pytorch; installed with --no-deps by `make`), exported unfolded as a user would: foldkit's
merged ONNX must match the package's own deploy-mode (reparameterized) module numerically and have
the same number of convolutions."""

import contextlib
import copy
import io
from collections import Counter

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

import foldkit  # noqa: E402
from tests.helpers import ort_run  # noqa: E402


def _realistic_bn(model, seed=0, layer_scales=False):
    """Random BN statistics and affine parameters as training leaves them; with ``layer_scales``,
    layer-scale parameters drawn from [0.5, 1.5) (timm initializes them to 1e-5, which would hide
    any error in how they are merged)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            if m.weight is not None:
                m.weight.data = 1 + 0.3 * torch.randn(c, generator=g)
                m.bias.data = 0.3 * torch.randn(c, generator=g)
            m.running_mean = 0.5 * torch.randn(c, generator=g)
            m.running_var = 0.5 + torch.rand(c, generator=g)
    if layer_scales:
        for name, p in model.named_parameters():
            if "layer_scale" in name:
                p.data = 0.5 + torch.rand(p.shape, generator=g)
    return model.eval()


def _export(module, x, path):
    """Unfolded, as a user exports a training-time model (torch's own constant folding would fuse BN)."""
    import warnings

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17, do_constant_folding=False)
    return onnx.load(str(path))


def _check(train, deploy, tmp_path, size=32):
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    m = _export(train, x, tmp_path / "train.onnx")
    d = _export(deploy, x, tmp_path / "deploy.onnx")
    res = foldkit.fold(m)  # verified on ONNX Runtime against the unmerged graph, too
    assert res.report.bn_after == 0, [a.reason for a in res.report.actions if a.action == "kept"]
    ops = Counter(n.op_type for n in res.model.graph.node)
    assert ops["Conv"] == Counter(n.op_type for n in d.graph.node)["Conv"]
    with torch.no_grad():
        want = deploy(x).numpy()
    got = ort_run(res.model, {res.model.graph.input[0].name: x.numpy()})[0]
    err = float(np.abs(got - want).max() / np.abs(want).max())
    assert err < 1e-5, err
    return res, ops


def test_repvgg_a0_merges_to_the_packages_deploy_model(tmp_path):
    rp = pytest.importorskip("repvgg_pytorch", reason="repvgg-pytorch is not installed (make installs it --no-deps)")
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints every block
        train = _realistic_bn(rp.get_RepVGG_func_by_name("RepVGG-A0")(deploy=False))
    deploy = rp.repvgg_model_convert(copy.deepcopy(train), do_copy=False).eval()
    res, ops = _check(train, deploy, tmp_path)
    assert ops["Add"] == 0 and res.report.bn_before == 61
    assert sum(b.action == "merged" for b in res.report.branches) == 22


def test_repvgg_grouped_blocks(tmp_path):
    rp = pytest.importorskip("repvgg_pytorch", reason="repvgg-pytorch is not installed (make installs it --no-deps)")
    from repvgg_pytorch.repvgg import RepVGG

    with contextlib.redirect_stdout(io.StringIO()):
        train = _realistic_bn(RepVGG(num_blocks=[1, 2, 2, 1], width_multiplier=[0.25, 0.25, 0.25, 0.5],
                                     override_groups_map={2: 2, 4: 4}, num_classes=10))
    deploy = rp.repvgg_model_convert(copy.deepcopy(train), do_copy=False).eval()
    _check(train, deploy, tmp_path)


def test_mobileone_s0_stack_and_sum_branches(tmp_path):
    mo = pytest.importorskip("mobileone_pytorch", reason="mobileone-pytorch is not installed (make installs it --no-deps)")
    train = _realistic_bn(mo.mobileone_s0(num_classes=10))
    deploy = train.reparametrize().eval()
    res, ops = _check(train, deploy, tmp_path)
    assert ops["ReduceSum"] == ops["Concat"] == ops["Unsqueeze"] == 0 and res.report.bn_before == 233


# --- timm 1.0.29: FastViT's RepMixer (x + ls * (mixer(x) - norm(x))) and RepViT ----------------------

@pytest.mark.parametrize("name", ["fastvit_t8", "fastvit_sa12", "fastvit_mci0", "repvit_m0_9"])
def test_timm_fastvit_and_repvit_fold_to_their_deploy_counts(tmp_path, name):
    """Exported unmerged, folded by foldkit: the BN and Conv counts of timm's reparameterized model
    as foldkit folds it (its export keeps the BNs it does not fuse itself), and PyTorch's numbers."""
    from tests.third_party import import_timm

    try:
        timm = import_timm()
    except ImportError as e:
        pytest.skip(str(e))
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    train = _realistic_bn(timm.create_model(name, pretrained=False, num_classes=10), layer_scales=True)
    deploy = reparameterize_model(copy.deepcopy(train)).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    m = _export(train, x, tmp_path / "train.onnx")
    d = foldkit.fold(_export(deploy, x, tmp_path / "deploy.onnx"), verify=False)
    res = foldkit.fold(m)  # verified on ONNX Runtime against the unmerged graph
    want = Counter(n.op_type for n in d.model.graph.node)
    got = Counter(n.op_type for n in res.model.graph.node)
    assert (got["BatchNormalization"], got["Conv"]) == (want["BatchNormalization"], want["Conv"]), \
        [a.reason for a in res.report.actions if a.action == "kept"]
    assert got["Sub"] == want["Sub"] == 0 and got["BatchNormalization"] == 0  # the attention pre-norms too
    with torch.no_grad():
        ref = deploy(x).numpy()
    out = ort_run(res.model, {res.model.graph.input[0].name: x.numpy()})[0]
    err = float(np.abs(out - ref).max() / np.abs(ref).max())
    assert err < 1e-4, err


def test_timm_levit_linear_batchnorm1d_folds_through_its_flatten(tmp_path):
    """LeViT's LinearNorm: a bias-free Linear, flattened for BatchNorm1d and reshaped back (reshape_as
    reads the Linear output's Shape): every BN folds through the Flatten into the MatMul."""
    from tests.third_party import import_timm

    try:
        timm = import_timm()
    except ImportError as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    model = _realistic_bn(timm.create_model("levit_128s", pretrained=False, num_classes=10))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    m = _export(model, x, tmp_path / "levit.onnx")
    res = foldkit.fold(m)
    assert res.report.bn_before == 52 and res.report.bn_after == 0, \
        [a.reason for a in res.report.actions if a.action == "kept"]
    assert [a.reason for a in res.report.affine if a.action == "kept"] == []  # the BNs' shifts are biases
    with torch.no_grad():
        ref = model(x).numpy()
    out = ort_run(res.model, {res.model.graph.input[0].name: x.numpy()})[0]
    assert float(np.abs(out - ref).max() / np.abs(ref).max()) < 1e-5
