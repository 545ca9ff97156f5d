"""Training-mode BatchNormalization -> inference mode.

A BN in training mode normalizes with the statistics of the current batch and may output updated
running statistics. For deployment it must use its stored running statistics instead:

- opset >= 14: ``training_mode=1`` is removed (default 0);
- opset 7-13: training mode is signalled by the optional outputs (mean, var, saved_mean, saved_var);
- opset <= 6: ``is_test=0`` (the default) is set to ``is_test=1``.

The running-statistics outputs are dropped when nothing reads them; when something does, the node
is refused and left as it was. This changes the model's outputs by design (batch statistics become
running statistics), so verification compares against the model *after* this pass.
"""

from __future__ import annotations

from ..graph import del_attr, node_label, set_attr
from ..codes import Why
from .base import BNPass
from .common import Refusal, is_training


class InferenceMode(BNPass):
    name = "inference-mode"
    stage = "inference-mode"

    def run_bn(self, ctx, view, path, i, bn):
        opset = ctx.index.opset
        label = node_label(bn)
        try:
            if not is_training(opset, bn):
                return False
        except Refusal as r:
            ctx.report.refuse(bn.output[0], label, path, "inference-mode", str(r), r.code)
            return False
        extra = [o for o in bn.output[1:] if o]
        used = [o for o in extra if view.uses(o) > 0]
        if used:
            names = ", ".join(f"'{o}'" for o in used)
            ctx.report.refuse(bn.output[0], label, path, "inference-mode",
                              f"it is in training mode and its running-statistics output {names} "
                              f"is read by the graph, so it cannot be converted to inference mode", Why.TRAINING_MODE)
            return False
        del bn.output[1:]
        if opset >= 14:
            del_attr(bn, "training_mode")
        elif opset < 7:
            set_attr(bn, "is_test", 1)
        entry = ctx.report.entry(bn.output[0], label, path)
        entry.steps.append("converted: training mode -> inference mode (running statistics)")
        ctx.converted_training = True
        return True
