"""foldkit: remove BatchNormalization from inference graphs, exactly, and prove it.

    import foldkit
    result = foldkit.fold("model.onnx")          # FoldResult(model, report)
    result.save("model.folded.onnx")
    print(result.report.to_json())
"""

from .api import FoldResult, count_bn, fold
from .errors import FoldkitError, InputError, VerificationError
from .report import Action, Report

__version__ = "0.1.0"

__all__ = ["fold", "FoldResult", "count_bn", "Report", "Action", "FoldkitError", "InputError", "VerificationError", "__version__"]
