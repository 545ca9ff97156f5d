"""Latency statistics: percentiles, throughput, and paired ratios with bootstrap intervals."""

from __future__ import annotations

import numpy as np

MIN_ROUNDS = 20  # below this a bootstrap interval of a median says little: reported as such


def summarize(ns, batch: int) -> dict:
    ms = np.asarray(ns, dtype=np.float64) / 1e6
    return {
        "n": int(ms.size),
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "std_ms": float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
        "throughput_per_s": float(batch * 1000.0 / ms.mean()) if ms.mean() > 0 else float("inf"),
    }


def paired_ratio(candidate_ns, baseline_ns, n_boot: int = 2000, seed: int = 0) -> dict:
    """Median of per-round ratios candidate/baseline with a 95% bootstrap interval over rounds.

    Rounds are paired (both models ran back to back in the same round), so slow drift of the machine
    cancels. ``significant`` says the interval excludes 1.0.
    """
    c = np.asarray(candidate_ns, dtype=np.float64)
    b = np.asarray(baseline_ns, dtype=np.float64)
    n = min(c.size, b.size)
    r = c[:n] / b[:n]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    boots = np.median(r[idx], axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    enough = n >= MIN_ROUNDS
    out = {"ratio": float(np.median(r)), "ci95": [float(lo), float(hi)], "rounds": int(n),
           "significant": bool(enough and (lo > 1.0 or hi < 1.0)), "enough_rounds": enough}
    if not enough:
        out["note"] = f"{n} rounds: too few for a meaningful interval (use --iters {MIN_ROUNDS} or more)"
    return out
