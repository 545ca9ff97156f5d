"""The rewrites, in the order they run. No import-time registration: this tuple is the list."""

from .cleanup import Cleanup
from .fold_into_producer import FoldIntoProducer
from .inference_mode import InferenceMode

# InferenceMode runs first and alone (verification compares against the model after it);
# the fold passes then repeat until nothing changes; Cleanup runs last.
DEFAULT_PASSES = (InferenceMode(), FoldIntoProducer(), Cleanup())

PASS_NAMES = tuple(p.name for p in DEFAULT_PASSES)

__all__ = ["DEFAULT_PASSES", "PASS_NAMES", "InferenceMode", "FoldIntoProducer", "Cleanup"]
