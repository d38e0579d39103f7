"""What the fits cost the steps: per GradiVeQ run kept by accuracy.py --runs-dir, the step times (medians, spread,
the slowest step), the steps that waited for bases (fit_ms: a synchronous fit, or the wait for a deferred one
and its install) and, with fit_delay_iters, what the worker took behind the steps in between.

A step's time is the difference of accuracy.py's training wall clock (evaluation excluded) between two steps on
rank 0. Written as markdown to --out.

    python benchmarks/ddp/fit_stall.py --runs-dir benchmarks/results/runs/fit_stall \\
        --out benchmarks/results/fit_stall_resnet32_50mbit.md --command "python benchmarks/ddp/accuracy.py ..."
"""

import argparse
import glob
import os
import pickle
import statistics


def step_times(rows):
    walls = [r["wall"] for r in rows]
    return [walls[0]] + [b - a for a, b in zip(walls, walls[1:])]


def summarize(result):
    rows = result["rows"]
    times = step_times(rows)
    fit_steps = [i for i, r in enumerate(rows) if r["fit"] > 0]
    compressed = [t for t, r in zip(times, rows) if r["phase"] == "compressed"]
    others = [times[i] for i, r in enumerate(rows) if r["phase"] == "compressed" and i not in fit_steps]
    median = statistics.median(others) if others else float("nan")
    return dict(
        method=result["method"], seed=result["seed"], steps=len(rows), total=rows[-1]["wall"],
        median=median, p95=sorted(compressed)[int(0.95 * (len(compressed) - 1))] if compressed else float("nan"),
        fits=[(rows[i]["step"], times[i], rows[i]["fit"], rows[i].get("fit_background", 0.0)) for i in fit_steps],
        fit_wait=sum(r["fit"] for r in rows))


def report(summaries, command):
    out = ["# What the fits cost the steps (rank 0)", "", f"Command: `{command}`  ", "",
           "Step times exclude evaluation. Median and p95 over the compressed steps that do not fit or install "
           "bases; a fit step's excess is its time minus that median.", "",
           "| method | seed | steps | training s | median step s | p95 step s | fit steps: step (time s, waited s, "
           "worker s) | waited for fits, s | worst fit step / median |", "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        fits = "; ".join(f"{step} ({t:.2f}, {w:.2f}, {bg:.2f})" for step, t, w, bg in s["fits"]) or "-"
        worst = max((t for _, t, _, _ in s["fits"]), default=float("nan"))
        out.append(f"| {s['method']} | {s['seed']} | {s['steps']} | {s['total']:.0f} | {s['median']:.3f} | "
                   f"{s['p95']:.3f} | {fits} | {s['fit_wait']:.2f} | {worst / s['median']:.1f} |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs-dir", required=True, help="accuracy.py --runs-dir of the runs to read")
    ap.add_argument("--out", required=True, help="markdown file to write")
    ap.add_argument("--command", default="(not given)", help="the accuracy.py command that made the runs")
    args = ap.parse_args()
    paths = sorted(glob.glob(os.path.join(args.runs_dir, "*.pkl")))
    results = [pickle.load(open(p, "rb")) for p in paths]
    results = [r for r in results if r["method"].startswith("gradiveq")]
    if not results:
        raise SystemExit(f"fit_stall.py: no GradiVeQ runs in --runs-dir {args.runs_dir}")
    text = report([summarize(r) for r in results], args.command)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
