"""The foldkit command line: a thin click layer over the Python API.

Exit codes: 0 success; 1 verification failed / check found problems at or above --fail-on;
2 bad usage or unreadable input; 3 internal error (a bug: please report it with --debug output);
130 interrupted.
"""

from __future__ import annotations

import functools
import os
import signal
import sys

import click

from .errors import EXIT_INTERNAL, EXIT_USAGE, FoldkitError, internal_message  # noqa: F401 (EXIT_INTERNAL: API)
from .text import printable, to_json

EXIT_INTERRUPTED = 130


def one_line(text: str) -> str:
    """Control characters (a newline in a node name, say) escaped, so an error is always one line."""
    return printable(text)


def _die(message: str, code: int) -> None:
    click.echo(f"foldkit: error: {one_line(message)}", err=True)
    sys.exit(code)


def _interrupted_exit() -> None:
    """One line saying what an interrupt left: nothing, or the files already committed."""
    committed = getattr(sys.modules.get(f"{__package__}.writing"), "COMMITTED", None) or []  # never import here
    done = f"; already written: {', '.join(printable(p) for p in committed)}" if committed else \
        "; no output was written"
    click.echo(f"foldkit: interrupted{done}", err=True)
    sys.exit(EXIT_INTERRUPTED)


def handle_errors(fn):
    """One line on stderr and a documented exit code for every failure; a traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = bool(click.get_current_context().find_root().params.get("debug"))
        try:
            try:
                return _warnings_after(fn, debug, *args, **kwargs)
            except Exception:
                # a SIGINT inside a C extension (ORT's import, say) surfaces as another error
                if _interrupted:
                    raise KeyboardInterrupt from None
                if _terminated is not None:
                    raise SystemExit(_terminated) from None
                raise
        except FoldkitError as e:
            if debug:
                raise
            _die(str(e), e.exit_code)
        except KeyboardInterrupt:
            _interrupted_exit()
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except MemoryError:
            _die("out of memory", EXIT_USAGE)
        except OSError as e:  # a full disk, a read-only file system, no permission...: the path and the OS's words
            if debug:
                raise
            where = e.filename if e.filename is not None else "foldkit"
            _die(f"{where}: {e.strerror or e}", EXIT_USAGE)
        except Exception as e:  # a bug in foldkit (or a dependency) — still one line
            if debug:
                raise
            _die(internal_message(e), EXIT_INTERNAL)

    return wrapper


def _warnings_after(fn, debug: bool, *args, **kwargs):
    """Run ``fn``, holding back the Python warnings its libraries emit (torch's unpickler, say): they
    are shown once it has succeeded, or with --debug, never beside a failure's one line."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        ok = False
        try:
            result = fn(*args, **kwargs)
            ok = True
            return result
        except SystemExit as e:  # a command's own exit code: a failure unless 0
            ok = not e.code
            raise
        finally:
            if ok or debug:
                for w in caught:
                    click.echo(warnings.formatwarning(w.message, w.category, w.filename, w.lineno).rstrip("\n"), err=True)


def _reraise_if_debug(e: BaseException) -> None:
    """For commands that take many inputs: a bug met on one input is that input's result, unless
    --debug asks for the traceback, or the error is an interrupt surfacing from a C extension."""
    if _interrupted:
        raise KeyboardInterrupt from None
    if _terminated is not None:
        raise SystemExit(_terminated) from None
    if click.get_current_context().find_root().params.get("debug"):
        raise e


def input_shape_option(fn):
    return click.option("--input-shape", "input_shape", multiple=True, metavar="NAME:D0,D1,...",
                        help="An input's shape: NAME:1,3,224,224, NAME:1x3x224x224 or NAME=1,3,224,224; "
                             "plain dims for a single-input model. Symbolic dimensions not given are 1. "
                             "Repeatable.")(fn)


def max_input_option(fn):
    return click.option("--max-input-mb", "max_input_mb", type=click.FloatRange(min=0, min_open=True), default=1024,
                        show_default=True, metavar="MIB",
                        help="Cap on the generated inputs (all inputs together), checked before anything is allocated.")(fn)


def verbosity_options(fn):
    fn = click.option("-v", "--verbose", count=True, help="More detail (the full per-node tables).")(fn)
    fn = click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")(fn)
    return fn


def tolerance_options(fn):
    fn = click.option("--rtol", type=float, default=None, help="Relative tolerance (scale-aware; default per dtype).")(fn)
    fn = click.option("--atol", type=float, default=None, help="Absolute tolerance (default per dtype).")(fn)
    return fn


_interrupted = False
_terminated = None  # the exit code a SIGTERM asked for


def _sigterm(signum, frame):  # turn SIGTERM into SystemExit so temp files are cleaned up
    global _terminated
    _terminated = 128 + signum
    raise SystemExit(_terminated)



def _sigint(signum, frame):
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


class _Group(click.Group):
    """Usage errors as one line too (click prints three: usage, a hint, the error), and an interrupt
    while click parses or dispatches is our one line (click's main prints an empty line first)."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt:
            _interrupted_exit()

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            _interrupted_exit()

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            cmd = e.ctx.command_path if e.ctx is not None else "foldkit"
            _die(f"{e.format_message()} (see '{cmd} --help')", EXIT_USAGE)
        except click.ClickException as e:
            _die(e.format_message(), e.exit_code)
        except (click.Abort, KeyboardInterrupt):
            _interrupted_exit()
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="foldkit-onnx", message="%(prog)s %(version)s (distribution %(package)s)")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def main(debug):
    """foldkit: remove BatchNorm from inference graphs, exactly, and prove it."""
    for stream in (sys.stdout, sys.stderr):  # an ASCII-only terminal gets \u escapes, never a UnicodeEncodeError
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):
            pass
    if not debug:  # numeric edge cases are checked explicitly (finite, overflow); keep stderr to one line
        import warnings

        warnings.simplefilter("ignore", RuntimeWarning)
    try:
        signal.signal(signal.SIGTERM, _sigterm)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when the caller ignores it
            signal.signal(signal.SIGINT, _sigint)
    except ValueError:  # not the main thread (e.g. embedded): leave signals alone
        pass
    _import_extensions(click.get_current_context().invoked_subcommand)


# The compiled extensions each command needs. A signal whose handler raises inside an extension
# module's initialisation leaves it half built, and CPython then crashes (SIGSEGV, seen under load
# with protobuf's upb): they are imported here with SIGINT and SIGTERM blocked, so that a signal
# is delivered right after, between two bytecodes, where KeyboardInterrupt is safe.
_EXTENSIONS = ("numpy", "onnx")
_COMMAND_EXTENSIONS = {"fold": ("onnxruntime",), "bench": ("onnxruntime",), "recalibrate": ("onnxruntime",),
                       "export": ("torch", "onnxruntime")}


def _import_extensions(command) -> None:
    import importlib

    names = _EXTENSIONS + _COMMAND_EXTENSIONS.get(command, ())
    if all(n in sys.modules for n in names):
        return
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    except (AttributeError, ValueError, OSError):  # no pthread_sigmask here: import as usual
        old = None
    try:
        for n in names:
            try:
                importlib.import_module(n)
            except ImportError:  # an optional extra: the command says so in its one line
                pass
    finally:
        if old is not None:
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a pending signal is delivered here
            except KeyboardInterrupt:  # our one line (click would print an empty line before it)
                _interrupted_exit()


@main.command()
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


@main.command()
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


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("--runtime", default="ort-cpu", show_default=True, metavar="LIST",
              help="Comma-separated: ort-cpu, ort-cuda, ort-trt, trt, openvino, torch.")
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
    if plot_path and len(models) < 2 and "torch" not in _csv(runtime):
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


@main.command()
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


@main.command()
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


if __name__ == "__main__":  # pragma: no cover
    main()
