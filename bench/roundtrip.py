"""The cost of one request into the student's process, as a hidden test pays it.

    .venv/bin/python bench/roundtrip.py [--requests 2000]

Starts one sandboxed student kernel the way the grader does (runtime loaded, channel
open), then times requests through the proxy: a call returning a small tensor
(`torch.ones(4)`), a call on a handle (`linear(x)` for a 16x16 nn.Linear), and an
attribute read. Prints the median and 95th percentile round trip in milliseconds,
and one machine-readable line: `roundtrip small_tensor_median_ms=X`.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from coursekit.notebook import Cell  # noqa: E402
from coursekit.proxy import Student  # noqa: E402
from coursekit.isolation import student_environment  # noqa: E402
from coursekit.session import GradingSession, make_workdir  # noqa: E402


def timed(fn, n: int) -> list[float]:
    for _ in range(min(50, n)):  # warm-up: imports, first allocations
        fn()
    times = []
    for _ in range(n):
        began = time.perf_counter()
        fn()
        times.append((time.perf_counter() - began) * 1000)
    return times


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    workdir = make_workdir()
    session = GradingSession([Cell(1, "import torch")], workdir, student_environment(ROOT / "data", workdir), 600)
    try:
        began = time.perf_counter()
        session.ensure_running()
        print(f"kernel start, runtime and channel: {time.perf_counter() - began:.2f} s")
        student = Student(session)
        ones = student.lib("torch.ones")
        linear = student.lib("torch.nn.Linear")(16, 16)
        x = torch.randn(8, 16)
        cases = {"small_tensor": lambda: ones(4), "module_call": lambda: linear(x),
                 "attribute": lambda: linear.in_features}
        results = {}
        for name, fn in cases.items():
            times = timed(fn, args.requests)
            results[name] = statistics.median(times)
            p95 = sorted(times)[int(0.95 * len(times))]
            print(f"{name:14s} median {results[name]:.3f} ms   p95 {p95:.3f} ms   ({args.requests} requests)")
        print(f"roundtrip small_tensor_median_ms={results['small_tensor']:.3f}")
    finally:
        session.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
