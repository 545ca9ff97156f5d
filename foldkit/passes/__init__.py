"""The rewrites, in the order they run. No import-time registration: this tuple is the list.

Each pass declares its stage (``Pass.stage``): ``inference-mode`` runs first and alone (verification
compares against the model after it);
the fold passes (``branches``, ``producer``, ``merge``, ``consumer``) then repeat until nothing
changes (merge parallel branches first, so that a branch's BN and layer scale go into the merged
weight with the branch's own weight, rounded once; then fold; then merge what the folds exposed); ``lower``
(only with lower_standalone) and ``cleanup`` run last.
"""

from .branches import BranchMerge
from .cleanup import Cleanup
from .fold_into_consumer import FoldIntoConsumer
from .fold_into_producer import FoldIntoProducer
from .inference_mode import InferenceMode
from .lower import LowerStandalone
from .merge import MergeAffine

DEFAULT_PASSES = (InferenceMode(), BranchMerge(), FoldIntoProducer(), MergeAffine(), FoldIntoConsumer(),
                  LowerStandalone(), Cleanup())
FINAL_PASSES = tuple(p.name for p in DEFAULT_PASSES if p.stage == "final")  # kept for callers; passes declare stage

PASS_NAMES = tuple(p.name for p in DEFAULT_PASSES)

__all__ = ["DEFAULT_PASSES", "FINAL_PASSES", "PASS_NAMES", "InferenceMode", "FoldIntoProducer", "MergeAffine",
           "FoldIntoConsumer", "BranchMerge", "LowerStandalone", "Cleanup"]
