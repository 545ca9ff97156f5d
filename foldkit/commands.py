"""The foldkit commands (fold, check, bench, export, recalibrate): each parses its options, calls
the Python API, prints, and sets the exit code; foldkit.cli groups them."""

from __future__ import annotations

import os
import sys

import click

from .cli_common import (EXIT_INTERNAL, _reraise_if_debug, handle_errors, input_shape_option, max_input_option,
                         one_line, tolerance_options, verbosity_options)
from .entry import allow_quick_exit
from .text import to_json

@click.command()
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the folded model.")
@click.option("--report", "report_path", type=click.Path(), help="Write the JSON report here.")
@click.option("--no-verify", is_flag=True, help="Skip the ONNX Runtime comparison.")
@tolerance_options
@input_shape_option
@max_input_option
@click.option("--skip", multiple=True, metavar="PASS", help="Skip a pass by name (repeatable).")
@click.option("--lower-standalone", is_flag=True, help="Turn BNs nothing can absorb into Mul + Add.")
@click.option("--merge-larger-kernels", is_flag=True,
              help="Merge parallel convolutions even where the merged kernel costs more multiply-adds than the "
                   "branches together (1x5 + 5x1 into 5x5).")
@click.option("--in-place", is_flag=True, help="Allow the output path to be the input path.")
@click.option("--data", "data", metavar="DATA",
              help="Real inputs for the end-to-end check: a .npz (arrays named after the inputs, samples on axis 0), "
                   "a folder of them, or FILE.py:FN returning {input: array} batches.")
@click.option("--max-samples", type=click.IntRange(1), default=256, show_default=True, help="With --data.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True,
              help="With --data (a model with a fixed batch uses its own).")
@click.option("--qdq-reflect", is_flag=True,
              help="Quantized weights: negate codes with the exact reflected encoding (q' = qmin + qmax - q, "
                   "zp' = qmin + qmax - zp) where plain negation cannot (int8 code -128, zero point != 0). "
                   "TensorRT does not accept the non-zero zero points this makes.")
@click.option("--freeze-initializer-inputs", "freeze", is_flag=True,
              help="Remove graph inputs that are initializers (older exporters list every weight as an input), so "
                   "that they fold. Changes the model's interface: reported.")
@click.option("--external-data/--no-external-data", "external", default=None,
              help="Write tensors to OUTPUT.data (default: only when the model exceeds 2 GB).")
@click.option("--fsync/--no-fsync", "fsync", default=False, show_default=True,
              help="fsync the output before the atomic rename, so it also survives a power loss "
                   "(costs the disk's write time). Either way it is never a partial file.")
@verbosity_options
@handle_errors
def fold(model, output, report_path, no_verify, atol, rtol, input_shape, max_input_mb, skip, lower_standalone,
         merge_larger_kernels, in_place, data, max_samples, batch_size, qdq_reflect, freeze, external, fsync, quiet,
         verbose):
    """Fold BatchNormalization in MODEL into neighbouring weights, verify, and write OUTPUT.

    On a verification failure the model is not written, but --report is: it says what differed."""
    if not data:
        allow_quick_exit()
    from .api import fold_file
    from .errors import VerificationError
    from .verify import parse_input_shapes

    shapes = parse_input_shapes(input_shape)
    try:
        result = fold_file(model, output, report=report_path, external=external, durable=fsync, in_place=in_place,
                           verify=not no_verify, atol=atol, rtol=rtol, input_shapes=shapes, skip=skip,
                           lower_standalone=lower_standalone, merge_larger_kernels=merge_larger_kernels,
                           max_input_bytes=int(max_input_mb * 2 ** 20),
                           freeze_initializer_inputs=freeze, qdq_reflect=qdq_reflect,
                           data=(data, batch_size, max_samples) if data else None)
    except VerificationError as e:
        if e.result is not None and not quiet:
            from .render import print_fold_report

            print_fold_report(e.result.report, verbose=verbose)
        raise
    if not quiet:
        from .render import print_fold_report

        print_fold_report(result.report, output, verbose=verbose, verified=not no_verify)


@click.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=True))
@click.option("--format", "fmt", type=click.Choice(["text", "json", "github", "junit"]), default="text", show_default=True)
@click.option("--fail-on", type=click.Choice(["error", "warning"]), default="error", show_default=True,
              help="Exit 1 when a finding of this severity or worse exists.")
@click.option("-o", "--output", type=click.Path(), help="Write the formatted result here instead of stdout.")
@click.option("--data", "data", metavar="DATA",
              help="Also measure each BN's inputs on DATA (.npz, folder, FILE.py:FN) and flag running statistics "
                   "far from them (FK012).")
@click.option("--max-samples", type=click.IntRange(1), default=None)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@verbosity_options
@handle_errors
def check(models, fmt, fail_on, output, data, max_samples, batch_size, quiet, verbose):
    """The pre-deployment gate: exit 0 only when every MODEL is deployment-ready.

    MODELS are ONNX files or folders (searched for *.onnx). The exit code is the worst over all
    models: 2 when one cannot be read, else 1 when one has a finding at or above --fail-on."""
    if not data:
        allow_quick_exit()
    from . import io as fio
    from .check import check_many, to_github, to_junit, to_markdown, to_text
    from .report import envelope

    from .data import files as data_files

    inputs = [f for m in models if not os.path.isdir(m) for f in fio.model_files(m)] + data_files(data)
    fio.guard_outputs({"-o": output}, inputs)
    results = check_many(models, data=(data, batch_size, max_samples) if data else None, on_internal=_reraise_if_debug)
    worst = max(r.exit_code(fail_on) for r in results)
    if fmt == "json":
        text = to_json({**envelope("check", [r.path for r in results], input_shapes=None, seed=None), "fail_on": fail_on, "passed": worst == 0,
                        "exit_code": worst, "models": [r.to_dict(fail_on) for r in results]})
    elif fmt == "github":
        text = to_github(results, fail_on)
        _github_summary(to_markdown(results, fail_on))
    elif fmt == "junit":
        text = to_junit(results, fail_on)
    else:
        text = None
    if output:  # written whatever the outcome: it is the record CI keeps
        fio.atomic_write(output, (text if text is not None else to_text(results, fail_on)).encode())
    elif quiet:
        pass
    elif text is not None:
        click.echo(text, nl=False)
    elif sys.stdout.isatty():
        from .render import print_check

        for r in results:
            if r.error is None:
                print_check(r, fail_on)
        if len(results) > 1:
            click.echo(to_text(results, fail_on).rstrip("\n").rsplit("\n", 1)[-1])
    else:
        click.echo(to_text(results, fail_on, unreadable=False), nl=False)
    for r in results:  # an unreadable model is an error of the command too: one line on stderr each
        if r.error is not None:
            click.echo(f"foldkit: error: {one_line(r.error)}", err=True)
    sys.exit(worst)


def _github_summary(markdown: str) -> None:
    """Append to the job summary file GitHub Actions names in GITHUB_STEP_SUMMARY (append is its protocol)."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(markdown)
    except OSError as e:
        click.echo(f"foldkit: warning: GITHUB_STEP_SUMMARY {one_line(path)}: {e.strerror or e}", err=True)


def _csv(value, cast=str):
    return [cast(v.strip()) for v in value.split(",") if v.strip()]


@click.command()
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("--runtime", default="ort-cpu", show_default=True, metavar="LIST",
              help="Comma-separated: ort-cpu, ort-cuda, ort-trt, trt, openvino, torch, torch-cuda.")
@click.option("--ort-opt-level", default="disable,all", show_default=True, metavar="LIST",
              help="ONNX Runtime graph optimization levels to measure: disable, basic, extended, all.")
@click.option("--batch", default=None, metavar="LIST",
              help="Batch sizes, e.g. 1,8 (default: the batch --input-shape gives, else 1).")
@input_shape_option
@max_input_option
@click.option("--warmup", type=click.IntRange(0), default=10, show_default=True)
@click.option("--iters", type=click.IntRange(2), default=100, show_default=True, help="Timed rounds (each runs every model once).")
@click.option("--threads", type=click.IntRange(1), default=None, help="Intra-op threads (default: the runtime's).")
@click.option("--fp16", is_flag=True, help="Build TensorRT engines with FP16 enabled.")
@click.option("--model", "torch_model", metavar="FILE.py:FN", help="PyTorch factory for the torch runtime.")
@click.option("--model-arg", multiple=True, metavar="NAME=VALUE")
@click.option("--cache-dir", type=click.Path(), default=None, help="TensorRT engine cache folder.")
@click.option("--json", "json_path", type=click.Path())
@click.option("--markdown", "md_path", type=click.Path())
@click.option("--plot", "plot_path", type=click.Path(),
              help="PNG: each model's per-round latency ratio to the first, with its 95% interval, per runtime and batch.")
@verbosity_options
@handle_errors
def bench(models, runtime, ort_opt_level, batch, input_shape, max_input_mb, warmup, iters, threads, fp16, torch_model, model_arg,
          cache_dir, json_path, md_path, plot_path, quiet, verbose):
    """Latency of MODELS (the first is the baseline), interleaved A/B, on each runtime."""

    from . import io as fio
    from .bench import BenchConfig, run_bench
    from .bench.core import plot_png, to_markdown
    from .errors import InputError
    from .render import print_bench, progress_bar
    from .verify import parse_input_shapes

    inputs = []
    for m in models:  # every model readable before anything runs
        inputs += fio.model_files(m, fio.load_model(m, lazy=True))
    fio.guard_outputs({"--json": json_path, "--markdown": md_path, "--plot": plot_path}, inputs)
    if plot_path and len(models) < 2 and not {"torch", "torch-cuda"} & set(_csv(runtime)):
        raise InputError("--plot shows each model against the first: give at least two models")
    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InputError("--plot needs matplotlib: pip install 'foldkit-onnx[bench]'") from None
    model_args = {}
    if model_arg:
        from .factory import parse_model_args
        model_args = parse_model_args(model_arg)
    try:
        batches = [None] if batch is None else _csv(batch, int)
    except ValueError:
        raise InputError(f"--batch '{batch}': expected comma-separated integers") from None
    if not batches or any(b is not None and b < 1 for b in batches):
        raise InputError("--batch sizes must be positive")
    cfg = BenchConfig(models=list(models), runtimes=_csv(runtime), ort_opt_levels=_csv(ort_opt_level), batches=batches,
                      input_shapes=parse_input_shapes(input_shape), warmup=warmup, iters=iters, threads=threads,
                      fp16=fp16, torch_model=torch_model, torch_model_args=model_args, cache_dir=cache_dir,
                      max_input_bytes=int(max_input_mb * 2 ** 20))
    with progress_bar() as make_tick:
        result = run_bench(cfg, progress=make_tick, on_internal=_reraise_if_debug)
    bugs = [u for u in result.unavailable if u.get("internal")]
    if not result.rows and not bugs:
        why = "; ".join(f"{u['runtime']} (batch {u['batch']}): {u['reason']}" for u in result.unavailable[:3])
        raise InputError(f"nothing was measured: {why or 'no runtime ran'}")
    if json_path:
        fio.atomic_write(json_path, to_json(result.to_dict(), indent=1).encode())
    if md_path:
        fio.atomic_write(md_path, to_markdown(result).encode())
    if plot_path and result.rows:
        fio.atomic_write(plot_path, plot_png(result))
    if not quiet and result.rows:
        print_bench(result, verbose=verbose)
    for u in bugs:  # every other group was measured and written; the run's exit code is the worst
        click.echo(f"foldkit: error: {one_line(u['runtime'])} (batch {u['batch']}): {one_line(u['reason'])}", err=True)
    if bugs:
        sys.exit(EXIT_INTERNAL)


@click.command()
@click.option("--model", "model_spec", required=True, metavar="FILE.py:FN|MODULE:FN", help="Factory returning an nn.Module.")
@click.option("--model-arg", multiple=True, metavar="NAME=VALUE", help="Keyword argument for the factory (repeatable).")
@click.option("--checkpoint", type=click.Path(), help="state_dict checkpoint (bare or under state_dict/model/ema).")
@click.option("--trust-checkpoint", is_flag=True, help="Allow arbitrary unpickling (runs code from the file).")
@click.option("--input-shape", "input_shapes", multiple=True, required=True, metavar="D0,D1,...",
              help="Shape of each model input, in order (repeatable): 1,3,224,224 or 1x3x224x224.")
@click.option("--dynamic-batch", is_flag=True, help="Export with a symbolic batch dimension.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: 17 legacy, 18 dynamo).")
@click.option("--exporter", type=click.Choice(["legacy", "dynamo"]), default="legacy", show_default=True)
@click.option("--no-fold", is_flag=True, help="Export only; do not fold.")
@click.option("--recalibrate", "recalibrate_data", metavar="DATA",
              help="Re-estimate the BN running statistics on DATA (.npz, folder, FILE.py:FN) before exporting.")
@click.option("--recalibrate-method", type=click.Choice(["batch", "exact"]), default="batch", show_default=True)
@click.option("-o", "--output", required=True, type=click.Path())
@click.option("--report", "report_path", type=click.Path(), help="Write the JSON report here.")
@tolerance_options
@click.option("--fsync/--no-fsync", "fsync", default=False, show_default=True,
              help="fsync the output before the atomic rename (power-loss safe).")
@verbosity_options
@handle_errors
def export(model_spec, model_arg, checkpoint, trust_checkpoint, input_shapes, dynamic_batch, opset, exporter, no_fold,
           recalibrate_data, recalibrate_method, output, report_path, atol, rtol, fsync, quiet, verbose):
    """Export a PyTorch model to ONNX: load, revert SyncBN, eval, export, fold, check parity."""
    from . import io as fio
    from .errors import InputError

    from .factory import parse_model_args

    try:
        from .torch import export as export_api
    except ImportError as e:
        raise InputError(f"foldkit export needs PyTorch: pip install 'foldkit-onnx[torch]' ({e})") from None
    factory_file = model_spec.rpartition(":")[0]
    from .data import files as data_files

    fio.guard_outputs({"-o": output, "--report": report_path},
                      [checkpoint, factory_file if os.path.isfile(factory_file) else None] + data_files(recalibrate_data))
    from .verify import parse_dims

    shapes = [parse_dims(s) for s in input_shapes]
    from .errors import VerificationError

    try:
        result = export_api(model_spec, output, shapes, checkpoint=checkpoint, model_args=parse_model_args(model_arg),
                            trust_checkpoint=trust_checkpoint, dynamic_batch=dynamic_batch, opset=opset,
                            exporter=exporter, fold=not no_fold, atol=atol, rtol=rtol, durable=fsync,
                            recalibrate_data=recalibrate_data, recalibrate_method=recalibrate_method)
    except VerificationError as e:  # no model written; the report says why
        rep = getattr(e.result, "report", None)
        if report_path and rep is not None:
            if not isinstance(rep, dict):  # the fold inside the export failed: its report, as export's
                rep.command, rep.inputs = "export", [model_spec] + ([checkpoint] if checkpoint else [])
            fio.atomic_write(report_path, (to_json(rep) if isinstance(rep, dict) else rep.to_json()).encode(),
                             durable=fsync)
        raise
    rep = result.report
    if report_path:
        fio.atomic_write(report_path, to_json(rep).encode(), durable=fsync)
    if not quiet:
        from .render import print_export_report

        print_export_report(rep, output, verbose=verbose)


@click.command()
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--data", "data", required=True, metavar="DATA",
              help="Samples: a .npz (arrays named after the inputs, samples on axis 0), a folder of them, or FILE.py:FN.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the recalibrated (folded) model.")
@click.option("--method", type=click.Choice(["batch", "exact"]), default="batch", show_default=True,
              help="batch: precise BN (every BN normalizes with its batch's statistics in one pass); exact: "
                   "statistics consistent with inference (one pass per level of BNs feeding BNs).")
@click.option("--no-fold", is_flag=True, help="Write the recalibrated model with its BNs.")
@click.option("--only", multiple=True, metavar="NODE", help="Recalibrate only this BN (repeatable).")
@click.option("--skip-node", multiple=True, metavar="NODE", help="Leave this BN's statistics alone (repeatable).")
@click.option("--max-samples", type=click.IntRange(1), default=None, help="Stop after this many samples.")
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Re-cut the data into batches of this size. Default: a FILE.py:FN's batches as it yields them "
                   "(precise-BN statistics depend on the batches), .npz data in batches of 32.")
@click.option("--eval-data", metavar="DATA", help="Held-out samples: top-1 accuracy (with a 'label' array) or agreement "
                                                  "with the original, before and after.")
@click.option("--max-drop", type=click.FloatRange(min=0), default=None, metavar="POINTS",
              help="Refuse to write (exit 1) when the --eval-data metric drops by more than this many points.")
@click.option("--report", "report_path", type=click.Path(), help="Write the JSON report here.")
@input_shape_option
@click.option("--fsync/--no-fsync", "fsync", default=False, show_default=True)
@verbosity_options
@handle_errors
def recalibrate(model, data, output, method, no_fold, only, skip_node, max_samples, batch_size, eval_data, max_drop,
                report_path, input_shape, fsync, quiet, verbose):
    """Re-estimate every BatchNormalization's running statistics on DATA, then fold (as `fold`).

    Under torchrun (RANK, WORLD_SIZE in the environment) the batches are sharded across ranks, the
    statistics merged exactly, and rank 0 writes."""
    from .recalibration import recalibrate_file
    from .verify import parse_input_shapes

    if max_drop is not None and not eval_data:
        from .errors import InputError

        raise InputError("--max-drop needs --eval-data")
    d = recalibrate_file(model, output, data, method=method, fold=not no_fold, only=only, skip=skip_node,
                         batch_size=batch_size, max_samples=max_samples, eval_data=eval_data, max_drop=max_drop,
                         report=report_path, durable=fsync, input_shapes=parse_input_shapes(input_shape) or None)
    if quiet or "recalibration" not in d:
        return
    r = d["recalibration"]
    click.echo(f"recalibrated {len(r['bns'])} BatchNormalization ({r['method']}, {r['passes']} pass(es) over "
               f"{r['samples']} samples in {r['batches']} batches, {r['batching']})")
    rows = r["bns"] if verbose else sorted(r["bns"], key=lambda b: -b["max_abs_mean_change"])[:5]
    for b in rows:
        click.echo(f"  {one_line(b['node'])}: max |mean change| {b['max_abs_mean_change']:.3g}, var ratio "
                   f"{b['min_var_ratio'] if b['min_var_ratio'] is None else format(b['min_var_ratio'], '.3g')}"
                   f"..{b['max_var_ratio'] if b['max_var_ratio'] is None else format(b['max_var_ratio'], '.3g')}")
    for note in r["notes"]:
        click.echo(f"note: {one_line(note)}")
    m = d.get("metric")
    if m and "before" in m:
        click.echo(f"{m['metric']} on --eval-data: {100 * m['before']:.2f}% -> {100 * m['after']:.2f}% "
                   f"({m['change_points']:+.2f} points, {m['samples']} samples)")
    if d.get("verification"):
        from .render import _verification_line

        click.echo(_verification_line(d["verification"]))
    click.echo(f"BatchNormalization nodes: {d['bn_before']} before, {d['bn_after']} after")
    click.echo(f"wrote {one_line(output)}")
