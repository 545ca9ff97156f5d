"""Latency benchmarking: runners with one lifecycle, interleaved timing, statistics, reports, plots."""

from .core import BenchConfig, BenchResult, run_bench
from .runners import RUNTIMES, Unavailable

__all__ = ["run_bench", "BenchConfig", "BenchResult", "RUNTIMES", "Unavailable"]
