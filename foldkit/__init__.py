"""foldkit: remove BatchNormalization from inference graphs, exactly, and prove it.

    import foldkit
    result = foldkit.fold("model.onnx")          # FoldResult(model, report)
    result.save("model.folded.onnx")
    print(result.report.to_json())
    foldkit.check("model.folded.onnx").findings  # the CI gate's findings ([] when deployment-ready)

The names below are imported on first use (PEP 562), so that ``foldkit`` on the command line
starts without loading onnx and numpy until a command needs them.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "fold": ".api", "FoldResult": ".api", "count_bn": ".api", "fold_file": ".api", "MemoryPolicy": ".api", "FoldOptions": ".api",
    "check": None, "check_many": ".check", "CheckResult": ".check", "Finding": ".check",
    "FoldkitError": ".errors", "InputError": ".errors", "VerificationError": ".errors",
    "Report": ".report", "Action": ".report",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        if _EXPORTS[name] is None:  # a callable submodule (foldkit.check)
            value = import_module(f".{name}", __name__)
        else:
            value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'foldkit' has no attribute {name!r}")


def __dir__():
    return __all__
