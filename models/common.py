import torch
from torch import nn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm realistic, non-identity parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                m.num_batches_tracked.fill_(1000)
                if m.affine:
                    m.weight.copy_(1.0 + 0.25 * torch.randn(n, generator=g))
                    m.bias.copy_(0.2 * torch.randn(n, generator=g))
    return model


def finish(model: nn.Module, syncbn: bool, seed: int) -> nn.Module:
    randomize_bn(model, seed)
    if syncbn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.eval()


def conv_bn(c_in, c_out, k=3, stride=1, groups=1, act=True, dims=2):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    layers = [conv(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), bn(c_out)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)
