"""Results of the demos: ``results.json``, the terminal table and the PNG, shared by both demos.

A result row is one run::

    {"role": "teacher" | "student", "model": str, "method": str, "seed": int,
     "metric": "top1" | "box_AP", "value": float}

Every run that happened is a row; nothing is dropped. Per method the table
shows mean ± sample std over seeds and, against ``vanilla``, the mean of the
per-seed paired differences with its standard error (std of the differences
/ sqrt(n)), which is what "the gain holds up to repetition" means here.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from typing import Dict, List, Optional, Sequence

__all__ = ["Row", "write_results", "read_results", "replace_rows", "summarize", "format_table", "plot_results", "RESULTS_FILE"]

RESULTS_FILE = "results.json"
Row = Dict[str, object]
_ROLES = ("teacher", "student")
_METRICS = ("top1", "box_AP")


def _check_row(row: Row) -> None:
    missing = {"role", "model", "method", "seed", "metric", "value"} - set(row)
    if missing:
        raise ValueError(f"result row lacks {sorted(missing)}: {row}")
    if row["role"] not in _ROLES or row["metric"] not in _METRICS:
        raise ValueError(f"result row has role {row['role']!r} / metric {row['metric']!r}: {row}")


def write_results(out_dir: str, rows: Sequence[Row]) -> str:
    """``out_dir/results.json`` = ``{"rows": rows}`` (atomically); returns its path."""
    for r in rows:
        _check_row(r)
    path = os.path.join(out_dir, RESULTS_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"rows": [dict(r) for r in rows]}, f, indent=1)
    os.replace(tmp, path)
    return path


def read_results(out_dir: str) -> List[Row]:
    with open(os.path.join(out_dir, RESULTS_FILE)) as f:
        return json.load(f)["rows"]


def replace_rows(out_dir: str, rows: Sequence[Row], metric: str) -> str:
    """``out_dir/results.json`` with ``rows`` in place of its rows of ``metric``; the other demo's rows stay.

    ``make demo`` runs both demos side by side into one folder: a lock on the folder serialises their
    read-modify-writes, so neither loses the other's rows."""
    import contextlib
    import fcntl

    os.makedirs(out_dir, exist_ok=True)
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        kept = []
        if os.path.isfile(os.path.join(out_dir, RESULTS_FILE)):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                kept = [r for r in read_results(out_dir) if r.get("metric") != metric]
        return write_results(out_dir, kept + list(rows))
    finally:
        os.close(fd)  # releases the lock


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: Sequence[Row], baseline: str = "vanilla") -> List[Dict[str, object]]:
    """Per (role, method): n, mean, std; for students, the paired gain over ``baseline`` and its SE."""
    groups: Dict[tuple, Dict[int, float]] = {}
    for r in rows:
        groups.setdefault((r["role"], r["method"], r["model"]), {})[int(r["seed"])] = float(r["value"])
    base = next((v for (role, m, _), v in groups.items() if role == "student" and m == baseline), {})
    out = []
    for (role, method, model), by_seed in groups.items():
        values = list(by_seed.values())
        s = {"role": role, "method": method, "model": model, "n": len(values),
             "mean": statistics.fmean(values), "std": _std(values), "gain": None, "gain_se": None, "paired": 0}
        if role == "student" and method != baseline and base:
            diffs = [by_seed[k] - base[k] for k in sorted(set(by_seed) & set(base))]
            if diffs:
                s.update(gain=statistics.fmean(diffs), paired=len(diffs),
                         gain_se=_std(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None)
        out.append(s)
    # Teachers, then the baseline, then the methods in the order they ran: the table reads as the demo went.
    order = {r: i for i, r in enumerate(_ROLES)}
    first = list(groups)
    return sorted(out, key=lambda s: (order[s["role"]], s["method"] != baseline,
                                      first.index((s["role"], s["method"], s["model"]))))


def format_table(summary: Sequence[Dict[str, object]], metric: str) -> str:
    """The terminal table: mean ± std per method, the paired gain over vanilla ± its SE, and the seeds."""
    w = max(16, len(metric) + 11)  # "box_AP mean ± std" is wider than "top1 mean ± std"
    head = f"| {'role':7} | {'model':22} | {'method':9} | {metric + ' mean ± std':>{w}} | {'gain ± SE':>14} | seeds |"
    lines = [head, "|" + "|".join("-" * (len(c) + 0) for c in head.split("|")[1:-1]) + "|"]
    for s in summary:
        gain = "" if s["gain"] is None else (
            f"{s['gain']:+.2f} ± {s['gain_se']:.2f}" if s["gain_se"] is not None else f"{s['gain']:+.2f}")
        spread = f"{s['mean']:.2f} ± {s['std']:.2f}"
        lines.append(f"| {s['role']:7} | {str(s['model'])[:22]:22} | {str(s['method']):9} | "
                     f"{spread:>{w}} | {gain:>14} | {s['n']:5d} |")
    return "\n".join(lines)


def plot_results(summary: Sequence[Dict[str, object]], path: str, metric: str, title: str,
                 curves: Optional[Dict[str, List[float]]] = None) -> str:
    """Mean ± std per method as bars (the teacher hatched); with ``curves``, a second panel of the test
    metric per epoch of each method (seeds averaged). Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if curves else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    color = _method_colors(summary)
    labels = [f"teacher\n{s['model']}" if s["role"] == "teacher" else f"{s['method']}\n{s['model']}" for s in summary]
    means = [s["mean"] for s in summary]
    stds = [s["std"] for s in summary]
    colors = [_TEACHER_COLOR if s["role"] == "teacher" else color[s["method"]] for s in summary]
    bars = ax.bar(range(len(summary)), means, yerr=stds, capsize=4, color=colors)
    for b, s in zip(bars, summary):
        if s["role"] == "teacher":
            b.set_hatch("//")
        ax.annotate(f"{s['mean']:.1f}", (b.get_x() + b.get_width() / 2, s["mean"] + s["std"]), xytext=(0, 2),
                    textcoords="offset points", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(summary)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel(f"{metric} (mean ± std, n={max((s['n'] for s in summary), default=0)})")
    low = min(m - s for m, s in zip(means, stds)) if means else 0.0
    high = max(m + s for m, s in zip(means, stds)) if means else 1.0
    ax.set_ylim(max(0.0, low - 0.15 * (high - low + 1e-9)), high + 0.1 * (high - low + 1e-9))
    if curves:
        cx = axes[0][1]
        for method, ys in curves.items():
            cx.plot(range(1, len(ys) + 1), ys, marker="o", markersize=2.5, linewidth=1.2, label=method,
                    color=color.get(method))
        teachers = [s for s in summary if s["role"] == "teacher"]
        for s in teachers:
            cx.axhline(s["mean"], color=_TEACHER_COLOR, linestyle="--", linewidth=1,
                       label=f"teacher {s['model']} (best)")
        # The first epochs of a run from scratch sit near chance: start the axis where the runs have settled.
        settled = [y for ys in curves.values() for y in ys[len(ys) // 4:]] + [s["mean"] for s in teachers]
        if settled:
            top, bottom = max(settled), min(settled)
            cx.set_ylim(max(0.0, bottom - 0.1 * (top - bottom + 1e-9)), top + 0.05 * (top - bottom + 1e-9))
        cx.set_xlabel("epoch")
        cx.xaxis.get_major_locator().set_params(integer=True)
        cx.set_ylabel(f"test {metric} (seeds averaged)")
        cx.legend(fontsize=7)
        cx.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_TEACHER_COLOR = "#999999"
_PALETTE = ("#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974")


def _method_colors(summary: Sequence[Dict[str, object]]) -> Dict[str, str]:
    """One colour per student method, the same in both panels: vanilla blue, the others in order."""
    methods = [s["method"] for s in summary if s["role"] == "student"]
    others = [m for m in dict.fromkeys(methods) if m != "vanilla"]
    out = {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(others)}
    out["vanilla"] = "#4c72b0"
    return out
