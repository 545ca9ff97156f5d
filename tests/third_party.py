"""Importing third-party network definitions that need a package this machine cannot load.

timm imports torchvision when it is imported (its data pipeline, and FrozenBatchNorm2d for
``freeze_batch_norm_2d``); its model definitions never use it. PyPI's torchvision wheel is built
against the CUDA build of torch and fails to load beside the CPU torch the project pins ("operator
torchvision::nms does not exist"), so where torchvision cannot be imported, a placeholder package
stands in for it while timm's definitions are used. Nothing that runs calls into it: an attribute
of the placeholder is an empty class.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types


class _Placeholder(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _Module(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _Module(spec.name)
        m.__path__ = []
        return m

    def exec_module(self, module):
        pass


def import_timm():
    """timm, with the torchvision placeholder where the real one cannot be imported; ImportError
    when timm is not installed."""
    import importlib.util

    if importlib.util.find_spec("timm") is None:
        raise ImportError("timm is not installed (make installs it --no-deps)")
    try:
        import torchvision  # noqa: F401  (only whether it imports)
    except Exception:  # missing, or a wheel that cannot load beside this torch
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
        if not any(isinstance(f, _Finder) for f in sys.meta_path):
            sys.meta_path.insert(0, _Finder())
    import timm

    return timm
