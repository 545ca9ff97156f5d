"""A small U-Net (Ronneberger et al. 2015) whose decoder upsamples with ConvTranspose + BN (grouped in one stage)."""

import torch
from torch import nn

from .common import conv_bn, finish


class Up(nn.Module):
    def __init__(self, c_in, c_out, groups=1):
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, 2, 2, groups=groups, bias=True)
        self.bn = nn.BatchNorm2d(c_out)
        self.conv = nn.Sequential(conv_bn(2 * c_out, c_out), conv_bn(c_out, c_out))

    def forward(self, x, skip):
        x = torch.relu(self.bn(self.up(x)))
        return self.conv(torch.cat([x, skip], 1))


class UNet(nn.Module):
    def __init__(self, c_in=3, classes=2, width=16):
        super().__init__()
        w = width
        self.enc1 = nn.Sequential(conv_bn(c_in, w), conv_bn(w, w))
        self.enc2 = nn.Sequential(conv_bn(w, 2 * w, stride=2), conv_bn(2 * w, 2 * w))
        self.enc3 = nn.Sequential(conv_bn(2 * w, 4 * w, stride=2), conv_bn(4 * w, 4 * w))
        self.up2 = Up(4 * w, 2 * w, groups=2)
        self.up1 = Up(2 * w, w)
        self.head = nn.Conv2d(w, classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        return self.head(self.up1(self.up2(e3, e2), e1))


def unet(c_in=3, classes=2, width=16, syncbn=False, seed=0):
    torch.manual_seed(seed)
    return finish(UNet(c_in, classes, width), syncbn, seed)
