"""BatchNorm running statistics judged against real data (``check --data``: FK012), and the names
of the statistics modules in one place.

- foldkit.moments: exact float64 per-channel moments of every BN input over data;
- foldkit.recalibration: re-estimating the statistics (``foldkit recalibrate``);
- here: :func:`drift`, how far each BN's running statistics are from its inputs' in inference mode.

Every name this module held before the split is still importable from it.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
from onnx import ModelProto

from .moments import METHODS, BNInfo, Moments, _feeds, _measure, _typing, find_bns, instrumented  # noqa: F401
from .recalibration import (Distributed, classifier_metric, recalibrate, recalibrate_file,  # noqa: F401
                            write_stats)

__all__ = ["BNInfo", "Distributed", "METHODS", "Moments", "classifier_metric", "drift", "find_bns", "instrumented",
           "recalibrate", "recalibrate_file", "write_stats"]


def drift(model: ModelProto, batches: Callable[[], Iterable[dict]], reduce=None) -> list:
    """Per BN, how far its running statistics are from its inputs' in inference mode over the data:
    the largest |mean shift| / sqrt(running var + eps) and the var ratios over channels."""
    bns, _ = find_bns(model)
    if not bns:
        return []
    inst = instrumented(model, bns, set(), *_typing(model, None))
    acc, _, _ = _measure(inst.SerializeToString(), bns, _feeds(batches()), reduce or (lambda a: a))
    out = []
    for b, mo in zip(bns, acc):
        shift = np.abs(mo.mean - b.old_mean) / np.sqrt(b.old_var + b.eps)
        ratio = (mo.var + b.eps) / (b.old_var + b.eps)
        out.append({"node": b.name, "max_mean_shift_sd": float(np.max(shift)),
                    "max_var_ratio": float(np.max(ratio)), "min_var_ratio": float(np.min(ratio)),
                    "worst_channel": int(np.argmax(shift))})
    return out


