"""A 1-D conv audio net (raw waveform) and a 3-D conv video net (C3D-style)."""

import torch
from torch import nn

from .common import conv_bn, finish


class AudioNet(nn.Module):
    def __init__(self, classes=10, width=32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn(1, w, 9, 4, dims=1), conv_bn(w, w, 3, dims=1), nn.MaxPool1d(4),
            conv_bn(w, 2 * w, 3, dims=1), conv_bn(2 * w, 2 * w, 3, groups=2, dims=1), nn.MaxPool1d(4),
            conv_bn(2 * w, 4 * w, 3, dims=1))
        self.fc = nn.Linear(4 * w, classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool1d(self.features(x), 1), 1))


class VideoNet(nn.Module):
    def __init__(self, classes=10, width=16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn(3, w, 3, dims=3), nn.MaxPool3d((1, 2, 2)),
            conv_bn(w, 2 * w, 3, dims=3), nn.MaxPool3d(2),
            conv_bn(2 * w, 4 * w, 3, dims=3), conv_bn(4 * w, 4 * w, 3, groups=4 * w, dims=3))
        self.fc = nn.Linear(4 * w, classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool3d(self.features(x), 1), 1))


def audio_net(classes=10, width=32, syncbn=False, seed=0):
    torch.manual_seed(seed)
    return finish(AudioNet(classes, width), syncbn, seed)


def video_net(classes=10, width=16, syncbn=False, seed=0):
    torch.manual_seed(seed)
    return finish(VideoNet(classes, width), syncbn, seed)
