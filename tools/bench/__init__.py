"""The cases and measurements behind ``tools/benchmark.py`` (the command line).

* :mod:`bench.measure`: step timing, the summary (images/s, mean and p90 step
  time), peak memory, loader throughput, and the child process that runs one
  case on its own (a CPU memory probe, case a's plain path);
* :mod:`bench.cls_cases`: cases a and b, the classification trainer's own step;
* :mod:`bench.mdistiller`: case a against an mdistiller checkout, in alternating rounds;
* :mod:`bench.det_case`: cases c and d, detection distillation steps against their parts;
* :mod:`bench.plot`: the PNG bar chart.

The generated data comes from :mod:`kd_cls.testing`, the project's one writer of
fake datasets in their real on-disk formats.
"""
from __future__ import annotations

import os

TOOLS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(TOOLS)
# The command line; child runs (memory probes, case a's plain path) re-invoke it.
SCRIPT = os.path.join(TOOLS, "benchmark.py")
CASES = ("a", "b", "c", "d")
# (warmup, steps) per case when not given: a CPU run of all four takes a few minutes.
DEFAULT_STEPS = {"cpu": {"a": (2, 10), "b": (1, 3), "c": (1, 3), "d": (1, 3)},
                 "cuda": {"a": (10, 100), "b": (5, 30), "c": (5, 20), "d": (5, 20)}}
DEFAULT_BATCH = {"a": 64, "b": 32, "c": 2, "d": 2}
DEFAULT_SIZE = {"a": (32, 32), "b": (224, 224), "c": (320, 480), "d": (320, 480)}


def case_steps(case: str, args, device):
    """``(warmup, steps)`` of ``case``: ``--warmup`` / ``--steps``, else the defaults for the device."""
    w, s = DEFAULT_STEPS["cuda" if device.type == "cuda" else "cpu"][case]
    return (w if args.warmup is None else args.warmup), (s if args.steps is None else max(1, args.steps))
