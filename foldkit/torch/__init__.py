"""The PyTorch side of foldkit (the ``torch`` extra). Nothing outside this package imports torch."""

from .export import export, load_checkpoint, load_factory
from .fold import fold_bn
from .recalibrate import recalibrate
from .syncbn import BatchNormNd, revert_sync_batchnorm

__all__ = ["revert_sync_batchnorm", "BatchNormNd", "fold_bn", "export", "load_factory", "load_checkpoint", "recalibrate"]
