"""foldkit.torch.recalibrate against plain PyTorch inference over the same batches, on a CPU or a
GPU, in one process: time and peak device memory. Rounds are interleaved (plain, foldkit,
host-moments, then the reverse), each variant starting from the same damaged statistics.

"host moments" is the recalibrator as it was before: each BN input copied whole, in float64, to the
host and reduced there by numpy; foldkit now reduces it where it is (float64 rows of a few samples
at a time) and moves 2 x N x C numbers.

    python benchmarks/recalibrate_torch.py [--device cuda] [--models resnet18,resnet50] [--size 224]
                                           [--batch 32] [--samples 256] [--rounds 5] [--no-host] [--out FILE.md]
"""

import argparse
import copy
import importlib
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from foldkit.moments import Moments  # noqa: E402
from foldkit.torch import recalibrate  # noqa: E402

R = importlib.import_module("foldkit.torch.recalibrate")


class _HostRows:  # the recalibrator's accumulator before: each input whole to the host, in float64
    def __init__(self):
        self.m = Moments()

    def add(self, x):
        self.m.add(x.detach().to(torch.float64).cpu().numpy(), axis=1)

    def moments(self):
        return self.m


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, setup=None):
    if setup is not None:
        setup()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    dt = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20 if device == "cuda" else None
    return dt, peak


def run(name, device, size, batch, samples, rounds, host=True):
    from models import resnet

    model = getattr(resnet, name)().to(device)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(min(batch, samples - s), 3, size, size, generator=g).to(device) for s in range(0, samples, batch)]
    start = copy.deepcopy(model.state_dict())

    def plain():
        model.eval()
        with torch.no_grad():
            for b in batches:
                model(b)

    def reset():  # the damaged statistics again, outside the timing
        model.load_state_dict(start)

    def foldkit():
        recalibrate(model, batches, method="batch")

    def host_moments():
        saved = R._Rows
        R._Rows = _HostRows
        try:
            recalibrate(model, batches, method="batch")
        finally:
            R._Rows = saved

    variants = {"plain": plain, "foldkit": foldkit, "host moments": host_moments} if host else \
        {"plain": plain, "foldkit": foldkit}
    for fn in variants.values():  # warm-up (cuDNN's algorithm choice, allocator)
        fn()
    times = {k: [] for k in variants}
    peaks = {k: None for k in variants}
    order = list(variants)
    for r in range(rounds):
        for k in (order if r % 2 == 0 else order[::-1]):
            dt, peak = _timed(variants[k], device, None if k == "plain" else reset)
            times[k].append(dt)
            if peak is not None:
                peaks[k] = max(peaks[k] or 0.0, peak)
    med = {k: statistics.median(v) for k, v in times.items()}
    return med, peaks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", default="32")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-host", action="store_true", help="leave out the host-moments variant (slow on a GPU)")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.device == "cuda":  # the kernels PyTorch would choose for inference, as a user runs them
        torch.backends.cudnn.benchmark = True
    where = torch.cuda.get_device_name(0) if a.device == "cuda" else platform.processor() or platform.machine()
    lines = [f"# foldkit.torch.recalibrate vs plain PyTorch inference ({a.device}: {where})", "",
             f"`python benchmarks/recalibrate_torch.py --device {a.device} --models {a.models} --size {a.size} "
             f"--batch {a.batch} --samples {a.samples} --rounds {a.rounds}{' --no-host' if a.no_host else ''}`; torch {torch.__version__}. "
             f"Medians of {a.rounds} interleaved rounds, each over the same {a.samples} random samples already on "
             "the device; peak memory is what each variant allocated on the device above what was there before.", "",
             "| model | resolution | batch | plain s | foldkit s | ratio | host moments s | ratio | "
             "plain peak MiB | foldkit peak MiB | host moments peak MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in a.models.split(","):
        for batch in [int(b) for b in a.batch.split(",")]:
            med, peaks = run(name, a.device, a.size, batch, a.samples, a.rounds, host=not a.no_host)
            if a.no_host:
                med["host moments"], peaks["host moments"] = float("nan"), None
            lines.append(f"| {name} | {a.size}x{a.size} | {batch} | {med['plain']:.3f} | {med['foldkit']:.3f} | "
                         f"{med['foldkit'] / med['plain']:.2f}x | {med['host moments']:.3f} | "
                         f"{med['host moments'] / med['plain']:.2f}x | " +
                         " | ".join("-" if peaks[k] is None else f"{peaks[k]:.0f}" for k in ("plain", "foldkit", "host moments")) + " |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
