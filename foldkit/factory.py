"""Model factories (``FILE.py:FN`` or ``MODULE:FN``) and their ``--model-arg`` values.

Torch-free on purpose: ``foldkit bench --model-arg`` and the CLI parse these without importing torch.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import os
import sys
from typing import Sequence

from .errors import InputError


def _why(e: BaseException) -> str:
    """An exception from the user's code as one short phrase."""
    if isinstance(e, SystemExit):
        return f"it called sys.exit({e.code!r})"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def load_factory(spec: str):
    """``path/to/file.py:fn`` or ``package.module:fn`` -> the callable."""
    target, sep, fn_name = spec.rpartition(":")
    if not sep or not target or not fn_name:
        raise InputError(f"--model '{spec}': expected FILE.py:FUNCTION or MODULE:FUNCTION")
    if target.endswith(".py") or os.sep in target:
        if not os.path.isfile(target):
            raise InputError(f"--model '{spec}': no such file '{target}'")
        path = os.path.abspath(target)
        folder = os.path.dirname(path)
        # make the file's package importable (models/resnet.py uses relative imports)
        pkg_root, parts = folder, [os.path.splitext(os.path.basename(path))[0]]
        while os.path.isfile(os.path.join(pkg_root, "__init__.py")):
            parts.insert(0, os.path.basename(pkg_root))
            pkg_root = os.path.dirname(pkg_root)
        if pkg_root not in sys.path:
            sys.path.insert(0, pkg_root)
        mod_name = ".".join(parts)
        try:
            if len(parts) > 1:
                module = importlib.import_module(mod_name)
            else:
                name = "foldkit_user_" + hashlib.sha1(path.encode()).hexdigest()[:12]
                loader_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[name] = module
                loader_spec.loader.exec_module(module)
        except (Exception, SystemExit) as e:
            raise InputError(f"--model '{spec}': importing '{target}' failed: {_why(e)}") from None
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:  # as `python -m` does: the current folder first
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(target)
        except (Exception, SystemExit) as e:
            raise InputError(f"--model '{spec}': cannot import '{target}': {_why(e)}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise InputError(f"--model '{spec}': '{target}' has no callable '{fn_name}'")
    return fn


def parse_model_args(items: Sequence[str]) -> dict:
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise InputError(f"--model-arg '{item}': expected NAME=VALUE")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise InputError(f"--model-arg '{item}': {value!r} is not a Python literal (numbers, True/False/None, "
                             f"quoted strings, lists, tuples, dicts): for a string write {key}=\"'{value}'\"") from None
    return out
