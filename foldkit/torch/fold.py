"""Eager folding: BN folded into the preceding Conv/ConvTranspose/Linear module weights.

Uses the same float64 arithmetic as the ONNX passes (foldkit.math), rounded once to the weight's
dtype. torch.fx finds the pairs where the model traces (and refuses a producer whose output has other
users); where it does not trace, pairs are taken only inside nn.Sequential, where data flow is known.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..math import FoldArithmeticError, bn_scale_shift, fold_into_producer

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TCONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BN = nn.modules.batchnorm._BatchNorm


def _affine(bn: BN):
    if not bn.track_running_stats or bn.running_mean is None:
        raise FoldArithmeticError("it does not track running statistics (it always uses batch statistics)")
    n = bn.num_features
    gamma = bn.weight.detach().cpu().double().numpy() if bn.affine else np.ones(n)
    beta = bn.bias.detach().cpu().double().numpy() if bn.affine else np.zeros(n)
    return bn_scale_shift(gamma, beta, bn.running_mean.detach().cpu().double().numpy(),
                          bn.running_var.detach().cpu().double().numpy(), bn.eps)


def fuse_pair(layer: nn.Module, bn: BN) -> nn.Module:
    """A copy of ``layer`` with ``bn`` folded in. Raises FoldArithmeticError with a reason."""
    if isinstance(layer, CONVS):
        kind, n_out = "conv", layer.out_channels
    elif isinstance(layer, TCONVS):
        kind, n_out = "conv_transpose", layer.out_channels
    elif isinstance(layer, nn.Linear):
        kind, n_out = "rows", layer.out_features
    else:
        raise FoldArithmeticError(f"{type(layer).__name__} has no weights to fold into")
    if n_out != bn.num_features:
        raise FoldArithmeticError(f"channel count mismatch ({bn.num_features} vs {n_out})")
    s, t = _affine(bn)
    w = layer.weight.detach().cpu().double().numpy()
    b = None if layer.bias is None else layer.bias.detach().cpu().double().numpy()
    w2, b2 = fold_into_producer(w, b, s, t, kind, getattr(layer, "groups", 1))
    fused = copy.deepcopy(layer)
    dtype, device = layer.weight.dtype, layer.weight.device
    for name, arr in (("weight", w2), ("bias", b2)):
        value = torch.from_numpy(np.ascontiguousarray(arr)).to(dtype=dtype)
        if not torch.isfinite(value).all() and np.isfinite(arr).all():
            raise FoldArithmeticError(f"the folded {name} overflows {dtype}")
        setattr(fused, name, nn.Parameter(value.to(device), requires_grad=layer.weight.requires_grad))
    return fused


def _fx_fold(model: nn.Module, report: list):
    import torch.fx as fx

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):  # every BN (BatchNormNd too) is a leaf, not traced into
            return isinstance(m, BN) or super().is_leaf_module(m, qualname)

    gm = fx.GraphModule(model, Tracer().trace(model), type(model).__name__)
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), BN):
            continue
        bn = modules[node.target]
        entry = {"bn": node.target, "action": "kept", "target": None, "reason": ""}
        report.append(entry)
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or src.op != "call_module":
            entry["reason"] = "its input does not come from a Conv/ConvTranspose/Linear module"
            continue
        layer = modules[src.target]
        if len(src.users) != 1:
            entry["reason"] = f"the output of '{src.target}' is used {len(src.users)} times"
            continue
        try:
            fused = fuse_pair(layer, bn)
        except FoldArithmeticError as e:
            entry["reason"] = str(e)
            continue
        parent, _, attr = src.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, fused)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        entry.update(action="folded", target=src.target, reason="")
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _sequential_fold(model: nn.Module, report: list, prefix=""):
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            items = list(child._modules.items())
            for (ka, a), (kb, b) in zip(items, items[1:]):
                if isinstance(b, BN) and isinstance(a, CONVS + TCONVS + (nn.Linear,)):
                    entry = {"bn": f"{path}.{kb}", "action": "kept", "target": None, "reason": ""}
                    report.append(entry)
                    try:
                        child._modules[ka] = fuse_pair(a, b)
                    except FoldArithmeticError as e:
                        entry["reason"] = str(e)
                        continue
                    child._modules[kb] = nn.Identity()
                    entry.update(action="folded", target=f"{path}.{ka}", reason="")
        _sequential_fold(child, report, path + ".")
    return model


def _report_unpaired(model: nn.Module, report: list) -> None:
    seen = {r["bn"] for r in report}
    for name, m in model.named_modules():
        if isinstance(m, BN) and name not in seen:
            report.append({"bn": name, "action": "kept", "target": None,
                           "reason": "the model does not trace with torch.fx and this BN is not right after a "
                                     "Conv/Linear inside an nn.Sequential"})


def fold_bn(module: nn.Module, inplace: bool = False):
    """Return ``(folded_module, report)``: ``module`` in eval mode with BN folded into the preceding
    Conv1d/2d/3d, ConvTranspose1d/2d/3d (grouped included) or Linear; ``report`` is a list of dicts
    (bn, action "folded"/"kept", target, reason). The input module is not changed unless ``inplace``."""
    from .syncbn import revert_sync_batchnorm

    model = module if inplace else copy.deepcopy(module)
    model = revert_sync_batchnorm(model).eval()
    report: list = []
    try:
        folded = _fx_fold(model, report)
    except Exception as e:  # torch.fx cannot trace data-dependent control flow and friends
        report.clear()
        folded = _sequential_fold(model, report)
        _report_unpaired(folded, report)
        for r in report:
            r.setdefault("note", f"torch.fx could not trace the model ({type(e).__name__}); used nn.Sequential order")
    return folded.eval(), report
