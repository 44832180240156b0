#!/usr/bin/env python
"""Every detection KD method on the shapes data, per detector family, over seeds, on the CPU.

For each family (Faster R-CNN, RetinaNet, FCOS) one teacher, ResNet-18-FPN, is trained once
(cached as in tools/demo_det.py) and a MobileNetV2-x0.5-FPN student of the same family trains
alone (vanilla) and with every method of KD.METHODS that serves the family, each for every
seed, all with the schedule and data of the detection demo (the distilled students inherit the
teacher's head as in the demo, --inherit). Methods a family cannot run are n/a: DKD reads R-CNN
RoI logits, CrossKD runs the teacher's dense head.

Writes DIR/results.json (one row per run, with its family), DIR/bench_det_methods.png (mean ±
std per method and family) and a Markdown table (--md, default DIR/det_methods_shapes.md) with
the command and the machine. A rerun with the same settings keeps the runs already in
DIR/results.json and trains only the missing ones.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo_det as D  # noqa: E402  (the demo's models, data, teacher cache and runs)

EXAMPLES = """examples:
  python tools/bench_det_methods.py --seeds 3 --md docs/det_methods_shapes.md   # the full table
  python tools/bench_det_methods.py --families rcnn --methods FGD DKD --seeds 2
  python tools/bench_det_methods.py --teacher-iters 2 --student-iters 1 --num-train 4 --num-val 2   # smoke
"""
FAMILY_NAMES = {"rcnn": "Faster R-CNN", "retinanet": "RetinaNet", "fcos": "FCOS"}
# The control that separates the inherited head from the methods' losses: KD.INHERIT with a
# FitNet loss of weight 0 (a distiller needs a method; this one adds nothing to the gradients).
CONTROL = "inherit only"
CONTROL_KD = ("FitNet", ["KD.FITNET.LOSS_WEIGHT", "0.0"])


def build_parser():
    from kd_det.methods import KD_METHODS

    defaults = dict(D.DEFAULTS, seeds=3, methods=sorted(KD_METHODS.names()))
    p = D.build_parser("tools/bench_det_methods.py", __doc__, EXAMPLES, defaults)
    p.set_defaults(out="./bench_out/det_methods")
    for action in p._actions:
        if action.dest == "out":
            action.help = "output folder DIR (default ./bench_out/det_methods)"
        if action.dest == "methods":
            action.help = "KD.METHODS names (default: all of them)"
    p.add_argument("--families", nargs="+", choices=list(FAMILY_NAMES), default=list(FAMILY_NAMES),
                   help="detector families (default: all three)")
    p.add_argument("--no-control", action="store_true", help=f"leave out the {CONTROL!r} control row")
    p.add_argument("--md", default=None, help="Markdown table to write (default DIR/det_methods_shapes.md)")
    return p


def serves(method: str, family: str) -> bool:
    from kd_det.methods import KD_METHODS

    cls = KD_METHODS.get(method)
    return all(f is None or family in f for f in (cls.STUDENT_FAMILIES, getattr(cls, "TEACHER_FAMILIES", None)))


def settings_of(a) -> dict:
    """What a kept run must share with this invocation: the options, and the models of every family."""
    keys = ("teacher_iters", "student_iters", "image_size", "num_train", "num_val", "inherit")
    out = {k: getattr(a, k) for k in keys}
    out["models"] = hashlib.sha256(json.dumps([D.COMMON, D.FAMILIES], sort_keys=True).encode()).hexdigest()[:16]
    return out


def command_line(argv) -> str:
    """The command, without the output paths (which are the caller's)."""
    shown, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x in ("--out", "--md"):
            skip = True
        elif not x.startswith(("--out=", "--md=")):
            shown.append(x)
    return " ".join(["python tools/bench_det_methods.py"] + [shlex.quote(x) for x in shown])


def machine(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import torch

    return (f"{cpu}, {os.cpu_count()} cores; one process at a time, {threads} torch thread(s); "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def summary_cells(rows, families, methods):
    """``{(family, method): summary dict}`` from demo_report.summarize, per family."""
    from demo_report import summarize

    cells = {}
    for fam in families:
        for s in summarize([r for r in rows if r.get("family") == fam]):
            cells[(fam, "teacher" if s["role"] == "teacher" else s["method"])] = s
    return cells


def markdown(cells, families, methods, a, cmd, wall_s) -> str:
    def cell(fam, m):
        s = cells.get((fam, m))
        if m not in ("teacher", "vanilla", CONTROL) and not serves(m, fam):
            return "n/a"
        if s is None:
            return "not run"
        text = f"{s['mean']:.1f} ± {s['std']:.1f}"
        if s["gain"] is not None:
            se = f" ± {s['gain_se']:.1f}" if s["gain_se"] is not None else ""
            text += f" ({s['gain']:+.1f}{se})"
        return text

    parts = D.INHERIT[a.inherit]
    inherit = (f"every distilled student starts from the teacher's {a.inherit} (KD.INHERIT {parts})" if parts
               else "no student inherits the teacher's weights (KD.INHERIT [])")
    control = [CONTROL] if any(k[1] == CONTROL for k in cells) else []
    control_text = (f" {CONTROL}: the student starts from the teacher's {a.inherit} too but trains with no "
                    "distillation loss (a FitNet loss of weight 0), so a method's own contribution is its "
                    "difference from this row." if control else "")
    head = "| method | " + " | ".join(FAMILY_NAMES[f] for f in families) + " |"
    lines = [
        "# Detection KD methods on the shapes data",
        "",
        f"COCO box AP (mean ± std over seeds {a.first_seed}-{a.first_seed + a.seeds - 1}; in brackets the mean of "
        "the per-seed differences from vanilla ± its standard error) on the generated shapes val split "
        f"({a.num_val} images of {a.image_size} px; {a.num_train} training images). Per family one ResNet-18-FPN "
        f"teacher ({a.teacher_iters} iterations) and a MobileNetV2-x0.5-FPN student ({a.student_iters} iterations, "
        f"batch 4, from scratch) of the same family; {inherit}, and each method takes its default keys. n/a: the "
        "method does not serve the family (DKD needs R-CNN RoI logits, CrossKD a dense head)." + control_text,
        "",
        head,
        "|" + "---|" * (len(families) + 1),
    ]
    for m in ["teacher", "vanilla"] + control + list(methods):
        lines.append(f"| {m} | " + " | ".join(cell(f, m) for f in families) + " |")
    lines += ["", f"Command: `{cmd}`", "", f"Machine: {machine(a.threads)}; {wall_s / 3600:.1f} h of wall time "
              "(all invocations).", ""]
    return "\n".join(lines)


def plot(cells, families, methods, path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["vanilla"] + ([CONTROL] if any(k[1] == CONTROL for k in cells) else []) + list(methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) * len(families) / 2 + 2), 3.8))
    width = 0.8 / len(families)
    for i, fam in enumerate(families):
        xs, means, stds = [], [], []
        for j, m in enumerate(names):
            s = cells.get((fam, m))
            if s is not None:
                xs.append(j + (i - (len(families) - 1) / 2) * width)
                means.append(s["mean"])
                stds.append(s["std"])
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=FAMILY_NAMES[fam])
        t = cells.get((fam, "teacher"))
        if t is not None:
            ax.axhline(t["mean"], color=f"C{i}", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("box AP (mean ± std over seeds)")
    ax.set_title("MobileNetV2-x0.5-FPN students on shapes (dashed: each family's teacher)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    a = p.parse_args(argv)
    if a.methods == p.get_default("methods"):  # "all": those that serve at least one of the chosen families
        a.methods = [m for m in a.methods if any(serves(m, f) for f in a.families)]
    D.check_args(p, a, families=tuple(a.families))
    import torch

    import kd_det  # noqa: F401
    from demo_report import write_results

    torch.set_num_threads(a.threads)
    out = os.path.abspath(a.out)
    det_dir = os.path.join(out, "det")
    os.makedirs(det_dir, exist_ok=True)
    D.setup_logs(det_dir, a.verbose)
    t0 = time.time()

    def log(msg):
        print(f"[bench_det {time.time() - t0:6.0f}s] {msg}", flush=True)

    settings = settings_of(a)
    results, rows, before = os.path.join(out, "results.json"), [], 0.0
    if os.path.isfile(results):
        with open(results) as f:
            saved = json.load(f)
        if saved.get("settings") == settings:
            rows, before = saved["rows"], float(saved.get("seconds", 0.0))
            log(f"{len(rows)} runs kept from {results}")

    def save():
        write_results(out, rows)
        with open(results) as f:
            data = json.load(f)
        data["settings"], data["seconds"] = settings, round(before + time.time() - t0, 1)
        with open(results + ".tmp", "w") as f:
            json.dump(data, f, indent=1)
        os.replace(results + ".tmp", results)

    def done(fam, role, method, seed):
        return any(r["family"] == fam and r["role"] == role and r["method"] == method and r["seed"] == seed
                   for r in rows)

    options = D.data_options(a)
    D.prepare_data(det_dir, options)
    seeds = range(a.first_seed, a.first_seed + a.seeds)
    controls = [] if a.no_control or not D.INHERIT[a.inherit] else [CONTROL]
    for fam in a.families:
        spec = D.FAMILIES[fam]
        teacher = D.cached_teacher(det_dir, fam, a, a.first_seed, options, log)
        if not done(fam, "teacher", "vanilla", a.first_seed):
            rows.append(dict(role="teacher", model=spec["teacher"][2], method="vanilla", seed=a.first_seed,
                             metric="box_AP", value=teacher[2], family=fam))
        for seed in seeds:
            for m in ["vanilla"] + controls + [x for x in a.methods if serves(x, fam)]:
                if done(fam, "student", m, seed):
                    continue
                t1 = time.time()
                if m == CONTROL:
                    ap = D.student_run(det_dir, fam, CONTROL_KD[0], seed, a, teacher, CONTROL_KD[1], "inherit-only")
                else:
                    ap = D.student_run(det_dir, fam, m, seed, a, teacher)
                rows.append(dict(role="student", model=spec["student"][2], method=m, seed=seed, metric="box_AP",
                                 value=ap, family=fam))
                save()
                log(f"{fam} seed {seed} {m:8s} box AP {ap:6.2f} ({time.time() - t1:.0f}s)")
    save()
    cells = summary_cells(rows, a.families, a.methods)
    md = os.path.abspath(a.md) if a.md else os.path.join(out, "det_methods_shapes.md")
    os.makedirs(os.path.dirname(md), exist_ok=True)
    text = markdown(cells, a.families, a.methods, a, command_line(argv), before + time.time() - t0)
    with open(md, "w") as f:
        f.write(text)
    png = plot(cells, a.families, a.methods, os.path.join(out, "bench_det_methods.png"))
    print(text)
    log(f"wrote {results}, {png}, {md}")
    return rows


if __name__ == "__main__":
    main()
