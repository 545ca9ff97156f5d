"""An MLP with Linear -> BatchNorm1d blocks, and one BatchNorm1d before a Linear (BN -> Linear)."""

import torch
from torch import nn

from .common import finish


class MLP(nn.Module):
    def __init__(self, c_in=64, hidden=128, classes=10):
        super().__init__()
        self.bn_in = nn.BatchNorm1d(c_in)
        self.fc1 = nn.Linear(c_in, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, hidden, bias=False)
        self.bn2 = nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        x = self.fc1(self.bn_in(x))
        x = torch.relu(self.bn1(x))
        x = torch.relu(self.bn2(self.fc2(x)))
        return self.head(x)


def mlp_bn(c_in=64, hidden=128, classes=10, syncbn=False, seed=0):
    torch.manual_seed(seed)
    return finish(MLP(c_in, hidden, classes), syncbn, seed)
