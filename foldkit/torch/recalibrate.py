"""``foldkit.torch.recalibrate``: BN running statistics re-estimated on data, in place, for any
``torch.nn.modules.batchnorm._BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm, and foldkit's BatchNormNd).

The same estimators as the ONNX side (foldkit.recalibration): float64 per-channel (count, mean, M2) merged
exactly, never an average of per-batch variances.

- ``batch``: one pass; every BN normalizes with its batch's statistics (as in training: the BN
  modules alone are put in train mode, with their running-statistics update switched off), and
  each BN's statistics are those of all its inputs over the pass.
- ``exact``: consistent with inference: BNs are measured one after another in the order the forward
  pass first calls them, each with every earlier BN already updated and the whole model in eval
  mode. One pass over the data per BN (a module has no graph to find independent BNs in).

Other modules stay in eval mode throughout (Dropout off); the model's train/eval state and the
BNs' momentum are restored afterwards. With an initialized process group (``distributed=None``
detects it, ``False`` ignores it), every rank's partial statistics are all-gathered and merged in
rank order, so all ranks end with the same statistics.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Union

import numpy as np
import torch

from ..errors import InputError
from ..moments import METHODS, Moments

# float64 values per piece of a BN input: the temporaries stay bounded whatever the batch
_PIECE = 1 << 22
# samples whose rows are kept (on the device) before they are merged into the running moments
_MERGE_ROWS = 512


class _Rows:
    """A BN input's exact per-channel moments, computed where the input is (a GPU's stays on it):
    each (sample, channel) row's mean and variance in float64, a few samples at a time (on a GPU
    ``torch.var_mean``'s Welford, elsewhere two passes), kept on the device and merged exactly
    (equal counts per row, then :meth:`Moments.merge` with tensors) into float64 (count, mean, M2)
    every ``_MERGE_ROWS`` samples and when read. A few device ops per BN and batch and no host
    synchronization until :meth:`moments`; never a float64 copy of the whole activation on the host."""

    def __init__(self):
        self.means, self.variances = [], []
        self.per_row = None  # values per row of the kept rows
        self.kept = 0
        self.total = Moments()  # its mean and M2 are tensors on the input's device

    def add(self, x: torch.Tensor) -> None:
        n = int(x.shape[0])
        if n == 0 or x.numel() == 0:
            return
        rows = x.detach().reshape(n, x.shape[1], -1)
        if self.per_row is not None and rows.shape[-1] != self.per_row:  # another spatial size: merge first
            self._merge()
        self.per_row = int(rows.shape[-1])
        per = max(1, _PIECE // max(1, rows[0].numel()))
        for s in range(0, n, per):
            part = rows[s:s + per].to(torch.float64)
            if part.is_cuda:  # one kernel (Welford) where each op costs a launch
                variance, mean = torch.var_mean(part, dim=-1, correction=0)
            else:  # two passes: torch's CPU Welford is slow on short rows (a 4x4 map)
                mean = part.mean(dim=-1, keepdim=True)
                variance = (part - mean).square_().mean(dim=-1)
                mean = mean.squeeze(-1)
            self.means.append(mean)
            self.variances.append(variance)
            del part  # before the next piece is made: one piece alive at a time
        self.kept += n
        if self.kept >= _MERGE_ROWS:
            self._merge()

    def _merge(self) -> None:
        if not self.kept:
            return
        means = torch.cat(self.means) if len(self.means) > 1 else self.means[0]
        variances = torch.cat(self.variances) if len(self.variances) > 1 else self.variances[0]
        spread, mean = torch.var_mean(means, dim=0, correction=0)
        count = self.kept * self.per_row
        batch = Moments(count, mean, (variances.mean(dim=0) + spread) * count)
        if self.total.count == 0:
            self.total = batch
        else:
            self.total.merge(batch)  # Chan et al.: only arithmetic, the same on tensors
        self.means, self.variances, self.kept = [], [], 0

    def moments(self) -> Moments:
        self._merge()
        t = self.total
        return Moments(t.count, t.mean.cpu().numpy(), t.m2.cpu().numpy()) if t.count else Moments()


def _moments(x: torch.Tensor) -> Moments:
    """The exact per-channel moments of one BN input ``x`` ([N, C, ...]), see :class:`_Rows`."""
    rows = _Rows()
    rows.add(x)
    return rows.moments()


def _bns(model: torch.nn.Module) -> list:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _call(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _gather(moments: list, group) -> list:
    import torch.distributed as dist

    world = dist.get_world_size(group)
    gathered = [None] * world
    dist.all_gather_object(gathered, [(m.count, m.mean, m.m2) for m in moments], group=group)
    out = [Moments() for _ in moments]
    for per_rank in gathered:
        for m, (count, mean, m2) in zip(out, per_rank):
            m.merge(Moments(count, mean, m2))
    return out


def recalibrate(model: torch.nn.Module, batches: Union[Iterable, Callable[[], Iterable]], method: str = "batch",
                distributed: Optional[bool] = None, group=None) -> dict:
    """Re-estimate ``model``'s BN running statistics in place. ``batches``: an iterable of inputs
    (a tensor, a tuple of them, or a dict of keyword arguments), or a callable returning one (needed
    for ``exact``, which makes several passes; a list works too). Returns {BN name: samples seen}."""
    if method not in METHODS:
        raise InputError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    import torch.distributed as dist

    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    source = batches if callable(batches) else (lambda: batches)
    if method == "exact" and not callable(batches) and not isinstance(batches, (list, tuple)):
        raise InputError("method='exact' makes several passes: give a list of batches or a callable returning them")
    bns = _bns(model)
    if not bns:
        return {}
    was_training = {m: m.training for m in model.modules()}
    momentum = {m: m.momentum for _, m in bns}
    order = []

    def run_pass(measure: set, batch_mode: bool) -> list:
        acc = {m: _Rows() for _, m in bns if m in measure}
        hooks = []
        for _, m in bns:
            if m in measure:
                def hook(mod, args, _acc=acc):
                    if mod not in order:
                        order.append(mod)
                    _acc[mod].add(args[0])
                hooks.append(m.register_forward_pre_hook(hook))
            else:
                def first(mod, args):
                    if mod not in order:
                        order.append(mod)
                hooks.append(m.register_forward_pre_hook(first))
        model.eval()
        for _, m in bns:
            if batch_mode and m in measure:
                m.train()
                m.momentum = 0.0  # normalize with batch statistics, leave the running ones alone
        try:
            with torch.no_grad():
                for batch in source():
                    _call(model, batch)
        finally:
            for h in hooks:
                h.remove()
            for _, m in bns:
                m.momentum = momentum[m]
        result = [acc[m].moments() if m in acc else None for _, m in bns]
        if distributed:
            present = [k for k, r in enumerate(result) if r is not None]
            merged = _gather([result[k] for k in present], group)
            for k, r in zip(present, merged):
                result[k] = r
        return result

    def store(m, mo: Moments):
        if mo.count == 0:
            raise InputError(f"a BatchNorm saw no values in the data ({type(m).__name__})")
        if m.running_mean is None:
            raise InputError(f"{type(m).__name__} with track_running_stats=False has no running statistics")
        m.running_mean.copy_(torch.from_numpy(mo.mean).to(m.running_mean.dtype))
        m.running_var.copy_(torch.from_numpy(mo.var).to(m.running_var.dtype))
    seen = {}
    try:
        if method == "batch":
            res = run_pass({m for _, m in bns}, True)
            for (name, m), mo in zip(bns, res):
                store(m, mo)
                seen[name] = int(mo.count)
        else:
            done = set()
            names = {m: name for name, m in bns}
            while len(done) < len(bns):
                res = run_pass({m for _, m in bns if m not in done}, False)
                pending = [m for m in order if m not in done] + [m for _, m in bns if m not in done and m not in order]
                first = pending[0]
                k = [m for _, m in bns].index(first)
                if res[k] is None or res[k].count == 0:  # never called by forward: leave it alone
                    done.add(first)
                    continue
                store(first, res[k])
                seen[names[first]] = int(res[k].count)
                done.add(first)
    finally:
        for mod, t in was_training.items():
            mod.train(t)
    return seen


def recalibrate_numpy_batches(arrays: Iterable[dict]) -> Iterable:
    """{name: array} batches (foldkit.data) as torch tensors for a single-input model."""
    for b in arrays:
        values = [v for k, v in b.items() if k != "label"]
        yield torch.from_numpy(np.ascontiguousarray(values[0])) if len(values) == 1 else \
            tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in values)
