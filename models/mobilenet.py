"""MobileNetV2 (Sandler et al. 2018): inverted residuals with depthwise convolutions."""

import torch
from torch import nn

from .common import conv_bn, finish


class InvertedResidual(nn.Module):
    def __init__(self, c_in, c_out, stride, expand):
        super().__init__()
        hidden = c_in * expand
        layers = []
        if expand != 1:
            layers.append(conv_bn(c_in, hidden, 1))
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    CFG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes=1000, width_mult=1.0):
        super().__init__()
        c = int(32 * width_mult)
        layers = [conv_bn(3, c, 3, 2)]
        for t, ch, n, s in self.CFG:
            out = max(8, int(ch * width_mult))
            for i in range(n):
                layers.append(InvertedResidual(c, out, s if i == 0 else 1, t))
                c = out
        last = max(1280, int(1280 * width_mult))
        layers.append(conv_bn(c, last, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes=1000, width_mult=1.0, syncbn=False, seed=0):
    torch.manual_seed(seed)
    return finish(MobileNetV2(num_classes, width_mult), syncbn, seed)
