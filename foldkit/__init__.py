"""foldkit: remove BatchNormalization from inference graphs, exactly, and prove it.

    import foldkit
    result = foldkit.fold("model.onnx")          # FoldResult(model, report)
    result.save("model.folded.onnx")
    print(result.report.to_json())

The names below are imported on first use (PEP 562), so that ``foldkit`` on the command line
starts without loading onnx and numpy until a command needs them.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "fold": ".api", "FoldResult": ".api", "count_bn": ".api",
    "FoldkitError": ".errors", "InputError": ".errors", "VerificationError": ".errors",
    "Report": ".report", "Action": ".report",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'foldkit' has no attribute {name!r}")


def __dir__():
    return __all__
