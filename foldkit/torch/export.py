"""foldkit export: a PyTorch factory (+ checkpoint) to a folded, verified ONNX file."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..errors import InputError, VerificationError
from ..factory import _why, load_factory, parse_model_args  # noqa: F401  (torch-free; re-exported here)

STATE_DICT_KEYS = ("state_dict", "model", "ema", "model_ema", "ema_state_dict", "module")
PREFIXES = ("module.", "_orig_mod.")


def load_checkpoint(path: str, trust: bool = False) -> dict:
    """A state_dict from a checkpoint, loaded with ``weights_only=True`` unless ``trust``.

    Accepts a bare state_dict or one under state_dict/model/ema/... keys (or a pickled Module when
    trusted) and strips DistributedDataParallel's ``module.`` and torch.compile's ``_orig_mod.`` prefixes.
    """
    import torch

    if not os.path.isfile(path):
        raise InputError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        # torch's first line is a paragraph about its defaults; the line that names the global says why
        first = next((ln for ln in lines if ln.lower().startswith("unsupported")), lines[0] if lines else "unsupported global")
        if trust:
            raise InputError(f"{path}: cannot unpickle checkpoint: {first}") from None
        raise InputError(f"{path}: checkpoint needs arbitrary unpickling, which can run code "
                         f"({first[:160]}); pass --trust-checkpoint only if you trust its source") from None
    except Exception as e:
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return extract_state_dict(obj, path)


def extract_state_dict(obj, source="checkpoint") -> dict:
    import torch

    def is_sd(d):
        return isinstance(d, dict) and d and all(isinstance(k, str) for k in d) and \
            all(isinstance(v, torch.Tensor) for v in d.values())

    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not is_sd(obj) and isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, torch.nn.Module):
                inner = inner.state_dict()
            if is_sd(inner):
                obj = inner
                break
    if not is_sd(obj):
        raise InputError(f"{source}: no state_dict found (looked for a dict of tensors, or one under "
                         f"{', '.join(STATE_DICT_KEYS)})")
    sd = dict(obj)
    for prefix in PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def apply_state_dict(model, sd: dict, source="checkpoint") -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        raise InputError(f"{source} does not match the model: " + "; ".join(parts))
    bad = [k for k in sd if tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise InputError(f"{source}: '{k}' has shape {list(sd[k].shape)}, the model expects {list(own[k].shape)}")
    model.load_state_dict(sd, strict=True)


@dataclass
class ExportResult:
    path: str
    report: dict = field(default_factory=dict)


def _export_to(model, args, path, opset, exporter, dynamic_batch, input_names, output_names):
    import torch

    if exporter == "legacy":
        dynamic_axes = {n: {0: "batch"} for n in input_names + output_names} if dynamic_batch else None
        torch.onnx.export(model, args, path, dynamo=False, opset_version=opset or 17, do_constant_folding=False,
                          input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes)
        return
    import logging

    import onnx_ir as ir
    import onnxscript.optimizer

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=4096)
        dynamic_shapes = tuple({0: batch} for _ in args)
    # optimize=False: torch's default optimizer would fuse Conv+BN itself (no report, no exactness
    # guarantee). Plain constant folding turns the exporter's computed biases into initializers.
    prog = torch.onnx.export(model, args, None, dynamo=True, opset_version=opset or 18, optimize=False,
                             input_names=input_names, output_names=output_names, dynamic_shapes=dynamic_shapes,
                             verbose=False)
    irm = prog.model
    onnxscript.optimizer.fold_constants(irm)
    onnxscript.optimizer.remove_unused_nodes(irm)
    ir.save(irm, path)


def export(model_spec: str, output: str, input_shapes: Sequence[Sequence[int]], checkpoint: Optional[str] = None,
           model_args: Optional[dict] = None, trust_checkpoint: bool = False, dynamic_batch: bool = False,
           opset: Optional[int] = None, exporter: str = "legacy", fold: bool = True, atol=None, rtol=None,
           seed: int = 0, in_place_ok: bool = False, durable: bool = False, recalibrate_data=None,
           recalibrate_method: str = "batch", batch_size: Optional[int] = None, max_samples=None) -> ExportResult:
    """Build, load, revert SyncBN, eval, export, fold (unless fold=False), check parity, write
    atomically (and fsynced before the rename when ``durable``)."""
    import torch

    from .. import api
    from .. import io as fio
    from ..verify import compare, default_tolerances, run as run_onnx
    from .syncbn import revert_sync_batchnorm

    if exporter not in ("dynamo", "legacy"):
        raise InputError(f"--exporter '{exporter}': expected dynamo or legacy")
    if not input_shapes:
        raise InputError("give at least one --input-shape, e.g. --input-shape 1,3,224,224")
    factory = load_factory(model_spec) if isinstance(model_spec, str) else model_spec
    try:
        model = factory(**(model_args or {}))
    except (Exception, SystemExit) as e:  # the user's code: whatever it raises is their input's problem
        raise InputError(f"--model '{model_spec}': calling the factory failed: {_why(e)}") from None
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"--model '{model_spec}': the factory returned {type(model).__name__}, not a torch.nn.Module")
    if checkpoint:
        apply_state_dict(model, load_checkpoint(checkpoint, trust_checkpoint), checkpoint)
    model = revert_sync_batchnorm(model).eval()
    recal = None
    if recalibrate_data is not None:  # before export: the ONNX file carries the re-estimated statistics
        from ..data import batches as data_batches
        from .recalibrate import recalibrate, recalibrate_numpy_batches

        names = {f"input{k}" if len(input_shapes) > 1 else "input": np.dtype(np.float32) for k in range(len(input_shapes))}
        source = lambda: recalibrate_numpy_batches(data_batches(os.fspath(recalibrate_data), names, batch_size,  # noqa: E731
                                                                max_samples))
        try:
            recal = recalibrate(model, source, recalibrate_method)
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"--recalibrate: the model's forward failed on the data: {_why(e)}") from None
        model.eval()
    gen = torch.Generator().manual_seed(seed)
    args = tuple(torch.randn(*shape, generator=gen) for shape in input_shapes)
    input_names = [f"input{i}" if len(args) > 1 else "input" for i in range(len(args))]
    try:
        with torch.no_grad():
            expected = model(*args)
    except (Exception, SystemExit) as e:
        shapes = ", ".join("x".join(map(str, s)) for s in input_shapes)
        raise InputError(f"--model '{model_spec}': the model's forward failed on inputs of shape {shapes}: "
                         f"{_why(e)}") from None
    outs = expected if isinstance(expected, (tuple, list)) else (expected,)
    bad = [type(o).__name__ for o in outs if not isinstance(o, torch.Tensor)]
    if bad:
        raise InputError(f"--model '{model_spec}': the model returned {type(expected).__name__}"
                         f"{' holding ' + bad[0] if bad[0] != type(expected).__name__ else ''}; foldkit export "
                         "needs a tensor or a tuple of tensors (wrap the model to return them)")
    output_names = [f"output{i}" if len(outs) > 1 else "output" for i in range(len(outs))]

    with tempfile.TemporaryDirectory() as tmp:
        raw_path = os.path.join(tmp, "model.onnx")
        sink = io.StringIO()
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                warnings.simplefilter("ignore")
                _export_to(model, args, raw_path, opset, exporter, dynamic_batch, input_names, output_names)
        except Exception as e:
            raise InputError(f"torch.onnx.export ({exporter}) failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
        onnx_model = fio.load_model(raw_path)  # external data (if any) is read into memory here
    bn_exported = api.count_bn(onnx_model)
    fold_report = None
    if fold:
        try:
            result = api.fold(onnx_model, verify=True, atol=atol, rtol=rtol, seed=seed,
                              input_shapes={n: list(a.shape) for n, a in zip(input_names, args)
                                            if n in {i.name for i in onnx_model.graph.input}})
        except InputError as e:
            hint = " (torch's dynamo exporter is known to emit invalid biases for bias-free Conv3d; try --exporter legacy)" \
                if exporter == "dynamo" else ""
            raise InputError(str(e).replace("the original model", "the exported model") + hint) from None
        onnx_model, fold_report = result.model, result.report

    feeds = {n: a.numpy() for n, a in zip([i.name for i in onnx_model.graph.input], args)}
    got, backend = run_onnx(onnx_model, feeds)
    d_atol, d_rtol = default_tolerances(onnx_model)
    p_atol = d_atol * 10 if atol is None else atol  # torch vs ORT kernels differ more than ORT vs ORT
    p_rtol = d_rtol * 10 if rtol is None else rtol
    diffs = [compare(n, o.detach().numpy(), g, p_atol, p_rtol) for n, o, g in zip(output_names, outs, got)]
    parity = {"passed": all(d.passed for d in diffs), "max_abs_err": max(d.max_abs_err for d in diffs),
              "max_rel_err": max(d.max_rel_err for d in diffs), "atol": p_atol, "rtol": p_rtol, "backend": backend}
    from ..report import Report

    if fold_report is None:  # --no-fold: the same layout, with nothing folded
        fold_report = Report(bn_before=bn_exported, bn_after=bn_exported, seed=seed)
    fold_report.command = "export"
    spec = model_spec if isinstance(model_spec, str) else getattr(model_spec, "__name__", "factory")
    fold_report.inputs = [spec] + ([os.fspath(checkpoint)] if checkpoint else [])
    fold_report.input_shapes = {n: list(a.shape) for n, a in zip(input_names, args)}
    fold_report.seed = seed
    report = fold_report.to_dict()
    report["input_shapes"] = fold_report.input_shapes  # what PyTorch was fed (the fold verified the same)
    report["export"] = {"model": spec, "checkpoint": os.fspath(checkpoint) if checkpoint else None,
                        "exporter": exporter, "dynamic_batch": dynamic_batch, "folded": fold,
                        "opset": next((o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx")), None),
                        "bn_exported": bn_exported}
    report["parity"] = parity
    if recal is not None:
        report["recalibration"] = {"method": recalibrate_method, "source": os.fspath(recalibrate_data),
                                   "values_seen": recal}
    if not parity["passed"]:
        raise VerificationError(f"PyTorch and ONNX Runtime disagree: max abs err {parity['max_abs_err']:.3g} "
                                f"(relative {parity['max_rel_err']:.3g}; atol {p_atol:g}, rtol {p_rtol:g})",
                                ExportResult(output, report))
    fio.atomic_write(output, fio.serialize(onnx_model), durable=durable)
    return ExportResult(output, report)
