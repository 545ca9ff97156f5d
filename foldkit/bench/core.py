"""Interleaved A/B latency measurement over models x runtimes x batch sizes."""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..errors import InputError
from .runners import ORT_LEVELS, RUNTIMES, OpenVinoRunner, OrtRunner, TorchRunner, TrtRunner, Unavailable
from .stats import paired_ratio, summarize


@dataclass
class BenchConfig:
    models: list
    runtimes: list = field(default_factory=lambda: ["ort-cpu"])
    ort_opt_levels: list = field(default_factory=lambda: ["all"])
    batches: list = field(default_factory=lambda: [None])  # None: the batch --input-shape gives, else 1
    input_shapes: dict = field(default_factory=dict)
    warmup: int = 10
    iters: int = 100
    threads: Optional[int] = None
    fp16: bool = False
    torch_model: Optional[str] = None
    torch_model_args: dict = field(default_factory=dict)
    cache_dir: Optional[str] = None
    seed: int = 0
    max_input_bytes: Optional[int] = None


@dataclass
class BenchResult:
    rows: list = field(default_factory=list)
    unavailable: list = field(default_factory=list)
    machine: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    inputs: list = field(default_factory=list)
    input_shapes: dict = field(default_factory=dict)  # per (runtime, batch) group: {name: dims} fed
    seed: int = 0

    def to_dict(self) -> dict:
        from ..report import envelope

        return {**envelope("bench", self.inputs, input_shapes=self.input_shapes, seed=self.seed),
                "machine": self.machine, "config": self.config, "rows": self.rows, "unavailable": self.unavailable}


# CPU features that decide int8 (QLinearConv, MatMulInteger) speed: VNNI, AMX, ARM's dot products
INT8_FEATURES = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
                 "asimddp", "i8mm", "sve")


def cpu_description() -> dict:
    """The CPU's model name and its int8-relevant features, from /proc/cpuinfo where there is one."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                    model = value.strip() or model
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"cpu_model": model, "int8_features": [f for f in INT8_FEATURES if f in flags]}


def machine_info(threads: Optional[int] = None) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), **cpu_description(),
            "threads": threads if threads else f"runtime default ({os.cpu_count()} cores)"}
    try:
        from ..imports import import_blocked
        ort = import_blocked("onnxruntime")
        info["onnxruntime"] = ort.__version__
    except ImportError:
        pass
    import sys

    torch = sys.modules.get("torch")  # only when a torch runner already imported it: bench never needs torch
    if torch is not None:
        info["torch"] = torch.__version__
        try:
            if torch.cuda.is_available():
                info["gpu"] = torch.cuda.get_device_name(0)
        except Exception:  # a CUDA build on a machine without a driver
            pass
    return info


def _feeds_for(model_path: str, batch: Optional[int], shapes: dict, seed: int, max_bytes: Optional[int] = None):
    """(feeds, the batch they really have). ``batch`` None: what --input-shape or the model fixes, else 1.
    A --batch that disagrees with an --input-shape is refused rather than one silently winning."""
    from .. import io as fio
    from ..verify import make_inputs, resolve_input_shapes

    model = fio.read_model(model_path)
    shapes = resolve_input_shapes(model, shapes)
    inits = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits or not inp.type.tensor_type.HasField("shape"):
            continue
        if inp.name in shapes:
            given = shapes[inp.name]
            if batch is not None and given and given[0] != batch:
                raise InputError(f"--batch {batch} and --input-shape {inp.name}:{','.join(map(str, given))} disagree "
                                 f"on the batch size: give it in one of them")
            continue
        dims = inp.type.tensor_type.shape.dim
        if batch is not None and dims and dims[0].HasField("dim_value") and dims[0].dim_value != batch:
            raise Unavailable(f"input '{inp.name}' has a fixed batch of {dims[0].dim_value} (export with --dynamic-batch)")
    feeds = make_inputs(model, shapes, seed=seed, batch=batch, max_bytes=max_bytes)
    ranked = [a for a in feeds.values() if getattr(a, "ndim", 0) >= 1]
    return feeds, (int(ranked[0].shape[0]) if ranked else 1)


def _measure(runners: list, warmup: int, iters: int, tick: Callable[[], None]) -> list:
    for r in runners:
        for _ in range(warmup):
            r.infer()
    samples = [[] for _ in runners]
    order = list(range(len(runners)))
    for i in range(iters):
        # A B, then B A: neither model always runs first (cache and clock effects cancel)
        for k in (order if i % 2 == 0 else order[::-1]):
            samples[k].append(runners[k].infer())
        tick()
    return samples


def _groups(cfg: BenchConfig):
    for runtime in cfg.runtimes:
        if runtime not in RUNTIMES:
            raise InputError(f"--runtime '{runtime}': expected one of {', '.join(RUNTIMES)}")
        levels = cfg.ort_opt_levels if runtime.startswith("ort-") else [None]
        for level in levels:
            if level is not None and level not in ORT_LEVELS:
                raise InputError(f"--ort-opt-level '{level}': expected one of {', '.join(ORT_LEVELS)}")
            for batch in cfg.batches:
                yield runtime, level, batch


def _torch_modules(cfg: BenchConfig):
    try:
        from ..torch import fold_bn, load_factory
        from ..torch.syncbn import revert_sync_batchnorm
    except ImportError:
        raise Unavailable("torch is not installed (pip install 'foldkit-onnx[torch]')") from None

    factory = load_factory(cfg.torch_model)
    module = revert_sync_batchnorm(factory(**cfg.torch_model_args)).eval()
    folded, _ = fold_bn(module)
    return [(f"pytorch {cfg.torch_model}", module), (f"pytorch {cfg.torch_model} (fold_bn)", folded)]


def run_bench(cfg: BenchConfig, progress: Optional[Callable] = None, on_internal: Optional[Callable] = None
              ) -> BenchResult:
    """Measure every model on every runtime (x ORT opt level) and batch; A/B interleaved. A group
    that a runtime cannot run, or that foldkit fails on (a bug: ``internal`` set, after
    ``on_internal(exception)``, which may raise it instead), is an ``unavailable`` entry with its
    reason; the other groups are still measured."""
    if cfg.iters < 2:
        raise InputError("--iters must be at least 2")
    for m in cfg.models:
        if not os.path.isfile(m):
            raise InputError(f"{m}: no such file")
    result = BenchResult(inputs=list(cfg.models), seed=cfg.seed, machine=machine_info(cfg.threads), config={
        "runtimes": cfg.runtimes, "ort_opt_levels": cfg.ort_opt_levels, "batches": cfg.batches,
        "warmup": cfg.warmup, "iters": cfg.iters, "threads": cfg.threads, "fp16": cfg.fp16,
        "models": [os.path.basename(m) for m in cfg.models]})
    groups = list(_groups(cfg))
    total = len(groups) * cfg.iters
    tick = progress(total) if progress else (lambda: None)
    for runtime, level, batch in groups:
        group = f"{runtime}[{level}]" if level else runtime
        try:
            if runtime in ("torch", "torch-cuda"):
                if not cfg.torch_model:
                    raise Unavailable("needs --model FACTORY (as for foldkit export)")
                if not cfg.models:
                    raise Unavailable("needs an ONNX model to take input shapes from")
                feeds, batch = _feeds_for(cfg.models[0], batch, cfg.input_shapes, cfg.seed, cfg.max_input_bytes)
                result.input_shapes[f"{group} batch {batch}"] = {k: list(v.shape) for k, v in feeds.items()}
                device = "cuda" if runtime == "torch-cuda" else "cpu"
                entries = [(label, TorchRunner(None, feeds, module=mod, device=device, threads=cfg.threads))
                           for label, mod in _torch_modules(cfg)]
            else:
                feeds, batch = _feeds_for(cfg.models[0], batch, cfg.input_shapes, cfg.seed, cfg.max_input_bytes)
                result.input_shapes[f"{group} batch {batch}"] = {k: list(v.shape) for k, v in feeds.items()}
                entries = []
                for path in cfg.models:
                    if runtime == "trt":
                        r = TrtRunner(path, feeds, fp16=cfg.fp16, cache_dir=cfg.cache_dir)
                    elif runtime == "openvino":
                        r = OpenVinoRunner(path, feeds, threads=cfg.threads)
                    else:
                        r = OrtRunner(path, feeds, runtime, level, cfg.threads, cfg.fp16, cfg.cache_dir)
                    entries.append((os.path.basename(path), r))
            with contextlib.ExitStack() as stack:  # every runner deactivated, whatever fails
                active = [(label, stack.enter_context(r)) for label, r in entries]
                samples = _measure([r for _, r in active], cfg.warmup, cfg.iters, tick)
        except InputError:
            raise  # a usage error (inputs over the cap, a --batch that disagrees): the whole command's
        except Exception as e:  # a runtime that cannot run this model, or a bug met in this group: its entry
            entry = {"runtime": group, "batch": batch if batch is not None else "-"}
            if isinstance(e, Unavailable):
                entry["reason"] = str(e)
            elif isinstance(e, (RuntimeError, ValueError)):
                entry["reason"] = f"failed: {str(e).strip().splitlines()[0][:200]}"
            else:  # a bug in foldkit: recorded, the other groups still measured
                from ..errors import internal_message

                if on_internal is not None:
                    on_internal(e)
                entry.update(reason=internal_message(e), internal=True)
            result.unavailable.append(entry)
            for _ in range(cfg.iters):
                tick()
            continue
        base = samples[0]
        for (label, r), ns in zip(active, samples):
            row = {"model": label, "runtime": group, "batch": batch, "load_s": r.load_seconds, **summarize(ns, batch),
                   "vs_first": None if ns is base else paired_ratio(ns, base, seed=cfg.seed),
                   "samples_ms": [round(x / 1e6, 6) for x in ns]}
            result.rows.append(row)
    return result


def to_markdown(result: BenchResult) -> str:
    lines = ["| runtime | batch | model | p50 ms | p90 ms | p99 ms | mean ms | items/s | vs first (95% CI) | session load s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result.rows:
        v = r["vs_first"]
        ratio = "1 (baseline)" if v is None else f"{v['ratio']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]" + \
            (" (too few rounds)" if not v.get("enough_rounds", True) else "" if v["significant"] else " ~")
        lines.append(f"| {r['runtime']} | {r['batch']} | {r['model']} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | "
                     f"{r['p99_ms']:.3f} | {r['mean_ms']:.3f} | {r['throughput_per_s']:.1f} | {ratio} | {r['load_s']:.3f} |")
    for u in result.unavailable:
        lines.append(f"| {u['runtime']} | {u['batch']} | unavailable: {u['reason']} | | | | | | | |")
    m = result.machine
    lines.append("")
    lines.append(f"Measured on {m.get('cpu_model') or m.get('processor')} ({m.get('cpu_count')} cores; int8 features: "
                 f"{', '.join(m.get('int8_features') or []) or 'none'}; threads: {m.get('threads')}), {m.get('platform')}, "
                 f"onnxruntime {m.get('onnxruntime', '-')}" + (f", GPU {m['gpu']}" if m.get("gpu") else "") +
                 ". Ratio = median of per-round latency ratios (lower is faster); ~ = not distinguishable from 1.")
    return "\n".join(lines) + "\n"


def plot_png(result: BenchResult) -> bytes:
    """One figure that answers "is it faster than the first model?": per runtime and batch, every
    other model's per-round latency ratio to the first (dots), their median (the marker) and its 95%
    bootstrap interval (the bar), against the line at 1 (no difference). Labels are wrapped, so long
    model names stay readable; the figure grows with the number of rows."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'foldkit-onnx[bench]'") from None
    import io
    import textwrap

    import numpy as np

    baselines = {}
    entries = []  # (label, per-round ratios, vs_first)
    for r in result.rows:
        key = (r["runtime"], r["batch"])
        if r["vs_first"] is None:
            baselines[key] = r
            continue
        base = baselines.get(key)
        if base is None:
            continue
        n = min(len(r["samples_ms"]), len(base["samples_ms"]))
        ratios = np.asarray(r["samples_ms"][:n]) / np.asarray(base["samples_ms"][:n])
        label = f"{r['runtime']}, batch {r['batch']}\n" + "\n".join(textwrap.wrap(f"{r['model']} vs {base['model']}", 44))
        entries.append((label, ratios, r["vs_first"]))
    if not entries:
        raise InputError("--plot needs at least two models measured on the same runtime and batch")
    height = 1.4 + 0.8 * len(entries)
    fig, ax = plt.subplots(figsize=(10, height))
    rng = np.random.default_rng(0)
    every = np.concatenate([e[1] for e in entries])
    lo_x = min([1.0, float(np.percentile(every, 2.5))] + [e[2]["ci95"][0] for e in entries])
    hi_x = max([1.0, float(np.percentile(every, 97.5))] + [e[2]["ci95"][1] for e in entries])
    pad = 0.08 * (hi_x - lo_x) + 0.01
    lo_x, hi_x = lo_x - pad, hi_x + pad
    for y, (label, ratios, v) in enumerate(entries):
        lo, hi = v["ci95"]
        faster = hi < 1.0
        color = "#888888" if not v["significant"] else ("#1a7f37" if faster else "#cf222e")
        shown = np.clip(ratios, lo_x, hi_x)  # outliers drawn at the edge rather than stretching the axis
        ax.scatter(shown, y + rng.uniform(-0.2, 0.2, ratios.size), s=7, alpha=0.3, color=color, linewidths=0)
        ax.errorbar([v["ratio"]], [y], xerr=[[v["ratio"] - lo], [hi - v["ratio"]]], fmt="D", color=color,
                    markersize=7, capsize=6, linewidth=2.2)
        verdict = ("faster" if faster else "slower") if v["significant"] else \
            ("too few rounds" if not v.get("enough_rounds", True) else "no significant difference")
        ax.text(1.01, y, f"{v['ratio']:.3f}x\n[{lo:.3f}, {hi:.3f}]\n{verdict}", transform=ax.get_yaxis_transform(),
                ha="left", va="center", fontsize=8, color=color)
    ax.axvline(1.0, color="black", linewidth=1, linestyle="--", label="same latency as the first model")
    ax.set_xlim(lo_x, hi_x)
    ax.set_ylim(len(entries) - 0.5, -0.5)
    ax.set_yticks(range(len(entries)))
    ax.set_yticklabels([e[0] for e in entries], fontsize=8)
    ax.set_xlabel("latency ratio to the first model, per interleaved round (< 1 is faster; no unit)")
    ax.set_title("Is it faster? Per-round latency ratio (dots), median and 95% bootstrap interval (bar)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, frameon=False, bbox_to_anchor=(1.0, 1.0 + 0.25 / height))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None}, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
