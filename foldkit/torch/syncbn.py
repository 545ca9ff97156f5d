"""SyncBatchNorm -> plain batch norm, so a model trained under DistributedDataParallel runs anywhere."""

from __future__ import annotations

import torch
from torch import nn


class BatchNormNd(nn.modules.batchnorm._BatchNorm):
    """A batch norm that, like SyncBatchNorm, accepts inputs of any rank >= 2 (N, C, *).

    It runs ``F.batch_norm`` like BatchNorm1d/2d/3d, so it exports to ONNX BatchNormalization and
    foldkit's folding recognises it (it is a ``_BatchNorm``).
    """

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (N, C, *), got {input.dim()}")


def _convert(sync: nn.SyncBatchNorm) -> BatchNormNd:
    ref = sync.running_mean if sync.running_mean is not None else sync.weight
    kw = {}
    if ref is not None:
        kw = {"device": ref.device, "dtype": ref.dtype}
    bn = BatchNormNd(sync.num_features, sync.eps, sync.momentum, sync.affine, sync.track_running_stats, **kw)
    with torch.no_grad():
        if sync.affine:
            bn.weight = sync.weight  # the same Parameter: requires_grad and optimizer state carry over
            bn.bias = sync.bias
        if sync.track_running_stats:
            bn.running_mean = sync.running_mean
            bn.running_var = sync.running_var
            bn.num_batches_tracked = sync.num_batches_tracked
    bn.train(sync.training)
    if hasattr(sync, "qconfig"):
        bn.qconfig = sync.qconfig
    return bn


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every SyncBatchNorm in ``module`` (at any depth: Sequential, ModuleList, ModuleDict,
    custom modules, DDP's ``.module``) with a :class:`BatchNormNd` holding the same parameters,
    buffers, eps, momentum, affine, track_running_stats, device, dtype and training flag.

    Returns the converted module (a new one if ``module`` itself is a SyncBatchNorm, else ``module``
    changed in place). The reverse is torch's ``nn.SyncBatchNorm.convert_sync_batchnorm``.
    """
    if isinstance(module, nn.SyncBatchNorm):
        return _convert(module)
    for name, child in module.named_children():
        new = revert_sync_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module
