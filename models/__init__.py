"""Reference networks in plain torch (torchvision does not install beside the pinned CPU torch).

Each factory takes ``syncbn=True`` for a SyncBatchNorm variant and ``seed`` for reproducible weights;
BN statistics are randomised realistically by :func:`models.common.randomize_bn`, so folding them is
never the identity. ``REGISTRY`` maps a name to (factory, default input shape).
"""

from .common import randomize_bn
from .mlp import mlp_bn
from .mobilenet import mobilenet_v2
from .nets1d3d import audio_net, video_net
from .resnet import preact_resnet18, resnet18, resnet50
from .unet import unet

REGISTRY = {
    "resnet18": (resnet18, (1, 3, 224, 224)),
    "resnet50": (resnet50, (1, 3, 224, 224)),
    "mobilenet_v2": (mobilenet_v2, (1, 3, 224, 224)),
    "preact_resnet18": (preact_resnet18, (1, 3, 224, 224)),
    "unet": (unet, (1, 3, 128, 128)),
    "audio_net": (audio_net, (1, 1, 16000)),
    "video_net": (video_net, (1, 3, 8, 64, 64)),
    "mlp_bn": (mlp_bn, (8, 64)),
}

__all__ = ["REGISTRY", "randomize_bn", "resnet18", "resnet50", "preact_resnet18", "mobilenet_v2", "unet",
           "audio_net", "video_net", "mlp_bn"]
