"""Timing, summaries, peak memory and the child process that runs one case on its own."""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

from . import REPO, SCRIPT


class Memory:
    """Peak memory growth over a code region, in MiB: above what was allocated at its start
    (CUDA ``max_memory_allocated``), or on the CPU above the resident set size at its start."""

    def __init__(self, device):
        self.device = device

    @staticmethod
    def _status(field: str) -> Optional[float]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return float(line.split()[1]) / 1024.0
        except OSError:
            pass
        return None

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
            return
        try:  # "5" resets the peak-RSS counter (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self.base = self._status("VmRSS") or 0.0

    def peak_mb(self) -> float:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base
        hwm = self._status("VmHWM")
        if hwm is None:
            import resource

            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        return max(hwm - self.base, 0.0)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], object], warmup: int, steps: int, device) -> List[float]:
    """Seconds of each of ``steps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def summarize(times: List[float], batch: int) -> Dict[str, float]:
    ms = sorted(t * 1000.0 for t in times)
    p90 = ms[min(len(ms) - 1, max(0, math.ceil(0.9 * len(ms)) - 1))]
    return {
        "images_per_s": round(batch * len(times) / sum(times), 2),
        "step_ms_mean": round(statistics.fmean(ms), 2),
        "step_ms_p90": round(p90, 2),
    }


def measure(step, warmup: int, steps: int, batch: int, device) -> Dict[str, float]:
    """Timing and peak-memory growth of ``steps`` steps after ``warmup`` (one-time set-up excluded)."""
    time_steps(step, warmup, 0, device)
    mem = Memory(device)
    mem.start()
    res = summarize(time_steps(step, 0, steps, device), batch)
    res["peak_mem_mb"] = round(mem.peak_mb(), 1)
    return res


def time_loader(loader, n_batches: int, device) -> Optional[float]:
    """Images/s of iterating ``loader`` alone (first batch untimed: worker start-up)."""
    it = iter(loader)
    try:
        next(it)
    except StopIteration:
        return None
    sync(device)
    n_img, t0 = 0, time.perf_counter()
    for _, batch in zip(range(n_batches), it):
        n_img += batch[0].shape[0]
    sync(device)
    dt = time.perf_counter() - t0
    return round(n_img / dt, 1) if n_img else None


def run_child(args, case: str, path: str, probe: bool) -> Dict:
    """One case in a fresh process (so that its peak memory is its own).

    A memory probe runs two steps after one warm-up step with glibc told to
    serve every allocation of 64 KiB or more by ``mmap``, so that freed memory
    leaves the resident set at once and the peak RSS growth is the peak of live
    tensors. (That costs time, so probes are not timed.)
    """
    import subprocess

    cmd = [sys.executable, SCRIPT, "--device", args.device, "--case", case, "--path", path,
           "--no-plain", "--no-mem-probe", "--no-plot"]
    env = dict(os.environ)
    if probe:
        cmd += ["--_probe", "--steps", "2", "--warmup", "1"]
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    for flag, value in (("--steps", None if probe else args.steps), ("--warmup", None if probe else args.warmup),
                        ("--batch-size", args.batch_size), ("--image-size", args.image_size),
                        ("--threads", args.threads), ("--workers", args.workers),
                        ("--teacher-cache", getattr(args, "teacher_cache", "off"))):
        if value is not None:
            cmd += [flag, str(value)]
    cmd += ["--det-opts"] + list(args.det_opts) if args.det_opts else []
    # The child's JSON line is read from its stdout; the file it also writes is thrown away.
    with tempfile.TemporaryDirectory(prefix="kd_bench_child_") as out:
        cmd += ["--out", out]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"child run failed ({' '.join(cmd)}): {proc.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])
