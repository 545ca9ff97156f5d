"""Re-estimating BatchNorm running statistics on real data (ONNX models): ``foldkit recalibrate``.

Two estimators (``recalibrate``), both over foldkit.moments' exact float64 moments:

- ``batch`` (precise BN, Wu & Johnson 2021, "Rethinking Batch in BatchNorm"): one pass over the
  data in which every recalibrated BN normalizes with its own batch's statistics, as in training;
  each BN's population statistics are those of all its inputs over the pass.
- ``exact``: statistics consistent with inference. BNs are measured in dependency order: a BN is
  measured, in inference mode, once every BN upstream of it has its new statistics. After it,
  running the model in inference mode over the same data gives every BN an input whose mean and
  variance are its stored statistics. It takes one pass over the data per level of the BN
  dependency graph (the longest chain of BNs feeding one another: 53 for ResNet-50, 1 for BNs that
  do not feed each other); every pass streams the data.

Only BNs change: every other op keeps its inference behaviour (Dropout stays off). On many
machines (torch.distributed, launched by torchrun), batch i goes to rank i mod world size, and the
per-channel (count, mean, M2) are gathered and merged in rank order, so every rank computes the
same statistics; rank 0 writes.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import numpy as np
from onnx import ModelProto, helper, numpy_helper

from .errors import InputError
from .moments import METHODS, Moments, _feeds, _measure, _typing, find_bns, instrumented

def write_stats(model: ModelProto, bns: list, moments: list, which: Iterable[int]) -> None:
    """Store new running mean/var (in each parameter's dtype and dims, inline) for the BNs at list
    indices ``which``; a parameter another node also reads is copied under a fresh name first."""
    from .graph import all_names, count_uses

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    uses = count_uses(model)
    names = all_names(model)
    for k in which:
        b, mo = bns[k], moments[k]
        if mo.count == 0:
            raise InputError(f"{b.name}: saw no values in the data")
        node = g.node[b.index]
        for pos, values in ((3, mo.mean), (4, mo.var)):
            old = inits[node.input[pos]]
            dtype = helper.tensor_dtype_to_np_dtype(old.data_type)
            new = numpy_helper.from_array(values.astype(dtype).reshape(tuple(old.dims)), old.name)
            if uses[old.name] == 1:
                old.CopyFrom(new)
            else:
                base = f"{old.name}_recalibrated"
                name, j = base, 0
                while name in names:
                    j += 1
                    name = f"{base}_{j}"
                names.add(name)
                new.name = name
                g.initializer.append(new)
                inits[name] = g.initializer[-1]
                uses[old.name] -= 1
                uses[name] = 1
                node.input[pos] = name


def recalibrate(model: ModelProto, batches: Callable[[], Iterable[dict]], method: str = "batch", only=(), skip=(),
                reduce: Optional[Callable[[list], list]] = None, input_shapes: Optional[dict] = None,
                distributed: Optional["Distributed"] = None, base_dir: Optional[str] = None) -> dict:
    """Re-estimate the running statistics of ``model``'s BNs in place (see the module doc) over
    ``batches()`` (called once per pass; each call streams the data anew). ``reduce`` merges
    per-rank partial Moments (torch.distributed); returns the per-BN summary for the report.
    ``base_dir``: where the tensors of a lazily loaded ``model`` are (its file's folder)."""
    if method not in METHODS:
        raise InputError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if distributed is not None:
        batches, reduce = distributed.shard(batches), distributed.reduce
    reduce = reduce or (lambda acc: acc)
    bns, notes = find_bns(model, only, skip, base_dir)
    if not bns:
        raise InputError("no BatchNormalization to recalibrate (main graph, inference mode, initializer parameters)")
    rank_of, elem_of = _typing(model, input_shapes)
    moments = [None] * len(bns)
    passes = 0
    samples = nbatches = 0
    if method == "batch":
        inst = instrumented(model, bns, set(range(len(bns))), rank_of, elem_of)
        moments, samples, nbatches = _measure(inst.SerializeToString(), bns, _feeds(batches()), reduce, base_dir)
        passes = 1
        write_stats(model, bns, moments, range(len(bns)))
    else:
        done = set()
        while len(done) < len(bns):
            ready = [k for k in range(len(bns)) if k not in done and bns[k].upstream <= done]
            if not ready:  # a cycle cannot happen in a valid graph; be safe
                ready = [k for k in range(len(bns)) if k not in done]
            inst = instrumented(model, bns, set(), rank_of, elem_of)
            acc, samples, nbatches = _measure(inst.SerializeToString(), bns, _feeds(batches()), reduce, base_dir)
            for k in ready:
                moments[k] = acc[k]
            write_stats(model, bns, moments, ready)
            done.update(ready)
            passes += 1
    if distributed is not None:
        samples, nbatches = distributed.counts(samples, nbatches)
    per_bn = []
    for b, mo in zip(bns, moments):
        dm = np.abs(mo.mean - b.old_mean)
        ratio = mo.var / np.where(b.old_var > 0, b.old_var, np.nan)
        worst = np.argsort(-dm)[:3]
        per_bn.append({"node": b.name, "channels": b.channels, "values_seen": int(mo.count),
                       "max_abs_mean_change": float(dm.max()),
                       "max_var_ratio": float(np.nanmax(ratio)) if np.isfinite(ratio).any() else None,
                       "min_var_ratio": float(np.nanmin(ratio)) if np.isfinite(ratio).any() else None,
                       "most_changed_channels": [int(c) for c in worst],
                       "old_mean": [float(v) for v in b.old_mean[worst]], "new_mean": [float(v) for v in mo.mean[worst]]})
    return {"method": method, "passes": passes, "samples": samples, "batches": nbatches, "bns": per_bn, "notes": notes}



# --- a metric that says whether recalibration helped ---------------------------------------------

def classifier_metric(model_bytes: bytes, batches: Iterable[dict], reference_bytes: Optional[bytes] = None) -> Optional[dict]:
    """Top-1 accuracy against the data's ``label`` array, or (no labels) top-1 agreement with
    ``reference_bytes``'s predictions, on the first output when it is [N, K] with K >= 2."""
    from .data import LABEL
    from .verify import _ort_session

    from .data import DataError

    run = _ort_session(model_bytes)
    ref = _ort_session(reference_bytes) if reference_bytes is not None else None
    right = total = 0
    kind = None
    for b in batches:
        feeds = {k: v for k, v in b.items() if k != LABEL}
        try:
            out = np.asarray(run(feeds)[0])
        except Exception as e:
            raise DataError(f"--eval-data: the model does not run on it: "
                            f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:300]}") from None
        if out.ndim != 2 or out.shape[1] < 2:
            return None
        pred = np.argmax(out, axis=1)
        if LABEL in b:
            kind = "accuracy"
            truth = np.asarray(b[LABEL]).reshape(-1)
        elif ref is not None:
            kind = "agreement with the original"
            truth = np.argmax(np.asarray(ref(feeds)[0]), axis=1)
        else:
            return None
        right += int(np.sum(pred == truth))
        total += pred.size
    return {"metric": kind, "top1": right / total if total else None, "samples": total}


# --- many machines ------------------------------------------------------------------------------

class Distributed:
    """torch.distributed as torchrun sets it up (RANK, WORLD_SIZE, MASTER_ADDR): batches are
    sharded (batch i to rank i mod world size) and per-channel Moments gathered and merged in rank
    order, so that every rank computes the same statistics. gloo on CPU."""

    def __init__(self):
        import os

        try:
            import torch.distributed as dist
        except ImportError:
            raise InputError("recalibrating under torchrun needs PyTorch: pip install 'foldkit-onnx[torch]'") from None
        self.dist = dist
        if not dist.is_initialized():
            dist.init_process_group(backend=os.environ.get("FOLDKIT_DIST_BACKEND", "gloo"))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @staticmethod
    def requested() -> bool:
        import os

        try:
            return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
        except ValueError:
            return False

    def shard(self, batches: Callable[[], Iterable[dict]]) -> Callable[[], Iterable[dict]]:
        def mine():
            for i, b in enumerate(batches()):
                if i % self.world == self.rank:
                    yield b
        return mine

    def reduce(self, acc: list) -> list:
        payload = [(m.count, m.mean, m.m2) for m in acc]
        gathered = [None] * self.world
        self.dist.all_gather_object(gathered, payload)
        out = [Moments() for _ in acc]
        for per_rank in gathered:  # rank order: the same merge on every rank
            for m, (count, mean, m2) in zip(out, per_rank):
                m.merge(Moments(count, mean, m2))
        return out

    def counts(self, samples: int, batches: int) -> tuple:
        gathered = [None] * self.world
        self.dist.all_gather_object(gathered, (samples, batches))
        return sum(s for s, _ in gathered), sum(b for _, b in gathered)

    def close(self) -> None:
        try:
            self.dist.barrier()
            self.dist.destroy_process_group()
        except Exception:
            pass


def recalibrate_file(src: str, dst: str, data, *, method: str = "batch", fold: bool = True, only=(), skip=(),
                     batch_size: Optional[int] = None, max_samples: Optional[int] = None, eval_data=None,
                     max_drop: Optional[float] = None, report: Optional[str] = None, durable: bool = False,
                     input_shapes: Optional[dict] = None) -> dict:
    """``foldkit recalibrate``: re-estimate ``src``'s BN statistics on ``data`` (see foldkit.data),
    fold (unless ``fold=False``) with verification, judge the result on ``eval_data`` and write
    ``dst`` (and the JSON ``report``). ``batch_size`` None: a function's batches as it yields
    them, .npz data in slices of 32; given, every source is re-cut (foldkit.data.batching). Under
    torchrun, batch i (as cut here) goes to rank i mod world size; every rank measures its shard
    and rank 0 writes. Raises VerificationError (nothing written but the report) when the metric drops by
    more than ``max_drop`` points."""
    import os

    from . import io as fio
    from .api import fold as fold_api
    from .data import batching, files as data_files, fixed_batch, is_function, source as data_source
    from .errors import VerificationError
    from .report import Report
    from .text import to_json

    src, dst = os.fspath(src), os.fspath(dst)
    fio.guard_outputs({"-o": dst, "--report": report},
                      fio.model_files(src) + data_files(data) + data_files(eval_data))
    # without --eval-data (which runs the output from memory) the weights stay in the file: the
    # statistics session maps them, and the output streams them (foldkit.wire)
    lazy = eval_data is None
    model = fio.load_model(src, lazy=lazy)
    base_dir = os.path.dirname(os.path.abspath(src)) if lazy else None
    original = fio.serialize(model) if eval_data is not None else None  # the --eval-data reference only
    source = data_source((data, batch_size, max_samples), model)
    dist = Distributed() if Distributed.requested() else None
    try:
        rec = recalibrate(model, source, method, only, skip, input_shapes=input_shapes, distributed=dist,
                          base_dir=base_dir)
        rec["batching"] = batching(data, batch_size, fixed_batch(model))
        if is_function(data) and (batch_size or fixed_batch(model)):
            rec["notes"].append(f"the function's batches were {rec['batching']}; precise-BN statistics depend on "
                                "the batches (without --batch-size they are used as the function yields them)")
        if dist is not None and dist.rank != 0:
            return rec  # rank 0 alone writes
        if lazy:
            return _write_lazy(model, base_dir, src, dst, data, rec, fold, input_shapes, report, durable)
        if fold:
            result = fold_api(model, input_shapes=input_shapes)
            out_model, rep = result.model, result.report
        else:
            out_model, rep = model, Report(bn_before=sum(n.op_type == "BatchNormalization" for n in model.graph.node))
            rep.bn_after = rep.bn_before
            rep.unchanged = False
        rep.command, rep.inputs = "recalibrate", [src, os.fspath(data)] + ([os.fspath(eval_data)] if eval_data else [])
        d = rep.to_dict()
        d["recalibration"] = rec
        out_bytes = fio.serialize(out_model)
        metric = None
        if eval_data is not None:
            ev = data_source((eval_data, batch_size or None, None), model)
            before = classifier_metric(original, ev(), original)
            after = classifier_metric(out_bytes, ev(), original)
            if before is None or after is None:
                metric = {"note": "--eval-data: the first output is not classifier-like ([N, K] scores)"}
            else:
                metric = {"metric": before["metric"], "before": before["top1"], "after": after["top1"],
                          "samples": after["samples"],
                          "change_points": round(100 * (after["top1"] - before["top1"]), 6)}
        d["metric"] = metric
        failed = (metric is not None and max_drop is not None and "change_points" in metric
                  and -metric["change_points"] > max_drop)
        if report:
            fio.atomic_write(report, to_json(d).encode(), durable=durable)
        if failed:
            raise VerificationError(
                f"recalibration makes {metric['metric']} worse by {-metric['change_points']:.2f} points "
                f"({100 * metric['before']:.2f}% -> {100 * metric['after']:.2f}%), over --max-drop {max_drop:g}; "
                "nothing written but the report")
        fio.atomic_write(dst, out_bytes, durable=durable)
        return d
    finally:
        if dist is not None:
            dist.close()


def _write_lazy(model: ModelProto, base_dir: str, src: str, dst: str, data, rec: dict, fold: bool,
                input_shapes: Optional[dict], report: Optional[str], durable: bool) -> dict:
    """recalibrate_file's output for a lazily loaded model: folded as ``foldkit fold`` folds a file
    (verified on the written file before it takes its name), or written as it is, the unchanged
    tensors streamed from ``src``; then the report (also when verification fails)."""
    import os

    from . import io as fio
    from .api import SPILL_ABOVE, FoldOptions, fold_loaded
    from .errors import VerificationError
    from .report import Report
    from .text import to_json

    def write_report(rep) -> dict:
        rep.command, rep.inputs = "recalibrate", [src, os.fspath(data)]
        d = rep.to_dict()
        d["recalibration"] = rec
        d["metric"] = None
        if report:
            fio.atomic_write(report, to_json(d).encode(), durable=durable)
        return d

    if not fold:
        rep = Report(bn_before=sum(n.op_type == "BatchNormalization" for n in model.graph.node))
        rep.bn_after = rep.bn_before
        rep.unchanged = False
        fio.save_model(model, dst, input_path=src, base_dir=base_dir, durable=durable)
        return write_report(rep)
    result = fold_loaded(model, base_dir, FoldOptions(input_shapes=input_shapes), defer=True,
                         spill_dir=os.path.dirname(os.path.abspath(dst)), spill_above=SPILL_ABOVE)
    try:  # nothing folded: the output is still not the input file (its statistics are new)
        result.save(dst, input_path=None if result.report.unchanged else src, durable=durable)
    except VerificationError as e:
        if e.result is not None:
            write_report(e.result.report)
        raise
    return write_report(result.report)

