"""The PNG bar chart of a benchmark run: images/s of each case and its references."""
from __future__ import annotations

from typing import Dict, List


def plot(results: List[Dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.6), squeeze=False)
    for ax, r in zip(axes[0], results):
        bars = {"ours": r.get("images_per_s")}
        for key, label in (("plain_images_per_s", "plain path"), ("mdistiller_images_per_s", "mdistiller"),
                           ("images_per_s_with_loader", "ours + loader"), ("loader_images_per_s", "loader only")):
            if r.get(key):
                bars[label] = r[key]
        if r["case"] in ("c", "d") and r.get("parts_sum_ms"):
            bars["plain student + teacher fwd"] = round(r["batch_size"] * 1000 / r["parts_sum_ms"], 2)
        bars = {k: v for k, v in bars.items() if v}
        ax.bar(range(len(bars)), list(bars.values()), color="tab:blue")
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels(list(bars), rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("images / s")
        ax.set_title(f"case {r['case']} ({r['device']}): {r.get('teacher')} -> {r.get('student')}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
