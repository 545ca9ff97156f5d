"""Options the latency benchmarks share (qdq.py, reparam.py)."""

import argparse
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def latency_parser(out: str) -> argparse.ArgumentParser:
    """--iters and --warmup (interleaved rounds), --runtime (a foldkit bench list), --threads (the
    runtimes' intra-op threads; default theirs) and --out (default benchmarks/out/OUT); a script adds
    its own options to the parser it gets."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--runtime", default="ort-cpu,openvino")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", out))
    return ap
